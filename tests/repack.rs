//! `rh-repack` as a process: predecessor check, a run killed mid-way that
//! resumes to byte-identical output, an up-to-date rerun, and the cache it
//! writes opening as a weight source.

use rh_tests::{rh, run, text, with_file_size_limit};
use std::path::{Path, PathBuf};

use roundhouse::stage::{self, Output, Plan};

/// Writes `synthetic:tiny` with `layers` layers into `dir`.
fn tiny(dir: &Path, layers: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let spec = roundhouse::synthetic::Spec::preset("tiny", Some(layers), 5).unwrap();
    for (name, bytes) in spec.metadata_files() {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    for (file, tensors) in spec.shards() {
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join(file)).unwrap());
        roundhouse::synthetic::write_shard(&mut f, &tensors, 5).unwrap();
    }
}

/// The files of a cache directory with their bytes (not the lock file,
/// which holds the pid of the last writer).
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with(".roundhouse-"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn manifest(dir: &Path) -> PathBuf {
    let p = dir.join("pipeline.toml");
    std::fs::write(
        &p,
        "[model]\nsource = \"synthetic:tiny\"\nwork_dir = \"work\"\n\n[fetch]\nlayers = 2\n\n\
         [repack]\nfile_size_mib = 16\n",
    )
    .unwrap();
    p
}

#[test]
fn refuses_to_run_before_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path());
    let o = run(rh("rh-repack")
        .arg("--pipeline")
        .arg(&m)
        .current_dir(dir.path()));
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("rh-fetch"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn killed_repack_resumes_to_identical_bytes_and_reruns_are_up_to_date() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path());
    let ck = dir.path().join("work/checkpoint");
    tiny(&ck, 2);
    // A complete fetch record, as rh-fetch would leave it.
    let work = dir.path().join("work");
    let Plan::Run(fetch) =
        stage::plan(&work, "fetch", "fp", &ck, Default::default(), false).unwrap()
    else {
        panic!("fresh fetch record")
    };
    fetch
        .finish(
            vec![Output {
                path: "config.json".into(),
                size: std::fs::metadata(ck.join("config.json")).unwrap().len(),
                blake3: None,
            }],
            serde_json::Value::Null,
        )
        .unwrap();

    // Reference: an uninterrupted run into another directory (explicit
    // directories need no fetch record).
    let reference = dir.path().join("reference");
    let o = run(rh("rh-repack")
        .arg(&ck)
        .arg(&reference)
        .args(["--file-size-mib", "16", "--threads", "2"])
        .arg("--pipeline")
        .arg(&m)
        .current_dir(dir.path()));
    assert!(o.status.success(), "{}", text(&o));

    // Killed (aborted, no cleanup) after each of its first two groups.
    for _ in 0..2 {
        let o = run(rh("rh-repack")
            .arg("--pipeline")
            .arg(&m)
            .env("RH_REPACK_ABORT_AFTER_UNITS", "1")
            .current_dir(dir.path()));
        assert!(!o.status.success(), "{}", text(&o));
        assert!(!work.join("cache/index.rhc").exists());
        let rec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(work.join("stages/repack.json")).unwrap())
                .unwrap();
        assert_eq!(rec["status"], "running");
    }
    let o = run(rh("rh-repack")
        .arg("--pipeline")
        .arg(&m)
        .current_dir(dir.path()));
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("resumed"), "{}", text(&o));
    assert_eq!(files(&reference), files(&work.join("cache")));

    // Unchanged input: up to date.
    let o = run(rh("rh-repack")
        .arg("--pipeline")
        .arg(&m)
        .current_dir(dir.path()));
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).to_lowercase().contains("up to date"),
        "{}",
        text(&o)
    );

    // The cache opens as the model's weight source.
    let w = roundhouse::open::open_weights(&work.join("cache")).unwrap();
    assert!(w.path().ends_with("cache"));
    assert!(w.aux_file("tokenizer.json").is_some());
    let c = w.config().clone();
    let expert = w
        .matrix(
            "model.layers.1.mlp.experts.3.down_proj",
            c.hidden_size,
            c.moe_intermediate_size,
        )
        .unwrap();
    assert!(expert.is_mapped());
    // An open cache holds a shared lock: repack waits for readers to end.
    drop(w);

    // A damaged cache is refused with a one-line error naming the file.
    let data = work.join("cache/data-00001.rhd");
    let len = std::fs::metadata(&data).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    let e = roundhouse::open::open_weights(&work.join("cache"))
        .err()
        .expect("truncated cache refused")
        .to_string();
    assert!(
        e.contains("data-00001.rhd") && e.contains("truncated"),
        "{e}"
    );
    // ...and repack notices its output changed and rewrites it.
    let o = run(rh("rh-repack")
        .arg("--pipeline")
        .arg(&m)
        .current_dir(dir.path()));
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(files(&reference), files(&work.join("cache")));
}

