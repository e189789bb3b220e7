//! The read speed of the disk holding the model: sequential (loading a cold
//! cache) and random reads of expert size (paging experts under a RAM
//! budget). Measured on the model's own files with `O_DIRECT`, so the page
//! cache neither helps nor keeps what was read; where `O_DIRECT` is refused
//! the figure is marked as possibly served from the page cache.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::direct_io::{aligned_base, DataFile, DIRECT_ALIGN};

/// Measured read speeds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StorageSpeed {
    /// Sequential reads of 8 MiB, one at a time, GB/s.
    pub sequential_gbs: f64,
    /// Random reads of `random_block` bytes, one at a time, GB/s (the
    /// median of short samples taken in turn with `random_gbs`'s).
    pub random_qd1_gbs: f64,
    /// Random reads of `random_block` bytes, `queue_depth` at a time (as
    /// the expert cache issues them), GB/s (the median of short samples).
    pub random_gbs: f64,
    /// Bytes per random read.
    pub random_block: u64,
    /// Reads in flight for `random_gbs`.
    pub queue_depth: usize,
    /// Whether the reads bypassed the page cache.
    pub direct: bool,
    /// Bytes of the files read from.
    pub file_bytes: u64,
}

/// The largest regular files of `dir` (data files of a cache, shards of a
/// checkpoint), biggest first.
pub fn model_files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut v: Vec<(PathBuf, u64)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let m = std::fs::metadata(e.path()).ok()?;
            (m.is_file() && m.len() >= 64 << 20).then(|| (e.path(), m.len()))
        })
        .collect();
    v.sort_by_key(|f| std::cmp::Reverse(f.1));
    v
}

/// A SplitMix64 step (offsets need not be cryptographic).
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Measures the files of `dir`: about `seconds` in all, split over the
/// three tests. `None` when the directory holds no file of 64 MiB or more.
pub fn measure(
    dir: &Path,
    random_block: usize,
    queue_depth: usize,
    seconds: f64,
) -> Option<StorageSpeed> {
    let files: Vec<(DataFile, u64)> = model_files(dir)
        .into_iter()
        .filter_map(|(p, n)| Some((DataFile::open(&p).ok()?, n)))
        .collect();
    if files.is_empty() {
        return None;
    }
    let block = random_block.div_ceil(DIRECT_ALIGN).max(1) * DIRECT_ALIGN;
    let budget = Duration::from_secs_f64(seconds.max(0.3) / 3.0);
    let seq = sequential(&files[0], budget);
    // Short samples of both depths taken in turn, the median of each: a
    // shared disk's speed swings from second to second, and one sample
    // per depth catches one moment (0.95-1.92 GB/s within minutes, here).
    let part = budget / RANDOM_SAMPLES as u32;
    let (mut qd1, mut qd) = (Vec::new(), Vec::new());
    for _ in 0..RANDOM_SAMPLES {
        qd1.push(random(&files, block, 1, part));
        qd.push(random(&files, block, queue_depth.max(1), part));
    }
    Some(StorageSpeed {
        sequential_gbs: seq,
        random_qd1_gbs: median(&mut qd1),
        random_gbs: median(&mut qd),
        random_block: block as u64,
        queue_depth: queue_depth.max(1),
        direct: files.iter().all(|(f, _)| f.is_direct()),
        file_bytes: files.iter().map(|(_, n)| n).sum(),
    })
}

/// Sequential 8 MiB reads from a random starting point of the file.
fn sequential((file, len): &(DataFile, u64), budget: Duration) -> f64 {
    let chunk = 8usize << 20;
    let mut buf = vec![0u8; chunk + DIRECT_ALIGN];
    let base = aligned_base(&buf);
    let dst = &mut buf[base..base + chunk];
    let blocks = (len / chunk as u64).max(1);
    let mut state = Instant::now().elapsed().as_nanos() as u64 ^ 0x5EED;
    let mut at = next(&mut state) % blocks;
    let (t0, mut bytes) = (Instant::now(), 0u64);
    while t0.elapsed() < budget {
        if file.read_at(dst, at * chunk as u64, 0).is_err() {
            break;
        }
        bytes += chunk as u64;
        at = (at + 1) % blocks;
    }
    bytes as f64 / t0.elapsed().as_secs_f64().max(1e-9) / 1e9
}

