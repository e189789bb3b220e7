//! `rh-serve --listen`: OpenAI's HTTP API (and llama-server's extras:
//! `/health`, `/metrics`, `timings`) on axum. Handlers parse and validate,
//! hand a job to the engine thread and turn its events into JSON or
//! server-sent events; they never run the model themselves.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use roundhouse::serve::{Delta, Engine, Event, Failure, Rejected, Summary};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::api::{self, BadRequest, Defaults, Parsed};

/// The web chat page.
const CHAT_HTML: &str = include_str!("../assets/chat.html");

/// Largest request body (a full 262k-token context is about 1 MiB of text).
pub const MAX_BODY_BYTES: usize = 8 << 20;

/// What every handler shares.
pub struct AppState {
    /// The engine thread.
    pub engine: Engine,
    /// Name reported by `/v1/models`.
    pub model_id: String,
    /// `Authorization: Bearer` key, when one is required.
    pub api_key: Option<String>,
    /// Request defaults, set once the model is loaded.
    pub defaults: Mutex<Option<Defaults>>,
    /// Responses by status code.
    pub by_status: Mutex<BTreeMap<u16, u64>>,
    /// Counter for response ids.
    pub next_id: AtomicU64,
    /// When the server started (for `created`).
    pub started: u64,
    /// The expert cache, when the model runs under a memory budget.
    pub expert_pager: Option<Arc<roundhouse::model::experts::ExpertPager>>,
}

type Shared = Arc<AppState>;

/// The router with every route, auth, CORS and the body limit.
pub fn router(state: Shared, cors: Option<String>) -> Router {
    let mut app = Router::new()
        .route("/", get(index))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn(declared_body_limit))
        .layer(middleware::from_fn_with_state(state.clone(), count_status))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state);
    if let Some(origin) = cors {
        use tower_http::cors::{AllowOrigin, CorsLayer};
        let allow = if origin == "*" {
            AllowOrigin::any()
        } else {
            match HeaderValue::from_str(&origin) {
                Ok(v) => AllowOrigin::exact(v),
                Err(_) => AllowOrigin::list([]),
            }
        };
        app = app.layer(
            CorsLayer::new()
                .allow_origin(allow)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
        );
    }
    app
}

/// OpenAI's error shape with `status`.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let kind = match status.as_u16() {
        400 | 404 | 405 | 413 | 415 => "invalid_request_error",
        401 => "authentication_error",
        503 => "unavailable_error",
        _ => "server_error",
    };
    let body = json!({"error": {"message": message.into(), "type": kind, "code": status.as_u16()}});
    (status, Json(body)).into_response()
}

/// A body whose declared length is over the limit is refused before any of
/// it is read, so the client gets the 413 instead of a reset connection
/// mid-upload (bodies without a length are still cut at the limit while read).
async fn declared_body_limit(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > MAX_BODY_BYTES as u64 => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body of {n} bytes is over the {MAX_BODY_BYTES}-byte limit"),
        ),
        _ => next.run(req).await,
    }
}

async fn not_found(req: Request) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("{} {}: no such endpoint", req.method(), req.uri().path()),
    )
}

/// Bearer auth on everything but the page and `/health` (as llama-server).
async fn auth(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let open = matches!(req.uri().path(), "/" | "/health") || req.method() == Method::OPTIONS;
    if let (Some(key), false) = (&s.api_key, open) {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given.map(str::trim) != Some(key.as_str()) {
            return error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key (send Authorization: Bearer KEY)",
            );
        }
    }
    next.run(req).await
}

async fn count_status(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    *s.by_status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(resp.status().as_u16())
        .or_default() += 1;
    resp
}

async fn index() -> Html<&'static str> {
    Html(CHAT_HTML)
}

async fn health(State(s): State<Shared>) -> Response {
    if s.engine.ready() {
        // llama-server's slot counts: sequences in the running batch and
        // room left in it.
        let busy = s.engine.metrics().batch_sequences.load(Ordering::Relaxed) as usize;
        let idle = s.engine.parallel().saturating_sub(busy);
        Json(json!({"status": "ok", "slots_idle": idle, "slots_processing": busy})).into_response()
    } else {
        error(StatusCode::SERVICE_UNAVAILABLE, "loading model")
    }
}

