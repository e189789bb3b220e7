//! A real HTTP hub server on 127.0.0.1 for the fetch tests: it serves the
//! Hugging Face API JSON (`/api/models/{repo}/revision/{rev}`,
//! `/api/models/{repo}/tree/{rev}`), `/{repo}/resolve/{rev}/{path}` (LFS
//! files redirect to a `/cdn/` URL with `X-Linked-Etag`, `X-Repo-Commit`,
//! `X-Linked-Size`, as huggingface.co does), HTTP Range (`bytes=A-` and
//! `bytes=A-B`) with `ETag` and `If-Range` (a validator that does not match
//! gets the whole file with `200`, as RFC 9110 says), and injects faults: a
//! connection dropped after N bytes, a corrupted byte (always or for N
//! replies), 500s, a server that ignores Range, a stall, stale content under
//! another ETag for N replies, 401 for a gated repo, 404 for a missing
//! revision or file, a byte corrupted only in replies that carry a given
//! offset. Every repo's files are also served as plain static files at
//! `/static/OWNER/NAME/PATH` (Range, no redirects, no API), as any static
//! HTTP server would serve a published cache.
//!
//! Plain `std::net` and one thread per connection; every reply closes its
//! connection.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// One file of a fixture repo.
#[derive(Clone, Debug)]
pub struct HubFile {
    /// Path in the repo.
    pub path: String,
    /// Content.
    pub data: Vec<u8>,
    /// Served as an LFS file (sha256 etag, CDN redirect).
    pub lfs: bool,
}

impl HubFile {
    /// sha256 hex of the content.
    pub fn sha256(&self) -> String {
        sha256_hex(&self.data)
    }

    /// The git blob id the tree API gives: of the content for regular
    /// files, of the LFS pointer for LFS files.
    pub fn git_oid(&self) -> String {
        Digests::of(self).oid
    }
}

/// A file's hashes, as the hub states them.
#[derive(Clone, Debug)]
struct Digests {
    sha256: String,
    /// The tree API's `oid`: git blob id of the content, or of the LFS
    /// pointer for LFS files.
    oid: String,
    /// The `ETag` of the bytes: sha256 for LFS files, else the git blob id.
    etag: String,
}

impl Digests {
    fn of(f: &HubFile) -> Digests {
        Digests::of_data(&f.data, f.lfs)
    }
    fn of_data(data: &[u8], lfs: bool) -> Digests {
        let sha256 = sha256_hex(data);
        if lfs {
            let pointer = format!(
                "version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {}\n",
                data.len()
            );
            Digests {
                oid: git_blob_id(pointer.as_bytes()),
                etag: sha256.clone(),
                sha256,
            }
        } else {
            let oid = git_blob_id(data);
            Digests {
                etag: oid.clone(),
                oid,
                sha256,
            }
        }
    }
}

/// The digests of `repo`'s file `f`, computed once per server (its files
/// never change).
fn digests(st: &Arc<Mutex<State>>, repo: &str, f: &HubFile) -> Digests {
    let key = (repo.to_string(), f.path.clone());
    if let Some(d) = st.lock().unwrap().memo.get(&key) {
        return d.clone();
    }
    let d = Digests::of(f);
    st.lock().unwrap().memo.insert(key, d.clone());
    d
}

/// sha256 hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(data))
}

/// Git's blob id: sha1 of `blob <len>\0<content>`.
pub fn git_blob_id(data: &[u8]) -> String {
    use sha1::{Digest, Sha1};
    let mut h = Sha1::new();
    h.update(format!("blob {}\0", data.len()).as_bytes());
    h.update(data);
    format!("{:x}", h.finalize())
}

/// A fixture repo.
#[derive(Clone, Debug)]
pub struct Repo {
    /// `OWNER/NAME`.
    pub name: String,
    /// The commit every revision points to.
    pub commit: String,
    /// Branch and tag names that resolve to `commit`.
    pub revisions: Vec<String>,
    /// Files.
    pub files: Vec<HubFile>,
    /// When set, requests need `Authorization: Bearer <token>` (else 401).
    pub token: Option<String>,
}

