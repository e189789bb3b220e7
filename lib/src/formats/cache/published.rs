//! The repack stage after rh-fetch got a published, verified cache: there is
//! nothing to repack. Lives with the cache (not in `fetch`) so that the
//! cache never imports the pipeline stage that downloads it; fetch writes
//! the record kind defined here.

use std::path::PathBuf;
use std::time::Instant;

use super::write::{RepackOptions, RepackOutcome};
use super::CacheError;
use crate::fsutil;
use crate::stage::{self, Fingerprint, Plan, StageRecord};

const INDEX: &str = super::format::INDEX_FILE;

/// The `kind` rh-fetch writes into its stage record when it fetched a
/// published cache rather than a checkpoint.
pub const KIND: &str = "cache";

/// Whether a fetch record is that of a published cache.
pub fn is_published(rec: &StageRecord) -> bool {
    rec.details.get("kind").and_then(|k| k.as_str()) == Some(KIND)
}

/// rh-repack after rh-fetch got a published cache: there is no checkpoint
/// to repack, the cache is already there and was checked chunk by chunk.
/// Records the repack stage as complete with the reason (so `make` and
/// `rh-verify` go on), or refuses when the cache went elsewhere.
pub fn skip_repack(
    opts: &RepackOptions,
    fetch: &StageRecord,
    t0: Instant,
) -> Result<RepackOutcome, CacheError> {
    let fetched = PathBuf::from(&fetch.output_dir);
    let hash = fetch
        .details
        .get("manifest_blake3")
        .and_then(|h| h.as_str())
        .unwrap_or_default()
        .to_string();
    if fetched != opts.cache {
        return Err(CacheError::Input(format!(
            "{}: rh-fetch got a published cache (manifest {hash}) into {}, ready to serve; nothing to repack: serve that directory or set [repack] cache to it",
            opts.cache.display(),
            fetched.display()
        )));
    }
    let _lock = fsutil::DirLock::shared(&opts.cache)?;
    let cache = crate::cache::Cache::open_unlocked(&opts.cache)?;
    let index = cache.index();
    let bytes: u64 = index.files.iter().map(|f| f.size).sum();
    let index_blake3 = fsutil::blake3_file(&opts.cache.join(INDEX))?
        .to_hex()
        .to_string();
    let mut fp = Fingerprint::new();
    fp.add_record(fetch).add("published", &hash);
    let inputs = [("published_cache".to_string(), fetch.output_dir.clone())].into();
    // Reported as up to date: the cache is complete, and nothing was written.
    if let Plan::Run(run) = stage::plan(
        &opts.work_dir,
        "repack",
        &fp.finish(),
        &opts.cache,
        inputs,
        opts.force,
    )? {
        run.finish(
                fetch.outputs.clone(),
                serde_json::json!({
                    "skipped": format!("rh-fetch downloaded a published cache and checked every chunk against manifest {hash}: there is no checkpoint to repack"),
                    "published_manifest": hash,
                    "files": index.files.len(),
                    "tensors": index.tensors.len(),
                    "bytes": bytes,
                    "index_blake3": index_blake3,
                }),
            )?;
    }
    tracing::info!(
        "{}: a published cache fetched with manifest {hash}; nothing to repack",
        opts.cache.display()
    );
    Ok(RepackOutcome {
        up_to_date: true,
        resumed: false,
        cache: opts.cache.clone(),
        files: index.files.len(),
        tensors: index.tensors.len(),
        bytes,
        index_blake3,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
