//! `pipeline.toml`: the manifest that chains the stages.
//!
//! Every key is optional; [`Pipeline::resolve_*`] methods apply the
//! documented defaults (see `docs/pipeline.md`). Unknown keys are an error
//! naming the key and the file, so a typo never silently does nothing.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::cli::{Classify, Exit};

/// The default model source.
pub const DEFAULT_SOURCE: &str = "hf:Intel/Qwen3-Next-80B-A3B-Thinking-int4-mixed-AutoRound";

/// The documented defaults of the manifest's keys, one constant each, so a
/// binary never carries its own `unwrap_or(2048)`. A test reads the tables
/// of docs/pipeline.md and checks every default stated there against
/// these. (rh-serve and rh-bench still write some of these numbers in
/// their own `main.rs`, which other work is changing now; they are to use
/// these constants.)
pub mod defaults {
    /// `[model] work_dir`.
    pub const WORK_DIR: &str = "work";
    /// `[model] revision`.
    pub const REVISION: &str = "main";
    /// `[fetch] concurrency`: files downloaded at once.
    pub const FETCH_CONCURRENCY: usize = 4;
    /// `[fetch] offline`.
    pub const FETCH_OFFLINE: bool = false;
    /// `[fetch] seed`: synthetic sources' random seed.
    pub const FETCH_SEED: u64 = 0;
    /// `[inspect] probe_seconds`: time on the memory-bandwidth probe.
    pub const INSPECT_PROBE_SECONDS: f64 = 2.0;
    /// `[repack] file_size_mib`: the largest cache data file (the unit of
    /// resume).
    pub const REPACK_FILE_SIZE_MIB: u64 = 2048;
    /// `[repack] lm_head`: keep the checkpoint's lm_head.
    pub const REPACK_LM_HEAD: &str = "as-is";
    /// `[verify] quick`.
    pub const VERIFY_QUICK: bool = false;
    /// `[serve] min_p`.
    pub const SERVE_MIN_P: f32 = 0.0;
    /// `[serve] repeat_penalty` (off).
    pub const SERVE_REPEAT_PENALTY: f32 = 1.0;
    /// `[serve] max_tokens`: the longest answer.
    pub const SERVE_MAX_TOKENS: usize = 512;
    /// `[serve] ctx_size`: context size in tokens.
    pub const SERVE_CTX_SIZE: usize = 8192;
    /// `[serve] thinking`.
    pub const SERVE_THINKING: bool = false;
    /// `[serve] queue`: requests that may wait behind the running batch.
    pub const SERVE_QUEUE: usize = 16;
    /// `[serve] parallel`: most requests generating at once (continuous
    /// batching); each sequence's state is small next to the weights.
    pub const SERVE_PARALLEL: usize = 4;
    /// `[bench] prompt_tokens`: tokens of the pp test.
    pub const BENCH_PROMPT_TOKENS: usize = 512;
    /// `[bench] gen_tokens`: tokens of the tg test.
    pub const BENCH_GEN_TOKENS: usize = 128;
    /// `[bench] repetitions`.
    pub const BENCH_REPETITIONS: usize = 3;
}

/// A setting from a flag or the manifest that cannot be used (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{what} {value}: {reason}")]
pub struct SettingError {
    /// The flag and manifest key, e.g. `--threads (or [repack] threads)`.
    pub what: String,
    /// The value given.
    pub value: String,
    /// What it must be.
    pub reason: String,
}

