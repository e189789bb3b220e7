//! `rh-serve`: chat with a model directory (a repacked cache or a
//! checkpoint). One-shot with `--prompt` (or a prompt on stdin), an
//! OpenAI-compatible HTTP server with `--listen`, else an interactive chat.
//! Logic lives in `roundhouse::chat` and `roundhouse::serve`; this file
//! parses flags and prints, `http` maps HTTP onto the engine.

mod api;
mod http;
mod repl;

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use roundhouse::chat::{ChatModel, Conversation, Event, GenOptions};
use roundhouse::cli::{self, CliError, Verbosity};
use roundhouse::inspect::Strategy;
use roundhouse::pipeline::{defaults, Pipeline};
use roundhouse::sample::SamplingParams;
use roundhouse::weights::WeightSource;

/// Chat with a Qwen3-Next model on the CPU, or serve it over HTTP.
#[derive(Parser, Debug)]
#[command(
    name = "rh-serve",
    version,
    after_help = "Examples:\n  \
  rh-serve MODEL_DIR                                  chat in the terminal\n  \
  rh-serve MODEL_DIR --prompt 'Why is the sky blue?'  answer one prompt and exit\n  \
  rh-serve MODEL_DIR --listen 127.0.0.1:8080          OpenAI-compatible API and web chat at http://127.0.0.1:8080/"
)]
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
    /// Serve the OpenAI-compatible HTTP API and the web chat page on ADDR
    /// (default 127.0.0.1:8080 when given without a value; `[serve] listen`).
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:8080")]
    listen: Option<String>,
    /// Require `Authorization: Bearer KEY` on the API (not on / and /health).
    #[arg(long, env = "RH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Allow cross-origin requests from ORIGIN (`*` for any). Default: off.
    #[arg(long, value_name = "ORIGIN")]
    cors: Option<String>,
    /// Requests that may wait behind the running batch; past it, 503.
    /// Default 16.
    #[arg(long, value_name = "N")]
    queue: Option<usize>,
    /// Most requests generating at once (continuous batching: they share
    /// each pass over the weights). Default 4 (`[serve] parallel`).
    #[arg(long, value_name = "N")]
    parallel: Option<usize>,
    /// RAM for kept prompt states (prompt reuse), MiB. Default: a quarter
    /// of the available RAM, at most 8 GiB; 0 turns reuse off.
    #[arg(long, value_name = "MIB")]
    cache_ram: Option<usize>,
    /// Worker threads. Default: the strategy's, else all cores.
    #[arg(short = 't', long)]
    threads: Option<usize>,
    /// RAM budget for the model, e.g. 24G: routed experts that do not fit
    /// are read on demand into an expert cache (a repacked cache only).
    /// Default: `[serve] memory_budget`, else inspect's when the model does
    /// not fit, else none.
    #[arg(long, value_name = "SIZE")]
    memory_budget: Option<String>,
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
///
/// Under a budget, `held` is what the caller keeps beside the model:
/// `(sequences, context tokens each, other bytes)`, set aside before the
/// expert cache gets the rest.
fn open(
    dir: &Path,
    budget: Option<u64>,
    p: &Pipeline,
    held: (usize, usize, u64),
) -> Result<Arc<dyn WeightSource>, CliError> {
    if !dir.exists() {
        return Err(CliError::failure(format!(
            "{}: model directory not found (pass MODEL_DIR, set [serve] model, or run the pipeline: rh-fetch, rh-repack)",
            dir.display()
        )));
    }
    // evaluate::open_weights runs the quick check against rh-verify's
    // manifest when there is one (so does the budgeted opener).
    match budget {
        None => Ok(roundhouse::evaluate::open_weights(dir)?),
        Some(b) => {
            let mut opts = roundhouse::model::experts::PagerOptions::new(b);
            (opts.sequences, opts.context_tokens, opts.other_bytes) = held;
            let work = p.work_dir();
            if work.is_dir() {
                opts.usage_file = Some(roundhouse::model::experts::usage_path(&work));
            }
            let (w, plan) = roundhouse::model::experts::open_with_budget(dir, &opts)?;
            if let Some(plan) = plan {
                tracing::info!(
                    "memory budget {}: {} experts of {} cached, the rest read on demand",
                    roundhouse::cli::human_bytes(plan.budget),
                    plan.slots,
                    plan.experts
                );
            }
            Ok(w)
        }
    }
}

/// The RAM budget: the flag, `[serve] memory_budget`, else the strategy's.
fn memory_budget(
    args: &Args,
    p: &Pipeline,
    st: Option<&Strategy>,
) -> Result<Option<u64>, CliError> {
    let parse = |what: &str, s: &str| {
        roundhouse::model::experts::parse_size(s)
            .map_err(|e| CliError::usage(format!("{what}: {e}")))
    };
    match (&args.memory_budget, &p.serve.memory_budget) {
        (Some(s), _) => parse("--memory-budget", s).map(Some),
        (None, Some(s)) => parse("[serve] memory_budget", s).map(Some),
        (None, None) => Ok(st.and_then(|s| s.paging.as_ref()?.memory_budget)),
    }
}

