//! The model's chat template, rendered with minijinja the way transformers'
//! `apply_chat_template` renders it with jinja2 (`trim_blocks`,
//! `lstrip_blocks`, Python string methods through minijinja-contrib's
//! pycompat, `raise_exception`, `strftime_now`), with ChatML as the fallback
//! when a model ships none.

use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

use super::ChatError;
use crate::weights::WeightSource;

/// One chat message. The optional fields are the ones OpenAI clients send
/// and tool-aware templates (Qwen3's) read; absent ones are left undefined
/// for the template, as transformers leaves them.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text.
    pub content: String,
    /// An assistant's calls: `[{"type": "function", "function": {"name",
    /// "arguments"}, "id"}]`, arguments as an object.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A tool result's call id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A tool result's function name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An assistant's reasoning, when the client sends it back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

impl Message {
    /// A message with `role` and `content`.
    pub fn new(role: &str, content: impl Into<String>) -> Message {
        Message {
            role: role.to_string(),
            content: content.into(),
            ..Message::default()
        }
    }
}

/// What a request adds to the messages when rendering: the tools offered
/// and extra template variables (`chat_template_kwargs`).
#[derive(Clone, Debug, Default)]
pub struct RenderExtras {
    /// OpenAI `tools` (`[{"type": "function", "function": {...}}]`).
    pub tools: Option<Vec<serde_json::Value>>,
    /// Extra variables, e.g. `enable_thinking`; they override the defaults.
    pub kwargs: serde_json::Map<String, serde_json::Value>,
}

/// ChatML, the fallback when a model ships no template.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Most template steps (minijinja fuel) one render may take.
pub const TEMPLATE_FUEL: u64 = 20_000_000;

/// A compiled chat template plus the special-token strings it may use.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where it came from (`DIR/chat_template.jinja`, `DIR/tokenizer_config.json`
    /// or `built-in ChatML`).
    pub origin: String,
    /// `bos_token` from tokenizer_config.json (empty when none).
    pub bos_token: String,
    /// `eos_token` from tokenizer_config.json (empty when none).
    pub eos_token: String,
}

