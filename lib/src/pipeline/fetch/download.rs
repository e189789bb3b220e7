//! One hub file: reused from the output directory or the HF cache when its
//! hash matches, else downloaded into `<file>.part` (resumed, checked,
//! repaired chunk by chunk) and renamed into place.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use sha2::{Digest, Sha256};

use super::api::RemoteFile;
use super::client::{clean_etag, is_git_oid, is_sha256, read_full, strong_etag, Fail};
use super::hub::Ctx;
use super::part::{self, PartMeta, Progress, Repair, OVERLAP};
use super::progress::{bar_warn, short_name, NAME_WIDTH};
use super::{ensure_parent, with_suffix, FetchError};
use crate::fsutil::{self, FsError};

/// sha256 + blake3 of everything in the `.part` so far.
pub(crate) struct Hashes {
    sha: Sha256,
    b3: blake3::Hasher,
    len: u64,
}

impl Hashes {
    fn new() -> Self {
        Hashes {
            sha: Sha256::new(),
            b3: blake3::Hasher::new(),
            len: 0,
        }
    }
    fn update(&mut self, b: &[u8]) {
        self.sha.update(b);
        self.b3.update(b);
        self.len += b.len() as u64;
    }
    /// Hashes an existing file from the start.
    pub(crate) fn of_file(path: &Path, bar: &indicatif::ProgressBar) -> Result<Hashes, FsError> {
        let mut h = Hashes::new();
        crate::fsutil::read_chunks(path, |b| {
            h.update(b);
            bar.inc(b.len() as u64);
        })?;
        Ok(h)
    }
}

/// What downloading one file did.
pub(crate) struct FileResult {
    pub transferred: u64,
    pub reused: bool,
    pub sha256: Option<String>,
    pub size: u64,
}

pub(crate) fn sha256_file(path: &Path) -> Result<String, FsError> {
    let h = Hashes::of_file(path, &ProgressBar::hidden())?;
    Ok(format!("{:x}", h.sha.finalize()))
}

/// Downloads (or reuses) one file.
pub(crate) fn download(ctx: &Ctx, f: &RemoteFile) -> Result<FileResult, FetchError> {
    let final_path = ctx.units.out.join(&f.path);
    let part = with_suffix(&final_path, ".part");
    ensure_parent(&final_path)?;
    if ctx.opts.force {
        let _ = fs::remove_file(&part);
        PartMeta::remove(&part);
    } else if let Some(done) = reuse_existing(ctx, f, &final_path)? {
        // A verified copy is in place: an old partial one is of no use.
        let _ = fs::remove_file(&part);
        PartMeta::remove(&part);
        return Ok(done);
    }
    ctx.units.claim(&f.path)?;
    let fresh = || PartMeta::new(f.sha256.clone(), f.oid.clone(), f.size, ctx.opts.chunk_size);
    let meta = match PartMeta::load(&part) {
        Some(_) if !part.exists() => fresh(),
        Some(mut m) if m.same_file(&f.sha256, &f.oid, f.size) => {
            m.sha256 = m.sha256.or_else(|| f.sha256.clone());
            m.oid = m.oid.or_else(|| f.oid.clone());
            m.size = m.size.or(f.size);
            m
        }
        Some(_) => {
            tracing::warn!(
                "{}: partial download of another version of {}; starting it over",
                part.display(),
                f.path
            );
            let _ = fs::remove_file(&part);
            fresh()
        }
        None => fresh(),
    };
    // What an earlier run learned from the reply headers when the listing
    // had no hashes or sizes.
    let expected_sha = f.sha256.clone().or_else(|| meta.sha256.clone());
    let expected_size = f.size.or(meta.size);
    let mut dl = Dl {
        ctx,
        f,
        label: &f.path,
        url: ctx.client.resolve_url(ctx.repo, ctx.commit, &f.path),
        part,
        final_path,
        meta,
        bar: ctx.bars.file_bar(&f.path, expected_size.unwrap_or(0)),
        expected_sha,
        expected_size,
        transferred: 0,
        counted: 0,
        repaired: None,
        pending: Vec::new(),
    };
    let r = dl.run();
    ctx.bars.remove(&dl.bar);
    r
}

