//! Hostile and concurrent inputs, as processes (issue 13): two writers
//! racing at several timings, kill -9, files we did not write, crafted
//! checkpoints and configs, a cache truncated under a running rh-serve,
//! runaway templates, link loops, FIFOs. Every case either refuses with a
//! one-line error and the documented exit code, or gives the correct
//! result; nothing previously good is lost. Also the positional forms and
//! `--help` examples of the stage binaries (issue 17).

use rh_tests::{bin, rh, run, text};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Writes the `synthetic:tiny` checkpoint (2 layers, `seed`) into `dir`.
fn tiny(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let spec = roundhouse::synthetic::Spec::preset("tiny", Some(2), seed).unwrap();
    for (name, bytes) in spec.metadata_files() {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    for (file, tensors) in spec.shards() {
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join(file)).unwrap());
        roundhouse::synthetic::write_shard(&mut f, &tensors, seed).unwrap();
    }
}

/// `rh-repack CK CACHE` run in `cwd` (its work dir is `cwd/work`).
fn repack(cwd: &Path, ck: &Path, cache: &Path) -> Command {
    let mut c = rh("rh-repack");
    c.arg(ck)
        .arg(cache)
        .args(["--file-size-mib", "16", "-q"])
        .current_dir(cwd);
    c
}

/// Runs `cmd`, failing the test if it has not ended within `secs` (a hang).
fn within(cmd: &mut Command, secs: u64) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!("hung for {secs} s: {}", text(&o));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A refusal: the exit code, one line on stderr, and these words in it.
fn refused(o: &Output, code: i32, needles: &[&str]) {
    assert_eq!(o.status.code(), Some(code), "{}", text(o));
    let e = err(o);
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    for n in needles {
        assert!(e.contains(n), "`{n}` not in: {e}");
    }
}

/// Files of a directory with their bytes (not our lock file).
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .filter(|e| !e.file_name().to_string_lossy().starts_with(".roundhouse-"))
        .map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            (n, std::fs::read(e.path()).unwrap())
        })
        .collect();
    v.sort();
    v
}

fn verify(args: &[&dyn AsRef<std::ffi::OsStr>], cwd: &Path) -> Output {
    let mut c = rh("rh-verify");
    for a in args {
        c.arg(a);
    }
    run(c.arg("-q").current_dir(cwd))
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

#[test]
fn unpack_commits_a_bundle_whole_and_never_writes_through_links() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    tiny(&t.path().join("cka"), 5);
    tiny(&t.path().join("ckb"), 6);
    for (ck, c) in [("cka", &a), ("ckb", &b)] {
        let o = run(&mut repack(t.path(), &t.path().join(ck), c));
        assert!(o.status.success(), "{}", text(&o));
        let o = verify(&[c], t.path());
        assert!(o.status.success(), "{}", text(&o));
    }
    let good_a = files(&a);
    let bundle = t.path().join("b.tar.zst");
    let o = verify(
        &[&"pack", &b, &"--out", &bundle, &"--level", &"1"],
        t.path(),
    );
    assert!(o.status.success(), "{}", text(&o));
    // A bundle cut in the middle (of another cache) unpacked over a good one.
    let bytes = std::fs::read(&bundle).unwrap();
    for cut in [bytes.len() / 3, bytes.len() * 9 / 10] {
        let cut_path = t.path().join("cut.tar.zst");
        std::fs::write(&cut_path, &bytes[..cut]).unwrap();
        let o = verify(&[&"unpack", &cut_path, &"--out", &a], t.path());
        assert_eq!(o.status.code(), Some(3), "{}", text(&o));
        assert_eq!(files(&a), good_a, "the old cache was touched");
        let o = verify(&[&a], t.path());
        assert!(
            o.status.success(),
            "old cache no longer verifies: {}",
            text(&o)
        );
        roundhouse::cache::Cache::open(&a).expect("old cache still opens");
    }
    // The whole bundle swaps in, and is then exactly b.
    let o = verify(&[&"unpack", &bundle, &"--out", &a], t.path());
    assert!(o.status.success(), "{}", text(&o));
    let (mut fa, mut fb) = (files(&a), files(&b));
    fa.retain(|f| f.0 != "manifest.blake3.json");
    fb.retain(|f| f.0 != "manifest.blake3.json");
    assert_eq!(fa, fb);
    assert!(!a.join(roundhouse::verify::pack::STAGING_DIR).exists());

    // A directory symlink in the target is not written through.
    let d = t.path().join("tree");
    std::fs::create_dir_all(d.join("sub")).unwrap();
    std::fs::write(d.join("sub/x.bin"), b"payload").unwrap();
    let o = verify(&[&"write", &d], t.path());
    assert!(o.status.success(), "{}", text(&o));
    let tb = t.path().join("tree.tar.zst");
    let o = verify(&[&"pack", &d, &"--out", &tb], t.path());
    assert!(o.status.success(), "{}", text(&o));
    let out = t.path().join("out");
    let elsewhere = t.path().join("elsewhere");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, out.join("sub")).unwrap();
    let o = verify(&[&"unpack", &tb, &"--out", &out], t.path());
    refused(&o, 1, &["sub", "symlink"]);
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
}

