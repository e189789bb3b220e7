//! `rh-inspect`: probe the machine, size the model, and choose how to run
//! it. The decision is written to `strategy.toml` (see
//! [`Pipeline::strategy_path`]), which serve and bench read and their
//! flags override.
//!
//! * [`probe`]: cores, SIMD, caches, RAM, cgroup, huge pages, disk, GPUs,
//!   memory bandwidth;
//! * [`sizes`]: model bytes and bytes read per decoded token;
//! * [`strategy`]: the pure decision function;
//! * this module: the [`Strategy`] file and the stage run.

pub mod probe;
pub mod sizes;
pub mod storage;
pub mod strategy;
mod sys;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::cli::{human_bytes, Classify, Exit};
use crate::fsutil::{self, FsError};
use crate::kernels::{self, Isa};
use crate::pipeline::{defaults, setting_name, threads_setting, Pipeline, SettingError};
use crate::stage::{self, Fingerprint, Output, Plan, Stage, StageError};

pub use probe::Probe;
pub use sizes::{ModelSizes, SizeSource};
pub use strategy::{decide, Overrides};

/// Version of the strategy file layout.
pub const STRATEGY_FORMAT: u32 = 1;

/// Errors of the inspect stage.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// Stage record trouble.
    #[error(transparent)]
    Stage(#[from] StageError),
    /// Reading the model's sizes failed.
    #[error(transparent)]
    Sizes(#[from] sizes::SizesError),
    /// Writing the strategy failed.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// A strategy file that cannot be used.
    #[error("{path}: {reason}; rerun rh-inspect (with --force) to rewrite it")]
    Strategy {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl Classify for InspectError {
    fn exit(&self) -> Exit {
        match self {
            InspectError::Stage(e) => e.exit(),
            _ => Exit::Failure,
        }
    }
}

/// Where the weights go when a GPU is present.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuPlacement {
    /// Everything on the CPU.
    CpuOnly,
    /// Attention, shared experts, embeddings and lm_head on the GPU;
    /// routed experts on the CPU.
    AttentionOnGpu,
    /// The whole model on the GPU.
    AllOnGpu,
}

/// One line of reasoning per choice.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reasons {
    /// Why this many threads.
    pub threads: String,
    /// Why this kernel.
    pub kernel: String,
    /// Why this mmap / populate / mlock policy.
    pub memory: String,
    /// Why this GPU placement.
    pub gpu: String,
    /// How the expected speed was computed.
    pub speed: String,
}

/// The decision, as written to `strategy.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Strategy {
    /// [`STRATEGY_FORMAT`].
    pub format: u32,
    /// Worker threads.
    pub threads: usize,
    /// The instruction-set level the kernels run at; serve and bench cap
    /// the kernels to it ([`Strategy::load_for_use`]).
    pub kernel: Isa,
    /// Map the weights (always true: weights are read in place).
    pub mmap: bool,
    /// Pre-fault the mapping at load (`MAP_POPULATE`).
    pub populate: bool,
    /// Lock the mapping in RAM (`mlock`).
    pub mlock: bool,
    /// Whether weights plus runtime fit in usable RAM.
    pub fits_in_ram: bool,
    /// GPU placement suggestion.
    pub gpu: GpuPlacement,
    /// The GPU meant, when one is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_index: Option<usize>,
    /// Expected decode tokens/s (bandwidth-bound estimate), when measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_tokens_per_s: Option<f64>,
    /// Measured all-thread read bandwidth, GB/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_gbs: Option<f64>,
    /// Weight bytes read per decoded token.
    pub bytes_per_token: u64,
    /// Weight bytes of the model.
    pub model_bytes: u64,
    /// RAM this process could use when probed.
    pub usable_memory: u64,
    /// Where the sizes came from.
    pub sizes_source: SizeSource,
    /// Things a person should know.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Why each choice.
    pub reasons: Reasons,
    /// Storage speed, cold-load time, and the RAM budget with its decode
    /// estimate when the model does not fit ([`storage::advise`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paging: Option<storage::PagingAdvice>,
}

impl Strategy {
    /// Reads a strategy file, refusing other format versions.
    pub fn load(path: &Path) -> Result<Strategy, InspectError> {
        let text = std::fs::read_to_string(path).map_err(|e| FsError::io(path, e))?;
        let bad = |reason: String| InspectError::Strategy {
            path: path.to_path_buf(),
            reason,
        };
        let v: toml::Value =
            toml::from_str(&text).map_err(|e| bad(e.message().replace('\n', " ")))?;
        let found = v.get("format").and_then(|f| f.as_integer()).unwrap_or(0);
        if found != STRATEGY_FORMAT as i64 {
            return Err(bad(format!(
                "strategy format {found}, this tool reads {STRATEGY_FORMAT}"
            )));
        }
        v.try_into()
            .map_err(|e: toml::de::Error| bad(e.message().replace('\n', " ")))
    }

