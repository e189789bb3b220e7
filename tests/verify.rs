//! `rh-verify` as a process: manifest write and check, damage located to
//! a file and chunk (exit 3), quick checks, bundles, and the pipeline stage.

use rh_tests::{rh, run, text, with_file_size_limit};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const MIB: usize = 1 << 20;

/// A directory of files: 3.5 MiB (4 chunks of 1 MiB), a small file in a
/// subdirectory, and an empty file.
fn tree(dir: &Path) -> PathBuf {
    let d = dir.join("data");
    std::fs::create_dir_all(d.join("sub")).unwrap();
    let big: Vec<u8> = (0..(3 * MIB + MIB / 2) as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(d.join("big.bin"), big).unwrap();
    std::fs::write(d.join("sub/small.json"), br#"{"hello": 1}"#).unwrap();
    std::fs::write(d.join("empty"), b"").unwrap();
    d
}

fn verify(args: &[&str], dir: &Path) -> std::process::Output {
    run(rh("rh-verify").args(args).current_dir(dir))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn write(d: &Path) {
    let o = verify(&["write", s(d), "--chunk-mib", "1"], d);
    assert!(o.status.success(), "{}", text(&o));
}

fn expect_fail(o: &std::process::Output, needles: &[&str]) {
    assert_eq!(o.status.code(), Some(3), "{}", text(o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
}

#[test]
fn flipped_byte_is_located_to_its_chunk() {
    let t = tempfile::tempdir().unwrap();
    let d = tree(t.path());
    write(&d);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("manifest.blake3.json")).unwrap()).unwrap();
    assert_eq!(m["chunk_size"], MIB);
    let files = m["files"].as_array().unwrap();
    let paths: Vec<&str> = files.iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["big.bin", "empty", "sub/small.json"]);
    assert_eq!(files[0]["chunks"].as_array().unwrap().len(), 4);

    let o = verify(&["check", s(&d), "--json"], &d);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["files"], 3);
    assert_eq!(v["hashed_bytes"], 3 * MIB + MIB / 2 + 12);

    // One flipped bit in chunk 2.
    let p = d.join("big.bin");
    let mut b = std::fs::read(&p).unwrap();
    b[2 * MIB + 12345] ^= 0x10;
    std::fs::write(&p, &b).unwrap();
    let o = verify(&["check", s(&d)], &d);
    expect_fail(
        &o,
        &[
            "big.bin",
            "chunk 2",
            &format!("bytes {}..{}", 2 * MIB, 3 * MIB),
        ],
    );
    // The quick check reads only the first and last chunks: it passes...
    let o = verify(&["check", s(&d), "--quick"], &d);
    assert!(o.status.success(), "{}", text(&o));
    // ...unless the damage is in one of them.
    b[2 * MIB + 12345] ^= 0x10;
    b[3 * MIB + 1] ^= 1;
    std::fs::write(&p, &b).unwrap();
    let o = verify(&["check", s(&d), "--quick"], &d);
    expect_fail(&o, &["big.bin", "chunk 3"]);
}

#[test]
fn truncated_missing_and_foreign_manifests() {
    let t = tempfile::tempdir().unwrap();
    let d = tree(t.path());
    write(&d);
    let ok = verify(&["check", s(&d), "--json"], &d);
    let hash = serde_json::from_slice::<serde_json::Value>(&ok.stdout).unwrap()["manifest_blake3"]
        .as_str()
        .unwrap()
        .to_string();

    // The shared hash is accepted; another is refused.
    let o = verify(&["check", s(&d), "--expect", &hash], &d);
    assert!(o.status.success(), "{}", text(&o));
    let o = verify(&["check", s(&d), "--expect", &"ab".repeat(32)], &d);
    expect_fail(&o, &["manifest blake3 is", &hash]);

    let p = d.join("big.bin");
    let b = std::fs::read(&p).unwrap();
    std::fs::write(&p, &b[..b.len() - 1000]).unwrap();
    expect_fail(
        &verify(&["check", s(&d), "--quick"], &d),
        &["big.bin", "truncated"],
    );
    std::fs::write(&p, &b).unwrap();

    std::fs::remove_file(d.join("sub/small.json")).unwrap();
    expect_fail(&verify(&["check", s(&d)], &d), &["small.json", "missing"]);

    // A manifest that is not one.
    std::fs::write(d.join("manifest.blake3.json"), b"{\"format\": 9}").unwrap();
    expect_fail(
        &verify(&["check", s(&d)], &d),
        &["manifest.blake3.json", "format 9"],
    );
    // No manifest at all: a plain failure with the command to run.
    std::fs::remove_file(d.join("manifest.blake3.json")).unwrap();
    let o = verify(&["check", s(&d)], &d);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("rh-verify write"));
}