/// Samples per random-read depth ([`measure`]).
const RANDOM_SAMPLES: usize = 3;

/// The median of `v` (the upper one of an even count); 0 when empty.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// `depth` threads each reading `block` bytes at random aligned offsets.
fn random(files: &[(DataFile, u64)], block: usize, depth: usize, budget: Duration) -> f64 {
    let bytes = AtomicU64::new(0);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for t in 0..depth {
            let bytes = &bytes;
            s.spawn(move || {
                let mut buf = vec![0u8; block + DIRECT_ALIGN];
                let base = aligned_base(&buf);
                let dst = &mut buf[base..base + block];
                let mut state = (t as u64 + 1).wrapping_mul(0x1234_5678_9ABC_DEF1)
                    ^ t0.elapsed().as_nanos() as u64;
                while t0.elapsed() < budget {
                    let (f, len) = &files[(next(&mut state) % files.len() as u64) as usize];
                    let slots = (len / DIRECT_ALIGN as u64)
                        .saturating_sub(block as u64 / DIRECT_ALIGN as u64)
                        .max(1);
                    let off = next(&mut state) % slots * DIRECT_ALIGN as u64;
                    if f.read_at(dst, off, 0).is_err() {
                        break;
                    }
                    bytes.fetch_add(block as u64, Ordering::Relaxed);
                }
            });
        }
    });
    bytes.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64().max(1e-9) / 1e9
}

/// Seconds to read `bytes` sequentially at `speed`.
pub fn cold_load_s(bytes: u64, speed: &StorageSpeed) -> Option<f64> {
    (speed.sequential_gbs > 0.0).then(|| bytes as f64 / (speed.sequential_gbs * 1e9))
}

/// Zipf exponent assumed for expert popularity when no usage counts of
/// this model exist yet (the value `synthetic:...,zipf=S` suggests; see
/// docs/pipeline.md). Uniform routing is reported beside it as the worst
/// case.
pub const ASSUMED_ZIPF: f64 = 0.6;

/// What inspect tells serve and bench about storage and paging (the
/// `[paging]` table of `strategy.toml`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PagingAdvice {
    /// RAM budget for `--memory-budget` when the model does not fit:
    /// 85% of the usable RAM (the rest for the system and other programs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_budget: Option<u64>,
    /// Seconds to read the model from a cold page cache (sequentially).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_load_s: Option<f64>,
    /// The measured read speeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageSpeed>,
    /// The decode estimate under the budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<PagingEstimate>,
    /// Why (or why nothing was measured).
    #[serde(default)]
    pub reason: String,
}

/// Decode under a RAM budget, predicted from the sizes, the storage's
/// random-read speed, the memory bandwidth and the routing skew.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PagingEstimate {
    /// Experts the cache would hold.
    pub cached_experts: u64,
    /// Routed experts in the model.
    pub experts: u64,
    /// Where the skew came from: `usage counts` or `assumed zipf 0.6`.
    pub skew_source: String,
    /// Share of routed experts found resident, skewed / uniform routing.
    pub hit_rate: f64,
    /// The same for uniform routing (the worst case).
    pub hit_rate_uniform: f64,
    /// Expert bytes read from storage per token (skewed).
    pub missed_bytes_per_token: u64,
    /// Expected decode tokens/s (skewed): the longer of the memory time
    /// and the storage time per token (reads overlap compute).
    pub tokens_per_s: f64,
    /// Expected decode tokens/s with uniform routing.
    pub tokens_per_s_uniform: f64,
}

/// The routing shape inspect needs: layers, experts per layer, top-k.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Routing {
    /// MoE layers.
    pub layers: usize,
    /// Routed experts per layer.
    pub experts: usize,
    /// Experts per token per layer.
    pub top_k: usize,
}

impl Routing {
    /// Qwen3-Next-80B-A3B's.
    pub const PRESET: Routing = Routing {
        layers: 48,
        experts: 512,
        top_k: 10,
    };

