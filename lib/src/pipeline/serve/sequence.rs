//! One request inside the engine's running batch: its prompt fed in chunks
//! (from a kept state when the prefix cache has one), then one token per
//! step, sampled, detokenized and sent to its sink. The scheduler
//! ([`super::engine`]) asks each sequence for the tokens of the next step
//! ([`Sequence::next_input`]), runs one batched forward for all of them,
//! and hands each its logits back ([`Sequence::advance`]).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::engine::{
    chat_err, prepare, Event, Failure, Finish, GenRequest, Job, Prompt, Sink, Summary, Worker,
};
use super::output::ChatOutput;
use crate::chat::Detokenizer;
use crate::model::State;
use crate::sample::Sampler;

/// What a sequence feeds in the next step.
pub(super) enum Input {
    /// Prompt tokens `ids[range]`; `logits` when the state after them is
    /// kept or the prompt ends there.
    Prompt { range: Range<usize>, logits: bool },
    /// The token sampled last.
    Token(u32),
}

/// Where a sequence stands after a step.
pub(super) enum Progress {
    /// It goes on.
    Running,
    /// It has ended (its last event is not sent yet).
    Ended(Result<Summary, Failure>),
}

/// The generation side of a sequence, set up once its prompt is in.
struct Decoding {
    out: ChatOutput,
    sampler: Sampler,
    detok: Detokenizer,
    keep: usize,
    recent: Vec<u32>,
    counts: HashMap<u32, u32>,
    /// Every token the state has consumed (prompt, then answer).
    fed: Vec<u32>,
    generated: usize,
    first: Option<Instant>,
    last: Instant,
    /// The token sampled last, to feed next.
    next: u32,
}

/// One request in the running batch.
pub(super) struct Sequence {
    sink: Sink,
    req: GenRequest,
    started: Instant,
    ids: Vec<u32>,
    boundary: Option<usize>,
    starts_in_reasoning: bool,
    /// The model state: the prompt's first `at` tokens, then the answer.
    pub(super) state: State,
    cached: usize,
    at: usize,
    logits: Vec<f32>,
    prompt_ms: f64,
    decoding: Option<Decoding>,
}

impl Sequence {
    /// Renders and tokenizes the job's prompt and starts from the longest
    /// kept prefix; a refused prompt gives back the sink and the failure.
    pub(super) fn admit(
        w: &mut Worker,
        job: Job,
        started: Instant,
    ) -> Result<Self, (Sink, Failure)> {
        let Job { request, sink } = job;
        let prepared = match prepare(&w.chat, &request.prompt, w.ctx_size) {
            Ok(p) => p,
            Err(f) => return Err((sink, f)),
        };
        let hit = if request.cache_prompt {
            w.cache.lookup(&prepared.ids)
        } else {
            None
        };
        let (state, logits, cached) = match hit {
            Some(h) => (h.state, h.logits, h.tokens),
            None => (w.chat.model.new_state(), Vec::new(), 0),
        };
        let (hits, misses) = w.cache.hits_misses();
        let m = w.metrics();
        m.cache_hits.store(hits, Ordering::Relaxed);
        m.cache_misses.store(misses, Ordering::Relaxed);
        Ok(Sequence {
            sink,
            req: request,
            started,
            ids: prepared.ids,
            boundary: prepared.boundary,
            starts_in_reasoning: prepared.starts_in_reasoning,
            state,
            cached,
            at: cached,
            logits,
            prompt_ms: 0.0,
            decoding: None,
        })
    }

    /// Whether its prompt is in and it generates one token per step.
    pub(super) fn is_decoding(&self) -> bool {
        self.decoding.is_some()
    }

    /// Prompt tokens still to feed.
    pub(super) fn prompt_left(&self) -> usize {
        if self.decoding.is_some() {
            0
        } else {
            self.ids.len() - self.at
        }
    }

    /// The tokens of the next step: the last sampled token, or up to
    /// `budget` prompt tokens (a chunk ends at the history boundary, whose
    /// state the prefix cache keeps). None when the budget is 0.
    pub(super) fn next_input(&self, budget: usize) -> Option<Input> {
        if let Some(d) = &self.decoding {
            return Some(Input::Token(d.next));
        }
        if budget == 0 {
            return None;
        }
        let mut end = (self.at + budget).min(self.ids.len());
        let keep_boundary = self
            .boundary
            .filter(|&b| b > self.at && b < self.ids.len() && self.req.cache_prompt);
        if let Some(b) = keep_boundary {
            end = end.min(b);
        }
        Some(Input::Prompt {
            range: self.at..end,
            logits: end == self.ids.len() || Some(end) == keep_boundary,
        })
    }

    /// The ids of an input.
    pub(super) fn input_ids<'a>(&'a self, input: &'a Input) -> &'a [u32] {
        match input {
            Input::Prompt { range, .. } => &self.ids[range.clone()],
            Input::Token(id) => std::slice::from_ref(id),
        }
    }

    /// Takes the step's result: `logits` after the fed `input` (empty when
    /// none were asked for).
    pub(super) fn advance(&mut self, w: &mut Worker, input: &Input, logits: Vec<f32>) -> Progress {
        match input {
            Input::Prompt {
                range,
                logits: kept,
            } => {
                self.at = range.end;
                if *kept {
                    self.logits = logits;
                    if self.req.cache_prompt {
                        w.cache
                            .insert(&self.ids[..self.at], &self.state, &self.logits);
                    }
                }
                if self.at < self.ids.len() {
                    return Progress::Running;
                }
                self.prompt_in(w)
            }
            Input::Token(id) => {
                let d = self
                    .decoding
                    .as_mut()
                    .expect("a token is fed only when decoding");
                d.fed.push(*id);
                self.logits = logits;
                self.sample(w)
            }
        }
    }

