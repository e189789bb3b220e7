//! Running a model in less RAM than its size: the expert cache.
//!
//! About 3 GB of Qwen3-Next is read for every token; the other 40 GB are
//! routed experts, of which 10 per layer are used. Under a RAM budget
//! (`--memory-budget`) the non-expert weights stay mapped (read ahead,
//! locked when allowed) and routed experts are read on demand, in one large
//! read each, into buffers the engine owns ([`ExpertPager`]): the engine,
//! not the page cache, decides what stays. A full cache evicts the expert
//! used least often (ties: least recently); usage counts are kept in the
//! work directory ([`usage`]) so the hot set survives a restart and is
//! read first. Reads of a layer's missing experts are issued as soon as its
//! router has chosen and run on I/O threads while the shared expert and
//! the resident experts compute; the next layer's choice is predicted from
//! the current hidden state and read ahead while the prediction pays.
//!
//! The model code reaches experts through [`crate::model::moe`], which
//! asks the pager for a guard (an `Arc<Expert>`) per routed expert; without
//! a pager the experts are the mapped ones, as before.

pub mod pool;
pub mod usage;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::cache::Cache;
use crate::cli::{Classify, Exit};
use crate::config::ModelConfig;
use crate::engine::arena::SlotArena;
use crate::mmap::MappedFile;
use crate::model::moe::Expert;
use crate::tensor::{AlignedBuf, Bytes, Matrix, Zeros};
use crate::weights::{WeightError, WeightSource};

use crate::direct_io::{self as io, DataFile, DIRECT_ALIGN};
use pool::{IoPool, Priority, Tag};

/// Errors setting up paging.
#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    /// The model could not be opened.
    #[error(transparent)]
    Open(#[from] crate::open::OpenError),
    /// The budget cannot hold what must stay resident.
    #[error("{0}")]
    Budget(String),
    /// A data file cannot be opened for reading.
    #[error("{0}")]
    Io(String),
}

impl Classify for PagingError {
    fn exit(&self) -> Exit {
        match self {
            PagingError::Open(e) => e.exit(),
            PagingError::Budget(_) => Exit::Usage,
            PagingError::Io(_) => Exit::Failure,
        }
    }
}

/// A `--memory-budget` size that [`parse_size`] refuses (each names the
/// text given).
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum SizeError {
    /// A unit other than B, K, M, G, T.
    #[error("`{0}`: unknown unit (use K, M, G or T)")]
    Unit(String),
    /// No number before the unit.
    #[error("`{0}` is not a size (e.g. 24G, 1536M)")]
    NotANumber(String),
    /// Below one byte or above 10^18.
    #[error("`{0}` is out of range")]
    Range(String),
}

/// Parses a size: `24G`, `24GiB`, `1536M`, `500000000` (bytes); K, M, G, T
/// are powers of 1024.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(SizeError::Unit(s.to_string())),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| SizeError::NotANumber(s.to_string()))?;
    let bytes = v * mult as f64;
    if !bytes.is_finite() || !(1.0..=1e18).contains(&bytes) {
        return Err(SizeError::Range(s.to_string()));
    }
    Ok(bytes as u64)
}

/// How a budget splits between what stays resident and the expert cache.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BudgetPlan {
    /// The budget, bytes.
    pub budget: u64,
    /// Weights outside the routed experts and the embedding (attention,
    /// DeltaNet, shared experts, routers, lm_head): resident. The
    /// embedding is read a row a token from the mapping ([`read_by_rows`]).
    pub resident_bytes: u64,
    /// All routed experts.
    pub expert_bytes: u64,
    /// Kept for activations, buffers in flight and the allocator: 256 MiB
    /// plus 3% of the budget.
    pub overhead_bytes: u64,
    /// Set aside for what the caller holds beside the model: its
    /// sequences' states at their full context (KV caches, recurrent
    /// states) and other caches (the server's prompt cache); see
    /// [`PagerOptions::sequences`].
    pub reserved_bytes: u64,
    /// Bytes of one cache buffer (the largest expert, block-aligned).
    pub slot_bytes: u64,
    /// Experts the cache holds.
    pub slots: usize,
    /// Routed experts in the model.
    pub experts: usize,
}

impl BudgetPlan {
    /// Whether the whole model fits: then nothing is paged.
    pub fn fits(&self) -> bool {
        self.resident_bytes + self.expert_bytes + self.overhead_bytes + self.reserved_bytes
            <= self.budget
    }
}

/// Names an expert tensor: `model.layers.L.mlp.experts.E.<proj>`.
fn expert_of(name: &str) -> Option<(usize, usize)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (l, rest) = rest.split_once('.')?;
    let rest = rest.strip_prefix("mlp.experts.")?;
    let (e, _) = rest.split_once('.')?;
    Some((l.parse().ok()?, e.parse().ok()?))
}

/// Whether decode reads tensor `name` of `cache` one row a token rather
/// than whole: the token embedding, unless the lm_head is tied to it (then
/// every token reads it whole as the lm_head). Under a budget such a tensor
/// is neither read ahead nor locked, and its bytes are not set aside: a
/// token faults in its one row (4 KiB for a 2048-wide BF16 row) from the
/// mapping, a clean page the kernel can drop again, so the expert cache
/// gets the rest (593 MiB of the 8-layer model's 1.4 GiB resident weights).
fn read_by_rows(cache: &Cache, name: &str) -> bool {
    name.strip_suffix(".weight").unwrap_or(name) == "model.embed_tokens"
        && !(cache.config().tie_word_embeddings && cache.entry("lm_head.weight").is_none())
}

/// One read of an expert: `len` (block-aligned) bytes at the aligned
/// offset `start` of data file `file`, into the buffer at `at`; at least
/// `need` of them must exist.
#[derive(Clone, Debug)]
struct Piece {
    file: usize,
    start: u64,
    len: usize,
    need: usize,
    at: usize,
}

/// The reads covering `spans` (file, offset, len): one per data file
/// (an expert's tensors are adjacent), block-aligned, laid out one after
/// the other in the buffer.
fn plan_pieces(spans: &[(usize, u64, u64)]) -> Vec<Piece> {
    let mut by_file: Vec<(usize, u64, u64)> = Vec::new();
    for &(f, off, len) in spans {
        match by_file.iter_mut().find(|r| r.0 == f) {
            Some(r) => {
                r.1 = r.1.min(off);
                r.2 = r.2.max(off + len);
            }
            None => by_file.push((f, off, off + len)),
        }
    }
    by_file.sort();
    let a = DIRECT_ALIGN as u64;
    let mut at = 0;
    by_file
        .into_iter()
        .map(|(file, lo, hi)| {
            let start = lo / a * a;
            let need = (hi - start) as usize;
            let len = need.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
            let p = Piece {
                file,
                start,
                len,
                need,
                at,
            };
            at += len;
            p
        })
        .collect()
}

