//! `rh-bench`'s default mode: prompt processing (pp, one forward over `-p`
//! tokens) and token generation (tg, `-n` single-token forwards) in
//! llama-bench's table, then load time, peak RSS, weight bytes per token,
//! the effective bandwidth of decode and its ratio to the machine's read
//! bandwidth (from inspect's strategy file, else probed before the load
//! and after the runs, the better kept, and said so).
//! `--parallel 1,2,4,8` adds batched decode of several streams at once
//! (aggregate and per-stream tokens/s, as llama.cpp's batched-bench).

use std::path::{Path, PathBuf};
use std::time::Instant;

use roundhouse::cli::CliError;
use roundhouse::inspect::Strategy;
use roundhouse::model::experts::ExpertPager;
use roundhouse::model::{BatchSeq, Model};
use roundhouse::pipeline::{defaults, Pipeline};
use roundhouse::speedbench::{self, ParallelResult, SpeedReport, TestResult};

/// Flags of the speed mode (the default `rh-bench` run).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SpeedArgs {
    /// Model directory. Default: `[bench] model`, else repack's cache.
    #[arg(value_name = "MODEL")]
    pub model: Option<PathBuf>,
    /// Prompt tokens of the pp test (0 skips it). Default `[bench] prompt_tokens`, else 512.
    #[arg(short = 'p', long = "n-prompt", value_name = "N")]
    pub prompt_tokens: Option<usize>,
    /// Generated tokens of the tg test (0 skips it). Default `[bench] gen_tokens`, else 128.
    #[arg(short = 'n', long = "n-gen", value_name = "N")]
    pub gen_tokens: Option<usize>,
    /// Repetitions of each test (mean ± sd). Default `[bench] repetitions`, else 3.
    #[arg(short = 'r', long, value_name = "N")]
    pub repetitions: Option<usize>,
    /// Worker threads. Default `[bench] threads`, else the strategy's, else all cores.
    #[arg(short = 't', long, value_name = "N")]
    pub threads: Option<usize>,
    /// Skip the untimed warm-up run (a full pp test, or one token).
    #[arg(long)]
    pub no_warmup: bool,
    /// Print the report as JSON.
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// Print the report as CSV.
    #[arg(long)]
    pub csv: bool,
    /// Also decode this many sequences at once, for each count in the
    /// list (e.g. `1,2,4,8`): every step is one batched forward over all
    /// the streams' next tokens (llama.cpp's batched-bench); reports
    /// aggregate and per-stream tokens/s over `-n` tokens per stream. The
    /// counts take turns step by step, so that all meet the same spells of
    /// a machine whose speed moves.
    #[arg(long, value_name = "N,N,...", value_delimiter = ',')]
    pub parallel: Vec<usize>,
    /// Prompt tokens each stream of `--parallel` holds before its decode
    /// is timed (each stream its own prompt). Default 16.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub parallel_ctx: usize,
    /// Also draw pp and tg on the roofline of the read bandwidth and FMA
    /// peak, as an SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// RAM budget, e.g. 24G: routed experts that do not fit are paged by
    /// the expert cache. Default `[bench] memory_budget`, else none.
    #[arg(long, value_name = "SIZE")]
    pub memory_budget: Option<String>,
    /// Under a budget: do not predict the next layer's experts.
    #[arg(long)]
    pub no_expert_prediction: bool,
}

/// Prompt ids for the pp test: ordinary (non-special) tokens, spread over
/// the vocabulary, deterministic.
fn bench_ids(n: usize, vocab: usize) -> Vec<u32> {
    let ordinary = vocab.clamp(2, 151_643) as u64;
    (0..n as u64)
        .map(|i| ((i * 7919 + 104_729) % (ordinary - 1) + 1) as u32)
        .collect()
}

/// Most streams `--parallel` takes (a batch is one forward: its tokens'
/// activations are held at once).
const MAX_STREAMS: usize = 256;

