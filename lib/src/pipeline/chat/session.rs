//! Multi-turn generation: a [`Conversation`] owns the model [`State`] and
//! feeds each turn only what the state has not consumed yet, so a second
//! turn costs its own tokens, not the whole history again.
//!
//! How a turn's new tokens are found: the history is rendered with the
//! template twice, without and with the new user message, with the last
//! assistant reply replaced by a sentinel. What follows the sentinel in the
//! first rendering is the end of that reply the model has not produced
//! (`<|im_end|>\n`), and what the second rendering adds is the new user
//! turn plus the generation prompt. Feeding those after the state keeps the
//! state equal to the rendered prompt, even though templates like Qwen3's
//! drop earlier reasoning when they re-render (the model saw its reasoning
//! once, as llama.cpp does). A template whose renderings do not extend each
//! other falls back to prefilling the whole history again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::{ChatError, ChatTemplate, ChatTokenizer, Detokenizer, GenerationConfig, Message};
use crate::model::{Model, State};
use crate::sample::{Sampler, SamplingParams};
use crate::weights::WeightSource;

/// Everything chat needs from a model directory.
pub struct ChatModel {
    /// The engine.
    pub model: Model,
    /// The tokenizer.
    pub tokenizer: ChatTokenizer,
    /// The chat template.
    pub template: ChatTemplate,
    /// `generation_config.json` (empty when absent).
    pub generation: GenerationConfig,
    /// Ids that end an answer: config.json's and generation_config.json's
    /// `eos_token_id` plus `<|im_end|>`.
    pub eos_ids: Vec<u32>,
}

impl ChatModel {
    /// Loads tokenizer, template and generation config first (so a missing
    /// tokenizer fails before the weights are touched), then the model.
    pub fn load(weights: Arc<dyn WeightSource>) -> Result<ChatModel, ChatError> {
        let tokenizer = ChatTokenizer::load(weights.as_ref())?;
        let template = ChatTemplate::load(weights.as_ref())?;
        let generation = match weights.aux_file("generation_config.json") {
            Some(b) => GenerationConfig::parse(&b, &weights.path())?,
            None => GenerationConfig::default(),
        };
        let model = Model::load(weights)?;
        Ok(ChatModel::from_parts(
            model, tokenizer, template, generation,
        ))
    }

    /// Assembles a chat model from loaded parts.
    pub fn from_parts(
        model: Model,
        tokenizer: ChatTokenizer,
        template: ChatTemplate,
        generation: GenerationConfig,
    ) -> ChatModel {
        let mut eos_ids = model.config().eos_ids();
        eos_ids.extend(&generation.eos_token_ids);
        eos_ids.extend(tokenizer.im_end);
        if let Some(id) = tokenizer.token_to_id(&template.eos_token) {
            eos_ids.push(id);
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        ChatModel {
            model,
            tokenizer,
            template,
            generation,
            eos_ids,
        }
    }
}

/// Generation settings of a conversation.
#[derive(Clone, Debug)]
pub struct GenOptions {
    /// Sampler settings.
    pub sampling: SamplingParams,
    /// Longest answer (reasoning included), in tokens.
    pub max_tokens: usize,
    /// Context size: prompt plus everything generated, all turns.
    pub ctx_size: usize,
    /// Passed to the template as `enable_thinking` (hybrid Qwen3 templates
    /// skip reasoning when false; the Thinking model's template ignores it).
    pub enable_thinking: bool,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions {
            sampling: SamplingParams::default(),
            max_tokens: 512,
            ctx_size: 8192,
            enable_thinking: true,
        }
    }
}

/// Streamed output of a turn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Event<'a> {
    /// Text of the model's reasoning (before `</think>`).
    Reasoning(&'a str),
    /// One more reasoning token was generated (`tokens` so far), whether or
    /// not it completed any text: drives a "thinking... (N tokens)" line.
    Thinking {
        /// Reasoning tokens so far.
        tokens: usize,
    },
    /// The reasoning ended after `tokens` tokens.
    ReasoningEnd {
        /// Reasoning tokens.
        tokens: usize,
    },
    /// Text of the answer.
    Answer(&'a str),
}

/// Why a turn ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// `max_tokens` reached.
    MaxTokens,
    /// The context is full.
    ContextFull,
    /// The cancel flag was raised.
    Cancelled,
}

