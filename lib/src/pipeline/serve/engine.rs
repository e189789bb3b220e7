//! The engine thread: it owns the [`ChatModel`] and the [`PrefixCache`],
//! takes [`Job`]s from a FIFO queue into a running batch of at most
//! `parallel` sequences (continuous batching) and streams [`Event`]s back
//! through each job's [`Sink`]. The HTTP side never touches the model: it
//! submits a job and reads events, so it never blocks on compute.
//!
//! Each step of the scheduler ([`run_batches`]) is one batched forward
//! ([`crate::model::Model::forward_batch`]): every generating sequence
//! feeds its last token, and prompts that are not in yet feed chunks sized
//! by [`ChunkPacer`] so the running streams keep going while a long
//! prompt is read. A request joins at the next step; one that finishes or
//! whose client went away leaves after the step that ended it. A
//! sequence's phases (prompt, sampling, the end) are in `sequence.rs`.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::output::Delta;
use super::prefix_cache::PrefixCache;
use super::sequence::{Input, Progress, Sequence};
use crate::chat::{ChatError, ChatModel, Message, RenderExtras};
use crate::model::{BatchSeq, State, PREFILL_CHUNK};
use crate::sample::SamplingParams;

/// What to generate from.
#[derive(Clone, Debug)]
pub enum Prompt {
    /// Chat messages rendered by the model's template.
    Chat {
        /// The conversation.
        messages: Vec<Message>,
        /// Tools and template variables.
        extras: RenderExtras,
    },
    /// A raw text prompt (`/v1/completions`).
    Text(String),
}

/// One generation request, already validated.
#[derive(Clone, Debug)]
pub struct GenRequest {
    /// The prompt.
    pub prompt: Prompt,
    /// Sampler settings (seeded).
    pub sampling: SamplingParams,
    /// OpenAI presence penalty: subtracted once from every token generated so far.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty: subtracted per occurrence.
    pub frequency_penalty: f32,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Stop strings (the answer ends before the first one).
    pub stop: Vec<String>,
    /// Parse `<tool_call>` blocks into calls (the request offered tools).
    pub parse_tools: bool,
    /// Start from a kept state when one matches, and keep new ones.
    pub cache_prompt: bool,
}

/// Why an answer ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// An end token or a stop string.
    Stop,
    /// `max_tokens` or the context was reached.
    Length,
    /// The answer holds tool calls.
    ToolCalls,
    /// The client went away.
    Cancelled,
}

impl Finish {
    /// OpenAI's `finish_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop | Finish::Cancelled => "stop",
            Finish::Length => "length",
            Finish::ToolCalls => "tool_calls",
        }
    }
}

/// Figures of one finished job (llama-server's `timings` come from these).
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Why it ended.
    pub finish: Finish,
    /// Prompt tokens in all.
    pub prompt_tokens: usize,
    /// Of those, taken from a kept state instead of computed.
    pub cached_tokens: usize,
    /// Tokens generated (the end token not counted).
    pub completion_tokens: usize,
    /// From taking the job to the first logits (render, tokenize, prefill), ms.
    pub prompt_ms: f64,
    /// From the first to the last generated token, ms.
    pub predicted_ms: f64,
}

/// A request the engine refused before generating.
#[derive(Clone, Debug, PartialEq)]
pub enum Failure {
    /// The client's fault (HTTP 400): e.g. a prompt longer than the context.
    BadRequest(String),
    /// The server's fault (HTTP 500).
    Internal(String),
}

/// What a job reports, in order: `Started` then `Deltas`... then `Done`,
/// or a single `Failed`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The prompt is in: generation starts.
    Started {
        /// Prompt tokens in all.
        prompt_tokens: usize,
        /// Of those, taken from a kept state.
        cached_tokens: usize,
    },
    /// The pieces one generated token completed (often one, may be none:
    /// sent for every token so a gone client is noticed at once).
    Deltas(Vec<Delta>),
    /// The answer is complete.
    Done(Summary),
    /// Nothing was generated.
    Failed(Failure),
}

/// Where a job's events go; returns false when nobody listens any more
/// (the client disconnected), which stops the job before its next token.
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

