//! `rh-serve --listen` as a process on 127.0.0.1:0, driven with a real HTTP
//! client (ureq) on the synthetic tiny checkpoint (random weights, real
//! Qwen3 tokenizer and template): every endpoint, streaming chunk by chunk,
//! stop strings, tool calls, auth, the queue, a client that disconnects,
//! bad input of each kind, and prompt reuse (with the logits of a reused
//! prompt compared against a full prefill).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rh_tests::bin;
use roundhouse::chat::{ChatModel, Message, RenderExtras};
use roundhouse::checkpoint::Checkpoint;
use roundhouse::serve::engine::{prefill, prepare};
use roundhouse::serve::{PrefixCache, Prompt};
use serde_json::{json, Value};

/// The synthetic tiny checkpoint, written once per target dir (the same
/// deterministic content tests/serve.rs uses).
fn tiny() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| rh_tests::tiny_checkpoint(Path::new(env!("CARGO_TARGET_TMPDIR"))))
}

/// A template that renders tools and tool messages the way Qwen3's does
/// (written for this test: the bundled Thinking template has no tools).
const TOOL_TEMPLATE: &str = r#"{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>

Call a function as <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages %}{% if m.role == 'user' %}<|im_start|>user
{{ m.content }}<|im_end|>
{% elif m.role == 'assistant' %}<|im_start|>assistant
{{ m.content }}{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}{% endif %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% endif %}{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
<think>
{% endif %}"#;

/// The tiny model with [`TOOL_TEMPLATE`] (links to the same weights).
fn tiny_with_tools() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap()
            .keep();
        for e in std::fs::read_dir(tiny()).unwrap() {
            let e = e.unwrap();
            if e.file_name() != "chat_template.jinja" {
                std::os::unix::fs::symlink(e.path(), dir.join(e.file_name())).unwrap();
            }
        }
        std::fs::write(dir.join("chat_template.jinja"), TOOL_TEMPLATE).unwrap();
        dir
    })
}

/// A running server; killed when dropped.
struct Server {
    child: Child,
    url: String,
    stderr: Arc<std::sync::Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts rh-serve on 127.0.0.1:0 and waits for the listening line and
    /// a 200 from /health.
    fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(bin("rh-serve"))
            .arg(model)
            .args(["--listen", "127.0.0.1:0", "--ctx-size", "8192", "-t", "2"])
            .args(extra)
            .env_remove("RH_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let stderr = Arc::new(std::sync::Mutex::new(String::new()));
        let mut url = None;
        for line in lines.by_ref() {
            let line = line.unwrap();
            stderr.lock().unwrap().push_str(&format!("{line}\n"));
            if let Some(u) = line.strip_prefix("rh-serve: listening on ") {
                url = Some(u.to_string());
                break;
            }
        }
        let url = url.unwrap_or_else(|| panic!("no listening line: {}", stderr.lock().unwrap()));
        assert!(
            url.starts_with("http://127.0.0.1:") && !url.ends_with(":0"),
            "{url}"
        );
        let log = stderr.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                log.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let s = Server { child, url, stderr };
        let t0 = Instant::now();
        loop {
            let (status, _) = s.get("/health", None);
            if status == 200 {
                break;
            }
            assert_eq!(status, 503, "health while loading");
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "never became healthy: {}",
                s.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn get(&self, path: &str, key: Option<&str>) -> (u16, String) {
        let mut r = ureq::get(&format!("{}{path}", self.url));
        if let Some(k) = key {
            r = r.set("Authorization", &format!("Bearer {k}"));
        }
        finish(r.call())
    }

    fn post_raw(&self, path: &str, body: &str, key: Option<&str>) -> (u16, String) {
        let mut r =
            ureq::post(&format!("{}{path}", self.url)).set("Content-Type", "application/json");
        if let Some(k) = key {
            r = r.set("Authorization", &format!("Bearer {k}"));
        }
        finish(r.send_string(body))
    }

    /// POSTs JSON; returns the status and the parsed body.
    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (s, text) = self.post_raw(path, &body.to_string(), None);
        (
            s,
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({s}): {text}")),
        )
    }

    /// POSTs a streaming request; returns every `data:` payload in order.
    fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let resp = ureq::post(&format!("{}{path}", self.url))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
            .unwrap();
        assert_eq!(resp.header("content-type"), Some("text/event-stream"));
        let mut out = Vec::new();
        for line in BufReader::new(resp.into_reader()).lines() {
            let line = line.unwrap();
            if let Some(d) = line.strip_prefix("data: ") {
                out.push(d.to_string());
            } else {
                assert!(line.is_empty(), "unexpected SSE line {line:?}");
            }
        }
        out
    }
}

