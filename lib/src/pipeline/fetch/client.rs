//! The HTTP client under every remote source: one GET with redirects
//! followed by hand (the token only goes to the hub's own origin), Range and
//! If-Range, retries with backoff on transient failures, failures mapped to
//! one-line [`FetchError`]s, and typed JSON replies.

use std::io::Read;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::{FetchError, FetchOptions};

/// How a request failed.
pub(crate) enum Fail {
    /// An HTTP status (with a short body excerpt).
    Status(u16, String, Option<Duration>),
    /// The connection failed or broke.
    Transport(String),
    /// The remote file is not the one the `.part` holds bytes of (its
    /// validator changed): the file must start over.
    Changed(String),
    /// The bytes `[start, at)` asked again before the resume point differ
    /// from the `.part`'s.
    Overlap {
        /// First byte compared.
        start: u64,
        /// The resume point.
        at: u64,
    },
}

impl Fail {
    /// How long to wait before retry number `attempt`: the server's
    /// Retry-After when it sent one, else exponential backoff.
    pub(crate) fn wait(&self, attempt: u32) -> Duration {
        match self {
            Fail::Status(_, _, Some(d)) => *d,
            _ => backoff(attempt),
        }
    }
    pub(crate) fn retryable(&self) -> bool {
        match self {
            Fail::Status(s, _, _) => *s >= 500 || *s == 429 || *s == 408,
            Fail::Transport(_) | Fail::Changed(_) | Fail::Overlap { .. } => true,
        }
    }
    pub(crate) fn describe(&self) -> String {
        match self {
            Fail::Status(s, body, _) if body.is_empty() => format!("HTTP {s}"),
            Fail::Status(s, body, _) => format!("HTTP {s}: {body}"),
            Fail::Transport(t) | Fail::Changed(t) => t.clone(),
            Fail::Overlap { start, at } => {
                format!("bytes {start}-{} differ from the server's", at - 1)
            }
        }
    }
}

/// A small hub client.
pub struct HubClient {
    agent: ureq::Agent,
    /// The hub base URL, without a trailing slash.
    pub endpoint: String,
    token: Option<String>,
    /// Retries of a failing request.
    pub(crate) retries: u32,
}

pub(crate) fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

