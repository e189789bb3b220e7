//! The gated delta rule's recurrence on one head's `[dk, dv]` state, with
//! one pass over the state per token.
//!
//! Written out, a token's step reads the state twice (decay and `Sᵀk`, then
//! the rank-one write and `Sᵀq`), and at 64 KiB per head (128 x 128 f32)
//! the state lives in L2, so those passes were a tenth of prefill. The
//! step is rearranged so each pass both writes token `t` and reads what
//! token `t + 1` needs. With `a = S_{t-1}ᵀk_t` and `b = S_{t-1}ᵀq_t`:
//!
//! ```text
//! u_t = beta_t (v_t - decay_t a)
//! o_t = S_tᵀq_t = decay_t b + (k_t · q_t) u_t
//! S_t = decay_t S_{t-1} + k_t ⊗ u_t      (the same pass then sums S_tᵀk_{t+1}, S_tᵀq_{t+1})
//! ```
//!
//! `n` tokens take `n + 1` passes instead of `2n`, each doing less. The
//! sums run over rows in order in every pass, so a prompt fed in one call
//! or token by token gives the same bits.

/// One token's inputs to a head's delta rule.
#[derive(Clone, Copy, Debug)]
pub struct DeltaToken<'a> {
    /// Query, `dk` long (already normalised and scaled).
    pub q: &'a [f32],
    /// Key, `dk` long (already normalised).
    pub k: &'a [f32],
    /// Value, `dv` long.
    pub v: &'a [f32],
    /// Write strength `beta`.
    pub beta: f32,
    /// State decay `exp(g)`.
    pub decay: f32,
}

/// Runs tokens `0..n` (given by `token`) through the delta rule on state
/// `s` (`[dk, dv]`, row `i` for key element `i`), writing each token's
/// output `Sᵀq` to `out[t * dv..(t + 1) * dv]`.
pub fn delta_rule<'a>(
    s: &mut [f32],
    dk: usize,
    dv: usize,
    n: usize,
    token: impl Fn(usize) -> DeltaToken<'a>,
    out: &mut [f32],
) {
    assert_eq!(s.len(), dk * dv, "delta_rule: state size");
    assert!(out.len() >= n * dv, "delta_rule: output length");
    if n == 0 {
        return;
    }
    let check = |t: &DeltaToken| {
        assert!(
            t.q.len() == dk && t.k.len() == dk && t.v.len() == dv,
            "delta_rule: token shapes"
        );
    };
    let pass = Pass::new();
    // a = Sᵀk, b = Sᵀq of the state before the next token.
    let (mut a, mut b, mut u) = (vec![0f32; dv], vec![0f32; dv], vec![0f32; dv]);
    let mut cur = token(0);
    check(&cur);
    pass.read(s, dv, cur.k, cur.q, &mut a, &mut b);
    for t in 0..n {
        let kq = super::vector::dot(cur.k, cur.q);
        let o = &mut out[t * dv..(t + 1) * dv];
        for j in 0..dv {
            u[j] = cur.beta * (cur.v[j] - cur.decay * a[j]);
            o[j] = cur.decay * b[j] + kq * u[j];
        }
        let next = (t + 1 < n).then(|| token(t + 1));
        if let Some(nx) = &next {
            check(nx);
        }
        let write = Write {
            decay: cur.decay,
            k: cur.k,
            u: &u,
        };
        let next_kq = next.as_ref().map(|nx| (nx.k, nx.q));
        pass.update(s, dv, write, next_kq, &mut a, &mut b);
        if let Some(nx) = next {
            cur = nx;
        }
    }
}

/// One token's write to the state: `S = decay S + k ⊗ u`.
#[derive(Clone, Copy)]
struct Write<'a> {
    decay: f32,
    k: &'a [f32],
    u: &'a [f32],
}

/// The state passes, on AVX2+FMA when the CPU has it.
#[derive(Clone, Copy)]
enum Pass {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Pass {
    fn new() -> Pass {
        #[cfg(target_arch = "x86_64")]
        if super::simd().avx2().is_some() {
            return Pass::Avx2;
        }
        Pass::Scalar
    }

