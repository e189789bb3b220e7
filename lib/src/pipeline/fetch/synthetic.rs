//! `synthetic:PRESET`: the generated checkpoint of [`crate::synthetic`],
//! written file by file (each a unit of the stage record), every shard
//! streamed into a temp file, fsynced and renamed; nothing is held in RAM
//! beyond a megabyte buffer per worker.

use std::io::{BufWriter, Write};

use super::{
    check_disk, parallel, FetchError, FetchOptions, Fetched, Filter, HashingWriter, Units,
};
use crate::fsutil;
use crate::synthetic::{self as gen, Planned, Spec};

enum Job {
    Meta(String, Vec<u8>),
    Shard(String, Vec<Planned>, u64),
}

impl Job {
    fn name(&self) -> &str {
        match self {
            Job::Meta(n, _) | Job::Shard(n, _, _) => n,
        }
    }
    fn size(&self) -> u64 {
        match self {
            Job::Meta(_, b) => b.len() as u64,
            Job::Shard(_, _, s) => *s,
        }
    }
}

/// Generates the preset into `units.out`.
pub(crate) fn fetch(
    opts: &FetchOptions,
    preset: &str,
    filter: &Filter,
    units: &Units,
) -> Result<Fetched, FetchError> {
    let spec = Spec::preset_with(preset, opts.layers, opts.experts, opts.seed)?;
    let mut jobs: Vec<Job> = spec
        .metadata_files()
        .into_iter()
        .map(|(n, b)| Job::Meta(n, b))
        .collect();
    for (name, tensors) in spec.shards() {
        let size = gen::safetensors_header(&tensors).len() as u64
            + tensors.iter().map(Planned::bytes).sum::<u64>();
        jobs.push(Job::Shard(name, tensors, size));
    }
    jobs.retain(|j| filter.wants(j.name()));
    let files: Vec<String> = jobs.iter().map(|j| j.name().to_string()).collect();
    let total: u64 = jobs.iter().map(Job::size).sum();
    let todo: Vec<Job> = jobs
        .into_iter()
        .filter(|j| !units.is_done(j.name()))
        .collect();
    let reused = files.len() - todo.len();
    let need: u64 = todo.iter().map(Job::size).sum();
    check_disk(&units.out, need)?;
    let bar = crate::cli::bytes_bar(total, &format!("synthetic:{preset}"), opts.quiet);
    bar.inc(total - need);
    let seed = spec.seed;
    parallel(todo, opts.concurrency, units, |job| {
        let target = units.out.join(job.name());
        units.claim(job.name())?;
        let mut hash = None;
        let mut written = 0;
        fsutil::write_atomic_with(&target, |f| {
            let mut w = HashingWriter::new(BufWriter::with_capacity(1 << 20, f), &bar);
            match &job {
                Job::Meta(_, bytes) => w.write_all(bytes)?,
                Job::Shard(_, tensors, _) => {
                    w.write_all(&gen::safetensors_header(tensors))?;
                    for t in tensors {
                        if units.aborted() {
                            return Err(std::io::Error::other("stopped"));
                        }
                        gen::write_tensor(&mut w, t, seed)?;
                    }
                }
            }
            w.flush()?;
            hash = Some(w.blake3.finalize().to_hex().to_string());
            written = w.written;
            Ok(())
        })?;
        if written != job.size() {
            return Err(FetchError::Invalid(format!(
                "{}: generated {written} bytes, planned {} (internal error)",
                target.display(),
                job.size()
            )));
        }
        tracing::debug!("wrote {}", target.display());
        units.done(job.name(), written, hash)
    })?;
    bar.finish_and_clear();
    Ok(Fetched {
        files,
        details: serde_json::json!({
            "kind": "synthetic",
            "preset": preset,
            "layers": spec.config["num_hidden_layers"],
            "seed": seed,
        }),
        commit: None,
        transferred: need,
        reused,
    })
}