impl SettingError {
    /// A setting `what` whose `value` is not `reason`.
    pub fn new(what: &str, value: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        SettingError {
            what: what.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

impl Classify for SettingError {
    fn exit(&self) -> Exit {
        Exit::Usage
    }
}

/// A stage's settings that cannot be used: a flag or manifest value, or an
/// environment variable (exit 2 either way).
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A flag or manifest value.
    #[error(transparent)]
    Setting(#[from] SettingError),
    /// An environment variable.
    #[error(transparent)]
    Env(#[from] crate::env::EnvError),
}

impl Classify for SettingsError {
    fn exit(&self) -> Exit {
        Exit::Usage
    }
}

/// How a setting is named in a message: the flag when the flag gave it,
/// else the manifest key.
pub fn setting_name(from_flag: bool, flag: &str, key: &str) -> String {
    if from_flag {
        flag.to_string()
    } else {
        key.to_string()
    }
}

/// A thread count from a flag or the manifest (`what` names it), checked.
pub fn threads_setting(what: &str, n: usize) -> Result<usize, SettingError> {
    if n == 0 || n > MAX_THREADS {
        return Err(SettingError::new(
            what,
            n,
            format!("must be 1 to {MAX_THREADS}"),
        ));
    }
    Ok(n)
}

/// Most worker threads any stage accepts: far above any CPU this runs on,
/// low enough that a typo (`100000`) is an error rather than a machine
/// spending minutes creating threads.
pub const MAX_THREADS: usize = 1024;

/// Checks a thread count from a flag or the manifest (`what` names it):
/// [`threads_setting`] for callers that only check.
pub fn check_threads(what: &str, n: usize) -> Result<(), SettingError> {
    threads_setting(what, n).map(|_| ())
}

/// Errors reading the manifest.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// `--pipeline FILE` was given but the file does not exist.
    #[error("{0}: pipeline manifest not found (pass an existing file to --pipeline, or omit it to use defaults)")]
    Missing(PathBuf),
    /// The file could not be read.
    #[error("{path}: cannot read pipeline manifest: {source}")]
    Read {
        /// The manifest.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax error or a wrong/unknown key.
    #[error("{path}: {message}")]
    Parse {
        /// The manifest.
        path: PathBuf,
        /// The parser's message, flattened to one line.
        message: String,
    },
}

impl Classify for PipelineError {
    fn exit(&self) -> Exit {
        Exit::Usage
    }
}

/// The whole manifest.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// What model, and where the work goes.
    #[serde(default)]
    pub model: ModelTable,
    /// `rh-fetch` settings.
    #[serde(default)]
    pub fetch: FetchTable,
    /// `rh-inspect` settings.
    #[serde(default)]
    pub inspect: InspectTable,
    /// `rh-repack` settings.
    #[serde(default)]
    pub repack: RepackTable,
    /// `rh-verify` settings.
    #[serde(default)]
    pub verify: VerifyTable,
    /// `rh-serve` settings.
    #[serde(default)]
    pub serve: ServeTable,
    /// `rh-bench` settings.
    #[serde(default)]
    pub bench: BenchTable,
    /// Where the manifest was read from (directory used to resolve relative paths).
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The manifest file, if one was read.
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

/// `[model]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelTable {
    /// `hf:ORG/REPO[@REV]`, `dir:PATH` or `synthetic:PRESET`. Default: [`DEFAULT_SOURCE`].
    pub source: Option<String>,
    /// Hub revision (branch, tag or commit). Default `main`.
    pub revision: Option<String>,
    /// Where stage outputs and checkpoint records go. Default `work`.
    pub work_dir: Option<PathBuf>,
}

/// `[fetch]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FetchTable {
    /// Output checkpoint directory. Default `<work_dir>/checkpoint`.
    pub out: Option<PathBuf>,
    /// Glob patterns of files to fetch (default: all).
    pub include: Option<Vec<String>>,
    /// Glob patterns of files to skip.
    pub exclude: Option<Vec<String>>,
    /// Files downloaded at once. Default 4.
    pub concurrency: Option<usize>,
    /// Use only what is already cached. Default false.
    pub offline: Option<bool>,
    /// Synthetic sources: number of layers (overrides the preset).
    pub layers: Option<usize>,
    /// Synthetic sources: routed experts per layer (overrides the preset).
    pub experts: Option<usize>,
    /// Synthetic sources: random seed. Default 0.
    pub seed: Option<u64>,
}

/// `[inspect]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InspectTable {
    /// Where the strategy is written. Default `<work_dir>/strategy.toml`.
    pub out: Option<PathBuf>,
    /// Seconds spent on the memory-bandwidth probe. Default 2.
    pub probe_seconds: Option<f64>,
    /// Force a thread count instead of the probed choice.
    pub threads: Option<usize>,
    /// The model to size (a checkpoint or a cache directory). Default:
    /// fetch's checkpoint, else repack's cache, else the preset figures.
    pub model: Option<PathBuf>,
}

/// `[repack]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RepackTable {
    /// Input checkpoint directory. Default: fetch's output.
    pub checkpoint: Option<PathBuf>,
    /// Output cache directory. Default `<work_dir>/cache`.
    pub cache: Option<PathBuf>,
    /// Largest cache data file in MiB. Default 2048.
    pub file_size_mib: Option<u64>,
    /// Worker threads. Default: all cores.
    pub threads: Option<usize>,
    /// `"int8"` stores a float lm_head as int8 per group of 128 (lossy,
    /// half the bytes); `"as-is"` (default) keeps the checkpoint's.
    pub lm_head: Option<String>,
}

