//! `rh-fetch`: get the model checkpoint (hub, local dir, or synthetic) into
//! the work dir, resumably and verified. Logic lives in `roundhouse::fetch`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use roundhouse::cli::{self, CliError, Verbosity};
use roundhouse::fetch::{self, hf_cache, FetchOptions};
use roundhouse::pipeline::Pipeline;

/// Fetch a checkpoint: `hf:OWNER/NAME[@REV]` (or `OWNER/NAME`) from the
/// Hugging Face hub (through the HF cache), `dir:PATH` from this machine, or
/// `synthetic:tiny` / `synthetic:qwen3-next-80b` generated locally; or a
/// published verified cache (`--expect HASH`) from the hub or a URL. Resumes interrupted runs;
/// says "up to date" when there is nothing to do.
#[derive(Parser, Debug)]
#[command(
    name = "rh-fetch",
    version,
    after_help = "Examples:\n  \
      rh-fetch                                  the pipeline's source (pipeline.toml) into its work dir\n  \
      rh-fetch hf:Intel/Qwen3-Next-80B-A3B-Thinking-int4-mixed-AutoRound --out ckpt\n  \
      rh-fetch hf:ORG/MODEL --no-hf-cache --out ckpt   files of its own instead of links into the HF cache\n  \
      rh-fetch dir:/models/qwen3-next --out ckpt   a checkpoint already on this machine\n  \
      rh-fetch synthetic:tiny --out tiny        the built-in demo model\n  \
      rh-fetch hf:ORG/CACHE --expect HASH       a published verified cache, into the pipeline's cache dir\n  \
      rh-fetch https://host/path/ --expect HASH --out cache   the same from any static HTTP server"
)]
struct Args {
    /// Model source (default: `[model] source` of the manifest).
    source: Option<String>,
    /// Pipeline manifest (default: ./pipeline.toml when present).
    #[arg(long)]
    pipeline: Option<PathBuf>,
    /// Hub revision: branch, tag or commit (default `main`).
    #[arg(long)]
    revision: Option<String>,
    /// Checkpoint directory to write (default `<work_dir>/checkpoint`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Work directory for the stage record (default `[model] work_dir`, or
    /// `<out>/.rh` when only --out is given).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Only files matching these globs (repeatable).
    #[arg(long)]
    include: Vec<String>,
    /// Skip files matching these globs (repeatable).
    #[arg(long)]
    exclude: Vec<String>,
    /// Files transferred at once (default 4).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Use only files already in the HF cache.
    #[arg(long)]
    offline: bool,
    /// Synthetic sources: number of layers.
    #[arg(long)]
    layers: Option<usize>,
    /// Synthetic sources: routed experts per layer (top-k and every shape
    /// stay; e.g. 64 with all 48 layers for the real per-token reads).
    #[arg(long)]
    experts: Option<usize>,
    /// Synthetic sources: random seed (default 0).
    #[arg(long)]
    seed: Option<u64>,
    /// Hub base URL.
    #[arg(long, env = "HF_ENDPOINT", default_value = fetch::DEFAULT_ENDPOINT)]
    endpoint: String,
    /// The Hugging Face cache that hf: sources use by default (files found
    /// there are not downloaded again; downloads are stored there, and the
    /// checkpoint links to them): `--hf-cache=DIR`, else HF_HUB_CACHE, else
    /// HF_HOME/hub, else ~/.cache/huggingface/hub.
    #[arg(long, value_name = "DIR", num_args = 0..=1, require_equals = true)]
    hf_cache: Option<Option<PathBuf>>,
    /// Keep the checkpoint's own copy of every file instead of the HF cache
    /// (what rh-fetch did before the cache became the default).
    #[arg(long, conflicts_with = "hf_cache")]
    no_hf_cache: bool,
    /// Use the HF cache (and token file) under this HF_HOME
    /// (`--hf-cache=DIR` still names the cache).
    #[arg(long)]
    hf_home: Option<PathBuf>,
    /// A published verified cache: the BLAKE3 of its manifest, as its
    /// publisher shared it (`rh-verify` prints it). Required for
    /// https://HOST/PATH/ sources; turns hf:ORG/REPO into one.
    #[arg(long, value_name = "HASH")]
    expect: Option<String>,
    /// Redo the stage even when it is up to date.
    #[arg(long)]
    force: bool,
    /// Retries of a failing request (reset whenever a retry made progress).
    #[arg(long, default_value_t = 6)]
    retries: u32,
    /// Seconds a stalled read waits before the connection counts as dropped.
    #[arg(long, default_value_t = 60.0)]
    read_timeout: f64,
    /// Bytes per chunk of the received-bytes record and of repairs (tests
    /// use small ones).
    #[arg(long, hide = true, default_value_t = fetch::part::DEFAULT_CHUNK)]
    chunk_size: u64,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// More logs (-v, -vv).
    #[arg(short, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Errors only, no progress bars.
    #[arg(short, long)]
    quiet: bool,
}

