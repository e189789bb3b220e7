//! The sparse MoE block: softmax router over all experts, top-k (weights
//! renormalised when `norm_topk_prob`), SiLU-gated experts, plus a shared
//! expert scaled by `sigmoid(shared_expert_gate · x)`. Only the routed
//! experts run; in prefill the tokens are grouped by expert so each expert's
//! weights are read once per call.
//!
//! Routed experts are reached through [`Moe::hold`]: the mapped experts,
//! or, under a RAM budget, guards from the expert cache
//! ([`crate::model::experts::ExpertPager`]), whose missing experts are read while
//! the shared expert and the resident experts compute.

use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;

use super::norm::{for_each_row, sigmoid, silu, softmax};
use super::{load_matrix, ModelError};
use crate::config::ModelConfig;
use crate::kernels::{matmul, matmul_one_task, matvec_batch, vector, Product};
use crate::model::experts::{ExpertPager, Fetch};
use crate::tensor::Matrix;
use crate::weights::WeightSource;

/// A SiLU-gated MLP: `down(silu(gate x) * up x)`.
#[derive(Clone)]
pub struct Expert {
    /// `[inter, hidden]`.
    pub gate: Matrix,
    /// `[inter, hidden]`.
    pub up: Matrix,
    /// `[hidden, inter]`.
    pub down: Matrix,
}

impl Expert {
    fn load(
        w: &dyn WeightSource,
        prefix: &str,
        hidden: usize,
        inter: usize,
    ) -> Result<Self, ModelError> {
        Ok(Expert {
            gate: load_matrix(w, &format!("{prefix}.gate_proj"), inter, hidden)?,
            up: load_matrix(w, &format!("{prefix}.up_proj"), inter, hidden)?,
            down: load_matrix(w, &format!("{prefix}.down_proj"), hidden, inter)?,
        })
    }

    /// Runs `m` tokens `x` `[m, hidden]`; returns `[m, hidden]`. Each
    /// product spreads over the threads.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.forward_with(x, m, matmul)
    }

    /// [`Expert::forward`] with each product as one task, for callers that
    /// run experts side by side.
    pub fn forward_one_task(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.forward_with(x, m, matmul_one_task)
    }

    fn forward_with(
        &self,
        x: &[f32],
        m: usize,
        matmul: fn(&Matrix, &[f32], usize, &mut [f32]),
    ) -> Vec<f32> {
        let inter = self.gate.rows();
        let mut g = vec![0f32; m * inter];
        let mut u = vec![0f32; m * inter];
        matmul(&self.gate, x, m, &mut g);
        matmul(&self.up, x, m, &mut u);
        for (gi, ui) in g.iter_mut().zip(&u) {
            *gi = silu(*gi) * ui;
        }
        let mut y = vec![0f32; m * self.down.rows()];
        matmul(&self.down, &g, m, &mut y);
        y
    }

    /// The three matrices.
    pub fn matrices(&self) -> [&Matrix; 3] {
        [&self.gate, &self.up, &self.down]
    }
}

/// The `n` largest logits' experts, largest first (ties to the lower
/// index), as the router would choose `n` of them.
fn top_n(logits: &[f32], n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    let order = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    let n = n.min(idx.len());
    if n == 0 {
        return Vec::new();
    }
    if n < idx.len() {
        idx.select_nth_unstable_by(n - 1, order);
        idx.truncate(n);
    }
    idx.sort_by(order);
    idx
}

/// One MoE block.
pub struct Moe {
    hidden: usize,
    top_k: usize,
    norm_topk: bool,
    router: Matrix,
    experts: Vec<Expert>,
    shared: Option<(Expert, Matrix)>,
    /// The expert cache and this block's layer, when experts are paged.
    pager: Option<(Arc<ExpertPager>, usize)>,
}

/// A routed expert as a forward pass holds it: mapped, or a guard of the
/// expert cache that keeps its buffer alive until dropped.
enum Held<'a> {
    Mapped(&'a Expert),
    Loaded(Arc<Expert>),
}

impl std::ops::Deref for Held<'_> {
    type Target = Expert;
    fn deref(&self) -> &Expert {
        match self {
            Held::Mapped(e) => e,
            Held::Loaded(e) => e,
        }
    }
}

