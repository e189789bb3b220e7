//! `rh-bench http`: an OpenAI streaming client for `rh-serve --listen`, to
//! take the server's figures reproducibly: decode speed and time to first
//! token as a client sees them, many concurrent clients (every request
//! answered or refused with 503, p50/p99 time to first token, server RSS),
//! a second chat turn with prompt reuse against the same turn without, and
//! (`--arrival`) a long prompt arriving while `--clients` streams decode:
//! how long their tokens stall while it is read.

use std::io::{BufRead, BufReader};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use roundhouse::cli::CliError;
use serde_json::{json, Value};

/// `rh-bench http`.
#[derive(Args, Debug)]
pub struct HttpArgs {
    /// Server address, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    url: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Requests each client sends, one after another.
    #[arg(long, default_value_t = 1)]
    requests: usize,
    /// Tokens to generate per request (the server is asked for exactly
    /// this many: an end token may stop it earlier).
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Words of filler in each prompt (about 1.3 tokens each).
    #[arg(long, default_value_t = 8)]
    prompt_words: usize,
    /// Instead: the prompt-reuse figure. A first turn of about this many
    /// words, then its second turn timed with reuse and without
    /// (alternating, `--requests` times each).
    #[arg(long, value_name = "WORDS")]
    reuse: Option<usize>,
    /// Instead: the arrival figure. `--clients` streams decode (each
    /// `--max-tokens` long); once each has its first tokens, a prompt of
    /// about this many words (~1.3 tokens each; the prompt's token count
    /// is reported) arrives. Reports each stream's worst gap between
    /// chunks while that prompt is read against its median gap before.
    #[arg(long, value_name = "WORDS")]
    arrival: Option<usize>,
    /// Sample the RSS of this process (the server) during the run.
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// Bearer key.
    #[arg(long, env = "RH_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

/// What one streamed request saw.
#[derive(Clone, Debug, Default)]
struct Seen {
    status: u16,
    ttft_s: f64,
    /// Seconds from the first to the last generated token.
    decode_s: f64,
    /// Generated tokens (`usage.completion_tokens`).
    tokens: u64,
    cached: u64,
    prompt: u64,
}

fn filler(words: usize, salt: usize) -> String {
    const W: [&str; 16] = [
        "river", "engine", "copper", "signal", "harbor", "lantern", "meadow", "orbit", "pepper",
        "quartz", "saddle", "timber", "velvet", "walnut", "yonder", "zephyr",
    ];
    (0..words)
        .map(|i| W[(i * 7 + salt * 13 + i / 16) % W.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

/// Why a streamed request gave nothing to measure. (An HTTP error status
/// is an answer: it is counted, not an error.)
#[derive(Debug)]
enum StreamError {
    /// The request could not be sent, or no reply came.
    Request(Box<ureq::Error>),
    /// The reply's stream broke off.
    Read(std::io::Error),
    /// An event that is not JSON.
    Json {
        error: serde_json::Error,
        data: String,
    },
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamError::Request(e) => write!(f, "{e}"),
            StreamError::Read(e) => write!(f, "{e}"),
            StreamError::Json { error, data } => write!(f, "{error}: {data}"),
        }
    }
}

/// Sends one streaming chat request; times the first and last chunks.
fn stream_chat(a: &HttpArgs, messages: &Value, cache: bool) -> Result<(Seen, String), StreamError> {
    let body = json!({"messages": messages, "max_tokens": a.max_tokens, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true}, "cache_prompt": cache});
    let mut req = ureq::post(&format!(
        "{}/v1/chat/completions",
        a.url.trim_end_matches('/')
    ))
    .timeout(Duration::from_secs(3600))
    .set("Content-Type", "application/json");
    if let Some(k) = &a.api_key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let t0 = Instant::now();
    let resp = match req.send_string(&body.to_string()) {
        Ok(r) => r,
        Err(ureq::Error::Status(code, _)) => {
            return Ok((
                Seen {
                    status: code,
                    ..Seen::default()
                },
                String::new(),
            ))
        }
        Err(e) => return Err(StreamError::Request(Box::new(e))),
    };
    let mut seen = Seen {
        status: resp.status(),
        ..Seen::default()
    };
    let mut first: Option<Instant> = None;
    let mut last = t0;
    let mut text = String::new();
    for v in sse_events(resp) {
        let v = v?;
        if let Some(u) = v.get("usage") {
            seen.tokens = u["completion_tokens"].as_u64().unwrap_or(0);
            seen.prompt = u["prompt_tokens"].as_u64().unwrap_or(0);
            seen.cached = u["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0);
        }
        let d = &v["choices"][0]["delta"];
        let piece = d["content"]
            .as_str()
            .or(d["reasoning_content"].as_str())
            .unwrap_or("");
        if !piece.is_empty() {
            let now = Instant::now();
            first.get_or_insert(now);
            last = now;
            if d["content"].is_string() {
                text.push_str(piece);
            }
        }
    }
    let first = first.unwrap_or(last);
    seen.ttft_s = first.duration_since(t0).as_secs_f64();
    seen.decode_s = last.duration_since(first).as_secs_f64();
    Ok((seen, text))
}

fn rss_mib(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Runs the figure the flags ask for and prints it.
pub fn run(a: &HttpArgs) -> Result<(), CliError> {
    if a.clients == 0 || a.requests == 0 || a.max_tokens == 0 {
        return Err(CliError::usage(
            "--clients, --requests and --max-tokens must be at least 1",
        ));
    }
    match (a.reuse, a.arrival) {
        (Some(_), Some(_)) => Err(CliError::usage(
            "--reuse and --arrival are separate figures: give one",
        )),
        (Some(words), None) => reuse(a, words),
        (None, Some(words)) => arrival(a, words),
        (None, None) => load(a),
    }
}

/// A streamed request's chunk times and usage.
struct Timed {
    status: u16,
    /// When each chunk with text arrived.
    chunks: Vec<Instant>,
    prompt_tokens: u64,
    completion_tokens: u64,
}

/// Streams one chat request, calling `on_chunk(count)` after each chunk
/// with text.
fn stream_timed(
    a: &HttpArgs,
    content: &str,
    max_tokens: usize,
    mut on_chunk: impl FnMut(usize),
) -> Result<Timed, StreamError> {
    let body = json!({"messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens, "temperature": 0, "stream": true,
        "stream_options": {"include_usage": true}, "cache_prompt": false});
    let mut req = ureq::post(&format!(
        "{}/v1/chat/completions",
        a.url.trim_end_matches('/')
    ))
    .timeout(Duration::from_secs(3600))
    .set("Content-Type", "application/json");
    if let Some(k) = &a.api_key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let resp = match req.send_string(&body.to_string()) {
        Ok(r) => r,
        Err(ureq::Error::Status(code, _)) => {
            return Ok(Timed {
                status: code,
                chunks: Vec::new(),
                prompt_tokens: 0,
                completion_tokens: 0,
            })
        }
        Err(e) => return Err(StreamError::Request(Box::new(e))),
    };
    let mut t = Timed {
        status: resp.status(),
        chunks: Vec::new(),
        prompt_tokens: 0,
        completion_tokens: 0,
    };
    for v in sse_events(resp) {
        let v = v?;
        if let Some(u) = v.get("usage") {
            t.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
            t.completion_tokens = u["completion_tokens"].as_u64().unwrap_or(0);
        }
        let d = &v["choices"][0]["delta"];
        let piece = d["content"]
            .as_str()
            .or(d["reasoning_content"].as_str())
            .unwrap_or("");
        if !piece.is_empty() {
            t.chunks.push(Instant::now());
            on_chunk(t.chunks.len());
        }
    }
    Ok(t)
}

/// Seconds between consecutive chunks whose later one falls in `from..to`.
fn gaps(chunks: &[Instant], from: Instant, to: Instant) -> Vec<f64> {
    chunks
        .windows(2)
        .filter(|w| w[1] > from && w[1] <= to)
        .map(|w| w[1].duration_since(w[0]).as_secs_f64())
        .collect()
}

/// Why the arrival figure cannot be taken: the first stream that ended
/// before its first [`arrival`] chunks, as it ended.
fn early_end(
    streams: Vec<std::thread::ScopedJoinHandle<'_, Result<Timed, StreamError>>>,
) -> CliError {
    for (c, h) in streams.into_iter().enumerate() {
        if !h.is_finished() {
            continue;
        }
        let why = match h.join() {
            Ok(Ok(t)) => format!(
                "HTTP {}, {} chunks with text, {} tokens generated",
                t.status,
                t.chunks.len(),
                t.completion_tokens
            ),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "its thread panicked".to_string(),
        };
        return CliError::failure(format!("stream {c} never produced its first chunks: {why}"));
    }
    CliError::failure("a stream never produced its first chunks within an hour")
}

fn arrival(a: &HttpArgs, words: usize) -> Result<(), CliError> {
    // Each stream's first few chunks set the pace before the arrival.
    const WARM_CHUNKS: usize = 6;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let result = std::thread::scope(|s| -> Result<Value, CliError> {
        let streams: Vec<_> = (0..a.clients)
            .map(|c| {
                let tx = tx.clone();
                s.spawn(move || {
                    let content = filler(a.prompt_words, c);
                    stream_timed(a, &content, a.max_tokens, |n| {
                        if n == WARM_CHUNKS {
                            let _ = tx.send(());
                        }
                    })
                })
            })
            .collect();
        // Only the streams hold senders now: a stream that ends (an error, an
        // early stop) before its first chunks disconnects instead of leaving
        // this wait to its hour-long timeout.
        drop(tx);
        for _ in 0..a.clients {
            if rx.recv_timeout(Duration::from_secs(3600)).is_err() {
                return Err(early_end(streams));
            }
        }
        let sent = Instant::now();
        let long = stream_timed(a, &filler(words, 999), 2, |_| {})
            .map_err(|e| CliError::failure(e.to_string()))?;
        if long.status != 200 {
            return Err(CliError::failure(format!(
                "the long prompt: HTTP {}",
                long.status
            )));
        }
        let first = *long.chunks.first().unwrap_or(&Instant::now());
        let mut rows = Vec::new();
        for (c, h) in streams.into_iter().enumerate() {
            let t = h
                .join()
                .map_err(|_| CliError::failure("a stream thread panicked"))?
                .map_err(|e| CliError::failure(e.to_string()))?;
            let Some(&start) = t.chunks.first() else {
                return Err(CliError::failure(format!(
                    "stream {c}: HTTP {} and no chunks",
                    t.status
                )));
            };
            let mut before = gaps(&t.chunks, start, sent);
            before.sort_by(f64::total_cmp);
            let during = gaps(&t.chunks, sent, first);
            let worst = during.iter().cloned().fold(0.0, f64::max);
            let ended_during = t.chunks.last().is_some_and(|&l| l < first);
            rows.push(json!({
                "stream": c, "tokens": t.completion_tokens,
                "median_gap_ms_before": percentile(&before, 0.5) * 1e3,
                "worst_gap_ms_during_prefill": worst * 1e3,
                "chunks_during_prefill": during.len(),
                "ended_before_the_prompt_was_in": ended_during,
            }));
        }
        let worst = rows
            .iter()
            .map(|r| r["worst_gap_ms_during_prefill"].as_f64().unwrap_or(0.0))
            .fold(0.0, f64::max);
        let median_before = {
            let mut v: Vec<f64> = rows
                .iter()
                .map(|r| r["median_gap_ms_before"].as_f64().unwrap_or(0.0))
                .collect();
            v.sort_by(f64::total_cmp);
            percentile(&v, 0.5)
        };
        Ok(json!({
            "streams": a.clients,
            "long_prompt_tokens": long.prompt_tokens,
            "long_prompt_ttft_ms": first.duration_since(sent).as_secs_f64() * 1e3,
            "worst_gap_ms_during_prefill": worst,
            "median_gap_ms_before": median_before,
            "per_stream": rows,
        }))
    })?;
    println!("{result:#}");
    Ok(())
}

fn load(a: &HttpArgs) -> Result<(), CliError> {
    let results = Arc::new(Mutex::new(Vec::<Seen>::new()));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rss_max = Arc::new(Mutex::new((0.0f64, 0.0f64)));
    let sampler = a.server_pid.map(|pid| {
        let (done, rss_max) = (done.clone(), rss_max.clone());
        std::thread::spawn(move || {
            let start = rss_mib(pid).unwrap_or(0.0);
            rss_max.lock().unwrap().0 = start;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(r) = rss_mib(pid) {
                    let mut m = rss_max.lock().unwrap();
                    m.1 = m.1.max(r);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    });
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for c in 0..a.clients {
            let (results, errors) = (results.clone(), errors.clone());
            s.spawn(move || {
                for r in 0..a.requests {
                    let msgs =
                        json!([{"role": "user", "content": filler(a.prompt_words, c * 1000 + r)}]);
                    match stream_chat(a, &msgs, true) {
                        Ok((seen, _)) => results.lock().unwrap().push(seen),
                        Err(e) => errors.lock().unwrap().push(e.to_string()),
                    }
                }
            });
        }
    });
    let wall = t0.elapsed().as_secs_f64();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(h) = sampler {
        let _ = h.join();
    }
    let results = results.lock().unwrap();
    let errors = errors.lock().unwrap();
    let ok: Vec<&Seen> = results.iter().filter(|s| s.status == 200).collect();
    let refused = results.iter().filter(|s| s.status == 503).count();
    let other = results.len() - ok.len() - refused + errors.len();
    let mut ttft: Vec<f64> = ok.iter().map(|s| s.ttft_s * 1e3).collect();
    ttft.sort_by(f64::total_cmp);
    let tokens: u64 = ok.iter().map(|s| s.tokens).sum();
    let decoded: u64 = ok.iter().map(|s| s.tokens.saturating_sub(1)).sum();
    let decode_s: f64 = ok.iter().map(|s| s.decode_s).sum();
    let (rss0, rss1) = *rss_max.lock().unwrap();
    let out = json!({
        "clients": a.clients, "requests": a.clients * a.requests,
        "ok": ok.len(), "refused_503": refused, "other_errors": other,
        "errors": errors.iter().take(5).collect::<Vec<_>>(),
        "ttft_ms_p50": percentile(&ttft, 0.5), "ttft_ms_p99": percentile(&ttft, 0.99),
        "generated_tokens": tokens,
        "client_decode_tokens_per_s": if decode_s > 0.0 { decoded as f64 / decode_s } else { 0.0 },
        "aggregate_tokens_per_s": tokens as f64 / wall,
        "wall_s": wall,
        "server_rss_mib_start": rss0, "server_rss_mib_max": rss1,
    });
    println!("{out:#}");
    Ok(())
}

fn reuse(a: &HttpArgs, words: usize) -> Result<(), CliError> {
    let mut with = Vec::new();
    let mut without = Vec::new();
    for r in 0..a.requests {
        // A new conversation each round, so no earlier round is reused.
        let first = json!([{"role": "user", "content": format!("{r}: {}", filler(words, r))}]);
        let (s1, reply) =
            stream_chat(a, &first, true).map_err(|e| CliError::failure(e.to_string()))?;
        if s1.status != 200 {
            return Err(CliError::failure(format!("first turn: HTTP {}", s1.status)));
        }
        let mut second = first.as_array().cloned().unwrap_or_default();
        second.push(json!({"role": "assistant", "content": reply}));
        second.push(json!({"role": "user", "content": "Now summarise that in one line."}));
        let second = Value::Array(second);
        // Alternate the order so neither always runs second.
        let order = if r % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for cache in order {
            let (s, _) =
                stream_chat(a, &second, cache).map_err(|e| CliError::failure(e.to_string()))?;
            let row = json!({"ttft_ms": s.ttft_s * 1e3, "prompt_tokens": s.prompt, "cached_tokens": s.cached});
            if cache {
                with.push(row);
            } else {
                without.push(row);
            }
        }
    }
    let mean = |v: &[Value]| {
        v.iter()
            .map(|r| r["ttft_ms"].as_f64().unwrap_or(0.0))
            .sum::<f64>()
            / v.len() as f64
    };
    let out = json!({"second_turn_with_reuse": with, "second_turn_without_reuse": without,
        "ttft_ms_mean_with": mean(&with), "ttft_ms_mean_without": mean(&without),
        "speedup": mean(&without) / mean(&with)});
    println!("{out:#}");
    Ok(())
}

/// The JSON events of a streamed (server-sent events) answer, up to its
/// `[DONE]`; a read or parse failure is the last item.
fn sse_events(resp: ureq::Response) -> impl Iterator<Item = Result<Value, StreamError>> {
    let mut lines = BufReader::new(resp.into_reader()).lines();
    std::iter::from_fn(move || loop {
        let line = match lines.next()? {
            Ok(l) => l,
            Err(e) => return Some(Err(StreamError::Read(e))),
        };
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            return None;
        }
        return Some(
            serde_json::from_str(data).map_err(|error| StreamError::Json {
                error,
                data: data.to_string(),
            }),
        );
    })
}