/// For each stream count of `counts`, that many sequences, each first fed
/// its own `ctx`-token prompt (untimed, one batched forward), then `n`
/// timed steps in which every stream decodes one token, all in one batched
/// forward per step. The counts take turns step by step, each step timed
/// alone: the memory bandwidth of a shared machine (a VM here) swings by
/// 1.7x for seconds at a time, and counts run one after the other met
/// different spells, so their ratios (4 streams against 1) measured the
/// spells as much as the batching. Taking turns, every count meets the
/// same ones.
fn parallel_decode(
    model: &Model,
    counts: &[usize],
    ctx: usize,
    n: usize,
    reps: usize,
) -> Vec<ParallelResult> {
    let vocab = model.config().vocab_size;
    let most = counts.iter().copied().max().unwrap_or(0);
    // Each stream its own ids: the same deterministic sequence from a
    // different offset.
    let ids: Vec<Vec<u32>> = (0..most)
        .map(|s| bench_ids(ctx + n + 97 * s, vocab)[97 * s..].to_vec())
        .collect();
    let mut secs = vec![Vec::with_capacity(reps); counts.len()];
    for r in 0..reps {
        let mut states: Vec<Vec<_>> = counts
            .iter()
            .map(|&c| (0..c).map(|_| model.new_state()).collect())
            .collect();
        if ctx > 0 {
            for st in states.iter_mut() {
                let mut batch: Vec<BatchSeq> = st
                    .iter_mut()
                    .zip(&ids)
                    .map(|(state, ids)| BatchSeq {
                        state,
                        ids: &ids[..ctx],
                        logits: false,
                    })
                    .collect();
                model.forward_batch(&mut batch);
            }
        }
        let mut spent = vec![0f64; counts.len()];
        for step in 0..n {
            for (st, spent) in states.iter_mut().zip(spent.iter_mut()) {
                let mut batch: Vec<BatchSeq> = st
                    .iter_mut()
                    .zip(&ids)
                    .map(|(state, ids)| BatchSeq {
                        state,
                        ids: &ids[ctx + step..ctx + step + 1],
                        logits: true,
                    })
                    .collect();
                let t = Instant::now();
                std::hint::black_box(model.forward_batch(&mut batch));
                *spent += t.elapsed().as_secs_f64();
            }
        }
        for ((&streams, spent), secs) in counts.iter().zip(spent).zip(secs.iter_mut()) {
            tracing::info!(
                "tg{n} x{streams} run {}: {:.3} s ({:.2} t/s together)",
                r + 1,
                spent,
                (streams * n) as f64 / spent
            );
            secs.push(spent);
        }
    }
    counts
        .iter()
        .zip(secs)
        .map(|(&streams, secs)| ParallelResult::from_times(streams, n, ctx, &secs))
        .collect()
}

/// The kernels' instruction set, as llama-bench names its backend.
fn backend() -> String {
    format!("CPU ({})", roundhouse::kernels::isa())
}

/// The test sizes after flags, `[bench]` and defaults, checked.
struct Sizes {
    /// Prompt tokens of pp (0 skips it).
    p: usize,
    /// Generated tokens of tg (0 skips it).
    n: usize,
    /// Repetitions of each test.
    reps: usize,
}

/// Resolves `-p`, `-n`, `-r` and checks them with `--parallel` and
/// `--plot`, before anything is loaded.
fn sizes(args: &SpeedArgs, pipeline: &Pipeline) -> Result<Sizes, CliError> {
    let b = &pipeline.bench;
    let p = args
        .prompt_tokens
        .or(b.prompt_tokens)
        .unwrap_or(defaults::BENCH_PROMPT_TOKENS);
    let n = args
        .gen_tokens
        .or(b.gen_tokens)
        .unwrap_or(defaults::BENCH_GEN_TOKENS);
    let reps = args
        .repetitions
        .or(b.repetitions)
        .unwrap_or(defaults::BENCH_REPETITIONS);
    if reps == 0 {
        return Err(CliError::usage("-r/--repetitions must be at least 1"));
    }
    if p == 0 && n == 0 {
        return Err(CliError::usage("nothing to measure: -p and -n are both 0"));
    }
    if let Some(bad) = args.parallel.iter().find(|&&s| s == 0 || s > MAX_STREAMS) {
        return Err(CliError::usage(format!(
            "--parallel: {bad} streams is out of range (1 to {MAX_STREAMS})"
        )));
    }
    if !args.parallel.is_empty() && n == 0 {
        return Err(CliError::usage(
            "--parallel decodes -n tokens per stream: -n must be at least 1",
        ));
    }
    if let Some(path) = &args.plot {
        crate::plot::check_target(path)?;
    }
    Ok(Sizes { p, n, reps })
}