/// What decode computes from a token's input before routing: the router's
/// logits, the predicting routers' logits (`(depth, logits)`, under a
/// budget), and the shared expert's activation `silu(gate x) * up x` and
/// gate logit.
struct FirstProducts {
    logits: Vec<f32>,
    next: Vec<(usize, Vec<f32>)>,
    shared_act: Vec<f32>,
    shared_gate: f32,
}

/// One expert on one token: `down(silu(gate x) * up x)`, the gate and up
/// products in one parallel region and the down in another (the same
/// products [`Moe::forward`] computes).
fn expert_one(ex: &Expert, x: &[f32]) -> Vec<f32> {
    let inter = ex.gate.rows();
    let (mut g, mut u) = (vec![0f32; inter], vec![0f32; inter]);
    matvec_batch(&mut [
        Product::new(&ex.gate, x, &mut g),
        Product::new(&ex.up, x, &mut u),
    ]);
    for (gi, ui) in g.iter_mut().zip(&u) {
        *gi = silu(*gi) * ui;
    }
    let mut y = vec![0f32; ex.down.rows()];
    matvec_batch(&mut [Product::new(&ex.down, &g, &mut y)]);
    y
}

impl Moe {
    /// Decode: one token's router, experts and shared expert in few
    /// parallel regions instead of one fork-join per product. Each
    /// product, and the sum in expert order, is what [`Moe::forward`]
    /// computes for many tokens one at a time. Under a budget the missing
    /// experts' reads start at routing; the resident experts compute while
    /// they are in flight, and each missing one computes as soon as it
    /// arrives.
    fn forward_one(&self, x: &[f32]) -> Vec<f32> {
        let first = self.first_products(x);
        let route = self.route(&first.logits);
        let chosen: Vec<usize> = route.iter().map(|&(e, _)| e).collect();
        let routed_at = Instant::now();
        let (held, pending) = self.hold(&chosen);
        self.predict_next(&first.next);
        let mut ys: Vec<Option<Vec<f32>>> = vec![None; route.len()];
        let shared_y = self.resident_experts(x, &held, &first.shared_act, &mut ys);
        drop(held);
        self.arriving_experts(x, &chosen, pending, &mut ys, routed_at);
        let ys: Vec<Vec<f32>> = ys
            .into_iter()
            .map(|y| y.expect("every routed expert computed"))
            .collect();
        self.combine_one(&route, &ys, &shared_y, first.shared_gate)
    }

    /// Decode's first parallel region: the router, the routers that
    /// predict the next layers' experts, and the shared expert's gate, up
    /// and gate logit.
    fn first_products(&self, x: &[f32]) -> FirstProducts {
        let mut logits = vec![0f32; self.experts.len()];
        let si = self.shared.as_ref().map_or(0, |(e, _)| e.gate.rows());
        let (mut sg, mut sgu, mut sgate) = (vec![0f32; si], vec![0f32; si], [0f32; 1]);
        let routers = match &self.pager {
            Some((p, l)) => p.next_routers(*l),
            None => Vec::new(),
        };
        let mut next: Vec<(usize, Vec<f32>)> = routers
            .iter()
            .map(|(d, r)| (*d, vec![0f32; r.rows()]))
            .collect();
        {
            let mut jobs = vec![Product::new(&self.router, x, &mut logits)];
            for ((_, r), (_, out)) in routers.iter().zip(&mut next) {
                jobs.push(Product::new(r, x, out));
            }
            if let Some((e, gate)) = &self.shared {
                jobs.push(Product::new(gate, x, &mut sgate));
                jobs.push(Product::new(&e.gate, x, &mut sg));
                jobs.push(Product::new(&e.up, x, &mut sgu));
            }
            matvec_batch(&mut jobs);
        }
        for (gi, ui) in sg.iter_mut().zip(&sgu) {
            *gi = silu(*gi) * ui;
        }
        FirstProducts {
            logits,
            next,
            shared_act: sg,
            shared_gate: sgate[0],
        }
    }

    /// Reads ahead the experts the next layers' routers chose on this
    /// hidden state (the nearest layer first).
    fn predict_next(&self, next: &[(usize, Vec<f32>)]) {
        if let Some((p, l)) = &self.pager {
            for (depth, logits) in next {
                let guess = top_n(logits, self.top_k + p.predict_extra());
                p.predicted(l + depth, &guess, *depth);
            }
        }
    }

