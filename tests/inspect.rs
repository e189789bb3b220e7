//! `rh-inspect` as a process: the JSON report, the strategy file, the
//! up-to-date rerun, a (fake) GPU, sizes from a checkpoint, bad flags.

use rh_tests::{rh, run, text};
use std::path::{Path, PathBuf};

fn manifest(dir: &Path) -> PathBuf {
    let p = dir.join("pipeline.toml");
    std::fs::write(
        &p,
        "[model]\nsource = \"synthetic:tiny\"\nwork_dir = \"work\"\n\n[inspect]\nprobe_seconds = 0.1\n",
    )
    .unwrap();
    p
}

fn json_of(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", text(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
}

/// A PATH whose first entry holds a fake `nvidia-smi` script.
fn fake_nvidia_smi(dir: &Path, script: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("fakebin");
    std::fs::create_dir_all(&bin).unwrap();
    let f = bin.join("nvidia-smi");
    std::fs::write(&f, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// A PATH without any `nvidia-smi` (an empty dir), so results do not depend
/// on the machine the tests run on.
fn no_gpu_path(dir: &Path) -> String {
    let empty = dir.join("emptybin");
    std::fs::create_dir_all(&empty).unwrap();
    empty.display().to_string()
}

#[test]
fn json_report_is_sane_and_strategy_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path());
    let o = run(rh("rh-inspect")
        .arg("--pipeline")
        .arg(&m)
        .arg("--json")
        .env("PATH", no_gpu_path(dir.path()))
        .current_dir(dir.path()));
    let v = json_of(&o);
    let p = &v["probe"];
    let cores = p["physical_cores"].as_u64().unwrap();
    let logical = p["logical_cpus"].as_u64().unwrap();
    assert!(cores >= 1 && cores <= logical, "{p}");
    assert!(p["mem_total"].as_u64().unwrap() > 0, "{p}");
    assert!(p["mem_available"].as_u64().unwrap() <= p["mem_total"].as_u64().unwrap());
    assert!(p["gpus"].as_array().unwrap().is_empty());
    let bw = &p["bandwidth"];
    let single = bw["single_thread_gbs"].as_f64().unwrap();
    let all = bw["all_threads_gbs"].as_f64().unwrap();
    assert!(single > 0.0 && single < 10_000.0 && all > 0.0, "{bw}");

    let s = &v["strategy"];
    let threads = s["threads"].as_u64().unwrap();
    assert!(threads >= 1 && threads <= logical, "{s}");
    assert!(["avx2", "avx512_vnni", "scalar"].contains(&s["kernel"].as_str().unwrap()));
    assert_eq!(s["gpu"], "cpu_only");
    assert_eq!(s["sizes_source"], "preset");
    assert_eq!(v["model"]["total_bytes"], 43_243_415_040u64);
    let tps = s["expected_tokens_per_s"].as_f64().unwrap();
    assert!(tps > 0.0 && tps.is_finite(), "{s}");
    assert!(!s["reasons"]["memory"].as_str().unwrap().is_empty());
    assert_eq!(v["written"], true);

    // The strategy file is there, parses, and matches the report.
    let path = dir.path().join("work/strategy.toml");
    let st = roundhouse::inspect::Strategy::load(&path).unwrap();
    assert_eq!(st.threads as u64, threads);
    assert_eq!(st.fits_in_ram, s["fits_in_ram"].as_bool().unwrap());
    let rec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("work/stages/inspect.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(rec["status"], "complete");
    assert_eq!(rec["outputs"][0]["path"], "strategy.toml");
}

#[test]
fn rerun_is_up_to_date_and_force_redoes() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path());
    let path = no_gpu_path(dir.path());
    let go = |extra: &[&str]| {
        run(rh("rh-inspect")
            .arg("--pipeline")
            .arg(&m)
            .args(extra)
            .env("PATH", &path)
            .current_dir(dir.path()))
    };
    let o = go(&[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("Strategy"));
    let strategy = dir.path().join("work/strategy.toml");
    let first = std::fs::read(&strategy).unwrap();

    let o = go(&[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).to_lowercase().contains("up to date"),
        "{}",
        text(&o)
    );
    assert_eq!(std::fs::read(&strategy).unwrap(), first, "untouched");

    let v = json_of(&go(&["--json"]));
    assert_eq!(v["up_to_date"], true);

    // A different setting is a different fingerprint: it runs again.
    let v = json_of(&go(&["--json", "--threads", "1"]));
    assert_eq!(v["written"], true);
    assert_eq!(v["strategy"]["threads"], 1);
    assert!(v["strategy"]["reasons"]["threads"]
        .as_str()
        .unwrap()
        .contains("forced"));
    let v = json_of(&go(&["--json", "--threads", "1", "--force"]));
    assert_eq!(v["written"], true);
}