    /// Read from a model directory's config (a cache's index or a
    /// checkpoint's config.json); `None` when absent or unreadable.
    pub fn of(dir: &Path) -> Option<Routing> {
        let (json, path) = if crate::cache::is_cache(dir) {
            let (_, index) = crate::cache::read::read_index(dir).ok()?;
            (
                index.config_json.clone(),
                dir.join(crate::cache::INDEX_FILE),
            )
        } else {
            let p = dir.join("config.json");
            (std::fs::read(&p).ok()?, p)
        };
        let c = crate::config::ModelConfig::from_json(&json, &path).ok()?;
        (c.num_experts > 0).then_some(Routing {
            layers: c.num_hidden_layers,
            experts: c.num_experts,
            top_k: c.num_experts_per_tok,
        })
    }
}

/// Share of a layer's routings that fall on its `held` most used experts,
/// for use counts `counts` (any order).
fn hit_rate_of(counts: &[f64], held: usize) -> f64 {
    let mut c = counts.to_vec();
    c.sort_by(|a, b| b.total_cmp(a));
    let total: f64 = c.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    c.iter().take(held).sum::<f64>() / total
}

/// Predicts decode under `budget`: the cache holds the most used experts
/// of each layer (what LFU converges to), so a token misses the routings
/// that fall outside them. `usage` are per-layer use counts of this model
/// (`expert-usage.json`) when known, else Zipf [`ASSUMED_ZIPF`].
#[allow(clippy::too_many_arguments)]
pub fn estimate(
    budget: u64,
    resident_bytes: u64,
    expert_bytes: u64,
    per_token_bytes: u64,
    routing: Routing,
    bandwidth_gbs: f64,
    random_gbs: f64,
    usage: Option<&[Vec<u64>]>,
) -> Option<PagingEstimate> {
    let n = (routing.layers * routing.experts) as u64;
    if n == 0 || bandwidth_gbs <= 0.0 || random_gbs <= 0.0 {
        return None;
    }
    let expert = expert_bytes / n;
    let overhead = (256 << 20) + budget / 33;
    let free = budget.saturating_sub(resident_bytes + overhead);
    let cached = (free / expert.max(1)).min(n);
    let per_layer = (cached as usize / routing.layers.max(1)).min(routing.experts);
    let uniform = per_layer as f64 / routing.experts as f64;
    // Counts from a few tokens over-fit (a handful of experts seem to
    // take everything): they are used from 20 routings per expert on.
    let enough = (20 * routing.experts * routing.layers) as u64;
    let (hit, source) = match usage {
        Some(u) if u.len() == routing.layers && u.iter().flatten().sum::<u64>() >= enough => {
            let h: f64 = u
                .iter()
                .map(|l| hit_rate_of(&l.iter().map(|&c| c as f64).collect::<Vec<_>>(), per_layer))
                .sum::<f64>()
                / routing.layers as f64;
            (h, "usage counts of this model".to_string())
        }
        _ => {
            let zipf: Vec<f64> = (1..=routing.experts)
                .map(|r| (r as f64).powf(-ASSUMED_ZIPF))
                .collect();
            (
                hit_rate_of(&zipf, per_layer),
                format!("assumed Zipf {ASSUMED_ZIPF}"),
            )
        }
    };
    let routed = (routing.layers * routing.top_k) as f64;
    // Decode reaches about 60% of the read bandwidth (see the speed
    // reason). The pager reads a layer's missing experts while its
    // resident ones and the shared expert compute, and the next layer's
    // predicted ones ahead, so a token takes about the longer of the two
    // times, not their sum: on the 8-layer bench cache under a 40% cgroup
    // limit (2026-11-30; 912 and 1209 experts held, random reads at
    // 1.02-1.32 GB/s) decode ran at 10.4-12.9 tokens/s, against 10.1-13.5
    // predicted this way and 6.8-8.2 with the times added.
    let memory_s = per_token_bytes as f64 / (0.6 * bandwidth_gbs * 1e9);
    let tps = |h: f64| {
        let missed = routed * (1.0 - h) * expert as f64;
        1.0 / memory_s.max(missed / (random_gbs * 1e9))
    };
    Some(PagingEstimate {
        cached_experts: cached,
        experts: n,
        skew_source: source,
        hit_rate: hit,
        hit_rate_uniform: uniform,
        missed_bytes_per_token: (routed * (1.0 - hit) * expert as f64) as u64,
        tokens_per_s: tps(hit),
        tokens_per_s_uniform: tps(uniform),
    })
}

