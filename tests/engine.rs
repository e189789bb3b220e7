//! The engine against transformers' own logits (tests/fixtures/reference,
//! made by tests/reference/make_fixtures.py): the float checkpoint against
//! `logits_float`, the AutoRound checkpoint against `logits_quant`, through
//! prefill, token-by-token decode and a split continuation, and
//! `rh-bench logits` as a process.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rh_tests::{rh, run, text, workspace_root};
use roundhouse::checkpoint::{read_header, Checkpoint};
use roundhouse::model::Model;

fn case_dir(case: &str) -> PathBuf {
    workspace_root().join("tests/fixtures/reference").join(case)
}

/// F32/I64 tensors of a small safetensors file.
fn read_tensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap();
    read_header(path, &bytes)
        .unwrap()
        .into_iter()
        .map(|(name, dtype, shape, off, len)| {
            let b = &bytes[off..off + len];
            let vals: Vec<f64> = match format!("{dtype:?}").as_str() {
                "F32" => b
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                "I64" => b
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("{}: unexpected dtype {other}", path.display()),
            };
            (name, shape, vals)
        })
        .collect()
}

struct Golden {
    ids: Vec<u32>,
    float: Vec<f32>,
    quant: Vec<f32>,
    vocab: usize,
}

fn golden(case: &str) -> Golden {
    let t = read_tensors(&case_dir(case).join("golden.safetensors"));
    let get = |n: &str| t.iter().find(|(name, _, _)| name == n).unwrap();
    let ids = get("ids").2.iter().map(|&v| v as u32).collect();
    let (_, shape, lf) = get("logits_float");
    Golden {
        ids,
        float: lf.iter().map(|&v| v as f32).collect(),
        quant: get("logits_quant").2.iter().map(|&v| v as f32).collect(),
        vocab: shape[1],
    }
}

fn load(case: &str, kind: &str) -> Model {
    let ck = Checkpoint::open(&case_dir(case).join(kind)).unwrap();
    Model::load(Arc::new(ck)).unwrap()
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0
}

/// (max |err| / logit range, fraction of positions whose top-1 agrees).
fn compare(got: &[f32], want: &[f32], vocab: usize) -> (f32, f32) {
    assert_eq!(got.len(), want.len());
    let (lo, hi) = want
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    let err = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let rows = got.len() / vocab;
    let agree = (0..rows)
        .filter(|&r| {
            argmax(&got[r * vocab..(r + 1) * vocab]) == argmax(&want[r * vocab..(r + 1) * vocab])
        })
        .count();
    (err / (hi - lo), agree as f32 / rows as f32)
}

fn prefill(m: &Model, ids: &[u32]) -> Vec<f32> {
    let mut st = m.new_state();
    let l = m.forward_all(&mut st, ids);
    assert_eq!(st.position(), ids.len());
    l
}

fn stepwise(m: &Model, ids: &[u32]) -> Vec<f32> {
    let mut st = m.new_state();
    ids.iter()
        .flat_map(|&id| m.forward(&mut st, &[id]))
        .collect()
}

/// Checks one path against its golden within the bounds.
fn check(tag: &str, got: &[f32], want: &[f32], vocab: usize, quant: bool) {
    let (rel, agree) = compare(got, want, vocab);
    eprintln!(
        "{tag}: max|err|/range = {rel:.2e}, top-1 agreement = {:.1}%",
        agree * 100.0
    );
    if quant {
        assert!(rel <= 2e-2, "{tag}: max error {rel:.3e} x range > 2e-2");
        assert!(agree >= 0.95, "{tag}: top-1 agreement {agree}");
    } else {
        assert!(rel <= 1e-3, "{tag}: max error {rel:.3e} x range > 1e-3");
        assert_eq!(agree, 1.0, "{tag}: top-1 differs somewhere");
    }
}

fn check_case(case: &str) {
    let g = golden(case);
    for (kind, want, quant) in [("float", &g.float, false), ("quant", &g.quant, true)] {
        let m = load(case, kind);
        assert_eq!(m.config().vocab_size, g.vocab);
        let p = prefill(&m, &g.ids);
        check(&format!("{case}/{kind} prefill"), &p, want, g.vocab, quant);
        let s = stepwise(&m, &g.ids);
        check(&format!("{case}/{kind} decode"), &s, want, g.vocab, quant);
        // Prefill and decode compute the same function: far tighter than the bounds.
        let (rel, agree) = compare(&s, &p, g.vocab);
        assert!(
            rel <= 1e-4 && agree == 1.0,
            "{case}/{kind}: prefill vs decode {rel:.2e}"
        );

        // A second call continuing a state equals one call over the concatenation.
        let mut st = m.new_state();
        let mut two = m.forward_all(&mut st, &g.ids[..16]);
        two.extend(m.forward_all(&mut st, &g.ids[16..]));
        assert_eq!(st.position(), g.ids.len());
        let (rel, _) = compare(&two, &p, g.vocab);
        assert!(
            rel <= 1e-4,
            "{case}/{kind}: 16+8 continuation vs one call {rel:.2e}"
        );
        // forward returns the last row of forward_all.
        let mut st = m.new_state();
        let last = m.forward(&mut st, &g.ids);
        let (rel, _) = compare(&last, &p[(g.ids.len() - 1) * g.vocab..], g.vocab);
        assert!(
            rel <= 1e-5,
            "{case}/{kind}: forward vs forward_all last row"
        );
    }
}

#[test]
fn gs32_matches_transformers() {
    check_case("gs32");
}

#[test]
fn gs128_matches_transformers() {
    check_case("gs128");
}