#[test]
fn dry_run_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path());
    let o = run(rh("rh-inspect")
        .arg("--pipeline")
        .arg(&m)
        .args(["--dry-run", "--probe-seconds", "0"])
        .env("PATH", no_gpu_path(dir.path()))
        .current_dir(dir.path()));
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("dry run"));
    assert!(!dir.path().join("work/strategy.toml").exists());
    assert!(!dir.path().join("work/stages/inspect.json").exists());
}

#[test]
fn fake_gpu_is_detected_and_used() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path());
    let path = fake_nvidia_smi(
        dir.path(),
        "echo 'NVIDIA H100 80GB HBM3, 81559 MiB, 81000 MiB'\necho 'NVIDIA GeForce RTX 4090, 24564 MiB, 20000 MiB'",
    );
    let o = run(rh("rh-inspect")
        .arg("--pipeline")
        .arg(&m)
        .args(["--json", "--dry-run"])
        .env("PATH", &path)
        .current_dir(dir.path()));
    let v = json_of(&o);
    let gpus = v["probe"]["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 2, "{v}");
    assert_eq!(gpus[0]["name"], "NVIDIA H100 80GB HBM3");
    assert_eq!(gpus[0]["memory_total"], 81559u64 << 20);
    assert_eq!(gpus[1]["memory_free"], 20000u64 << 20);
    // 81 GB free holds the 43 GB model: everything on the H100.
    assert_eq!(v["strategy"]["gpu"], "all_on_gpu");
    assert_eq!(v["strategy"]["gpu_index"], 0);

    // The human report names it too.
    let o = run(rh("rh-inspect")
        .arg("--pipeline")
        .arg(&m)
        .arg("--dry-run")
        .env("PATH", &path)
        .current_dir(dir.path()));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("NVIDIA H100 80GB HBM3") && out.contains("all on GPU 0"),
        "{out}"
    );

    // A broken nvidia-smi is a warning, not a failure.
    let broken = tempfile::tempdir().unwrap();
    let path = fake_nvidia_smi(broken.path(), "echo 'NVIDIA-SMI has failed' >&2; exit 9");
    let v = json_of(&run(rh("rh-inspect")
        .arg("--pipeline")
        .arg(&m)
        .args(["--json", "--dry-run", "--probe-seconds", "0"])
        .env("PATH", &path)
        .current_dir(dir.path())));
    assert!(v["probe"]["gpus"].as_array().unwrap().is_empty());
    let warnings = v["probe"]["warnings"].to_string();
    assert!(warnings.contains("nvidia-smi failed"), "{warnings}");
}

fn write_safetensors(path: &Path, tensors: &[(&str, usize)]) {
    let mut meta = serde_json::Map::new();
    let mut off = 0;
    for (name, bytes) in tensors {
        meta.insert(
            name.to_string(),
            serde_json::json!({"dtype": "U8", "shape": [bytes], "data_offsets": [off, off + bytes]}),
        );
        off += bytes;
    }
    let h = serde_json::to_vec(&meta).unwrap();
    let mut buf = (h.len() as u64).to_le_bytes().to_vec();
    buf.extend_from_slice(&h);
    buf.resize(buf.len() + off, 7);
    std::fs::write(path, buf).unwrap();
}

#[test]
fn sizes_come_from_the_checkpoint_when_fetched() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path());
    let ckpt = dir.path().join("work/checkpoint");
    std::fs::create_dir_all(&ckpt).unwrap();
    std::fs::write(
        ckpt.join("config.json"),
        r#"{"num_experts": 8, "num_experts_per_tok": 2}"#,
    )
    .unwrap();
    write_safetensors(
        &ckpt.join("model.safetensors"),
        &[
            ("model.layers.0.self_attn.q_proj.qweight", 1000),
            ("model.layers.0.mlp.experts.0.down_proj.qweight", 4000),
            ("lm_head.weight", 500),
        ],
    );
    let v = json_of(&run(rh("rh-inspect")
        .arg("--pipeline")
        .arg(&m)
        .args(["--json", "--dry-run", "--probe-seconds", "0"])
        .env("PATH", no_gpu_path(dir.path()))
        .current_dir(dir.path())));
    assert_eq!(v["model"]["source"], "checkpoint");
    assert_eq!(v["model"]["total_bytes"], 5500);
    assert_eq!(v["model"]["per_token_bytes"], 1000 + 500 + 4000 * 2 / 8);
    assert_eq!(v["strategy"]["fits_in_ram"], true);
    assert!(v["strategy"].get("expected_tokens_per_s").is_none());

    // A truncated shard is a one-line error naming it.
    let f = ckpt.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    let o = run(rh("rh-inspect")
        .arg("--pipeline")
        .arg(&m)
        .args(["--dry-run", "--probe-seconds", "0"])
        .current_dir(dir.path()));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn bad_flags_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path());
    for args in [
        &["--threads", "0"][..],
        &["--probe-seconds", "-1"][..],
        &["--nope"][..],
    ] {
        let o = run(rh("rh-inspect")
            .arg("--pipeline")
            .arg(&m)
            .args(args)
            .current_dir(dir.path()));
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
    }
}

