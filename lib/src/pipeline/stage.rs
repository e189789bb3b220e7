//! Stage checkpoint records: what a stage consumed and produced, so a
//! finished stage is not redone, a killed one resumes, and a stage refuses
//! to run on a predecessor's incomplete output.
//!
//! One JSON file per stage, `<work_dir>/stages/<stage>.json`, rewritten
//! atomically after every completed unit of work. The Makefile depends on
//! these files.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::cli::{Classify, Exit};
use crate::fsutil::{self, FsError};

/// Version of the record layout; a record of another version is refused.
pub const RECORD_FORMAT: u32 = 1;

/// A pipeline stage that keeps a record, in pipeline order. Its record is
/// `stages/<name>.json` and its binary `rh-<name>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// `rh-fetch`: the checkpoint.
    Fetch,
    /// `rh-inspect`: strategy.toml.
    Inspect,
    /// `rh-repack`: the cache.
    Repack,
    /// `rh-verify`: the manifest.
    Verify,
}

impl Stage {
    /// Every stage, in pipeline order.
    pub const ALL: [Stage; 4] = [Stage::Fetch, Stage::Inspect, Stage::Repack, Stage::Verify];

    /// The name in records, file names and messages.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Fetch => "fetch",
            Stage::Inspect => "inspect",
            Stage::Repack => "repack",
            Stage::Verify => "verify",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

// The record functions take `impl AsRef<str>` so that a stage still named
// by string (fetch's `STAGE` while its module is reworked) keeps working;
// the library's other stages pass a `Stage`.
impl AsRef<str> for Stage {
    fn as_ref(&self) -> &str {
        self.name()
    }
}

/// The stages' names, in pipeline order.
pub const STAGES: [&str; 4] = ["fetch", "inspect", "repack", "verify"];

/// Errors about stage records.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Reading or writing a record failed.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// The record is not valid JSON of the expected shape.
    #[error("{path}: corrupt stage record ({reason}); delete it or rerun the stage with --force")]
    Corrupt {
        /// The record.
        path: PathBuf,
        /// The parser's complaint.
        reason: String,
    },
    /// The record was written by an incompatible version.
    #[error("{path}: stage record has format {found}, this tool writes {expected}; rerun the stage with --force")]
    Version {
        /// The record.
        path: PathBuf,
        /// Its format number.
        found: u32,
        /// Ours.
        expected: u32,
    },
    /// A predecessor has not completed.
    #[error("stage `{stage}` has not finished (no complete record at {path}); run `rh-{stage}` (or `make {stage}`) first")]
    NotReady {
        /// The missing stage.
        stage: String,
        /// Where its record should be.
        path: PathBuf,
    },
}

impl Classify for StageError {
    fn exit(&self) -> Exit {
        match self {
            StageError::NotReady { .. } => Exit::NotReady,
            _ => Exit::Failure,
        }
    }
}

/// Whether a stage's run finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Started, not finished (killed, failed, or still running).
    Running,
    /// Finished; outputs are complete.
    Complete,
}

/// One produced file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    /// Path relative to the stage's output directory (or absolute).
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// blake3 (hex) where the stage computed one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
}

/// The record of one stage.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageRecord {
    /// [`RECORD_FORMAT`].
    pub format: u32,
    /// Stage name.
    pub stage: String,
    /// `CARGO_PKG_VERSION` of the tool that wrote it.
    pub tool_version: String,
    /// Running or complete.
    pub status: Status,
    /// blake3 of the stage's settings and its inputs' identities.
    pub input_fingerprint: String,
    /// Human-readable inputs (paths, sources).
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
    /// Where the outputs are.
    pub output_dir: String,
    /// Completed units of work (files, tensor groups, chunks), by name.
    #[serde(default)]
    pub units_done: BTreeMap<String, Output>,
    /// Final outputs (set on completion).
    #[serde(default)]
    pub outputs: Vec<Output>,
    /// Stage-specific facts (pinned commit, manifest hash, ...): each
    /// stage's own serde struct ([`StageRun::finish`] writes it,
    /// [`StageRecord::details_as`] reads it back).
    #[serde(default)]
    pub details: serde_json::Value,
    /// Unix seconds when this run started.
    pub started_at: u64,
    /// Unix seconds when it completed.
    #[serde(default)]
    pub finished_at: Option<u64>,
    /// Seconds spent across all runs that contributed.
    #[serde(default)]
    pub elapsed_s: f64,
}

impl StageRecord {
    /// The details as the stage's own struct. Missing fields take their
    /// defaults (`#[serde(default)]` on the struct), so records written
    /// before a field existed still read; details of the wrong shape are
    /// [`StageError::Corrupt`], naming the record.
    pub fn details_as<T: serde::de::DeserializeOwned>(
        &self,
        work_dir: &Path,
    ) -> Result<T, StageError> {
        let v = if self.details.is_null() {
            serde_json::Value::Object(Default::default())
        } else {
            self.details.clone()
        };
        serde_json::from_value(v).map_err(|e| StageError::Corrupt {
            path: record_path(work_dir, &self.stage),
            reason: format!("details: {e}"),
        })
    }
}