/// A queued request and where its events go.
pub struct Job {
    /// What to generate.
    pub request: GenRequest,
    /// Its events.
    pub sink: Sink,
}

/// Settings of the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Context size: prompt plus answer, in tokens.
    pub ctx_size: usize,
    /// Byte budget of the prefix cache (0 = no reuse).
    pub cache_bytes: usize,
    /// Requests that may wait behind the running batch.
    pub queue: usize,
    /// Most sequences in the running batch (`--parallel`; at least 1).
    pub parallel: usize,
}

/// Counters the engine keeps for `/metrics`.
#[derive(Debug, Default)]
pub struct EngineMetrics {
    /// Prompt tokens computed (not taken from the cache).
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens taken from kept states.
    pub cached_tokens: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Time spent on prompts, microseconds.
    pub prefill_us: AtomicU64,
    /// Time spent generating, microseconds.
    pub decode_us: AtomicU64,
    /// Prefix-cache lookups that found / did not find a state.
    pub cache_hits: AtomicU64,
    /// See `cache_hits`.
    pub cache_misses: AtomicU64,
    /// Bytes held by the prefix cache.
    pub cache_bytes: AtomicU64,
    /// States held by the prefix cache.
    pub cache_entries: AtomicU64,
    /// Sequences in the running batch (prefilling or decoding).
    pub batch_sequences: AtomicU64,
    /// Of those, the ones generating.
    pub batch_decoding: AtomicU64,
    /// Batched forward steps run.
    pub batch_steps: AtomicU64,
}

/// What the HTTP side learns once the model is loaded.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// The context size in force.
    pub ctx_size: usize,
    /// Sampling defaults from `generation_config.json`.
    pub sampling: SamplingParams,
}

/// The model did not load, so the engine serves nothing. Shared: every
/// handle and the load callback see the same error.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{0}")]
pub struct LoadFailed(pub Arc<ChatError>);

/// Why a job was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// `queue` requests already wait.
    QueueFull,
}

struct Shared {
    /// Jobs queued or running.
    depth: AtomicUsize,
    ready: AtomicBool,
    metrics: EngineMetrics,
}

/// Handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared>,
    limit: usize,
    parallel: usize,
    info: Arc<Mutex<Option<Result<ModelInfo, LoadFailed>>>>,
}

impl Engine {
    /// Starts the engine thread, which first runs `load` (jobs queue
    /// meanwhile) and then serves jobs until every handle is dropped.
    /// `on_loaded` is called on the engine thread with the outcome.
    pub fn spawn<L, F>(load: L, config: EngineConfig, on_loaded: F) -> Engine
    where
        L: FnOnce() -> Result<ChatModel, ChatError> + Send + 'static,
        F: FnOnce(&Result<ModelInfo, LoadFailed>) + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Job>();
        let shared = Arc::new(Shared {
            depth: AtomicUsize::new(0),
            ready: AtomicBool::new(false),
            metrics: EngineMetrics::default(),
        });
        let info = Arc::new(Mutex::new(None));
        let engine = Engine {
            tx,
            shared: shared.clone(),
            limit: config.queue + config.parallel.max(1),
            parallel: config.parallel.max(1),
            info: info.clone(),
        };
        std::thread::Builder::new()
            .name("rh-engine".into())
            .spawn(move || {
                let loaded = load().map_err(|e| LoadFailed(Arc::new(e)));
                let outcome = loaded.as_ref().map_err(Clone::clone).map(|chat| ModelInfo {
                    ctx_size: config
                        .ctx_size
                        .clamp(2, chat.model.config().max_position_embeddings.max(2)),
                    sampling: chat.generation.sampling(),
                });
                *info.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome.clone());
                on_loaded(&outcome);
                let (Ok(chat), Ok(model_info)) = (loaded, outcome) else {
                    return;
                };
                shared.ready.store(true, Ordering::Release);
                let mut worker = Worker {
                    chat,
                    cache: PrefixCache::new(config.cache_bytes),
                    ctx_size: model_info.ctx_size,
                    shared,
                };
                run_batches(&mut worker, rx, config.parallel);
            })
            .expect("spawning the engine thread");
        engine
    }

    /// Whether the model is loaded.
    pub fn ready(&self) -> bool {
        self.shared.ready.load(Ordering::Acquire)
    }

    /// The loaded model's figures (None while loading).
    pub fn info(&self) -> Option<Result<ModelInfo, LoadFailed>> {
        self.info.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Jobs queued or running.
    pub fn depth(&self) -> usize {
        self.shared.depth.load(Ordering::Relaxed)
    }

    /// Most sequences in the running batch.
    pub fn parallel(&self) -> usize {
        self.parallel
    }

    /// The engine's counters.
    pub fn metrics(&self) -> &EngineMetrics {
        &self.shared.metrics
    }

    /// Queues a job (FIFO), or refuses it when the queue is full.
    pub fn submit(&self, request: GenRequest, sink: Sink) -> Result<(), Rejected> {
        let mut depth = self.shared.depth.load(Ordering::Relaxed);
        loop {
            if depth >= self.limit {
                return Err(Rejected::QueueFull);
            }
            match self.shared.depth.compare_exchange(
                depth,
                depth + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(d) => depth = d,
            }
        }
        if self.tx.send(Job { request, sink }).is_err() {
            // The engine thread ended (the model failed to load).
            self.shared.depth.fetch_sub(1, Ordering::AcqRel);
            return Err(Rejected::QueueFull);
        }
        Ok(())
    }
}