async fn models(State(s): State<Shared>) -> Response {
    Json(json!({"object": "list", "data": [{
        "id": s.model_id, "object": "model", "created": s.started, "owned_by": "roundhouse",
        "meta": s.engine.info().and_then(Result::ok).map(|i| json!({"n_ctx": i.ctx_size})),
    }]}))
    .into_response()
}

async fn metrics(State(s): State<Shared>) -> Response {
    let m = s.engine.metrics();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, String)>| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in lines {
            out.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    let by_status: Vec<(String, String)> = s
        .by_status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(k, v)| (format!("{{status=\"{k}\"}}"), v.to_string()))
        .collect();
    metric(
        "rh_requests_total",
        "counter",
        "HTTP responses by status code.",
        by_status,
    );
    let samples = token_samples(m)
        .into_iter()
        .chain(batch_samples(&s, m))
        .chain(prefix_cache_samples(m));
    for (name, kind, help, v) in samples {
        metric(name, kind, help, vec![(String::new(), v)]);
    }
    if let Some(p) = &s.expert_pager {
        let tokens = load(&m.prompt_tokens) + load(&m.generated_tokens);
        expert_cache_metrics(&mut metric, &p.stats(), tokens);
    }
    metric(
        "rh_model_loaded",
        "gauge",
        "1 once the model is loaded.",
        vec![(String::new(), u8::from(s.engine.ready()).to_string())],
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// One unlabelled sample of `/metrics`: name, type, help, value.
type Sample = (&'static str, &'static str, &'static str, String);

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// Tokens computed and generated, the time spent on each, and the rates.
fn token_samples(m: &roundhouse::serve::EngineMetrics) -> Vec<Sample> {
    let (pt, pus) = (load(&m.prompt_tokens), load(&m.prefill_us));
    let (gt, dus) = (load(&m.generated_tokens), load(&m.decode_us));
    let rate = |t: u64, us: u64| {
        if us > 0 {
            format!("{:.3}", t as f64 / (us as f64 / 1e6))
        } else {
            "0".into()
        }
    };
    vec![
        (
            "rh_prompt_tokens_total",
            "counter",
            "Prompt tokens computed (not taken from the prefix cache).",
            pt.to_string(),
        ),
        (
            "rh_prompt_tokens_cached_total",
            "counter",
            "Prompt tokens taken from the prefix cache.",
            load(&m.cached_tokens).to_string(),
        ),
        (
            "rh_generated_tokens_total",
            "counter",
            "Tokens generated.",
            gt.to_string(),
        ),
        (
            "rh_prefill_seconds_total",
            "counter",
            "Time spent on prompts.",
            format!("{:.6}", pus as f64 / 1e6),
        ),
        (
            "rh_decode_seconds_total",
            "counter",
            "Time spent generating.",
            format!("{:.6}", dus as f64 / 1e6),
        ),
        (
            "rh_prefill_tokens_per_second",
            "gauge",
            "Prompt tokens computed per second of prompt time, since start.",
            rate(pt, pus),
        ),
        (
            "rh_decode_tokens_per_second",
            "gauge",
            "Tokens generated per second of generation time, since start.",
            rate(gt, dus),
        ),
    ]
}

/// The queue and the running batch.
fn batch_samples(s: &AppState, m: &roundhouse::serve::EngineMetrics) -> Vec<Sample> {
    vec![
        (
            "rh_queue_depth",
            "gauge",
            "Requests queued or running.",
            s.engine.depth().to_string(),
        ),
        (
            "rh_batch_sequences",
            "gauge",
            "Requests in the running batch (prefilling or generating).",
            load(&m.batch_sequences).to_string(),
        ),
        (
            "rh_batch_decoding",
            "gauge",
            "Requests in the running batch that are generating.",
            load(&m.batch_decoding).to_string(),
        ),
        (
            "rh_batch_capacity",
            "gauge",
            "Most requests in the running batch (--parallel).",
            s.engine.parallel().to_string(),
        ),
        (
            "rh_batch_steps_total",
            "counter",
            "Batched forward passes run.",
            load(&m.batch_steps).to_string(),
        ),
    ]
}

/// The prefix cache: hits, misses, what it holds.
fn prefix_cache_samples(m: &roundhouse::serve::EngineMetrics) -> Vec<Sample> {
    vec![
        (
            "rh_prefix_cache_hits_total",
            "counter",
            "Requests that started from a kept state.",
            load(&m.cache_hits).to_string(),
        ),
        (
            "rh_prefix_cache_misses_total",
            "counter",
            "Requests that found no kept state.",
            load(&m.cache_misses).to_string(),
        ),
        (
            "rh_prefix_cache_bytes",
            "gauge",
            "Bytes held by kept states.",
            load(&m.cache_bytes).to_string(),
        ),
        (
            "rh_prefix_cache_entries",
            "gauge",
            "Kept states.",
            load(&m.cache_entries).to_string(),
        ),
    ]
}

/// The expert cache's counters (a model under `--memory-budget`), and the
/// bytes read from storage per token computed (prompt and generated).
fn expert_cache_metrics(
    metric: &mut impl FnMut(&str, &str, &str, Vec<(String, String)>),
    st: &roundhouse::model::experts::PagerStats,
    tokens: u64,
) {
    let one = |v: String| vec![(String::new(), v)];
    let counters = [
        (
            "rh_expert_cache_hits_total",
            "Routed experts found resident.",
            st.hits,
        ),
        (
            "rh_expert_cache_inflight_total",
            "Routed experts found being read ahead.",
            st.inflight,
        ),
        (
            "rh_expert_cache_misses_total",
            "Routed experts read on demand.",
            st.misses,
        ),
        (
            "rh_expert_cache_read_bytes_total",
            "Bytes read from storage by the expert cache.",
            st.bytes_read,
        ),
        (
            "rh_expert_cache_evictions_total",
            "Experts evicted.",
            st.evictions,
        ),
    ];
    for (name, help, v) in counters {
        metric(name, "counter", help, one(v.to_string()));
    }
    metric(
        "rh_expert_cache_hit_ratio",
        "gauge",
        "Share of routed experts resident when asked for, since start.",
        one(format!("{:.4}", st.hit_rate())),
    );
    metric(
        "rh_expert_cache_read_bytes_per_token",
        "gauge",
        "Bytes read from storage per token computed (prompt and generated), since start.",
        one(format!(
            "{:.0}",
            st.bytes_read as f64 / tokens.max(1) as f64
        )),
    );
    metric(
        "rh_expert_cache_resident",
        "gauge",
        "Experts held / the cache's capacity.",
        vec![
            ("{kind=\"held\"}".into(), st.resident.to_string()),
            ("{kind=\"capacity\"}".into(), st.capacity.to_string()),
        ],
    );
}

fn body_error(e: BytesRejection) -> Response {
    let status = e.status();
    let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
        format!("request body is larger than {} bytes", MAX_BODY_BYTES)
    } else {
        e.body_text()
    };
    error(status, msg)
}

/// Which endpoint a job answers.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

/// What every response of one job carries.
struct Reply {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    fn wrap(&self, choices: Value, chunk: bool) -> Value {
        json!({"id": self.id, "object": self.object(chunk), "created": self.created,
               "model": self.model, "system_fingerprint": "roundhouse", "choices": choices})
    }
}

fn usage(s: &Summary) -> Value {
    json!({"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
           "total_tokens": s.prompt_tokens + s.completion_tokens,
           "prompt_tokens_details": {"cached_tokens": s.cached_tokens}})
}

/// llama-server's `timings` (the web page shows them).
fn timings(s: &Summary) -> Value {
    let computed = s.prompt_tokens - s.cached_tokens;
    let per_s = |n: usize, ms: f64| if ms > 0.0 { n as f64 * 1e3 / ms } else { 0.0 };
    // Decode rate counts the tokens after the first (the first comes from
    // the prompt's logits).
    let decoded = s.completion_tokens.saturating_sub(1);
    json!({"prompt_n": computed, "prompt_ms": s.prompt_ms,
           "prompt_per_second": per_s(computed, s.prompt_ms),
           "predicted_n": s.completion_tokens, "predicted_ms": s.predicted_ms,
           "predicted_per_second": per_s(decoded, s.predicted_ms),
           "cache_n": s.cached_tokens})
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn chat_completions(
    State(s): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate(s, body, Kind::Chat).await
}

async fn completions(State(s): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    generate(s, body, Kind::Text).await
}

/// Parses, queues, waits for the prompt to be in, then answers.
async fn generate(s: Shared, body: Result<Bytes, BytesRejection>, kind: Kind) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return body_error(e),
    };
    let Some(defaults) = s.defaults.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "loading model");
    };
    let parsed = match kind {
        Kind::Chat => api::chat_request(&body, &defaults),
        Kind::Text => api::completion_request(&body, &defaults),
    };
    let Parsed {
        request,
        stream,
        include_usage,
        model,
    } = match parsed {
        Ok(p) => p,
        Err(BadRequest(m)) => return error(StatusCode::BAD_REQUEST, m),
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let sink = Box::new(move |e: Event| tx.send(e).is_ok());
    if let Err(Rejected::QueueFull) = s.engine.submit(request, sink) {
        let mut r = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the request queue is full; retry later",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    }
    let n = s.next_id.fetch_add(1, Ordering::Relaxed);
    let reply = Reply {
        kind,
        id: match kind {
            Kind::Chat => format!("chatcmpl-{}-{n}", s.started),
            Kind::Text => format!("cmpl-{}-{n}", s.started),
        },
        created: now(),
        model: model.unwrap_or_else(|| s.model_id.clone()),
    };
    // Headers wait for the prompt: a prompt that does not fit is a 400.
    match rx.recv().await {
        Some(Event::Started { .. }) => {}
        Some(Event::Failed(f)) => return failure(f),
        _ => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the engine dropped the request",
            )
        }
    }
    if stream {
        stream_reply(reply, rx, include_usage).into_response()
    } else {
        collect_reply(reply, rx).await
    }
}