/// Faults, by file path.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Drop the connection after this many body bytes, for this many replies.
    pub drop_after: HashMap<String, (u64, usize)>,
    /// Flip one byte in the middle of the file in every reply.
    pub corrupt: Vec<String>,
    /// Flip the byte in the middle of the file in this many replies.
    pub corrupt_replies: HashMap<String, usize>,
    /// Serve this other content (under its own ETag) for this many replies.
    pub stale: HashMap<String, (Vec<u8>, usize)>,
    /// The Nth reply from now (1 = the next) sends its headers, then hangs
    /// for this many milliseconds and closes.
    pub stall_nth: HashMap<String, (usize, u64)>,
    /// Reply 500 to this many requests for the file's bytes first.
    pub fail_500: HashMap<String, usize>,
    /// Reply 200 with the whole file to Range requests.
    pub ignore_range: Vec<String>,
    /// Honour Range even when If-Range does not match (a broken server).
    pub ignore_if_range: Vec<String>,
    /// After this many body bytes, stall for this many milliseconds (then
    /// close), for this many replies.
    pub stall_after: HashMap<String, (u64, u64, usize)>,
    /// List the file in the tree with this size instead of its real one
    /// (a hub that lies about sizes).
    pub listed_size: HashMap<String, u64>,
    /// Flip the byte at this offset in this many replies whose range
    /// carries it (other replies are untouched and not counted).
    pub corrupt_at: HashMap<String, (u64, usize)>,
}

/// One reply with file bytes.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The file.
    pub path: String,
    /// The request's Range header.
    pub range: Option<String>,
    /// The request's If-Range header.
    pub if_range: Option<String>,
    /// The status sent.
    pub status: u16,
    /// The ETag sent.
    pub etag: String,
    /// Body bytes sent.
    pub sent: u64,
}

/// One request the server saw.
#[derive(Clone, Debug)]
pub struct Seen {
    /// The request path (with query).
    pub path: String,
    /// Its Range header.
    pub range: Option<String>,
    /// Its Authorization header.
    pub auth: Option<String>,
}

#[derive(Default)]
struct State {
    repos: Arc<Vec<Repo>>,
    faults: Faults,
    seen: Vec<Seen>,
    served: HashMap<String, u64>,
    replies: Vec<Reply>,
    memo: HashMap<(String, String), Digests>,
}

/// The running server.
pub struct HubServer {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    state: Arc<Mutex<State>>,
}

/// A valid small safetensors file of `n` pseudo-random bytes (one U8 tensor).
pub fn safetensors_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut h = format!("{{\"w\":{{\"dtype\":\"U8\",\"shape\":[{n}],\"data_offsets\":[0,{n}]}}}}")
        .into_bytes();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push((x >> 24) as u8);
    }
    out
}

impl HubServer {
    /// Starts serving `repos` on a free port.
    pub fn start(repos: Vec<Repo>) -> HubServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State {
            repos: Arc::new(repos),
            ..Default::default()
        }));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = handle(conn, &st);
                });
            }
        });
        HubServer { url, state }
    }

    /// Changes the faults.
    pub fn faults(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.state.lock().unwrap().faults);
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Range headers of requests for a file's bytes.
    pub fn ranges(&self, path: &str) -> Vec<String> {
        self.seen()
            .into_iter()
            .filter(|s| {
                s.path.contains("/cdn/")
                    || s.path.contains("/resolve/")
                    || s.path.contains("/static/")
            })
            .filter(|s| s.path.split('?').next().unwrap_or("").ends_with(path))
            .filter_map(|s| s.range)
            .collect()
    }

    /// Replies with bytes of a file so far.
    pub fn replies(&self, path: &str) -> Vec<Reply> {
        let s = self.state.lock().unwrap();
        s.replies
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Body bytes sent for a file so far.
    pub fn bytes_served(&self, path: &str) -> u64 {
        *self.state.lock().unwrap().served.get(path).unwrap_or(&0)
    }

    /// Requests for file bytes (resolve, CDN or static) so far.
    pub fn file_requests(&self) -> usize {
        self.seen()
            .iter()
            .filter(|s| {
                s.path.contains("/cdn/")
                    || s.path.contains("/resolve/")
                    || s.path.contains("/static/")
            })
            .count()
    }
}

