//! `rh-inspect`: probe this machine, size the model and write the strategy
//! serve and bench use. Logic lives in `roundhouse::inspect`.

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

use roundhouse::cli::{self, CliError, Verbosity};
use roundhouse::inspect::{self, InspectFlags, InspectOptions};
use roundhouse::pipeline::Pipeline;

/// Probe the machine (cores, SIMD, RAM, disk, GPUs, memory bandwidth),
/// size the model and write `strategy.toml`: threads, kernel, mmap/mlock,
/// GPU placement and the expected decode speed, each with its reason.
#[derive(Parser, Debug)]
#[command(
    name = "rh-inspect",
    version,
    after_help = "Examples:\n  \
      rh-inspect                                probe this machine, size the pipeline's model, write the strategy\n  \
      rh-inspect work/cache                     size this model (a cache or a checkpoint directory)\n  \
      rh-inspect --dry-run                      print the strategy, write nothing"
)]
struct Args {
    /// The model to size (a cache or checkpoint directory). Default: the
    /// pipeline's checkpoint, else its cache.
    model: Option<PathBuf>,
    /// Pipeline manifest (default: ./pipeline.toml when present).
    #[arg(long)]
    pipeline: Option<PathBuf>,
    /// Where to write the strategy (default: [inspect] out, else <work_dir>/strategy.toml).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seconds spent on the memory-bandwidth probe (0 skips it).
    #[arg(long)]
    probe_seconds: Option<f64>,
    /// Force a thread count instead of the probed choice.
    #[arg(long)]
    threads: Option<usize>,
    /// Explain the decision without writing anything.
    #[arg(long)]
    dry_run: bool,
    /// Probe and write again even when up to date.
    #[arg(long)]
    force: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// More logs (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Errors only.
    #[arg(short, long)]
    quiet: bool,
}

fn run(a: Args) -> Result<(), CliError> {
    cli::init_logging(&Verbosity {
        verbose: a.verbose,
        quiet: a.quiet,
    });
    // After the logs, so a bad RH_HEAP is reported (roundhouse::heap).
    roundhouse::heap::tune();
    let mut p = Pipeline::discover(a.pipeline.as_deref())?;
    if let Some(out) = a.out {
        // A flag path is relative to the current directory, not the manifest.
        p.inspect.out = Some(std::path::absolute(&out).unwrap_or(out));
    }
    if let Some(m) = a.model {
        p.inspect.model = Some(std::path::absolute(&m).unwrap_or(m));
    }
    let o = InspectOptions::resolve(
        &InspectFlags {
            probe_seconds: a.probe_seconds,
            threads: a.threads,
            dry_run: a.dry_run,
            force: a.force,
        },
        &p,
    )?;
    let report = inspect::run(&p, &o)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serializes")
        );
    } else if a.quiet {
        // -q: the strategy file is the output.
    } else {
        print!("{}", report.human());
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    cli::main_with("rh-inspect", || run(args))
}