/// One file's download: its `.part`, the record beside it, the bars.
struct Dl<'c, 'a> {
    ctx: &'c Ctx<'a>,
    f: &'c RemoteFile,
    label: &'c str,
    url: String,
    part: PathBuf,
    final_path: PathBuf,
    meta: PartMeta,
    bar: ProgressBar,
    expected_sha: Option<String>,
    expected_size: Option<u64>,
    /// Body bytes received by this run.
    transferred: u64,
    /// Bytes of this file credited to the overall bar.
    counted: u64,
    /// Set by a repair pass, for the final message.
    repaired: Option<Repair>,
    /// Chunks on disk past the recorded ones, recorded once the overlap
    /// check confirms the tail.
    pending: Vec<String>,
}

/// Where one file's download stands. Each state is one phase of
/// [`Dl::run`]; a phase returns the next state.
enum State {
    /// Look at the `.part` on disk (its hashes when already known).
    Inspect(Option<Progress>),
    /// The complete `.part` failed verification: compare it with the
    /// server chunk by chunk.
    Repair(Progress),
    /// Fetch the rest of the file after these bytes.
    Transfer(Progress),
    /// The `.part` is complete: verify it and rename it into place.
    Finish(Progress),
}

/// The retry budget of one file's download (refilled whenever a request
/// made progress).
#[derive(Default)]
struct Retry {
    /// Retries spent since the last progress.
    attempt: u32,
    /// The chunk boundary an overlap mismatch last dropped back to.
    overlap_failed_at: Option<u64>,
}

impl Retry {
    /// Spends one retry, or ends the run with `why` when none is left.
    fn spend(&mut self, dl: &Dl, why: &str) -> Result<(), FetchError> {
        if self.attempt >= dl.ctx.client.retries {
            return Err(dl.gave_up(why));
        }
        self.attempt += 1;
        Ok(())
    }
}

/// How a repair pass ended.
enum Step {
    Done(FileResult),
    /// The remote file changed: download it from the start.
    Restart,
}

impl Dl<'_, '_> {
    /// Credits the overall bar with this file's `len` bytes on disk.
    fn credit(&mut self, len: u64) {
        let bar = &self.ctx.bars.overall;
        if len >= self.counted {
            bar.inc(len - self.counted);
        } else {
            bar.set_position(bar.position().saturating_sub(self.counted - len));
        }
        self.counted = len;
        if let Some(s) = self.expected_size {
            self.bar.set_length(s);
        }
        self.bar.set_position(len);
    }

    fn save_meta(&self) -> Result<(), FetchError> {
        self.meta.save(&self.part)?;
        Ok(())
    }