    /// `a = Sᵀk`, `b = Sᵀq`.
    fn read(self, s: &[f32], dv: usize, k: &[f32], q: &[f32], a: &mut [f32], b: &mut [f32]) {
        match self {
            Pass::Scalar => scalar_read(s, dv, k, q, a, b),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Avx2` is chosen only when the CPU has AVX2, FMA and F16C;
            // `s` holds `k.len()` rows of `dv`, and `a`, `b` hold `dv`.
            Pass::Avx2 => unsafe { x86::read(s, dv, k, q, a, b) },
        }
    }

    /// Applies `w` to the state; then, when `next` gives `(k', q')`,
    /// `a = Sᵀk'`, `b = Sᵀq'` of the new state.
    fn update(
        self,
        s: &mut [f32],
        dv: usize,
        w: Write,
        next: Option<(&[f32], &[f32])>,
        a: &mut [f32],
        b: &mut [f32],
    ) {
        match self {
            Pass::Scalar => scalar_update(s, dv, w, next, a, b),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `read`; `w.u` holds `dv` and `next`'s slices
            // `w.k.len()` (checked by the caller).
            Pass::Avx2 => unsafe { x86::update(s, dv, w, next, a, b) },
        }
    }
}

fn scalar_read(s: &[f32], dv: usize, k: &[f32], q: &[f32], a: &mut [f32], b: &mut [f32]) {
    a.fill(0.0);
    b.fill(0.0);
    for (i, row) in s.chunks_exact(dv).enumerate() {
        for j in 0..dv {
            a[j] += row[j] * k[i];
            b[j] += row[j] * q[i];
        }
    }
}

fn scalar_update(
    s: &mut [f32],
    dv: usize,
    w: Write,
    next: Option<(&[f32], &[f32])>,
    a: &mut [f32],
    b: &mut [f32],
) {
    let Write { decay, k, u } = w;
    a.fill(0.0);
    b.fill(0.0);
    for (i, row) in s.chunks_exact_mut(dv).enumerate() {
        for j in 0..dv {
            row[j] = row[j] * decay + k[i] * u[j];
            if let Some((nk, nq)) = next {
                a[j] += row[j] * nk[i];
                b[j] += row[j] * nq[i];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! Columns go in blocks of up to four 8-float vectors, each block down
    //! all rows with its sums in registers (a whole 128-float row would
    //! need 48 of AVX2's 16 registers); a tail under 8 columns is scalar.

    use crate::kernels::isa::avx2_fn;
    use std::arch::x86_64::*;

    /// Calls `f(first column, vectors)` for each column block; returns the
    /// first column left for the scalar tail.
    #[inline(always)]
    fn blocks(dv: usize, mut f: impl FnMut(usize, usize)) -> usize {
        let mut j = 0;
        for w in [4, 2, 1] {
            while j + 8 * w <= dv {
                f(j, w);
                j += 8 * w;
            }
        }
        j
    }

    /// Rows ahead of the first column block's walk whose lines are hinted.
    const AHEAD: usize = 4;

    /// Hints row `i` of the state (all its lines) into the caches, when
    /// there is such a row. In decode the state comes from memory, and
    /// the column blocks walk it with a 512-byte stride, which the
    /// hardware prefetchers follow poorly: with these hints the first
    /// block's walk pulls whole rows in and the later blocks find them in
    /// L2 (one thread, 768 heads' states of 64 KiB, one decode step each:
    /// 0.73-0.81 of the time without).
    ///
    /// Safety: `sp` points at `rows * dv` floats; only rows below `rows`
    /// are hinted, and a prefetch never faults.
    #[inline]
    unsafe fn hint_row(sp: *const f32, dv: usize, i: usize, rows: usize) {
        if i < rows {
            let row = sp.add(i * dv) as *const i8;
            let mut at = 0;
            while at < dv * 4 {
                _mm_prefetch::<_MM_HINT_T0>(row.add(at));
                at += 64;
            }
        }
    }

    avx2_fn! {
    pub(super) unsafe fn read(
        s: &[f32],
        dv: usize,
        k: &[f32],
        q: &[f32],
        a: &mut [f32],
        b: &mut [f32],
    ) {
        // The first block's walk hints the rows `AHEAD` below it; these
        // are the rows above the first it hints.
        for i in 0..AHEAD {
            hint_row(s.as_ptr(), dv, i, k.len());
        }
        let tail = blocks(dv, |j, w| match w {
            4 => read_block::<4>(s, dv, j, k, q, a, b),
            2 => read_block::<2>(s, dv, j, k, q, a, b),
            _ => read_block::<1>(s, dv, j, k, q, a, b),
        });
        for j in tail..dv {
            let (mut x, mut y) = (0f32, 0f32);
            for i in 0..k.len() {
                x = s[i * dv + j].mul_add(k[i], x);
                y = s[i * dv + j].mul_add(q[i], y);
            }
            a[j] = x;
            b[j] = y;
        }
    }

    #[inline]
    unsafe fn read_block<const W: usize>(
        s: &[f32],
        dv: usize,
        j: usize,
        k: &[f32],
        q: &[f32],
        a: &mut [f32],
        b: &mut [f32],
    ) {
        let (mut x, mut y) = ([_mm256_setzero_ps(); W], [_mm256_setzero_ps(); W]);
        let sp = s.as_ptr();
        let rows = k.len();
        let hint = j == 0;
        for i in 0..rows {
            if hint {
                hint_row(sp, dv, i + AHEAD, rows);
            }
            let (ki, qi) = (_mm256_set1_ps(k[i]), _mm256_set1_ps(q[i]));
            for w in 0..W {
                let v = _mm256_loadu_ps(sp.add(i * dv + j + 8 * w));
                x[w] = _mm256_fmadd_ps(v, ki, x[w]);
                y[w] = _mm256_fmadd_ps(v, qi, y[w]);
            }
        }
        for w in 0..W {
            _mm256_storeu_ps(a.as_mut_ptr().add(j + 8 * w), x[w]);
            _mm256_storeu_ps(b.as_mut_ptr().add(j + 8 * w), y[w]);
        }
    }

    pub(super) unsafe fn update(
        s: &mut [f32],
        dv: usize,
        w: super::Write,
        next: Option<(&[f32], &[f32])>,
        a: &mut [f32],
        b: &mut [f32],
    ) {
        let super::Write { decay, k, u } = w;
        let tail = blocks(dv, |j, w| match (w, next) {
            (4, Some((nk, nq))) => update_block::<4, true>(s, dv, j, decay, k, u, nk, nq, a, b),
            (2, Some((nk, nq))) => update_block::<2, true>(s, dv, j, decay, k, u, nk, nq, a, b),
            (_, Some((nk, nq))) => update_block::<1, true>(s, dv, j, decay, k, u, nk, nq, a, b),
            (4, None) => update_block::<4, false>(s, dv, j, decay, k, u, k, k, a, b),
            (2, None) => update_block::<2, false>(s, dv, j, decay, k, u, k, k, a, b),
            (_, None) => update_block::<1, false>(s, dv, j, decay, k, u, k, k, a, b),
        });
        for j in tail..dv {
            let (mut x, mut y) = (0f32, 0f32);
            for i in 0..k.len() {
                let v = s[i * dv + j].mul_add(decay, k[i] * u[j]);
                s[i * dv + j] = v;
                if let Some((nk, nq)) = next {
                    x = v.mul_add(nk[i], x);
                    y = v.mul_add(nq[i], y);
                }
            }
            a[j] = x;
            b[j] = y;
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[inline]
    unsafe fn update_block<const W: usize, const NEXT: bool>(
        s: &mut [f32],
        dv: usize,
        j: usize,
        decay: f32,
        k: &[f32],
        u: &[f32],
        nk: &[f32],
        nq: &[f32],
        a: &mut [f32],
        b: &mut [f32],
    ) {
        let d = _mm256_set1_ps(decay);
        let mut uv = [_mm256_setzero_ps(); W];
        for (w, x) in uv.iter_mut().enumerate() {
            *x = _mm256_loadu_ps(u.as_ptr().add(j + 8 * w));
        }
        let (mut x, mut y) = ([_mm256_setzero_ps(); W], [_mm256_setzero_ps(); W]);
        let sp = s.as_mut_ptr();
        // The last token's pass (`!NEXT`) hints the state after this one
        // into L2, line for line with its own walk: a layer's heads' states
        // lie end to end, and the pool hands each thread a run of
        // consecutive heads, so that is most likely the state this thread
        // reads next, from memory, at the start of its next call. One
        // thread, 768 heads' states of 64 KiB, a decode step each: 0.85-0.90
        // of the time without; two threads over layers of 32 heads:
        // 0.89-0.92. A prefetch never faults, past the last head too.
        let after = sp.wrapping_add(s.len()) as *const i8;
        for i in 0..k.len() {
            if !NEXT {
                let at = after.wrapping_add(4 * (i * dv + j));
                let mut o = 0;
                while o < 32 * W {
                    _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(o));
                    o += 64;
                }
            }
            let ki = _mm256_set1_ps(k[i]);
            let (nki, nqi) = if NEXT {
                (_mm256_set1_ps(nk[i]), _mm256_set1_ps(nq[i]))
            } else {
                (d, d)
            };
            for w in 0..W {
                let p = sp.add(i * dv + j + 8 * w);
                let v = _mm256_fmadd_ps(_mm256_loadu_ps(p), d, _mm256_mul_ps(ki, uv[w]));
                _mm256_storeu_ps(p, v);
                if NEXT {
                    x[w] = _mm256_fmadd_ps(v, nki, x[w]);
                    y[w] = _mm256_fmadd_ps(v, nqi, y[w]);
                }
            }
        }
        for w in 0..W {
            _mm256_storeu_ps(a.as_mut_ptr().add(j + 8 * w), x[w]);
            _mm256_storeu_ps(b.as_mut_ptr().add(j + 8 * w), y[w]);
        }
    }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule as written in the paper, one token at a time.
    fn textbook(s: &mut [f32], dv: usize, t: &DeltaToken, out: &mut [f32]) {
        let dk = t.k.len();
        for x in s.iter_mut() {
            *x *= t.decay;
        }
        for j in 0..dv {
            let kv: f32 = (0..dk).map(|i| s[i * dv + j] * t.k[i]).sum();
            let d = t.beta * (t.v[j] - kv);
            for i in 0..dk {
                s[i * dv + j] += t.k[i] * d;
            }
        }
        for j in 0..dv {
            out[j] = (0..dk).map(|i| s[i * dv + j] * t.q[i]).sum();
        }
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 * 0.618 + seed as f32 * 1.7).sin() * 0.5)
            .collect()
    }

    #[test]
    fn matches_the_textbook_rule_on_every_block_width() {
        // dv 56 = 32 + 16 + 8 covers each block width, 61 adds a scalar tail.
        for (dk, dv) in [(3, 2), (8, 16), (16, 56), (12, 61), (32, 128)] {
            let n = 5;
            let q = values(n * dk, 1);
            let k = values(n * dk, 2);
            let v = values(n * dv, 3);
            let tok = |t: usize| DeltaToken {
                q: &q[t * dk..(t + 1) * dk],
                k: &k[t * dk..(t + 1) * dk],
                v: &v[t * dv..(t + 1) * dv],
                beta: 0.3 + 0.1 * t as f32,
                decay: 0.95 - 0.05 * t as f32,
            };
            let s0 = values(dk * dv, 4);
            let (mut want_s, mut want) = (s0.clone(), vec![0f32; n * dv]);
            for t in 0..n {
                textbook(&mut want_s, dv, &tok(t), &mut want[t * dv..(t + 1) * dv]);
            }
            let (mut s, mut got) = (s0.clone(), vec![0f32; n * dv]);
            delta_rule(&mut s, dk, dv, n, tok, &mut got);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() < 1e-5,
                    "dk {dk} dv {dv}: output {i}: {g} vs {w}"
                );
            }
            for (i, (g, w)) in s.iter().zip(&want_s).enumerate() {
                assert!(
                    (g - w).abs() < 1e-5,
                    "dk {dk} dv {dv}: state {i}: {g} vs {w}"
                );
            }
            // Token by token gives the same bits as all at once.
            let (mut s1, mut got1) = (s0, vec![0f32; n * dv]);
            for t in 0..n {
                delta_rule(&mut s1, dk, dv, 1, |_| tok(t), &mut got1[t * dv..]);
            }
            assert_eq!(got1, got, "dk {dk} dv {dv}: token by token");
            assert_eq!(s1, s, "dk {dk} dv {dv}: state token by token");
        }
    }

    #[test]
    fn scalar_passes_match_the_simd_ones() {
        let (dk, dv) = (16, 61);
        let s0 = values(dk * dv, 5);
        let (k, q, u) = (values(dk, 6), values(dk, 7), values(dv, 8));
        let run = |p: Pass| {
            let mut s = s0.clone();
            let (mut a, mut b) = (vec![0f32; dv], vec![0f32; dv]);
            let w = Write {
                decay: 0.9,
                k: &k,
                u: &u,
            };
            p.update(&mut s, dv, w, Some((&q, &k)), &mut a, &mut b);
            let (mut c, mut d) = (vec![0f32; dv], vec![0f32; dv]);
            p.read(&s, dv, &k, &q, &mut c, &mut d);
            (s, a, b, c, d)
        };
        let want = run(Pass::Scalar);
        let got = run(Pass::new());
        for (x, y) in [
            (&got.0, &want.0),
            (&got.1, &want.1),
            (&got.2, &want.2),
            (&got.3, &want.3),
            (&got.4, &want.4),
        ] {
            for (g, w) in x.iter().zip(y.iter()) {
                assert!((g - w).abs() < 1e-5, "{g} vs {w}");
            }
        }
    }
}