fn failure(f: Failure) -> Response {
    match f {
        Failure::BadRequest(m) => error(StatusCode::BAD_REQUEST, m),
        Failure::Internal(m) => error(StatusCode::INTERNAL_SERVER_ERROR, m),
    }
}

/// An answer being assembled (non-streamed).
#[derive(Default)]
struct Assembled {
    reasoning: String,
    content: String,
    calls: Vec<Value>,
}

fn call_id(reply: &Reply, index: usize) -> String {
    format!(
        "call_{}_{index}",
        reply.id.rsplit('-').next().unwrap_or("0")
    )
}

async fn collect_reply(reply: Reply, mut rx: mpsc::UnboundedReceiver<Event>) -> Response {
    let mut a = Assembled::default();
    let summary = loop {
        match rx.recv().await {
            Some(Event::Deltas(ds)) => {
                for d in ds {
                    match d {
                        Delta::Reasoning(t) => a.reasoning.push_str(&t),
                        Delta::Content(t) => a.content.push_str(&t),
                        Delta::ToolCall(c) => a.calls.push(json!({
                            "id": call_id(&reply, c.index), "type": "function",
                            "function": {"name": c.name, "arguments": c.arguments}})),
                    }
                }
            }
            Some(Event::Done(s)) => break s,
            Some(Event::Failed(f)) => return failure(f),
            Some(Event::Started { .. }) => {}
            None => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the engine dropped the request",
                )
            }
        }
    };
    let choice = match reply.kind {
        Kind::Chat => {
            let mut message = json!({"role": "assistant",
                "content": if a.content.is_empty() && !a.calls.is_empty() { Value::Null } else { Value::String(a.content) }});
            if !a.reasoning.is_empty() {
                message["reasoning_content"] = Value::String(a.reasoning);
            }
            if !a.calls.is_empty() {
                message["tool_calls"] = Value::Array(a.calls);
            }
            json!({"index": 0, "message": message, "logprobs": null, "finish_reason": summary.finish.as_str()})
        }
        Kind::Text => {
            json!({"index": 0, "text": a.content, "logprobs": null, "finish_reason": summary.finish.as_str()})
        }
    };
    let mut body = reply.wrap(json!([choice]), false);
    body["usage"] = usage(&summary);
    body["timings"] = timings(&summary);
    Json(body).into_response()
}