fn respond(
    s: &mut TcpStream,
    status: u16,
    reason: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} {reason}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    s.flush()
}

fn json_reply(s: &mut TcpStream, status: u16, v: serde_json::Value) -> std::io::Result<()> {
    respond(
        s,
        status,
        if status == 200 { "OK" } else { "Error" },
        &[("Content-Type", "application/json".into())],
        v.to_string().as_bytes(),
    )
}

fn handle(mut conn: TcpStream, st: &Arc<Mutex<State>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut range = None;
    let mut if_range = None;
    let mut auth = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "range" => range = Some(v.trim().to_string()),
                "if-range" => if_range = Some(v.trim().to_string()),
                "authorization" => auth = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    let _ = reader.by_ref().take(0).read_to_end(&mut Vec::new());
    if method != "GET" {
        return respond(&mut conn, 405, "Method Not Allowed", &[], b"");
    }
    let target = target.to_string();
    let repos = {
        let mut s = st.lock().unwrap();
        s.seen.push(Seen {
            path: target.clone(),
            range: range.clone(),
            auth: auth.clone(),
        });
        s.repos.clone()
    };
    let path = target.split('?').next().unwrap_or("").to_string();
    let find_repo = |name: &str| repos.iter().find(|r| r.name == name);
    let authorized = |r: &Repo| match &r.token {
        None => true,
        Some(t) => auth.as_deref() == Some(&format!("Bearer {t}")),
    };
    let rev_ok = |r: &Repo, rev: &str| rev == r.commit || r.revisions.iter().any(|x| x == rev);

    if let Some(rest) = path.strip_prefix("/api/models/") {
        // OWNER/NAME/(revision|tree)/REV
        let segs: Vec<&str> = rest.splitn(4, '/').collect();
        if segs.len() < 4 {
            return json_reply(&mut conn, 404, serde_json::json!({"error": "not found"}));
        }
        let name = format!("{}/{}", segs[0], segs[1]);
        let Some(repo) = find_repo(&name) else {
            return json_reply(
                &mut conn,
                401,
                serde_json::json!({"error": "Repository not found"}),
            );
        };
        if !authorized(repo) {
            return json_reply(
                &mut conn,
                401,
                serde_json::json!({"error": "Access to this model is restricted"}),
            );
        }
        let rev = segs[3].replace("%2F", "/");
        if !rev_ok(repo, &rev) {
            return json_reply(
                &mut conn,
                404,
                serde_json::json!({"error": format!("Invalid rev id: {rev}")}),
            );
        }
        return match segs[2] {
            "revision" => json_reply(
                &mut conn,
                200,
                serde_json::json!({
                    "id": repo.name, "sha": repo.commit,
                    "siblings": repo.files.iter().map(|f| serde_json::json!({"rfilename": f.path})).collect::<Vec<_>>(),
                }),
            ),
            "tree" => {
                let listed = st.lock().unwrap().faults.listed_size.clone();
                let entries: Vec<serde_json::Value> = repo
                    .files
                    .iter()
                    .map(|f| {
                        let size = listed.get(&f.path).copied().unwrap_or(f.data.len() as u64);
                        let mut e = serde_json::json!({
                            "type": "file", "oid": digests(st, &repo.name, f).oid, "size": size, "path": f.path,
                        });
                        if f.lfs {
                            e["lfs"] = serde_json::json!({"oid": digests(st, &repo.name, f).sha256, "size": size, "pointerSize": 134});
                        }
                        e
                    })
                    .collect();
                json_reply(&mut conn, 200, serde_json::Value::Array(entries))
            }
            _ => json_reply(&mut conn, 404, serde_json::json!({"error": "not found"})),
        };
    }

    if let Some(rest) = path.strip_prefix("/static/") {
        // OWNER/NAME/PATH, no API, no auth: a plain static server.
        let segs: Vec<&str> = rest.splitn(3, '/').collect();
        let name = format!("{}/{}", segs[0], segs.get(1).unwrap_or(&""));
        let file = segs.get(2).copied().unwrap_or("");
        let Some(f) = find_repo(&name).and_then(|r| r.files.iter().find(|f| f.path == file)) else {
            return respond(&mut conn, 404, "Not Found", &[], b"");
        };
        return serve_bytes(
            &mut conn,
            st,
            &name,
            f,
            range.as_deref(),
            if_range.as_deref(),
            &[],
        );
    }

    if let Some(rest) = path.strip_prefix("/cdn/") {
        // OWNER/NAME/PATH
        let segs: Vec<&str> = rest.splitn(3, '/').collect();
        let name = format!("{}/{}", segs[0], segs.get(1).unwrap_or(&""));
        let file = segs.get(2).copied().unwrap_or("");
        let Some(f) = find_repo(&name).and_then(|r| r.files.iter().find(|f| f.path == file)) else {
            return respond(&mut conn, 404, "Not Found", &[], b"");
        };
        return serve_bytes(
            &mut conn,
            st,
            &name,
            f,
            range.as_deref(),
            if_range.as_deref(),
            &[],
        );
    }

    // /OWNER/NAME/resolve/REV/PATH
    let segs: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    if segs.len() == 5 && segs[2] == "resolve" {
        let name = format!("{}/{}", segs[0], segs[1]);
        let Some(repo) = find_repo(&name) else {
            return respond(&mut conn, 401, "Unauthorized", &[], b"Repository not found");
        };
        if !authorized(repo) {
            return respond(&mut conn, 401, "Unauthorized", &[], b"restricted");
        }
        if !rev_ok(repo, segs[3]) {
            return respond(
                &mut conn,
                404,
                "Not Found",
                &[("X-Error-Code", "RevisionNotFound".into())],
                b"",
            );
        }
        let file = segs[4].replace("%20", " ");
        let Some(f) = repo.files.iter().find(|f| f.path == file) else {
            return respond(
                &mut conn,
                404,
                "Not Found",
                &[("X-Error-Code", "EntryNotFound".into())],
                b"",
            );
        };
        let common = [
            ("X-Repo-Commit", repo.commit.clone()),
            ("X-Linked-Size", f.data.len().to_string()),
        ];
        if f.lfs {
            let mut h = common.to_vec();
            let d = digests(st, &repo.name, f);
            h.push(("X-Linked-Etag", format!("\"{}\"", d.sha256)));
            h.push(("ETag", format!("\"{}\"", d.oid)));
            h.push((
                "Location",
                format!("/cdn/{}/{}?signature=abc", repo.name, f.path),
            ));
            return respond(&mut conn, 302, "Found", &h, b"");
        }
        return serve_bytes(
            &mut conn,
            st,
            &repo.name,
            f,
            range.as_deref(),
            if_range.as_deref(),
            &common,
        );
    }
    respond(&mut conn, 404, "Not Found", &[], b"")
}

