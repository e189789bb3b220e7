//! Chunked BLAKE3: each chunk of a file (a power of two of at least 1 KiB,
//! 64 MiB by default) is hashed on its own, in parallel, and the chunk
//! values are merged along BLAKE3's own tree into the ordinary whole-file
//! hash, so the per-file hash equals `b3sum`'s while a mismatch is located
//! to one chunk, and a check can hash any subset of chunks.
//!
//! A chunk value is the BLAKE3 chaining value of that subtree
//! (`blake3::hazmat`); for a file of one chunk or less it is the file's
//! hash itself. Files are read with `pread` into a small per-thread buffer,
//! never mapped, so a file truncated while it is checked gives an error,
//! not a SIGBUS.

use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};
use rayon::prelude::*;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use super::VerifyError;

/// Bytes read per `pread`.
const PIECE: usize = 4 << 20;

/// Number of chunks of a file of `size` bytes.
pub fn chunk_count(size: u64, chunk: u64) -> u64 {
    size.div_ceil(chunk)
}

/// Byte range of chunk `i`.
pub fn chunk_range(size: u64, chunk: u64, i: u64) -> (u64, u64) {
    let start = i * chunk;
    (start, (start + chunk).min(size))
}

/// Hashes chunk `index` of `file` (size `size`): a chaining value, or the
/// root hash when the file is a single chunk. `buf` is scratch space;
/// `progress` is called with the bytes read.
pub fn hash_chunk(
    path: &Path,
    file: &File,
    size: u64,
    chunk: u64,
    index: u64,
    buf: &mut [u8],
    progress: &(dyn Fn(u64) + Sync),
) -> Result<[u8; 32], VerifyError> {
    let (start, end) = chunk_range(size, chunk, index);
    let mut h = blake3::Hasher::new();
    h.set_input_offset(start);
    let mut off = start;
    while off < end {
        let want = ((end - off) as usize).min(buf.len());
        let n = file
            .read_at(&mut buf[..want], off)
            .map_err(|e| VerifyError::io(path, e))?;
        if n == 0 {
            return Err(VerifyError::Changed {
                path: path.to_path_buf(),
                reason: format!("ended at byte {off} while reading; expected {size} bytes"),
            });
        }
        h.update(&buf[..n]);
        off += n as u64;
        progress(n as u64);
    }
    Ok(if size <= chunk {
        *h.finalize().as_bytes()
    } else {
        h.finalize_non_root()
    })
}

fn subtree(cvs: &[ChainingValue], len: u64, chunk: u64) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let left = left_subtree_len(len);
    let n = (left / chunk) as usize;
    merge_subtrees_non_root(
        &subtree(&cvs[..n], left, chunk),
        &subtree(&cvs[n..], len - left, chunk),
        Mode::Hash,
    )
}

/// The whole-file BLAKE3 hash from all its chunk values (in order).
pub fn file_root(cvs: &[[u8; 32]], size: u64, chunk: u64) -> blake3::Hash {
    debug_assert_eq!(cvs.len() as u64, chunk_count(size, chunk));
    match cvs.len() {
        0 => blake3::hash(b""),
        1 => blake3::Hash::from_bytes(cvs[0]),
        _ => {
            let left = left_subtree_len(size);
            let n = (left / chunk) as usize;
            merge_subtrees_root(
                &subtree(&cvs[..n], left, chunk),
                &subtree(&cvs[n..], size - left, chunk),
                Mode::Hash,
            )
        }
    }
}

/// One file to hash: which chunks.
#[derive(Clone, Debug)]
pub struct Job {
    /// Path relative to the directory.
    pub path: String,
    /// Expected size (already checked by the caller).
    pub size: u64,
    /// Chunk indices to hash.
    pub chunks: Vec<u64>,
}

/// The chunk values computed for a job, in the job's chunk order.
#[derive(Clone, Debug)]
pub struct Hashed {
    /// Index of the job.
    pub job: usize,
    /// `(chunk index, value)`.
    pub cvs: Vec<(u64, [u8; 32])>,
}

struct State {
    remaining: usize,
    cvs: Vec<Option<[u8; 32]>>,
}