/// `[verify]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyTable {
    /// Cache directory to check. Default: repack's output.
    pub cache: Option<PathBuf>,
    /// Expected manifest hash (from whoever shared the cache).
    pub expect: Option<String>,
    /// Only sizes, header and index. Default false.
    pub quick: Option<bool>,
}

/// `[serve]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServeTable {
    /// Model to load: a cache or checkpoint directory. Default: repack's output.
    pub model: Option<PathBuf>,
    /// Strategy file. Default `<work_dir>/strategy.toml` when present.
    pub strategy: Option<PathBuf>,
    /// Sampling temperature (default from generation_config.json).
    pub temperature: Option<f32>,
    /// Top-k (default from generation_config.json).
    pub top_k: Option<usize>,
    /// Top-p (default from generation_config.json).
    pub top_p: Option<f32>,
    /// Min-p. Default 0.
    pub min_p: Option<f32>,
    /// Repetition penalty. Default 1.0 (off).
    pub repeat_penalty: Option<f32>,
    /// RNG seed. Default: random.
    pub seed: Option<u64>,
    /// Longest answer in tokens. Default 512.
    pub max_tokens: Option<usize>,
    /// Context size in tokens. Default 8192.
    pub ctx_size: Option<usize>,
    /// System prompt.
    pub system: Option<String>,
    /// Show the model's reasoning. Default false.
    pub thinking: Option<bool>,
    /// Worker threads. Default: the strategy's.
    pub threads: Option<usize>,
    /// Serve HTTP on this address (`rh-serve --listen`), e.g. `127.0.0.1:8080`.
    pub listen: Option<String>,
    /// Requests that may wait behind the running batch (`--queue`). Default 16.
    pub queue: Option<usize>,
    /// Most requests generating at once (`--parallel`). Default 4.
    pub parallel: Option<usize>,
    /// RAM for kept prompt states, MiB (`--cache-ram`).
    pub cache_ram: Option<usize>,
    /// RAM budget for the model, e.g. `"24G"` (`--memory-budget`): routed
    /// experts beyond it are paged. Default: the strategy's, else none.
    pub memory_budget: Option<String>,
}

/// `[bench]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BenchTable {
    /// Model to benchmark. Default: repack's output.
    pub model: Option<PathBuf>,
    /// Prompt tokens for the pp test. Default 512.
    pub prompt_tokens: Option<usize>,
    /// Generated tokens for the tg test. Default 128.
    pub gen_tokens: Option<usize>,
    /// Repetitions. Default 3.
    pub repetitions: Option<usize>,
    /// Worker threads. Default: the strategy's.
    pub threads: Option<usize>,
    /// RAM budget for the model, e.g. `"3G"` (`--memory-budget`).
    pub memory_budget: Option<String>,
}