    /// [`Strategy::load`] when the file exists, `None` when it does not.
    pub fn load_if_present(path: &Path) -> Result<Option<Strategy>, InspectError> {
        if path.exists() {
            Strategy::load(path).map(Some)
        } else {
            Ok(None)
        }
    }

    /// What serve and bench use: the strategy when it exists and reads,
    /// with the kernels capped at its `kernel` ([`kernels::limit`]; the
    /// `RH_KERNELS` variable caps too, and the lower cap wins). An
    /// unreadable one is a warning (they fall back to their defaults rather
    /// than refusing to run), a missing one is `None`.
    pub fn load_for_use(path: &Path) -> Option<Strategy> {
        let strategy = match Strategy::load_if_present(path) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("ignoring the strategy: {e}");
                None
            }
        };
        if let Some(s) = &strategy {
            kernels::limit(s.kernel);
        }
        strategy
    }

    /// The file's text (TOML with a comment saying where it came from).
    pub fn to_toml(&self) -> String {
        let body = toml::to_string_pretty(self).expect("strategy serializes to TOML");
        format!(
            "# Written by rh-inspect {}: how to run the model on this machine.\n\
             # rh-serve and rh-bench read it; their flags override it. Rerun rh-inspect to refresh.\n\n{body}",
            env!("CARGO_PKG_VERSION")
        )
    }

    /// Writes the file atomically (temp file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<(), InspectError> {
        fsutil::write_atomic(path, self.to_toml().as_bytes())?;
        Ok(())
    }
}

/// Settings of one inspect run (manifest values with flags applied).
#[derive(Clone, Debug)]
pub struct InspectOptions {
    /// Seconds for the bandwidth probe (0 skips it).
    pub probe_seconds: f64,
    /// Forced thread count.
    pub threads: Option<usize>,
    /// Explain without writing the strategy or the stage record.
    pub dry_run: bool,
    /// Redo even when up to date.
    pub force: bool,
}

/// What rh-inspect's flags say; `None` leaves the manifest's value.
#[derive(Clone, Debug, Default)]
pub struct InspectFlags {
    /// `--probe-seconds`.
    pub probe_seconds: Option<f64>,
    /// `--threads`.
    pub threads: Option<usize>,
    /// `--dry-run`.
    pub dry_run: bool,
    /// `--force`.
    pub force: bool,
}

impl InspectOptions {
    /// The settings of a run, resolved once: a flag wins over the manifest's
    /// `[inspect]` table, which wins over the default
    /// ([`defaults::INSPECT_PROBE_SECONDS`]); values are checked here.
    pub fn resolve(flags: &InspectFlags, p: &Pipeline) -> Result<InspectOptions, SettingError> {
        let probe_seconds = flags
            .probe_seconds
            .or(p.inspect.probe_seconds)
            .unwrap_or(defaults::INSPECT_PROBE_SECONDS);
        if !(probe_seconds >= 0.0 && probe_seconds.is_finite()) {
            let what = setting_name(
                flags.probe_seconds.is_some(),
                "--probe-seconds",
                "[inspect] probe_seconds",
            );
            return Err(SettingError::new(
                &what,
                probe_seconds,
                "must be a number >= 0",
            ));
        }
        let threads = match flags.threads.or(p.inspect.threads) {
            Some(t) => {
                let what = setting_name(flags.threads.is_some(), "--threads", "[inspect] threads");
                Some(threads_setting(&what, t)?)
            }
            None => None,
        };
        Ok(InspectOptions {
            probe_seconds,
            threads,
            dry_run: flags.dry_run,
            force: flags.force,
        })
    }

    /// The manifest's `[inspect]` settings with defaults (no flags).
    pub fn from_pipeline(p: &Pipeline) -> Result<InspectOptions, SettingError> {
        InspectOptions::resolve(&InspectFlags::default(), p)
    }
}

/// What a run found and decided.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// The machine.
    pub probe: Probe,
    /// The model's sizes.
    pub model: ModelSizes,
    /// The decision.
    pub strategy: Strategy,
    /// Where the strategy is (or would be) written.
    pub strategy_path: PathBuf,
    /// Whether this run wrote it.
    pub written: bool,
    /// Whether the stage was already complete and nothing was redone.
    pub up_to_date: bool,
}

