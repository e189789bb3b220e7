//! OpenAI request bodies: parsing (every field typed, unknown fields
//! ignored as OpenAI's clients send many, a field of the wrong type named
//! in the error) and validation into the engine's [`GenRequest`].

use roundhouse::chat::{Message, RenderExtras};
use roundhouse::sample::SamplingParams;
use roundhouse::serve::{GenRequest, Prompt};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};

/// A request the client got wrong: the message for a 400.
#[derive(Debug, PartialEq)]
pub struct BadRequest(pub String);

fn bad(msg: impl Into<String>) -> BadRequest {
    BadRequest(msg.into())
}

/// Parses `body` as `T`, naming the field at fault.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, BadRequest> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let v: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            bad(format!("request body is not valid JSON: {inner}"))
        } else if inner.is_syntax() || inner.is_eof() {
            bad(format!("request body is not valid JSON ({path}): {inner}"))
        } else {
            bad(format!("{path}: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| bad(format!("request body is not valid JSON: {e}")))?;
    Ok(v)
}

/// `stop`: one string or a list.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Deserialize, Debug, Default)]
pub struct StreamOptions {
    /// Send a last chunk with `usage`.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// The fields chat and raw completions share.
#[derive(Deserialize, Debug, Default)]
pub struct Common {
    /// Model name (any: one model is served).
    pub model: Option<String>,
    /// Stream server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Longest answer.
    pub max_tokens: Option<u64>,
    /// Same, newer name.
    pub max_completion_tokens: Option<u64>,
    /// Sampling temperature, 0..=2.
    pub temperature: Option<f64>,
    /// Nucleus, 0..=1.
    pub top_p: Option<f64>,
    /// Top-k (0 or -1: off).
    pub top_k: Option<i64>,
    /// Min-p, 0..=1.
    pub min_p: Option<f64>,
    /// -2..=2.
    pub presence_penalty: Option<f64>,
    /// -2..=2.
    pub frequency_penalty: Option<f64>,
    /// llama.cpp's multiplicative penalty, > 0 (1 = off).
    pub repetition_penalty: Option<f64>,
    /// RNG seed.
    pub seed: Option<i64>,
    /// Stop strings.
    pub stop: Option<Stop>,
    /// Number of answers (only 1).
    pub n: Option<i64>,
    /// llama-server's switch for prompt reuse (default true).
    pub cache_prompt: Option<bool>,
}

/// A message's content: text or a list of parts.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// `[{"type": "text", "text": ...}]`.
    Parts(Vec<Part>),
}

/// One content part.
#[derive(Deserialize, Debug)]
pub struct Part {
    /// Only `text` is served.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text.
    pub text: Option<String>,
}

/// A call in an assistant message sent back.
#[derive(Deserialize, Debug)]
pub struct InToolCall {
    /// Call id.
    pub id: Option<String>,
    /// The function.
    pub function: InFunction,
}

/// A called function.
#[derive(Deserialize, Debug)]
pub struct InFunction {
    /// Name.
    pub name: String,
    /// Arguments: a JSON text (OpenAI) or an object.
    #[serde(default)]
    pub arguments: Value,
}

/// One message of the request.
#[derive(Deserialize, Debug)]
pub struct InMessage {
    /// system, developer, user, assistant or tool.
    pub role: String,
    /// Text (absent or null for an assistant message with calls).
    pub content: Option<Content>,
    /// An assistant's calls.
    pub tool_calls: Option<Vec<InToolCall>>,
    /// A tool result's call id.
    pub tool_call_id: Option<String>,
    /// A tool result's function name.
    pub name: Option<String>,
    /// Reasoning sent back.
    pub reasoning_content: Option<String>,
}

/// The chat-only fields.
#[derive(Deserialize, Debug)]
pub struct ChatFields {
    /// The conversation.
    pub messages: Vec<InMessage>,
    /// Tools offered.
    pub tools: Option<Vec<Value>>,
    /// `none`, `auto`, `required` or `{"type": "function", ...}`.
    pub tool_choice: Option<Value>,
    /// Extra template variables, e.g. `{"enable_thinking": false}`.
    pub chat_template_kwargs: Option<Map<String, Value>>,
}

/// The raw-completion fields.
#[derive(Deserialize, Debug)]
pub struct CompletionFields {
    /// The prompt: a string (or a list of one string).
    pub prompt: Value,
}

/// Server-side defaults a request starts from.
#[derive(Clone, Debug)]
pub struct Defaults {
    /// Sampling defaults (generation_config.json, then flags).
    pub sampling: SamplingParams,
    /// `--max-tokens`, else the rest of the context.
    pub max_tokens: Option<usize>,
    /// True unless seeds were fixed on the command line.
    pub random_seed: bool,
}

/// A validated request plus the HTTP-side choices.
pub struct Parsed {
    /// For the engine.
    pub request: GenRequest,
    /// Stream the answer.
    pub stream: bool,
    /// Last chunk with usage.
    pub include_usage: bool,
    /// Model name echoed back.
    pub model: Option<String>,
}

fn range(name: &str, v: Option<f64>, lo: f64, hi: f64) -> Result<Option<f32>, BadRequest> {
    match v {
        Some(x) if !x.is_finite() || x < lo || x > hi => Err(bad(format!(
            "{name}: {x} is out of range (must be between {lo} and {hi})"
        ))),
        Some(x) => Ok(Some(x as f32)),
        None => Ok(None),
    }
}

/// Checks the shared fields and builds the engine request around `prompt`.
pub fn validate(c: Common, prompt: Prompt, d: &Defaults) -> Result<Parsed, BadRequest> {
    if let Some(n) = c.n {
        if n != 1 {
            return Err(bad(format!(
                "n: only 1 answer per request is served (got {n})"
            )));
        }
    }
    let mut sp = d.sampling.clone();
    if let Some(t) = range("temperature", c.temperature, 0.0, 2.0)? {
        sp.temperature = t;
    }
    if let Some(p) = range("top_p", c.top_p, 0.0, 1.0)? {
        sp.top_p = p;
    }
    if let Some(p) = range("min_p", c.min_p, 0.0, 1.0)? {
        sp.min_p = p;
    }
    if let Some(p) = range("repetition_penalty", c.repetition_penalty, 0.0, 10.0)? {
        if p == 0.0 {
            return Err(bad("repetition_penalty: must be above 0 (1 = off)"));
        }
        sp.repeat_penalty = p;
    }
    match c.top_k {
        Some(k) if k < -1 => {
            return Err(bad(format!("top_k: {k} is out of range (0 or -1 = off)")))
        }
        Some(k) => sp.top_k = k.max(0) as usize,
        None => {}
    }
    let presence = range("presence_penalty", c.presence_penalty, -2.0, 2.0)?.unwrap_or(0.0);
    let frequency = range("frequency_penalty", c.frequency_penalty, -2.0, 2.0)?.unwrap_or(0.0);
    match c.seed {
        Some(s) => sp.seed = s as u64,
        None if d.random_seed => {
            sp.seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|t| t.as_nanos() as u64)
                .unwrap_or(0)
        }
        None => {}
    }
    let max_tokens = match c.max_completion_tokens.or(c.max_tokens) {
        Some(0) => return Err(bad("max_tokens: must be at least 1")),
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        None => d.max_tokens.unwrap_or(usize::MAX),
    };
    let stop = match c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > 16 {
        return Err(bad(format!(
            "stop: at most 16 stop strings (got {})",
            stop.len()
        )));
    }
    let parse_tools = matches!(&prompt, Prompt::Chat { extras, .. } if extras.tools.as_ref().is_some_and(|t| !t.is_empty()));
    Ok(Parsed {
        request: GenRequest {
            prompt,
            sampling: sp,
            presence_penalty: presence,
            frequency_penalty: frequency,
            max_tokens,
            stop,
            parse_tools,
            cache_prompt: c.cache_prompt.unwrap_or(true),
        },
        stream: c.stream.unwrap_or(false),
        include_usage: c
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        model: c.model,
    })
}

fn message(i: usize, m: InMessage) -> Result<Message, BadRequest> {
    let role = match m.role.as_str() {
        "system" | "developer" => "system",
        r @ ("user" | "assistant" | "tool") => r,
        other => {
            return Err(bad(format!(
                "messages[{i}].role: unknown role {other:?} (system, user, assistant or tool)"
            )))
        }
    };
    let content = match m.content {
        None => String::new(),
        Some(Content::Text(s)) => s,
        Some(Content::Parts(parts)) => {
            let mut s = String::new();
            for (j, p) in parts.into_iter().enumerate() {
                match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => s.push_str(&t),
                    (kind, _) => {
                        return Err(bad(format!(
                            "messages[{i}].content[{j}]: only text parts are served (got {kind:?})"
                        )))
                    }
                }
            }
            s
        }
    };
    let tool_calls = match m.tool_calls {
        Some(calls) if !calls.is_empty() => {
            if role != "assistant" {
                return Err(bad(format!(
                    "messages[{i}].tool_calls: only assistant messages carry calls"
                )));
            }
            let mut out = Vec::new();
            for (j, c) in calls.into_iter().enumerate() {
                // Templates print the arguments with tojson, so they get an
                // object, as transformers and vLLM pass them.
                let arguments = match c.function.arguments {
                    Value::String(s) => serde_json::from_str::<Value>(&s)
                        .ok()
                        .filter(Value::is_object)
                        .ok_or_else(|| {
                            bad(format!(
                                "messages[{i}].tool_calls[{j}].function.arguments: not a JSON object"
                            ))
                        })?,
                    Value::Null => Value::Object(Map::new()),
                    v @ Value::Object(_) => v,
                    _ => {
                        return Err(bad(format!(
                            "messages[{i}].tool_calls[{j}].function.arguments: not a JSON object"
                        )))
                    }
                };
                out.push(serde_json::json!({
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": arguments},
                }));
            }
            Some(out)
        }
        _ => None,
    };
    Ok(Message {
        role: role.to_string(),
        content,
        tool_calls,
        tool_call_id: m.tool_call_id,
        name: m.name,
        reasoning_content: m.reasoning_content,
    })
}