/// Figures of one turn.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TurnStats {
    /// Tokens fed before generating (only this turn's new part).
    pub prompt_tokens: usize,
    /// Tokens generated (reasoning and answer; the end token not counted).
    pub generated_tokens: usize,
    /// Of those, reasoning tokens (up to and including `</think>`).
    pub reasoning_tokens: usize,
    /// Context used after the turn.
    pub context_tokens: usize,
    /// Time from the start of the turn to the first generated token, ms.
    pub ttft_ms: f64,
    /// Prompt tokens per second of the prefill.
    pub prefill_tps: f64,
    /// Generated tokens per second after the first.
    pub decode_tps: f64,
    /// What the expert cache did this turn, when a memory budget pages
    /// the experts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert_cache: Option<crate::model::experts::CacheUse>,
}

/// The outcome of a turn.
#[derive(Clone, Debug, Serialize)]
pub struct TurnResult {
    /// The reasoning text (empty when the model did not think).
    pub reasoning: String,
    /// The answer text.
    pub answer: String,
    /// Why it ended.
    pub stop: StopReason,
    /// Figures.
    pub stats: TurnStats,
}

/// Marks the last reply when rendering the history (private-use chars, so
/// no real text contains it).
const SENTINEL: &str = "\u{F8FF}rh-reply\u{F8FF}";

/// A multi-turn chat holding the model state between turns.
pub struct Conversation<'a> {
    chat: &'a ChatModel,
    opts: GenOptions,
    sampler: Sampler,
    state: State,
    system: Option<String>,
    messages: Vec<Message>,
    /// The last sampled token when it was not fed (a reply cut by
    /// max_tokens or Ctrl-C); fed at the start of the next turn.
    pending: Vec<u32>,
    /// Recent ids for the repetition penalty.
    recent: Vec<u32>,
    /// Every id the state has consumed, in order.
    fed: Vec<u32>,
    last: Option<TurnStats>,
}

