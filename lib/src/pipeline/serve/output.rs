//! What a generated text stream becomes in an OpenAI answer: the text up to
//! a stop string ([`StopFilter`]), split into reasoning and content at
//! `</think>` ([`ReasoningSplitter`]), and the content's
//! `<tool_call>{...}</tool_call>` blocks turned into tool calls
//! ([`ToolCallParser`]). Each stage takes text pieces as they stream and
//! holds back only what may still turn out to be a marker, so nothing that
//! belongs to a stop string or a tag is ever streamed.

/// One piece of an answer, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Delta {
    /// Reasoning text (before `</think>`).
    Reasoning(String),
    /// Answer text.
    Content(String),
    /// A complete, well-formed tool call.
    ToolCall(ToolCall),
}

/// A tool call parsed from a `<tool_call>` block.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    /// Position among this answer's calls (0, 1, ...).
    pub index: usize,
    /// The function name.
    pub name: String,
    /// The arguments as a JSON text (an object, as OpenAI sends them).
    pub arguments: String,
}

/// Length of the longest suffix of `text` that is a proper prefix of
/// `marker` (the part to hold back because the marker may be starting).
fn partial_suffix(text: &str, marker: &str) -> usize {
    let max = marker.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&k| {
            text.is_char_boundary(text.len() - k) && marker.starts_with(&text[text.len() - k..])
        })
        .unwrap_or(0)
}

/// Cuts the stream before the first stop string; holds back any tail that
/// may be the start of one.
#[derive(Clone, Debug, Default)]
pub struct StopFilter {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopFilter {
    /// A filter for `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> StopFilter {
        StopFilter {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop string was seen (nothing more is released after it).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds `piece`; returns the text now known to precede any stop string.
    pub fn push(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.held.push_str(piece);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            self.stopped = true;
            let out = self.held[..at].to_string();
            self.held.clear();
            return out;
        }
        let keep = self
            .stops
            .iter()
            .map(|s| partial_suffix(&self.held, s))
            .max()
            .unwrap_or(0);
        let out = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        out
    }

    /// The end of the stream: what was held back was no stop string.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

const THINK_START: &str = "<think>";
const THINK_END: &str = "</think>";

/// Splits the stream at `</think>` into reasoning and content, as
/// llama-server and vLLM do for reasoning models.
#[derive(Clone, Debug)]
pub struct ReasoningSplitter {
    in_reasoning: bool,
    /// Nothing emitted yet: the model may still open `<think>` itself.
    at_start: bool,
    /// Content emitted so far is empty (leading newlines are dropped).
    content_empty: bool,
    reasoning_empty: bool,
    held: String,
}

impl ReasoningSplitter {
    /// `starts_in_reasoning`: the prompt ends with `<think>` (the Thinking
    /// template opens it for the model).
    pub fn new(starts_in_reasoning: bool) -> ReasoningSplitter {
        ReasoningSplitter {
            in_reasoning: starts_in_reasoning,
            at_start: !starts_in_reasoning,
            content_empty: true,
            reasoning_empty: true,
            held: String::new(),
        }
    }

    /// Adds `piece`; returns the reasoning and content it completes.
    pub fn push(&mut self, piece: &str, out: &mut Vec<Delta>) {
        self.held.push_str(piece);
        loop {
            if self.at_start {
                let t = self.held.trim_start_matches('\n');
                if THINK_START.starts_with(t) && t.len() < THINK_START.len() {
                    return; // maybe the start of <think>
                }
                self.at_start = false;
                if let Some(rest) = t.strip_prefix(THINK_START) {
                    self.in_reasoning = true;
                    self.held = rest.to_string();
                }
                continue;
            }
            if !self.in_reasoning {
                let text = std::mem::take(&mut self.held);
                self.content(&text, out);
                return;
            }
            if let Some(at) = self.held.find(THINK_END) {
                let reasoning = self.held[..at].to_string();
                let rest = self.held[at + THINK_END.len()..].to_string();
                self.reasoning(&reasoning, out);
                self.in_reasoning = false;
                self.held = rest;
                continue;
            }
            let keep = partial_suffix(&self.held, THINK_END);
            let text: String = self.held.drain(..self.held.len() - keep).collect();
            self.reasoning(&text, out);
            return;
        }
    }