/// Parses and validates a `/v1/chat/completions` body.
pub fn chat_request(body: &[u8], d: &Defaults) -> Result<Parsed, BadRequest> {
    let common: Common = parse(body)?;
    let f: ChatFields = parse(body)?;
    if f.messages.is_empty() {
        return Err(bad("messages: at least one message is needed"));
    }
    let messages = f
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| message(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    let tools_off = match &f.tool_choice {
        None => false,
        Some(Value::String(s)) => match s.as_str() {
            "none" => true,
            "auto" | "required" => false,
            other => {
                return Err(bad(format!(
                    "tool_choice: {other:?} is not none, auto, required or a function"
                )))
            }
        },
        Some(Value::Object(_)) => false,
        Some(_) => return Err(bad("tool_choice: must be a string or an object")),
    };
    if let Some(tools) = &f.tools {
        for (i, t) in tools.iter().enumerate() {
            let name = t.pointer("/function/name").and_then(Value::as_str);
            if t.get("type").and_then(Value::as_str) != Some("function") || name.is_none() {
                return Err(bad(format!(
                    "tools[{i}]: must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
                )));
            }
        }
    }
    let extras = RenderExtras {
        tools: if tools_off { None } else { f.tools },
        kwargs: f.chat_template_kwargs.unwrap_or_default(),
    };
    validate(common, Prompt::Chat { messages, extras }, d)
}

/// Parses and validates a `/v1/completions` body.
pub fn completion_request(body: &[u8], d: &Defaults) -> Result<Parsed, BadRequest> {
    let common: Common = parse(body)?;
    let f: CompletionFields = parse(body)?;
    let prompt = match f.prompt {
        Value::String(s) => s,
        Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        _ => return Err(bad("prompt: must be a string (or a list of one string)")),
    };
    validate(common, Prompt::Text(prompt), d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> Defaults {
        Defaults {
            sampling: SamplingParams::default(),
            max_tokens: None,
            random_seed: false,
        }
    }

    fn err(body: &str) -> String {
        match chat_request(body.as_bytes(), &d()) {
            Err(BadRequest(m)) => m,
            Ok(_) => panic!("accepted: {body}"),
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        let m = r#""messages": [{"role": "user", "content": "hi"}]"#;
        assert!(err("{").contains("not valid JSON"));
        assert!(err(&format!("{{{m}, \"temperature\": \"hot\"}}"))
            .starts_with("temperature: invalid type"));
        assert!(
            err(&format!("{{{m}, \"temperature\": 3}}")).contains("temperature: 3 is out of range")
        );
        assert!(err(&format!("{{{m}, \"top_p\": -0.1}}")).starts_with("top_p:"));
        assert!(err(&format!("{{{m}, \"n\": 2}}")).starts_with("n: only 1"));
        assert!(err(&format!("{{{m}, \"max_tokens\": 0}}")).starts_with("max_tokens"));
        assert!(err(&format!("{{{m}, \"stop\": 5}}")).starts_with("stop:"));
        assert!(err(&format!("{{{m}, \"presence_penalty\": 2.5}}")).starts_with("presence_penalty"));
        assert!(
            err(&format!("{{{m}, \"repetition_penalty\": 0}}")).starts_with("repetition_penalty")
        );
        assert!(err(&format!("{{{m}, \"tool_choice\": 7}}")).starts_with("tool_choice"));
        assert!(err(&format!("{{{m}, \"tools\": [{{\"type\": \"x\"}}]}}")).starts_with("tools[0]"));
        assert!(err(r#"{"messages": []}"#).starts_with("messages:"));
        assert!(err(r#"{"messages": [{"role": "bot", "content": "x"}]}"#)
            .starts_with("messages[0].role"));
        assert!(err(r#"{"messages": [{"role": "user", "content": 5}]}"#)
            .starts_with("messages[0].content"));
        assert!(
            err(r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#)
                .starts_with("messages[0].content[0]")
        );
        assert!(err(r#"{}"#).contains("messages"));
        // NaN and infinities are not JSON; numbers too large for f64 neither.
        assert!(err(&format!("{{{m}, \"temperature\": NaN}}")).contains("not valid JSON"));
        assert!(err(&format!("{{{m}, \"temperature\": 1e999}}")).contains("temperature"));
    }

    #[test]
    fn a_full_request_maps_onto_the_engine() {
        let body = r#"{"model": "x", "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief"}]},
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "18C"}],
            "tools": [{"type": "function", "function": {"name": "get_weather"}}],
            "stream": true, "stream_options": {"include_usage": true},
            "max_completion_tokens": 7, "temperature": 0, "top_k": -1, "seed": -3,
            "stop": "END", "chat_template_kwargs": {"enable_thinking": false},
            "frequency_penalty": 0.5, "logit_bias": {}, "user": "ignored"}"#;
        let p = chat_request(body.as_bytes(), &d()).unwrap();
        assert!(p.stream && p.include_usage);
        let r = &p.request;
        assert_eq!(
            (r.max_tokens, r.sampling.top_k, r.sampling.seed),
            (7, 0, (-3i64) as u64)
        );
        assert_eq!(r.stop, vec!["END".to_string()]);
        assert!(r.parse_tools && r.cache_prompt);
        assert_eq!(r.frequency_penalty, 0.5);
        let Prompt::Chat { messages, extras } = &r.prompt else {
            panic!()
        };
        assert_eq!(messages[0].role, "system");
        assert_eq!(messages[0].content, "Be brief");
        let call = &messages[2].tool_calls.as_ref().unwrap()[0];
        assert_eq!(call["function"]["arguments"]["city"], "Paris");
        assert_eq!(messages[3].tool_call_id.as_deref(), Some("c1"));
        assert_eq!(extras.kwargs["enable_thinking"], false);
        // tool_choice none: no tools rendered or parsed.
        let body = r#"{"messages": [{"role": "user", "content": "x"}], "tool_choice": "none",
            "tools": [{"type": "function", "function": {"name": "f"}}]}"#;
        assert!(
            !chat_request(body.as_bytes(), &d())
                .unwrap()
                .request
                .parse_tools
        );
    }
}
