//! The whole pipeline on the built-in synthetic model, each stage as a
//! process, plus the conventions every binary shares (manifest errors,
//! predecessor checks, exit codes).

use rh_tests::{rh, run, text};
use std::path::Path;

const BINS: [&str; 6] = [
    "rh-fetch",
    "rh-inspect",
    "rh-repack",
    "rh-verify",
    "rh-serve",
    "rh-bench",
];

fn manifest(dir: &Path, extra: &str) -> std::path::PathBuf {
    let p = dir.join("pipeline.toml");
    std::fs::write(
        &p,
        format!(
            "[model]\nsource = \"synthetic:tiny\"\nwork_dir = \"work\"\n\n[fetch]\nlayers = 2\n\n\
             [inspect]\nprobe_seconds = 0.1\n\n[repack]\nfile_size_mib = 16\n{extra}"
        ),
    )
    .unwrap();
    p
}

fn record_status(dir: &Path, stage: &str) -> String {
    let p = dir.join("work/stages").join(format!("{stage}.json"));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    v["status"].as_str().unwrap().to_string()
}

#[test]
fn demo_pipeline_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(
        dir.path(),
        "\n[serve]\nmax_tokens = 6\ntemperature = 0.0\nseed = 1\n",
    );
    for (bin, stage) in [
        ("rh-fetch", "fetch"),
        ("rh-inspect", "inspect"),
        ("rh-repack", "repack"),
        ("rh-verify", "verify"),
    ] {
        let o = run(rh(bin).arg("--pipeline").arg(&m).current_dir(dir.path()));
        assert!(o.status.success(), "{bin}: {}", text(&o));
        assert_eq!(record_status(dir.path(), stage), "complete", "{bin}");
    }
    // A finished stage with unchanged inputs does nothing and says so.
    let o = run(rh("rh-fetch")
        .arg("--pipeline")
        .arg(&m)
        .current_dir(dir.path()));
    assert!(o.status.success(), "{}", text(&o));
    let all = text(&o).to_lowercase();
    assert!(all.contains("up to date"), "{all}");

    let o = run(rh("rh-serve")
        .arg("--pipeline")
        .arg(&m)
        .args(["--prompt", "Hello", "--json"])
        .current_dir(dir.path()));
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
    assert!(v["prompt_tokens"].as_u64().unwrap() > 0, "{v}");
    assert!(v["generated_tokens"].as_u64().unwrap() > 0, "{v}");
}

#[test]
fn stage_refuses_incomplete_predecessor() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path(), "");
    let o = run(rh("rh-repack")
        .arg("--pipeline")
        .arg(&m)
        .current_dir(dir.path()));
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("rh-fetch"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
}

#[test]
fn every_binary_rejects_a_bad_manifest_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[model]\nsource = \"synthetic:tiny\"\nwrok_dir = \"w\"\n",
    )
    .unwrap();
    let malformed = dir.path().join("malformed.toml");
    std::fs::write(&malformed, "[model\nsource = 1\n").unwrap();
    for bin in BINS {
        let o = run(rh(bin).arg("--pipeline").arg(&bad).current_dir(dir.path()));
        assert_eq!(o.status.code(), Some(2), "{bin}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("wrok_dir") && err.contains("bad.toml"),
            "{bin}: {err}"
        );
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{bin}: one-line error: {err}"
        );

        let o = run(rh(bin)
            .arg("--pipeline")
            .arg(&malformed)
            .current_dir(dir.path()));
        assert_eq!(o.status.code(), Some(2), "{bin}: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("malformed.toml"),
            "{bin}"
        );

        let o = run(rh(bin)
            .arg("--pipeline")
            .arg(dir.path().join("missing.toml"))
            .current_dir(dir.path()));
        assert_eq!(o.status.code(), Some(2), "{bin}: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("missing.toml"),
            "{bin}"
        );
    }
}

#[test]
fn unwritable_work_dir_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    // A regular file where the work dir should be: not writable as a dir,
    // whatever user runs the test (root ignores permission bits).
    std::fs::write(dir.path().join("work"), b"not a directory").unwrap();
    let m = manifest(dir.path(), "");
    let o = run(rh("rh-fetch")
        .arg("--pipeline")
        .arg(&m)
        .current_dir(dir.path()));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("work"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