#[test]
fn pack_unpack_round_trip_and_damage() {
    let t = tempfile::tempdir().unwrap();
    let d = tree(t.path());
    write(&d);
    let bundle = t.path().join("b.tar.zst");
    let o = verify(&["pack", s(&d), "--out", s(&bundle)], &d);
    assert!(o.status.success(), "{}", text(&o));
    let out = t.path().join("restored");
    let o = verify(&["unpack", s(&bundle), "--out", s(&out)], &d);
    assert!(o.status.success(), "{}", text(&o));
    for f in ["big.bin", "sub/small.json", "empty", "manifest.blake3.json"] {
        assert_eq!(
            std::fs::read(d.join(f)).unwrap(),
            std::fs::read(out.join(f)).unwrap(),
            "{f}"
        );
    }
    let o = verify(&["check", s(&out)], &d);
    assert!(o.status.success(), "{}", text(&o));
    // Unpacking again keeps what is already good.
    let o = verify(&["unpack", s(&bundle), "--out", s(&out), "--json"], &d);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["kept"], 3, "{}", text(&o));

    // A truncated bundle: exit 3, and no manifest in the target.
    let b = std::fs::read(&bundle).unwrap();
    let cut = t.path().join("cut.tar.zst");
    std::fs::write(&cut, &b[..b.len() / 2]).unwrap();
    let out2 = t.path().join("partial");
    let o = verify(&["unpack", s(&cut), "--out", s(&out2)], &d);
    expect_fail(&o, &["cut.tar.zst"]);
    assert!(!out2.join("manifest.blake3.json").exists());

    // Pack refuses data that no longer matches its manifest.
    let p = d.join("big.bin");
    let mut b = std::fs::read(&p).unwrap();
    b[MIB + 5] ^= 1;
    std::fs::write(&p, &b).unwrap();
    let bad = t.path().join("bad.tar.zst");
    let o = verify(&["pack", s(&d), "--out", s(&bad)], &d);
    expect_fail(&o, &["big.bin", "chunk 1"]);
    assert!(!bad.exists());
}

/// A hand-made bundle: a manifest for one file `a`, then the given entries.
fn crafted_bundle(path: &Path, manifest_path: &str, entries: &[(&str, &[u8])]) {
    let content = b"0123456789";
    let h = blake3::hash(content).to_hex().to_string();
    let manifest = serde_json::json!({
        "format": 1, "algorithm": "blake3", "chunk_size": 1024,
        "files": [{"path": manifest_path, "size": 10, "blake3": h, "chunks": [h]}],
    });
    let mbytes = serde_json::to_vec(&manifest).unwrap();
    let f = std::fs::File::create(path).unwrap();
    let enc = zstd::stream::Encoder::new(f, 3).unwrap().auto_finish();
    let mut tar = tar::Builder::new(enc);
    let mut append = |name: &str, data: &[u8]| {
        let mut hd = tar::Header::new_gnu();
        hd.set_size(data.len() as u64);
        hd.set_mode(0o644);
        hd.set_entry_type(tar::EntryType::Regular);
        // Write the name raw so `..` reaches the reader as an attacker would send it.
        let name_field = &mut hd.as_old_mut().name;
        name_field[..name.len()].copy_from_slice(name.as_bytes());
        hd.set_cksum();
        tar.append(&hd, data).unwrap();
    };
    append("manifest.blake3.json", &mbytes);
    for (n, d) in entries {
        append(n, d);
    }
    tar.into_inner().unwrap();
}