    /// The end of the stream.
    pub fn finish(&mut self, out: &mut Vec<Delta>) {
        let text = std::mem::take(&mut self.held);
        if self.in_reasoning {
            self.reasoning(&text, out);
        } else {
            self.content(&text, out);
        }
    }

    fn reasoning(&mut self, text: &str, out: &mut Vec<Delta>) {
        let text = if self.reasoning_empty {
            text.trim_start_matches('\n')
        } else {
            text
        };
        if !text.is_empty() {
            self.reasoning_empty = false;
            out.push(Delta::Reasoning(text.to_string()));
        }
    }

    fn content(&mut self, text: &str, out: &mut Vec<Delta>) {
        let text = if self.content_empty {
            text.trim_start_matches('\n')
        } else {
            text
        };
        if !text.is_empty() {
            self.content_empty = false;
            out.push(Delta::Content(text.to_string()));
        }
    }
}

const CALL_START: &str = "<tool_call>";
const CALL_END: &str = "</tool_call>";

/// Turns `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks
/// of the content into [`ToolCall`]s. A block that is not such JSON (or is
/// never closed) comes back as plain content, never dropped. Whitespace
/// right around a block (the newlines Qwen3 puts between calls) is dropped.
#[derive(Clone, Debug, Default)]
pub struct ToolCallParser {
    /// Inside a block: its text so far.
    block: Option<String>,
    /// Text held back: a possible `<tool_call>` start or trailing whitespace.
    held: String,
    calls: usize,
    /// The last thing emitted was a call (whitespace after it is dropped).
    after_call: bool,
    /// Whitespace dropped before the current block, given back if the
    /// block turns out not to be a call.
    before_block: String,
}

impl ToolCallParser {
    /// A parser with no calls yet.
    pub fn new() -> ToolCallParser {
        ToolCallParser::default()
    }

    /// Calls parsed so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Parses one block's inside; `None` when it is not a call.
    pub fn parse_block(inner: &str) -> Option<(String, String)> {
        let v: serde_json::Value = serde_json::from_str(inner.trim()).ok()?;
        let obj = v.as_object()?;
        let name = obj.get("name")?.as_str()?.to_string();
        if name.is_empty() {
            return None;
        }
        let arguments = match obj.get("arguments") {
            None | Some(serde_json::Value::Null) => "{}".to_string(),
            Some(a @ serde_json::Value::Object(_)) => a.to_string(),
            // Some models write the arguments as a JSON string.
            Some(serde_json::Value::String(s)) => {
                match serde_json::from_str::<serde_json::Value>(s) {
                    Ok(a @ serde_json::Value::Object(_)) => a.to_string(),
                    _ => return None,
                }
            }
            Some(_) => return None,
        };
        Some((name, arguments))
    }