fn token_string(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The model's template: `chat_template.jinja` when present (it wins
    /// in transformers too), else `chat_template` of `tokenizer_config.json`
    /// (a string, or a list of named templates of which `default` is used),
    /// else ChatML.
    pub fn load(weights: &dyn WeightSource) -> Result<ChatTemplate, ChatError> {
        let dir = weights.path();
        let config: Option<serde_json::Value> = match weights.aux_file("tokenizer_config.json") {
            Some(b) => Some(serde_json::from_slice(&b).map_err(|e| ChatError::BadFile {
                dir: dir.clone(),
                file: "tokenizer_config.json".into(),
                reason: e.to_string(),
            })?),
            None => None,
        };
        let bos = token_string(config.as_ref().and_then(|c| c.get("bos_token")));
        let eos = token_string(config.as_ref().and_then(|c| c.get("eos_token")));
        let from_config = config.as_ref().and_then(|c| match c.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        });
        let (source, origin) = if let Some(b) = weights.aux_file("chat_template.jinja") {
            let s = String::from_utf8(b).map_err(|_| ChatError::BadFile {
                dir: dir.clone(),
                file: "chat_template.jinja".into(),
                reason: "not UTF-8".into(),
            })?;
            (s, format!("{dir}/chat_template.jinja"))
        } else if let Some(s) = from_config {
            (s, format!("{dir}/tokenizer_config.json"))
        } else {
            tracing::warn!("{dir}: the model ships no chat template; using ChatML");
            (CHATML_TEMPLATE.to_string(), "built-in ChatML".to_string())
        };
        ChatTemplate::new(source, origin, bos, eos)
    }

    /// Compiles `source`; `origin` names it in messages.
    pub fn new(
        source: String,
        origin: String,
        bos_token: String,
        eos_token: String,
    ) -> Result<ChatTemplate, ChatError> {
        let mut env = Environment::new();
        // A bound on the work of one render: real templates take well under
        // a million steps even for long chats; a runaway one (nested
        // `range(100000)` loops) stops with an error instead of running
        // forever with memory climbing.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String {
            strftime_now(&fmt)
        });
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source)
            .map_err(|e| ChatError::TemplateSyntax {
                origin: origin.clone(),
                reason: e.to_string(),
            })?;
        Ok(ChatTemplate {
            env,
            origin,
            bos_token,
            eos_token,
        })
    }

    /// The Qwen3 thinking template bundled with the crate.
    pub fn qwen3_thinking() -> ChatTemplate {
        ChatTemplate::new(
            crate::assets::QWEN3_THINKING_CHAT_TEMPLATE.to_string(),
            "built-in Qwen3 thinking template".into(),
            String::new(),
            "<|im_end|>".into(),
        )
        .expect("bundled template compiles")
    }

    /// Renders `messages` like `apply_chat_template(messages,
    /// add_generation_prompt=..., enable_thinking=..., tokenize=False)`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        enable_thinking: bool,
    ) -> Result<String, ChatError> {
        let mut extras = RenderExtras::default();
        extras
            .kwargs
            .insert("enable_thinking".into(), enable_thinking.into());
        self.render_with(messages, add_generation_prompt, &extras)
    }

    /// Whether the template reads `tools` (a template that does not would
    /// silently drop the tools a request offers).
    pub fn supports_tools(&self) -> bool {
        let t = self.env.get_template("chat").expect("added in new()");
        t.undeclared_variables(false).contains("tools")
    }

    /// Renders like `apply_chat_template(messages, tools=...,
    /// add_generation_prompt=..., **kwargs, tokenize=False)`;
    /// `enable_thinking` defaults to true.
    pub fn render_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extras: &RenderExtras,
    ) -> Result<String, ChatError> {
        let t = self.env.get_template("chat").expect("added in new()");
        let tools = extras
            .tools
            .as_ref()
            .filter(|t| !t.is_empty())
            .map(minijinja::Value::from_serialize);
        // The request's kwargs override the defaults (context! would let
        // the named keys win).
        let mut vars: std::collections::BTreeMap<String, minijinja::Value> = extras
            .kwargs
            .iter()
            .map(|(k, v)| (k.clone(), minijinja::Value::from_serialize(v)))
            .collect();
        vars.entry("enable_thinking".into()).or_insert(true.into());
        vars.insert(
            "messages".into(),
            minijinja::Value::from_serialize(messages),
        );
        vars.insert("add_generation_prompt".into(), add_generation_prompt.into());
        vars.insert("bos_token".into(), self.bos_token.as_str().into());
        vars.insert("eos_token".into(), self.eos_token.as_str().into());
        vars.insert("tools".into(), tools.unwrap_or_default());
        t.render(vars).map_err(|e| ChatError::TemplateRender {
            origin: self.origin.clone(),
            reason: if e.kind() == ErrorKind::OutOfFuel {
                format!(
                    "the template ran more than {TEMPLATE_FUEL} steps (a runaway loop?); stopped"
                )
            } else {
                crate::cli::one_line(&e)
            },
        })
    }
}

/// `tojson` as transformers defines it for templates: Python's
/// `json.dumps(x, ensure_ascii=False)` (`", "` and `": "` separators, no
/// HTML escaping, unlike minijinja's built-in). Keys come out sorted.
fn tojson(value: minijinja::Value) -> Result<minijinja::Value, Error> {
    let v = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    python_json(&v, &mut out);
    Ok(minijinja::Value::from_safe_string(out))
}