#[test]
fn unpack_refuses_paths_that_escape() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    // An entry the manifest does not list.
    let b = t.path().join("extra.tar.zst");
    crafted_bundle(&b, "a", &[("a", b"0123456789"), ("../evil", b"x")]);
    let o = verify(&["unpack", s(&b), "--out", s(&out)], t.path());
    expect_fail(&o, &["../evil", "not in the bundled manifest"]);
    assert!(!t.path().join("evil").exists());
    // A manifest that lists an escaping path.
    let b = t.path().join("escape.tar.zst");
    crafted_bundle(&b, "../evil", &[("../evil", b"0123456789")]);
    let o = verify(&["unpack", s(&b), "--out", s(&out)], t.path());
    expect_fail(&o, &["escapes"]);
    assert!(!t.path().join("evil").exists());
    // Wrong bytes for a listed file.
    let b = t.path().join("wrong.tar.zst");
    crafted_bundle(&b, "a", &[("a", b"0123456780")]);
    let out = t.path().join("out2");
    let o = verify(&["unpack", s(&b), "--out", s(&out)], t.path());
    expect_fail(&o, &["`a` chunk 0"]);
    assert!(!out.join("a").exists() && !out.join("a.tmp").exists());
    // The good one unpacks.
    let b = t.path().join("good.tar.zst");
    crafted_bundle(&b, "a", &[("a", b"0123456789")]);
    let o = verify(&["unpack", s(&b), "--out", s(&out)], t.path());
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(out.join("a")).unwrap(), b"0123456789");
}

fn manifest(dir: &Path) -> PathBuf {
    let p = dir.join("pipeline.toml");
    std::fs::write(
        &p,
        "[model]\nsource = \"synthetic:tiny\"\nwork_dir = \"work\"\n",
    )
    .unwrap();
    p
}

/// A complete repack record whose output is `work/cache` (a plain tree).
fn fake_repack(dir: &Path) -> PathBuf {
    use roundhouse::stage::{plan, Plan};
    let work = dir.join("work");
    let cache = tree(&work);
    let cache_dir = work.join("cache");
    std::fs::rename(&cache, &cache_dir).unwrap();
    let Plan::Run(r) = plan(&work, "repack", "fp", &cache_dir, BTreeMap::new(), false).unwrap()
    else {
        panic!("fresh repack record")
    };
    r.finish(vec![], serde_json::Value::Null).unwrap();
    cache_dir
}

fn record(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("work/stages/verify.json")).unwrap()).unwrap()
}