/// The streamed chunks of one delta.
fn delta_chunks(reply: &Reply, d: Delta) -> Vec<Value> {
    let choice = |delta: Value| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": null}]);
    match (reply.kind, d) {
        (Kind::Text, Delta::Content(t)) => {
            vec![reply.wrap(
                json!([{"index": 0, "text": t, "logprobs": null, "finish_reason": null}]),
                true,
            )]
        }
        (Kind::Text, _) => Vec::new(),
        (Kind::Chat, Delta::Reasoning(t)) => {
            vec![reply.wrap(choice(json!({"reasoning_content": t})), true)]
        }
        (Kind::Chat, Delta::Content(t)) => vec![reply.wrap(choice(json!({"content": t})), true)],
        // The call's id and name first, then its arguments as a delta, as
        // OpenAI streams them.
        (Kind::Chat, Delta::ToolCall(c)) => vec![
            reply.wrap(
                choice(
                    json!({"tool_calls": [{"index": c.index, "id": call_id(reply, c.index),
                "type": "function", "function": {"name": c.name, "arguments": ""}}]}),
                ),
                true,
            ),
            reply.wrap(
                choice(json!({"tool_calls": [{"index": c.index,
                "function": {"arguments": c.arguments}}]})),
                true,
            ),
        ],
    }
}