    /// The prompt is in (fed, or wholly kept): counts it, says `Started`
    /// and samples the first token.
    pub(super) fn prompt_in(&mut self, w: &mut Worker) -> Progress {
        let ids = &self.ids;
        self.prompt_ms = self.started.elapsed().as_secs_f64() * 1e3;
        let m = w.metrics();
        m.prompt_tokens
            .fetch_add((ids.len() - self.cached) as u64, Ordering::Relaxed);
        m.cached_tokens
            .fetch_add(self.cached as u64, Ordering::Relaxed);
        m.prefill_us
            .fetch_add((self.prompt_ms * 1e3) as u64, Ordering::Relaxed);
        if !(self.sink)(Event::Started {
            prompt_tokens: ids.len(),
            cached_tokens: self.cached,
        }) {
            return Progress::Ended(Ok(self.summary(Finish::Cancelled)));
        }
        let out = match self.req.prompt {
            Prompt::Chat { .. } => ChatOutput::chat(
                &self.req.stop,
                self.starts_in_reasoning,
                self.req.parse_tools,
            ),
            Prompt::Text(_) => ChatOutput::raw(&self.req.stop),
        };
        let keep = self.req.sampling.repeat_last_n.max(1);
        self.decoding = Some(Decoding {
            out,
            sampler: Sampler::new(self.req.sampling.clone()),
            detok: Detokenizer::new(),
            keep,
            recent: ids[ids.len().saturating_sub(keep)..].to_vec(),
            counts: HashMap::new(),
            fed: ids.clone(),
            generated: 0,
            first: None,
            last: Instant::now(),
            next: 0,
        });
        self.sample(w)
    }

    /// Samples a token from the current logits and sends what it completes;
    /// ends the sequence on an end token, a stop string, the length limits
    /// or a gone client.
    fn sample(&mut self, w: &mut Worker) -> Progress {
        let d = self.decoding.as_mut().expect("sampling while decoding");
        let req = &self.req;
        penalize(
            &mut self.logits,
            &d.counts,
            req.presence_penalty,
            req.frequency_penalty,
        );
        let id = d.sampler.sample(&mut self.logits, &d.recent);
        d.last = Instant::now();
        d.first.get_or_insert(d.last);
        if w.chat.eos_ids.contains(&id) {
            return self.end(w, Finish::Stop);
        }
        d.generated += 1;
        *d.counts.entry(id).or_default() += 1;
        d.recent.push(id);
        if d.recent.len() > 4 * d.keep {
            d.recent.drain(..d.recent.len() - d.keep);
        }
        let mut deltas = Vec::new();
        match d.detok.push(&w.chat.tokenizer, id) {
            Ok(Some(text)) => deltas = d.out.push(&text),
            Ok(None) => {}
            Err(e) => return Progress::Ended(Err(chat_err(e))),
        }
        if !(self.sink)(Event::Deltas(deltas)) {
            return self.end(w, Finish::Cancelled);
        }
        if d.out.stopped() {
            return self.end(w, Finish::Stop);
        }
        if d.generated >= req.max_tokens || self.state.position() + 1 >= w.ctx_size {
            return self.end(w, Finish::Length);
        }
        d.next = id;
        Progress::Running
    }

    /// Flushes the last text, keeps the answer's state and sums up.
    fn end(&mut self, w: &mut Worker, finish: Finish) -> Progress {
        let d = self.decoding.as_mut().expect("ending while decoding");
        if finish != Finish::Cancelled {
            let mut tail = Vec::new();
            match d.detok.flush(&w.chat.tokenizer) {
                Ok(Some(text)) => tail = d.out.push(&text),
                Ok(None) => {}
                Err(e) => return Progress::Ended(Err(chat_err(e))),
            }
            tail.extend(d.out.finish());
            if !tail.is_empty() {
                (self.sink)(Event::Deltas(tail));
            }
        }
        // The answer's state: the next turn of a template that keeps
        // answers verbatim, or a raw completion continued, starts here.
        if self.req.cache_prompt && d.fed.len() > self.ids.len() {
            w.cache.insert(&d.fed, &self.state, &self.logits);
        }
        let finish = if finish == Finish::Stop && d.out.tool_calls() > 0 {
            Finish::ToolCalls
        } else {
            finish
        };
        Progress::Ended(Ok(self.summary(finish)))
    }

    fn summary(&self, finish: Finish) -> Summary {
        let (generated, predicted_ms) = match &self.decoding {
            Some(d) => (
                d.generated,
                d.first
                    .map_or(0.0, |f| d.last.duration_since(f).as_secs_f64() * 1e3),
            ),
            None => (0, 0.0),
        };
        Summary {
            finish,
            prompt_tokens: self.ids.len(),
            cached_tokens: self.cached,
            completion_tokens: generated,
            prompt_ms: self.prompt_ms,
            predicted_ms,
        }
    }

    /// Sends the sequence's last event.
    pub(super) fn close(mut self, outcome: Result<Summary, Failure>) {
        match outcome {
            Ok(s) => (self.sink)(Event::Done(s)),
            Err(f) => (self.sink)(Event::Failed(f)),
        };
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
