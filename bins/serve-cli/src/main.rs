//! `rh-serve`: chat with a model directory (a repacked cache or a
//! checkpoint). One-shot with `--prompt` (or a prompt on stdin), else an
//! interactive chat. Logic lives in `roundhouse::chat`; this file parses
//! flags and prints.

mod repl;

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use roundhouse::chat::{ChatModel, Conversation, Event, GenOptions};
use roundhouse::cli::{self, CliError, Verbosity};
use roundhouse::pipeline::Pipeline;
use roundhouse::weights::WeightSource;

/// Chat with a Qwen3-Next model on the CPU.
#[derive(Parser, Debug)]
#[command(name = "rh-serve", version)]
struct Args {
    /// Model directory (cache or checkpoint). Default: `[serve] model`,
    /// else repack's cache, else fetch's checkpoint.
    model: Option<PathBuf>,
    /// Pipeline manifest (default ./pipeline.toml when present).
    #[arg(long)]
    pipeline: Option<PathBuf>,
    /// Answer this prompt and exit (a prompt on stdin works too).
    #[arg(long)]
    prompt: Option<String>,
    /// One-shot: print {reasoning, answer, prompt_tokens, generated_tokens,
    /// ttft_ms, prefill_tps, decode_tps} as JSON.
    #[arg(long)]
    json: bool,
    /// Show the model's reasoning (dimmed on a terminal).
    #[arg(long)]
    thinking: bool,
    /// System prompt.
    #[arg(long)]
    system: Option<String>,
    /// Sampling temperature (0 = greedy). Default: generation_config.json.
    #[arg(long)]
    temperature: Option<f32>,
    /// Top-k (0 = off). Default: generation_config.json.
    #[arg(long)]
    top_k: Option<usize>,
    /// Top-p (1 = off). Default: generation_config.json.
    #[arg(long)]
    top_p: Option<f32>,
    /// Min-p (0 = off).
    #[arg(long)]
    min_p: Option<f32>,
    /// Repetition penalty (1 = off).
    #[arg(long)]
    repeat_penalty: Option<f32>,
    /// RNG seed. Default: random.
    #[arg(long)]
    seed: Option<u64>,
    /// Longest answer in tokens (reasoning included). Default 512.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Context size in tokens. Default 8192.
    #[arg(long)]
    ctx_size: Option<usize>,
    /// Worker threads. Default: the strategy's, else all cores.
    #[arg(short = 't', long)]
    threads: Option<usize>,
    /// More logs (-v, -vv).
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Errors only.
    #[arg(short, long)]
    quiet: bool,
}

fn main() -> std::process::ExitCode {
    cli::main_with("rh-serve", run)
}

/// The model directory: the argument, `[serve] model`, repack's cache when
/// it exists, else fetch's checkpoint.
fn model_dir(args: &Args, p: &Pipeline) -> PathBuf {
    if let Some(m) = &args.model {
        return m.clone();
    }
    if let Some(m) = &p.serve.model {
        return p.path(m);
    }
    let cache = p.cache_dir();
    if cache.exists() || !p.checkpoint_dir().exists() {
        cache
    } else {
        p.checkpoint_dir()
    }
}

/// Opens a model directory (cache or checkpoint) through the library's
/// opener, so serve opens whatever bench and verify open.
fn open(dir: &Path) -> Result<Arc<dyn WeightSource>, CliError> {
    if !dir.exists() {
        return Err(CliError::failure(format!(
            "{}: model directory not found (pass MODEL_DIR, set [serve] model, or run the pipeline: rh-fetch, rh-repack)",
            dir.display()
        )));
    }
    // evaluate::open_weights runs the quick check against rh-verify's
    // manifest when there is one.
    Ok(roundhouse::evaluate::open_weights(dir)?)
}

fn options(args: &Args, p: &Pipeline, chat: &ChatModel) -> GenOptions {
    let s = &p.serve;
    let mut sp = chat.generation.sampling();
    sp.temperature = args.temperature.or(s.temperature).unwrap_or(sp.temperature);
    sp.top_k = args.top_k.or(s.top_k).unwrap_or(sp.top_k);
    sp.top_p = args.top_p.or(s.top_p).unwrap_or(sp.top_p);
    sp.min_p = args.min_p.or(s.min_p).unwrap_or(sp.min_p);
    sp.repeat_penalty = args
        .repeat_penalty
        .or(s.repeat_penalty)
        .unwrap_or(sp.repeat_penalty);
    sp.seed = args.seed.or(s.seed).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    let max_pos = chat.model.config().max_position_embeddings;
    GenOptions {
        sampling: sp,
        max_tokens: args.max_tokens.or(s.max_tokens).unwrap_or(512).max(1),
        ctx_size: args
            .ctx_size
            .or(s.ctx_size)
            .unwrap_or(8192)
            .clamp(2, max_pos.max(2)),
        enable_thinking: true,
    }
}