    /// Adds content text; pushes the content and calls it completes.
    pub fn push(&mut self, piece: &str, out: &mut Vec<Delta>) {
        let mut rest = piece.to_string();
        loop {
            if let Some(block) = &mut self.block {
                block.push_str(&rest);
                let Some(end) = block.find(CALL_END) else {
                    return;
                };
                let inner = block[..end].to_string();
                let after = block[end + CALL_END.len()..].to_string();
                self.block = None;
                match Self::parse_block(&inner) {
                    Some((name, arguments)) => {
                        out.push(Delta::ToolCall(ToolCall {
                            index: self.calls,
                            name,
                            arguments,
                        }));
                        self.calls += 1;
                        self.after_call = true;
                    }
                    None => {
                        let ws = std::mem::take(&mut self.before_block);
                        self.after_call = false;
                        out.push(Delta::Content(format!("{ws}{CALL_START}{inner}{CALL_END}")));
                    }
                }
                rest = after;
                continue;
            }
            self.held.push_str(&rest);
            if let Some(start) = self.held.find(CALL_START) {
                let before = self.held[..start].to_string();
                let after = self.held[start + CALL_START.len()..].to_string();
                self.held.clear();
                // Whitespace before a block is dropped (kept aside in case
                // the block is no call).
                let text = before.trim_end();
                self.before_block = before[text.len()..].to_string();
                if self.after_call {
                    self.before_block.clear();
                }
                self.text(text, out);
                self.block = Some(String::new());
                rest = after;
                continue;
            }
            let keep = partial_suffix(&self.held, CALL_START);
            let release_end = self.held.len() - keep;
            // Hold trailing whitespace too: it is dropped if a block follows.
            let text_end = self.held[..release_end].trim_end().len();
            let text = self.held[..text_end].to_string();
            self.held.drain(..text_end);
            self.text(&text, out);
            return;
        }
    }

    /// The end of the stream: an unclosed block is plain content.
    pub fn finish(&mut self, out: &mut Vec<Delta>) {
        if let Some(block) = self.block.take() {
            let ws = std::mem::take(&mut self.before_block);
            out.push(Delta::Content(format!("{ws}{CALL_START}{block}")));
        } else {
            // A partial `<tool_call` that never completed is text; trailing
            // whitespace of the answer goes.
            let held = std::mem::take(&mut self.held);
            self.text(held.trim_end(), out);
        }
    }

    fn text(&mut self, text: &str, out: &mut Vec<Delta>) {
        let text = if self.after_call {
            text.trim_start()
        } else {
            text
        };
        if !text.is_empty() {
            self.after_call = false;
            out.push(Delta::Content(text.to_string()));
        }
    }
}

/// The whole chain for a chat answer: stop strings on the raw text, then
/// the reasoning split, then tool calls in the content.
#[derive(Clone, Debug)]
pub struct ChatOutput {
    stop: StopFilter,
    reasoning: ReasoningSplitter,
    tools: Option<ToolCallParser>,
    raw: bool,
}

impl ChatOutput {
    /// A chat answer; `parse_tools` when the request offered tools.
    pub fn chat(stops: &[String], starts_in_reasoning: bool, parse_tools: bool) -> ChatOutput {
        ChatOutput {
            stop: StopFilter::new(stops),
            reasoning: ReasoningSplitter::new(starts_in_reasoning),
            tools: parse_tools.then(ToolCallParser::new),
            raw: false,
        }
    }

    /// A raw completion: stop strings only, all text is content.
    pub fn raw(stops: &[String]) -> ChatOutput {
        ChatOutput {
            raw: true,
            ..ChatOutput::chat(stops, false, false)
        }
    }

    /// Whether a stop string ended the text.
    pub fn stopped(&self) -> bool {
        self.stop.stopped()
    }

    /// Tool calls parsed so far.
    pub fn tool_calls(&self) -> usize {
        self.tools.as_ref().map_or(0, ToolCallParser::calls)
    }

    /// Adds generated text; returns the deltas it completes.
    pub fn push(&mut self, piece: &str) -> Vec<Delta> {
        let text = self.stop.push(piece);
        let mut out = Vec::new();
        self.stage(&text, &mut out);
        if self.stop.stopped() {
            self.close(&mut out);
        }
        out
    }

    /// The end of the stream: whatever was held back.
    pub fn finish(&mut self) -> Vec<Delta> {
        let text = self.stop.finish();
        let mut out = Vec::new();
        self.stage(&text, &mut out);
        self.close(&mut out);
        out
    }

    fn stage(&mut self, text: &str, out: &mut Vec<Delta>) {
        if text.is_empty() {
            return;
        }
        if self.raw {
            out.push(Delta::Content(text.to_string()));
            return;
        }
        let mut split = Vec::new();
        self.reasoning.push(text, &mut split);
        self.route(split, out);
    }

