//! The web chat page of `rh-serve --listen` in a real headless browser:
//! Debian's chromium driven through chromedriver's W3C WebDriver HTTP API,
//! against a real server on 127.0.0.1 running the synthetic tiny model (real
//! Qwen3 tokenizer and template). The test types into the page and clicks
//! like a user, and reads the DOM.
//!
//! Without chromium and chromedriver the test says why and passes, unless
//! CI=true, where it fails: `.ci/run` installs both.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rh_tests::bin;
use serde_json::{json, Value};

/// The synthetic tiny checkpoint, as in tests/serve.rs (same directory name
/// and deterministic content, so either test may write it first).
fn tiny() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| rh_tests::tiny_checkpoint(Path::new(env!("CARGO_TARGET_TMPDIR"))))
}

/// chromium and chromedriver, from /usr/bin (where Debian puts them) or PATH.
fn browser_tools() -> Option<(PathBuf, PathBuf)> {
    let find = |name: &str| -> Option<PathBuf> {
        let usr = Path::new("/usr/bin").join(name);
        if usr.exists() {
            return Some(usr);
        }
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|d| d.join(name))
            .find(|p| p.exists())
    };
    Some((find("chromium")?, find("chromedriver")?))
}

fn in_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build()
}

/// A JSON request; the body of an error status is returned as Err text.
fn request(method: &str, url: &str, body: Option<&Value>) -> Result<Value, String> {
    let req = agent()
        .request(method, url)
        .set("Content-Type", "application/json");
    let res = match body {
        Some(b) => req.send_string(&b.to_string()),
        None => req.call(),
    };
    let text = match res {
        Ok(r) => r.into_string().map_err(|e| format!("{url}: {e}"))?,
        Err(ureq::Error::Status(code, r)) => {
            return Err(format!(
                "{method} {url}: {code}: {}",
                r.into_string().unwrap_or_default()
            ))
        }
        Err(e) => return Err(format!("{method} {url}: {e}")),
    };
    serde_json::from_str(&text).map_err(|e| format!("{url}: {e}: {text}"))
}