impl<'a> Conversation<'a> {
    /// An empty conversation.
    pub fn new(chat: &'a ChatModel, opts: GenOptions) -> Conversation<'a> {
        Conversation {
            chat,
            sampler: Sampler::new(opts.sampling.clone()),
            opts,
            state: chat.model.new_state(),
            system: None,
            messages: Vec::new(),
            pending: Vec::new(),
            recent: Vec::new(),
            fed: Vec::new(),
            last: None,
        }
    }

    /// Forgets the history (keeps the system prompt and options).
    pub fn reset(&mut self) {
        self.state = self.chat.model.new_state();
        self.messages.clear();
        self.pending.clear();
        self.recent.clear();
        self.fed.clear();
        self.sampler = Sampler::new(self.opts.sampling.clone());
    }

    /// Sets (or clears) the system prompt; the history starts over.
    pub fn set_system(&mut self, system: Option<String>) {
        self.system = system.filter(|s| !s.is_empty());
        self.reset();
    }

    /// The system prompt.
    pub fn system(&self) -> Option<&str> {
        self.system.as_deref()
    }

    /// The options.
    pub fn options(&self) -> &GenOptions {
        &self.opts
    }

    /// Changes the options (a new sampler starts from the seed).
    pub fn set_options(&mut self, opts: GenOptions) {
        self.sampler = Sampler::new(opts.sampling.clone());
        self.opts = opts;
    }

    /// The messages so far (system first when set).
    pub fn messages(&self) -> Vec<Message> {
        let mut m = Vec::with_capacity(self.messages.len() + 1);
        if let Some(s) = &self.system {
            m.push(Message::new("system", s.clone()));
        }
        m.extend(self.messages.iter().cloned());
        m
    }

    /// Tokens the model state holds.
    pub fn context_used(&self) -> usize {
        self.state.position()
    }

    /// Every token id the model state has consumed, in order (the
    /// conversation as the model saw it).
    pub fn history_ids(&self) -> &[u32] {
        &self.fed
    }

    /// The model state (clone it to look ahead without changing the chat).
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Figures of the last turn.
    pub fn last_stats(&self) -> Option<&TurnStats> {
        self.last.as_ref()
    }

    /// The ids to feed for `user` and the prompt text they end with; `true`
    /// when the state must be rebuilt from scratch.
    fn plan_turn(&self, user: &str) -> Result<(Vec<u32>, String, bool), ChatError> {
        let t = &self.chat.template;
        let think = self.opts.enable_thinking;
        let mut msgs = self.messages();
        if self.state.position() > 0 {
            if let Some(last) = msgs.iter().rposition(|m| m.role == "assistant") {
                msgs[last].content = SENTINEL.to_string();
                let before = t.render(&msgs, false, think)?;
                msgs.push(Message::new("user", user));
                let after = t.render(&msgs, true, think)?;
                if let (Some(pos), true) = (before.rfind(SENTINEL), after.starts_with(&before)) {
                    let closing = &before[pos + SENTINEL.len()..];
                    let new = &after[before.len()..];
                    let mut ids = self.pending.clone();
                    ids.extend(self.chat.tokenizer.encode(&format!("{closing}{new}"))?);
                    return Ok((ids, after, false));
                }
                tracing::info!(
                    "{}: renderings do not extend each other; prefilling the history again",
                    t.origin
                );
            }
        }
        let mut msgs = self.messages();
        msgs.push(Message::new("user", user));
        let text = t.render(&msgs, true, think)?;
        Ok((self.chat.tokenizer.encode(&text)?, text, true))
    }

    /// Runs one turn: feeds `user` (and only what the state lacks), then
    /// generates until an end token, `max_tokens`, a full context or
    /// `cancel`, streaming text through `on_event`. A prompt that does not
    /// fit leaves the conversation unchanged.
    pub fn send(
        &mut self,
        user: &str,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<TurnResult, ChatError> {
        let start = Instant::now();
        let cache_before = crate::model::experts::stats_of(&**self.chat.model.weights());
        let (ids, prompt_text) = self.start_turn(user)?;
        let logits = self.chat.model.forward(&mut self.state, &ids);
        let prefill_s = start.elapsed().as_secs_f64();
        self.push_recent(&ids);
        self.fed.extend_from_slice(&ids);

        let mut gen = Generation::new(prompt_text.trim_end().ends_with("<think>"));
        let stop = self.generate(logits, &mut gen, cancel, on_event)?;
        if let Some(s) = gen.detok.flush(&self.chat.tokenizer)? {
            emit(
                &s,
                gen.in_reasoning,
                &mut gen.reasoning,
                &mut gen.answer,
                on_event,
            );
        }
        let content = if gen.reasoning_tokens > 0 {
            format!("{}</think>\n\n{}", gen.reasoning, gen.answer)
        } else {
            gen.answer.clone()
        };
        self.messages.push(Message::new("user", user));
        self.messages.push(Message::new("assistant", content));
        let stats = self.turn_stats(&gen, stop, ids.len(), start, prefill_s, cache_before);
        self.last = Some(stats.clone());
        Ok(TurnResult {
            reasoning: gen.reasoning.trim().to_string(),
            answer: gen.answer.trim_end().to_string(),
            stop,
            stats,
        })
    }

    /// The turn's prompt ids and text, refused when they do not fit the
    /// context; a fresh prompt (the whole history) starts a new state.
    fn start_turn(&mut self, user: &str) -> Result<(Vec<u32>, String), ChatError> {
        let (ids, prompt_text, fresh) = self.plan_turn(user)?;
        let used = if fresh { 0 } else { self.state.position() };
        let ctx = self.opts.ctx_size;
        if ids.is_empty() || used + ids.len() >= ctx {
            return Err(ChatError::PromptTooLong {
                prompt: ids.len(),
                free: ctx.saturating_sub(used),
                ctx_size: ctx,
            });
        }
        if fresh {
            self.state = self.chat.model.new_state();
            self.recent.clear();
            self.fed.clear();
        }
        self.pending.clear();
        Ok((ids, prompt_text))
    }

    /// Samples and feeds tokens from the prompt's `logits` until an end
    /// token, `max_tokens`, a full context or `cancel`, routing each into
    /// `gen`; a last sampled token that was not fed is kept in `pending`.
    fn generate(
        &mut self,
        mut logits: Vec<f32>,
        gen: &mut Generation,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<StopReason, ChatError> {
        let chat = self.chat;
        let ctx = self.opts.ctx_size;
        loop {
            let id = self.sampler.sample(&mut logits, &self.recent);
            let now = Instant::now();
            gen.first_at.get_or_insert(now);
            gen.last_at = Some(now);
            if chat.eos_ids.contains(&id) {
                return Ok(StopReason::Eos);
            }
            self.push_recent(&[id]);
            gen.take(&chat.tokenizer, id, on_event)?;
            let full = self.state.position() + 1 >= ctx;
            if cancel.load(Ordering::Relaxed) || gen.generated >= self.opts.max_tokens || full {
                self.pending.push(id);
                return Ok(if cancel.load(Ordering::Relaxed) {
                    StopReason::Cancelled
                } else if gen.generated >= self.opts.max_tokens {
                    StopReason::MaxTokens
                } else {
                    StopReason::ContextFull
                });
            }
            logits = chat.model.forward(&mut self.state, &[id]);
            self.fed.push(id);
        }
    }

    /// The turn's figures: `prompt` tokens prefilled in `prefill_s`, the
    /// generation's timing from `start`.
    fn turn_stats(
        &self,
        gen: &Generation,
        stop: StopReason,
        prompt: usize,
        start: Instant,
        prefill_s: f64,
        cache_before: Option<crate::model::experts::PagerStats>,
    ) -> TurnStats {
        let generated = gen.generated;
        let first = gen.first_at.expect("the loop samples at least once");
        let last_at = gen.last_at.unwrap_or(first);
        let decode_s = last_at.duration_since(first).as_secs_f64();
        let decoded =
            generated.saturating_sub(1) + usize::from(stop == StopReason::Eos && generated > 0);
        TurnStats {
            prompt_tokens: prompt,
            generated_tokens: generated,
            reasoning_tokens: gen.reasoning_tokens,
            context_tokens: self.state.position() + self.pending.len(),
            ttft_ms: first.duration_since(start).as_secs_f64() * 1e3,
            prefill_tps: prompt as f64 / prefill_s.max(1e-9),
            decode_tps: if decoded > 0 && decode_s > 0.0 {
                decoded as f64 / decode_s
            } else {
                0.0
            },
            expert_cache: cache_before.as_ref().and_then(|b| {
                let now = crate::model::experts::stats_of(&**self.chat.model.weights())?;
                let computed = (prompt + decoded) as u64;
                Some(crate::model::experts::CacheUse::between(b, &now, computed))
            }),
        }
    }

    fn push_recent(&mut self, ids: &[u32]) {
        self.recent.extend_from_slice(ids);
        let keep = self.opts.sampling.repeat_last_n.max(1);
        if self.recent.len() > 4 * keep {
            self.recent.drain(..self.recent.len() - keep);
        }
    }
}

/// What a turn's generation has produced so far.
struct Generation {
    /// Inside `<think>` ... `</think>`.
    in_reasoning: bool,
    reasoning: String,
    answer: String,
    detok: Detokenizer,
    /// Tokens generated, the end token not counted.
    generated: usize,
    /// Of those, reasoning tokens (up to and including `</think>`).
    reasoning_tokens: usize,
    /// When the first and the last token were sampled.
    first_at: Option<Instant>,
    last_at: Option<Instant>,
}

impl Generation {
    /// A generation whose prompt ends inside reasoning when `in_reasoning`
    /// (a template that opens `<think>` itself).
    fn new(in_reasoning: bool) -> Generation {
        Generation {
            in_reasoning,
            reasoning: String::new(),
            answer: String::new(),
            detok: Detokenizer::new(),
            generated: 0,
            reasoning_tokens: 0,
            first_at: None,
            last_at: None,
        }
    }

    /// Counts one sampled (not end) token, steps in or out of reasoning on
    /// `<think>` / `</think>`, and streams its text.
    fn take(
        &mut self,
        tok: &ChatTokenizer,
        id: u32,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<(), ChatError> {
        self.generated += 1;
        if self.in_reasoning {
            self.reasoning_tokens += 1;
            on_event(Event::Thinking {
                tokens: self.reasoning_tokens,
            });
        }
        if Some(id) == tok.think_end && self.in_reasoning {
            if let Some(s) = self.detok.flush(tok)? {
                self.reasoning.push_str(&s);
                on_event(Event::Reasoning(&s));
            }
            self.in_reasoning = false;
            on_event(Event::ReasoningEnd {
                tokens: self.reasoning_tokens,
            });
        } else if Some(id) == tok.think_start && self.generated == 1 && !self.in_reasoning {
            self.in_reasoning = true;
            self.reasoning_tokens = 1;
        } else if let Some(s) = self.detok.push(tok, id)? {
            emit(
                &s,
                self.in_reasoning,
                &mut self.reasoning,
                &mut self.answer,
                on_event,
            );
        }
        Ok(())
    }
}

/// Appends a streamed piece to the reasoning or the answer; the answer's
/// leading newlines (after `</think>`) are dropped, as the template does.
fn emit(
    s: &str,
    in_reasoning: bool,
    reasoning: &mut String,
    answer: &mut String,
    on_event: &mut dyn FnMut(Event<'_>),
) {
    if in_reasoning {
        reasoning.push_str(s);
        on_event(Event::Reasoning(s));
        return;
    }
    let s = if answer.is_empty() {
        s.trim_start_matches('\n')
    } else {
        s
    };
    if !s.is_empty() {
        answer.push_str(s);
        on_event(Event::Answer(s));
    }
}