fn python_json(v: &serde_json::Value, out: &mut String) {
    use serde_json::Value as V;
    match v {
        V::Array(items) => {
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_json(x, out);
            }
            out.push(']');
        }
        V::Object(map) => {
            out.push('{');
            for (i, (k, x)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&V::String(k.clone()).to_string());
                out.push_str(": ");
                python_json(x, out);
            }
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// `strftime_now(fmt)` for templates that print today's date: supports the
/// `%Y %m %d %B %b %H %M %S %%` directives (UTC).
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen3_thinking_renders_exactly_like_transformers() {
        let t = ChatTemplate::qwen3_thinking();
        let msgs = [
            Message::new("system", "You are a helpful assistant."),
            Message::new("user", "Hello!"),
        ];
        assert_eq!(
            t.render(&msgs, true, true).unwrap(),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n<think>\n"
        );
        // An earlier assistant turn loses its reasoning, as the template says.
        let msgs = [
            Message::new("user", "2+2?"),
            Message::new("assistant", "<think>\nadd them\n</think>\n\n4"),
            Message::new("user", "and 3+3?"),
        ];
        assert_eq!(
            t.render(&msgs, true, true).unwrap(),
            "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n\
             <|im_start|>user\nand 3+3?<|im_end|>\n<|im_start|>assistant\n<think>\n"
        );
        assert_eq!(
            t.render(&msgs[..1], false, true).unwrap(),
            "<|im_start|>user\n2+2?<|im_end|>\n"
        );
    }

    #[test]
    fn tools_kwargs_and_tool_messages_reach_the_template() {
        let src = "{% if tools %}{% for t in tools %}{{ t | tojson }}\n{% endfor %}{% endif %}\
{% for m in messages %}{{ m.role }}:{{ m.content }}\
{% if m.tool_calls %}{% for c in m.tool_calls %}[{{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}{% endif %}\
{% if m.tool_call_id %}({{ m.tool_call_id }}){% endif %}\n{% endfor %}\
{% if enable_thinking is false %}no-think{% endif %}{{ custom }}";
        let t = ChatTemplate::new(src.into(), "t".into(), String::new(), String::new()).unwrap();
        assert!(t.supports_tools());
        assert!(!ChatTemplate::qwen3_thinking().supports_tools());
        let tool = serde_json::json!({"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "<city>"}}}}});
        let mut call = Message::new("assistant", "");
        call.tool_calls = Some(vec![serde_json::json!({"type": "function", "id": "c1",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}})]);
        let mut result = Message::new("tool", "18C");
        result.tool_call_id = Some("c1".into());
        let mut extras = RenderExtras {
            tools: Some(vec![tool]),
            ..RenderExtras::default()
        };
        extras.kwargs.insert("enable_thinking".into(), false.into());
        extras.kwargs.insert("custom".into(), "!".into());
        let out = t
            .render_with(
                &[Message::new("user", "Weather?"), call, result],
                false,
                &extras,
            )
            .unwrap();
        assert_eq!(
            out,
            "{\"function\": {\"name\": \"get_weather\", \"parameters\": {\"properties\": {\"city\": {\"description\": \"<city>\", \"type\": \"string\"}}, \"type\": \"object\"}}, \"type\": \"function\"}\n\
             user:Weather?assistant:[get_weather {\"city\": \"Paris\"}]tool:18C(c1)no-think!"
        );
    }

    #[test]
    fn chatml_fallback_and_pycompat_methods() {
        let t = ChatTemplate::new(
            CHATML_TEMPLATE.into(),
            "t".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "Hi")], true, true).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let t = ChatTemplate::new(
            "{{ messages[0].content.strip().upper() }}{% if messages[0].content.startswith(' a') %}!{% endif %}\n".into(),
            "t".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        // jinja2 drops a single trailing newline of the template.
        assert_eq!(
            t.render(&[Message::new("user", " abc ")], false, true)
                .unwrap(),
            "ABC!"
        );
    }

    #[test]
    fn hybrid_template_sees_enable_thinking_and_errors_name_origin() {
        let src = "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}";
        let t = ChatTemplate::new(src.into(), "o".into(), String::new(), String::new()).unwrap();
        assert_eq!(
            t.render(&[], true, false).unwrap(),
            "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        );
        assert_eq!(
            t.render(&[], true, true).unwrap(),
            "<|im_start|>assistant\n"
        );
        let t = ChatTemplate::new(
            "{{ raise_exception('roles must alternate') }}".into(),
            "DIR/chat_template.jinja".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        let e = t.render(&[], true, true).unwrap_err().to_string();
        assert!(
            e.contains("DIR/chat_template.jinja") && e.contains("roles must alternate"),
            "{e}"
        );
        let e = ChatTemplate::new("{% if %}".into(), "X".into(), String::new(), String::new())
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("X: chat template does not compile"), "{e}");
        assert_eq!(strftime_now("%%").len(), 1);
        assert_eq!(strftime_now("%Y-%m-%d").len(), 10);
    }
}