    /// The routed experts available now, and the shared expert's down, in
    /// two parallel regions (gates, ups and the shared down; then the
    /// downs); fills their `ys` and returns the shared expert's output.
    fn resident_experts(
        &self,
        x: &[f32],
        held: &[Option<Held>],
        shared_act: &[f32],
        ys: &mut [Option<Vec<f32>>],
    ) -> Vec<f32> {
        let here: Vec<(usize, &Expert)> = held
            .iter()
            .enumerate()
            .filter_map(|(i, h)| Some((i, &**h.as_ref()?)))
            .collect();
        let mut gates: Vec<Vec<f32>> = here
            .iter()
            .map(|(_, e)| vec![0f32; e.gate.rows()])
            .collect();
        let mut ups = gates.clone();
        let mut shared_y = vec![
            0f32;
            if self.shared.is_some() {
                self.hidden
            } else {
                0
            }
        ];
        {
            let mut jobs = Vec::with_capacity(2 * here.len() + 1);
            for (((_, ex), g), u) in here.iter().zip(&mut gates).zip(&mut ups) {
                jobs.push(Product::new(&ex.gate, x, g));
                jobs.push(Product::new(&ex.up, x, u));
            }
            if let Some((e, _)) = &self.shared {
                jobs.push(Product::new(&e.down, shared_act, &mut shared_y));
            }
            matvec_batch(&mut jobs);
        }
        for (g, u) in gates.iter_mut().zip(&ups) {
            for (gi, ui) in g.iter_mut().zip(u) {
                *gi = silu(*gi) * ui;
            }
        }
        let mut outs: Vec<Vec<f32>> = here
            .iter()
            .map(|(_, e)| vec![0f32; e.down.rows()])
            .collect();
        {
            let mut jobs: Vec<Product> = here
                .iter()
                .zip(&gates)
                .zip(&mut outs)
                .map(|(((_, ex), g), y)| Product::new(&ex.down, g, y))
                .collect();
            matvec_batch(&mut jobs);
        }
        for ((i, _), y) in here.iter().zip(outs) {
            ys[*i] = Some(y);
        }
        shared_y
    }

    /// The routed experts being read: each computes as soon as its read
    /// is done (the first finished one, else the oldest is waited for),
    /// while the others are still in flight. Tells the pager how long
    /// routing waited for its experts.
    fn arriving_experts(
        &self,
        x: &[f32],
        chosen: &[usize],
        mut pending: Vec<(usize, Fetch)>,
        ys: &mut [Option<Vec<f32>>],
        routed_at: Instant,
    ) {
        let Some((p, _)) = &self.pager else {
            return;
        };
        let waited = !pending.is_empty();
        let mut ready_at = routed_at;
        while !pending.is_empty() {
            let k = pending
                .iter()
                .position(|(_, f)| f.is_settled())
                .unwrap_or(0);
            let (i, f) = pending.swap_remove(k);
            let ex = self.resolve(f, chosen[i]);
            ready_at = Instant::now();
            ys[i] = Some(expert_one(&ex, x));
        }
        p.routed(waited.then(|| ready_at.duration_since(routed_at)));
    }

    /// Routed experts in expert order (as `forward` sums them), then the
    /// shared expert; the first term writes (see `vector::scale`).
    fn combine_one(
        &self,
        route: &[(usize, f32)],
        ys: &[Vec<f32>],
        shared_y: &[f32],
        shared_gate: f32,
    ) -> Vec<f32> {
        let mut order: Vec<usize> = (0..route.len()).collect();
        order.sort_by_key(|&i| route[i].0);
        let mut out = vec![0f32; self.hidden];
        let mut first = true;
        let mut add = |wgt: f32, y: &[f32]| {
            if first {
                vector::scale(wgt, y, &mut out);
                first = false;
            } else {
                vector::axpy(wgt, y, &mut out);
            }
        };
        for i in order {
            add(route[i].1, &ys[i]);
        }
        if self.shared.is_some() {
            add(sigmoid(shared_gate), shared_y);
        }
        out
    }