/// Splits `budget` for `cache`: resident weights, overhead, `reserved`
/// bytes the caller holds beside the model, expert slots.
pub fn plan_budget(cache: &Cache, budget: u64, reserved: u64) -> BudgetPlan {
    type Spans = Vec<(usize, u64, u64)>;
    let mut per_expert: HashMap<(usize, usize), Spans> = HashMap::new();
    let mut expert_bytes = 0u64;
    let mut row_read_bytes = 0u64;
    for t in cache.index().tensors.iter() {
        if read_by_rows(cache, &t.name) {
            row_read_bytes += t.spans().iter().map(|s| s.len).sum::<u64>();
        }
        if let Some(k) = expert_of(&t.name) {
            for s in t.spans() {
                expert_bytes += s.len;
                per_expert
                    .entry(k)
                    .or_default()
                    .push((s.file as usize, s.offset, s.len));
            }
        }
    }
    let slot_bytes = per_expert
        .values()
        .map(|s| plan_pieces(s).iter().map(|p| p.len).sum::<usize>())
        .max()
        .unwrap_or(0)
        + DIRECT_ALIGN;
    let resident_bytes = cache
        .data_bytes()
        .saturating_sub(expert_bytes + row_read_bytes);
    let overhead_bytes = (256 << 20) + budget / 33;
    let free = budget.saturating_sub(resident_bytes + overhead_bytes + reserved);
    BudgetPlan {
        budget,
        resident_bytes,
        expert_bytes,
        overhead_bytes,
        reserved_bytes: reserved,
        slot_bytes: slot_bytes as u64,
        slots: (free / slot_bytes as u64) as usize,
        experts: per_expert.len(),
    }
}

/// The smallest budget (to 4 KiB) whose plan for `cache`, with
/// `reserved` bytes set aside, holds `slots` experts.
pub fn budget_for_slots(cache: &Cache, slots: usize, reserved: u64) -> u64 {
    let p = plan_budget(cache, 0, reserved);
    let need = p.resident_bytes + (256 << 20) + reserved + slots as u64 * p.slot_bytes;
    let mut b = need + need / 32;
    while plan_budget(cache, b, reserved).slots < slots {
        b += 4096;
    }
    while b > 4096 && plan_budget(cache, b - 4096, reserved).slots >= slots {
        b -= 4096;
    }
    b
}

/// What a caller holds beside the model under a budget: `sequences`
/// states at `context_tokens` each ([`ModelConfig::state_bytes`], the
/// context rounded up to the KV caches' growth step) and `other_bytes`.
pub fn reserved_bytes(config: &ModelConfig, opts: &PagerOptions) -> u64 {
    use crate::model::attention::KV_GROW_TOKENS;
    let context = opts.context_tokens.min(config.max_position_embeddings);
    config
        .state_bytes(context.next_multiple_of(KV_GROW_TOKENS))
        .saturating_mul(opts.sequences as u64)
        .saturating_add(opts.other_bytes)
}

/// Counters of the expert cache (monotonic; take differences).
#[derive(Default, Debug)]
struct Counters {
    hits: AtomicU64,
    inflight: AtomicU64,
    misses: AtomicU64,
    bytes_read: AtomicU64,
    reads: AtomicU64,
    read_ns: AtomicU64,
    stall_ns: AtomicU64,
    evictions: AtomicU64,
    ahead_issued: AtomicU64,
    ahead_used: AtomicU64,
    predicted: AtomicU64,
    predicted_right: AtomicU64,
    predicted2: AtomicU64,
    predicted2_right: AtomicU64,
    read_errors: AtomicU64,
    routes: AtomicU64,
    routes_waited: AtomicU64,
    route_wait_ns: AtomicU64,
    ahead_wasted: AtomicU64,
    preloaded: AtomicU64,
    prefaulted: AtomicU64,
}

/// A snapshot of the expert cache's counters.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
#[serde(default)]
pub struct PagerStats {
    /// Routed experts found resident.
    pub hits: u64,
    /// Found being read (read ahead, or asked for twice).
    pub inflight: u64,
    /// Read on demand.
    pub misses: u64,
    /// Bytes read from storage (demand and read-ahead).
    pub bytes_read: u64,
    /// Reads issued.
    pub reads: u64,
    /// Seconds the reads took, summed over I/O threads.
    pub read_s: f64,
    /// Seconds forward passes waited for reads.
    pub stall_s: f64,
    /// Experts evicted.
    pub evictions: u64,
    /// Experts read ahead because a router predicted them.
    pub ahead_issued: u64,
    /// Of those, used by a forward pass before eviction.
    pub ahead_used: u64,
    /// Next-layer experts predicted.
    pub predicted: u64,
    /// Predictions the next layer's router then chose.
    pub predicted_right: u64,
    /// Experts predicted two layers ahead.
    pub predicted2: u64,
    /// Of those, chosen by that layer's router.
    pub predicted2_right: u64,
    /// Reads that failed (the mapped expert was used instead).
    pub read_errors: u64,
    /// Layers routed one token (decode).
    pub routes: u64,
    /// Of those, routings that had to wait for a read.
    pub routes_waited: u64,
    /// Seconds from routing to every chosen expert ready, summed over the
    /// routings that waited.
    pub route_wait_s: f64,
    /// Experts read ahead but evicted unused.
    pub ahead_wasted: u64,
    /// Experts of the hot set of earlier runs read at start.
    pub preloaded: u64,
    /// Demand reads started by the I/O threads (promoted ones included).
    pub demand_reads: u64,
    /// Seconds demand reads waited for a free I/O thread, summed.
    pub demand_queue_s: f64,
    /// Read-ahead reads running when each demand read was queued, summed.
    pub ahead_running_at_demand: u64,
    /// Queued predicted reads the layer then chose (moved to the demand
    /// queue).
    pub ahead_promoted: u64,
    /// Queued predicted reads the layer did not choose (cancelled).
    pub ahead_cancelled: u64,
    /// Seconds at least one read was in flight.
    pub io_busy_s: f64,
    /// Experts the cache holds now.
    pub resident: u64,
    /// Its capacity in experts.
    pub capacity: u64,
    /// Buffers allocated and touched ahead of use (a gauge).
    pub prefaulted: u64,
}

impl PagerStats {
    /// Fraction of routed experts that were resident when asked for.
    pub fn hit_rate(&self) -> f64 {
        let all = self.hits + self.inflight + self.misses;
        if all == 0 {
            0.0
        } else {
            self.hits as f64 / all as f64
        }
    }
    /// `self - earlier` for the counters (gauges are kept).
    pub fn since(&self, earlier: &PagerStats) -> PagerStats {
        PagerStats {
            hits: self.hits - earlier.hits,
            inflight: self.inflight - earlier.inflight,
            misses: self.misses - earlier.misses,
            bytes_read: self.bytes_read - earlier.bytes_read,
            reads: self.reads - earlier.reads,
            read_s: self.read_s - earlier.read_s,
            stall_s: self.stall_s - earlier.stall_s,
            evictions: self.evictions - earlier.evictions,
            ahead_issued: self.ahead_issued - earlier.ahead_issued,
            ahead_used: self.ahead_used - earlier.ahead_used,
            predicted: self.predicted - earlier.predicted,
            predicted_right: self.predicted_right - earlier.predicted_right,
            predicted2: self.predicted2 - earlier.predicted2,
            predicted2_right: self.predicted2_right - earlier.predicted2_right,
            read_errors: self.read_errors - earlier.read_errors,
            routes: self.routes - earlier.routes,
            routes_waited: self.routes_waited - earlier.routes_waited,
            route_wait_s: self.route_wait_s - earlier.route_wait_s,
            ahead_wasted: self.ahead_wasted - earlier.ahead_wasted,
            preloaded: self.preloaded - earlier.preloaded,
            demand_reads: self.demand_reads - earlier.demand_reads,
            demand_queue_s: self.demand_queue_s - earlier.demand_queue_s,
            ahead_running_at_demand: self.ahead_running_at_demand - earlier.ahead_running_at_demand,
            ahead_promoted: self.ahead_promoted - earlier.ahead_promoted,
            ahead_cancelled: self.ahead_cancelled - earlier.ahead_cancelled,
            io_busy_s: self.io_busy_s - earlier.io_busy_s,
            resident: self.resident,
            capacity: self.capacity,
            prefaulted: self.prefaulted,
        }
    }
}

