//! Round trips (checkpoint -> cache -> weights, bit for bit), resumption and
//! damaged caches.

use std::path::{Path, PathBuf};

use super::format::{Payload, INDEX_FILE};
use super::*;
use crate::checkpoint::Checkpoint;
use crate::tensor::{Matrix, Zeros};
use crate::weights::{WeightSource, AUX_FILES};

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/reference")
        .join(case)
        .join("quant")
}

fn tiny(dir: &Path, layers: usize) {
    crate::synthetic::write_test_checkpoint("tiny", layers, 3, dir);
}

fn opts(ck: &Path, work: &Path, file_size: u64) -> RepackOptions {
    RepackOptions {
        skip_space_check: false,
        file_size,
        ..super::write::test_options(ck, &work.join("cache"), work)
    }
}

fn bytes_eq(a: &crate::tensor::Bytes, b: &crate::tensor::Bytes) -> bool {
    a.as_slice() == b.as_slice()
}

/// Every weight the checkpoint gives, the cache gives bit for bit, mapped.
fn assert_same_weights(ck: &Checkpoint, cache: &Cache) {
    for name in ck.tensors.keys() {
        assert!(cache.contains(name), "cache lacks {name}");
    }
    let mut quant = 0;
    for e in &cache.index().tensors {
        match &e.payload {
            Payload::Quant { .. } => {
                quant += 1;
                let (r, c) = (e.shape[0] as usize, e.shape[1] as usize);
                let (Matrix::Quant(a), Matrix::Quant(b)) = (
                    ck.matrix(&e.name, r, c).unwrap(),
                    cache.matrix(&e.name, r, c).unwrap(),
                ) else {
                    panic!("{}: not quantized in both", e.name)
                };
                assert!(Matrix::Quant(b.clone()).is_mapped(), "{}", e.name);
                assert_eq!((a.bits, a.group_size), (b.bits, b.group_size), "{}", e.name);
                assert!(bytes_eq(&a.qdata, &b.qdata), "{} qdata", e.name);
                assert!(bytes_eq(&a.scales, &b.scales), "{} scales", e.name);
                match (&a.zeros, &b.zeros) {
                    (Zeros::Symmetric, Zeros::Symmetric) => {}
                    (Zeros::PerGroup(x), Zeros::PerGroup(y)) => assert!(bytes_eq(x, y)),
                    _ => panic!("{}: zeros kind differs", e.name),
                }
            }
            Payload::Dense { .. } => {
                let shape: Vec<usize> = e.shape.iter().map(|&d| d as usize).collect();
                let a = ck.vector(&e.name, &shape).unwrap();
                let b = cache.vector(&e.name, &shape).unwrap();
                assert!(
                    a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{}",
                    e.name
                );
                if let (Some(m), [r, c]) = (e.name.strip_suffix(".weight"), &shape[..]) {
                    let (Matrix::Dense(x), Matrix::Dense(y)) = (
                        ck.matrix(m, *r, *c).unwrap(),
                        cache.matrix(m, *r, *c).unwrap(),
                    ) else {
                        panic!("{m}: not dense in both")
                    };
                    assert_eq!(x.dtype, y.dtype);
                    assert!(bytes_eq(&x.data, &y.data), "{m}");
                    assert!(y.data.is_mapped(), "{m}");
                }
            }
            Payload::Raw { .. } => {}
        }
    }
    assert!(quant > 0);
    for name in AUX_FILES.iter().chain(&["config.json"]) {
        assert_eq!(ck.aux_file(name), cache.aux_file(name), "{name}");
    }
}

#[test]
fn fixtures_round_trip_bit_for_bit() {
    for case in ["gs32", "gs128"] {
        let work = tempfile::tempdir().unwrap();
        // Small files so tensors spread over several data files.
        let out = repack(&opts(&fixture(case), work.path(), 256 << 10)).unwrap();
        assert!(!out.up_to_date && out.files > 1, "{case}: {out:?}");
        assert!(is_cache(&out.cache));
        let cache = Cache::open(&out.cache).unwrap();
        let ck = Checkpoint::open(&fixture(case)).unwrap();
        assert_same_weights(&ck, &cache);
        // An open cache holds a shared lock that excludes writers.
        let e = repack(&opts(&fixture(case), work.path(), 256 << 10)).unwrap_err();
        assert!(e.to_string().contains("in use by a reader"), "{e}");
        drop(cache);
        // Unchanged input: up to date, nothing rewritten.
        let again = repack(&opts(&fixture(case), work.path(), 256 << 10)).unwrap();
        assert!(again.up_to_date, "{case}");
        assert_eq!(again.index_blake3, out.index_blake3);
    }
}