pub(crate) fn clean_etag(s: &str) -> String {
    s.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

/// `Location` resolved against the URL it came from.
pub(crate) fn join_location(base: &str, loc: &str) -> String {
    if loc.starts_with("http://") || loc.starts_with("https://") {
        return loc.to_string();
    }
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_end = base[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(base.len());
    if loc.starts_with('/') {
        format!("{}{loc}", &base[..host_end])
    } else {
        let dir_end = base
            .rfind('/')
            .filter(|&i| i >= host_end)
            .unwrap_or(host_end);
        format!("{}/{loc}", &base[..dir_end])
    }
}

pub(crate) fn origin(url: &str) -> &str {
    let scheme_end = url.find("://").map(|i| i + 3).unwrap_or(0);
    let end = url[scheme_end..]
        .find('/')
        .map(|i| i + scheme_end)
        .unwrap_or(url.len());
    &url[..end]
}

/// Percent-encodes a path segment list (keeps `/`).
pub(crate) fn encode_path(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for b in p.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(crate) fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((250u64 << attempt.min(6)).min(15_000))
}

impl HubClient {
    /// A client for `opts.endpoint` with its token, timeouts and retries.
    pub fn new(opts: &FetchOptions) -> HubClient {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(20))
            .timeout_read(opts.read_timeout)
            .redirects(0)
            .user_agent(concat!("roundhouse/", env!("CARGO_PKG_VERSION")))
            .build();
        HubClient {
            agent,
            endpoint: opts.endpoint.trim_end_matches('/').to_string(),
            token: opts.token.clone(),
            retries: opts.retries,
        }
    }

    /// One GET, following redirects by hand (the token only goes to the
    /// hub's own origin). `range` asks for bytes `start..=end` (`end` `None`:
    /// to the end of the file); `if_range` is sent with it. Returns the final
    /// response and the headers of the first one (where the hub puts
    /// `X-Linked-Etag` and `X-Repo-Commit`).
    pub(crate) fn get(
        &self,
        url: &str,
        range: Option<(u64, Option<u64>)>,
        if_range: Option<&str>,
    ) -> Result<(ureq::Response, Vec<(String, String)>), Fail> {
        let hub_origin = origin(&self.endpoint).to_string();
        let mut url = url.to_string();
        let mut first: Option<Vec<(String, String)>> = None;
        for _ in 0..8 {
            let mut req = self.agent.get(&url).set("Accept-Encoding", "identity");
            if let Some((start, end)) = range {
                let end = end.map(|e| e.to_string()).unwrap_or_default();
                req = req.set("Range", &format!("bytes={start}-{end}"));
                if let Some(v) = if_range {
                    req = req.set("If-Range", v);
                }
            }
            if let Some(t) = &self.token {
                if origin(&url) == hub_origin {
                    req = req.set("Authorization", &format!("Bearer {t}"));
                }
            }
            let resp = match req.call() {
                Ok(r) => r,
                Err(ureq::Error::Status(code, r)) => {
                    let retry_after = r
                        .header("Retry-After")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(|s| Duration::from_secs(s.min(60)));
                    let mut body = String::new();
                    let _ = r.into_reader().take(300).read_to_string(&mut body);
                    let body: String = body.chars().filter(|c| !c.is_control()).take(160).collect();
                    return Err(Fail::Status(code, body, retry_after));
                }
                Err(ureq::Error::Transport(t)) => return Err(Fail::Transport(t.to_string())),
            };
            if first.is_none() {
                first = Some(
                    resp.headers_names()
                        .into_iter()
                        .filter_map(|n| {
                            resp.header(&n)
                                .map(|v| (n.to_ascii_lowercase(), v.to_string()))
                        })
                        .collect(),
                );
            }
            if (300..400).contains(&resp.status()) {
                let loc = resp.header("Location").ok_or_else(|| {
                    Fail::Transport(format!("HTTP {} without a Location header", resp.status()))
                })?;
                url = join_location(&url, loc);
                continue;
            }
            return Ok((resp, first.unwrap_or_default()));
        }
        Err(Fail::Transport("too many redirects".into()))
    }

    /// GET with retries on transient failures, mapping final failures.
    pub(crate) fn get_retrying(
        &self,
        url: &str,
        what: &str,
        repo: &str,
    ) -> Result<(ureq::Response, Vec<(String, String)>), FetchError> {
        let mut attempt = 0;
        loop {
            match self.get(url, None, None) {
                Ok(r) => return Ok(r),
                Err(f) if f.retryable() && attempt < self.retries => {
                    let wait = f.wait(attempt);
                    tracing::warn!("{what}: {}; retrying in {wait:?}", f.describe());
                    std::thread::sleep(wait);
                    attempt += 1;
                }
                Err(f) => return Err(self.map_fail(f, url, what, repo, attempt)),
            }
        }
    }

    pub(crate) fn map_fail(
        &self,
        f: Fail,
        url: &str,
        what: &str,
        repo: &str,
        attempts: u32,
    ) -> FetchError {
        match f {
            Fail::Status(s @ (401 | 403), _, _) => FetchError::Auth {
                repo: repo.to_string(),
                status: s,
                url: url.to_string(),
                hint: if self.token.is_some() {
                    "the token in HF_TOKEN (or the HF token file) was not accepted: check it has access to this repo (gated repos need their licence accepted on the hub)".into()
                } else {
                    "the repo is gated or private: set HF_TOKEN to a token with access (https://huggingface.co/settings/tokens), or log in with `huggingface-cli login`".into()
                },
            },
            Fail::Status(404, _, _) => FetchError::NotFound {
                what: what.to_string(),
                endpoint: self.endpoint.clone(),
            },
            f => FetchError::Http {
                what: what.to_string(),
                reason: if attempts > 0 {
                    format!("{} (after {} retries)", f.describe(), attempts)
                } else {
                    f.describe()
                },
            },
        }
    }

    /// GET `url` (with retries) and parse the reply as `T`; also returns
    /// the `Link` header (pagination). The body is bounded to 256 MiB.
    pub(crate) fn get_json<T: DeserializeOwned>(
        &self,
        url: &str,
        what: &str,
        repo: &str,
    ) -> Result<(T, Option<String>), FetchError> {
        let (resp, _) = self.get_retrying(url, what, repo)?;
        let link = resp.header("Link").map(str::to_string);
        let mut body = Vec::new();
        resp.into_reader()
            .take(256 << 20)
            .read_to_end(&mut body)
            .map_err(|e| FetchError::Http {
                what: what.into(),
                reason: format!("reading the reply: {e}"),
            })?;
        let v = serde_json::from_slice(&body).map_err(|e| FetchError::Http {
            what: what.into(),
            reason: format!("the hub's reply is not the expected JSON ({e}) at {url}"),
        })?;
        Ok((v, link))
    }
}

/// The `rel="next"` URL of a `Link` header.
pub(crate) fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (u, params) = part.split_once(';')?;
        params.contains("rel=\"next\"").then(|| {
            u.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
    })
}

/// The strong validator of a reply, exactly as received (a weak one cannot
/// be used with `If-Range`).
pub(crate) fn strong_etag(resp: &ureq::Response) -> Option<String> {
    resp.header("ETag")
        .map(str::trim)
        .filter(|e| !e.is_empty() && !e.starts_with("W/"))
        .map(str::to_string)
}

/// Reads until `buf` is full or the body ends; returns the bytes read.
pub(crate) fn read_full(r: &mut impl Read, buf: &mut [u8], at: u64) -> Result<usize, Fail> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Fail::Transport(format!(
                    "connection broke at byte {}: {e}",
                    at + got as u64
                )))
            }
        }
    }
    Ok(got)
}

pub(crate) fn is_git_oid(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}