#[test]
fn bad_input_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path());
    let ck = dir.path().join("ck");
    std::fs::create_dir_all(&ck).unwrap();
    let o = run(rh("rh-repack")
        .arg(&ck)
        .arg(dir.path().join("out"))
        .arg("--pipeline")
        .arg(&m)
        .current_dir(dir.path()));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("config.json"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // A truncated shard.
    tiny(&ck, 1);
    let shard = ck.join("model-00001-of-00003.safetensors");
    let shard = if shard.exists() {
        shard
    } else {
        std::fs::read_dir(&ck)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .unwrap()
    };
    let len = std::fs::metadata(&shard).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let o = run(rh("rh-repack")
        .arg(&ck)
        .arg(dir.path().join("out"))
        .arg("--pipeline")
        .arg(&m)
        .current_dir(dir.path()));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("truncated"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn write_failure_is_one_line_and_keeps_the_previous_cache() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path());
    let ck = dir.path().join("ck");
    tiny(&ck, 2);
    let repack = |cache: &Path, limit: Option<u64>, force: bool| {
        let mut c = rh("rh-repack");
        c.arg(&ck)
            .arg(cache)
            .args(["--file-size-mib", "16", "-q"])
            .arg("--pipeline")
            .arg(&m)
            .current_dir(dir.path());
        if force {
            c.arg("--force");
        }
        if let Some(l) = limit {
            with_file_size_limit(&mut c, l);
        }
        run(&mut c)
    };
    let cache = dir.path().join("cache");
    let o = repack(&cache, None, false);
    assert!(o.status.success(), "{}", text(&o));
    let good = files(&cache);
    let data_len = std::fs::metadata(cache.join("data-00001.rhd"))
        .unwrap()
        .len();
    assert!(
        data_len > 1 << 20,
        "data file of {data_len} bytes too small for this test"
    );
    let limit = data_len / 2;

    // A forced rerun that cannot write its data: one line naming the file,
    // exit 1, and the complete cache from before is still all there.
    let o = repack(&cache, Some(limit), true);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("data-00001.rhd.tmp") && err.contains("too large"),
        "{err}"
    );
    assert_eq!(
        files(&cache),
        good,
        "previous cache changed or temp file left"
    );
    roundhouse::open::open_weights(&cache).expect("previous cache still opens");

    // A fresh directory: nothing that looks finished, no temp files; the
    // rerun without the limit completes to the same bytes.
    let fresh = dir.path().join("fresh");
    let o = repack(&fresh, Some(limit), false);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("data-00001.rhd.tmp"), "{err}");
    let left: Vec<String> = files(&fresh).into_iter().map(|(n, _)| n).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let o = repack(&fresh, None, false);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(files(&fresh), good);
}

#[test]
fn up_to_date_check_follows_content_not_mtime() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path());
    let ck = dir.path().join("ck");
    tiny(&ck, 1);
    let cache = dir.path().join("cache");
    let repack = || {
        run(rh("rh-repack")
            .arg(&ck)
            .arg(&cache)
            .args(["--file-size-mib", "16"])
            .arg("--pipeline")
            .arg(&m)
            .current_dir(dir.path()))
    };
    let o = repack();
    assert!(o.status.success(), "{}", text(&o));
    let shard = std::fs::read_dir(&ck)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .unwrap();

    // A new modification time, same bytes: still up to date.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(3600))
        .unwrap();
    drop(f);
    let o = repack();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("up to date"), "{}", text(&o));

    // One header byte changed (a BF16 tensor declared F16, same length):
    // the input changed, so the cache is rebuilt.
    let mut bytes = std::fs::read(&shard).unwrap();
    let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + hlen].to_vec()).unwrap();
    let at = header.find("\"dtype\":\"BF16\"").expect("a BF16 tensor");
    bytes[8 + at..8 + at + 14].copy_from_slice(b"\"dtype\": \"F16\"");
    std::fs::write(&shard, &bytes).unwrap();
    let o = repack();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("wrote"), "{}", text(&o));
}