impl Pipeline {
    /// Reads the manifest: `explicit` if given (it must exist), else
    /// `./pipeline.toml` when present, else all defaults.
    pub fn discover(explicit: Option<&Path>) -> Result<Pipeline, PipelineError> {
        match explicit {
            Some(p) => {
                if !p.exists() {
                    return Err(PipelineError::Missing(p.to_path_buf()));
                }
                Pipeline::load(p)
            }
            None => {
                let p = Path::new("pipeline.toml");
                if p.exists() {
                    Pipeline::load(p)
                } else {
                    Ok(Pipeline {
                        base_dir: PathBuf::from("."),
                        ..Default::default()
                    })
                }
            }
        }
    }

    /// Reads and parses one manifest file.
    pub fn load(path: &Path) -> Result<Pipeline, PipelineError> {
        let bytes = crate::fsutil::read_regular(path).map_err(|e| PipelineError::Read {
            path: path.to_path_buf(),
            source: match e {
                crate::fsutil::FsError::Io { source, .. } => source,
                other => std::io::Error::other(crate::cli::one_line(&other)),
            },
        })?;
        let text = String::from_utf8(bytes).map_err(|_| PipelineError::Parse {
            path: path.to_path_buf(),
            message: "not UTF-8".into(),
        })?;
        let mut p: Pipeline = toml::from_str(&text).map_err(|e| PipelineError::Parse {
            path: path.to_path_buf(),
            message: toml_message(&e),
        })?;
        p.base_dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        p.file = Some(path.to_path_buf());
        let sampling = crate::sample::SamplingParams {
            temperature: p.serve.temperature.unwrap_or(0.0),
            top_p: p.serve.top_p.unwrap_or(1.0),
            min_p: p.serve.min_p.unwrap_or(0.0),
            repeat_penalty: p.serve.repeat_penalty.unwrap_or(1.0),
            ..Default::default()
        };
        sampling.validate().map_err(|m| PipelineError::Parse {
            path: path.to_path_buf(),
            message: format!("[serve] {m}"),
        })?;
        for (key, n) in [
            ("inspect.threads", p.inspect.threads),
            ("repack.threads", p.repack.threads),
            ("serve.threads", p.serve.threads),
            ("bench.threads", p.bench.threads),
        ] {
            if let Some(n) = n {
                check_threads(key, n).map_err(|e| PipelineError::Parse {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?;
            }
        }
        Ok(p)
    }

    /// A path from the manifest, relative to the manifest's directory.
    pub fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// The model source (default [`DEFAULT_SOURCE`]).
    pub fn source(&self) -> String {
        self.model
            .source
            .clone()
            .unwrap_or_else(|| DEFAULT_SOURCE.to_string())
    }

    /// The work directory (default `work`).
    pub fn work_dir(&self) -> PathBuf {
        self.path(self.model.work_dir.as_deref().unwrap_or(Path::new("work")))
    }

    /// Fetch's output directory.
    pub fn checkpoint_dir(&self) -> PathBuf {
        match &self.fetch.out {
            Some(p) => self.path(p),
            None => self.work_dir().join("checkpoint"),
        }
    }

    /// Repack's input: `[repack] checkpoint`, else fetch's output.
    pub fn repack_input(&self) -> PathBuf {
        match &self.repack.checkpoint {
            Some(p) => self.path(p),
            None => self.checkpoint_dir(),
        }
    }

    /// Repack's output cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        match &self.repack.cache {
            Some(p) => self.path(p),
            None => self.work_dir().join("cache"),
        }
    }

    /// Where inspect writes (and serve/bench read) the strategy.
    pub fn strategy_path(&self) -> PathBuf {
        match &self.inspect.out {
            Some(p) => self.path(p),
            None => self.work_dir().join("strategy.toml"),
        }
    }
}

/// toml's error messages span several lines with a source excerpt; keep the
/// first line and the key/line information in one line.
fn toml_message(e: &toml::de::Error) -> String {
    let msg = e.message().replace('\n', " ");
    match e.span() {
        Some(span) => format!("{msg} (at byte {}; fix or remove that key)", span.start),
        None => msg,
    }
}