/// What the inspect record's `details` hold.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct InspectDetails {
    /// The machine as probed.
    pub probe: Option<Probe>,
    /// The model's sizes.
    pub model: Option<ModelSizes>,
    /// The expected decode speed.
    pub expected_tokens_per_s: Option<f64>,
}

/// The model's sizes for a pipeline: the checkpoint when fetch has produced
/// one (`config.json` present), else the cache when fetch downloaded a
/// published one or repack has written one, else the preset figures.
pub fn model_sizes(p: &Pipeline) -> Result<ModelSizes, InspectError> {
    // A model named explicitly (`rh-inspect MODEL`, `[inspect] model`).
    if let Some(m) = &p.inspect.model {
        let m = p.path(m);
        return Ok(if crate::cache::is_cache(&m) {
            ModelSizes::from_cache(&m)?
        } else {
            ModelSizes::from_checkpoint(&m)?
        });
    }
    let ckpt = p.checkpoint_dir();
    if ckpt.join("config.json").is_file() {
        return Ok(ModelSizes::from_checkpoint(&ckpt)?);
    }
    // A published cache fetched ready to serve: there is no checkpoint,
    // and inspect runs before repack records that it has nothing to do.
    if let Ok(Some(f)) = stage::read_record(&p.work_dir(), Stage::Fetch) {
        let out = std::path::PathBuf::from(&f.output_dir);
        if f.status == stage::Status::Complete
            && crate::cache::published::is_published(&f)
            && crate::cache::is_cache(&out)
        {
            return Ok(ModelSizes::from_cache(&out)?);
        }
    }
    let cache = p.cache_dir();
    let repacked = matches!(
        stage::read_record(&p.work_dir(), Stage::Repack),
        Ok(Some(r)) if r.status == stage::Status::Complete
    );
    if repacked && cache.is_dir() {
        return Ok(ModelSizes::from_cache(&cache)?);
    }
    Ok(ModelSizes::preset())
}

fn fingerprint(p: &Probe, m: &ModelSizes, o: &InspectOptions, out: &Path) -> String {
    let mut f = Fingerprint::new();
    f.add("tool", env!("CARGO_PKG_VERSION"))
        .add("out", out.to_string_lossy().as_bytes())
        .add("probe_seconds", o.probe_seconds.to_string())
        .add("threads", format!("{:?}", o.threads))
        .add("cpu", &p.cpu_model)
        .add(
            "cores",
            format!("{}/{}/{}", p.physical_cores, p.logical_cpus, p.usable_cpus),
        )
        .add("features", p.features.names().join(","))
        .add("mem_total", p.mem_total.to_string())
        .add("cgroup_limit", format!("{:?}", p.cgroup_limit))
        .add("memlock", format!("{:?}", p.memlock_limit))
        .add(
            "sizes",
            format!(
                "{:?}:{}:{}:{}",
                m.source, m.total_bytes, m.per_token_bytes, m.expert_bytes
            ),
        );
    for g in &p.gpus {
        f.add("gpu", format!("{}:{}", g.name, g.memory_total));
    }
    f.finish()
}