    /// Cuts the `.part` to `len` bytes and forgets chunks past it.
    fn cut(&mut self, len: u64) -> Result<(), FetchError> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.part)
            .map_err(|e| FsError::io(&self.part, e))?;
        file.set_len(len).map_err(|e| FsError::io(&self.part, e))?;
        file.sync_all().map_err(|e| FsError::io(&self.part, e))?;
        let keep = (len / self.meta.chunk_size) as usize;
        self.meta.chunks.truncate(keep);
        if len == 0 {
            self.meta.etag = None;
        }
        self.meta.repair = None;
        self.save_meta()?;
        self.credit(len);
        Ok(())
    }

    fn gave_up(&self, reason: impl Into<String>) -> FetchError {
        FetchError::Http {
            what: self.ctx.what(self.label),
            reason: reason.into(),
        }
    }

    /// Drives the download through its states until the file is in place
    /// or the run gives up.
    fn run(&mut self) -> Result<FileResult, FetchError> {
        let mut retry = Retry::default();
        let mut state = State::Inspect(None);
        loop {
            if self.ctx.units.aborted() {
                return Err(FetchError::Aborted);
            }
            state = match state {
                State::Inspect(known) => self.inspect(known)?,
                State::Repair(prog) => match self.repair(prog)? {
                    Step::Done(r) => return Ok(r),
                    Step::Restart => {
                        self.pending.clear();
                        State::Inspect(None)
                    }
                },
                State::Transfer(prog) => self.transfer_step(prog, &mut retry)?,
                State::Finish(prog) => return self.finish(prog),
            };
        }
    }

    /// Looks at the `.part` on disk (its length, its hashes, the chunks
    /// recorded) and says what comes next.
    fn inspect(&mut self, known: Option<Progress>) -> Result<State, FetchError> {
        let have = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.part)
            .and_then(|f| f.metadata())
            .map_err(|e| FsError::io(&self.part, e))?
            .len();
        if self.expected_size.is_some_and(|s| have > s) {
            bar_warn!(
                self.ctx.bars,
                "{}: partial file is longer than the file; restarting it",
                self.label
            );
            self.cut(0)?;
            return Ok(State::Inspect(None));
        }
        let prog = match known {
            Some(p) if p.len == have => p,
            _ => {
                let before = self.meta.chunks.len();
                let s = part::scan(&self.part, &mut self.meta, &ProgressBar::hidden())?;
                if self.meta.chunks.len() != before {
                    self.save_meta()?;
                }
                self.pending = s.pending;
                s.progress
            }
        };
        self.credit(prog.len);
        let complete = prog.len > 0 && Some(prog.len) == self.expected_size;
        if self.meta.repair.is_some() {
            if complete {
                return Ok(State::Repair(prog));
            }
            // Not complete (cut since): a plain resume.
            self.meta.repair = None;
            self.save_meta()?;
        }
        Ok(if complete {
            State::Finish(prog)
        } else {
            State::Transfer(prog)
        })
    }

    /// One request for the rest of the file, and what its outcome leads to.
    fn transfer_step(
        &mut self,
        mut prog: Progress,
        retry: &mut Retry,
    ) -> Result<State, FetchError> {
        let mut file = OpenOptions::new()
            .append(true)
            .read(true)
            .open(&self.part)
            .map_err(|e| FsError::io(&self.part, e))?;
        let mut progressed = false;
        let outcome = self.transfer(&mut file, &mut prog, &mut progressed);
        if progressed {
            // Bytes kept: the retry budget starts again.
            retry.attempt = 0;
        }
        match outcome {
            Ok(()) if self.expected_size.is_some_and(|s| prog.len < s) => {
                // The body ended early without an error: resume.
                retry.spend(self, "the connection keeps ending early; rerun to resume")?;
                Ok(State::Inspect(Some(prog)))
            }
            Ok(()) => {
                file.sync_all().map_err(|e| FsError::io(&self.part, e))?;
                Ok(State::Finish(prog))
            }
            Err(fail) => {
                let _ = file.sync_all();
                drop(file);
                self.after_failure(fail, prog, retry)
            }
        }
    }

    /// What a failed request leads to: a restart, a cut back to the last
    /// chunk that agrees, a retry after a wait, or the end of this run.
    fn after_failure(
        &mut self,
        fail: Fail,
        prog: Progress,
        retry: &mut Retry,
    ) -> Result<State, FetchError> {
        let label = self.label;
        match fail {
            Fail::Status(416, _, _) => {
                // Our partial file does not fit the remote one: start over.
                bar_warn!(
                    self.ctx.bars,
                    "{label}: the server refused the resume range; restarting the file"
                );
                self.restart_from(
                    0,
                    retry,
                    "the server keeps refusing the resume range (HTTP 416)",
                )
            }
            Fail::Changed(why) => {
                bar_warn!(self.ctx.bars, "{label}: {why}; starting the file over");
                self.restart_from(0, retry, &format!("{why} (again and again)"))
            }
            Fail::Overlap { start, at } => {
                // The end of the `.part` is not what the server has (a torn
                // or zeroed tail after a crash): go back to the last recorded
                // chunk, which the scan found intact. If that boundary was
                // tried already, the server's bytes changed under the same
                // ETag: nothing before can be trusted.
                let mut back = self.meta.recorded_len().min(at);
                if retry.overlap_failed_at == Some(back) {
                    back = 0;
                }
                retry.overlap_failed_at = Some(back);
                bar_warn!(self.ctx.bars,
                    "{label}: bytes {start}-{} of the partial file differ from the server's (a damaged end, e.g. after a crash); keeping the {back} bytes before the last chunk boundary that agrees",
                    at - 1
                );
                self.restart_from(
                    back,
                    retry,
                    "the server's bytes keep disagreeing with the partial file",
                )
            }
            fail => {
                if self.ctx.units.aborted() {
                    return Err(FetchError::Aborted);
                }
                if fail.retryable() && retry.attempt < self.ctx.client.retries {
                    let wait = fail.wait(retry.attempt);
                    bar_warn!(
                        self.ctx.bars,
                        "{label}: {}; resuming in {wait:?}",
                        fail.describe()
                    );
                    std::thread::sleep(wait);
                    retry.attempt += 1;
                    return Ok(State::Inspect(Some(prog)));
                }
                Err(self.give_up(fail, retry.attempt))
            }
        }
    }

    /// Cuts the `.part` back to `len` bytes and tries again, within the
    /// retry budget (`why` ends the run when it is spent).
    fn restart_from(
        &mut self,
        len: u64,
        retry: &mut Retry,
        why: &str,
    ) -> Result<State, FetchError> {
        self.cut(len)?;
        self.pending.clear();
        retry.spend(self, why)?;
        Ok(State::Inspect(None))
    }

    /// The final error of a failed request, saying what was kept.
    fn give_up(&self, fail: Fail, attempts: u32) -> FetchError {
        let ctx = self.ctx;
        let kept = fs::metadata(&self.part).map(|m| m.len()).unwrap_or(0);
        let mut e = ctx
            .client
            .map_fail(fail, &self.url, &ctx.what(self.label), ctx.repo, attempts);
        if let FetchError::Http { reason, .. } = &mut e {
            reason.push_str(&format!(
                "; {kept} bytes kept in {}, rerun to resume",
                self.part.display()
            ));
        }
        e
    }

    /// One request: resumes at `prog.len` (asking again for up to 64 KiB
    /// before it, compared with the `.part`) and appends the body.
    fn transfer(
        &mut self,
        file: &mut File,
        prog: &mut Progress,
        progressed: &mut bool,
    ) -> Result<(), Fail> {
        let have = prog.len;
        let start = have - have.min(OVERLAP);
        let if_range = if have > 0 {
            self.meta.etag.clone()
        } else {
            None
        };
        let range = (have > 0).then_some((start, None));
        let (resp, first) = self.ctx.client.get(&self.url, range, if_range.as_deref())?;
        self.learn_from_headers(&first);
        let etag = strong_etag(&resp);
        let status = resp.status();
        self.check_reply(&resp, file, prog, start, if_range.as_deref(), &etag)?;
        let mut body = resp.into_reader();
        if status == 206 && have > start {
            self.check_overlap(&mut body, file, start, have)?;
        }
        self.record_agreement(etag, have)?;
        self.append_body(&mut body, file, prog, progressed)
    }

    /// What the reply headers tell when the listing did not: the sha256
    /// (`X-Linked-Etag`, or an `ETag` that is one) and the size.
    fn learn_from_headers(&mut self, first: &[(String, String)]) {
        let header = |n: &str| first.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        if self.expected_sha.is_none() {
            self.expected_sha = header("x-linked-etag")
                .or_else(|| header("etag"))
                .map(clean_etag)
                .map(|s| s.to_ascii_lowercase())
                .filter(|s| is_sha256(s));
        }
        if self.expected_size.is_none() {
            self.expected_size = header("x-linked-size").and_then(|s| s.trim().parse().ok());
        }
    }

    /// Accepts a `206` for the range asked with the same validator, or a
    /// `200` (the whole file: the `.part` starts over).
    fn check_reply(
        &mut self,
        resp: &ureq::Response,
        file: &File,
        prog: &mut Progress,
        start: u64,
        if_range: Option<&str>,
        etag: &Option<String>,
    ) -> Result<(), Fail> {
        let label = self.label;
        match resp.status() {
            206 => {
                let cr = resp.header("Content-Range").unwrap_or("");
                if !cr.starts_with(&format!("bytes {start}-")) {
                    return Err(Fail::Transport(format!(
                        "asked for bytes {start}- but got Content-Range `{cr}`"
                    )));
                }
                if self.expected_size.is_none() {
                    self.expected_size = cr.rsplit('/').next().and_then(|s| s.parse().ok());
                }
                if let (Some(old), Some(new)) = (&self.meta.etag, etag) {
                    if old != new {
                        // A server that ignores If-Range: do not splice.
                        return Err(Fail::Changed(format!(
                            "the file changed on the server (ETag {old} -> {new})"
                        )));
                    }
                }
            }
            200 => {
                if prog.len > 0 {
                    match (if_range, etag) {
                        (Some(old), Some(new)) if old != new => bar_warn!(self.ctx.bars,
                            "{label}: the file changed on the server (ETag {old} -> {new}), so it sent the whole file (If-Range); starting over"
                        ),
                        _ => bar_warn!(self.ctx.bars,
                            "{label}: the server ignored the Range request; restarting the file"
                        ),
                    }
                    file.set_len(0)
                        .map_err(|e| Fail::Transport(format!("{}: {e}", self.part.display())))?;
                    *prog = Progress::new(self.meta.chunk_size);
                    self.meta.chunks.clear();
                    self.meta.repair = None;
                    self.pending.clear();
                    self.credit(0);
                }
                if self.expected_size.is_none() {
                    self.expected_size = resp.header("Content-Length").and_then(|s| s.parse().ok());
                }
            }
            s => return Err(Fail::Status(s, "unexpected status".into(), None)),
        }
        Ok(())
    }

    /// Compares the bytes `[start, have)` asked again with the `.part`'s.
    fn check_overlap(
        &mut self,
        body: &mut impl Read,
        file: &File,
        start: u64,
        have: u64,
    ) -> Result<(), Fail> {
        let ov = (have - start) as usize;
        let mut remote = vec![0u8; ov];
        let got = read_full(body, &mut remote, start)?;
        self.transferred += got as u64;
        if got < ov {
            return Err(Fail::Transport(format!(
                "connection broke at byte {}",
                start + got as u64
            )));
        }
        let mut local = vec![0u8; ov];
        file.read_exact_at(&mut local, start)
            .map_err(|e| Fail::Transport(format!("{}: {e}", self.part.display())))?;
        if local != remote {
            return Err(Fail::Overlap { start, at: have });
        }
        Ok(())
    }

    /// The server agrees with the tail: keeps its validator and what was
    /// learned of the file, and records the chunks read back from disk.
    fn record_agreement(&mut self, etag: Option<String>, have: u64) -> Result<(), Fail> {
        let mut dirty = false;
        if etag.is_some() && etag != self.meta.etag {
            self.meta.etag = etag;
            dirty = true;
        }
        if self.meta.sha256.is_none() && self.expected_sha.is_some() {
            self.meta.sha256 = self.expected_sha.clone();
            dirty = true;
        }
        if self.meta.size.is_none() && self.expected_size.is_some() {
            self.meta.size = self.expected_size;
            dirty = true;
        }
        if !self.pending.is_empty() {
            if self.meta.chunks.len() as u64 + self.pending.len() as u64
                == have / self.meta.chunk_size
            {
                self.meta.chunks.append(&mut self.pending);
            }
            self.pending.clear();
            dirty = true;
        }
        if dirty {
            self.meta
                .save(&self.part)
                .map_err(|e| Fail::Transport(e.to_string()))?;
        }
        Ok(())
    }

    /// Appends the body to the `.part`, recording each completed chunk
    /// after its bytes are durable.
    fn append_body(
        &mut self,
        body: &mut impl Read,
        file: &mut File,
        prog: &mut Progress,
        progressed: &mut bool,
    ) -> Result<(), Fail> {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            if self.ctx.units.aborted() {
                return Err(Fail::Transport("aborted".into()));
            }
            let n = match body.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Fail::Transport(format!(
                        "connection broke after {} bytes: {e}",
                        prog.len
                    )))
                }
            };
            file.write_all(&buf[..n])
                .map_err(|e| Fail::Transport(format!("writing {}: {e}", self.part.display())))?;
            let (meta, part) = (&mut self.meta, &self.part);
            prog.update(&buf[..n], |i, h| {
                // Durable bytes first, then the record that describes them.
                if i as usize == meta.chunks.len() {
                    file.sync_data()
                        .map_err(|e| Fail::Transport(format!("{}: {e}", part.display())))?;
                    meta.chunks.push(h);
                    meta.save(part)
                        .map_err(|e| Fail::Transport(e.to_string()))?;
                }
                Ok(())
            })?;
            self.transferred += n as u64;
            self.credit(prog.len);
            *progressed = true;
        }
    }

    /// Compares the complete `.part` with the server's bytes chunk by chunk
    /// from the record's repair cursor, rewriting only what differs, then
    /// checks the whole file again.
    fn repair(&mut self, prog: Progress) -> Result<Step, FetchError> {
        let label = self.label;
        let size = prog.len;
        let cs = self.meta.chunk_size;
        let n = size.div_ceil(cs);
        let mut r = self.meta.repair.clone().unwrap_or_default();
        if r.cursor == 0 && r.downloaded == 0 {
            bar_warn!(self.ctx.bars,
                "{label}: repairing {}: comparing it with the hub's bytes in {} chunks, rewriting the ones that differ",
                self.part.display(),
                n
            );
        } else {
            bar_warn!(
                self.ctx.bars,
                "{label}: continuing the repair at chunk {}/{n} (byte {})",
                r.cursor,
                r.cursor * cs
            );
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.part)
            .map_err(|e| FsError::io(&self.part, e))?;
        self.bar
            .set_message(short_name(&format!("repair {label}"), NAME_WIDTH));
        self.bar.set_length(size);
        self.bar.set_position((r.cursor * cs).min(size));
        if !self.repair_chunks(&file, &mut r, size)? {
            drop(file);
            self.cut(0)?;
            return Ok(Step::Restart);
        }
        drop(file);
        self.finish_repair(r, n)
    }

    /// The repair's chunk loop: compares (and rewrites) each chunk from the
    /// cursor on, saving the cursor after each, retrying a failed chunk.
    /// False when the remote file changed and the repair cannot use it.
    fn repair_chunks(
        &mut self,
        file: &File,
        r: &mut Repair,
        size: u64,
    ) -> Result<bool, FetchError> {
        let cs = self.meta.chunk_size;
        let n = size.div_ceil(cs);
        let mut attempt = 0u32;
        while r.cursor < n {
            if self.ctx.units.aborted() {
                return Err(FetchError::Aborted);
            }
            let a = r.cursor * cs;
            let b = (a + cs).min(size);
            let mut progressed = false;
            match self.compare_range(file, a, b, r, &mut progressed) {
                Ok(()) => {
                    file.sync_data().map_err(|e| FsError::io(&self.part, e))?;
                    r.cursor += 1;
                    self.meta.repair = Some(r.clone());
                    self.save_meta()?;
                    attempt = 0;
                }
                Err(Fail::Changed(why)) => {
                    bar_warn!(
                        self.ctx.bars,
                        "{}: {why}; the repair cannot use it: starting the file over",
                        self.label
                    );
                    return Ok(false);
                }
                Err(fail) => {
                    if progressed {
                        attempt = 0;
                    }
                    self.meta.repair = Some(r.clone());
                    self.save_meta()?;
                    self.repair_retry(fail, r, attempt)?;
                    attempt += 1;
                }
            }
        }
        Ok(true)
    }

    /// After a chunk failed (its progress saved): waits and returns to
    /// retry it, or the error, which says where a rerun continues.
    fn repair_retry(&self, fail: Fail, r: &Repair, attempt: u32) -> Result<(), FetchError> {
        let (ctx, label) = (self.ctx, self.label);
        if ctx.units.aborted() {
            return Err(FetchError::Aborted);
        }
        if fail.retryable() && attempt < ctx.client.retries {
            let wait = fail.wait(attempt);
            bar_warn!(
                self.ctx.bars,
                "{label}: repair: {}; retrying chunk {} in {wait:?}",
                fail.describe(),
                r.cursor
            );
            std::thread::sleep(wait);
            return Ok(());
        }
        let mut e = ctx
            .client
            .map_fail(fail, &self.url, &ctx.what(label), ctx.repo, attempt);
        if let FetchError::Http { reason, .. } = &mut e {
            reason.push_str(&format!(
                "; the repair of {} continues at byte {} on rerun",
                self.part.display(),
                r.cursor * self.meta.chunk_size
            ));
        }
        Err(e)
    }

    /// Hashes the repaired file again, records its chunks and says what
    /// the repair of `n` chunks changed.
    fn finish_repair(&mut self, r: Repair, n: u64) -> Result<Step, FetchError> {
        let label = self.label;
        self.meta.chunks.clear();
        let s = part::scan(&self.part, &mut self.meta, &ProgressBar::hidden())?;
        self.meta.chunks = s.pending;
        if r.differed.is_empty() {
            bar_warn!(self.ctx.bars,
                "{label}: repair compared all {n} chunks ({} downloaded) and found no byte that differs",
                crate::cli::human_bytes(r.downloaded)
            );
        } else {
            bar_warn!(self.ctx.bars,
                "{label}: repair rewrote {} in {} that differed from the hub's ({} downloaded to compare)",
                crate::cli::human_bytes(r.differing_bytes()),
                r.describe(),
                crate::cli::human_bytes(r.downloaded)
            );
        }
        self.meta.repair = None;
        self.repaired = Some(r);
        self.finish(s.progress).map(Step::Done)
    }

    /// Fetches bytes `[a, b)` and compares them with the `.part`, writing
    /// the ones that differ in place.
    fn compare_range(
        &mut self,
        file: &File,
        a: u64,
        b: u64,
        r: &mut Repair,
        progressed: &mut bool,
    ) -> Result<(), Fail> {
        let (resp, _) =
            self.ctx
                .client
                .get(&self.url, Some((a, Some(b - 1))), self.meta.etag.as_deref())?;
        let etag = strong_etag(&resp);
        match resp.status() {
            206 => {
                let cr = resp.header("Content-Range").unwrap_or("");
                if !cr.starts_with(&format!("bytes {a}-{}/", b - 1)) {
                    return Err(Fail::Transport(format!(
                        "asked for bytes {a}-{} but got Content-Range `{cr}`",
                        b - 1
                    )));
                }
                if let (Some(old), Some(new)) = (&self.meta.etag, &etag) {
                    if old != new {
                        return Err(Fail::Changed(format!(
                            "the file changed on the server (ETag {old} -> {new})"
                        )));
                    }
                }
            }
            200 => {
                return Err(Fail::Changed(format!(
                    "the server sent the whole file instead of bytes {a}-{} (ETag {} -> {})",
                    b - 1,
                    self.meta.etag.as_deref().unwrap_or("none"),
                    etag.as_deref().unwrap_or("none")
                )))
            }
            s => return Err(Fail::Status(s, "unexpected status".into(), None)),
        }
        let mut rd = resp.into_reader();
        let mut remote = vec![0u8; 1 << 20];
        let mut local = vec![0u8; 1 << 20];
        let mut pos = a;
        while pos < b {
            let want = ((b - pos) as usize).min(remote.len());
            let got = read_full(&mut rd, &mut remote[..want], pos)?;
            if got == 0 {
                return Err(Fail::Transport(format!("connection broke at byte {pos}")));
            }
            let io = |e: std::io::Error| Fail::Transport(format!("{}: {e}", self.part.display()));
            file.read_exact_at(&mut local[..got], pos).map_err(io)?;
            let (rs, ls) = (&remote[..got], &local[..got]);
            if rs != ls {
                let first = rs.iter().zip(ls).position(|(x, y)| x != y).unwrap_or(0);
                let last = rs
                    .iter()
                    .zip(ls)
                    .rposition(|(x, y)| x != y)
                    .unwrap_or(first);
                file.write_all_at(&rs[first..=last], pos + first as u64)
                    .map_err(io)?;
                r.add_diff(pos + first as u64, pos + last as u64 + 1);
            }
            pos += got as u64;
            r.downloaded += got as u64;
            self.transferred += got as u64;
            self.bar.set_position(pos);
            *progressed = true;
        }
        Ok(())
    }

    /// Verifies the complete `.part` and renames it into place; on a
    /// mismatch keeps it, marked for repair by the next run.
    fn finish(&mut self, prog: Progress) -> Result<FileResult, FetchError> {
        let ctx = self.ctx;
        let label = self.label.to_string();
        if let Some(s) = self.expected_size {
            if prog.len != s {
                let _ = fs::remove_file(&self.part);
                PartMeta::remove(&self.part);
                return Err(FetchError::Checksum {
                    file: label,
                    reason: format!(
                        "size mismatch: the hub says {s} bytes, got {}; the partial download was deleted, rerun to fetch it again",
                        prog.len
                    ),
                });
            }
        }
        let got = prog.sha_hex();
        let mismatch = if let Some(want) = &self.expected_sha {
            (&got != want).then(|| {
                format!("sha256 mismatch: the hub says {want}, the downloaded bytes hash to {got}")
            })
        } else if let Some(oid) = self.f.oid.as_deref().filter(|o| is_git_oid(o)) {
            let g = part::git_blob_sha1(&self.part)?;
            (g != oid.to_ascii_lowercase()).then(|| {
                format!(
                    "git blob id mismatch: the hub says {oid}, the downloaded bytes hash to {g}"
                )
            })
        } else {
            None
        };
        if let Some(what) = mismatch {
            self.meta.repair = Some(Repair::default());
            self.save_meta()?;
            let next = match &self.repaired {
                Some(r) => format!(
                    " even after a repair pass compared every chunk with the hub ({} differed): the hub serves bytes that do not match its own hash; kept {}, a rerun compares again",
                    r.describe(),
                    self.part.display()
                ),
                None => format!(
                    "; kept {} ({}): rerun to repair it (it is compared with the hub chunk by chunk and only differing chunks are rewritten)",
                    self.part.display(),
                    crate::cli::human_bytes(prog.len)
                ),
            };
            return Err(FetchError::Checksum {
                file: label,
                reason: format!("{what}{next}"),
            });
        }
        if label.ends_with(".safetensors") {
            super::local::validate_safetensors(&self.part)?;
        }
        // With the HF cache, the verified bytes become its blob and the
        // checkpoint file a link to the snapshot entry: one copy on disk.
        let blob_id = self.expected_sha.clone().or_else(|| self.f.oid.clone());
        match (&ctx.cache, blob_id) {
            (Some(c), Some(id)) => {
                c.adopt(&self.part, &id, ctx.commit, &label, &self.final_path)?
            }
            _ => fsutil::commit_temp(&self.part, &self.final_path)?,
        }
        PartMeta::remove(&self.part);
        ctx.units.done(
            &label,
            prog.len,
            Some(prog.b3.finalize().to_hex().to_string()),
        )?;
        Ok(FileResult {
            transferred: self.transferred,
            reused: false,
            sha256: self.expected_sha.as_ref().map(|_| got),
            size: prog.len,
        })
    }
}