/// Starts `cmd` with its output captured.
fn start(cmd: &mut Command) -> Child {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn two_writers_of_one_directory_never_both_write() {
    let t = tempfile::tempdir().unwrap();
    let ck = t.path().join("ck");
    tiny(&ck, 5);
    let reference = t.path().join("reference");
    let o = run(&mut repack(t.path(), &ck, &reference));
    assert!(o.status.success(), "{}", text(&o));
    let want = files(&reference);
    let cache = t.path().join("cache");
    let mut refusals = 0;
    for delay_ms in [0u64, 3, 10, 30, 80] {
        let mut p1 = start(repack(t.path(), &ck, &cache).arg("--force"));
        std::thread::sleep(Duration::from_millis(delay_ms));
        let p2 = start(repack(t.path(), &ck, &cache).arg("--force"));
        let pids = [p1.id(), p2.id()];
        let _ = p1.try_wait();
        for o in [
            p1.wait_with_output().unwrap(),
            p2.wait_with_output().unwrap(),
        ] {
            if !o.status.success() {
                refusals += 1;
                let e = err(&o);
                assert!(
                    pids.iter()
                        .any(|p| e.contains(&format!("in use by rh-repack (pid {p})"))),
                    "{}",
                    text(&o)
                );
                refused(&o, 1, &[cache.to_str().unwrap()]);
            }
        }
        // Whatever the timing, what is there is the complete cache.
        assert_eq!(files(&cache), want, "delay {delay_ms} ms");
        roundhouse::cache::Cache::open(&cache).unwrap();
    }
    assert!(refusals > 0, "no run overlapped; the test proves nothing");

    // Two fetches into one --out.
    let out = t.path().join("fetched");
    let fetch = || {
        let mut c = rh("rh-fetch");
        c.args(["synthetic:tiny", "--layers", "2", "--force", "-q", "--out"])
            .arg(&out)
            .current_dir(t.path());
        c
    };
    for delay_ms in [0u64, 20, 100] {
        let p1 = start(&mut fetch());
        std::thread::sleep(Duration::from_millis(delay_ms));
        let p2 = start(&mut fetch());
        for o in [
            p1.wait_with_output().unwrap(),
            p2.wait_with_output().unwrap(),
        ] {
            if !o.status.success() {
                refused(&o, 1, &["in use by rh-fetch (pid"]);
            }
        }
        let o = run(&mut repack(t.path(), &out, &t.path().join("c2")).arg("--force"));
        assert!(
            o.status.success(),
            "fetched checkpoint unusable: {}",
            text(&o)
        );
    }
}

#[test]
fn kill_9_leaves_no_stale_lock_and_the_rerun_completes() {
    let t = tempfile::tempdir().unwrap();
    let ck = t.path().join("ck");
    tiny(&ck, 5);
    let reference = t.path().join("reference");
    assert!(run(&mut repack(t.path(), &ck, &reference)).status.success());
    let cache = t.path().join("cache");
    for delay_ms in [5u64, 40, 150] {
        let mut p = start(repack(t.path(), &ck, &cache).arg("--force"));
        std::thread::sleep(Duration::from_millis(delay_ms));
        p.kill().unwrap(); // SIGKILL
        p.wait().unwrap();
        let o = run(&mut repack(t.path(), &ck, &cache));
        assert!(o.status.success(), "delay {delay_ms}: {}", text(&o));
        assert_eq!(files(&cache), files(&reference), "delay {delay_ms}");
    }
}

#[test]
fn files_the_stage_did_not_write_are_refused_unless_forced() {
    let t = tempfile::tempdir().unwrap();
    let ck = t.path().join("ck");
    tiny(&ck, 5);
    for name in ["data-00002.rhd", "index.rhc"] {
        let cache = t.path().join(format!("cache-{name}"));
        std::fs::create_dir_all(&cache).unwrap();
        std::fs::write(cache.join(name), b"my own notes").unwrap();
        let o = run(&mut repack(t.path(), &ck, &cache));
        refused(&o, 1, &[name, "--force"]);
        assert_eq!(std::fs::read(cache.join(name)).unwrap(), b"my own notes");
        let o = run(repack(t.path(), &ck, &cache).arg("--force"));
        assert!(o.status.success(), "{}", text(&o));
        roundhouse::cache::Cache::open(&cache).unwrap();
    }
    // rh-fetch --out over a user's tokenizer.json.
    let out = t.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("tokenizer.json"), b"{\"mine\": true}").unwrap();
    let fetch = |force: bool| {
        let mut c = rh("rh-fetch");
        c.args(["synthetic:tiny", "--layers", "2", "-q", "--out"])
            .arg(&out)
            .current_dir(t.path());
        if force {
            c.arg("--force");
        }
        run(&mut c)
    };
    refused(&fetch(false), 1, &["tokenizer.json", "--force"]);
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        b"{\"mine\": true}"
    );
    assert!(fetch(true).status.success());
    // Files it wrote itself are replaced on a rerun without --force.
    std::fs::remove_dir_all(out.join(".rh")).unwrap();
    let o = fetch(false);
    refused(&o, 1, &["--force"]);
}