/// Sizes rayon's global pool: `-t`, else `[bench] threads`, else the
/// strategy's; all cores when none is set.
fn set_threads(
    args: &SpeedArgs,
    pipeline: &Pipeline,
    strategy: Option<&Strategy>,
) -> Result<(), CliError> {
    if let Some(t) = args
        .threads
        .or(pipeline.bench.threads)
        .or(strategy.map(|s| s.threads).filter(|&t| t > 0))
    {
        roundhouse::pipeline::check_threads("-t/--threads", t)?;
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global();
    }
    Ok(())
}

/// The model directory: MODEL, else `[bench] model`, else repack's cache.
fn model_dir(args: &SpeedArgs, pipeline: &Pipeline) -> Result<PathBuf, CliError> {
    let dir = match (&args.model, &pipeline.bench.model) {
        (Some(m), _) => m.clone(),
        (None, Some(m)) => pipeline.path(m),
        (None, None) => pipeline.cache_dir(),
    };
    if !dir.exists() {
        return Err(CliError::failure(format!(
            "{}: model directory not found (pass MODEL, set [bench] model, or run rh-repack)",
            dir.display()
        )));
    }
    Ok(dir)
}

/// Warm-up, as llama-bench does: an untimed pp run (else one token)
/// touches the pages of the weights the timed runs read, and pays the
/// first-call costs. One token alone would map only its few experts.
fn warm_up(model: &Model, ids: &[u32]) {
    let mut st = model.new_state();
    let t = Instant::now();
    std::hint::black_box(model.forward(&mut st, ids));
    tracing::info!(
        "warm-up, {} tokens: {:.3} s",
        ids.len(),
        t.elapsed().as_secs_f64()
    );
}

/// The pp test: `reps` forwards over the first `p` ids, each from a fresh
/// state.
fn time_prompt(model: &Model, ids: &[u32], p: usize, reps: usize) -> TestResult {
    let mut secs = Vec::with_capacity(reps);
    for r in 0..reps {
        let mut st = model.new_state();
        let t = Instant::now();
        std::hint::black_box(model.forward(&mut st, &ids[..p]));
        secs.push(t.elapsed().as_secs_f64());
        tracing::info!("pp{p} run {}: {:.3} s", r + 1, secs[r]);
    }
    TestResult::from_times(format!("pp{p}"), p, &secs)
}

/// The tg test: `reps` runs of `n` single-token forwards, with the expert
/// cache's counters over them when the experts are paged.
fn time_generation(
    model: &Model,
    pager: Option<&ExpertPager>,
    dir: &Path,
    ids: &[u32],
    n: usize,
    reps: usize,
) -> (TestResult, Option<crate::paging::PagingReport>) {
    let before = pager.map(|p| p.stats());
    let mut secs = Vec::with_capacity(reps);
    for r in 0..reps {
        let mut st = model.new_state();
        let t = Instant::now();
        for &id in &ids[..n] {
            std::hint::black_box(model.forward(&mut st, &[id]));
        }
        secs.push(t.elapsed().as_secs_f64());
        tracing::info!("tg{n} run {}: {:.3} s", r + 1, secs[r]);
    }
    let paging = match (pager, before) {
        (Some(p), Some(b)) => {
            let tokens = (n * reps) as u64;
            let per_token = secs.iter().sum::<f64>() / tokens as f64;
            let stats = p.stats().since(&b);
            Some(crate::paging::PagingReport::new(
                p, dir, stats, tokens, per_token,
            ))
        }
        _ => None,
    };
    (TestResult::from_times(format!("tg{n}"), n, &secs), paging)
}

/// MiB of the bandwidth probe's buffer before the load: 512, several
/// times any last-level cache (a 64 MiB buffer partly stays in a 32 MiB
/// L3 and read 81 GB/s here, above what the memory gives), or a quarter
/// of a smaller memory budget. Before the load the budget's memory is
/// still free, and the buffer is freed again before the model loads.
fn probe_mib_before(budget: Option<u64>) -> usize {
    let cap = budget.map_or(512, |b| (b >> 20) as usize / 4);
    cap.clamp(16, 512)
}