fn serve_bytes(
    conn: &mut TcpStream,
    st: &Arc<Mutex<State>>,
    repo: &str,
    f: &HubFile,
    range: Option<&str>,
    if_range: Option<&str>,
    extra: &[(&str, String)],
) -> std::io::Result<()> {
    let (fail, drop_at, corrupt, ignore_range, stall, stale, hang, ignore_if_range) = {
        let mut s = st.lock().unwrap();
        let fail = match s.faults.fail_500.get_mut(&f.path) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        };
        let drop_at = match s.faults.drop_after.get_mut(&f.path) {
            Some((at, n)) if *n > 0 && !fail => {
                *n -= 1;
                Some(*at)
            }
            _ => None,
        };
        let stall = match s.faults.stall_after.get_mut(&f.path) {
            Some((at, ms, n)) if *n > 0 && !fail && drop_at.is_none() => {
                *n -= 1;
                Some((*at, *ms))
            }
            _ => None,
        };
        let mut corrupt = s.faults.corrupt.contains(&f.path);
        if let Some(n) = s.faults.corrupt_replies.get_mut(&f.path) {
            if *n > 0 && !fail {
                *n -= 1;
                corrupt = true;
            }
        }
        let stale = match s.faults.stale.get_mut(&f.path) {
            Some((data, n)) if *n > 0 && !fail => {
                *n -= 1;
                Some(data.clone())
            }
            _ => None,
        };
        let hang = match s.faults.stall_nth.get_mut(&f.path) {
            Some((k, ms)) if !fail => {
                *k -= 1;
                let ms = *ms;
                if *k == 0 {
                    s.faults.stall_nth.remove(&f.path);
                    Some(ms)
                } else {
                    None
                }
            }
            _ => None,
        };
        (
            fail,
            drop_at,
            corrupt,
            s.faults.ignore_range.contains(&f.path),
            stall,
            stale,
            hang,
            s.faults.ignore_if_range.contains(&f.path),
        )
    };
    if fail {
        return respond(conn, 500, "Internal Server Error", extra, b"try again");
    }
    // The validator names the content; a corrupted byte is a transmission
    // fault and does not change it.
    let (mut data, etag) = match stale {
        Some(d) => {
            let e = Digests::of_data(&d, f.lfs).etag;
            (std::borrow::Cow::Owned(d), e)
        }
        None => (
            std::borrow::Cow::Borrowed(&f.data),
            digests(st, repo, f).etag,
        ),
    };
    let etag = format!("\"{etag}\"");
    if corrupt {
        let mid = data.len() / 2;
        data.to_mut()[mid] ^= 0x5a;
    }
    let len = data.len() as u64;
    // Range applies only when If-Range (if any) matches the current ETag.
    let parsed = range
        .filter(|_| !ignore_range)
        .filter(|_| ignore_if_range || if_range.is_none_or(|v| v == etag))
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| {
            let a = a.parse::<u64>().ok()?;
            let b = if b.is_empty() {
                None
            } else {
                Some(b.parse::<u64>().ok()?)
            };
            Some((a, b))
        });
    // A byte flipped only in replies that carry it.
    let span = match parsed {
        Some((s, e)) => (s, e.unwrap_or(u64::MAX)),
        None => (0, u64::MAX),
    };
    {
        let mut s = st.lock().unwrap();
        if let Some((at, n)) = s.faults.corrupt_at.get_mut(&f.path) {
            if *n > 0 && !fail && span.0 <= *at && *at <= span.1 && *at < len {
                *n -= 1;
                data.to_mut()[*at as usize] ^= 0x5a;
            }
        }
    }
    let mut headers: Vec<(&str, String)> = extra.to_vec();
    headers.push(("ETag", etag.clone()));
    let (status, reason, body) = match parsed {
        Some((s, _)) if s >= len => {
            headers.push(("Content-Range", format!("bytes */{len}")));
            return respond(conn, 416, "Range Not Satisfiable", &headers, b"");
        }
        Some((s, e)) => {
            let e = e.unwrap_or(len - 1).min(len - 1);
            headers.push(("Content-Range", format!("bytes {s}-{e}/{len}")));
            (206, "Partial Content", &data[s as usize..=e as usize])
        }
        None => (200, "OK", &data[..]),
    };
    headers.push(("Accept-Ranges", "bytes".into()));
    let mut head = format!("HTTP/1.1 {status} {reason}\r\n");
    for (k, v) in &headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    conn.write_all(head.as_bytes())?;
    let n = match (hang, drop_at, stall) {
        (Some(_), _, _) => 0,
        (None, Some(at), _) | (None, None, Some((at, _))) => (at as usize).min(body.len()),
        _ => body.len(),
    };
    let mut sent = 0;
    for chunk in body[..n].chunks(64 << 10) {
        if conn.write_all(chunk).is_err() {
            break;
        }
        sent += chunk.len();
    }
    {
        let mut s = st.lock().unwrap();
        *s.served.entry(f.path.clone()).or_insert(0) += sent as u64;
        s.replies.push(Reply {
            path: f.path.clone(),
            range: range.map(str::to_string),
            if_range: if_range.map(str::to_string),
            status,
            etag,
            sent: sent as u64,
        });
    }
    conn.flush()?;
    if let Some(ms) = hang.or(stall.map(|(_, ms)| ms)) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    if drop_at.is_some() || stall.is_some() || hang.is_some() {
        let _ = conn.shutdown(Shutdown::Both);
    }
    Ok(())
}