#[test]
fn a_hub_file_cannot_land_in_the_stage_records() {
    use rh_tests::hub::{HubFile, HubServer, Repo};
    let hub = HubServer::start(vec![Repo {
        name: "acme/evil".into(),
        commit: "0123456789abcdef0123456789abcdef01234567".into(),
        revisions: vec!["main".into()],
        files: vec![
            HubFile {
                path: "config.json".into(),
                data: b"{}".to_vec(),
                lfs: false,
            },
            HubFile {
                path: ".rh/stages/repack.json".into(),
                data: b"{\"format\": 1, \"status\": \"complete\"}".to_vec(),
                lfs: false,
            },
        ],
        token: None,
    }]);
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    let o = run(rh("rh-fetch")
        .arg("hf:acme/evil")
        .arg("--out")
        .arg(&out)
        .arg("--endpoint")
        .arg(&hub.url)
        .current_dir(t.path())
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_ENDPOINT")
        .env("HF_HOME", t.path().join("hf")));
    refused(&o, 1, &[".rh/stages/repack.json", "refusing"]);
    assert!(!out.join(".rh/stages/repack.json").exists());
}

#[test]
fn replaced_weights_are_seen_and_repacked() {
    let t = tempfile::tempdir().unwrap();
    let ck = t.path().join("ck");
    tiny(&ck, 5);
    let cache = t.path().join("cache");
    assert!(run(&mut repack(t.path(), &ck, &cache)).status.success());
    let before = files(&cache);
    // Same shapes and headers, other weights.
    let other = t.path().join("other");
    tiny(&other, 6);
    for (name, _) in files(&other) {
        if name.ends_with(".safetensors") {
            std::fs::copy(other.join(&name), ck.join(&name)).unwrap();
        }
    }
    let o = run(repack(t.path(), &ck, &cache).arg("--json"));
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["up_to_date"], false, "stale weights kept: {v}");
    // (The reference in its own work dir: one repack record per work dir.)
    let elsewhere = t.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let reference = t.path().join("reference");
    assert!(run(&mut repack(&elsewhere, &other, &reference))
        .status
        .success());
    assert_ne!(files(&cache), before);
    assert_eq!(files(&cache), files(&reference));
    // Untouched since: up to date without reading the data again.
    let o = run(repack(t.path(), &ck, &cache).arg("--json"));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["up_to_date"], true, "{v}");
}