/// The probe taken before the model loads when no strategy file gives the
/// bandwidth (`None` otherwise), its buffer freed again and the peak RSS
/// reset so that it does not count.
fn probe_before(strategy: Option<&Strategy>, budget: Option<u64>) -> Option<f64> {
    if strategy
        .and_then(|s| s.bandwidth_gbs)
        .is_some_and(|g| g > 0.0)
    {
        return None;
    }
    let bw = roundhouse::membw::measure(probe_mib_before(budget) << 20, 1.0);
    speedbench::reset_peak_rss();
    Some(bw.all_threads_gbs)
}

/// The machine's read bandwidth and where it came from: inspect's
/// strategy file, else the better of the probe before the load and one
/// after the runs. A virtual machine's bandwidth moves with its host's
/// load (one probe here read 37 GB/s, the next run's 63), and decode
/// compared with a probe from a slow spell would read above 100% of it.
/// Under a memory budget only the probe before the load counts: after the
/// runs the expert cache holds the budget, and a buffer small enough to
/// fit beside it would read from the last-level cache.
fn read_bandwidth(
    pipeline: &Pipeline,
    strategy: Option<&Strategy>,
    budget: Option<u64>,
    before: Option<f64>,
) -> (f64, String) {
    match strategy.and_then(|s| s.bandwidth_gbs).filter(|&g| g > 0.0) {
        Some(g) => (g, format!("from {}", pipeline.strategy_path().display())),
        None => {
            let before = before.unwrap_or(0.0);
            let mib = probe_mib_before(budget);
            if budget.is_some() {
                let source =
                    format!("no strategy file: membw, {mib} MiB, all threads, before the load");
                return (before, source);
            }
            let after = roundhouse::membw::measure(mib << 20, 1.0).all_threads_gbs;
            (
                before.max(after),
                format!(
                    "no strategy file: membw, {mib} MiB, all threads, the better of {before:.2} before the load and {after:.2} after the runs"
                ),
            )
        }
    }
}

/// What the timed runs measured, before it is related to the machine.
struct Measured {
    tests: Vec<TestResult>,
    parallel: Vec<ParallelResult>,
    load_s: f64,
    /// The memory budget, if any (the probes then differ).
    budget: Option<u64>,
    /// The bandwidth probed before the load, GB/s.
    probe_before: Option<f64>,
}

/// Relates the measurements to the model's bytes and MACs per token and to
/// the machine's bandwidth and FMA peak.
fn report(
    args: &SpeedArgs,
    pipeline: &Pipeline,
    strategy: Option<&Strategy>,
    model: &Model,
    dir: &Path,
    measured: Measured,
) -> SpeedReport {
    // Before the bandwidth probe, whose buffer would count otherwise.
    let peak_rss = speedbench::peak_rss_bytes();
    let tests = measured.tests;
    let mean_tps = |prefix: &str| {
        tests
            .iter()
            .find(|t| t.test.starts_with(prefix))
            .map(|t| t.mean_tps)
    };
    let per_token = model.weight_bytes_per_token();
    let effective = mean_tps("tg").map(|tps| per_token as f64 * tps / 1e9);
    let (bandwidth, source) =
        read_bandwidth(pipeline, strategy, measured.budget, measured.probe_before);
    // Prefill is compared with the machine's FMA peak on the same threads,
    // measured now (half a second) rather than assumed.
    let macs = model.prefill_macs_per_token();
    let pp_tps = mean_tps("pp");
    let prefill_gflops = pp_tps.map(|tps| 2.0 * macs as f64 * tps / 1e9);
    let fma_peak = (pp_tps.is_some() || args.plot.is_some())
        .then(|| roundhouse::kernels::bench::fma_peak(0.5).1)
        .filter(|&p| p > 0.0);
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|f| f.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string());
    SpeedReport {
        model: format!("{name} ({}L)", model.config().num_hidden_layers),
        size_bytes: model.weight_bytes(),
        params: model.params(),
        backend: backend(),
        threads: rayon::current_num_threads(),
        tests,
        parallel: measured.parallel,
        load_s: measured.load_s,
        peak_rss_bytes: peak_rss,
        weight_bytes_per_token: per_token,
        effective_gbs: effective,
        bandwidth_gbs: Some(bandwidth),
        bandwidth_ratio: effective.map(|e| e / bandwidth),
        bandwidth_source: Some(source),
        prefill_macs_per_token: macs,
        prefill_gflops,
        fma_peak_gflops: fma_peak,
        mapped: model
            .weights()
            .mapped_pages()
            .map(|m| speedbench::MappedShare {
                resident_bytes: m.resident,
                huge_page_bytes: m.huge,
            }),
    }
}