/// strategy.toml's `kernel` caps the kernels rh-bench (and rh-serve, through
/// the same `Strategy::load_for_use`) run at; `RH_KERNELS` caps too and the
/// lower cap wins.
#[test]
fn strategy_kernel_caps_the_kernels_bench_runs() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("pipeline.toml");
    std::fs::write(
        &m,
        "[model]\nsource = \"synthetic:tiny\"\nwork_dir = \"work\"\n\n[inspect]\nprobe_seconds = 0\n",
    )
    .unwrap();
    let o = run(rh("rh-inspect")
        .arg("--pipeline")
        .arg(&m)
        .env("PATH", no_gpu_path(dir.path()))
        .current_dir(dir.path()));
    assert!(o.status.success(), "{}", text(&o));
    let strategy = dir.path().join("work/strategy.toml");
    let written = std::fs::read_to_string(&strategy).unwrap();
    let detected = roundhouse::inspect::Strategy::load(&strategy)
        .unwrap()
        .kernel;
    let model = rh_tests::tiny_checkpoint(Path::new(env!("CARGO_TARGET_TMPDIR")));
    let backend = |kernel: &str, env: Option<&str>| {
        let line = format!("kernel = \"{kernel}\"");
        let text_now = written
            .lines()
            .map(|l| {
                if l.starts_with("kernel = ") {
                    line.as_str()
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&strategy, text_now).unwrap();
        let mut cmd = rh("rh-bench");
        cmd.arg("--pipeline")
            .arg(&m)
            .arg(&model)
            .args(["-p", "4", "-n", "2", "-r", "1", "--no-warmup", "--json"])
            .env_remove("RH_KERNELS")
            .current_dir(dir.path());
        if let Some(v) = env {
            cmd.env("RH_KERNELS", v);
        }
        let v = json_of(&run(&mut cmd));
        let rows = v.as_array().cloned().unwrap_or_else(|| vec![v.clone()]);
        rows[0]["backend"].as_str().unwrap_or_default().to_string()
    };
    use roundhouse::kernels::Isa;
    assert_eq!(backend("scalar", None), "CPU (scalar)");
    assert_eq!(
        backend(&written_kernel(detected), None),
        format!("CPU ({})", detected.name()),
        "the detected level itself is no cap"
    );
    if detected > Isa::Scalar {
        assert_eq!(
            backend(&written_kernel(detected), Some("scalar")),
            "CPU (scalar)",
            "RH_KERNELS below the strategy wins"
        );
    }
    // A misspelt level is no cap, and says so on stderr rather than
    // silently running (and benchmarking) at the detected level.
    assert_eq!(
        backend(&written_kernel(detected), Some("avx-2")),
        format!("CPU ({})", detected.name())
    );
    let o = run(rh("rh-bench")
        .arg("--pipeline")
        .arg(&m)
        .arg(&model)
        .args(["-p", "4", "-n", "2", "-r", "1", "--no-warmup"])
        .env("RH_KERNELS", "avx-2")
        .env("RH_ACTIVATIONS", "int4")
        .current_dir(dir.path()));
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("RH_KERNELS=avx-2 is not"), "{err}");
    assert!(err.contains("RH_ACTIVATIONS=int4 is not"), "{err}");
    assert_eq!(
        err.matches("RH_KERNELS=avx-2").count(),
        1,
        "warned once: {err}"
    );
}

/// How strategy.toml spells a level.
fn written_kernel(isa: roundhouse::kernels::Isa) -> String {
    match isa {
        roundhouse::kernels::Isa::Scalar => "scalar",
        roundhouse::kernels::Isa::Avx2 => "avx2",
        roundhouse::kernels::Isa::AvxVnni => "avx_vnni",
        roundhouse::kernels::Isa::Avx512Vnni => "avx512_vnni",
    }
    .to_string()
}