#[test]
fn verify_never_blesses_a_damaged_cache() {
    let t = tempfile::tempdir().unwrap();
    let ck = t.path().join("ck");
    tiny(&ck, 5);
    let cache = t.path().join("cache");
    assert!(run(&mut repack(t.path(), &ck, &cache)).status.success());
    let data = cache.join("data-00002.rhd");
    let len = std::fs::metadata(&data).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(len - 64)
        .unwrap();
    let manifest = cache.join("manifest.blake3.json");
    for args in [
        vec!["DIR"],
        vec!["write", "DIR"],
        vec!["--cache", "DIR"], // the pipeline stage (repack's record is in ./work)
    ] {
        let mut c = rh("rh-verify");
        for a in &args {
            if *a == "DIR" {
                c.arg(&cache);
            } else {
                c.arg(a);
            }
        }
        let o = run(c.current_dir(t.path()));
        refused(&o, 3, &["data-00002.rhd"]);
        assert!(!manifest.exists(), "{args:?} wrote a manifest");
    }
    // Serving it without a manifest: exit 3 as documented.
    let o = run(rh("rh-serve").arg(&cache).args(["--prompt", "hi"]));
    refused(&o, 3, &["data-00002.rhd"]);
    // A bad index magic is reported as such, not as a missing config.json.
    let idx = cache.join("index.rhc");
    let mut b = std::fs::read(&idx).unwrap();
    b[0] = b'X';
    std::fs::write(&idx, &b).unwrap();
    let o = run(rh("rh-serve").arg(&cache).args(["--prompt", "hi"]));
    refused(&o, 3, &["index.rhc", "magic"]);
    assert!(!err(&o).contains("config.json"), "{}", text(&o));
}

