//! `rh-bench`: measuring modes over a model directory.
//!
//! * `rh-bench [MODEL] [-p N] [-n N] [-r N]` (no mode): speed, pp/tg in
//!   llama-bench's table ([`speed`]); `--plot FILE.svg` draws it ([`plot`]).
//! * `rh-bench kernels`: kernel GB/s and GFLOP/s on the real model's shapes
//!   ([`kernels`]).
//! * `rh-bench logits MODEL --ids 1,2,3 --out FILE.safetensors [--step]`:
//!   logits at every position (tensor `logits`, F32 `[T, vocab]`).
//! * `rh-bench perplexity MODEL --text FILE [--ctx N]`: perplexity like
//!   llama-perplexity.
//! * `rh-bench http --url URL [--clients N]`: streaming clients against
//!   `rh-serve --listen` ([`http`]).
//!
//! Each mode is one variant of [`Mode`] with its own argument struct; the
//! logic is in the library (`roundhouse::evaluate`, `speedbench`,
//! `kernels::bench`).

mod http;
mod kernels;
mod paging;
mod paging_report;
mod plot;
mod speed;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use roundhouse::cli::{self, CliError, Verbosity};
use roundhouse::evaluate;
use roundhouse::pipeline::Pipeline;

/// Benchmarks and measurements of the Roundhouse engine.
#[derive(Parser, Debug)]
#[command(
    name = "rh-bench",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Pipeline manifest (default ./pipeline.toml when present).
    #[arg(long, global = true, value_name = "FILE")]
    pipeline: Option<PathBuf>,
    /// More logging (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// The measuring mode; without one, the speed benchmark runs.
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Flags of the default speed benchmark.
    #[command(flatten)]
    speed: speed::SpeedArgs,
}

/// Measuring modes.
#[derive(Subcommand, Debug)]
enum Mode {
    /// Kernel throughput on the real model's shapes vs the memory bandwidth.
    Kernels(kernels::KernelArgs),
    /// Logits at every position of the given ids, written as safetensors.
    Logits(LogitsArgs),
    /// Perplexity over a text file (llama-perplexity style).
    Perplexity(PerplexityArgs),
    /// Streaming clients against `rh-serve --listen` (TTFT, decode, load).
    Http(http::HttpArgs),
}

/// `rh-bench logits`.
#[derive(Args, Debug)]
struct LogitsArgs {
    /// Model directory (default: `[bench] model` from the manifest).
    model: Option<PathBuf>,
    /// Comma-separated token ids.
    #[arg(long, value_name = "1,2,3")]
    ids: String,
    /// Output file (tensor `logits`, F32 [T, vocab]).
    #[arg(long, value_name = "FILE.safetensors")]
    out: PathBuf,
    /// Feed the ids one at a time through the decode path instead of one prefill.
    #[arg(long)]
    step: bool,
}

/// `rh-bench perplexity`.
#[derive(Args, Debug)]
struct PerplexityArgs {
    /// Model directory (default: `[bench] model` from the manifest).
    model: Option<PathBuf>,
    /// Text file to score.
    #[arg(long, value_name = "FILE")]
    text: PathBuf,
    /// Tokens per chunk; the second half of each chunk is scored.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Score at most this many chunks (0 = all).
    #[arg(long, default_value_t = 0)]
    chunks: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The model directory: the flag, else the manifest's `[bench] model`.
fn model_dir(flag: Option<&Path>, p: &Pipeline) -> Result<PathBuf, CliError> {
    match (flag, &p.bench.model) {
        (Some(m), _) => Ok(m.to_path_buf()),
        (None, Some(m)) => Ok(p.path(m)),
        (None, None) => Err(CliError::usage(
            "no MODEL given and no `[bench] model` in the pipeline manifest",
        )),
    }
}

fn run_logits(a: &LogitsArgs, p: &Pipeline) -> Result<(), CliError> {
    let ids = evaluate::parse_ids(&a.ids)?;
    let model = evaluate::open_model(&model_dir(a.model.as_deref(), p)?)?;
    let t0 = std::time::Instant::now();
    let logits = evaluate::logits(&model, &ids, a.step)?;
    let secs = t0.elapsed().as_secs_f64();
    evaluate::write_logits(&a.out, &logits, model.config().vocab_size)?;
    tracing::info!(
        "{} tokens ({}) in {secs:.3} s ({:.1} tokens/s) -> {}",
        ids.len(),
        if a.step { "decode" } else { "prefill" },
        ids.len() as f64 / secs,
        a.out.display()
    );
    Ok(())
}

fn run_perplexity(a: &PerplexityArgs, p: &Pipeline, v: &Verbosity) -> Result<(), CliError> {
    let model = evaluate::open_model(&model_dir(a.model.as_deref(), p)?)?;
    let json = a.json;
    let quiet = v.quiet;
    let r = evaluate::perplexity_of_file(&model, &a.text, a.ctx, a.chunks, |i, ppl| {
        if !json && !quiet {
            use std::io::Write;
            print!("[{}]{ppl:.4},", i + 1);
            let _ = std::io::stdout().flush();
        }
    })?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&r).map_err(|e| CliError::failure(e.to_string()))?
        );
    } else {
        println!();
        println!(
            "Final estimate: PPL = {:.4} +/- {:.5} ({} tokens scored, ctx {})",
            r.ppl, r.ppl_err, r.tokens_scored, r.ctx
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let v = Verbosity {
        verbose: cli.verbose,
        quiet: cli.quiet,
    };
    cli::init_logging(&v);
    // After the logs, so a bad RH_HEAP is reported (roundhouse::heap).
    roundhouse::heap::tune();
    cli::main_with("rh-bench", || {
        let p = Pipeline::discover(cli.pipeline.as_deref())?;
        match &cli.mode {
            Some(Mode::Logits(a)) => run_logits(a, &p),
            Some(Mode::Perplexity(a)) => run_perplexity(a, &p, &v),
            Some(Mode::Kernels(a)) => kernels::run(a),
            Some(Mode::Http(a)) => http::run(a),
            None => speed::run(&cli.speed, &p),
        }
    })
}