/// What the expert cache did over some tokens (a chat turn), for the
/// per-turn stats line.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct CacheUse {
    /// Fraction of routed experts resident when asked for.
    pub hit_rate: f64,
    /// Bytes read from storage per token computed (prompt and generated;
    /// read-ahead included).
    pub read_bytes_per_token: f64,
    /// Milliseconds per token the forward passes waited for reads.
    pub wait_ms_per_token: f64,
}

impl CacheUse {
    /// The use between two snapshots over `tokens` tokens computed.
    pub fn between(before: &PagerStats, after: &PagerStats, tokens: u64) -> CacheUse {
        let d = after.since(before);
        let n = tokens.max(1) as f64;
        CacheUse {
            hit_rate: d.hit_rate(),
            read_bytes_per_token: d.bytes_read as f64 / n,
            wait_ms_per_token: 1e3 * d.stall_s / n,
        }
    }
}

/// The expert cache's counters now, when `w` pages its experts.
pub fn stats_of(w: &dyn WeightSource) -> Option<PagerStats> {
    pager_of(w).map(|p| p.stats())
}

/// Why an expert could not be had from the cache (the forward pass then
/// reads the mapped expert, and the first failure is logged). Clone,
/// because every thread waiting on the read gets it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadFailed {
    /// A speculative read whose layer chose other experts.
    #[error("read-ahead of expert {expert} of layer {layer} cancelled")]
    Cancelled { layer: usize, expert: usize },
    /// The layer's experts were never registered with the pager.
    #[error("layer {0} is not registered")]
    Unregistered(usize),
    /// The buffer handed to the read was still in use elsewhere.
    #[error("expert buffer still shared")]
    BufferShared,
    /// The expert's pieces do not fit the buffer sized for it.
    #[error("expert larger than its buffer")]
    TooLarge,
    /// The pager was dropped with the model before the read ran.
    #[error("the model was dropped")]
    Dropped,
    /// The read itself failed.
    #[error("{path}: reading expert {expert} of layer {layer}: {source}")]
    Io {
        path: String,
        layer: usize,
        expert: usize,
        source: Arc<std::io::Error>,
    },
}

/// A read in flight; the forward pass that needs it waits here.
pub struct Ticket {
    result: Mutex<Option<Result<Arc<Expert>, ReadFailed>>>,
    done: Condvar,
}