fn finish(r: Result<ureq::Response, ureq::Error>) -> (u16, String) {
    match r {
        Ok(resp) => (resp.status(), resp.into_string().unwrap()),
        Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

/// Checks OpenAI's error shape and returns the message.
fn error_message(status: u16, body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    let e = &v["error"];
    assert_eq!(e["code"], status, "{body}");
    assert!(e["type"].is_string(), "{body}");
    e["message"].as_str().unwrap().to_string()
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// Streams are joined into (reasoning, content, finish_reason, last chunk).
fn join_stream(chunks: &[String]) -> (String, String, String, Value) {
    assert_eq!(chunks.last().map(String::as_str), Some("[DONE]"));
    let mut reasoning = String::new();
    let mut content = String::new();
    let mut finish = String::new();
    let mut last = Value::Null;
    for (i, c) in chunks[..chunks.len() - 1].iter().enumerate() {
        let v: Value = serde_json::from_str(c).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk", "{c}");
        let Some(choice) = v["choices"].get(0) else {
            continue; // the usage chunk
        };
        let d = &choice["delta"];
        if i == 0 {
            assert_eq!(d["role"], "assistant", "{c}");
        }
        if let Some(t) = d["reasoning_content"].as_str() {
            reasoning.push_str(t);
        }
        if let Some(t) = d["content"].as_str() {
            content.push_str(t);
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = f.to_string();
            last = v.clone();
        }
    }
    (reasoning, content, finish, last)
}

#[test]
fn endpoints_streaming_and_stop_strings() {
    let s = Server::start(tiny(), &[]);
    let (st, page) = s.get("/", None);
    assert_eq!(st, 200);
    assert!(page.contains("<html") || page.contains("<!DOCTYPE") || page.contains("<!doctype"));
    let (st, models) = s.get("/v1/models", None);
    assert_eq!(st, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(models["data"][0]["id"], "serve-tiny-v1");
    let (st, body) = s.get("/nope", None);
    assert!(error_message(st, &body).contains("/nope"));
    assert_eq!(st, 404);

    // Non-streamed chat: the Thinking template opens <think>, so the
    // (random) text is reasoning; the shapes are OpenAI's plus timings.
    let req = json!({"messages": user("Hello"), "max_tokens": 12, "temperature": 0});
    let (st, a) = s.post("/v1/chat/completions", &req);
    assert_eq!(st, 200, "{a}");
    assert_eq!(a["object"], "chat.completion");
    let m = &a["choices"][0]["message"];
    assert_eq!(m["role"], "assistant");
    let finish = a["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(finish == "length" || finish == "stop", "{a}");
    let u = &a["usage"];
    assert_eq!(u["prompt_tokens"], 11, "{a}");
    let completion = u["completion_tokens"].as_u64().unwrap();
    assert!(
        completion <= 12 && (completion == 12) == (finish == "length"),
        "{a}"
    );
    assert_eq!(u["total_tokens"], 11 + completion);
    let t = &a["timings"];
    for k in [
        "prompt_n",
        "prompt_ms",
        "prompt_per_second",
        "predicted_n",
        "predicted_ms",
        "predicted_per_second",
        "cache_n",
    ] {
        assert!(t[k].is_number(), "timings.{k}: {a}");
    }
    assert_eq!(t["predicted_n"], completion);
    let reasoning = m["reasoning_content"].as_str().unwrap_or("").to_string();
    let content = m["content"].as_str().unwrap_or("").to_string();
    assert!(
        !reasoning.is_empty() || !content.is_empty() || completion == 0,
        "{a}"
    );

    // The same request streamed gives the same text, chunk by chunk.
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let chunks = s.stream("/v1/chat/completions", &sreq);
    let (r2, c2, f2, last) = join_stream(&chunks);
    assert_eq!(
        (r2.as_str(), c2.as_str(), f2.as_str()),
        (reasoning.as_str(), content.as_str(), finish)
    );
    assert!(
        last["timings"]["predicted_per_second"].is_number(),
        "{last}"
    );
    let usage: Value = serde_json::from_str(&chunks[chunks.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], completion);

    // Raw completions, then a stop string taken from the middle of the
    // text: the answer ends right before it, streamed or not.
    let req = json!({"prompt": "The train", "max_tokens": 24, "temperature": 0});
    let (st, full) = s.post("/v1/completions", &req);
    assert_eq!(st, 200, "{full}");
    assert_eq!(full["object"], "text_completion");
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 8, "too little text to test stops: {text:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let expect = &text[..text.find(&stop).unwrap()];
    let mut req = req.clone();
    req["stop"] = json!(["never-in-text", stop]);
    let (_, cut) = s.post("/v1/completions", &req);
    assert_eq!(
        cut["choices"][0]["text"], expect,
        "stop {stop:?} in {text:?}"
    );
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");
    req["stream"] = json!(true);
    let chunks = s.stream("/v1/completions", &req);
    let mut streamed = String::new();
    for c in &chunks[..chunks.len() - 1] {
        let v: Value = serde_json::from_str(c).unwrap();
        streamed.push_str(v["choices"][0]["text"].as_str().unwrap());
    }
    assert_eq!(streamed, expect);

    let (st, metrics) = s.get("/metrics", None);
    assert_eq!(st, 200);
    for name in [
        "rh_requests_total{status=\"200\"}",
        "rh_requests_total{status=\"404\"}",
        "rh_prompt_tokens_total",
        "rh_generated_tokens_total",
        "rh_prefill_tokens_per_second",
        "rh_decode_tokens_per_second",
        "rh_queue_depth 0",
        "rh_prefix_cache_hits_total",
        "rh_prefix_cache_bytes",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
}

#[test]
fn bad_input_is_a_400_in_openai_shape() {
    let s = Server::start(tiny(), &[]);
    let m = r#""messages": [{"role": "user", "content": "hi"}]"#;
    let cases = [
        ("{\"messages\": [", "not valid JSON"),
        (
            &format!("{{{m}, \"temperature\": \"warm\"}}") as &str,
            "temperature",
        ),
        (
            &format!("{{{m}, \"temperature\": 2.5}}"),
            "temperature: 2.5 is out of range",
        ),
        (
            &format!("{{{m}, \"top_p\": 1e999}}"),
            "(top_p): number out of range",
        ),
        (&format!("{{{m}, \"min_p\": -1}}"), "min_p"),
        (&format!("{{{m}, \"n\": 3}}"), "n: only 1"),
        (&format!("{{{m}, \"max_tokens\": -5}}"), "max_tokens"),
        (
            r#"{"messages": [{"role": "user"}], "stream": "yes"}"#,
            "stream",
        ),
        (r#"{"messages": "hi"}"#, "messages"),
    ];
    for (body, want) in cases {
        let (st, resp) = s.post_raw("/v1/chat/completions", body, None);
        assert_eq!(st, 400, "{body}: {resp}");
        let msg = error_message(st, &resp);
        assert!(msg.contains(want), "{body}: {msg}");
    }
    // A prompt longer than the context names both counts.
    let long = "lorem ipsum ".repeat(5000);
    let (st, resp) = s.post("/v1/chat/completions", &json!({"messages": user(&long)}));
    let msg = error_message(st, &resp.to_string());
    assert_eq!(st, 400);
    assert!(
        msg.contains("8192") && msg.contains("the prompt is 1"),
        "{msg}"
    );
    // The model's template has no tools: offering some is refused, not ignored.
    let (st, resp) = s.post(
        "/v1/chat/completions",
        &json!({"messages": user("hi"), "tools": [{"type": "function", "function": {"name": "f"}}]}),
    );
    assert_eq!(st, 400);
    assert!(error_message(st, &resp.to_string()).contains("does not render tools"));
    // The body limit: a declared length over 8 MiB is refused from the
    // headers alone (a raw socket, so no client is left writing a body).
    use std::io::{Read, Write};
    let addr = s.url.trim_start_matches("http://").trim_end_matches('/');
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    write!(
        sock,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{{",
        9 << 20
    )
    .unwrap();
    let mut head = [0u8; 4096];
    let n = sock.read(&mut head).unwrap();
    let reply = String::from_utf8_lossy(&head[..n]);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("over the 8388608-byte limit"), "{reply}");
    assert!(reply.contains("invalid_request_error"), "{reply}");
}

#[test]
fn api_key_is_required_when_set() {
    let s = Server::start(tiny(), &["--api-key", "sekrit"]);
    assert_eq!(s.get("/health", None).0, 200);
    assert_eq!(s.get("/", None).0, 200);
    let (st, body) = s.get("/v1/models", None);
    assert_eq!(st, 401);
    assert!(error_message(st, &body).contains("API key"));
    assert_eq!(s.get("/v1/models", Some("wrong")).0, 401);
    assert_eq!(s.get("/v1/models", Some("sekrit")).0, 200);
    assert_eq!(s.get("/metrics", None).0, 401);
    let body = json!({"messages": user("hi"), "max_tokens": 2}).to_string();
    assert_eq!(s.post_raw("/v1/chat/completions", &body, None).0, 401);
    assert_eq!(
        s.post_raw("/v1/chat/completions", &body, Some("sekrit")).0,
        200
    );
    // CORS is off by default: no allow-origin header.
    let r = ureq::get(&format!("{}/health", s.url))
        .set("Origin", "http://evil.example")
        .call()
        .unwrap();
    assert_eq!(r.header("access-control-allow-origin"), None);
}

#[test]
fn cors_origin_and_non_loopback_warning() {
    let s = Server::start(tiny(), &["--cors", "http://app.example"]);
    let r = ureq::get(&format!("{}/health", s.url))
        .set("Origin", "http://app.example")
        .call()
        .unwrap();
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("http://app.example")
    );
    drop(s);
    let mut child = Command::new(bin("rh-serve"))
        .arg(tiny())
        .args(["--listen", "0.0.0.0:0"])
        .env_remove("RH_API_KEY")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let second = lines.next().unwrap().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        first.contains("warning") && first.contains("--api-key"),
        "{first}"
    );
    assert!(
        second.starts_with("rh-serve: listening on http://0.0.0.0:"),
        "{second}"
    );
}

/// A request that disconnects mid-stream stops generating (the next one
/// runs at once); past the queue limit requests get a 503 with Retry-After.
/// One slot (`--parallel 1`), so the second request waits in the queue.
#[test]
fn queue_limit_and_disconnect() {
    let s = Server::start(
        tiny(),
        &["--queue", "1", "--cache-ram", "0", "--parallel", "1"],
    );
    let long = json!({"messages": user("Tell me a long story"), "max_tokens": 6000,
        "temperature": 1.0, "stream": true});
    let resp = ureq::post(&format!("{}/v1/chat/completions", s.url))
        .set("Content-Type", "application/json")
        .send_string(&long.to_string())
        .unwrap();
    let mut reader = BufReader::new(resp.into_reader());
    let mut line = String::new();
    // A few chunks arrive: it is generating.
    for _ in 0..6 {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    // One request may wait; the next is refused.
    let depth = |s: &Server| -> u64 {
        let (_, m) = s.get("/metrics", None);
        m.lines()
            .find_map(|l| l.strip_prefix("rh_queue_depth "))
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(depth(&s), 1);
    let url = s.url.clone();
    let waiting = std::thread::spawn(move || {
        let body = json!({"messages": user("Hi"), "max_tokens": 3, "temperature": 0});
        finish(ureq::post(&format!("{url}/v1/chat/completions")).send_string(&body.to_string()))
    });
    let t0 = Instant::now();
    while depth(&s) < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the second request never queued"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (st, refused) = s.post_raw(
        "/v1/chat/completions",
        &json!({"messages": user("x"), "max_tokens": 1}).to_string(),
        None,
    );
    assert_eq!(st, 503, "{refused}");
    assert!(error_message(503, &refused).contains("queue is full"));
    let r = ureq::post(&format!("{}/v1/completions", s.url))
        .send_string(&json!({"prompt": "x"}).to_string());
    match r {
        Err(ureq::Error::Status(503, resp)) => assert_eq!(resp.header("retry-after"), Some("1")),
        other => panic!("expected 503: {other:?}"),
    }
    // The streaming client goes away: its generation stops and the waiting
    // request is answered.
    drop(reader);
    let (st, body) = waiting.join().unwrap();
    assert_eq!(st, 200, "{body}");
    let (_, metrics) = s.get("/metrics", None);
    let generated: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("rh_generated_tokens_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        generated < 3000,
        "the abandoned request kept generating: {generated} tokens"
    );
    assert!(
        metrics.contains("rh_requests_total{status=\"503\"}"),
        "{metrics}"
    );
}

#[test]
fn second_turn_reuses_the_first_and_answers_the_same() {
    let s = Server::start(tiny(), &[]);
    let system = "You are a careful assistant. ".repeat(20);
    let mut messages = json!([{"role": "system", "content": system}, {"role": "user", "content": "Name three rivers."}]);
    let req = |m: &Value, cache: bool| json!({"messages": m, "max_tokens": 6, "temperature": 0, "cache_prompt": cache});
    let (_, a1) = s.post("/v1/chat/completions", &req(&messages, true));
    assert_eq!(a1["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let reply = a1["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let arr = messages.as_array_mut().unwrap();
    arr.push(json!({"role": "assistant", "content": reply}));
    arr.push(json!({"role": "user", "content": "And three mountains?"}));
    let (_, reused) = s.post("/v1/chat/completions", &req(&messages, true));
    let (_, fresh) = s.post("/v1/chat/completions", &req(&messages, false));
    let cached = reused["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let prompt = reused["usage"]["prompt_tokens"].as_u64().unwrap();
    // The system prompt and first question come from the kept state.
    assert!(
        cached > 100 && cached < prompt,
        "cached {cached} of {prompt}"
    );
    assert_eq!(reused["timings"]["cache_n"], cached);
    assert_eq!(reused["timings"]["prompt_n"], prompt - cached);
    assert_eq!(fresh["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(
        reused["choices"][0]["message"],
        fresh["choices"][0]["message"]
    );
    let (_, metrics) = s.get("/metrics", None);
    assert!(
        !metrics.contains("rh_prefix_cache_hits_total 0\n"),
        "{metrics}"
    );
}

/// The reuse path itself: the logits after a reused prompt against a full
/// prefill of the same tokens.
#[test]
fn reused_prompt_logits_match_a_full_prefill() {
    let chat = ChatModel::load(Arc::new(Checkpoint::open(tiny()).unwrap())).unwrap();
    let mut cache = PrefixCache::new(1 << 30);
    let mut msgs = vec![
        Message::new("system", "Answer in one word. ".repeat(30)),
        Message::new("user", "Capital of France?"),
    ];
    let p1 = prepare(
        &chat,
        &Prompt::Chat {
            messages: msgs.clone(),
            extras: RenderExtras::default(),
        },
        8192,
    )
    .unwrap();
    let first = prefill(&chat, &mut cache, &p1.ids, p1.boundary, true);
    assert_eq!(first.cached, 0);
    msgs.push(Message::new(
        "assistant",
        "<think>\nEasy.\n</think>\n\nParis.",
    ));
    msgs.push(Message::new("user", "Of Italy?"));
    let p2 = prepare(
        &chat,
        &Prompt::Chat {
            messages: msgs,
            extras: RenderExtras::default(),
        },
        8192,
    )
    .unwrap();
    let reused = prefill(&chat, &mut cache, &p2.ids, p2.boundary, true);
    // Everything up to the end of the first question was kept.
    assert_eq!(reused.cached, p1.boundary.unwrap());
    assert!(reused.cached > 100);
    // The kept state is exact: the same calls (the first turn's history,
    // this turn's history, the generation prompt) without any cache give
    // bit-identical logits.
    let (b, b2) = (reused.cached, p2.boundary.unwrap());
    let mut split = chat.model.new_state();
    chat.model.forward(&mut split, &p2.ids[..b]);
    chat.model.forward(&mut split, &p2.ids[b..b2]);
    let split_logits = chat.model.forward(&mut split, &p2.ids[b2..]);
    assert_eq!(reused.state.position(), split.position());
    assert_eq!(
        reused.logits, split_logits,
        "a reused state differs from the same split without reuse"
    );
    // Against one prefill of the whole prompt the sums run in another order
    // (the chunked delta rule and the prefill tiles start at the split), so
    // the logits agree to float rounding, not bit for bit: same top-1, and
    // within 1e-3 of the largest logit (measured: about 2e-4 of ~3).
    let mut state = chat.model.new_state();
    let full = chat.model.forward(&mut state, &p2.ids);
    let diff = reused
        .logits
        .iter()
        .zip(&full)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let scale = full.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let argmax = |v: &[f32]| roundhouse::sample::argmax(v);
    assert_eq!(argmax(&reused.logits), argmax(&full));
    assert!(
        diff <= 1e-3 * scale,
        "max |reused - full| = {diff:e} (largest logit {scale})"
    );
}

#[test]
fn tools_are_rendered_and_tool_messages_go_back_in() {
    let s = Server::start(tiny_with_tools(), &[]);
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "description": "Current weather", "parameters": {"type": "object",
        "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let base = json!({"messages": user("Weather in Paris?"), "max_tokens": 4, "temperature": 0});
    let (_, plain) = s.post("/v1/chat/completions", &base);
    let mut with = base.clone();
    with["tools"] = tools.clone();
    let (st, a) = s.post("/v1/chat/completions", &with);
    assert_eq!(st, 200, "{a}");
    let grew = a["usage"]["prompt_tokens"].as_u64().unwrap()
        - plain["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        grew > 20,
        "the tools did not reach the prompt (+{grew} tokens)"
    );
    // tool_choice none: not rendered.
    with["tool_choice"] = json!("none");
    let (_, none) = s.post("/v1/chat/completions", &with);
    assert_eq!(
        none["usage"]["prompt_tokens"],
        plain["usage"]["prompt_tokens"]
    );
    // A full round: the assistant's call and the tool's answer go back in.
    let round = json!({"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"}],
        "tools": tools, "max_tokens": 4, "temperature": 0, "stream": true});
    let chunks = s.stream("/v1/chat/completions", &round);
    let (_, _, finish, _) = join_stream(&chunks);
    assert!(
        finish == "length" || finish == "stop" || finish == "tool_calls",
        "{finish}"
    );
}

/// Several real clients at once share the running batch (`--parallel 3`,
/// four requests: one waits for a slot), with prompts of different lengths
/// (a long one is read in chunks between decode steps) joining while a
/// stream decodes and leaving at different lengths: each gets the greedy
/// answer it gets alone. Batched products are matmuls and a lone decode's
/// are matvecs, equal to rounding (model::tests bounds the logits at 2e-3
/// of their range with the same top-1), so the greedy texts match.
#[test]
fn concurrent_clients_get_what_each_gets_alone() {
    let s = Server::start(tiny(), &["--parallel", "3", "--cache-ram", "0"]);
    let prompts: Vec<(String, usize)> = vec![
        ("Once upon a time".into(), 40),
        ("The capital of France is".into(), 12),
        (
            format!("{} Summarize.", "The river runs to the sea. ".repeat(60)),
            16,
        ),
        ("1, 2, 3,".into(), 6),
    ];
    let body = |p: &str, n: usize, stream: bool| json!({"prompt": p, "max_tokens": n, "temperature": 0, "stream": stream});
    let text = |v: &Value| v["choices"][0]["text"].as_str().unwrap().to_string();
    let alone: Vec<(String, u64)> = prompts
        .iter()
        .map(|(p, n)| {
            let (st, v) = s.post("/v1/completions", &body(p, *n, false));
            assert_eq!(st, 200, "{v}");
            (text(&v), v["usage"]["completion_tokens"].as_u64().unwrap())
        })
        .collect();
    let steps = |s: &Server| -> u64 {
        let (_, m) = s.get("/metrics", None);
        m.lines()
            .find_map(|l| l.strip_prefix("rh_batch_steps_total "))
            .unwrap()
            .parse()
            .unwrap()
    };
    let steps0 = steps(&s);

    // The first client streams; the others start once it is generating.
    let (tx, rx) = std::sync::mpsc::channel();
    let url = s.url.clone();
    let first = body(&prompts[0].0, prompts[0].1, true);
    let streamer = std::thread::spawn(move || {
        let resp = ureq::post(&format!("{url}/v1/completions"))
            .send_string(&first.to_string())
            .unwrap();
        let mut out = String::new();
        let mut seen = 0;
        for line in BufReader::new(resp.into_reader()).lines() {
            let line = line.unwrap();
            let Some(d) = line.strip_prefix("data: ") else {
                continue;
            };
            if d == "[DONE]" {
                break;
            }
            seen += 1;
            if seen == 3 {
                tx.send(()).unwrap();
            }
            let v: Value = serde_json::from_str(d).unwrap();
            out.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
        }
        out
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the streaming client got its first chunks");
    let others: Vec<_> = prompts[1..]
        .iter()
        .map(|(p, n)| {
            let url = s.url.clone();
            let b = body(p, *n, false);
            std::thread::spawn(move || {
                let (st, t) = finish(
                    ureq::post(&format!("{url}/v1/completions")).send_string(&b.to_string()),
                );
                assert_eq!(st, 200, "{t}");
                serde_json::from_str::<Value>(&t).unwrap()
            })
        })
        .collect();
    let mut together = vec![streamer.join().unwrap()];
    together.extend(others.into_iter().map(|h| text(&h.join().unwrap())));
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(&a.0, b, "request {i}: alone vs in the batch");
    }
    // They shared steps: fewer batched forwards than tokens generated
    // (each prompt took at least one step of its own too).
    let generated: u64 = alone.iter().map(|a| a.1).sum();
    let used = steps(&s) - steps0;
    assert!(
        used < generated,
        "{used} steps for {generated} tokens: the requests did not share steps"
    );
    let (_, health) = s.get("/health", None);
    let h: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(h["slots_idle"], 3, "{health}");
    assert_eq!(h["slots_processing"], 0, "{health}");
}