/// Runs the inspect stage for a pipeline: probe, size, decide, write the
/// strategy atomically and record the stage. A complete record with the
/// same machine, model and settings (and the strategy file still there)
/// makes this a no-op that returns the recorded report.
pub fn run(p: &Pipeline, o: &InspectOptions) -> Result<Report, InspectError> {
    let work = p.work_dir();
    let out = p.strategy_path();
    let mut probe = probe::probe_static(&work);
    let model = model_sizes(p)?;
    let overrides = Overrides { threads: o.threads };
    if o.dry_run {
        probe::probe_bandwidth(&mut probe, o.probe_seconds);
        let mut strategy = decide(&probe, &model, &overrides);
        let advice = advise_paging(&probe, &model, &strategy, &work, o);
        strategy::add_paging(&mut strategy, advice);
        return Ok(Report {
            probe,
            model,
            strategy,
            strategy_path: out,
            written: false,
            up_to_date: false,
        });
    }
    let fp = fingerprint(&probe, &model, o, &out);
    let out_dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let file_name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "strategy.toml".into());
    let mut inputs = BTreeMap::new();
    inputs.insert("source".to_string(), p.source());
    inputs.insert("sizes".to_string(), model.note.clone());
    match stage::plan(&work, Stage::Inspect, &fp, &out_dir, inputs, o.force)? {
        Plan::UpToDate(rec) => {
            let strategy = Strategy::load(&out)?;
            // An unreadable recorded probe falls back to the one just taken.
            let recorded = rec
                .details_as::<InspectDetails>(&work)
                .ok()
                .and_then(|d| d.probe);
            Ok(Report {
                probe: recorded.unwrap_or(probe),
                model,
                strategy,
                strategy_path: out,
                written: false,
                up_to_date: true,
            })
        }
        Plan::Run(run) => {
            probe::probe_bandwidth(&mut probe, o.probe_seconds);
            let mut strategy = decide(&probe, &model, &overrides);
            let advice = advise_paging(&probe, &model, &strategy, &work, o);
            strategy::add_paging(&mut strategy, advice);
            strategy.save(&out)?;
            let size = std::fs::metadata(&out)
                .map_err(|e| FsError::io(&out, e))?
                .len();
            let hash = fsutil::blake3_file(&out)?;
            let details = InspectDetails {
                probe: Some(probe.clone()),
                model: Some(model.clone()),
                expected_tokens_per_s: strategy.expected_tokens_per_s,
            };
            run.finish(
                vec![Output {
                    path: file_name,
                    size,
                    blake3: Some(hash.to_hex().to_string()),
                }],
                details,
            )?;
            Ok(Report {
                probe,
                model,
                strategy,
                strategy_path: out,
                written: true,
                up_to_date: false,
            })
        }
    }
}