fn sse(v: &Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(v.to_string()))
}

/// Server-sent events: a first chunk with the role, one chunk per delta,
/// a last chunk with `finish_reason` and `timings`, the usage chunk when
/// asked for, then `[DONE]`. Dropping the stream (the client went away)
/// drops the receiver, which stops the job before its next token.
fn stream_reply(
    reply: Reply,
    rx: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let first = match reply.kind {
        Kind::Chat => vec![reply.wrap(
            json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
            true,
        )],
        Kind::Text => Vec::new(),
    };
    let head = stream::iter(first.iter().map(sse).collect::<Vec<_>>());
    let reply = Arc::new(reply);
    let body = stream::unfold(Some(rx), move |rx| {
        let reply = reply.clone();
        async move {
            let mut rx = rx?;
            loop {
                let events: Vec<Result<SseEvent, Infallible>> = match rx.recv().await {
                    Some(Event::Deltas(ds)) => ds
                        .into_iter()
                        .flat_map(|d| delta_chunks(&reply, d))
                        .map(|v| sse(&v))
                        .collect(),
                    Some(Event::Done(s)) => {
                        let mut last = match reply.kind {
                            Kind::Chat => reply.wrap(
                                json!([{"index": 0, "delta": {}, "logprobs": null,
                                "finish_reason": s.finish.as_str()}]),
                                true,
                            ),
                            Kind::Text => reply.wrap(
                                json!([{"index": 0, "text": "", "logprobs": null,
                                "finish_reason": s.finish.as_str()}]),
                                true,
                            ),
                        };
                        last["timings"] = timings(&s);
                        let mut out = vec![sse(&last)];
                        if include_usage {
                            let mut u = reply.wrap(json!([]), true);
                            u["usage"] = usage(&s);
                            out.push(sse(&u));
                        }
                        out.push(Ok(SseEvent::default().data("[DONE]")));
                        return Some((stream::iter(out), None));
                    }
                    Some(Event::Failed(f)) => {
                        let msg = match f {
                            Failure::BadRequest(m) | Failure::Internal(m) => m,
                        };
                        let e =
                            json!({"error": {"message": msg, "type": "server_error", "code": 500}});
                        return Some((stream::iter(vec![sse(&e)]), None));
                    }
                    Some(Event::Started { .. }) => continue,
                    None => return None,
                };
                if !events.is_empty() {
                    return Some((stream::iter(events), Some(rx)));
                }
            }
        }
    })
    .flatten();
    Sse::new(head.chain(body))
}

/// Loaded-model defaults become visible to handlers.
pub fn set_defaults(s: &AppState, d: Defaults) {
    *s.defaults.lock().unwrap_or_else(|e| e.into_inner()) = Some(d);
}

/// Seconds since the epoch (the `created` of `/v1/models`).
pub fn unix_now() -> u64 {
    now()
}
