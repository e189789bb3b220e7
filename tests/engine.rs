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

/// Reads tensor `logits` of an `rh-bench logits` output.
fn read_logits(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let t = read_tensors(path);
    assert_eq!(t.len(), 1, "one tensor");
    let (name, shape, vals) = &t[0];
    assert_eq!(name, "logits");
    (shape.clone(), vals.iter().map(|&v| v as f32).collect())
}

#[test]
fn bench_logits_matches_golden_in_both_modes() {
    let g = golden("gs128");
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<String> = g.ids.iter().map(u32::to_string).collect();
    let ids = ids.join(",");
    for (kind, want, quant) in [("float", &g.float, false), ("quant", &g.quant, true)] {
        for step in [false, true] {
            let out = dir.path().join(format!("{kind}-{step}.safetensors"));
            let mut cmd = rh("rh-bench");
            cmd.arg("logits")
                .arg(case_dir("gs128").join(kind))
                .args(["--ids", &ids, "--out"])
                .arg(&out)
                .current_dir(dir.path());
            if step {
                cmd.arg("--step");
            }
            let o = run(&mut cmd);
            assert!(o.status.success(), "{}", text(&o));
            let (shape, got) = read_logits(&out);
            assert_eq!(shape, vec![g.ids.len(), g.vocab]);
            check(
                &format!("rh-bench {kind} step={step}"),
                &got,
                want,
                g.vocab,
                quant,
            );
        }
    }
    // An id outside the vocabulary: usage error naming it, no output file.
    let out = dir.path().join("bad.safetensors");
    let o = run(rh("rh-bench")
        .arg("logits")
        .arg(case_dir("gs128").join("float"))
        .args(["--ids", "1,2,512", "--out"])
        .arg(&out)
        .current_dir(dir.path()));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("512") && err.trim().lines().count() == 1,
        "{err}"
    );
    assert!(!out.exists());
}

/// A one-layer synthetic tiny checkpoint (real Qwen3 tokenizer, real vocab).
fn synthetic_tiny(dir: &Path) {
    use roundhouse::synthetic::{write_shard, Spec};
    let spec = Spec::preset("tiny", Some(1), 0).unwrap();
    for (name, bytes) in spec.metadata_files() {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    for (file, tensors) in spec.shards() {
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join(file)).unwrap());
        write_shard(&mut f, &tensors, 0).unwrap();
    }
}

#[test]
fn bench_perplexity_on_a_synthetic_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    std::fs::create_dir(&model).unwrap();
    synthetic_tiny(&model);
    let txt = dir.path().join("text.txt");
    std::fs::write(
        &txt,
        "The quick brown fox jumps over the lazy dog. ".repeat(8),
    )
    .unwrap();
    let o = run(rh("rh-bench")
        .arg("perplexity")
        .arg(&model)
        .arg("--text")
        .arg(&txt)
        .args(["--ctx", "16", "--chunks", "2", "--json"])
        .current_dir(dir.path()));
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ppl = v["ppl"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0, "{v}");
    assert_eq!(v["tokens_scored"].as_u64(), Some(2 * 7), "{v}");
    assert_eq!(v["per_chunk"].as_array().unwrap().len(), 2);

    // Text output like llama-perplexity.
    let o = run(rh("rh-bench")
        .arg("perplexity")
        .arg(&model)
        .arg("--text")
        .arg(&txt)
        .args(["--ctx", "16", "--chunks", "1"])
        .current_dir(dir.path()));
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("[1]") && out.contains("Final estimate: PPL = "),
        "{out}"
    );

    // Too little text for the context: one-line error naming the file.
    let o = run(rh("rh-bench")
        .arg("perplexity")
        .arg(&model)
        .arg("--text")
        .arg(&txt)
        .args(["--ctx", "100000"])
        .current_dir(dir.path()));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("text.txt") && err.trim().lines().count() == 1,
        "{err}"
    );
}

#[test]
fn misshapen_checkpoint_is_a_one_line_error_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("model");
    std::fs::create_dir(&m).unwrap();
    let src = case_dir("gs32").join("quant");
    for f in ["model.safetensors", "quantization_config.json"] {
        std::fs::copy(src.join(f), m.join(f)).unwrap();
    }
    // A config whose expert size disagrees with the stored tensors.
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    cfg["moe_intermediate_size"] = 96.into();
    std::fs::write(m.join("config.json"), cfg.to_string()).unwrap();
    let o = run(rh("rh-bench")
        .arg("logits")
        .arg(&m)
        .args(["--ids", "1,2", "--out"])
        .arg(dir.path().join("l.safetensors"))
        .current_dir(dir.path()));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("model.layers.0.mlp.experts.0.") && err.trim().lines().count() == 1,
        "{err}"
    );
    // A model type this engine does not run.
    cfg["model_type"] = "llama".into();
    std::fs::write(m.join("config.json"), cfg.to_string()).unwrap();
    let o = run(rh("rh-bench")
        .arg("logits")
        .arg(&m)
        .args(["--ids", "1", "--out"])
        .arg(dir.path().join("l.safetensors"))
        .current_dir(dir.path()));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("llama") && err.contains("config.json"),
        "{err}"
    );
}

/// `rh-repack --lm-head int8` (lossy, opt-in): the error the int8 lm_head
/// adds, measured against the same model with its BF16 lm_head, and the
/// whole model still within the quantized bound of transformers' logits.
#[test]
fn int8_lm_head_cache_stays_within_the_quantized_bound() {
    use roundhouse::cache::{repack, Cache, RepackOptions};
    for case in ["gs32", "gs128"] {
        let g = golden(case);
        let work = tempfile::tempdir().unwrap();
        let cache = work.path().join("cache");
        repack(&RepackOptions {
            checkpoint: case_dir(case).join("quant"),
            cache: cache.clone(),
            work_dir: work.path().to_path_buf(),
            file_size: 64 << 20,
            threads: Some(2),
            force: false,
            require_fetch: false,
            quiet: true,
            skip_space_check: false,
            stop_after_units: None,
            lm_head_int8: true,
        })
        .unwrap();
        let m = Model::load(Arc::new(Cache::open(&cache).unwrap())).unwrap();
        let int8 = prefill(&m, &g.ids);
        let bf16 = prefill(&load(case, "quant"), &g.ids);
        let (added, agree) = compare(&int8, &bf16, g.vocab);
        eprintln!(
            "{case}/quant int8 lm_head vs BF16 lm_head: max|err|/range = {added:.2e}, top-1 agreement = {:.1}%",
            agree * 100.0
        );
        assert!(
            added <= 5e-3,
            "{case}: int8 lm_head adds {added:.2e} x range"
        );
        check(
            &format!("{case}/quant int8 lm_head prefill"),
            &int8,
            &g.quant,
            g.vocab,
            true,
        );
        let s = stepwise(&m, &g.ids);
        check(
            &format!("{case}/quant int8 lm_head decode"),
            &s,
            &g.quant,
            g.vocab,
            true,
        );
    }
}