#[test]
fn int8_lm_head_is_within_half_a_step_and_redone_when_asked() {
    let work = tempfile::tempdir().unwrap();
    let plain = repack(&opts(&fixture("gs32"), work.path(), 256 << 10)).unwrap();
    let mut o = opts(&fixture("gs32"), work.path(), 256 << 10);
    o.lm_head_int8 = true;
    // A different setting: not up to date, rewritten.
    let out = repack(&o).unwrap();
    assert!(!out.up_to_date);
    assert_ne!(out.index_blake3, plain.index_blake3);
    let cache = Cache::open(&out.cache).unwrap();
    let ck = Checkpoint::open(&fixture("gs32")).unwrap();
    let (rows, cols) = (ck.config().vocab_size, ck.config().hidden_size);
    let q = cache.matrix("lm_head", rows, cols).unwrap();
    let d = ck.matrix("lm_head", rows, cols).unwrap();
    let Matrix::Quant(qm) = &q else {
        panic!("lm_head is not quantized")
    };
    assert_eq!((qm.bits, qm.group_size), (8, write::LM_HEAD_GROUP));
    assert!(matches!(qm.zeros, Zeros::Symmetric));
    let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
    for r in 0..rows {
        crate::kernels::scalar::row(&q, r, &mut a);
        crate::kernels::scalar::row(&d, r, &mut b);
        for (g, (ag, bg)) in a
            .chunks(write::LM_HEAD_GROUP)
            .zip(b.chunks(write::LM_HEAD_GROUP))
            .enumerate()
        {
            let amax = bg.iter().fold(0f32, |m, v| m.max(v.abs()));
            // Half a step of the f16-rounded scale, plus that rounding.
            let tol = amax / 127.0 * 0.51 + 1e-7;
            for (x, y) in ag.iter().zip(bg) {
                assert!((x - y).abs() <= tol, "row {r} group {g}: {x} vs {y}");
            }
        }
    }
    // Every other tensor is still the checkpoint's, bit for bit.
    let e = cache
        .index()
        .tensors
        .iter()
        .find(|t| t.name == "lm_head")
        .unwrap();
    assert!(matches!(e.payload, Payload::Quant { bits: 8, .. }));
    assert!(!cache
        .index()
        .tensors
        .iter()
        .any(|t| t.name == "lm_head.weight"));
    // An open cache holds a reader's lock, which a repack into it refuses.
    drop(q);
    drop(cache);
    let again = repack(&o).unwrap();
    assert!(again.up_to_date);
}

fn dir_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
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

#[test]
fn synthetic_round_trip_and_resume_is_byte_identical() {
    let ckd = tempfile::tempdir().unwrap();
    tiny(ckd.path(), 2);
    let ck = Checkpoint::open(ckd.path()).unwrap();
    let a = tempfile::tempdir().unwrap();
    let full = repack(&opts(ckd.path(), a.path(), 16 << 20)).unwrap();
    let cache = Cache::open(&full.cache).unwrap();
    assert_same_weights(&ck, &cache);
    drop(cache);

    // Stopped after each of the first groups, then resumed: same bytes.
    let b = tempfile::tempdir().unwrap();
    let mut o = opts(ckd.path(), b.path(), 16 << 20);
    for n in [1, 2] {
        o.stop_after_units = Some(n);
        let e = repack(&o).unwrap_err();
        assert!(matches!(e, CacheError::Stopped(_)), "{e}");
        assert!(!is_cache(&o.cache));
    }
    o.stop_after_units = None;
    let resumed = repack(&o).unwrap();
    assert!(resumed.resumed);
    assert_eq!(dir_bytes(&full.cache), dir_bytes(&resumed.cache));

    // A half-written group after the last recorded one is cut off.
    let c = tempfile::tempdir().unwrap();
    let mut o = opts(ckd.path(), c.path(), 16 << 20);
    o.stop_after_units = Some(1);
    repack(&o).unwrap_err();
    let tmp = std::fs::read_dir(&o.cache)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .unwrap()
        .path();
    let mut f = std::fs::OpenOptions::new().append(true).open(&tmp).unwrap();
    std::io::Write::write_all(&mut f, &[0xAB; 1000]).unwrap();
    drop(f);
    o.stop_after_units = None;
    repack(&o).unwrap();
    assert_eq!(dir_bytes(&full.cache), dir_bytes(&o.cache));
}