/// Storage speed on the model's disk and, when the model does not fit,
/// the budget and decode estimate ([`storage::advise`]).
fn advise_paging(
    probe: &Probe,
    m: &ModelSizes,
    s: &Strategy,
    work: &Path,
    o: &InspectOptions,
) -> storage::PagingAdvice {
    storage::advise(
        m.path.as_deref(),
        &storage::AdviceInputs {
            model_bytes: m.total_bytes,
            expert_bytes: m.expert_bytes,
            row_read_bytes: m.row_read_bytes,
            per_token_bytes: m.per_token_bytes,
            fits: s.fits_in_ram,
            usable_memory: s.usable_memory,
            bandwidth_gbs: probe.bandwidth.map(|b| b.all_threads_gbs),
            work_dir: work,
            seconds: (o.probe_seconds * 0.75).clamp(0.3, 3.0),
        },
    )
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

impl Report {
    /// The plain-text explanation for a person: the machine, the model,
    /// the strategy with its reasons, and what this run did.
    pub fn human(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(t, "Machine");
        write_cpu(&mut t, &self.probe);
        write_memory(&mut t, &self.probe);
        write_devices(&mut t, &self.probe);
        let _ = writeln!(t, "\nModel");
        write_model(&mut t, &self.model);
        let _ = writeln!(t, "\nStrategy");
        write_strategy(&mut t, &self.strategy, &self.probe.warnings);
        let _ = writeln!(t);
        t.push_str(&self.outcome());
        t.push('\n');
        t
    }

    /// What this run did with the strategy file.
    fn outcome(&self) -> String {
        if self.up_to_date {
            format!(
                "inspect: up to date: {} unchanged (use --force to probe again)",
                self.strategy_path.display()
            )
        } else if self.written {
            format!("inspect: wrote {}", self.strategy_path.display())
        } else {
            format!(
                "inspect: dry run, {} not written",
                self.strategy_path.display()
            )
        }
    }
}

/// CPU model, cores, SIMD features and caches.
fn write_cpu(t: &mut String, p: &Probe) {
    let _ = writeln!(t, "  cpu        {} ({})", p.cpu_model, p.arch);
    let _ = writeln!(
        t,
        "  cores      {} physical, {} logical, {} usable by this process",
        p.physical_cores, p.logical_cpus, p.usable_cpus
    );
    let feats = p.features.names();
    let _ = writeln!(
        t,
        "  simd       {}",
        if feats.is_empty() {
            "none detected".to_string()
        } else {
            feats.join(" ")
        }
    );
    if !p.caches.is_empty() {
        let c: Vec<String> = p
            .caches
            .iter()
            .map(|c| {
                format!(
                    "L{}{} {}",
                    c.level,
                    match c.kind.as_str() {
                        "Data" => "d",
                        "Instruction" => "i",
                        _ => "",
                    },
                    human_bytes(c.size_bytes)
                )
            })
            .collect();
        let _ = writeln!(t, "  caches     {}", c.join(", "));
    }
}

/// RAM, swap, huge pages, the memlock limit and the disk.
fn write_memory(t: &mut String, p: &Probe) {
    let _ = writeln!(
        t,
        "  ram        {} total, {} available, {} usable{}",
        human_bytes(p.mem_total),
        human_bytes(p.mem_available),
        human_bytes(p.usable_memory()),
        match p.cgroup_limit {
            Some(l) => format!(" (cgroup limit {})", human_bytes(l)),
            None => String::new(),
        }
    );
    let _ = writeln!(
        t,
        "  swap       {} total, {} free",
        human_bytes(p.swap_total),
        human_bytes(p.swap_free)
    );
    let _ = writeln!(
        t,
        "  hugepages  {} x {} reserved ({} free), THP {}",
        p.huge_pages.total,
        human_bytes(p.huge_pages.page_bytes),
        p.huge_pages.free,
        p.huge_pages.thp.as_deref().unwrap_or("unknown")
    );
    let _ = writeln!(
        t,
        "  memlock    {}",
        p.memlock_limit
            .map(human_bytes)
            .unwrap_or_else(|| "unlimited".into())
    );
    if let Some(d) = &p.disk {
        let _ = writeln!(
            t,
            "  disk       {} free of {} at {}",
            human_bytes(d.free),
            human_bytes(d.total),
            d.path.display()
        );
    }
}

/// GPUs and the measured bandwidth.
fn write_devices(t: &mut String, p: &Probe) {
    if p.gpus.is_empty() {
        let _ = writeln!(t, "  gpu        none");
    }
    for g in &p.gpus {
        let _ = writeln!(
            t,
            "  gpu {}      {}: {} total, {} free",
            g.index,
            g.name,
            human_bytes(g.memory_total),
            human_bytes(g.memory_free)
        );
    }
    match &p.bandwidth {
        Some(b) => {
            let _ = writeln!(
                t,
                "  bandwidth  {:.1} GB/s one thread, {:.1} GB/s on {} threads ({} buffer)",
                b.single_thread_gbs,
                b.all_threads_gbs,
                b.threads,
                human_bytes(b.buffer_bytes as u64)
            );
        }
        None => {
            let _ = writeln!(t, "  bandwidth  not measured");
        }
    }
}

fn write_model(t: &mut String, m: &ModelSizes) {
    let _ = writeln!(
        t,
        "  weights    {} ({} routed experts), {:.2} GB read per token",
        human_bytes(m.total_bytes),
        human_bytes(m.expert_bytes),
        m.per_token_bytes as f64 / 1e9
    );
    let _ = writeln!(t, "  source     {}", m.note);
}

/// Each choice with its reason, then the warnings.
fn write_strategy(t: &mut String, s: &Strategy, probe_warnings: &[String]) {
    let _ = writeln!(t, "  threads    {}", s.reasons.threads);
    let _ = writeln!(t, "  kernel     {}", s.reasons.kernel);
    let _ = writeln!(
        t,
        "  memory     {} (fits in RAM: {})",
        s.reasons.memory,
        yes(s.fits_in_ram)
    );
    let _ = writeln!(t, "  gpu        {}", s.reasons.gpu);
    let _ = writeln!(t, "  speed      {}", s.reasons.speed);
    if let Some(pg) = &s.paging {
        let _ = writeln!(t, "  storage    {}", pg.reason);
        if let Some(b) = pg.memory_budget {
            let _ = writeln!(
                t,
                "  budget     rh-serve/rh-bench default to --memory-budget {} (routed experts beyond it are paged)",
                human_bytes(b)
            );
        }
    }
    for w in probe_warnings.iter().chain(&s.warnings) {
        let _ = writeln!(t, "  warning    {w}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategy_round_trips_through_toml() {
        let d = tempfile::tempdir().unwrap();
        let p = probe::probe_static(d.path());
        let s = decide(&p, &ModelSizes::preset(), &Overrides::default());
        let f = d.path().join("strategy.toml");
        s.save(&f).unwrap();
        assert_eq!(Strategy::load(&f).unwrap(), s);
        assert_eq!(Strategy::load_if_present(&f).unwrap(), Some(s));
        assert!(Strategy::load_if_present(&d.path().join("none.toml"))
            .unwrap()
            .is_none());
        std::fs::write(&f, "format = 7\n").unwrap();
        let e = Strategy::load(&f).unwrap_err().to_string();
        assert!(e.contains("format 7") && e.contains("strategy.toml"), "{e}");
    }
}