impl Ticket {
    fn new() -> Arc<Ticket> {
        Arc::new(Ticket {
            result: Mutex::new(None),
            done: Condvar::new(),
        })
    }
    fn set(&self, r: Result<Arc<Expert>, ReadFailed>) {
        *self.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        self.done.notify_all();
    }
    fn wait(&self) -> Result<Arc<Expert>, ReadFailed> {
        let mut g = self.result.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = g.as_ref() {
                return r.clone();
            }
            g = self.done.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// One routed expert as the pager hands it out.
pub enum Fetch {
    /// Resident: the guard keeps its buffer alive while used.
    Ready(Arc<Expert>),
    /// Being read.
    Pending(Arc<Ticket>),
    /// No buffer could be had (every one in use for long): use the
    /// mapped expert.
    Unavailable,
}

impl Fetch {
    /// Whether it can be used now.
    pub fn is_ready(&self) -> bool {
        matches!(self, Fetch::Ready(_))
    }
    /// Whether [`Fetch::wait`] returns without blocking (resident, read,
    /// failed or unavailable).
    pub fn is_settled(&self) -> bool {
        match self {
            Fetch::Pending(t) => t.result.lock().unwrap_or_else(|e| e.into_inner()).is_some(),
            _ => true,
        }
    }
    /// Waits for the read; `None` when it failed or was unavailable (the
    /// caller then uses the mapped expert; the failure was logged).
    pub fn wait(self, pager: &ExpertPager) -> Option<Arc<Expert>> {
        match self {
            Fetch::Ready(e) => Some(e),
            Fetch::Pending(t) => {
                let t0 = Instant::now();
                let r = t.wait();
                pager
                    .stats
                    .stall_ns
                    .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                match r {
                    Ok(e) => Some(e),
                    Err(msg) => {
                        if !pager.warned.swap(true, Ordering::Relaxed) {
                            tracing::warn!("expert cache: {msg}; using the mapped expert");
                        }
                        None
                    }
                }
            }
            Fetch::Unavailable => None,
        }
    }
}

enum Entry {
    Ready {
        expert: Arc<Expert>,
        buf: Arc<AlignedBuf>,
        rank: (u64, u64),
        ahead: bool,
    },
    Loading(Arc<Ticket>),
}

type Key = (u32, u32);

struct State {
    entries: HashMap<Key, Entry>,
    /// Eviction order of the ready entries: (uses, last use, layer, expert).
    order: BTreeSet<(u64, u64, u32, u32)>,
    counts: Vec<Vec<u64>>,
    tick: u64,
    free: Vec<Arc<AlignedBuf>>,
    allocated: usize,
    /// The experts predicted for each layer, one and two layers ahead,
    /// until it routes.
    predicted: Vec<[Vec<u32>; 2]>,
}

struct LayerInfo {
    experts: Vec<Expert>,
    pieces: Vec<Vec<Piece>>,
    router: Matrix,
}

/// Options of the pager.
#[derive(Clone, Debug)]
pub struct PagerOptions {
    /// The RAM budget, bytes.
    pub budget: u64,
    /// Where usage counts are kept (`WORK/expert-usage.json`); `None`
    /// keeps them for this run only.
    pub usage_file: Option<PathBuf>,
    /// Predict the next layer's experts and read them ahead (turned off by
    /// itself when under a third of the predictions are right).
    pub predict: bool,
    /// I/O threads (reads in flight at most).
    pub io_threads: usize,
    /// Experts read ahead per predicted layer: its top-k plus this many.
    pub predict_extra: usize,
    /// Predict this many layers ahead (1 or 2): with 2, the router of the
    /// layer after next is applied too, so its reads have two layers'
    /// compute to hide behind (off by default: see
    /// `DEFAULT_PREDICT_DEPTH`).
    pub predict_depth: usize,
    /// Read-ahead reads in flight at most; the other I/O threads are kept
    /// for demand reads.
    pub ahead_inflight: usize,
    /// Read-ahead starts only while no demand read runs or waits (off by
    /// default: measured on the 8-layer model, the guesses then started
    /// too late to land before their layer routed, 5-6 points fewer hits,
    /// and were still in flight beside its demand reads).
    pub ahead_when_idle: bool,
    /// Nice value of the I/O threads (0, the default: leave it; below 0
    /// needs the privilege, and is skipped without it), so they start and
    /// finish reads promptly while the compute threads hold the cores.
    /// Not shown to pay on the shared 2-core machine, so off by default.
    pub io_nice: i32,
    /// Allocate and touch the cache's buffers on a low-priority thread
    /// from the first forward pass on, so that no read faults its
    /// buffer's pages in while a layer waits for it.
    pub prefault: bool,
    /// Cut the buffers from one mapping on 2 MiB pages
    /// ([`crate::engine::arena`]) instead of one heap allocation each.
    pub huge_buffers: bool,
    /// Sequences the caller holds at once (the server's `--parallel`),
    /// each up to `context_tokens` (its `--ctx-size`): their states come
    /// out of the budget before the expert cache gets the rest, so a full
    /// context cannot push the process past it (default 0: callers that
    /// hold sequences say how many).
    pub sequences: usize,
    /// The context each of `sequences` may reach, tokens.
    pub context_tokens: usize,
    /// Other bytes the caller keeps within the budget (the server's
    /// prompt cache).
    pub other_bytes: u64,
}

impl PagerOptions {
    /// Defaults for `budget`: prediction on, 16 I/O threads, no usage
    /// file. `RH_EXPERT_IO_THREADS`, `RH_EXPERT_PREDICT_EXTRA`,
    /// `RH_EXPERT_PREDICT_DEPTH`, `RH_EXPERT_AHEAD_INFLIGHT`,
    /// `RH_EXPERT_AHEAD_IDLE`, `RH_EXPERT_IO_NICE` and
    /// `RH_EXPERT_PREFAULT` override the tuning values (for
    /// measurements).
    pub fn new(budget: u64) -> PagerOptions {
        PagerOptions {
            budget,
            usage_file: None,
            predict: true,
            io_threads: crate::env::expert_io_threads().unwrap_or(16).clamp(1, 256),
            predict_extra: crate::env::expert_predict_extra().unwrap_or(0).min(1024),
            predict_depth: crate::env::expert_predict_depth()
                .unwrap_or(DEFAULT_PREDICT_DEPTH)
                .clamp(1, 2),
            ahead_inflight: crate::env::expert_ahead_inflight()
                .unwrap_or(DEFAULT_AHEAD_INFLIGHT)
                .clamp(1, 256),
            ahead_when_idle: crate::env::expert_ahead_when_idle(),
            io_nice: crate::env::expert_io_nice()
                .unwrap_or(DEFAULT_IO_NICE)
                .clamp(-20, 19),
            prefault: crate::env::expert_prefault(),
            huge_buffers: crate::env::expert_huge_pages(),
            sequences: 0,
            context_tokens: 0,
            other_bytes: 0,
        }
    }
}

/// The expert cache of one model (see the module docs).
pub struct ExpertPager {
    files: Vec<DataFile>,
    maps: Vec<Arc<MappedFile>>,
    cache_id: String,
    plan: BudgetPlan,
    n_experts: usize,
    layers: RwLock<Vec<Option<LayerInfo>>>,
    state: Mutex<State>,
    pool: IoPool,
    stats: Counters,
    predict: AtomicBool,
    usage_file: Option<PathBuf>,
    last_save: Mutex<Instant>,
    warned: AtomicBool,
    started_preload: AtomicBool,
    predict_extra: usize,
    predict_depth: usize,
    predict2: AtomicBool,
    io_threads: usize,
    prefault: bool,
    started_prefault: AtomicBool,
    /// Where new buffers come from, when on huge pages.
    arena: Option<Arc<SlotArena>>,
}

/// Below this accuracy (after [`PREDICT_TRIAL`] predictions) next-layer
/// prediction stops: its reads would cost more than they save.
const PREDICT_MIN_ACCURACY: f64 = 1.0 / 3.0;
const PREDICT_TRIAL: u64 = 2000;
/// Prediction also stops when, after [`AHEAD_TRIAL`] of its reads have
/// settled (used by their layer, or evicted unused), fewer than this share
/// were used: each used read saves a demand read, each wasted one took
/// device time and evicted an expert that might have been asked for.
/// Next-layer guesses on the 8-layer synthetic model are 40-50% used.
const AHEAD_MIN_USED: f64 = 0.25;
const AHEAD_TRIAL: u64 = 400;

/// Whether predicted reads pay so far: `None` until [`AHEAD_TRIAL`] of
/// them settled (`used` by their layer, or evicted unused: `wasted`).
fn read_ahead_pays(used: u64, wasted: u64) -> Option<bool> {
    let settled = used + wasted;
    (settled >= AHEAD_TRIAL).then_some(used as f64 >= settled as f64 * AHEAD_MIN_USED)
}
/// Layers predicted ahead by default (see [`PagerOptions::predict_depth`]):
/// two layers ahead was right 41% of the time on the skewed 8-layer
/// synthetic model (next layer: 55%), and its extra reads competed with
/// the demand reads of a disk already busy most of the time.
const DEFAULT_PREDICT_DEPTH: usize = 1;
/// Read-ahead reads in flight at most by default: enough to keep the
/// device busy between demand reads, few enough that a demand read finds
/// a free thread and a short device queue.
const DEFAULT_AHEAD_INFLIGHT: usize = 4;
/// Nice value of the I/O threads by default (see [`PagerOptions::io_nice`]).
const DEFAULT_IO_NICE: i32 = 0;
/// Usage counts are saved at most this often while running (and at the end).
const SAVE_EVERY: Duration = Duration::from_secs(60);
/// A forward pass waits at most this long for a free buffer before using
/// the mapped expert.
const BUFFER_WAIT: Duration = Duration::from_secs(30);

impl ExpertPager {
    fn new(
        cache: &Cache,
        plan: BudgetPlan,
        opts: &PagerOptions,
    ) -> Result<ExpertPager, PagingError> {
        let c = cache.config();
        let (n_layers, n_experts) = (c.num_hidden_layers, c.num_experts);
        let mut files = Vec::new();
        for f in cache.index().files.iter() {
            let path = cache.dir().join(&f.name);
            files.push(
                DataFile::open(&path)
                    .map_err(|e| PagingError::Io(format!("{}: {e}", path.display())))?,
            );
        }
        let cache_id = cache
            .header()
            .index_hash
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        let counts = opts
            .usage_file
            .as_deref()
            .and_then(|p| usage::load(p, &cache_id, n_layers, n_experts))
            .unwrap_or_else(|| vec![vec![0; n_experts]; n_layers]);
        // Without transparent huge pages the slots would gain nothing over
        // heap buffers.
        let arena = (opts.huge_buffers && crate::tensor::huge_pages_available())
            .then(|| SlotArena::new(plan.slots, plan.slot_bytes as usize))
            .flatten();
        Ok(ExpertPager {
            files,
            maps: cache.maps().to_vec(),
            cache_id,
            plan,
            n_experts,
            layers: RwLock::new((0..n_layers).map(|_| None).collect()),
            state: Mutex::new(State {
                entries: HashMap::new(),
                order: BTreeSet::new(),
                counts,
                tick: 0,
                free: Vec::new(),
                allocated: 0,
                predicted: vec![[Vec::new(), Vec::new()]; n_layers],
            }),
            pool: IoPool::new(
                opts.io_threads,
                opts.ahead_inflight,
                opts.ahead_when_idle,
                opts.io_nice,
            ),
            stats: Counters::default(),
            predict: AtomicBool::new(opts.predict),
            usage_file: opts.usage_file.clone(),
            last_save: Mutex::new(Instant::now()),
            warned: AtomicBool::new(false),
            started_preload: AtomicBool::new(false),
            predict_extra: opts.predict_extra,
            predict_depth: opts.predict_depth,
            io_threads: opts.io_threads,
            predict2: AtomicBool::new(opts.predict && opts.predict_depth >= 2),
            prefault: opts.prefault,
            started_prefault: AtomicBool::new(false),
            arena,
        })
    }

    /// How the budget was split.
    pub fn plan(&self) -> &BudgetPlan {
        &self.plan
    }

    /// I/O threads: the most reads in flight.
    pub fn io_threads(&self) -> usize {
        self.io_threads
    }

    /// Whether the buffers are slots of one mapping advised onto 2 MiB
    /// pages ([`crate::engine::arena`]).
    pub fn huge_buffers(&self) -> bool {
        self.arena.is_some()
    }

    /// Whether reads bypass the page cache (O_DIRECT).
    pub fn direct_reads(&self) -> bool {
        self.files.iter().all(DataFile::is_direct)
    }

    /// Experts a many-token forward pass holds at once (two waves of this
    /// many are in memory: one computing, the next being read).
    pub fn wave(&self, top_k: usize) -> usize {
        (self.plan.slots / 4).max(top_k).max(1)
    }

    /// Records layer `layer`'s routed experts (mapped views, never computed
    /// with while paging) and router; once every layer is known the hot
    /// set of earlier runs is read ahead.
    pub fn register_layer(self: &Arc<Self>, layer: usize, experts: &[Expert], router: &Matrix) {
        let pieces = experts
            .iter()
            .map(|e| {
                let spans: Vec<(usize, u64, u64)> = e
                    .matrices()
                    .iter()
                    .flat_map(|m| matrix_bytes(m))
                    .filter_map(|b| self.locate(b))
                    .collect();
                plan_pieces(&spans)
            })
            .collect();
        let all = {
            let mut layers = self.layers.write().unwrap_or_else(|e| e.into_inner());
            if let Some(slot) = layers.get_mut(layer) {
                *slot = Some(LayerInfo {
                    experts: experts.to_vec(),
                    pieces,
                    router: router.clone(),
                });
            }
            layers.iter().all(Option::is_some)
        };
        if all && !self.started_preload.swap(true, Ordering::Relaxed) {
            self.preload_hot_set();
        }
    }

    /// (file, offset, len) of mapped bytes.
    fn locate(&self, b: &Bytes) -> Option<(usize, u64, u64)> {
        match b {
            Bytes::Mapped { file, offset, len } => {
                let f = self.maps.iter().position(|m| Arc::ptr_eq(m, file))?;
                Some((f, *offset as u64, *len as u64))
            }
            _ => None,
        }
    }

    /// Experts to read ahead for a predicted layer beyond its top-k.
    pub fn predict_extra(&self) -> usize {
        self.predict_extra
    }

    /// The routers of the layers after `layer` whose experts are
    /// predicted from its hidden state: `(depth, router)` for the next layer
    /// and, with [`PagerOptions::predict_depth`] 2, the one after, each
    /// while its predictions pay.
    pub fn next_routers(&self, layer: usize) -> Vec<(usize, Matrix)> {
        let on = [
            self.predict.load(Ordering::Relaxed),
            self.predict2.load(Ordering::Relaxed),
        ];
        let layers = self.layers.read().unwrap_or_else(|e| e.into_inner());
        (1..=self.predict_depth.min(2))
            .filter(|&d| on[d - 1])
            .filter_map(|d| Some((d, layers.get(layer + d)?.as_ref()?.router.clone())))
            .collect()
    }

    /// Layer routing took `waited` from routing to every chosen expert
    /// ready (`None`: none had to be waited for).
    pub fn routed(&self, waited: Option<Duration>) {
        let c = &self.stats;
        c.routes.fetch_add(1, Ordering::Relaxed);
        if let Some(w) = waited {
            c.routes_waited.fetch_add(1, Ordering::Relaxed);
            c.route_wait_ns
                .fetch_add(w.as_nanos() as u64, Ordering::Relaxed);
        }
    }

    /// The experts of `layer` a forward pass needs: each resident one is
    /// handed out at once, the reads of the missing ones start now (on the
    /// I/O threads, all in parallel) and are waited for with
    /// [`Fetch::wait`]. Each call counts as a use of each expert.
    pub fn fetch(self: &Arc<Self>, layer: usize, experts: &[usize]) -> Vec<Fetch> {
        self.start_prefault();
        self.check_prediction(layer, experts);
        // Chosen experts still queued as read-ahead jump to the demand
        // queue; queued guesses this layer did not choose are dropped.
        self.pool.reprioritise(layer, experts);
        let mut out = Vec::with_capacity(experts.len());
        let mut st = self.lock();
        for &e in experts {
            st.counts[layer][e] += 1;
        }
        for &e in experts {
            let key = (layer as u32, e as u32);
            let t0 = Instant::now();
            loop {
                st.tick += 1;
                let (tick, count) = (st.tick, st.counts[layer][e]);
                let st_ref = &mut *st;
                match st_ref.entries.get_mut(&key) {
                    Some(Entry::Ready {
                        expert,
                        rank,
                        ahead,
                        ..
                    }) => {
                        self.stats.hits.fetch_add(1, Ordering::Relaxed);
                        if *ahead {
                            self.stats.ahead_used.fetch_add(1, Ordering::Relaxed);
                            *ahead = false;
                        }
                        st_ref.order.remove(&(rank.0, rank.1, key.0, key.1));
                        *rank = (count, tick);
                        st_ref.order.insert((count, tick, key.0, key.1));
                        out.push(Fetch::Ready(expert.clone()));
                        break;
                    }
                    Some(Entry::Loading(t)) => {
                        self.stats.inflight.fetch_add(1, Ordering::Relaxed);
                        out.push(Fetch::Pending(t.clone()));
                        break;
                    }
                    None => {}
                }
                if let Some(buf) = self.take_buffer(&mut st, None) {
                    self.stats.misses.fetch_add(1, Ordering::Relaxed);
                    let t = Ticket::new();
                    st.entries.insert(key, Entry::Loading(t.clone()));
                    self.submit(Priority::Demand, layer, e, buf, t.clone(), None);
                    out.push(Fetch::Pending(t));
                    break;
                }
                // Every buffer is in use by forward passes or reads: wait
                // for one to come back.
                drop(st);
                if t0.elapsed() > BUFFER_WAIT {
                    out.push(Fetch::Unavailable);
                    st = self.lock();
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
                st = self.lock();
            }
        }
        drop(st);
        self.maybe_save();
        out
    }

    /// Reads `experts` of `layer` ahead, those not resident or being read,
    /// as far as buffers allow without evicting an expert used more often.
    /// `predicted` reads are cancelled if still queued when the layer
    /// routes elsewhere.
    pub fn read_ahead(self: &Arc<Self>, layer: usize, experts: &[usize], predicted: bool) {
        if self
            .layers
            .read()
            .map_or(true, |l| l.get(layer).is_none_or(Option::is_none))
        {
            return;
        }
        let mut st = self.lock();
        for &e in experts {
            let key = (layer as u32, e as u32);
            if st.entries.contains_key(&key) {
                continue;
            }
            let count = st.counts[layer][e];
            let Some(buf) = self.take_buffer(&mut st, Some(count)) else {
                continue;
            };
            let issued = if predicted {
                &self.stats.ahead_issued
            } else {
                &self.stats.preloaded
            };
            issued.fetch_add(1, Ordering::Relaxed);
            let t = Ticket::new();
            st.entries.insert(key, Entry::Loading(t.clone()));
            let tag = Tag {
                layer: layer as u32,
                expert: e as u32,
                predicted,
            };
            self.submit(Priority::Ahead, layer, e, buf, t, Some(tag));
        }
    }

    /// Predicted experts of `layer`, `depth` (1 or 2) layers ahead (read
    /// ahead, and checked against its router's choice when it routes).
    pub fn predicted(self: &Arc<Self>, layer: usize, experts: &[usize], depth: usize) {
        {
            let mut st = self.lock();
            let Some(slot) = st.predicted.get_mut(layer) else {
                return;
            };
            slot[depth.clamp(1, 2) - 1] = experts.iter().map(|&e| e as u32).collect();
        }
        self.read_ahead(layer, experts, true);
    }

    fn check_prediction(&self, layer: usize, chosen: &[usize]) {
        let guesses = std::mem::take(&mut self.lock().predicted[layer]);
        let c = &self.stats;
        let per_depth = [
            (
                &c.predicted,
                &c.predicted_right,
                &self.predict,
                "next-layer",
            ),
            (
                &c.predicted2,
                &c.predicted2_right,
                &self.predict2,
                "two-layers-ahead",
            ),
        ];
        for (guess, (total, right_total, on, what)) in guesses.iter().zip(per_depth) {
            if guess.is_empty() {
                continue;
            }
            let right = guess
                .iter()
                .filter(|g| chosen.contains(&(**g as usize)))
                .count() as u64;
            let n = total.fetch_add(guess.len() as u64, Ordering::Relaxed) + guess.len() as u64;
            let r = right_total.fetch_add(right, Ordering::Relaxed) + right;
            if n >= PREDICT_TRIAL
                && (r as f64) < n as f64 * PREDICT_MIN_ACCURACY
                && on.swap(false, Ordering::Relaxed)
            {
                tracing::info!(
                    "expert cache: {what} prediction right {:.0}% of the time; turned off",
                    100.0 * r as f64 / n as f64
                );
            }
        }
        self.check_read_ahead_pays();
    }

    /// Turns prediction off (both depths) once its reads do not pay
    /// ([`read_ahead_pays`]).
    fn check_read_ahead_pays(&self) {
        let c = &self.stats;
        let used = c.ahead_used.load(Ordering::Relaxed);
        let wasted = c.ahead_wasted.load(Ordering::Relaxed);
        if read_ahead_pays(used, wasted) == Some(false)
            && self.predict.swap(false, Ordering::Relaxed)
        {
            self.predict2.store(false, Ordering::Relaxed);
            tracing::info!(
                "expert cache: {used} of {} read-ahead reads used; prediction turned off",
                used + wasted
            );
        }
    }

    /// From the first forward pass on (the model is loaded by then, so the
    /// buffers do not add to the peak of loading), allocates the cache's
    /// remaining buffers and touches every page of each on a thread at
    /// the lowest priority. A fresh buffer's pages are otherwise faulted
    /// in by the read into it (the kernel pins the destination of an
    /// `O_DIRECT` read): about 400 faults per expert, on an I/O thread,
    /// while a layer waits, for every expert the cache reads until it is
    /// full.
    fn start_prefault(self: &Arc<Self>) {
        if !self.prefault || self.started_prefault.swap(true, Ordering::Relaxed) {
            return;
        }
        let me = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("rh-expert-prefault".into())
            .spawn(move || {
                io::set_thread_nice(19);
                while let Some(me) = me.upgrade() {
                    if !me.prefault_one() {
                        break;
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("expert cache: buffers not prepared ahead: {e}");
        }
    }

    /// Allocates and touches one more buffer into the free list; false
    /// once the cache has all its buffers.
    fn prefault_one(&self) -> bool {
        {
            let mut st = self.lock();
            if st.allocated >= self.plan.slots {
                return false;
            }
            st.allocated += 1;
        }
        let mut buf = self.new_buffer();
        // Any value: reads overwrite what a buffer is used for. A store of
        // zero into fresh zeroed memory could be elided.
        for page in buf.as_mut_slice().chunks_mut(io::DIRECT_ALIGN) {
            page[0] = 1;
        }
        std::hint::black_box(buf.as_slice());
        self.stats.prefaulted.fetch_add(1, Ordering::Relaxed);
        self.lock().free.push(Arc::new(buf));
        true
    }

    /// One more buffer (the caller counted it in `allocated`): a slot of
    /// the huge-page arena, or a heap buffer without one.
    fn new_buffer(&self) -> AlignedBuf {
        match self.arena.as_ref().and_then(|a| a.take()) {
            Some(slot) => AlignedBuf::from_slot(slot),
            None => AlignedBuf::zeroed(self.plan.slot_bytes as usize),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer for one expert: a free one, a new one while under the
    /// capacity, else one of the least used resident expert not in use
    /// (only one used at most `protect` times, when given).
    fn take_buffer(&self, st: &mut State, protect: Option<u64>) -> Option<Arc<AlignedBuf>> {
        loop {
            if let Some(i) = st.free.iter().position(|b| Arc::strong_count(b) == 1) {
                return Some(st.free.swap_remove(i));
            }
            if st.allocated < self.plan.slots {
                st.allocated += 1;
                return Some(Arc::new(self.new_buffer()));
            }
            let mut busy = Vec::new();
            let mut victim = None;
            while let Some(k) = st.order.pop_first() {
                if protect.is_some_and(|p| k.0 > p) {
                    busy.push(k);
                    break;
                }
                let key = (k.2, k.3);
                let in_use = matches!(st.entries.get(&key),
                    Some(Entry::Ready { expert, .. }) if Arc::strong_count(expert) > 1);
                if in_use {
                    busy.push(k);
                    continue;
                }
                victim = Some(key);
                break;
            }
            st.order.extend(busy);
            let key = victim?;
            if let Some(Entry::Ready { buf, ahead, .. }) = st.entries.remove(&key) {
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                if ahead {
                    self.stats.ahead_wasted.fetch_add(1, Ordering::Relaxed);
                }
                st.free.push(buf);
            }
        }
    }

    fn submit(
        self: &Arc<Self>,
        priority: Priority,
        layer: usize,
        e: usize,
        buf: Arc<AlignedBuf>,
        ticket: Arc<Ticket>,
        tag: Option<Tag>,
    ) {
        // A queued read does not keep the pager alive: dropping the model
        // frees its buffers; a read that finds it gone fails its ticket.
        let me = Arc::downgrade(self);
        // Only predicted reads count as read-ahead in the statistics: the
        // hot set read at start is what a warm cache holds.
        let ahead = tag.is_some_and(|t| t.predicted);
        self.pool
            .submit(priority, tag, move |run| match (me.upgrade(), run) {
                (Some(me), true) => me.complete(layer, e, buf, ticket, ahead),
                (Some(me), false) => me.cancelled(layer, e, buf, ticket),
                (None, _) => ticket.set(Err(ReadFailed::Dropped)),
            });
    }

    /// A read-ahead cancelled before it started: its entry and buffer go.
    fn cancelled(&self, layer: usize, e: usize, buf: Arc<AlignedBuf>, t: Arc<Ticket>) {
        let key = (layer as u32, e as u32);
        let mut st = self.lock();
        if matches!(st.entries.get(&key), Some(Entry::Loading(x)) if Arc::ptr_eq(x, &t)) {
            st.entries.remove(&key);
        }
        st.free.push(buf);
        drop(st);
        t.set(Err(ReadFailed::Cancelled { layer, expert: e }));
    }

    /// Runs on an I/O thread: reads the expert, then publishes it.
    fn complete(&self, layer: usize, e: usize, buf: Arc<AlignedBuf>, t: Arc<Ticket>, ahead: bool) {
        let t0 = Instant::now();
        let (result, buf) = self.read_expert(layer, e, buf);
        self.stats
            .read_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let key = (layer as u32, e as u32);
        let mut st = self.lock();
        match result {
            Ok(expert) => {
                st.tick += 1;
                let rank = (st.counts[layer][e], st.tick);
                st.order.insert((rank.0, rank.1, key.0, key.1));
                st.entries.insert(
                    key,
                    Entry::Ready {
                        expert: expert.clone(),
                        buf,
                        rank,
                        ahead,
                    },
                );
                drop(st);
                t.set(Ok(expert));
            }
            Err(msg) => {
                self.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                st.entries.remove(&key);
                st.free.push(buf);
                drop(st);
                t.set(Err(msg));
            }
        }
    }

    /// Reads expert `e` of `layer` into `buf` and builds its matrices over
    /// the buffer.
    fn read_expert(
        &self,
        layer: usize,
        e: usize,
        mut buf: Arc<AlignedBuf>,
    ) -> (Result<Arc<Expert>, ReadFailed>, Arc<AlignedBuf>) {
        let layers = self.layers.read().unwrap_or_else(|e| e.into_inner());
        let Some(Some(info)) = layers.get(layer) else {
            return (Err(ReadFailed::Unregistered(layer)), buf);
        };
        let pieces = &info.pieces[e];
        let Some(b) = Arc::get_mut(&mut buf) else {
            return (Err(ReadFailed::BufferShared), buf);
        };
        let bytes = b.as_mut_slice();
        let base = io::aligned_base(bytes);
        for p in pieces {
            let Some(dst) = bytes.get_mut(base + p.at..base + p.at + p.len) else {
                return (Err(ReadFailed::TooLarge), buf);
            };
            if let Err(err) = self.files[p.file].read_at(dst, p.start, p.need) {
                let path = self.files[p.file].path().display().to_string();
                return (
                    Err(ReadFailed::Io {
                        path,
                        layer,
                        expert: e,
                        source: Arc::new(err),
                    }),
                    buf,
                );
            }
            self.stats.reads.fetch_add(1, Ordering::Relaxed);
            self.stats
                .bytes_read
                .fetch_add(p.len as u64, Ordering::Relaxed);
        }
        let rebase = |m: &Bytes| -> Bytes {
            let Some((f, off, len)) = self.locate(m) else {
                return m.clone();
            };
            pieces
                .iter()
                .find(|p| p.file == f && p.start <= off && off + len <= p.start + p.need as u64)
                .and_then(|p| {
                    Bytes::shared(
                        buf.clone(),
                        base + p.at + (off - p.start) as usize,
                        len as usize,
                    )
                })
                .unwrap_or_else(|| m.clone())
        };
        let mapped = &info.experts[e];
        let expert = Expert {
            gate: rebase_matrix(&mapped.gate, &rebase),
            up: rebase_matrix(&mapped.up, &rebase),
            down: rebase_matrix(&mapped.down, &rebase),
        };
        (Ok(Arc::new(expert)), buf)
    }

    /// Reads the most used experts of earlier runs ahead, until the cache
    /// is nearly full (room is left for the first token's misses).
    fn preload_hot_set(self: &Arc<Self>) {
        let keep = self.plan.slots - self.plan.slots / 4;
        let mut hot: Vec<(u64, usize, usize)> = {
            let st = self.lock();
            st.counts
                .iter()
                .enumerate()
                .flat_map(|(l, c)| c.iter().enumerate().map(move |(e, &n)| (n, l, e)))
                .filter(|x| x.0 > 0)
                .collect()
        };
        hot.sort_by(|a, b| b.cmp(a));
        hot.truncate(keep);
        for (_, l, e) in hot {
            self.read_ahead(l, &[e], false);
        }
    }

    /// The counters now.
    pub fn stats(&self) -> PagerStats {
        let c = &self.stats;
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let pool = self.pool.stats();
        let resident = {
            let st = self.lock();
            st.entries
                .values()
                .filter(|e| matches!(e, Entry::Ready { .. }))
                .count() as u64
        };
        PagerStats {
            hits: ld(&c.hits),
            inflight: ld(&c.inflight),
            misses: ld(&c.misses),
            bytes_read: ld(&c.bytes_read),
            reads: ld(&c.reads),
            read_s: ld(&c.read_ns) as f64 * 1e-9,
            stall_s: ld(&c.stall_ns) as f64 * 1e-9,
            evictions: ld(&c.evictions),
            ahead_issued: ld(&c.ahead_issued),
            ahead_used: ld(&c.ahead_used),
            predicted: ld(&c.predicted),
            predicted_right: ld(&c.predicted_right),
            predicted2: ld(&c.predicted2),
            predicted2_right: ld(&c.predicted2_right),
            read_errors: ld(&c.read_errors),
            routes: ld(&c.routes),
            routes_waited: ld(&c.routes_waited),
            route_wait_s: ld(&c.route_wait_ns) as f64 * 1e-9,
            ahead_wasted: ld(&c.ahead_wasted),
            preloaded: ld(&c.preloaded),
            demand_reads: pool.demand_jobs,
            demand_queue_s: pool.demand_queue_s,
            ahead_running_at_demand: pool.ahead_running_at_demand,
            ahead_promoted: pool.promoted,
            ahead_cancelled: pool.cancelled,
            io_busy_s: pool.busy_s,
            resident,
            capacity: self.plan.slots as u64,
            prefaulted: ld(&c.prefaulted),
        }
    }

    /// Usage counts per layer and expert (persisted ones included).
    pub fn usage_counts(&self) -> Vec<Vec<u64>> {
        self.lock().counts.clone()
    }

    /// Routed experts per layer.
    pub fn experts_per_layer(&self) -> usize {
        self.n_experts
    }

    /// Writes the usage counts (crash-safely); a failure is a warning.
    pub fn save_usage(&self) {
        let Some(path) = &self.usage_file else {
            return;
        };
        let counts = self.usage_counts();
        if let Err(e) = usage::save(path, &self.cache_id, &counts) {
            tracing::warn!("{}: expert usage not saved: {e}", path.display());
        }
        *self.last_save.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    fn maybe_save(self: &Arc<Self>) {
        if self.usage_file.is_none() {
            return;
        }
        let due = {
            let mut last = self.last_save.lock().unwrap_or_else(|e| e.into_inner());
            let due = last.elapsed() > SAVE_EVERY;
            if due {
                *last = Instant::now();
            }
            due
        };
        if due {
            let me = Arc::downgrade(self);
            self.pool.submit(Priority::Ahead, None, move |run| {
                if let (true, Some(me)) = (run, me.upgrade()) {
                    me.save_usage();
                }
            });
        }
    }
}

/// Every byte range of a matrix.
fn matrix_bytes(m: &Matrix) -> Vec<&Bytes> {
    match m {
        Matrix::Dense(d) => vec![&d.data],
        Matrix::Quant(q) => {
            let mut v = vec![&q.qdata, &q.scales];
            if let Zeros::PerGroup(z) = &q.zeros {
                v.push(z);
            }
            v
        }
    }
}

fn rebase_matrix(m: &Matrix, f: &dyn Fn(&Bytes) -> Bytes) -> Matrix {
    match m {
        Matrix::Dense(d) => {
            let mut d = d.clone();
            d.data = f(&d.data);
            Matrix::Dense(d)
        }
        Matrix::Quant(q) => {
            let mut q = q.clone();
            q.qdata = f(&q.qdata);
            q.scales = f(&q.scales);
            if let Zeros::PerGroup(z) = &q.zeros {
                q.zeros = Zeros::PerGroup(f(z));
            }
            Matrix::Quant(q)
        }
    }
}

/// A cache whose routed experts are paged by an [`ExpertPager`]; every
/// other weight comes from the mapped cache as usual.
pub struct PagedCache {
    cache: Cache,
    pager: Arc<ExpertPager>,
}

impl Drop for PagedCache {
    /// The model is done with its weights: keep the usage counts.
    fn drop(&mut self) {
        self.pager.save_usage();
    }
}

impl PagedCache {
    /// The pager.
    pub fn pager(&self) -> &Arc<ExpertPager> {
        &self.pager
    }
}

impl WeightSource for PagedCache {
    fn config(&self) -> &ModelConfig {
        self.cache.config()
    }
    fn path(&self) -> String {
        self.cache.path()
    }
    fn matrix(&self, module: &str, rows: usize, cols: usize) -> Result<Matrix, WeightError> {
        self.cache.matrix(module, rows, cols)
    }
    fn vector(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, WeightError> {
        self.cache.vector(name, shape)
    }
    fn contains(&self, name: &str) -> bool {
        self.cache.contains(name)
    }
    fn aux_file(&self, name: &str) -> Option<Vec<u8>> {
        self.cache.aux_file(name)
    }
    /// Reads ahead (always) and locks (when asked) the weights outside the
    /// routed experts and the embedding only: those are what must stay
    /// resident ([`read_by_rows`]).
    fn residency(&self, _populate: bool, lock: bool) -> Result<(), crate::weights::LockRefused> {
        let maps = self.cache.maps();
        let mut refused = None;
        for t in self.cache.index().tensors.iter() {
            if expert_of(&t.name).is_some() {
                continue;
            }
            let by_rows = read_by_rows(&self.cache, &t.name);
            for s in t.spans() {
                let bytes = maps[s.file as usize].bytes();
                if by_rows {
                    // One 4 KiB page a row, not the fault's default
                    // read-around of 128 KiB.
                    io::advise_random(bytes, s.offset as usize, s.len as usize);
                    continue;
                }
                io::advise_willneed(bytes, s.offset as usize, s.len as usize);
                if lock && refused.is_none() {
                    if let Err(source) = io::lock(bytes, s.offset as usize, s.len as usize) {
                        refused = Some(crate::weights::LockRefused {
                            dir: self.cache.dir().display().to_string(),
                            what: "mlock of the resident weights",
                            source,
                        });
                    }
                }
            }
        }
        refused.map_or(Ok(()), Err)
    }
    // `map_pages` stays a no-op: the routed experts are read into the
    // pager's buffers, and the rest is copied or locked; a 2 MiB readaround
    // would only add reads under a budget.
    fn mapped_pages(&self) -> Option<crate::mmap::MappedPages> {
        self.cache.mapped_pages()
    }
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

/// The expert cache behind a weight source, when it pages routed experts
/// (it is a [`PagedCache`]); `None` leaves the experts mapped.
pub fn pager_of(w: &dyn WeightSource) -> Option<Arc<ExpertPager>> {
    w.as_any()?
        .downcast_ref::<PagedCache>()
        .map(|c| c.pager.clone())
}

/// Opens `dir` under a RAM budget: a cache that does not fit in `budget`
/// gets its routed experts paged; a cache that fits, or a checkpoint, is
/// opened as usual (`open::open_weights`). Returns the plan when
/// paging. A budget below what must stay resident is refused, saying how
/// much is needed.
pub fn open_with_budget(
    dir: &Path,
    opts: &PagerOptions,
) -> Result<(Arc<dyn WeightSource>, Option<BudgetPlan>), PagingError> {
    let weights = crate::open::open_weights(dir)?;
    if !crate::cache::is_cache(dir) {
        tracing::warn!(
            "{}: a memory budget applies to a repacked cache only; the checkpoint is mapped as a whole",
            dir.display()
        );
        return Ok((weights, None));
    }
    drop(weights);
    let cache = Cache::open(dir).map_err(|e| PagingError::Open(e.into()))?;
    let reserved = reserved_bytes(cache.config(), opts);
    let plan = plan_budget(&cache, opts.budget, reserved);
    if plan.fits() {
        return Ok((Arc::new(cache), None));
    }
    let top_k = cache.config().num_experts_per_tok.max(1);
    let min_slots = 4 * top_k;
    if plan.slots < min_slots {
        let need = plan.resident_bytes
            + plan.overhead_bytes
            + plan.reserved_bytes
            + min_slots as u64 * plan.slot_bytes;
        let h = crate::cli::human_bytes;
        let reserved = if plan.reserved_bytes > 0 {
            format!(
                ", {} for {} sequence(s) of {} tokens and caches beside the model (lower --parallel, --ctx-size or --cache-ram to need less)",
                h(plan.reserved_bytes),
                opts.sequences,
                opts.context_tokens
            )
        } else {
            String::new()
        };
        return Err(PagingError::Budget(format!(
            "memory budget {} is too small for {}: it needs at least {} ({} of weights that stay resident, {} of working memory{reserved}, {} routed experts of {} each)",
            h(opts.budget),
            dir.display(),
            h(need),
            h(plan.resident_bytes),
            h(plan.overhead_bytes),
            min_slots,
            h(plan.slot_bytes)
        )));
    }
    let pager = Arc::new(ExpertPager::new(&cache, plan.clone(), opts)?);
    Ok((Arc::new(PagedCache { cache, pager }), Some(plan)))
}

/// The usage file of a work directory.
pub fn usage_path(work_dir: &Path) -> PathBuf {
    work_dir.join(usage::USAGE_FILE)
}

#[cfg(test)]
mod tests;
