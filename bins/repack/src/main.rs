//! `rh-repack`: converts a safetensors checkpoint (AutoRound int4/int8 or
//! float) into a zero-copy cache (`docs/cache-format.md`). Thin wrapper over
//! `roundhouse::cache::repack`.
//!
//! Test hook: with `RH_REPACK_ABORT_AFTER_UNITS=N` the process aborts (as if
//! killed) right after recording its N-th tensor group, so tests can check
//! that the next run resumes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Parser};
use roundhouse::cache::{repack, CacheError, RepackFlags, RepackOptions};
use roundhouse::cli::{self, human_bytes, CliError, Verbosity};
use roundhouse::pipeline::Pipeline;

/// Repack a checkpoint into a memory-mappable cache in the kernels' layout.
#[derive(Parser, Debug)]
#[command(
    name = "rh-repack",
    version,
    after_help = "Examples:\n  \
      rh-repack                                 the pipeline's checkpoint into its cache (pipeline.toml)\n  \
      rh-repack ckpt cache                      checkpoint directory CKPT into cache directory CACHE\n  \
      rh-repack ckpt cache --threads 8 -q       fixed thread count, no progress bar"
)]
struct Args {
    /// Input checkpoint directory [default: `[repack] checkpoint`, else
    /// fetch's output, which must be complete].
    checkpoint: Option<PathBuf>,
    /// Output cache directory [default: `[repack] cache`, else `<work_dir>/cache`].
    cache: Option<PathBuf>,
    /// Pipeline manifest [default: ./pipeline.toml when present].
    #[arg(long)]
    pipeline: Option<PathBuf>,
    /// Largest cache data file in MiB [default: 2048].
    #[arg(long)]
    file_size_mib: Option<u64>,
    /// Worker threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Redo the repack even when the cache is up to date.
    #[arg(long)]
    force: bool,
    /// Skip the free-space check made before writing (the estimate is
    /// exact for the data files; a filesystem that compresses may need less).
    #[arg(long)]
    no_space_check: bool,
    /// How to store a float lm_head: `as-is` (default) or `int8` (per group
    /// of 128, symmetric: half the bytes of BF16 on the biggest read of
    /// every decoded token; lossy, opt-in).
    #[arg(long, value_name = "as-is|int8")]
    lm_head: Option<String>,
    /// Print the outcome as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// More logs (-v info, -vv debug).
    #[arg(short, long, action = ArgAction::Count)]
    verbose: u8,
    /// Errors only, no progress bar.
    #[arg(short, long)]
    quiet: bool,
}

fn run(args: Args) -> Result<(), CliError> {
    cli::init_logging(&Verbosity {
        verbose: args.verbose,
        quiet: args.quiet,
    });
    // After the logs, so a bad RH_HEAP is reported (roundhouse::heap).
    roundhouse::heap::tune();
    let p = Pipeline::discover(args.pipeline.as_deref())?;
    let opts = RepackOptions::resolve(
        &RepackFlags {
            checkpoint: args.checkpoint,
            cache: args.cache,
            file_size_mib: args.file_size_mib,
            threads: args.threads,
            lm_head: args.lm_head,
            force: args.force,
            quiet: args.quiet,
            no_space_check: args.no_space_check,
        },
        &p,
    )?;
    let out = match repack(&opts) {
        Err(CacheError::Stopped(_)) => std::process::abort(),
        r => r?,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&out).expect("outcome serializes")
        );
    } else if out.up_to_date {
        println!(
            "rh-repack: {} is up to date ({} tensors in {} files, {}); --force to redo",
            out.cache.display(),
            out.tensors,
            out.files,
            human_bytes(out.bytes)
        );
    } else if !args.quiet {
        println!(
            "rh-repack: wrote {}: {} tensors in {} files, {} in {:.1} s{}",
            out.cache.display(),
            out.tensors,
            out.files,
            human_bytes(out.bytes),
            out.seconds,
            if out.resumed {
                " (resumed an interrupted run)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    cli::main_with("rh-repack", || run(args))
}