/// Hashes every chunk of every job in parallel (rayon, one 4 MiB buffer
/// per thread). `on_done` is called once per job as soon as all its chunks
/// are hashed (from a worker thread); an error from it or from reading
/// stops the run.
pub fn hash_jobs(
    dir: &Path,
    jobs: &[Job],
    chunk: u64,
    progress: &(dyn Fn(u64) + Sync),
    on_done: &(dyn Fn(Hashed) -> Result<(), VerifyError> + Sync),
) -> Result<(), VerifyError> {
    let states: Vec<Mutex<State>> = jobs
        .iter()
        .map(|j| {
            Mutex::new(State {
                remaining: j.chunks.len(),
                cvs: vec![None; j.chunks.len()],
            })
        })
        .collect();
    // Jobs with nothing to hash (empty files) are done at once.
    for (i, j) in jobs.iter().enumerate() {
        if j.chunks.is_empty() {
            on_done(Hashed {
                job: i,
                cvs: Vec::new(),
            })?;
        }
    }
    let tasks: Vec<(usize, usize)> = jobs
        .iter()
        .enumerate()
        .flat_map(|(i, j)| (0..j.chunks.len()).map(move |k| (i, k)))
        .collect();
    tasks.par_iter().with_max_len(1).try_for_each_init(
        || vec![0u8; PIECE],
        |buf, &(i, k)| {
            let job = &jobs[i];
            let path = dir.join(&job.path);
            let file = File::open(&path).map_err(|e| VerifyError::io(&path, e))?;
            let cv = hash_chunk(&path, &file, job.size, chunk, job.chunks[k], buf, progress)?;
            let finished = {
                let mut st = states[i].lock().expect("no panics while locked");
                st.cvs[k] = Some(cv);
                st.remaining -= 1;
                (st.remaining == 0).then(|| {
                    job.chunks
                        .iter()
                        .zip(&st.cvs)
                        .map(|(c, v)| (*c, v.expect("all hashed")))
                        .collect::<Vec<_>>()
                })
            };
            match finished {
                Some(cvs) => on_done(Hashed { job: i, cvs }),
                None => Ok(()),
            }
        },
    )
}

/// Hex of a 32-byte value.
pub fn hex(v: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*v).to_hex().to_string()
}

/// Parses 64 hex digits.
pub fn parse_hex(s: &str) -> Option<[u8; 32]> {
    blake3::Hash::from_hex(s).ok().map(|h| *h.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_of(data: &[u8], chunk: u64) -> blake3::Hash {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, data).unwrap();
        let f = File::open(&p).unwrap();
        let size = data.len() as u64;
        let mut buf = vec![0u8; 3000]; // smaller than a chunk: several reads
        let cvs: Vec<[u8; 32]> = (0..chunk_count(size, chunk))
            .map(|i| hash_chunk(&p, &f, size, chunk, i, &mut buf, &|_| {}).unwrap())
            .collect();
        file_root(&cvs, size, chunk)
    }

    #[test]
    fn merged_chunks_equal_plain_blake3() {
        let data: Vec<u8> = (0..70_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for chunk in [1024u64, 2048, 4096, 65536, 1 << 20] {
            for len in [
                0usize, 1, 1023, 1024, 1025, 2048, 3000, 4096, 5000, 8193, 65536, 70_000,
            ] {
                assert_eq!(
                    root_of(&data[..len], chunk),
                    blake3::hash(&data[..len]),
                    "chunk {chunk} len {len}"
                );
            }
        }
    }

    #[test]
    fn parallel_jobs_report_every_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![1u8; 10_000]).unwrap();
        std::fs::write(dir.path().join("b"), b"").unwrap();
        let jobs = vec![
            Job {
                path: "a".into(),
                size: 10_000,
                chunks: (0..chunk_count(10_000, 1024)).collect(),
            },
            Job {
                path: "b".into(),
                size: 0,
                chunks: vec![],
            },
        ];
        let got = Mutex::new(Vec::new());
        hash_jobs(dir.path(), &jobs, 1024, &|_| {}, &|h| {
            got.lock().unwrap().push(h);
            Ok(())
        })
        .unwrap();
        let mut got = got.into_inner().unwrap();
        got.sort_by_key(|h| h.job);
        assert_eq!(got.len(), 2);
        let cvs: Vec<[u8; 32]> = got[0].cvs.iter().map(|c| c.1).collect();
        assert_eq!(file_root(&cvs, 10_000, 1024), blake3::hash(&[1u8; 10_000]));
    }
}