fn body(a: Args) -> Result<(), CliError> {
    let verbosity = Verbosity {
        verbose: a.verbose,
        quiet: a.quiet,
    };
    cli::init_logging(&verbosity);
    // After the logs, so a bad RH_HEAP is reported (roundhouse::heap).
    roundhouse::heap::tune();
    let p = Pipeline::discover(a.pipeline.as_deref())?;
    let manifest_work = p.model.work_dir.is_some();
    let out = a.out.clone().unwrap_or_else(|| p.checkpoint_dir());
    let work_dir = match (&a.work_dir, &a.out) {
        (Some(w), _) => w.clone(),
        (None, Some(o)) if !manifest_work && p.file.is_none() => o.join(".rh"),
        _ => p.work_dir(),
    };
    if a.read_timeout.is_nan() || a.read_timeout <= 0.0 {
        return Err(CliError::usage("--read-timeout must be positive"));
    }
    // --hf-cache=DIR > --hf-home > HF_HUB_CACHE > HF_HOME/hub > ~/.cache;
    // --no-hf-cache: none (--offline still reads the default one).
    let hf_cache = match (&a.hf_cache, &a.hf_home) {
        _ if a.no_hf_cache => None,
        (Some(Some(dir)), _) => Some(dir.clone()),
        (_, Some(h)) => Some(h.join("hub")),
        (_, None) => Some(hf_cache::default_hub_cache()),
    };
    let source = a.source.clone().unwrap_or_else(|| p.source());
    // --revision, else `@REV` in the source, else `[model] revision`.
    let revision = a.revision.clone().or_else(|| {
        if source.contains('@') {
            None
        } else {
            p.model.revision.clone()
        }
    });
    let opts = FetchOptions {
        source,
        revision,
        work_dir,
        out,
        include: if a.include.is_empty() {
            p.fetch.include.clone().unwrap_or_default()
        } else {
            a.include.clone()
        },
        exclude: if a.exclude.is_empty() {
            p.fetch.exclude.clone().unwrap_or_default()
        } else {
            a.exclude.clone()
        },
        concurrency: a.concurrency.or(p.fetch.concurrency).unwrap_or(4),
        offline: a.offline || p.fetch.offline.unwrap_or(false),
        layers: a.layers.or(p.fetch.layers),
        experts: a.experts.or(p.fetch.experts),
        seed: a.seed.or(p.fetch.seed).unwrap_or(0),
        endpoint: a.endpoint.clone(),
        token: hf_cache::token_with_home(a.hf_home.as_deref()),
        hf_cache,
        force: a.force,
        quiet: a.quiet,
        retries: a.retries,
        read_timeout: Duration::from_secs_f64(a.read_timeout),
        chunk_size: a.chunk_size,
        expect: a.expect.clone(),
        // A published cache goes to --out, else to the pipeline's cache.
        cache_out: if a.out.is_some() {
            None
        } else {
            Some(p.cache_dir())
        },
    };
    let summary = fetch::run(&opts)?;
    if a.json {
        println!("{}", summary.to_json());
    } else if !a.quiet || summary.up_to_date {
        println!("rh-fetch: {}", summary.describe());
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    cli::main_with("rh-fetch", || body(args))
}