/// The sampling settings: `base` (generation_config.json) overridden by
/// `[serve]`, then by flags.
fn sampling(args: &Args, p: &Pipeline, mut sp: SamplingParams) -> SamplingParams {
    let s = &p.serve;
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
    sp
}

fn options(args: &Args, p: &Pipeline, chat: &ChatModel) -> GenOptions {
    let s = &p.serve;
    let sp = sampling(args, p, chat.generation.sampling());
    let max_pos = chat.model.config().max_position_embeddings;
    GenOptions {
        sampling: sp,
        max_tokens: args
            .max_tokens
            .or(s.max_tokens)
            .unwrap_or(defaults::SERVE_MAX_TOKENS)
            .max(1),
        ctx_size: ctx_size(args, p).clamp(2, max_pos.max(2)),
        enable_thinking: true,
    }
}

fn run() -> Result<(), CliError> {
    let args = Args::parse();
    cli::init_logging(&Verbosity {
        verbose: args.verbose,
        quiet: args.quiet,
    });
    // After the logs, so a bad RH_HEAP is reported (roundhouse::heap).
    roundhouse::heap::tune();
    let p = Pipeline::discover(args.pipeline.as_deref())?;
    if args.parallel.or(p.serve.parallel) == Some(0) {
        return Err(CliError::usage(
            "--parallel / [serve] parallel must be at least 1",
        ));
    }
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
    let strategy = Strategy::load_for_use(&strategy);
    let strategy_threads = strategy.as_ref().map(|s| s.threads).filter(|&t| t > 0);
    if let Some(n) = args.threads.or(p.serve.threads).or(strategy_threads) {
        roundhouse::pipeline::check_threads("--threads", n)?;
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }

    // Flags and [serve] values are checked before the model loads (NaN,
    // infinite or out-of-range sampling values are a usage error).
    sampling(&args, &p, SamplingParams::default())
        .validate()
        .map_err(|e| CliError::usage(format!("sampling settings: {e}")))?;

    let listen = args.listen.clone().or(p.serve.listen.clone());
    if let (Some(addr), None) = (&listen, &args.prompt) {
        return serve(&args, &p, addr, strategy);
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
    let budget = memory_budget(&args, &p, strategy.as_ref())?;
    // One conversation, no prompt cache.
    let weights = open(&dir, budget, &p, (1, ctx_size(&args, &p), 0))?;
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

/// The context size: the flag, else `[serve] ctx_size`, else the default.
fn ctx_size(args: &Args, p: &Pipeline) -> usize {
    args.ctx_size
        .or(p.serve.ctx_size)
        .unwrap_or(defaults::SERVE_CTX_SIZE)
}

/// `--listen`'s engine settings: flags, else `[serve]`, else defaults
/// (the prompt cache's default comes out of a memory budget when there
/// is one).
fn engine_config(
    args: &Args,
    p: &Pipeline,
    budget: Option<u64>,
) -> roundhouse::serve::EngineConfig {
    use roundhouse::serve::prefix_cache;
    let s = &p.serve;
    roundhouse::serve::EngineConfig {
        ctx_size: ctx_size(args, p),
        cache_bytes: args
            .cache_ram
            .or(s.cache_ram)
            .map(|mib| mib.saturating_mul(1 << 20))
            .unwrap_or_else(|| match budget {
                Some(b) => prefix_cache::default_budget_bytes_within(b),
                None => prefix_cache::default_budget_bytes(),
            }),
        queue: args.queue.or(s.queue).unwrap_or(defaults::SERVE_QUEUE),
        parallel: args
            .parallel
            .or(s.parallel)
            .unwrap_or(defaults::SERVE_PARALLEL),
    }
}

/// Binds `addr`, warning when it is reachable from other machines without
/// an API key.
async fn bind(
    addr: &str,
    api_key: Option<&str>,
) -> Result<(tokio::net::TcpListener, std::net::SocketAddr), CliError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| CliError::usage(format!("--listen {addr}: cannot bind: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| CliError::failure(format!("--listen {addr}: {e}")))?;
    if !local.ip().is_loopback() && api_key.is_none() {
        eprintln!(
            "rh-serve: warning: listening on {local}, which is not a loopback address, without --api-key: anyone who can reach it can use the model"
        );
    }
    Ok((listener, local))
}

/// What the engine thread reports once its load has finished.
type Loaded = Result<roundhouse::serve::ModelInfo, roundhouse::serve::LoadFailed>;

/// Starts the engine thread, which loads the model (locking it in RAM as
/// the strategy says) and then reports on the returned channel.
fn spawn_engine(
    weights: Arc<dyn WeightSource>,
    strategy: Option<Strategy>,
    config: roundhouse::serve::EngineConfig,
) -> (
    roundhouse::serve::Engine,
    tokio::sync::mpsc::UnboundedReceiver<Loaded>,
) {
    let (loaded_tx, loaded_rx) = tokio::sync::mpsc::unbounded_channel();
    let engine = roundhouse::serve::Engine::spawn(
        move || {
            if let Some(st) = &strategy {
                if let Err(msg) = weights.residency(st.populate, st.mlock) {
                    eprintln!("rh-serve: warning: {msg}; serving without mlock");
                }
            }
            ChatModel::load(weights)
        },
        config,
        move |r| {
            let _ = loaded_tx.send(r.clone());
        },
    );
    (engine, loaded_rx)
}

/// Waits for the engine's load: sets the request defaults and prints the
/// loaded line, or hands the failure to `fail_tx` (which stops the server).
async fn on_load(
    args: &Args,
    p: &Pipeline,
    state: &http::AppState,
    dir: &Path,
    t0: Instant,
    mut loaded_rx: tokio::sync::mpsc::UnboundedReceiver<Loaded>,
    fail_tx: tokio::sync::oneshot::Sender<String>,
) {
    match loaded_rx.recv().await {
        Some(Ok(info)) => {
            http::set_defaults(
                state,
                api::Defaults {
                    sampling: sampling(args, p, info.sampling),
                    max_tokens: args.max_tokens.or(p.serve.max_tokens),
                    random_seed: args.seed.or(p.serve.seed).is_none(),
                },
            );
            if !args.quiet {
                eprintln!(
                    "rh-serve: loaded {} in {:.2} s ({} threads, context {} tokens)",
                    dir.display(),
                    t0.elapsed().as_secs_f64(),
                    rayon::current_num_threads(),
                    info.ctx_size
                );
            }
        }
        Some(Err(failed)) => {
            let _ = fail_tx.send(failed.to_string());
        }
        None => {
            let _ = fail_tx.send("the engine thread ended while loading".into());
        }
    }
}

/// Resolves on Ctrl-C, or when the load failed (its message is kept in
/// `failed`). A dropped sender means the model loaded: then only Ctrl-C
/// ends it.
async fn shutdown(
    fail_rx: tokio::sync::oneshot::Receiver<String>,
    failed: Arc<std::sync::Mutex<Option<String>>>,
) {
    let failed_load = async {
        match fail_rx.await {
            Ok(msg) => msg,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        msg = failed_load => {
            *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg);
        }
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// `--listen`: binds first (so `/health` answers 503 while the model
/// loads), prints the one line clients wait for, loads the model on the
/// engine thread and serves until Ctrl-C or a failed load.
fn serve(
    args: &Args,
    p: &Pipeline,
    addr: &str,
    strategy: Option<Strategy>,
) -> Result<(), CliError> {
    let dir = model_dir(args, p);
    let budget = memory_budget(args, p, strategy.as_ref())?;
    let config = engine_config(args, p, budget);
    let held = (config.parallel, config.ctx_size, config.cache_bytes as u64);
    let weights = open(&dir, budget, p, held)?;
    let expert_pager = roundhouse::model::experts::pager_of(&*weights);
    let api_key = args.api_key.clone().filter(|k| !k.is_empty());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::failure(format!("starting the HTTP runtime: {e}")))?;
    rt.block_on(async {
        let (listener, local) = bind(addr, api_key.as_deref()).await?;
        let t0 = Instant::now();
        let (engine, loaded_rx) = spawn_engine(weights, strategy, config);
        let state = Arc::new(http::AppState {
            engine,
            model_id: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "roundhouse".into()),
            api_key,
            defaults: std::sync::Mutex::new(None),
            by_status: Default::default(),
            next_id: Default::default(),
            started: http::unix_now(),
            expert_pager,
        });
        let app = http::router(state.clone(), args.cors.clone());
        eprintln!("rh-serve: listening on http://{local}");
        let (fail_tx, fail_rx) = tokio::sync::oneshot::channel::<String>();
        let failed = Arc::new(std::sync::Mutex::new(None::<String>));
        let server =
            axum::serve(listener, app).with_graceful_shutdown(shutdown(fail_rx, failed.clone()));
        let loading = on_load(args, p, &state, &dir, t0, loaded_rx, fail_tx);
        let (served, ()) = tokio::join!(std::future::IntoFuture::into_future(server), loading);
        served.map_err(|e| CliError::failure(format!("serving HTTP: {e}")))?;
        let failed = failed.lock().unwrap_or_else(|e| e.into_inner()).take();
        match failed {
            Some(msg) => Err(CliError::failure(msg)),
            None => Ok(()),
        }
    })
}