/// Prints the report as `--json`, `--csv` or llama-bench's table (with the
/// expert cache's section when paged), and draws `--plot`.
fn print_report(
    args: &SpeedArgs,
    report: &SpeedReport,
    paging: Option<&crate::paging::PagingReport>,
) -> Result<(), CliError> {
    let json_err = |e: serde_json::Error| CliError::failure(format!("json: {e}"));
    if args.json {
        let mut v = serde_json::to_value(report).map_err(json_err)?;
        if let (Some(p), Some(o)) = (paging, v.as_object_mut()) {
            o.insert(
                "expert_cache".into(),
                serde_json::to_value(p).map_err(json_err)?,
            );
        }
        println!("{}", serde_json::to_string_pretty(&v).map_err(json_err)?);
    } else if args.csv {
        print!("{}", report.csv());
    } else {
        print!("{}", report.table());
        if let Some(p) = paging {
            print!("{}", p.text());
        }
    }
    if let Some(path) = &args.plot {
        crate::plot::speed(report, path)?;
    }
    Ok(())
}

/// Runs the speed benchmark and prints the report (table, `--json` or `--csv`).
pub fn run(args: &SpeedArgs, pipeline: &Pipeline) -> Result<(), CliError> {
    let Sizes { p, n, reps } = sizes(args, pipeline)?;
    let strategy = Strategy::load_for_use(&pipeline.strategy_path());
    set_threads(args, pipeline, strategy.as_ref())?;
    let dir = model_dir(args, pipeline)?;

    let budget = crate::paging::budget(args.memory_budget.as_deref(), pipeline, strategy.as_ref())?;
    let probe_before = probe_before(strategy.as_ref(), budget);
    let t0 = Instant::now();
    // The streams held at once (every `--parallel` count's, which take
    // turns), each holding its prompt or its context and generated tokens.
    let held = (
        args.parallel.iter().sum::<usize>().max(1),
        p.max(n + args.parallel_ctx),
    );
    let (model, _plan) =
        crate::paging::load(&dir, budget, !args.no_expert_prediction, held, pipeline)?;
    let pager = crate::paging::pager(&model);
    let load_s = t0.elapsed().as_secs_f64();
    let cfg = model.config();
    let ctx = cfg.max_position_embeddings;
    if p.max(n + args.parallel_ctx) >= ctx {
        return Err(CliError::usage(format!(
            "-p and -n (plus --parallel-ctx) must be below the model's {ctx}-token context"
        )));
    }
    let ids = bench_ids(p.max(n).max(1), cfg.vocab_size);
    if !args.no_warmup {
        warm_up(&model, &ids[..p.max(1)]);
    }

    let mut tests = Vec::new();
    if p > 0 {
        tests.push(time_prompt(&model, &ids, p, reps));
    }
    let mut paging = None;
    if n > 0 {
        let (tg, pages) = time_generation(&model, pager.as_deref(), &dir, &ids, n, reps);
        tests.push(tg);
        paging = pages;
    }
    if let Some(p) = &pager {
        p.save_usage();
    }
    let mut parallel = if args.parallel.is_empty() {
        Vec::new()
    } else {
        parallel_decode(&model, &args.parallel, args.parallel_ctx, n, reps)
    };
    ParallelResult::relate(&mut parallel);

    let measured = Measured {
        tests,
        parallel,
        load_s,
        budget,
        probe_before,
    };
    let report = report(args, pipeline, strategy.as_ref(), &model, &dir, measured);
    print_report(args, &report, paging.as_ref())
}