/// What `rh-serve --listen` keeps beside the model under `budget` with
/// its defaults: `parallel` sequences at the full `ctx_size` (when the
/// model's config is known) and its prompt cache.
fn serve_reserve(config: Option<&crate::config::ModelConfig>, budget: u64) -> u64 {
    use crate::model::experts::{reserved_bytes, PagerOptions};
    use crate::pipeline::manifest::defaults::{SERVE_CTX_SIZE, SERVE_PARALLEL};
    let mut o = PagerOptions::new(budget);
    o.sequences = SERVE_PARALLEL;
    o.context_tokens = SERVE_CTX_SIZE;
    o.other_bytes = crate::serve::prefix_cache::default_budget_bytes_within(budget) as u64;
    config.map_or(o.other_bytes, |c| reserved_bytes(c, &o))
}

/// Inputs of [`advise`] beyond the model's directory.
pub struct AdviceInputs<'a> {
    /// Weight bytes the engine maps.
    pub model_bytes: u64,
    /// Routed-expert bytes.
    pub expert_bytes: u64,
    /// Embedding bytes read a row a token (not kept resident).
    pub row_read_bytes: u64,
    /// Weight bytes read per decoded token.
    pub per_token_bytes: u64,
    /// Whether the model fits in RAM.
    pub fits: bool,
    /// RAM this process could use.
    pub usable_memory: u64,
    /// Measured memory bandwidth, GB/s.
    pub bandwidth_gbs: Option<f64>,
    /// The work directory (for `expert-usage.json`).
    pub work_dir: &'a Path,
    /// Seconds for the storage probe.
    pub seconds: f64,
}

/// Measures the storage holding `model_dir` and, when the model does not
/// fit, proposes a budget and predicts decode under it.
pub fn advise(model_dir: Option<&Path>, i: &AdviceInputs) -> PagingAdvice {
    let mut a = PagingAdvice::default();
    let routing = model_dir.and_then(Routing::of).unwrap_or(Routing::PRESET);
    let n = (routing.layers * routing.experts).max(1) as u64;
    let block = (i.expert_bytes / n).max(DIRECT_ALIGN as u64) as usize;
    let speed = model_dir.and_then(|d| measure(d, block, 16, i.seconds));
    let Some(speed) = speed else {
        a.reason = "storage not measured: no model file of 64 MiB or more yet (run rh-fetch or rh-repack, then rh-inspect again)".into();
        if !i.fits {
            a.memory_budget = Some(i.usable_memory / 100 * 85);
        }
        return a;
    };
    a.cold_load_s = cold_load_s(i.model_bytes, &speed);
    let mut reason = format!(
        "storage: {:.2} GB/s sequential (a cold start reads the model in {:.0} s), {:.2} GB/s random {} KiB reads 16 at a time{}",
        speed.sequential_gbs,
        a.cold_load_s.unwrap_or(0.0),
        speed.random_gbs,
        speed.random_block >> 10,
        if speed.direct { "" } else { " (O_DIRECT refused: the page cache may have served some reads)" }
    );
    if !i.fits {
        let budget = i.usable_memory / 100 * 85;
        a.memory_budget = Some(budget);
        let counts = read_usage_counts(i.work_dir, routing);
        // A cache gives the exact split; a checkpoint the sizes' figures.
        // Either way the server's sequences and prompt cache (its
        // defaults) come out of the budget too.
        let exact = model_dir
            .filter(|d| crate::cache::is_cache(d))
            .and_then(|d| crate::cache::Cache::open(d).ok())
            .map(|c| {
                use crate::weights::WeightSource;
                let held = serve_reserve(Some(c.config()), budget);
                crate::model::experts::plan_budget(&c, budget, held)
            });
        let (resident, experts) = match &exact {
            Some(p) => (p.resident_bytes + p.reserved_bytes, p.expert_bytes),
            None => {
                let config = model_dir
                    .and_then(|d| crate::config::ModelConfig::load(&d.join("config.json")).ok());
                let held = serve_reserve(config.as_ref(), budget);
                (
                    i.model_bytes
                        .saturating_sub(i.expert_bytes + i.row_read_bytes)
                        .saturating_add(held),
                    i.expert_bytes,
                )
            }
        };
        a.estimate = estimate(
            budget,
            resident,
            experts,
            i.per_token_bytes,
            routing,
            i.bandwidth_gbs.unwrap_or(0.0),
            speed.random_gbs,
            counts.as_deref(),
        );
        if let Some(e) = &a.estimate {
            reason.push_str(&format!(
                "; the model does not fit: under a {} budget the expert cache holds {} of {} experts, {:.0}% of routings hit ({}; {:.0}% if uniform), {} read per token: about {:.1} tokens/s ({:.1} uniform)",
                crate::cli::human_bytes(budget),
                e.cached_experts,
                e.experts,
                100.0 * e.hit_rate,
                e.skew_source,
                100.0 * e.hit_rate_uniform,
                crate::cli::human_bytes(e.missed_bytes_per_token),
                e.tokens_per_s,
                e.tokens_per_s_uniform
            ));
        }
    }
    a.storage = Some(speed);
    a.reason = reason;
    a
}

