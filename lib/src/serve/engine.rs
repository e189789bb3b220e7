//! The engine thread: it owns the [`ChatModel`] and the [`PrefixCache`],
//! takes [`Job`]s from a FIFO queue and runs them one at a time, streaming
//! [`Event`]s back through each job's [`Sink`]. The HTTP side never touches
//! the model: it submits a job and reads events, so it never blocks on
//! compute.
//!
//! The API is the seam for batching: a scheduler that runs several jobs per
//! forward pass replaces [`run_queue`] (the loop that takes one job at a
//! time) and keeps [`Job`], [`Event`] and [`Sink`] as they are. The phases
//! of one job ([`prepare`], [`prefill`], the decode loop) are separate
//! functions so a scheduler can interleave them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::output::{ChatOutput, Delta};
use super::prefix_cache::PrefixCache;
use crate::chat::{ChatError, ChatModel, Detokenizer, Message, RenderExtras};
use crate::model::State;
use crate::sample::{Sampler, SamplingParams};

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
    /// Requests that may wait behind the running one.
    pub queue: usize,
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
}

/// What the HTTP side learns once the model is loaded.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// The context size in force.
    pub ctx_size: usize,
    /// Sampling defaults from `generation_config.json`.
    pub sampling: SamplingParams,
}

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
    info: Arc<Mutex<Option<Result<ModelInfo, String>>>>,
}