    /// Loads `prefix` (`model.layers.L.mlp`).
    pub fn load(w: &dyn WeightSource, c: &ModelConfig, prefix: &str) -> Result<Self, ModelError> {
        let h = c.hidden_size;
        let experts = (0..c.num_experts)
            .map(|e| {
                Expert::load(
                    w,
                    &format!("{prefix}.experts.{e}"),
                    h,
                    c.moe_intermediate_size,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let shared = if c.shared_expert_intermediate_size > 0 {
            Some((
                Expert::load(
                    w,
                    &format!("{prefix}.shared_expert"),
                    h,
                    c.shared_expert_intermediate_size,
                )?,
                load_matrix(w, &format!("{prefix}.shared_expert_gate"), 1, h)?,
            ))
        } else {
            None
        };
        let router = load_matrix(w, &format!("{prefix}.gate"), c.num_experts, h)?;
        // Under a budget the mapped experts only describe where each
        // expert lies; the pager reads them into its own buffers.
        let pager = super::experts::pager_of(w).and_then(|p| {
            let layer: usize = prefix
                .strip_prefix("model.layers.")?
                .strip_suffix(".mlp")?
                .parse()
                .ok()?;
            p.register_layer(layer, &experts, &router);
            Some((p, layer))
        });
        Ok(Moe {
            hidden: h,
            top_k: c.num_experts_per_tok,
            norm_topk: c.norm_topk_prob,
            router,
            experts,
            shared,
            pager,
        })
    }

    /// The routed experts `chosen` as this pass will use them: those
    /// available now (all of them without a pager), and for the others
    /// their position and the read in flight ([`Moe::resolve`]).
    #[allow(clippy::type_complexity)]
    fn hold(&self, chosen: &[usize]) -> (Vec<Option<Held<'_>>>, Vec<(usize, Fetch)>) {
        let Some((p, layer)) = &self.pager else {
            return (
                chosen
                    .iter()
                    .map(|&e| Some(Held::Mapped(&self.experts[e])))
                    .collect(),
                Vec::new(),
            );
        };
        let mut held = Vec::with_capacity(chosen.len());
        let mut pending = Vec::new();
        for (i, f) in p.fetch(*layer, chosen).into_iter().enumerate() {
            match f {
                Fetch::Ready(e) => held.push(Some(Held::Loaded(e))),
                f => {
                    held.push(None);
                    pending.push((i, f));
                }
            }
        }
        (held, pending)
    }

    /// Waits for a read; a failed one falls back to the mapped expert
    /// (the same bytes, read through the page cache).
    fn resolve(&self, f: Fetch, e: usize) -> Held<'_> {
        match (&self.pager, f) {
            (Some((p, _)), f) => match f.wait(p) {
                Some(ex) => Held::Loaded(ex),
                None => Held::Mapped(&self.experts[e]),
            },
            (None, _) => Held::Mapped(&self.experts[e]),
        }
    }

    /// Runs `run` on every expert of `active`, in waves the expert cache
    /// can hold (the next wave's reads start before this one computes).
    fn run_paged(
        &self,
        p: &Arc<ExpertPager>,
        layer: usize,
        active: &[usize],
        run: &(dyn Fn(usize, &Expert) -> Vec<f32> + Sync),
    ) -> Vec<Vec<f32>> {
        let waves: Vec<&[usize]> = active.chunks(p.wave(self.top_k)).collect();
        let mut ys = Vec::with_capacity(active.len());
        let mut next = waves.first().map(|w| p.fetch(layer, w));
        for (i, w) in waves.iter().enumerate() {
            let cur = next.take().unwrap_or_default();
            next = waves.get(i + 1).map(|w| p.fetch(layer, w));
            let held: Vec<Held> = cur
                .into_iter()
                .zip(w.iter())
                .map(|(f, &e)| match f {
                    Fetch::Ready(ex) => Held::Loaded(ex),
                    f => self.resolve(f, e),
                })
                .collect();
            ys.par_extend(
                w.par_iter()
                    .zip(held.par_iter())
                    .map(|(&e, ex)| run(e, ex))
                    .collect::<Vec<_>>(),
            );
        }
        ys
    }

    /// The router.
    pub fn router(&self) -> &Matrix {
        &self.router
    }
    /// The routed experts.
    pub fn experts(&self) -> &[Expert] {
        &self.experts
    }
    /// The shared expert and its gate.
    pub fn shared(&self) -> Option<&(Expert, Matrix)> {
        self.shared.as_ref()
    }

    /// The top-k experts of one token and their weights, from router logits.
    pub fn route(&self, logits: &[f32]) -> Vec<(usize, f32)> {
        let mut p = logits.to_vec();
        softmax(&mut p);
        let mut idx: Vec<usize> = (0..p.len()).collect();
        // Highest probability first; ties to the lower index. Only the top
        // k need sorting (k = 10 of 512 experts).
        let order = |a: &usize, b: &usize| p[*b].total_cmp(&p[*a]).then(a.cmp(b));
        if self.top_k == 0 {
            return Vec::new();
        }
        if self.top_k < idx.len() {
            idx.select_nth_unstable_by(self.top_k - 1, order);
            idx.truncate(self.top_k);
        }
        idx.sort_by(order);
        let sum: f32 = idx.iter().map(|&e| p[e]).sum();
        idx.into_iter()
            .map(|e| (e, if self.norm_topk { p[e] / sum } else { p[e] }))
            .collect()
    }

    /// Runs `n` normalised tokens `x` `[n, hidden]`; returns `[n, hidden]`.
    pub fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        if n == 1 {
            return self.forward_one(x);
        }
        let h = self.hidden;
        let ne = self.experts.len();
        let mut logits = vec![0f32; n * ne];
        matmul(&self.router, x, n, &mut logits);
        // Tokens per expert, in token order.
        let route = |t: usize| self.route(&logits[t * ne..(t + 1) * ne]);
        let routes: Vec<Vec<(usize, f32)>> = if n > 1 {
            (0..n).into_par_iter().map(route).collect()
        } else {
            (0..n).map(route).collect()
        };
        let mut by_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); ne];
        for (t, r) in routes.into_iter().enumerate() {
            for (e, wgt) in r {
                by_expert[e].push((t, wgt));
            }
        }
        let active: Vec<usize> = (0..ne).filter(|&e| !by_expert[e].is_empty()).collect();
        // One token's experts each split their rows over the threads; many
        // tokens' experts run side by side instead, each a few tokens' work
        // as one task, so the threads do not meet after every small product.
        let side_by_side = n > 1;
        let run = |e: usize, expert: &Expert| -> Vec<f32> {
            let toks = &by_expert[e];
            let forward = |xs: &[f32], m: usize| {
                if side_by_side {
                    expert.forward_one_task(xs, m)
                } else {
                    expert.forward(xs, m)
                }
            };
            if toks.len() == n {
                return forward(x, n);
            }
            let mut xs = Vec::with_capacity(toks.len() * h);
            for &(t, _) in toks {
                xs.extend_from_slice(&x[t * h..(t + 1) * h]);
            }
            forward(&xs, toks.len())
        };
        let ys: Vec<Vec<f32>> = match &self.pager {
            Some((p, layer)) => self.run_paged(p, *layer, &active, &run),
            None if side_by_side => active
                .par_iter()
                .map(|&e| run(e, &self.experts[e]))
                .collect(),
            None => active.iter().map(|&e| run(e, &self.experts[e])).collect(),
        };
        // Each token's outputs summed in expert order (the same numbers
        // however the tokens are split over threads), then the shared
        // expert's.
        let mut by_token: Vec<Vec<(usize, usize, f32)>> = vec![Vec::new(); n];
        for (ai, &e) in active.iter().enumerate() {
            for (i, &(t, wgt)) in by_expert[e].iter().enumerate() {
                by_token[t].push((ai, i, wgt));
            }
        }
        let shared = self.shared.as_ref().map(|(expert, gate)| {
            let mut g = vec![0f32; n];
            matmul(gate, x, n, &mut g);
            (expert.forward(x, n), g)
        });
        let mut out = vec![0f32; n * h];
        for_each_row(&mut out, h, |t, o| {
            // The first term writes (see `vector::scale` on why).
            let mut first = true;
            let mut add = |wgt: f32, y: &[f32]| {
                if first {
                    vector::scale(wgt, y, o);
                    first = false;
                } else {
                    vector::axpy(wgt, y, o);
                }
            };
            for &(ai, i, wgt) in &by_token[t] {
                add(wgt, &ys[ai][i * h..(i + 1) * h]);
            }
            if let Some((y, g)) = &shared {
                add(sigmoid(g[t]), &y[t * h..(t + 1) * h]);
            }
        });
        out
    }
}