#[test]
fn pipeline_stage_writes_then_checks() {
    let t = tempfile::tempdir().unwrap();
    let m = manifest(t.path());
    let go = |extra: &[&str]| {
        run(rh("rh-verify")
            .arg("--pipeline")
            .arg(&m)
            .args(extra)
            .current_dir(t.path()))
    };
    // Repack has not run: exit 4 naming it.
    let o = go(&[]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("rh-repack") && err.trim().lines().count() == 1,
        "{err}"
    );

    let cache = fake_repack(t.path());
    let o = go(&["--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["summary"]["mode"], "write");
    assert!(cache.join("manifest.blake3.json").exists());
    let rec = record(t.path());
    assert_eq!(rec["status"], "complete");
    assert_eq!(rec["units_done"].as_object().unwrap().len(), 3);
    assert_eq!(rec["details"]["manifest_blake3"], v["manifest_blake3"]);

    let o = go(&[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("up to date"), "{}", text(&o));

    // With a manifest present the stage checks against it.
    let o = go(&["--force", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["summary"]["mode"], "check");

    let p = cache.join("big.bin");
    let mut b = std::fs::read(&p).unwrap();
    b[5] ^= 1;
    std::fs::write(&p, &b).unwrap();
    let o = go(&["--force"]);
    expect_fail(&o, &["big.bin", "chunk 0"]);
    assert_eq!(record(t.path())["status"], "running");
    // The files that did verify are recorded, so a rerun resumes past them.
    let units = record(t.path())["units_done"].as_object().unwrap().len();
    assert_eq!(units, 2);
    b[5] ^= 1;
    std::fs::write(&p, &b).unwrap();
    let o = go(&["--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["summary"]["resumed_files"], 2);
    assert_eq!(record(t.path())["status"], "complete");
}

#[test]
fn interrupted_pack_and_unpack_resume_and_leave_nothing_half_written() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("data");
    std::fs::create_dir_all(&d).unwrap();
    // Incompressible bytes (xorshift), so the bundle is as big as the data.
    let noise = |n: usize, seed: u64| -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    };
    std::fs::write(d.join("a.json"), br#"{"a": 1}"#).unwrap();
    std::fs::write(d.join("b.bin"), noise(MIB / 8, 1)).unwrap();
    std::fs::write(d.join("c.bin"), noise(3 * MIB, 2)).unwrap();
    write(&d);
    let limited = |args: &[&str], limit: Option<u64>| {
        let mut c = rh("rh-verify");
        c.args(args).current_dir(&d);
        if let Some(l) = limit {
            with_file_size_limit(&mut c, l);
        }
        run(&mut c)
    };

    // Pack cut off by a failing write: one line naming the temporary file,
    // and the bundle already at the final name is untouched.
    let bundle = t.path().join("b.tar.zst");
    std::fs::write(&bundle, b"an older bundle").unwrap();
    let o = limited(&["pack", s(&d), "--out", s(&bundle)], Some(MIB as u64));
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("b.tar.zst.tmp"), "{err}");
    assert_eq!(std::fs::read(&bundle).unwrap(), b"an older bundle");
    // What it did is kept beside the temporary bundle: the manifest, a.json
    // and b.bin are complete members; c.bin was cut off.
    let progress: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.path().join("b.tar.zst.tmp.progress")).unwrap())
            .unwrap();
    assert_eq!(progress["members"], 3, "{progress}");
    // The rerun continues from there and gives the same bytes as a pack
    // that was never interrupted.
    let o = limited(&["pack", s(&d), "--out", s(&bundle)], None);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!t.path().join("b.tar.zst.tmp").exists());
    assert!(!t.path().join("b.tar.zst.tmp.progress").exists());
    let whole = t.path().join("whole.tar.zst");
    let o = limited(&["pack", s(&d), "--out", s(&whole)], None);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        std::fs::read(&bundle).unwrap(),
        std::fs::read(&whole).unwrap()
    );

    // Unpack cut off at the big file: nothing is in place yet (the bundle
    // is committed as a whole); the files before it are verified in the
    // staging directory, the big one is not there (not even as a
    // temporary), and there is no manifest.
    let out = t.path().join("out");
    let o = limited(&["unpack", s(&bundle), "--out", s(&out)], Some(MIB as u64));
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("c.bin"), "{err}");
    let staging = out.join(roundhouse::verify::pack::STAGING_DIR);
    assert!(!out.join("a.json").exists() && !out.join("b.bin").exists());
    assert!(staging.join("a.json").exists() && staging.join("b.bin").exists());
    assert!(!out.join("c.bin").exists() && !out.join("c.bin.tmp").exists());
    assert!(!staging.join("c.bin").exists() && !staging.join("c.bin.tmp").exists());
    assert!(!out.join("manifest.blake3.json").exists());
    // The rerun keeps the two verified files and finishes, leaving no
    // staging directory behind.
    let o = limited(&["unpack", s(&bundle), "--out", s(&out), "--json"], None);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["kept"], 2, "{}", text(&o));
    assert!(!staging.exists());
    for f in ["a.json", "b.bin", "c.bin", "manifest.blake3.json"] {
        assert_eq!(
            std::fs::read(d.join(f)).unwrap(),
            std::fs::read(out.join(f)).unwrap(),
            "{f}"
        );
    }
    let o = verify(&["check", s(&out)], &d);
    assert!(o.status.success(), "{}", text(&o));
}