/// A safetensors file with one tensor: `dtype`, `shape`, `data` bytes.
fn safetensors(name: &str, dtype: &str, shape: &[u64], data: &[u8]) -> Vec<u8> {
    let header = serde_json::json!({
        name: {"dtype": dtype, "shape": shape, "data_offsets": [0, data.len()]}
    })
    .to_string();
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

#[test]
fn crafted_checkpoints_are_refused_by_the_first_stage() {
    let t = tempfile::tempdir().unwrap();
    let ck = t.path().join("ck");
    tiny(&ck, 5);
    let reference = t.path().join("reference");
    assert!(run(&mut repack(t.path(), &ck, &reference)).status.success());
    // A stray file beside a shard index is not read.
    let norm = roundhouse::checkpoint::Checkpoint::open(&ck)
        .unwrap()
        .tensors["model.norm.weight"]
        .clone();
    let n: u64 = norm.shape.iter().map(|&d| d as u64).product();
    let stray = safetensors(
        "model.norm.weight",
        &format!("{:?}", norm.dtype),
        &norm.shape.iter().map(|&d| d as u64).collect::<Vec<_>>(),
        &vec![0x3f; n as usize * norm.dtype.size()],
    );
    std::fs::write(ck.join("stray.safetensors"), &stray).unwrap();
    let cache = t.path().join("cache");
    let o = run(&mut repack(t.path(), &ck, &cache));
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(files(&cache), files(&reference), "the stray file was read");
    // Without the index every file is read: a tensor in two files is an
    // error naming both.
    std::fs::remove_file(ck.join("model.safetensors.index.json")).unwrap();
    let o = run(repack(t.path(), &ck, &cache).arg("--force"));
    refused(
        &o,
        1,
        &["model.norm.weight", "stray.safetensors", "model-0000"],
    );
    std::fs::remove_file(ck.join("stray.safetensors")).unwrap();

    // A shape whose size overflows.
    std::fs::write(
        ck.join("evil.safetensors"),
        safetensors("evil", "F32", &[1 << 62, 4], &[0u8; 16]),
    )
    .unwrap();
    let o = run(repack(t.path(), &ck, &cache).arg("--force"));
    refused(&o, 1, &["evil.safetensors", "`evil`"]);
    std::fs::write(
        ck.join("evil.safetensors"),
        safetensors("evil", "F32", &[0, 1 << 62], &[]),
    )
    .unwrap();
    let o = run(repack(t.path(), &ck, &cache).arg("--force"));
    refused(&o, 1, &["evil.safetensors", "`evil`"]);
    std::fs::remove_file(ck.join("evil.safetensors")).unwrap();

    // Absurd and merely wrong config dimensions, named by field, before
    // any allocation: repack refuses, and so does serving the checkpoint.
    let cfg_path = ck.join("config.json");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    for (field, value) in [
        ("head_dim", serde_json::json!(1_000_000_000_000u64)),
        (
            "linear_value_head_dim",
            serde_json::json!(cfg["linear_value_head_dim"].as_u64().unwrap() * 2),
        ),
        (
            "moe_intermediate_size",
            serde_json::json!(cfg["moe_intermediate_size"].as_u64().unwrap() + 32),
        ),
        ("num_hidden_layers", serde_json::json!(1)),
    ] {
        let mut c = cfg.clone();
        c[field] = value;
        std::fs::write(&cfg_path, serde_json::to_vec(&c).unwrap()).unwrap();
        let o = run(repack(t.path(), &ck, &cache).arg("--force"));
        refused(&o, 1, &[field]);
        let o = run(rh("rh-serve").arg(&ck).args(["--prompt", "hi"]));
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(err(&o).contains(field), "{}", text(&o));
    }
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();

    // A FIFO as the shard index: refused at once, not waited on.
    let idx = ck.join("model.safetensors.index.json");
    let _ = std::fs::remove_file(&idx);
    mkfifo(&idx);
    let o = within(&mut repack(t.path(), &ck, &cache), 30);
    refused(&o, 1, &["model.safetensors.index.json", "FIFO"]);
    // --threads out of bounds.
    let o = run(repack(t.path(), &ck, &cache).args(["--threads", "100000"]));
    refused(&o, 2, &["--threads 100000"]);
}

#[test]
fn a_cache_truncated_under_a_running_serve_is_one_line_and_exit_3() {
    let t = tempfile::tempdir().unwrap();
    let ck = t.path().join("ck");
    tiny(&ck, 5);
    let cache = t.path().join("cache");
    assert!(run(&mut repack(t.path(), &ck, &cache)).status.success());
    // Interactive, so the model is loaded (mapped) before the prompt.
    let mut cmd = Command::new(bin("rh-serve"));
    cmd.arg(&cache)
        .args(["--max-tokens", "50", "--temperature", "0"])
        .env_remove("RUST_LOG")
        .env("TERM", "xterm");
    let mut p = rexpect::session::spawn_command(cmd, Some(120_000)).unwrap();
    p.exp_string("> ").unwrap();
    for f in ["data-00001.rhd", "data-00002.rhd", "data-00003.rhd"] {
        std::fs::OpenOptions::new()
            .write(true)
            .open(cache.join(f))
            .unwrap()
            .set_len(4096)
            .unwrap();
    }
    p.send_line("Hello there").unwrap();
    let (_, line) = p.exp_regex(r"error: [^\r\n]*truncated[^\r\n]*").unwrap();
    assert!(line.contains("data-0000"), "{line}");
    p.exp_eof().unwrap();
    // rexpect's status type is nix's, which this crate does not name.
    let status = format!("{:?}", p.process().wait().unwrap());
    assert!(
        status.starts_with("Exited(") && status.ends_with(", 3)"),
        "{status}: {line}"
    );
}

#[test]
fn a_runaway_chat_template_is_stopped_naming_it() {
    let t = tempfile::tempdir().unwrap();
    let ck = t.path().join("ck");
    tiny(&ck, 5);
    std::fs::write(
        ck.join("chat_template.jinja"),
        "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
    )
    .unwrap();
    let o = within(
        rh("rh-serve")
            .arg(&ck)
            .args(["--prompt", "hi", "--max-tokens", "1"]),
        120,
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let e = err(&o);
    assert!(
        e.contains("chat_template.jinja") && e.contains("steps"),
        "{e}"
    );
}

#[test]
fn link_loops_and_links_out_of_the_tree_are_not_followed() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    tiny(&src, 5);
    std::os::unix::fs::symlink(".", src.join("loop")).unwrap();
    std::os::unix::fs::symlink("..", src.join("up")).unwrap();
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::os::unix::fs::symlink("../sub", src.join("sub/again")).unwrap();
    let out = t.path().join("out");
    let o = within(
        rh("rh-fetch")
            .arg(format!("dir:{}", src.display()))
            .arg("--out")
            .arg(&out)
            .arg("-q")
            .current_dir(t.path()),
        60,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(!out.join("loop").exists() && !out.join("up").exists());
    assert!(out.join("config.json").is_file());

    // rh-verify write does not leave the tree through a directory link.
    let d = t.path().join("tree");
    let outside = t.path().join("outside");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(d.join("a.bin"), b"a").unwrap();
    std::fs::write(outside.join("secret"), b"s").unwrap();
    std::os::unix::fs::symlink(&outside, d.join("ext")).unwrap();
    std::os::unix::fs::symlink(".", d.join("self")).unwrap();
    let o = within(rh("rh-verify").arg("write").arg(&d).arg("--json"), 30);
    assert!(o.status.success(), "{}", text(&o));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("manifest.blake3.json")).unwrap()).unwrap();
    let paths: Vec<&str> = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["a.bin"]);

    // A FIFO as the manifest: refused at once.
    std::fs::remove_file(d.join("manifest.blake3.json")).unwrap();
    mkfifo(&d.join("manifest.blake3.json"));
    let o = within(rh("rh-verify").arg("check").arg(&d), 30);
    refused(&o, 1, &["manifest.blake3.json", "FIFO"]);
}