/// Waits up to `limit` for `f` to return Some, calling it every 100 ms.
fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `rh-serve --listen 127.0.0.1:0` on the tiny model; killed on drop. Its
/// stderr is collected for failure messages.
struct Server {
    child: Child,
    base: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start() -> Server {
        let mut child = Command::new(bin("rh-serve"))
            .arg(tiny())
            .args(["--listen", "127.0.0.1:0"])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn rh-serve");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("rh-serve: listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut server = Server {
            child,
            base: String::new(),
            log,
        };
        server.base = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(url) => url.trim_end_matches('/').to_string(),
            Err(_) => panic!(
                "rh-serve printed no 'listening on' line; exit {:?}; stderr:\n{}",
                server.child.try_wait().ok().flatten(),
                server.log()
            ),
        };
        let health = format!("{}/health", server.base);
        wait_for(
            "GET /health answers 200",
            Duration::from_secs(120),
            || match agent().get(&health).call() {
                Ok(r) if r.status() == 200 => Some(()),
                _ => None,
            },
        );
        server
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A headless chromium session through chromedriver; both end on drop.
struct Browser {
    driver: Child,
    session: String,
    profile: tempfile::TempDir,
}

impl Browser {
    fn start(chromium: &Path, chromedriver: &Path) -> Browser {
        // A port that was free a moment ago; chromedriver binds it at once.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chromedriver");
        let profile = tempfile::tempdir().unwrap();
        let mut b = Browser {
            driver,
            session: format!("http://127.0.0.1:{port}"),
            profile,
        };
        let status = format!("{}/status", b.session);
        wait_for(
            "chromedriver /status ready",
            Duration::from_secs(30),
            || {
                request("GET", &status, None)
                    .ok()
                    .filter(|v| v["value"]["ready"] == true)
            },
        );
        let caps = json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--window-size=500,900",
                format!("--user-data-dir={}", b.profile.path().display()),
            ],
        }}}});
        let v = request("POST", &format!("{}/session", b.session), Some(&caps))
            .unwrap_or_else(|e| panic!("new WebDriver session: {e}"));
        let id = v["value"]["sessionId"].as_str().expect("sessionId");
        b.session = format!("{}/session/{id}", b.session);
        b
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.session);
        request(method, &url, body.as_ref())
            .unwrap_or_else(|e| panic!("WebDriver: {e}"))
            .get_mut("value")
            .map(Value::take)
            .unwrap_or(Value::Null)
    }

    fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url })));
    }

    fn element(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        // W3C names the element reference by this fixed key.
        v["element-6066-11e4-a52e-4f735466cecf"]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    fn click(&self, css: &str) {
        let e = self.element(css);
        self.call("POST", &format!("/element/{e}/click"), Some(json!({})));
    }

    fn type_into(&self, css: &str, text: &str) {
        let e = self.element(css);
        self.call("POST", &format!("/element/{e}/clear"), Some(json!({})));
        self.call(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        );
    }

    fn js(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if self.session.contains("/session/") {
            let _ = request("DELETE", &self.session, None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// What the page shows: every assistant message and the status line.
const READ_PAGE: &str = r#"
const text = (m, css) => { const e = m.querySelector(css); return e && !e.hidden ? e.textContent : ""; };
return {
  status: document.getElementById("status").textContent,
  users: document.querySelectorAll(".msg.user").length,
  answers: [...document.querySelectorAll(".msg.assistant")].map((m) => ({
    state: m.dataset.state || "",
    content: text(m, ".content"),
    reasoning: m.querySelector("details.reasoning .reasoning-text").textContent,
    reasoningShown: !m.querySelector("details.reasoning").hidden,
    reasoningOpen: m.querySelector("details.reasoning").open,
    stats: text(m, ".stats"),
    error: text(m, ".error"),
  })),
};"#;

/// Sends `message` through the page and waits until the `n`th answer has
/// finished streaming; returns it.
fn chat_turn(b: &Browser, server: &Server, message: &str, n: usize) -> Value {
    b.type_into("#input", message);
    b.click("#send");
    wait_for(
        &format!("answer {n} finished in the DOM"),
        Duration::from_secs(180),
        || {
            let page = b.js(READ_PAGE);
            let status = page["status"].as_str().unwrap_or("");
            assert!(status.is_empty(), "page error: {status}\n{}", server.log());
            let answer = page["answers"].get(n - 1)?;
            match answer["state"].as_str()? {
                "done" => Some(answer.clone()),
                "streaming" => None,
                other => panic!("answer {n} ended as {other}: {page}\n{}", server.log()),
            }
        },
    )
}

fn no_space(s: &str) -> String {
    s.split_whitespace().collect()
}

#[test]
fn chat_page_streams_answers_in_a_headless_browser() {
    let Some((chromium, chromedriver)) = browser_tools() else {
        let why = "chromium or chromedriver not found (apt-get install chromium chromium-driver)";
        assert!(
            !in_ci(),
            "CI=true: {why}; .ci/run should have installed them"
        );
        eprintln!("SKIPPED chat_page_streams_answers_in_a_headless_browser: {why}");
        return;
    };
    let server = Server::start();
    let browser = Browser::start(&chromium, &chromedriver);
    browser.goto(&format!("{}/", server.base));

    // Greedy and short, so the answer can be checked against the API.
    browser.click("#settings-toggle");
    browser.type_into("#temperature", "0");
    browser.type_into("#max-tokens", "12");
    browser.click("#settings-toggle");

    let first = chat_turn(&browser, &server, "Hello", 1);
    let streamed = format!(
        "{}{}",
        first["reasoning"].as_str().unwrap(),
        first["content"].as_str().unwrap()
    );
    assert!(!streamed.trim().is_empty(), "empty answer: {first}");
    // The reasoning is folded away by default, and shown when there is any.
    assert_eq!(first["reasoningOpen"], false, "{first}");
    let has_reasoning = !first["reasoning"].as_str().unwrap().is_empty();
    assert_eq!(first["reasoningShown"], has_reasoning, "{first}");
    let stats = first["stats"].as_str().unwrap();
    for part in ["tokens", "prefill", "decode", "first token"] {
        assert!(stats.contains(part), "stats line lacks {part:?}: {stats:?}");
    }

    // The same request through the API, not streamed: the page showed the
    // model's text, nothing more or less.
    let api = request(
        "POST",
        &format!("{}/v1/chat/completions", server.base),
        Some(&json!({
            "messages": [{"role": "user", "content": "Hello"}],
            "temperature": 0, "max_tokens": 12,
            "chat_template_kwargs": {"enable_thinking": true},
        })),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", server.log()));
    let msg = &api["choices"][0]["message"];
    let want = format!(
        "{}{}",
        msg["reasoning_content"].as_str().unwrap_or(""),
        msg["content"].as_str().unwrap_or("")
    );
    assert_eq!(no_space(&streamed), no_space(&want), "page vs API: {api}");
    let tokens = api["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(
        stats.starts_with(&format!("{tokens} tokens")),
        "{stats:?} vs {api}"
    );

    // A second turn: the conversation goes back to the server, so its prompt
    // is longer than the first one's.
    let second = chat_turn(&browser, &server, "And then?", 2);
    assert!(
        second["stats"].as_str().unwrap().contains("tokens"),
        "{second}"
    );
    let stored = browser.js("return JSON.parse(localStorage.getItem('roundhouse.chat.v1'))");
    let roles: Vec<&str> = stored
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles,
        ["user", "assistant", "user", "assistant"],
        "{stored}"
    );
    let prompt = |i: usize| stored[i]["stats"]["promptTokens"].as_u64().unwrap();
    assert!(
        prompt(3) > prompt(1),
        "second prompt holds the first turn: {stored}"
    );

    // The conversation survives a reload, and "New chat" clears it.
    browser.call("POST", "/refresh", Some(json!({})));
    let page = wait_for(
        "page reloaded with history",
        Duration::from_secs(30),
        || {
            let p = browser.js(READ_PAGE);
            (p["answers"].as_array()?.len() == 2).then_some(p)
        },
    );
    assert_eq!(page["users"], 2, "{page}");
    assert_eq!(page["answers"][1]["content"], second["content"], "{page}");
    browser.click("#new-chat");
    let page = browser.js(READ_PAGE);
    assert_eq!(page["answers"].as_array().unwrap().len(), 0, "{page}");
    assert_eq!(
        browser.js("return localStorage.getItem('roundhouse.chat.v1')"),
        "[]"
    );
}