#[cfg(test)]
mod tests {

    /// Every default docs/pipeline.md states for a key that has a named
    /// constant is that constant.
    #[test]
    fn documented_defaults_are_the_constants() {
        use super::defaults::*;
        let doc = include_str!("../../../docs/pipeline.md");
        let mut table = String::new();
        let mut stated = std::collections::BTreeMap::new();
        for line in doc.lines() {
            if let Some(rest) = line.strip_prefix("## `[") {
                table = rest.split(']').next().unwrap_or("").to_string();
                continue;
            }
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            if cells.len() >= 4 && cells[1].starts_with('`') && !table.is_empty() {
                let key = cells[1].trim_matches('`').to_string();
                stated.insert((table.clone(), key), cells[2].to_string());
            }
        }
        let want: Vec<(&str, &str, String)> = vec![
            (
                "model",
                "source",
                format!("`{}`", super::DEFAULT_SOURCE.trim_start_matches("hf:")),
            ),
            ("model", "revision", format!("`{REVISION}`")),
            ("model", "work_dir", format!("`{WORK_DIR}`")),
            ("fetch", "concurrency", format!("`{FETCH_CONCURRENCY}`")),
            ("fetch", "offline", format!("`{FETCH_OFFLINE}`")),
            ("fetch", "seed", format!("`{FETCH_SEED}`")),
            (
                "inspect",
                "probe_seconds",
                format!("`{INSPECT_PROBE_SECONDS:?}`"),
            ),
            (
                "repack",
                "file_size_mib",
                format!("`{REPACK_FILE_SIZE_MIB}`"),
            ),
            ("repack", "lm_head", format!("`{REPACK_LM_HEAD}`")),
            ("verify", "quick", format!("`{VERIFY_QUICK}`")),
            ("serve", "min_p", format!("`{SERVE_MIN_P}`")),
            (
                "serve",
                "repeat_penalty",
                format!("`{SERVE_REPEAT_PENALTY:?}` (off)"),
            ),
            ("serve", "max_tokens", format!("`{SERVE_MAX_TOKENS}`")),
            ("serve", "ctx_size", format!("`{SERVE_CTX_SIZE}`")),
            ("serve", "thinking", format!("`{SERVE_THINKING}`")),
            ("serve", "queue", format!("`{SERVE_QUEUE}`")),
            ("serve", "parallel", format!("`{SERVE_PARALLEL}`")),
            ("bench", "prompt_tokens", format!("`{BENCH_PROMPT_TOKENS}`")),
            ("bench", "gen_tokens", format!("`{BENCH_GEN_TOKENS}`")),
            ("bench", "repetitions", format!("`{BENCH_REPETITIONS}`")),
        ];
        for (t, k, value) in want {
            let doc_value = stated
                .get(&(t.to_string(), k.to_string()))
                .unwrap_or_else(|| panic!("docs/pipeline.md: no `{k}` row under [{t}]"));
            let doc_value = doc_value.replace("`hf:", "`");
            assert_eq!(doc_value, value, "docs/pipeline.md [{t}] {k}");
        }
    }
    use super::*;

    #[test]
    fn unknown_key_names_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pipeline.toml");
        std::fs::write(&f, "[repack]\nthreds = 2\n").unwrap();
        let e = Pipeline::load(&f).unwrap_err().to_string();
        assert!(e.contains("threds"), "{e}");
        assert!(e.contains("pipeline.toml"), "{e}");
    }

    #[test]
    fn paths_resolve_against_manifest_dir() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pipeline.toml");
        std::fs::write(
            &f,
            "[model]\nsource = \"synthetic:tiny\"\nwork_dir = \"w\"\n",
        )
        .unwrap();
        let p = Pipeline::load(&f).unwrap();
        assert_eq!(p.work_dir(), dir.path().join("w"));
        assert_eq!(p.cache_dir(), dir.path().join("w/cache"));
        assert_eq!(p.source(), "synthetic:tiny");
    }
}