/// Where a stage's record lives.
pub fn record_path(work_dir: &Path, stage: impl AsRef<str>) -> PathBuf {
    work_dir
        .join("stages")
        .join(format!("{}.json", stage.as_ref()))
}

/// Reads a stage record if present.
pub fn read_record(
    work_dir: &Path,
    stage: impl AsRef<str>,
) -> Result<Option<StageRecord>, StageError> {
    let path = record_path(work_dir, stage);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(FsError::io(&path, e).into()),
    };
    // Check the format number first so an old record gets the version error,
    // not a confusing field error.
    let v: serde_json::Value = serde_json::from_slice(&text).map_err(|e| StageError::Corrupt {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let found = v.get("format").and_then(|f| f.as_u64()).unwrap_or(0) as u32;
    if found != RECORD_FORMAT {
        return Err(StageError::Version {
            path,
            found,
            expected: RECORD_FORMAT,
        });
    }
    let rec: StageRecord = serde_json::from_value(v).map_err(|e| StageError::Corrupt {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    Ok(Some(rec))
}

/// The complete record of a predecessor stage, or [`StageError::NotReady`].
pub fn require_complete(
    work_dir: &Path,
    stage: impl AsRef<str>,
) -> Result<StageRecord, StageError> {
    let stage = stage.as_ref();
    match read_record(work_dir, stage)? {
        Some(r) if r.status == Status::Complete => Ok(r),
        _ => Err(StageError::NotReady {
            stage: stage.to_string(),
            path: record_path(work_dir, stage),
        }),
    }
}

/// Builds an input fingerprint from labelled parts.
#[derive(Default)]
pub struct Fingerprint(blake3::Hasher);

impl Fingerprint {
    /// Starts an empty fingerprint.
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds a labelled value.
    pub fn add(&mut self, key: &str, value: impl AsRef<[u8]>) -> &mut Self {
        let v = value.as_ref();
        self.0.update(&(key.len() as u64).to_le_bytes());
        self.0.update(key.as_bytes());
        self.0.update(&(v.len() as u64).to_le_bytes());
        self.0.update(v);
        self
    }
    /// Adds a predecessor's identity (its fingerprint and outputs).
    pub fn add_record(&mut self, rec: &StageRecord) -> &mut Self {
        self.add(&format!("stage:{}", rec.stage), &rec.input_fingerprint);
        for o in &rec.outputs {
            self.add(
                &o.path,
                format!("{}:{}", o.size, o.blake3.as_deref().unwrap_or("")),
            );
        }
        self
    }
    /// The hex digest.
    pub fn finish(&self) -> String {
        self.0.finalize().to_hex().to_string()
    }
}

/// What to do about a stage.
pub enum Plan {
    /// Already complete with the same inputs and its outputs still there.
    UpToDate(StageRecord),
    /// Needs (re)running; the run may carry completed units from a killed run.
    Run(StageRun),
}

/// A stage run in progress: records units as they complete.
pub struct StageRun {
    path: PathBuf,
    /// The record being built.
    pub record: StageRecord,
    clock: Instant,
    prior_elapsed: f64,
    /// True when units from an interrupted run were kept.
    pub resumed: bool,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Decides whether `stage` must run.
///
/// * complete, same fingerprint, outputs present with their recorded sizes,
///   and not `force` → [`Plan::UpToDate`];
/// * running with the same fingerprint and not `force` → resume, keeping
///   completed units;
/// * otherwise a fresh run.
pub fn plan(
    work_dir: &Path,
    stage: impl AsRef<str>,
    fingerprint: &str,
    output_dir: &Path,
    inputs: BTreeMap<String, String>,
    force: bool,
) -> Result<Plan, StageError> {
    let stage = stage.as_ref();
    fsutil::ensure_writable_dir(&work_dir.join("stages"))?;
    let path = record_path(work_dir, stage);
    let existing = if force {
        // --force redoes the stage whatever state the old record is in.
        read_record(work_dir, stage).ok().flatten()
    } else {
        read_record(work_dir, stage)?
    };
    let mut resumed_units = BTreeMap::new();
    let mut prior_elapsed = 0.0;
    if let Some(rec) = existing {
        if !force && rec.input_fingerprint == fingerprint {
            match rec.status {
                Status::Complete if outputs_present(Path::new(&rec.output_dir), &rec.outputs) => {
                    return Ok(Plan::UpToDate(rec));
                }
                Status::Running => {
                    resumed_units = rec.units_done.clone();
                    prior_elapsed = rec.elapsed_s;
                }
                Status::Complete => {}
            }
        }
    }
    let resumed = !resumed_units.is_empty();
    let record = StageRecord {
        format: RECORD_FORMAT,
        stage: stage.to_string(),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        status: Status::Running,
        input_fingerprint: fingerprint.to_string(),
        inputs,
        output_dir: output_dir.to_string_lossy().into_owned(),
        units_done: resumed_units,
        outputs: Vec::new(),
        details: serde_json::Value::Null,
        started_at: now_unix(),
        finished_at: None,
        elapsed_s: prior_elapsed,
    };
    let mut run = StageRun {
        path,
        record,
        clock: Instant::now(),
        prior_elapsed,
        resumed,
    };
    run.save()?;
    Ok(Plan::Run(run))
}

fn outputs_present(dir: &Path, outputs: &[Output]) -> bool {
    outputs.iter().all(|o| {
        let p = dir.join(&o.path);
        std::fs::metadata(&p)
            .map(|m| m.len() == o.size)
            .unwrap_or(false)
    })
}

impl StageRun {
    /// Whether a unit was completed (by this or an interrupted run) and its
    /// file is still there with the recorded size.
    pub fn is_done(&self, unit: &str) -> bool {
        match self.record.units_done.get(unit) {
            Some(o) => std::fs::metadata(Path::new(&self.record.output_dir).join(&o.path))
                .map(|m| m.len() == o.size)
                .unwrap_or(false),
            None => false,
        }
    }

    /// The recorded output of a completed unit.
    pub fn unit(&self, unit: &str) -> Option<&Output> {
        self.record.units_done.get(unit)
    }

    /// Records a completed unit and saves the record atomically.
    pub fn unit_done(&mut self, unit: &str, output: Output) -> Result<(), StageError> {
        self.record.units_done.insert(unit.to_string(), output);
        self.save()
    }

    /// Marks the stage complete with its final outputs and details.
    pub fn finish(
        mut self,
        outputs: Vec<Output>,
        details: impl Serialize,
    ) -> Result<StageRecord, StageError> {
        self.record.outputs = outputs;
        self.record.details = serde_json::to_value(details).expect("stage details serialize");
        self.record.status = Status::Complete;
        self.record.finished_at = Some(now_unix());
        self.save()?;
        Ok(self.record)
    }

    /// Seconds spent by this and earlier interrupted runs.
    pub fn elapsed(&self) -> f64 {
        self.prior_elapsed + self.clock.elapsed().as_secs_f64()
    }

    fn save(&mut self) -> Result<(), StageError> {
        self.record.elapsed_s = self.elapsed();
        let json = serde_json::to_vec_pretty(&self.record).expect("record serializes");
        fsutil::write_atomic(&self.path, &json)?;
        Ok(())
    }
}

/// The identity of a file as the filesystem sees it: device, inode, size,
/// modification and change times (ns). Any replacement or rewrite changes
/// at least one of them (a rename gives another inode, a write another
/// mtime and ctime), so content recorded against an identity is trusted
/// only while the identity is unchanged.
pub fn file_identity(m: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "{}:{}:{}:{}.{}:{}.{}",
        m.dev(),
        m.ino(),
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_simple(work: &Path, fp: &str, force: bool) -> Plan {
        plan(work, "fetch", fp, &work.join("out"), BTreeMap::new(), force).unwrap()
    }

    #[test]
    fn complete_stage_is_up_to_date_until_inputs_change() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path();
        std::fs::create_dir_all(work.join("out")).unwrap();
        std::fs::write(work.join("out/a"), b"abc").unwrap();
        let Plan::Run(run) = plan_simple(work, "f1", false) else {
            panic!("first run must run")
        };
        run.finish(
            vec![Output {
                path: "a".into(),
                size: 3,
                blake3: None,
            }],
            serde_json::Value::Null,
        )
        .unwrap();
        assert!(matches!(plan_simple(work, "f1", false), Plan::UpToDate(_)));
        assert!(matches!(plan_simple(work, "f1", true), Plan::Run(_)));
        assert!(matches!(plan_simple(work, "f2", false), Plan::Run(_)));
    }

    #[test]
    fn killed_run_keeps_units() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path();
        std::fs::create_dir_all(work.join("out")).unwrap();
        std::fs::write(work.join("out/u1"), b"x").unwrap();
        let Plan::Run(mut run) = plan_simple(work, "f", false) else {
            panic!()
        };
        let o = Output {
            path: "u1".into(),
            size: 1,
            blake3: None,
        };
        run.unit_done("u1", o).unwrap();
        drop(run); // killed
        let Plan::Run(run) = plan_simple(work, "f", false) else {
            panic!()
        };
        assert!(run.resumed);
        assert!(run.is_done("u1"));
        assert!(!run.is_done("u2"));
    }

    #[test]
    fn corrupt_and_foreign_records_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path();
        std::fs::create_dir_all(work.join("stages")).unwrap();
        std::fs::write(record_path(work, "fetch"), b"{nope").unwrap();
        let e = read_record(work, "fetch").unwrap_err().to_string();
        assert!(e.contains("fetch.json") && e.contains("corrupt"), "{e}");
        std::fs::write(record_path(work, "fetch"), br#"{"format": 99}"#).unwrap();
        let e = read_record(work, "fetch").unwrap_err().to_string();
        assert!(e.contains("format 99"), "{e}");
        let e = require_complete(work, "inspect").unwrap_err();
        assert_eq!(e.exit(), Exit::NotReady);
    }
}