/// A file already in the output dir (from a run killed before recording
/// it) or in the HF cache: used when its hash matches the hub's (sha256 for
/// LFS files, the git blob id for others).
fn reuse_existing(
    ctx: &Ctx,
    f: &RemoteFile,
    final_path: &Path,
) -> Result<Option<FileResult>, FetchError> {
    let key = match (&f.sha256, &f.oid) {
        (Some(sha), _) => sha.clone(),
        (None, Some(oid)) if is_git_oid(oid) => oid.to_ascii_lowercase(),
        _ => return Ok(None),
    };
    let mut candidates = vec![final_path.to_path_buf()];
    if let Some(c) = &ctx.cache {
        if let Some(b) = c.find_blob(&key, f.size) {
            candidates.push(b);
        }
    }
    for cand in candidates {
        let Ok(m) = fs::metadata(&cand) else { continue };
        if f.size.is_some_and(|s| s != m.len()) {
            continue;
        }
        let h = Hashes::of_file(&cand, &ProgressBar::hidden())?;
        let got = if f.sha256.is_some() {
            format!("{:x}", h.sha.clone().finalize())
        } else {
            part::git_blob_sha1(&cand)?
        };
        if got != key {
            tracing::warn!(
                "{}: existing copy has the wrong hash; downloading",
                cand.display()
            );
            continue;
        }
        // A checkpoint file already holding the right bytes is replaced
        // without a claim: whatever it was, its content stays the same.
        if cand != final_path {
            ctx.units.claim(&f.path)?;
            tracing::info!("{}: reused from the HF cache", f.path);
        }
        match &ctx.cache {
            Some(c) => {
                c.store(&cand, &key, ctx.commit, &f.path)?;
                c.point(final_path, ctx.commit, &f.path)?;
            }
            None => {
                // --no-hf-cache: a file of its own, not a link into the cache.
                let is_link =
                    fs::symlink_metadata(final_path).is_ok_and(|m| m.file_type().is_symlink());
                if cand != final_path || is_link {
                    super::local::link_or_copy(&cand, final_path, &ProgressBar::hidden())?;
                }
            }
        }
        ctx.bars.overall.inc(m.len());
        ctx.units
            .done(&f.path, m.len(), Some(h.b3.finalize().to_hex().to_string()))?;
        return Ok(Some(FileResult {
            transferred: 0,
            reused: true,
            sha256: f.sha256.clone(),
            size: m.len(),
        }));
    }
    Ok(None)
}