impl Engine {
    /// Starts the engine thread, which first runs `load` (jobs queue
    /// meanwhile) and then serves jobs until every handle is dropped.
    /// `on_loaded` is called on the engine thread with the outcome.
    pub fn spawn<L, F>(load: L, config: EngineConfig, on_loaded: F) -> Engine
    where
        L: FnOnce() -> Result<ChatModel, String> + Send + 'static,
        F: FnOnce(&Result<ModelInfo, String>) + Send + 'static,
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
            limit: config.queue + 1,
            info: info.clone(),
        };
        std::thread::Builder::new()
            .name("rh-engine".into())
            .spawn(move || {
                let loaded = load();
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
                run_queue(&mut worker, rx);
            })
            .expect("spawning the engine thread");
        engine
    }

    /// Whether the model is loaded.
    pub fn ready(&self) -> bool {
        self.shared.ready.load(Ordering::Acquire)
    }

    /// The loaded model's figures (None while loading).
    pub fn info(&self) -> Option<Result<ModelInfo, String>> {
        self.info.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Jobs queued or running.
    pub fn depth(&self) -> usize {
        self.shared.depth.load(Ordering::Relaxed)
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

/// One job at a time, in arrival order (the loop a batch scheduler replaces).
fn run_queue(worker: &mut Worker, rx: mpsc::Receiver<Job>) {
    while let Ok(mut job) = rx.recv() {
        let started = Instant::now();
        match run_job(worker, &job.request, &mut job.sink, started) {
            Ok(summary) => {
                let m = &worker.shared.metrics;
                m.generated_tokens
                    .fetch_add(summary.completion_tokens as u64, Ordering::Relaxed);
                m.decode_us
                    .fetch_add((summary.predicted_ms * 1e3) as u64, Ordering::Relaxed);
                (job.sink)(Event::Done(summary));
            }
            Err(f) => {
                (job.sink)(Event::Failed(f));
            }
        }
        drop(job);
        worker.shared.depth.fetch_sub(1, Ordering::AcqRel);
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

fn chat_err(e: ChatError) -> Failure {
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

/// Feeds `ids` starting from the longest kept prefix (when `use_cache`),
/// keeping states at `boundary` and at the end of the prompt.
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

/// Applies OpenAI's presence and frequency penalties to `logits`.
fn penalize(logits: &mut [f32], counts: &HashMap<u32, u32>, presence: f32, frequency: f32) {
    if presence == 0.0 && frequency == 0.0 {
        return;
    }
    for (&id, &n) in counts {
        if let Some(l) = logits.get_mut(id as usize) {
            *l -= presence + frequency * n as f32;
        }
    }
}

/// Runs one job to the end.
fn run_job(
    w: &mut Worker,
    req: &GenRequest,
    sink: &mut Sink,
    started: Instant,
) -> Result<Summary, Failure> {
    let prepared = prepare(&w.chat, &req.prompt, w.ctx_size)?;
    let ids = &prepared.ids;
    let Prefilled {
        mut state,
        mut logits,
        cached,
    } = prefill(
        &w.chat,
        &mut w.cache,
        ids,
        prepared.boundary,
        req.cache_prompt,
    );
    let prompt_ms = started.elapsed().as_secs_f64() * 1e3;
    let m = &w.shared.metrics;
    m.prompt_tokens
        .fetch_add((ids.len() - cached) as u64, Ordering::Relaxed);
    m.cached_tokens.fetch_add(cached as u64, Ordering::Relaxed);
    m.prefill_us
        .fetch_add((prompt_ms * 1e3) as u64, Ordering::Relaxed);
    let (hits, misses) = w.cache.hits_misses();
    m.cache_hits.store(hits, Ordering::Relaxed);
    m.cache_misses.store(misses, Ordering::Relaxed);
    if !sink(Event::Started {
        prompt_tokens: ids.len(),
        cached_tokens: cached,
    }) {
        return Ok(summary(
            Finish::Cancelled,
            ids.len(),
            cached,
            0,
            prompt_ms,
            0.0,
        ));
    }

    let mut out = match req.prompt {
        Prompt::Chat { .. } => {
            ChatOutput::chat(&req.stop, prepared.starts_in_reasoning, req.parse_tools)
        }
        Prompt::Text(_) => ChatOutput::raw(&req.stop),
    };
    let mut sampler = Sampler::new(req.sampling.clone());
    let mut detok = Detokenizer::new();
    let keep = req.sampling.repeat_last_n.max(1);
    let mut recent: Vec<u32> = ids[ids.len().saturating_sub(keep)..].to_vec();
    let mut counts: HashMap<u32, u32> = HashMap::new();
    let mut fed: Vec<u32> = ids.clone();
    let mut generated = 0usize;
    let mut first: Option<Instant> = None;
    let mut last;
    let tok = &w.chat.tokenizer;
    let finish = loop {
        penalize(
            &mut logits,
            &counts,
            req.presence_penalty,
            req.frequency_penalty,
        );
        let id = sampler.sample(&mut logits, &recent);
        last = Instant::now();
        first.get_or_insert(last);
        if w.chat.eos_ids.contains(&id) {
            break Finish::Stop;
        }
        generated += 1;
        *counts.entry(id).or_default() += 1;
        recent.push(id);
        if recent.len() > 4 * keep {
            recent.drain(..recent.len() - keep);
        }
        let mut deltas = Vec::new();
        if let Some(text) = detok.push(tok, id).map_err(chat_err)? {
            deltas = out.push(&text);
        }
        if !sink(Event::Deltas(deltas)) {
            break Finish::Cancelled;
        }
        if out.stopped() {
            break Finish::Stop;
        }
        if generated >= req.max_tokens || state.position() + 1 >= w.ctx_size {
            break Finish::Length;
        }
        logits = w.chat.model.forward(&mut state, &[id]);
        fed.push(id);
    };
    if finish != Finish::Cancelled {
        let mut tail = Vec::new();
        if let Some(text) = detok.flush(tok).map_err(chat_err)? {
            tail = out.push(&text);
        }
        tail.extend(out.finish());
        if !tail.is_empty() {
            sink(Event::Deltas(tail));
        }
    }
    // The answer's state: the next turn of a template that keeps answers
    // verbatim, or a raw completion continued, starts here.
    if req.cache_prompt && fed.len() > ids.len() {
        w.cache.insert(&fed, &state, &logits);
    }
    m.cache_bytes
        .store(w.cache.bytes() as u64, Ordering::Relaxed);
    m.cache_entries
        .store(w.cache.len() as u64, Ordering::Relaxed);
    let finish = if finish == Finish::Stop && out.tool_calls() > 0 {
        Finish::ToolCalls
    } else {
        finish
    };
    let predicted_ms = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64() * 1e3);
    Ok(summary(
        finish,
        ids.len(),
        cached,
        generated,
        prompt_ms,
        predicted_ms,
    ))
}

fn summary(
    finish: Finish,
    prompt_tokens: usize,
    cached_tokens: usize,
    completion_tokens: usize,
    prompt_ms: f64,
    predicted_ms: f64,
) -> Summary {
    Summary {
        finish,
        prompt_tokens,
        cached_tokens,
        completion_tokens,
        prompt_ms,
        predicted_ms,
    }
}