/// What the engine thread owns.
pub struct Worker {
    /// The model.
    pub chat: ChatModel,
    /// Kept states.
    pub cache: PrefixCache,
    /// Context size.
    pub ctx_size: usize,
    shared: Arc<Shared>,
}

impl Worker {
    pub(super) fn metrics(&self) -> &EngineMetrics {
        &self.shared.metrics
    }

    /// Publishes the batch's occupancy for `/metrics` and `/health`.
    fn publish_batch(&self, running: &[Sequence]) {
        let m = &self.shared.metrics;
        let decoding = running.iter().filter(|s| s.is_decoding()).count();
        m.batch_sequences
            .store(running.len() as u64, Ordering::Relaxed);
        m.batch_decoding.store(decoding as u64, Ordering::Relaxed);
    }
}

/// The scheduler: a running batch of at most `parallel` sequences, fed by
/// the FIFO queue. Each step is one batched forward: every decoding
/// sequence feeds its last token, and sequences whose prompts are not in
/// yet share a prompt-token budget ([`ChunkPacer`]), oldest first. A new
/// request joins at the next step boundary; a finished or cancelled one
/// leaves after the step that ended it.
fn run_batches(worker: &mut Worker, rx: mpsc::Receiver<Job>, parallel: usize) {
    let parallel = parallel.max(1);
    let mut running: Vec<Sequence> = Vec::new();
    let mut pacer = ChunkPacer::new();
    let mut open = true;
    loop {
        // Admission: wait when idle; otherwise take what is waiting, up to
        // the cap, without blocking the running streams.
        while open && running.len() < parallel {
            let job = if running.is_empty() {
                match rx.recv() {
                    Ok(j) => j,
                    Err(_) => {
                        open = false;
                        break;
                    }
                }
            } else {
                match rx.try_recv() {
                    Ok(j) => j,
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            };
            admit(worker, job, &mut running);
        }
        if running.is_empty() {
            if open {
                continue;
            }
            return;
        }
        step(worker, &mut running, &mut pacer);
    }
}

/// Starts a job: a refused prompt fails at once; a prompt wholly kept by
/// the prefix cache starts generating at once; else it joins the batch.
fn admit(w: &mut Worker, job: Job, running: &mut Vec<Sequence>) {
    let t0 = Instant::now();
    let admitted = Sequence::admit(w, job, t0);
    // The running streams wait for this (rendering and tokenizing the
    // prompt, the prefix-cache lookup): `-vv` shows it beside the steps.
    tracing::debug!(
        "admit: {:.1} ms beside {} running",
        t0.elapsed().as_secs_f64() * 1e3,
        running.len()
    );
    match admitted {
        Err((mut sink, f)) => {
            // The slot is freed before the client hears (as in `leave`).
            w.shared.depth.fetch_sub(1, Ordering::AcqRel);
            sink(Event::Failed(f));
        }
        Ok(mut seq) => {
            if seq.prompt_left() == 0 {
                if let Progress::Ended(outcome) = seq.prompt_in(w) {
                    return leave(w, seq, outcome);
                }
            }
            running.push(seq);
            w.publish_batch(running);
        }
    }
}

/// One batched forward over the running sequences, then each samples.
fn step(w: &mut Worker, running: &mut Vec<Sequence>, pacer: &mut ChunkPacer) {
    let decoding = running.iter().filter(|s| s.is_decoding()).count();
    let mut budget = pacer.budget(decoding);
    let mut inputs: Vec<(usize, Input)> = Vec::with_capacity(running.len());
    let mut prompt_tokens = 0;
    for (i, s) in running.iter().enumerate() {
        if let Some(input) = s.next_input(budget) {
            if let Input::Prompt { range, .. } = &input {
                budget -= range.len();
                prompt_tokens += range.len();
            }
            inputs.push((i, input));
        }
    }
    // The ids are copied out (a prompt chunk, or one token each) so the
    // states can be borrowed mutably below.
    let ids: Vec<Vec<u32>> = inputs
        .iter()
        .map(|(i, input)| running[*i].input_ids(input).to_vec())
        .collect();
    let t0 = Instant::now();
    let logits = {
        let mut states: Vec<&mut State> = Vec::with_capacity(inputs.len());
        let mut rest: &mut [Sequence] = running;
        let mut base = 0;
        for &(i, _) in &inputs {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(i + 1 - base);
            base = i + 1;
            rest = tail;
            states.push(&mut head[head.len() - 1].state);
        }
        let mut batch: Vec<BatchSeq> = states
            .into_iter()
            .zip(&ids)
            .zip(&inputs)
            .map(|((state, ids), (_, input))| BatchSeq {
                state,
                ids,
                logits: match input {
                    Input::Prompt { logits, .. } => *logits,
                    Input::Token(_) => true,
                },
            })
            .collect();
        w.chat.model.forward_batch(&mut batch)
    };
    let secs = t0.elapsed().as_secs_f64();
    tracing::debug!(
        "step: {decoding} decoding + {prompt_tokens} prompt tokens, {:.1} ms",
        secs * 1e3
    );
    pacer.observe(decoding, prompt_tokens, secs);
    w.shared.metrics.batch_steps.fetch_add(1, Ordering::Relaxed);
    let mut ended = Vec::new();
    for ((i, input), l) in inputs.iter().zip(logits) {
        if let Progress::Ended(outcome) = running[*i].advance(w, input, l) {
            ended.push((*i, outcome));
        }
    }
    let gone: Vec<_> = ended
        .into_iter()
        .rev()
        .map(|(i, outcome)| (running.remove(i), outcome))
        .collect();
    // The batch's occupancy drops before the clients get their last
    // event, so one that asks `/health` right after its answer finds its
    // slot free (the http test raced this on a loaded machine).
    w.publish_batch(running);
    for (seq, outcome) in gone {
        leave(w, seq, outcome);
    }
}
/// A prompt ready to feed.
pub struct Prepared {
    /// Its tokens.
    pub ids: Vec<u32>,
    /// Where the history ends and the generation prompt starts (a point
    /// the next turn of the same chat shares), when there is one.
    pub boundary: Option<usize>,
    /// The prompt ends inside `<think>`.
    pub starts_in_reasoning: bool,
}

pub(super) fn chat_err(e: ChatError) -> Failure {
    match e {
        ChatError::TemplateRender { .. } | ChatError::Tokenize(_) => {
            Failure::BadRequest(e.to_string())
        }
        e => Failure::Internal(e.to_string()),
    }
}

/// Renders and tokenizes a prompt; checks it fits the context.
pub fn prepare(chat: &ChatModel, prompt: &Prompt, ctx_size: usize) -> Result<Prepared, Failure> {
    let tok = &chat.tokenizer;
    let prepared = match prompt {
        Prompt::Text(text) => Prepared {
            ids: tok.encode(text).map_err(chat_err)?,
            boundary: None,
            starts_in_reasoning: false,
        },
        Prompt::Chat { messages, extras } => {
            if extras.tools.as_ref().is_some_and(|t| !t.is_empty())
                && !chat.template.supports_tools()
            {
                return Err(Failure::BadRequest(format!(
                    "tools: the model's chat template ({}) does not render tools",
                    chat.template.origin
                )));
            }
            let full = chat
                .template
                .render_with(messages, true, extras)
                .map_err(chat_err)?;
            let ids = tok.encode(&full).map_err(chat_err)?;
            // The history without the generation prompt: the next turn of
            // this chat renders the same text first.
            let history = chat
                .template
                .render_with(messages, false, extras)
                .map_err(chat_err)?;
            let boundary = if full.starts_with(&history) && history.len() < full.len() {
                let h = tok.encode(&history).map_err(chat_err)?;
                (ids.starts_with(&h) && !h.is_empty()).then_some(h.len())
            } else {
                None
            };
            Prepared {
                starts_in_reasoning: full.trim_end().ends_with("<think>"),
                ids,
                boundary,
            }
        }
    };
    if prepared.ids.is_empty() {
        return Err(Failure::BadRequest("the prompt is empty".into()));
    }
    if prepared.ids.len() >= ctx_size {
        return Err(Failure::BadRequest(format!(
            "the prompt is {} tokens but the context is {} tokens (shorten the prompt or start the server with a larger --ctx-size)",
            prepared.ids.len(),
            ctx_size
        )));
    }
    chat.model
        .check_ids(&prepared.ids)
        .map_err(|e| Failure::BadRequest(e.to_string()))?;
    Ok(prepared)
}

/// A state that consumed a whole prompt, and what it cost.
pub struct Prefilled {
    /// The state after the prompt.
    pub state: State,
    /// Logits after the prompt's last token.
    pub logits: Vec<f32>,
    /// Tokens taken from a kept state.
    pub cached: usize,
}

/// Feeds a whole prompt alone, starting from the longest kept prefix (when
/// `use_cache`), keeping states at `boundary` and at the end of the
/// prompt: what the scheduler does for one sequence, in one call (tests
/// and tools use it).
pub fn prefill(
    chat: &ChatModel,
    cache: &mut PrefixCache,
    ids: &[u32],
    boundary: Option<usize>,
    use_cache: bool,
) -> Prefilled {
    let hit = if use_cache { cache.lookup(ids) } else { None };
    let (mut state, mut logits, cached) = match hit {
        Some(h) => (h.state, h.logits, h.tokens),
        None => (chat.model.new_state(), Vec::new(), 0),
    };
    let mut at = cached;
    if let Some(b) = boundary.filter(|&b| b > at && b < ids.len()) {
        logits = chat.model.forward(&mut state, &ids[at..b]);
        if use_cache {
            cache.insert(&ids[..b], &state, &logits);
        }
        at = b;
    }
    if at < ids.len() {
        logits = chat.model.forward(&mut state, &ids[at..]);
        if use_cache {
            cache.insert(ids, &state, &logits);
        }
    }
    Prefilled {
        state,
        logits,
        cached,
    }
}

/// A sequence leaves the batch: its last event, the counters, its slot.
fn leave(w: &mut Worker, seq: Sequence, outcome: Result<Summary, Failure>) {
    let m = &w.shared.metrics;
    if let Ok(summary) = &outcome {
        m.generated_tokens
            .fetch_add(summary.completion_tokens as u64, Ordering::Relaxed);
        m.decode_us
            .fetch_add((summary.predicted_ms * 1e3) as u64, Ordering::Relaxed);
    }
    m.cache_bytes
        .store(w.cache.bytes() as u64, Ordering::Relaxed);
    m.cache_entries
        .store(w.cache.len() as u64, Ordering::Relaxed);
    // The slot is freed before the last event goes out: a client that has
    // its answer and then reads /metrics must not still count itself.
    w.shared.depth.fetch_sub(1, Ordering::AcqRel);
    seq.close(outcome);
}

/// How many prompt tokens a step takes while other sequences decode.
///
/// A step's time is about one decode step (reading the weights once) plus
/// the prompt tokens' compute, so the chunk sets how long the running
/// streams wait for their next token while a prompt goes in. The pacer
/// aims each mixed step at [`STALL_FACTOR`] times a plain decode step
/// (both measured as the server runs): after a mixed step it estimates the
/// cost of one prompt token from the time above a plain step and sizes the
/// next chunk to fit, changing it at most 4x at a time and keeping it
/// within [`MIN_CHUNK`]..=[`PREFILL_CHUNK`]. With nobody decoding a prompt
/// stalls nothing and takes the whole [`PREFILL_CHUNK`].
struct ChunkPacer {
    /// Recent plain decode step, seconds (running mean).
    decode_step: Option<f64>,
    chunk: usize,
}

/// A step with a prompt chunk aims at this many plain decode steps: the
/// running streams keep a third of their speed while a prompt goes in,
/// and the prompt gets the rest.
const STALL_FACTOR: f64 = 3.0;
/// Smallest prompt chunk beside decodes (below it a chunk's weight reads
/// cost more than its tokens' compute and prefill crawls).
const MIN_CHUNK: usize = 16;
/// The chunk before a mixed step is measured: the smallest, so a prompt
/// arriving beside running streams stalls them least while the pacer
/// learns (it may grow 4x a step). With 64, the first mixed step of a
/// 2,387-token prompt beside 3 streams took 10x a plain step.
const FIRST_CHUNK: usize = MIN_CHUNK;

impl ChunkPacer {
    fn new() -> Self {
        ChunkPacer {
            decode_step: None,
            chunk: FIRST_CHUNK,
        }
    }

    /// Prompt tokens the next step may take.
    fn budget(&self, decoding: usize) -> usize {
        if decoding == 0 {
            PREFILL_CHUNK
        } else {
            self.chunk
        }
    }

    /// Learns from a step of `decoding` decode tokens and `prompt` prompt
    /// tokens that took `secs`.
    fn observe(&mut self, decoding: usize, prompt: usize, secs: f64) {
        if decoding == 0 {
            return;
        }
        if prompt == 0 {
            self.decode_step = Some(match self.decode_step {
                Some(d) => 0.7 * d + 0.3 * secs,
                None => secs,
            });
            return;
        }
        let Some(plain) = self.decode_step else {
            return;
        };
        let per_token = ((secs - plain) / prompt as f64).max(1e-9);
        let want = ((STALL_FACTOR - 1.0) * plain / per_token).round() as usize;
        let (lo, hi) = (prompt.max(MIN_CHUNK) / 4, prompt.max(MIN_CHUNK) * 4);
        self.chunk = want.clamp(lo, hi).clamp(MIN_CHUNK, PREFILL_CHUNK);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_sizes_chunks_to_the_stall_budget() {
        let mut p = ChunkPacer::new();
        // Nobody decoding: a prompt takes the whole chunk.
        assert_eq!(p.budget(0), PREFILL_CHUNK);
        assert_eq!(p.budget(3), FIRST_CHUNK);
        // A mixed step before any plain one teaches nothing.
        p.observe(3, 64, 1.0);
        assert_eq!(p.budget(3), FIRST_CHUNK);
        // Plain steps of 0.1 s; 64 prompt tokens added 0.64 s (10 ms each):
        // two plain steps' worth is 20 tokens.
        p.observe(3, 0, 0.1);
        p.observe(3, 64, 0.74);
        assert_eq!(p.budget(3), 20);
        // Cheap prompt tokens grow the chunk at most 4x per step.
        p.observe(3, 20, 0.1 + 20.0 * 1e-5);
        assert_eq!(p.budget(3), 80);
        // Dear ones shrink it (at most 4x per step), never below MIN_CHUNK.
        p.observe(3, 80, 100.0);
        assert_eq!(p.budget(3), 20);
        p.observe(3, 20, 100.0);
        assert_eq!(p.budget(3), MIN_CHUNK);
    }
}