/// This model's expert usage counts from the work directory, whatever
/// cache wrote them (their shape must match).
fn read_usage_counts(work_dir: &Path, r: Routing) -> Option<Vec<Vec<u64>>> {
    let bytes = std::fs::read(crate::model::experts::usage_path(work_dir)).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let counts: Vec<Vec<u64>> = serde_json::from_value(v.get("counts")?.clone()).ok()?;
    (counts.len() == r.layers && counts.iter().all(|l| l.len() == r.experts)).then_some(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_is_measured_on_a_large_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("data-00001.rhd");
        let file = std::fs::File::create(&f).unwrap();
        file.set_len(64 << 20).unwrap();
        let s = measure(dir.path(), 1 << 20, 4, 0.3).expect("measured");
        assert!(
            s.sequential_gbs > 0.0 && s.random_gbs > 0.0 && s.random_qd1_gbs > 0.0,
            "{s:?}"
        );
        assert_eq!((s.random_block, s.queue_depth), (1 << 20, 4));
        assert!(measure(&dir.path().join("none"), 1 << 20, 4, 0.3).is_none());
    }

    #[test]
    fn the_estimate_follows_the_cache_size_and_the_skew() {
        let r = Routing {
            layers: 4,
            experts: 64,
            top_k: 4,
        };
        let expert = 1u64 << 20;
        let experts = expert * 4 * 64;
        let resident = 100 << 20;
        let budget = |slots: u64| {
            ((resident + (256 << 20) + slots * expert) as f64 * 33.0 / 32.0) as u64 + (1 << 20)
        };
        let e = |slots, usage: Option<&[Vec<u64>]>| {
            estimate(
                budget(slots),
                resident,
                experts,
                200 << 20,
                r,
                10.0,
                0.1,
                usage,
            )
            .unwrap()
        };
        let half = e(128, None);
        assert_eq!(half.cached_experts, 128);
        assert!((half.hit_rate_uniform - 0.5).abs() < 1e-9);
        assert!(
            half.hit_rate > half.hit_rate_uniform && half.tokens_per_s > half.tokens_per_s_uniform
        );
        assert!(e(64, None).tokens_per_s < half.tokens_per_s);
        // Usage counts where 8 experts per layer take every routing: a
        // cache of 32 (8 per layer) then always hits.
        let mut counts = vec![vec![0u64; 64]; 4];
        for l in &mut counts {
            for c in l.iter_mut().take(8) {
                *c = 1000;
            }
        }
        let full = e(32, Some(&counts));
        assert!((full.hit_rate - 1.0).abs() < 1e-9, "{full:?}");
        assert_eq!(full.missed_bytes_per_token, 0);
        assert!((full.tokens_per_s - 0.6 * 10e9 / (200.0 * (1 << 20) as f64)).abs() < 1e-6);
        // Storage the longer (its 84 ms against the 35 ms of memory): a
        // token takes its misses' read time (16 routings a token, half of
        // them missed, 1 MiB each, at 0.1 GB/s).
        let missed = 16.0 * 0.5 * expert as f64;
        assert!(
            (half.tokens_per_s_uniform - 1e8 / missed).abs() < 1e-6,
            "{half:?}"
        );
    }
}