fn error_of(dir: &Path) -> String {
    match Cache::open(dir) {
        Ok(_) => panic!("damaged cache opened"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn damaged_caches_are_clear_errors() {
    let work = tempfile::tempdir().unwrap();
    let out = repack(&opts(&fixture("gs32"), work.path(), 256 << 10)).unwrap();
    let good = out.cache;
    let copy = |tag: &str| {
        let d = work.path().join(tag);
        std::fs::create_dir_all(&d).unwrap();
        for (n, b) in dir_bytes(&good) {
            std::fs::write(d.join(n), b).unwrap();
        }
        d
    };
    let idx = |d: &Path| d.join(INDEX_FILE);

    // Bad magic.
    let d = copy("magic");
    let mut b = std::fs::read(idx(&d)).unwrap();
    b[0] = b'X';
    std::fs::write(idx(&d), &b).unwrap();
    let e = error_of(&d);
    assert!(e.contains("index.rhc") && e.contains("magic"), "{e}");
    // It still claims to be a cache, so opening it as a model reports the
    // index, not a missing config.json.
    assert!(is_cache(&d));

    // Another format version.
    let d = copy("version");
    let mut b = std::fs::read(idx(&d)).unwrap();
    b[8] = 9;
    std::fs::write(idx(&d), &b).unwrap();
    let e = error_of(&d);
    assert!(e.contains("version 9") && e.contains("rh-repack"), "{e}");

    // A flipped index byte: the hash catches it.
    let d = copy("flip");
    let mut b = std::fs::read(idx(&d)).unwrap();
    let n = b.len();
    b[n / 2] ^= 1;
    std::fs::write(idx(&d), &b).unwrap();
    let e = error_of(&d);
    assert!(e.contains("index.rhc") && e.contains("blake3"), "{e}");

    // Truncated index.
    let d = copy("trunc-index");
    let b = std::fs::read(idx(&d)).unwrap();
    std::fs::write(idx(&d), &b[..b.len() - 10]).unwrap();
    let e = error_of(&d);
    assert!(e.contains("truncated"), "{e}");

    // An index whose offsets point past the end, with a consistent hash:
    // validation catches it, not a panic or SIGBUS.
    let d = copy("offset");
    let (_, mut index) = read::read_index(&d).unwrap();
    if let Payload::Dense { data, .. } | Payload::Raw { data, .. } =
        &mut index.tensors.last_mut().unwrap().payload
    {
        data.offset += 1 << 20;
    } else if let Payload::Quant { qdata, .. } = &mut index.tensors.last_mut().unwrap().payload {
        qdata.offset += 1 << 20;
    }
    let bytes = index.to_bytes();
    let h = format::IndexHeader {
        version: FORMAT_VERSION,
        index_offset: 64,
        index_len: bytes.len() as u64,
        index_hash: *blake3::hash(&bytes).as_bytes(),
    };
    let mut f = h.encode().to_vec();
    f.extend_from_slice(&bytes);
    std::fs::write(idx(&d), &f).unwrap();
    let e = error_of(&d);
    assert!(e.contains("index.rhc") && e.contains("out of range"), "{e}");

    // Garbage archive with a matching hash: bytecheck refuses it.
    let d = copy("garbage");
    let junk = vec![0xFFu8; 256];
    let h = format::IndexHeader {
        version: FORMAT_VERSION,
        index_offset: 64,
        index_len: junk.len() as u64,
        index_hash: *blake3::hash(&junk).as_bytes(),
    };
    let mut f = h.encode().to_vec();
    f.extend_from_slice(&junk);
    std::fs::write(idx(&d), &f).unwrap();
    let e = error_of(&d);
    assert!(e.contains("index does not validate"), "{e}");

    // A truncated data file: refused before mapping.
    let d = copy("trunc-data");
    let data = d.join(format::data_file_name(1));
    let b = std::fs::read(&data).unwrap();
    std::fs::write(&data, &b[..b.len() - 1]).unwrap();
    let e = error_of(&d);
    assert!(
        e.contains("data-00002.rhd") && e.contains("truncated"),
        "{e}"
    );

    // A missing data file.
    let d = copy("missing");
    std::fs::remove_file(d.join(format::data_file_name(0))).unwrap();
    let e = error_of(&d);
    assert!(e.contains("data-00001.rhd"), "{e}");

    // Data files swapped between positions: the header says so.
    let d = copy("swap");
    let (a, b) = (
        d.join(format::data_file_name(0)),
        d.join(format::data_file_name(1)),
    );
    let (ba, bb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    if ba.len() == bb.len() {
        std::fs::write(&a, &bb).unwrap();
        std::fs::write(&b, &ba).unwrap();
        let e = error_of(&d);
        assert!(e.contains("data-0000"), "{e}");
    }

    // Not a cache at all.
    let e = error_of(&fixture("gs32"));
    assert!(e.contains("not a roundhouse cache"), "{e}");

    // Errors from the good cache's weight source name the tensor.
    let cache = Cache::open(&good).unwrap();
    let e = cache
        .matrix("model.layers.0.nope", 4, 4)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.layers.0.nope"), "{e}");
}