#[test]
fn bad_sampling_values_in_the_manifest_are_usage_errors() {
    let t = tempfile::tempdir().unwrap();
    for (key, value) in [
        ("temperature", "nan"),
        ("top_p", "inf"),
        ("min_p", "-0.5"),
        ("threads", "100000"),
    ] {
        std::fs::write(
            t.path().join("pipeline.toml"),
            format!("[serve]\n{key} = {value}\n"),
        )
        .unwrap();
        let o = run(rh("rh-serve")
            .args(["--prompt", "hi"])
            .current_dir(t.path()));
        refused(&o, 2, &["pipeline.toml", key]);
    }
}

#[test]
fn stage_binaries_take_their_main_input_positionally_and_show_examples() {
    for b in ["rh-fetch", "rh-inspect", "rh-repack", "rh-verify"] {
        let o = run(rh(b).arg("--help"));
        assert!(o.status.success(), "{}", text(&o));
        let help = String::from_utf8_lossy(&o.stdout);
        let examples = help.split("Examples:").nth(1).unwrap_or("");
        assert!(
            examples.lines().filter(|l| l.contains(b)).count() >= 3,
            "{b}: {help}"
        );
    }
    let t = tempfile::tempdir().unwrap();
    let ck = t.path().join("ck");
    // rh-fetch SOURCE
    let o = run(rh("rh-fetch")
        .args(["synthetic:tiny", "--layers", "2", "-q", "--out"])
        .arg(&ck)
        .current_dir(t.path()));
    assert!(o.status.success(), "{}", text(&o));
    // rh-repack CKPT CACHE
    let cache = t.path().join("cache");
    assert!(run(&mut repack(t.path(), &ck, &cache)).status.success());
    // rh-verify DIR (writes), rh-verify DIR (checks), DIR --expect HASH.
    let o = run(rh("rh-verify").arg(&cache).arg("--json"));
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["mode"], "write");
    let hash = v["manifest_blake3"].as_str().unwrap().to_string();
    let o = run(rh("rh-verify").arg(&cache).arg("--json"));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["mode"], "check");
    let o = run(rh("rh-verify").arg(&cache).args(["--expect", &hash]));
    assert!(o.status.success(), "{}", text(&o));
    let o = run(rh("rh-verify")
        .arg(&cache)
        .args(["--expect", &"0".repeat(64)]));
    refused(&o, 3, &["expected 0000"]);
    // The subcommands still work.
    let o = run(rh("rh-verify").arg("check").arg(&cache).arg("--quick"));
    assert!(o.status.success(), "{}", text(&o));
    // rh-inspect MODEL sizes the model it is given.
    for model in [&ck, &cache] {
        let o = run(rh("rh-inspect")
            .arg(model)
            .args(["--dry-run", "--json", "--probe-seconds", "0.05"])
            .current_dir(t.path()));
        assert!(o.status.success(), "{}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(v["model"]["total_bytes"].as_u64().unwrap() > 1 << 20, "{v}");
        assert_eq!(
            v["model"]["path"].as_str().unwrap(),
            model.to_str().unwrap(),
            "{v}"
        );
    }
}