fn run() -> Result<(), CliError> {
    let args = Args::parse();
    cli::init_logging(&Verbosity {
        verbose: args.verbose,
        quiet: args.quiet,
    });
    let p = Pipeline::discover(args.pipeline.as_deref())?;
    if args.max_tokens == Some(0) || args.ctx_size == Some(0) {
        return Err(CliError::usage(
            "--max-tokens and --ctx-size must be at least 1",
        ));
    }
    let strategy = p
        .serve
        .strategy
        .as_ref()
        .map(|s| p.path(s))
        .unwrap_or_else(|| p.strategy_path());
    let strategy = roundhouse::inspect::Strategy::load_for_use(&strategy);
    let strategy_threads = strategy.as_ref().map(|s| s.threads).filter(|&t| t > 0);
    if let Some(n) = args.threads.or(p.serve.threads).or(strategy_threads) {
        if n == 0 {
            return Err(CliError::usage("--threads must be at least 1"));
        }
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }

    // The prompt: --prompt, else stdin when it is not a terminal.
    let mut prompt = args.prompt.clone();
    if prompt.is_none() && !std::io::stdin().is_terminal() {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| CliError::failure(format!("reading the prompt from stdin: {e}")))?;
        if s.trim().is_empty() {
            return Err(CliError::usage(
                "stdin is not a terminal and holds no prompt (pass --prompt TEXT or pipe a prompt)",
            ));
        }
        prompt = Some(s.trim_end_matches('\n').to_string());
    }
    if args.json && prompt.is_none() {
        return Err(CliError::usage(
            "--json needs a prompt (--prompt TEXT or stdin)",
        ));
    }

    let dir = model_dir(&args, &p);
    let t0 = Instant::now();
    let weights = open(&dir)?;
    // inspect's memory decision: read ahead when the model fits, pin it
    // when RAM and RLIMIT_MEMLOCK allow; a refused lock is a warning.
    if let Some(st) = &strategy {
        if let Err(msg) = weights.residency(st.populate, st.mlock) {
            eprintln!("rh-serve: warning: {msg}; serving without mlock");
        }
    }
    let chat = ChatModel::load(weights)?;
    if !args.quiet {
        eprintln!(
            "rh-serve: loaded {} in {:.2} s ({} threads)",
            dir.display(),
            t0.elapsed().as_secs_f64(),
            rayon::current_num_threads()
        );
    }
    let opts = options(&args, &p, &chat);
    let mut conv = Conversation::new(&chat, opts);
    conv.set_system(args.system.clone().or(p.serve.system.clone()));
    let show_thinking = args.thinking || p.serve.thinking.unwrap_or(false);

    match prompt {
        Some(text) => one_shot(&mut conv, &text, args.json, show_thinking, args.quiet),
        None => repl::run(&mut conv, show_thinking),
    }
}

fn one_shot(
    conv: &mut Conversation<'_>,
    text: &str,
    json: bool,
    show_thinking: bool,
    quiet: bool,
) -> Result<(), CliError> {
    let never = AtomicBool::new(false);
    let tty = std::io::stdout().is_terminal();
    let err_tty = cli::stderr_is_tty();
    let mut out = std::io::stdout().lock();
    let mut on_event = |e: Event<'_>| {
        if json {
            return;
        }
        match e {
            Event::Reasoning(s) if show_thinking => {
                let _ = write!(out, "{}", repl::dim(s, tty));
                let _ = out.flush();
            }
            Event::Thinking { tokens } if !show_thinking && err_tty && !quiet => {
                eprint!("\rthinking... ({tokens} tokens)");
            }
            Event::ReasoningEnd { tokens } => {
                if show_thinking {
                    let _ = writeln!(out, "\n");
                } else if err_tty && !quiet {
                    eprintln!("\rthinking... ({tokens} tokens)");
                }
            }
            Event::Answer(s) => {
                let _ = write!(out, "{s}");
                let _ = out.flush();
            }
            _ => {}
        }
    };
    let r = conv.send(text, &never, &mut on_event)?;
    if json {
        let v = serde_json::json!({
            "reasoning": r.reasoning,
            "answer": r.answer,
            "prompt_tokens": r.stats.prompt_tokens,
            "generated_tokens": r.stats.generated_tokens,
            "reasoning_tokens": r.stats.reasoning_tokens,
            "ttft_ms": r.stats.ttft_ms,
            "prefill_tps": r.stats.prefill_tps,
            "decode_tps": r.stats.decode_tps,
            "stop": r.stop,
        });
        writeln!(out, "{v}").map_err(|e| CliError::failure(format!("stdout: {e}")))?;
    } else {
        let _ = writeln!(out);
        if !quiet {
            eprintln!("{}", repl::stats_line(&r.stats, r.stop));
        }
    }
    Ok(())
}