    fn close(&mut self, out: &mut Vec<Delta>) {
        if self.raw {
            return;
        }
        let mut split = Vec::new();
        self.reasoning.finish(&mut split);
        self.route(split, out);
        if let Some(t) = &mut self.tools {
            t.finish(out);
        }
    }

    fn route(&mut self, split: Vec<Delta>, out: &mut Vec<Delta>) {
        for d in split {
            match (d, &mut self.tools) {
                (Delta::Content(c), Some(t)) => t.push(&c, out),
                (d, _) => out.push(d),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `text` in pieces of `n` bytes (on char boundaries).
    fn pieces(text: &str, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = String::new();
        for c in text.chars() {
            cur.push(c);
            if cur.len() >= n {
                out.push(std::mem::take(&mut cur));
            }
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    }

    /// Runs a chain over `text` streamed in every piece size 1..=8 and
    /// checks that all sizes agree; returns the merged deltas.
    fn run(mk: impl Fn() -> ChatOutput, text: &str) -> Vec<Delta> {
        let mut first: Option<Vec<Delta>> = None;
        for n in 1..=8 {
            let mut o = mk();
            let mut all = Vec::new();
            for p in pieces(text, n) {
                all.extend(o.push(&p));
            }
            all.extend(o.finish());
            let merged = merge(all);
            match &first {
                None => first = Some(merged),
                Some(f) => assert_eq!(f, &merged, "piece size {n}"),
            }
        }
        first.unwrap()
    }

    /// Joins adjacent deltas of the same kind.
    fn merge(d: Vec<Delta>) -> Vec<Delta> {
        let mut out: Vec<Delta> = Vec::new();
        for x in d {
            match (out.last_mut(), x) {
                (Some(Delta::Reasoning(a)), Delta::Reasoning(b)) => a.push_str(&b),
                (Some(Delta::Content(a)), Delta::Content(b)) => a.push_str(&b),
                (_, x) => out.push(x),
            }
        }
        out
    }

    fn r(s: &str) -> Delta {
        Delta::Reasoning(s.into())
    }
    fn c(s: &str) -> Delta {
        Delta::Content(s.into())
    }
    fn call(index: usize, name: &str, args: &str) -> Delta {
        Delta::ToolCall(ToolCall {
            index,
            name: name.into(),
            arguments: args.into(),
        })
    }

    #[test]
    fn reasoning_split_as_qwen3_thinking_writes_it() {
        let text = "Okay, the user asks 2+2. That is 4.\n</think>\n\nThe answer is **4**.";
        assert_eq!(
            run(|| ChatOutput::chat(&[], true, false), text),
            vec![
                r("Okay, the user asks 2+2. That is 4.\n"),
                c("The answer is **4**.")
            ]
        );
        // A model that opens <think> itself (hybrid templates).
        let text = "<think>\nhmm</think>\n\nHi";
        assert_eq!(
            run(|| ChatOutput::chat(&[], false, false), text),
            vec![r("hmm"), c("Hi")]
        );
        // No reasoning at all; "<th" that is not a tag is content.
        assert_eq!(
            run(|| ChatOutput::chat(&[], false, false), "<th is not a tag"),
            vec![c("<th is not a tag")]
        );
        // Cut by max_tokens while thinking: reasoning only.
        assert_eq!(
            run(
                || ChatOutput::chat(&[], true, false),
                "still thinking </thi"
            ),
            vec![r("still thinking </thi")]
        );
    }

    #[test]
    fn stop_strings_cut_before_the_stop_text_and_never_stream_it() {
        let stops = vec!["STOP".to_string(), "\n\nUser:".to_string()];
        assert_eq!(
            run(|| ChatOutput::raw(&stops), "one two STOP three"),
            vec![c("one two ")]
        );
        assert_eq!(
            run(|| ChatOutput::raw(&stops), "a\n\nUse it\n\nUser: x"),
            vec![c("a\n\nUse it")]
        );
        // A partial match at the end that never completes is released.
        assert_eq!(
            run(|| ChatOutput::raw(&stops), "ends ST"),
            vec![c("ends ST")]
        );
        // Nothing after the stop is streamed, piece by piece.
        let mut o = ChatOutput::raw(&stops);
        let mut seen = String::new();
        for p in ["ab", "cS", "TO", "P tail", "more"] {
            for d in o.push(p) {
                if let Delta::Content(s) = d {
                    seen.push_str(&s);
                }
            }
        }
        assert!(o.stopped());
        assert_eq!(seen, "abc");
        // Multi-byte text next to a partial stop.
        let stops = vec!["ße".to_string()];
        assert_eq!(run(|| ChatOutput::raw(&stops), "grüße!x"), vec![c("grü")]);
    }

    #[test]
    fn qwen3_tool_calls_become_calls() {
        let text = "<think>\nThe user wants the weather in Paris and Tokyo. I'll call get_weather twice.\n</think>\n\n\
            <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>\n\
            <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Tokyo\"}}\n</tool_call>";
        assert_eq!(
            run(|| ChatOutput::chat(&[], false, true), text),
            vec![
                r("The user wants the weather in Paris and Tokyo. I'll call get_weather twice.\n"),
                call(0, "get_weather", r#"{"city":"Paris","unit":"celsius"}"#),
                call(1, "get_weather", r#"{"city":"Tokyo"}"#),
            ]
        );
    }

    #[test]
    fn text_around_blocks_is_kept_and_malformed_blocks_are_content() {
        let text = "Let me check.\n\n<tool_call>\n{\"name\": \"search\", \"arguments\": {\"q\": \"rust <tool_call> tags\"}}\n</tool_call>\nDone.";
        assert_eq!(
            run(|| ChatOutput::chat(&[], false, true), text),
            vec![
                c("Let me check."),
                call(0, "search", r#"{"q":"rust <tool_call> tags"}"#),
                c("Done."),
            ]
        );
        // Malformed JSON (a trailing comma) is returned as content.
        let bad = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1,}}\n</tool_call>";
        assert_eq!(
            run(|| ChatOutput::chat(&[], false, true), bad),
            vec![c(bad)]
        );
        let text = format!("Trying:\n{bad}\nsorry");
        assert_eq!(
            run(|| ChatOutput::chat(&[], false, true), &text),
            vec![c(&text)]
        );
        assert_eq!(
            run(|| ChatOutput::chat(&[], false, true), "a <tool_ca"),
            vec![c("a <tool_ca")]
        );
        // A block cut off by max_tokens is content too.
        let cut = "ok <tool_call>\n{\"name\": \"f\", \"argu";
        assert_eq!(
            run(|| ChatOutput::chat(&[], false, true), cut),
            vec![c(cut)]
        );
        // Missing name, arguments not an object: not calls.
        assert_eq!(ToolCallParser::parse_block(r#"{"arguments": {}}"#), None);
        assert_eq!(
            ToolCallParser::parse_block(r#"{"name": "f", "arguments": 3}"#),
            None
        );
        // Arguments written as a JSON string, or absent.
        assert_eq!(
            ToolCallParser::parse_block(r#"{"name": "f", "arguments": "{\"x\": [1, 2]}"}"#),
            Some(("f".into(), r#"{"x":[1,2]}"#.into()))
        );
        assert_eq!(
            ToolCallParser::parse_block(r#"{"name": "now"}"#),
            Some(("now".into(), "{}".into()))
        );
        // Without tools offered, blocks stay text.
        assert_eq!(
            run(
                || ChatOutput::chat(&[], false, false),
                "<tool_call>{\"name\": \"f\"}</tool_call>"
            ),
            vec![c("<tool_call>{\"name\": \"f\"}</tool_call>")]
        );
    }
}
