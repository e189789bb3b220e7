//! `rh-repack`: checkpoint -> cache, streaming and resumable.
//!
//! 1. Plan: from the checkpoint's headers (and its small `qzeros`, to know
//!    which layers are symmetric) compute every tensor's file and offset,
//!    hence the whole index and its hash, before writing a payload byte.
//! 2. Write data files in order, one tensor group at a time: tensors are
//!    read with `pread` (not mapped, so resident memory stays bounded),
//!    converted in parallel in small batches, written sequentially into
//!    `data-NNNNN.rhd.tmp`, fsynced, and the group recorded in the stage
//!    record. A finished file is renamed to its final name.
//! 3. Write `index.rhc` atomically, remove stale data files, finish the stage.
//!
//! A killed run resumes from the last recorded group; because the plan is
//! deterministic the result is byte-identical to an uninterrupted run.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use safetensors::Dtype;

use crate::checkpoint::{float_type, Checkpoint, TensorEntry as CkEntry};
use crate::config::Precision;
use crate::fsutil::{self, FolioWriter, FsError};
use crate::pipeline::{
    defaults, setting_name, threads_setting, Pipeline, SettingError, SettingsError,
};
use crate::quant::AutoRoundTensors;
use crate::stage::{self, Fingerprint, Output, Plan, Stage};
use crate::tensor::{QuantMatrix, Zeros, QBLOCK};
use crate::weights::AUX_FILES;

use super::format::{
    align_up, data_file_name, group_of, is_data_file_name, natural_cmp, AuxFile, DataFile,
    DataHeader, FloatKind, Index, IndexHeader, Payload, Span, TensorEntry, ALIGN, FORMAT_VERSION,
    HEADER_LEN, INDEX_FILE,
};
use super::CacheError;

/// Input bytes converted together in one parallel batch.
const BATCH_BYTES: u64 = 32 << 20;
/// Dense tensors above this are copied in chunks of this size.
const CHUNK: u64 = 8 << 20;

/// What `rh-repack` does.
#[derive(Clone, Debug)]
pub struct RepackOptions {
    /// Input checkpoint directory.
    pub checkpoint: PathBuf,
    /// Output cache directory.
    pub cache: PathBuf,
    /// Work dir holding the stage records.
    pub work_dir: PathBuf,
    /// Largest data file in bytes.
    pub file_size: u64,
    /// Worker threads (`None`: all cores).
    pub threads: Option<usize>,
    /// Redo even when up to date.
    pub force: bool,
    /// Require a complete fetch stage (the input is fetch's output).
    pub require_fetch: bool,
    /// Hide the progress bar.
    pub quiet: bool,
    /// Do not refuse to start when the free space looks too small.
    pub skip_space_check: bool,
    /// Test hook: stop (as if killed) after this many groups of this run.
    pub stop_after_units: Option<usize>,
    /// Store a float `lm_head.weight` as int8 per group of
    /// [`LM_HEAD_GROUP`] (symmetric, f16 scales): half the bytes of BF16 on
    /// the biggest read of every decoded token, at a small logit error.
    /// Opt-in and lossy (`rh-repack --lm-head int8`).
    pub lm_head_int8: bool,
}

/// What rh-repack's flags say; `None` leaves the manifest's value.
#[derive(Clone, Debug, Default)]
pub struct RepackFlags {
    /// The positional checkpoint directory.
    pub checkpoint: Option<PathBuf>,
    /// The positional cache directory.
    pub cache: Option<PathBuf>,
    /// `--file-size-mib`.
    pub file_size_mib: Option<u64>,
    /// `--threads`.
    pub threads: Option<usize>,
    /// `--lm-head as-is|int8`.
    pub lm_head: Option<String>,
    /// `--force`.
    pub force: bool,
    /// `-q`.
    pub quiet: bool,
    /// `--no-space-check`.
    pub no_space_check: bool,
}

impl RepackOptions {
    /// The settings of a run, resolved once: a flag wins over the manifest's
    /// `[repack]` table, which wins over the defaults
    /// ([`defaults::REPACK_FILE_SIZE_MIB`], [`defaults::REPACK_LM_HEAD`]);
    /// values and `RH_REPACK_ABORT_AFTER_UNITS` are checked here.
    pub fn resolve(flags: &RepackFlags, p: &Pipeline) -> Result<RepackOptions, SettingsError> {
        let explicit_input = flags.checkpoint.is_some() || p.repack.checkpoint.is_some();
        let file_size_mib = flags
            .file_size_mib
            .or(p.repack.file_size_mib)
            .unwrap_or(defaults::REPACK_FILE_SIZE_MIB);
        let mib_name = || {
            setting_name(
                flags.file_size_mib.is_some(),
                "--file-size-mib",
                "[repack] file_size_mib",
            )
        };
        if file_size_mib == 0 {
            return Err(SettingError::new(&mib_name(), 0, "must be at least 1").into());
        }
        let file_size = file_size_mib
            .checked_mul(1 << 20)
            .ok_or_else(|| SettingError::new(&mib_name(), file_size_mib, "is too large"))?;
        let threads = match flags.threads.or(p.repack.threads) {
            Some(t) => {
                let what = setting_name(flags.threads.is_some(), "--threads", "[repack] threads");
                Some(threads_setting(&what, t)?)
            }
            None => None,
        };
        let lm_head = flags
            .lm_head
            .as_deref()
            .or(p.repack.lm_head.as_deref())
            .unwrap_or(defaults::REPACK_LM_HEAD);
        let lm_head_int8 = match lm_head {
            "as-is" => false,
            "int8" => true,
            other => {
                return Err(SettingError::new(
                    "--lm-head (or [repack] lm_head)",
                    format!("`{other}`"),
                    "is not one of as-is, int8",
                )
                .into())
            }
        };
        Ok(RepackOptions {
            checkpoint: flags.checkpoint.clone().unwrap_or_else(|| p.repack_input()),
            cache: flags.cache.clone().unwrap_or_else(|| p.cache_dir()),
            work_dir: p.work_dir(),
            file_size,
            threads,
            force: flags.force,
            require_fetch: !explicit_input,
            quiet: flags.quiet,
            skip_space_check: flags.no_space_check,
            stop_after_units: crate::env::repack_abort_after_units()?,
            lm_head_int8,
        })
    }
}

/// Tests: repacks `checkpoint` into `cache` with stage records in
/// `work_dir`, one data file, two threads, quietly.
#[cfg(test)]
pub(crate) fn test_options(checkpoint: &Path, cache: &Path, work_dir: &Path) -> RepackOptions {
    RepackOptions {
        skip_space_check: true,
        checkpoint: checkpoint.to_path_buf(),
        cache: cache.to_path_buf(),
        work_dir: work_dir.to_path_buf(),
        file_size: 1 << 30,
        threads: Some(2),
        force: false,
        require_fetch: false,
        quiet: true,
        stop_after_units: None,
        lm_head_int8: false,
    }
}

/// Group size of an int8 lm_head (`--lm-head int8`): the group size of the
/// checkpoint's own int8 linears; scales add 1.6% to the int8 bytes.
pub const LM_HEAD_GROUP: usize = 128;

/// What a repack run did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RepackOutcome {
    /// True when nothing was done because the cache was up to date.
    pub up_to_date: bool,
    /// True when units of an interrupted run were reused.
    pub resumed: bool,
    /// The cache directory.
    pub cache: PathBuf,
    /// Data files.
    pub files: usize,
    /// Entries in the tensor table.
    pub tensors: usize,
    /// Bytes of all data files.
    pub bytes: u64,
    /// blake3 of the index (hex).
    pub index_blake3: String,
    /// Seconds this run took.
    pub seconds: f64,
}

/// Where a planned entry's bytes come from.
#[derive(Clone, Debug)]
enum Source {
    /// An AutoRound module.
    Quant {
        module: String,
        qweight: CkEntry,
        qzeros: CkEntry,
        scales: CkEntry,
        bits: u8,
        group_size: usize,
        rows: usize,
        cols: usize,
        zeros_minus_one: bool,
    },
    /// A tensor copied as-is.
    Copy(CkEntry),
    /// A float matrix quantized here to int8 per [`LM_HEAD_GROUP`]
    /// (`--lm-head int8`).
    Int8(CkEntry),
}

impl Source {
    fn input_bytes(&self) -> u64 {
        match self {
            Source::Quant {
                qweight,
                qzeros,
                scales,
                ..
            } => (qweight.len + qzeros.len + scales.len) as u64,
            Source::Copy(e) | Source::Int8(e) => e.len as u64,
        }
    }
}

/// One data file's tensor group.
#[derive(Clone, Debug)]
struct Group {
    file: usize,
    name: String,
    /// Items `[start, end)` of the plan.
    items: std::ops::Range<usize>,
    /// File offset right after the group's last payload.
    end: u64,
}

/// The complete layout.
struct Layout {
    index: Index,
    sources: Vec<Source>,
    groups: Vec<Group>,
}

fn input_err(msg: impl Into<String>) -> CacheError {
    CacheError::Input(msg.into())
}

fn read_at(file: &File, path: &Path, offset: usize, len: usize) -> Result<Vec<u8>, CacheError> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset as u64)
        .map_err(|e| FsError::io(path, e))?;
    Ok(buf)
}

/// Whether every zero point stored in AutoRound `qzeros` equals
/// `2^(bits-1)` (the same extraction as `quant::AutoRoundTensors`).
fn qzeros_symmetric(qz: &[u8], rows: usize, groups: usize, bits: u8, minus_one: bool) -> bool {
    let b = bits as usize;
    let pf = 32 / b;
    let words_per_row = (rows * b).div_ceil(32);
    let sym = 1u32 << (b - 1);
    let mask = (1u32 << b) - 1;
    (0..groups).all(|g| {
        (0..rows).all(|n| {
            let i = (g * words_per_row + n / pf) * 4;
            let w = u32::from_le_bytes(qz[i..i + 4].try_into().expect("4 bytes"));
            ((w >> (b * (n % pf))) & mask) + minus_one as u32 == sym
        })
    })
}

/// Plans a quantized module (the checks `Checkpoint::matrix` applies).
fn quant_source(ck: &Checkpoint, module: &str) -> Result<Source, CacheError> {
    let dir = ck.dir.display();
    let q = ck.config.quantization_config.as_ref().ok_or_else(|| {
        input_err(format!(
            "{dir}: `{module}.qweight` present but config.json has no quantization_config"
        ))
    })?;
    let (bits, group_size) = match ck.config.precision(module) {
        Precision::Int {
            bits, group_size, ..
        } => (bits, group_size),
        Precision::Float => {
            return Err(input_err(format!(
                "{dir}: `{module}` is quantized on disk but quantization_config says it is 16-bit"
            )))
        }
    };
    let get = |suffix: &str, dtype: Dtype| -> Result<CkEntry, CacheError> {
        let n = format!("{module}.{suffix}");
        let e = ck
            .tensors
            .get(&n)
            .ok_or_else(|| input_err(format!("{dir}: tensor `{n}` is missing")))?;
        if e.dtype != dtype || e.shape.len() != 2 {
            return Err(input_err(format!(
                "{dir}: tensor `{n}` is {:?} {:?}, expected a 2-D {dtype:?}",
                e.dtype, e.shape
            )));
        }
        Ok(e.clone())
    };
    let qweight = get("qweight", Dtype::I32)?;
    let qzeros = get("qzeros", Dtype::I32)?;
    let scales = get("scales", Dtype::F16)?;
    if bits != 4 && bits != 8 {
        return Err(input_err(format!(
            "{dir}: `{module}`: {bits}-bit weights are not supported (4 or 8)"
        )));
    }
    let rows = scales.shape[1];
    let cols = qweight.shape[0] * 32 / bits as usize;
    let gs = if group_size <= 0 {
        cols
    } else {
        group_size as usize
    };
    if cols % QBLOCK != 0 || gs % QBLOCK != 0 || gs == 0 {
        return Err(input_err(format!(
            "{dir}: `{module}`: input size {cols} and group size {gs} must be multiples of {QBLOCK}"
        )));
    }
    let groups = cols.div_ceil(gs);
    if qweight.shape[1] != rows || scales.shape[0] != groups {
        return Err(input_err(format!(
            "{dir}: `{module}`: qweight {:?} and scales {:?} disagree for {bits}-bit group size {gs}",
            qweight.shape, scales.shape
        )));
    }
    let qzeros_len = (rows * bits as usize)
        .div_ceil(32)
        .checked_mul(groups * 4)
        .ok_or_else(|| input_err(format!("{dir}: `{module}`: sizes overflow")))?;
    if qzeros.len != qzeros_len {
        return Err(input_err(format!(
            "{dir}: `{module}.qzeros` has shape {:?}, expected [{groups}, {}]",
            qzeros.shape,
            (rows * bits as usize).div_ceil(32)
        )));
    }
    Ok(Source::Quant {
        module: module.to_string(),
        qweight,
        qzeros,
        scales,
        bits: bits as u8,
        group_size: gs,
        rows,
        cols,
        zeros_minus_one: q.zeros_minus_one(),
    })
}

/// Plans the whole cache.
/// Whether `--lm-head int8` applies to checkpoint tensor `name`: a float
/// `lm_head.weight` `[vocab, hidden]` with `hidden` a multiple of 32.
fn lm_head_to_int8(name: &str, e: &CkEntry) -> bool {
    name == "lm_head.weight"
        && float_type(e.dtype).is_some()
        && e.shape.len() == 2
        && e.shape[1] % QBLOCK == 0
        && e.shape[1] > 0
}

/// The layout: every entry with its spans in the data files, in natural
/// name order, grouped per layer for resumable writing; then the metadata
/// files the index carries.
fn plan_layout(
    ck: &Checkpoint,
    handles: &[File],
    file_size: u64,
    lm_head_int8: bool,
) -> Result<Layout, CacheError> {
    let named = sources_by_name(ck, lm_head_int8)?;
    let zeros_needed = zero_points_needed(ck, handles, &named)?;
    let mut placer = Placer::new(file_size);
    let mut tensors = Vec::with_capacity(named.len());
    let mut groups: Vec<Group> = Vec::new();
    let mut sources = Vec::with_capacity(named.len());
    for (i, ((name, source), needs_zeros)) in named.into_iter().zip(zeros_needed).enumerate() {
        let (shape, lens) = shape_and_lens(&source, needs_zeros);
        let (file, spans) = placer.place(&lens);
        let payload = payload_of(&source, &spans);
        let g = group_of(&name);
        match groups.last_mut() {
            Some(last) if last.file == file as usize && last.name == g => {
                last.items.end = i + 1;
                last.end = placer.pos;
            }
            _ => groups.push(Group {
                file: file as usize,
                name: g,
                items: i..i + 1,
                end: placer.pos,
            }),
        }
        tensors.push(TensorEntry {
            name,
            shape,
            payload,
        });
        sources.push(source);
    }
    let (config_json, aux) = metadata_files(ck)?;
    Ok(Layout {
        index: Index {
            format: FORMAT_VERSION,
            alignment: ALIGN as u32,
            config_json,
            aux,
            files: placer.finish(),
            tensors,
        },
        sources,
        groups,
    })
}

/// The entries to write, in natural name order: quantized modules by module
/// name, everything else as-is (a float lm_head as int8 when asked).
fn sources_by_name(
    ck: &Checkpoint,
    lm_head_int8: bool,
) -> Result<Vec<(String, Source)>, CacheError> {
    let mut consumed = std::collections::HashSet::new();
    let mut named: Vec<(String, Source)> = Vec::new();
    for name in ck.tensors.keys() {
        if let Some(module) = name.strip_suffix(".qweight") {
            named.push((module.to_string(), quant_source(ck, module)?));
            for s in ["qweight", "qzeros", "scales"] {
                consumed.insert(format!("{module}.{s}"));
            }
        }
    }
    for (name, e) in &ck.tensors {
        if lm_head_int8 && lm_head_to_int8(name, e) {
            // Named after the module, as quantized entries are.
            named.push(("lm_head".to_string(), Source::Int8(e.clone())));
        } else if !consumed.contains(name) {
            named.push((name.clone(), Source::Copy(e.clone())));
        }
    }
    named.sort_by(|a, b| natural_cmp(&a.0, &b.0));
    Ok(named)
}

/// Whether each quantized entry needs its zero points stored (they are not
/// all the symmetric value): reads every (small) qzeros, in parallel.
fn zero_points_needed(
    ck: &Checkpoint,
    handles: &[File],
    named: &[(String, Source)],
) -> Result<Vec<bool>, CacheError> {
    named
        .par_iter()
        .map(|(_, s)| match s {
            Source::Quant {
                qzeros,
                bits,
                rows,
                cols,
                group_size,
                zeros_minus_one,
                ..
            } => {
                let qz = read_at(
                    &handles[qzeros.file],
                    &ck.files[qzeros.file],
                    qzeros.offset,
                    qzeros.len,
                )?;
                Ok(!qzeros_symmetric(
                    &qz,
                    *rows,
                    cols.div_ceil(*group_size),
                    *bits,
                    *zeros_minus_one,
                ))
            }
            Source::Copy(_) | Source::Int8(_) => Ok(false),
        })
        .collect()
}

/// An entry's shape and the byte length of each of its payloads (packed
/// weights, scales, zero points when needed).
fn shape_and_lens(source: &Source, needs_zeros: bool) -> (Vec<u64>, Vec<u64>) {
    match source {
        Source::Quant {
            rows,
            cols,
            bits,
            group_size,
            ..
        } => {
            let q = (*rows * QuantMatrix::packed_row_bytes(*cols, *bits)) as u64;
            let s = (*rows * cols.div_ceil(*group_size) * 2) as u64;
            let mut l = vec![q, s];
            if needs_zeros {
                l.push(s);
            }
            (vec![*rows as u64, *cols as u64], l)
        }
        Source::Copy(e) => (
            e.shape.iter().map(|&d| d as u64).collect(),
            vec![e.len as u64],
        ),
        Source::Int8(e) => {
            let (rows, cols) = (e.shape[0], e.shape[1]);
            let q = (rows * cols) as u64;
            let s = (rows * cols.div_ceil(LM_HEAD_GROUP) * 2) as u64;
            (vec![rows as u64, cols as u64], vec![q, s])
        }
    }
}

/// The index's description of an entry's payloads at their spans.
fn payload_of(source: &Source, spans: &[Span]) -> Payload {
    match source {
        Source::Quant {
            bits, group_size, ..
        } => Payload::Quant {
            bits: *bits,
            group_size: *group_size as u32,
            qdata: spans[0],
            scales: spans[1],
            zeros: spans.get(2).copied(),
        },
        Source::Int8(_) => Payload::Quant {
            bits: 8,
            group_size: LM_HEAD_GROUP as u32,
            qdata: spans[0],
            scales: spans[1],
            zeros: None,
        },
        Source::Copy(e) => match float_type(e.dtype) {
            Some(t) => Payload::Dense {
                dtype: FloatKind::from_float_type(t),
                data: spans[0],
            },
            None => Payload::Raw {
                dtype: format!("{:?}", e.dtype),
                data: spans[0],
            },
        },
    }
}

/// Places payloads one after another, aligned, in data files of at most
/// `file_size` bytes (an entry bigger than that gets a file of its own).
struct Placer {
    file_size: u64,
    files: Vec<DataFile>,
    /// Offset after the last payload placed in the current file.
    pos: u64,
}

impl Placer {
    fn new(file_size: u64) -> Placer {
        Placer {
            file_size,
            files: Vec::new(),
            pos: HEADER_LEN as u64,
        }
    }

    /// Places one entry's payloads together in one file; returns the file
    /// and their spans.
    fn place(&mut self, lens: &[u64]) -> (u32, Vec<Span>) {
        let size: u64 = lens.iter().map(|&l| align_up(l)).sum();
        let full = self.pos > HEADER_LEN as u64 && align_up(self.pos) + size > self.file_size;
        if self.files.is_empty() || full {
            if let Some(last) = self.files.last_mut() {
                last.size = self.pos;
            }
            self.files.push(DataFile {
                name: data_file_name(self.files.len()),
                size: 0,
            });
            self.pos = HEADER_LEN as u64;
        }
        let file = (self.files.len() - 1) as u32;
        let spans = lens
            .iter()
            .map(|&len| {
                let offset = align_up(self.pos);
                self.pos = offset + len;
                Span { file, offset, len }
            })
            .collect();
        (file, spans)
    }

    /// The data files with their final sizes.
    fn finish(mut self) -> Vec<DataFile> {
        if let Some(last) = self.files.last_mut() {
            last.size = self.pos;
        }
        self.files
    }
}

/// `config.json` and the non-weight files the index carries.
fn metadata_files(ck: &Checkpoint) -> Result<(Vec<u8>, Vec<AuxFile>), CacheError> {
    let config_json = std::fs::read(ck.dir.join("config.json"))
        .map_err(|e| FsError::io(ck.dir.join("config.json"), e))?;
    let mut aux = Vec::new();
    for name in AUX_FILES
        .iter()
        .copied()
        .chain(["quantization_config.json"])
    {
        let p = ck.dir.join(name);
        if p.is_file() {
            aux.push(AuxFile {
                name: name.to_string(),
                bytes: std::fs::read(&p).map_err(|e| FsError::io(&p, e))?,
            });
        }
    }
    Ok((config_json, aux))
}

// Recorded in stage records by fetch and repack alike, so it lives in
// `stage`; re-exported for the callers that have used it from here.
pub use crate::stage::file_identity;

/// The input fingerprint: format, settings, the cache directory, and every
/// checkpoint file's size and blake3 of its whole content. Hashing is
/// skipped for a file whose [`file_identity`] is the one recorded beside a
/// hash, by the fetch stage (when the checkpoint is fetch's output) or by
/// the last repack; any other file is hashed whole, so a file replaced by
/// another with the same headers (same shapes, other weights) is seen.
///
/// Returns the fingerprint and the `name -> {id, blake3}` table to record.
fn fingerprint(
    opts: &RepackOptions,
    fetch: Option<&stage::StageRecord>,
) -> Result<(String, BTreeMap<String, InputFile>), CacheError> {
    let mut fp = Fingerprint::new();
    fp.add("format", FORMAT_VERSION.to_le_bytes());
    fp.add("file_size", opts.file_size.to_le_bytes());
    if opts.lm_head_int8 {
        // Only when set, so existing caches stay up to date.
        fp.add("lm_head", "int8");
    }
    fp.add("cache", opts.cache.as_os_str().as_encoded_bytes());
    let fetch = fetch.filter(|r| {
        r.status == stage::Status::Complete && Path::new(&r.output_dir) == opts.checkpoint
    });
    // name -> (identity, blake3) vouched for by an earlier stage.
    let mut known: BTreeMap<String, InputFile> = BTreeMap::new();
    let prior = stage::read_record(&opts.work_dir, Stage::Repack)
        .ok()
        .flatten();
    if let Some(d) = prior.and_then(|r| r.details_as::<RepackDetails>(&opts.work_dir).ok()) {
        known = d.input_files;
    }
    if let Some(r) = fetch {
        let ids: FetchIdentities = r.details_as(&opts.work_dir).unwrap_or_default();
        for o in r.outputs.iter() {
            if let (Some(h), Some(id)) = (&o.blake3, ids.identity.get(&o.path)) {
                known.insert(
                    o.path.clone(),
                    InputFile {
                        id: id.clone(),
                        blake3: h.clone(),
                    },
                );
            }
        }
    }
    let mut entries: Vec<_> = std::fs::read_dir(&opts.checkpoint)
        .map_err(|e| FsError::io(&opts.checkpoint, e))?
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.file_name());
    let mut table = BTreeMap::new();
    for e in entries {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        // Our lock file and other tool state are not checkpoint content.
        if name.starts_with(".roundhouse-") || name.starts_with(".rh") {
            continue;
        }
        let m = std::fs::metadata(&path).map_err(|err| FsError::io(&path, err))?;
        if !m.is_file() {
            continue;
        }
        let id = file_identity(&m);
        let hash = match known.get(&name) {
            Some(k) if k.id == id => k.blake3.clone(),
            _ => fsutil::blake3_file(&path)?.to_hex().to_string(),
        };
        fp.add(&name, format!("{}:{hash}", m.len()));
        table.insert(name, InputFile { id, blake3: hash });
    }
    Ok((fp.finish(), table))
}

/// Refuses to touch a file in the cache directory that this tool did not
/// write: `index.rhc` without the index magic, a `data-NNNNN.rhd` (or its
/// `.tmp`) without the data magic, or anything of those names that is not
/// a regular file (a symlink, a directory). `--force` skips the check.
fn check_ours(cache: &Path) -> Result<(), CacheError> {
    let rd = match std::fs::read_dir(cache) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(FsError::io(cache, e).into()),
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let magic: &[u8] = if name == INDEX_FILE || name == format!("{INDEX_FILE}.tmp") {
            &super::format::INDEX_MAGIC
        } else if is_data_file_name(&name) {
            &super::format::DATA_MAGIC
        } else {
            continue;
        };
        let path = e.path();
        let m = std::fs::symlink_metadata(&path).map_err(|err| FsError::io(&path, err))?;
        let what = if !m.file_type().is_file() {
            Some("not a regular file")
        } else if m.len() == 0 && name.ends_with(".tmp") {
            None // created by a run killed before its header was written
        } else if !super::has_magic(&path, magic) {
            Some("not written by rh-repack (no roundhouse header)")
        } else {
            None
        };
        if let Some(what) = what {
            return Err(FsError::NotOurs {
                path,
                what: what.into(),
            }
            .into());
        }
    }
    Ok(())
}

/// The most extra disk space the data files still need at any moment:
/// files are written in order as temporaries, each replacing the file of
/// the same name (if any) only once complete, so while file `i` is written
/// the old files `i..` still exist. Partial temporaries of a killed run
/// count as already written.
fn space_needed(layout: &Layout, cache: &Path, run: &stage::StageRun) -> u64 {
    let mut extra: i128 = 0;
    let mut peak: i128 = 0;
    for df in &layout.index.files {
        let final_path = cache.join(&df.name);
        let tmp = fsutil::temp_path(&final_path);
        let on_disk = std::fs::metadata(&final_path).map(|m| m.len()).ok();
        if run
            .unit(&format!("file:{}", df.name))
            .is_some_and(|o| o.size == df.size)
            && on_disk == Some(df.size)
        {
            continue;
        }
        let partial = std::fs::metadata(&tmp).map(|m| m.len()).unwrap_or(0);
        extra += df.size.saturating_sub(partial) as i128;
        peak = peak.max(extra);
        // The rename frees the old file of that name.
        extra -= on_disk.unwrap_or(0) as i128;
    }
    peak.max(0) as u64
}

/// Payload bytes: read from the checkpoint, or converted (no extra copy).
enum Buf {
    /// Read as-is.
    Read(Vec<u8>),
    /// Produced by the conversion.
    Converted(crate::tensor::Bytes),
}

impl Buf {
    fn as_slice(&self) -> &[u8] {
        match self {
            Buf::Read(v) => v,
            Buf::Converted(b) => b.as_slice(),
        }
    }
}

/// A converted tensor: its payloads, each with its planned span.
type Produced = Vec<(Span, Buf)>;

fn produce(
    source: &Source,
    entry: &TensorEntry,
    ck: &Checkpoint,
    handles: &[File],
) -> Result<Produced, CacheError> {
    let read = |e: &CkEntry| read_at(&handles[e.file], &ck.files[e.file], e.offset, e.len);
    match (source, &entry.payload) {
        (
            Source::Quant {
                module,
                qweight,
                qzeros,
                scales,
                bits,
                group_size,
                rows,
                cols,
                zeros_minus_one,
            },
            Payload::Quant {
                qdata: qs,
                scales: ss,
                zeros: zs,
                ..
            },
        ) => {
            let (qw, qz, sc) = (read(qweight)?, read(qzeros)?, read(scales)?);
            let m = AutoRoundTensors {
                module,
                qweight: &qw,
                qzeros: &qz,
                scales: &sc,
                out_features: *rows,
                in_features: *cols,
                bits: *bits,
                group_size: *group_size,
                zeros_minus_one: *zeros_minus_one,
            }
            .to_kernel_layout()
            .map_err(|e| input_err(format!("{}: {e}", ck.dir.display())))?;
            let mut out = vec![
                (*qs, Buf::Converted(m.qdata.clone())),
                (*ss, Buf::Converted(m.scales.clone())),
            ];
            match (zs, &m.zeros) {
                (None, Zeros::Symmetric) => {}
                (Some(z), Zeros::PerGroup(b)) => out.push((*z, Buf::Converted(b.clone()))),
                (Some(z), Zeros::Symmetric) => {
                    let v = QuantMatrix::symmetric_zero(*bits).to_le_bytes();
                    out.push((*z, Buf::Read(v.repeat(z.len as usize / 2))));
                }
                (None, Zeros::PerGroup(_)) => {
                    return Err(input_err(format!(
                        "{}: `{module}`: zero points changed between planning and writing",
                        ck.dir.display()
                    )))
                }
            }
            Ok(out)
        }
        (Source::Copy(e), Payload::Dense { data, .. } | Payload::Raw { data, .. }) => {
            Ok(vec![(*data, Buf::Read(read(e)?))])
        }
        (Source::Int8(e), Payload::Quant { qdata, scales, .. }) => {
            let t = float_type(e.dtype).expect("planned for float tensors only");
            let (q, sc) = quantize_int8(&read(e)?, t, e.shape[0], e.shape[1]);
            Ok(vec![(*qdata, Buf::Read(q)), (*scales, Buf::Read(sc))])
        }
        _ => unreachable!("plan pairs sources with payloads of the same kind"),
    }
}

/// Quantizes a float matrix (`rows x cols` elements of `t`, row-major) to
/// int8 per [`LM_HEAD_GROUP`] columns, symmetric (zero point 128): the
/// step is the group's `max |w| / 127` rounded to f16, and each weight the
/// nearest step. Returns the kernel layout's `qdata` and f16 `scales`.
/// Rows run in parallel on the current pool.
pub fn quantize_int8(
    data: &[u8],
    t: crate::tensor::FloatType,
    rows: usize,
    cols: usize,
) -> (Vec<u8>, Vec<u8>) {
    let es = t.size();
    assert_eq!(data.len(), rows * cols * es, "quantize_int8: data length");
    let ng = cols.div_ceil(LM_HEAD_GROUP);
    let mut q = vec![0u8; rows * cols];
    let mut sc = vec![0u8; rows * ng * 2];
    q.par_chunks_mut(cols.max(1))
        .zip(sc.par_chunks_mut(ng * 2))
        .enumerate()
        .for_each(|(r, (qr, sr))| {
            let w = crate::checkpoint::to_f32(t, &data[r * cols * es..(r + 1) * cols * es]);
            for (g, (wg, qg)) in w
                .chunks(LM_HEAD_GROUP)
                .zip(qr.chunks_mut(LM_HEAD_GROUP))
                .enumerate()
            {
                let amax = wg.iter().fold(0f32, |m, v| m.max(v.abs()));
                let step = half::f16::from_f32(amax / 127.0);
                let s = step.to_f32();
                for (qi, wi) in qg.iter_mut().zip(wg) {
                    let v = if s > 0.0 && s.is_finite() {
                        (wi / s).round().clamp(-127.0, 127.0)
                    } else {
                        0.0
                    };
                    *qi = (v as i32 + 128) as u8;
                }
                sr[2 * g..2 * g + 2].copy_from_slice(&step.to_le_bytes());
            }
        });
    (q, sc)
}

/// Writes planned payloads at their offsets (zero padding in between).
struct PayloadWriter {
    w: FolioWriter,
    pos: u64,
    path: PathBuf,
}

impl PayloadWriter {
    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> Result<(), CacheError> {
        if offset < self.pos {
            return Err(input_err(format!(
                "{}: internal error: payload at {} but already at {}",
                self.path.display(),
                offset,
                self.pos
            )));
        }
        self.pad_to(offset)?;
        self.w
            .write_all(bytes)
            .map_err(|e| FsError::io(&self.path, e))?;
        self.pos += bytes.len() as u64;
        Ok(())
    }
    fn pad_to(&mut self, offset: u64) -> Result<(), CacheError> {
        let mut pad = (offset - self.pos) as usize;
        while pad > 0 {
            let n = pad.min(ALIGN as usize);
            self.w
                .write_all(&[0u8; ALIGN as usize][..n])
                .map_err(|e| FsError::io(&self.path, e))?;
            pad -= n;
        }
        self.pos = offset;
        Ok(())
    }
    /// Copies `len` bytes of `src` at `src_offset` to `offset`; std's
    /// `io::copy` between files uses `copy_file_range`.
    fn copy_at(
        &mut self,
        offset: u64,
        src: &Path,
        src_offset: u64,
        len: u64,
    ) -> Result<(), CacheError> {
        self.pad_to(offset)?;
        let mut f = File::open(src).map_err(|e| FsError::io(src, e))?;
        f.seek(SeekFrom::Start(src_offset))
            .map_err(|e| FsError::io(src, e))?;
        // Through the block buffer, not `copy_file_range`: the copy's
        // page cache folios then come out 2 MiB like the rest.
        let n = self.w.copy_from(&mut f, len).map_err(|e| {
            // A read error names the source, a write error the output.
            FsError::io(&self.path, e)
        })?;
        if n != len {
            return Err(input_err(format!(
                "{}: truncated: {len} bytes expected at offset {src_offset}, got {n}",
                src.display()
            )));
        }
        self.pos += len;
        Ok(())
    }
    fn flush(&mut self) -> Result<(), CacheError> {
        self.w.flush().map_err(|e| FsError::io(&self.path, e))?;
        Ok(())
    }
}

/// What the repack record's `details` hold.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RepackDetails {
    /// [`FORMAT_VERSION`] of the cache written.
    pub format_version: u32,
    /// Data files.
    pub files: usize,
    /// Each checkpoint file's identity and blake3, so the next run hashes
    /// only files that changed.
    pub input_files: BTreeMap<String, InputFile>,
    /// Entries in the tensor table.
    pub tensors: usize,
    /// Bytes of all data files.
    pub bytes: u64,
    /// blake3 of the index (hex).
    pub index_blake3: String,
}

/// A checkpoint file as the last repack saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct InputFile {
    /// [`file_identity`] when it was hashed.
    pub id: String,
    /// blake3 of its whole content (hex).
    pub blake3: String,
}

/// What repack reads of the fetch record's `details`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct FetchIdentities {
    /// File name -> [`file_identity`] at the time fetch hashed it.
    identity: BTreeMap<String, String>,
}

impl RepackOutcome {
    /// The outcome a record describes (a run that found the cache up to
    /// date; a finished run sets `up_to_date` and `resumed` itself).
    fn recorded(opts: &RepackOptions, d: RepackDetails, t0: Instant) -> RepackOutcome {
        RepackOutcome {
            up_to_date: true,
            resumed: false,
            cache: opts.cache.clone(),
            files: d.files,
            tensors: d.tensors,
            bytes: d.bytes,
            index_blake3: d.index_blake3,
            seconds: t0.elapsed().as_secs_f64(),
        }
    }
}

/// Runs the repack stage: check and lock the inputs, plan the layout, write
/// each data file (resuming a killed run), then the index and the record.
pub fn repack(opts: &RepackOptions) -> Result<RepackOutcome, CacheError> {
    let t0 = Instant::now();
    let fetch = if opts.require_fetch {
        Some(stage::require_complete(&opts.work_dir, Stage::Fetch)?)
    } else {
        None
    };
    if let Some(f) = fetch.as_ref().filter(|f| super::published::is_published(f)) {
        return super::published::skip_repack(opts, f, t0);
    }
    if opts.cache == opts.checkpoint {
        return Err(input_err(format!(
            "{}: the cache directory must differ from the checkpoint directory",
            opts.cache.display()
        )));
    }
    // Locks first: a second writer of this cache stops here, and nobody
    // rewrites the checkpoint while it is read.
    let _ck_lock = fsutil::DirLock::shared(&opts.checkpoint)?;
    let ck = Checkpoint::open(&opts.checkpoint).map_err(|e| input_err(e.to_string()))?;
    let _cache_lock = fsutil::DirLock::exclusive(&opts.cache, "rh-repack")?;
    if !opts.force {
        check_ours(&opts.cache)?;
    }
    let (fp, input_files) = fingerprint(opts, fetch.as_ref())?;
    let inputs = BTreeMap::from([
        ("checkpoint".into(), opts.checkpoint.display().to_string()),
        ("cache".into(), opts.cache.display().to_string()),
    ]);
    fsutil::ensure_writable_dir(&opts.cache)?;
    let mut run = match stage::plan(
        &opts.work_dir,
        Stage::Repack,
        &fp,
        &opts.cache,
        inputs,
        opts.force,
    )? {
        Plan::UpToDate(rec) => {
            let details = rec.details_as(&opts.work_dir)?;
            return Ok(RepackOutcome::recorded(opts, details, t0));
        }
        Plan::Run(run) => run,
    };

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.unwrap_or(0))
        .build()
        .map_err(|e| input_err(format!("thread pool: {e}")))?;
    let handles: Vec<File> = ck
        .files
        .iter()
        .map(|p| File::open(p).map_err(|e| FsError::io(p, e).into()))
        .collect::<Result<_, CacheError>>()?;
    let layout = pool.install(|| plan_layout(&ck, &handles, opts.file_size, opts.lm_head_int8))?;
    let (index_bytes, index_hash) = encode_index(&layout);
    if !opts.skip_space_check {
        check_space(opts, &layout, &run, index_bytes.len() as u64)?;
    }

    let total: u64 = layout.index.files.iter().map(|f| f.size).sum();
    let bar = crate::cli::bytes_bar(total, "repack", opts.quiet);
    let mut index = OldIndex::new(&opts.cache);
    let mut writer = DataFileWriter {
        opts,
        layout: &layout,
        ck: &ck,
        handles: &handles,
        pool: &pool,
        index_hash,
        bar: &bar,
        units_this_run: 0,
    };
    for (fi, df) in layout.index.files.iter().enumerate() {
        writer.write_file(fi, df, &mut run, &mut index)?;
    }
    bar.finish_and_clear();
    index.retire()?;
    remove_stale_data_files(opts, &layout)?;
    let outputs = write_index(opts, &layout, &index_bytes, index_hash)?;

    let details = RepackDetails {
        format_version: FORMAT_VERSION,
        files: layout.index.files.len(),
        input_files,
        tensors: layout.index.tensors.len(),
        bytes: total,
        index_blake3: blake3::Hash::from(index_hash).to_hex().to_string(),
    };
    let mut outcome = RepackOutcome::recorded(opts, details.clone(), t0);
    outcome.up_to_date = false;
    outcome.resumed = run.resumed;
    run.finish(outputs, details)?;
    Ok(outcome)
}

/// The index's bytes and their hash (which every data file's header
/// carries, tying the files to this index).
fn encode_index(layout: &Layout) -> (Vec<u8>, [u8; 32]) {
    let index_bytes = layout.index.to_bytes();
    let index_hash = *blake3::hash(&index_bytes).as_bytes();
    tracing::info!(
        "repack plan: {} tensors in {} data files, index {} bytes",
        layout.index.tensors.len(),
        layout.index.files.len(),
        index_bytes.len()
    );
    (index_bytes, index_hash)
}

/// Refuses to start when the free space is below what the remaining data
/// files and the index need.
fn check_space(
    opts: &RepackOptions,
    layout: &Layout,
    run: &stage::StageRun,
    index_len: u64,
) -> Result<(), CacheError> {
    let need = space_needed(layout, &opts.cache, run) + index_len;
    match crate::fsutil::free_bytes(&opts.cache) {
        Some(free) if need > free => Err(CacheError::Disk {
            dir: opts.cache.clone(),
            need: crate::cli::human_bytes(need),
            free: crate::cli::human_bytes(free),
        }),
        _ => Ok(()),
    }
}

/// The index of the cache being replaced. The directory stops claiming to
/// be a cache once the first new data file replaces an old one, until the
/// new index lands; until then (a failure writing the first file: disk
/// full, ...) an earlier complete cache stays untouched and usable.
struct OldIndex {
    path: PathBuf,
    dir: PathBuf,
    removed: bool,
}

impl OldIndex {
    fn new(cache: &Path) -> OldIndex {
        OldIndex {
            path: cache.join(INDEX_FILE),
            dir: cache.to_path_buf(),
            removed: false,
        }
    }

    /// Removes the old index (once), durably.
    fn retire(&mut self) -> Result<(), CacheError> {
        if !self.removed {
            match std::fs::remove_file(&self.path) {
                Ok(()) => fsutil::sync_dir(&self.dir)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(FsError::io(&self.path, e).into()),
            }
            self.removed = true;
        }
        Ok(())
    }
}

/// Everything writing one data file needs, shared by all files of a run.
struct DataFileWriter<'a> {
    opts: &'a RepackOptions,
    layout: &'a Layout,
    ck: &'a Checkpoint,
    handles: &'a [File],
    pool: &'a rayon::ThreadPool,
    index_hash: [u8; 32],
    bar: &'a indicatif::ProgressBar,
    /// Groups recorded by this run (for [`RepackOptions::stop_after_units`]).
    units_this_run: usize,
}

impl DataFileWriter<'_> {
    /// Writes data file `fi` as a temporary, resuming after the groups a
    /// killed run recorded, then renames it into place and records it.
    fn write_file(
        &mut self,
        fi: usize,
        df: &DataFile,
        run: &mut stage::StageRun,
        index: &mut OldIndex,
    ) -> Result<(), CacheError> {
        let final_path = self.opts.cache.join(&df.name);
        let tmp = fsutil::temp_path(&final_path);
        let file_unit = format!("file:{}", df.name);
        let on_disk = std::fs::metadata(&final_path).map(|m| m.len()).ok();
        if run.unit(&file_unit).is_some_and(|o| o.size == df.size) && on_disk == Some(df.size) {
            self.bar.inc(df.size);
            return Ok(());
        }
        let groups: Vec<&Group> = self.layout.groups.iter().filter(|g| g.file == fi).collect();
        let (done, resume_at) = resume_point(run, df, &groups, &tmp);
        let (file, pos) = if done > 0 {
            tracing::info!("{}: resuming after {done} tensor groups", tmp.display());
            (reopen_at(&tmp, resume_at)?, resume_at)
        } else {
            (self.create(&tmp, fi, df)?, HEADER_LEN as u64)
        };
        self.bar.inc(pos);
        let mut w = PayloadWriter {
            // 2 MiB-aligned writes, so the fresh cache maps on 2 MiB pages.
            w: FolioWriter::new(file, pos),
            pos,
            path: tmp.clone(),
        };
        if let Err(e) = self.write_groups(&mut w, &groups[done..], df, run) {
            // A failed write (disk full, ...) leaves no partial file behind;
            // a stop (kill) keeps it so the next run resumes.
            if !matches!(e, CacheError::Stopped(_)) {
                drop(w);
                let _ = std::fs::remove_file(&tmp);
            }
            return Err(e);
        }
        if w.pos != df.size {
            return Err(input_err(format!(
                "{}: internal error: wrote {} bytes, planned {}",
                tmp.display(),
                w.pos,
                df.size
            )));
        }
        let f = w.w.into_inner().map_err(|e| FsError::io(&tmp, e))?;
        f.sync_all().map_err(|e| FsError::io(&tmp, e))?;
        drop(f);
        index.retire()?;
        fsutil::commit_temp(&tmp, &final_path)?;
        run.unit_done(
            &file_unit,
            Output {
                path: df.name.clone(),
                size: df.size,
                blake3: None,
            },
        )?;
        Ok(())
    }

    /// A new temporary holding the data header.
    fn create(&self, tmp: &Path, fi: usize, df: &DataFile) -> Result<File, CacheError> {
        let mut f = File::create(tmp).map_err(|e| FsError::io(tmp, e))?;
        let h = DataHeader {
            file_no: fi as u32,
            n_files: self.layout.index.files.len() as u32,
            size: df.size,
            index_hash: self.index_hash,
        };
        f.write_all(&h.encode()).map_err(|e| FsError::io(tmp, e))?;
        Ok(f)
    }

    /// Converts and writes `todo` (the file's groups not yet recorded), each
    /// recorded once durable. The conversion runs on its own thread, and
    /// fsync on another so writing the next group overlaps flushing the
    /// last one.
    fn write_groups(
        &mut self,
        w: &mut PayloadWriter,
        todo: &[&Group],
        df: &DataFile,
        run: &mut stage::StageRun,
    ) -> Result<(), CacheError> {
        let sync_file =
            w.w.get_ref()
                .try_clone()
                .map_err(|e| FsError::io(&w.path, e))?;
        let tmp = w.path.clone();
        std::thread::scope(|scope| -> Result<(), CacheError> {
            let (tx, rx) = std::sync::mpsc::sync_channel(4);
            let (layout, ck, handles, pool) = (self.layout, self.ck, self.handles, self.pool);
            scope.spawn(move || produce_groups(layout, todo, ck, handles, pool, tx));
            let (sync_tx, sync_rx) = std::sync::mpsc::channel::<usize>();
            let (synced_tx, synced_rx) = std::sync::mpsc::channel::<Result<usize, CacheError>>();
            let tmp_ref = &tmp;
            scope.spawn(move || {
                for gi in sync_rx {
                    let r = sync_file
                        .sync_data()
                        .map(|()| gi)
                        .map_err(|e| FsError::io(tmp_ref, e).into());
                    let failed = r.is_err();
                    if synced_tx.send(r).is_err() || failed {
                        break;
                    }
                }
            });
            // Dropping `rx` on any early return stops the producer.
            for msg in rx {
                if let Some(gi) = self.apply(w, msg?, todo)? {
                    let _ = sync_tx.send(gi);
                }
                while let Ok(r) = synced_rx.try_recv() {
                    self.record(r?, todo, df, &tmp, run)?;
                }
            }
            drop(sync_tx);
            for r in synced_rx {
                self.record(r?, todo, df, &tmp, run)?;
            }
            Ok(())
        })
    }

    /// Writes one message of the producer; a group's end (checked against
    /// the plan and flushed) returns its position for fsync.
    fn apply(
        &self,
        w: &mut PayloadWriter,
        msg: Msg,
        todo: &[&Group],
    ) -> Result<Option<usize>, CacheError> {
        let before = w.pos;
        match msg {
            Msg::Write(offset, bytes) => w.write_at(offset, bytes.as_slice())?,
            Msg::Copy {
                file,
                src_offset,
                len,
                dst,
            } => w.copy_at(dst, &self.ck.files[file], src_offset, len)?,
            Msg::GroupEnd(gi) => {
                let g = todo[gi];
                if w.pos != g.end {
                    return Err(input_err(format!(
                        "{}: internal error: group `{}` ends at {}, planned {}",
                        w.path.display(),
                        g.name,
                        w.pos,
                        g.end
                    )));
                }
                w.flush()?;
                return Ok(Some(gi));
            }
        }
        self.bar.inc(w.pos - before);
        Ok(None)
    }

    /// Records a durable group; stops here when the test hook says so.
    fn record(
        &mut self,
        gi: usize,
        todo: &[&Group],
        df: &DataFile,
        tmp: &Path,
        run: &mut stage::StageRun,
    ) -> Result<(), CacheError> {
        let g = todo[gi];
        run.unit_done(
            &format!("{}:{}", df.name, g.name),
            Output {
                path: tmp.file_name().expect("file").to_string_lossy().into(),
                size: g.end,
                blake3: None,
            },
        )?;
        self.units_this_run += 1;
        if self.opts.stop_after_units == Some(self.units_this_run) {
            self.bar.abandon();
            return Err(CacheError::Stopped(self.units_this_run));
        }
        Ok(())
    }
}

/// The resume point of a data file: how many of its groups a killed run
/// recorded (a prefix) and the offset after them, when the temporary still
/// holds at least that much; `(0, 0)` to start over.
fn resume_point(
    run: &stage::StageRun,
    df: &DataFile,
    groups: &[&Group],
    tmp: &Path,
) -> (usize, u64) {
    let mut done = 0;
    let mut resume_at = 0u64;
    for g in groups {
        if run
            .unit(&format!("{}:{}", df.name, g.name))
            .is_some_and(|o| o.size == g.end)
        {
            done += 1;
            resume_at = g.end;
        } else {
            break;
        }
    }
    let tmp_len = std::fs::metadata(tmp).map(|m| m.len()).unwrap_or(0);
    if done > 0 && tmp_len >= resume_at {
        (done, resume_at)
    } else {
        (0, 0)
    }
}

/// The temporary cut back to `resume_at` and positioned there.
fn reopen_at(tmp: &Path, resume_at: u64) -> Result<File, CacheError> {
    let mut f = OpenOptions::new()
        .write(true)
        .open(tmp)
        .map_err(|e| FsError::io(tmp, e))?;
    f.set_len(resume_at).map_err(|e| FsError::io(tmp, e))?;
    f.seek(SeekFrom::Start(resume_at))
        .map_err(|e| FsError::io(tmp, e))?;
    Ok(f)
}

/// Removes the data files of an earlier, larger cache (only ours, unless
/// `--force`).
fn remove_stale_data_files(opts: &RepackOptions, layout: &Layout) -> Result<(), CacheError> {
    let keep: std::collections::HashSet<&str> =
        layout.index.files.iter().map(|f| f.name.as_str()).collect();
    for e in std::fs::read_dir(&opts.cache)
        .map_err(|e| FsError::io(&opts.cache, e))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if is_data_file_name(&name)
            && !keep.contains(name.as_str())
            && (opts.force || super::has_magic(&e.path(), &super::format::DATA_MAGIC))
        {
            std::fs::remove_file(e.path()).map_err(|err| FsError::io(e.path(), err))?;
        }
    }
    Ok(())
}

/// Writes the index atomically (the last file: its presence says the cache
/// is complete) and returns the stage's outputs.
fn write_index(
    opts: &RepackOptions,
    layout: &Layout,
    index_bytes: &[u8],
    index_hash: [u8; 32],
) -> Result<Vec<Output>, CacheError> {
    let index_path = opts.cache.join(INDEX_FILE);
    let header = IndexHeader {
        version: FORMAT_VERSION,
        index_offset: HEADER_LEN as u64,
        index_len: index_bytes.len() as u64,
        index_hash,
    };
    fsutil::write_atomic_with(&index_path, |f| {
        f.write_all(&header.encode())?;
        f.write_all(index_bytes)
    })?;
    let index_file_hash = fsutil::blake3_file(&index_path)?.to_hex().to_string();
    let mut outputs: Vec<Output> = layout
        .index
        .files
        .iter()
        .map(|f| Output {
            path: f.name.clone(),
            size: f.size,
            blake3: None,
        })
        .collect();
    outputs.push(Output {
        path: INDEX_FILE.into(),
        size: (HEADER_LEN + index_bytes.len()) as u64,
        blake3: Some(index_file_hash),
    });
    Ok(outputs)
}

/// What the converting thread hands the writing thread.
enum Msg {
    /// Bytes to write at a file offset (zero padding before it).
    Write(u64, Buf),
    /// Copy `len` bytes at `src_offset` of checkpoint file `file` to the
    /// output offset `dst` in the kernel (`copy_file_range`), no user copy.
    Copy {
        file: usize,
        src_offset: u64,
        len: u64,
        dst: u64,
    },
    /// The group with this position in the file's list is complete.
    GroupEnd(usize),
}

/// Converts the tensor groups `groups` in order, sending their payloads to
/// the writer: small tensors in parallel batches, big dense ones in chunks.
/// Runs on its own thread so conversion overlaps writing and fsync; stops
/// when the writer hangs up.
fn produce_groups(
    layout: &Layout,
    groups: &[&Group],
    ck: &Checkpoint,
    handles: &[File],
    pool: &rayon::ThreadPool,
    tx: std::sync::mpsc::SyncSender<Result<Msg, CacheError>>,
) {
    let run = || -> Result<(), CacheError> {
        let send = |m: Msg| tx.send(Ok(m)).map_err(|_| CacheError::Stopped(0));
        for (gi, g) in groups.iter().enumerate() {
            let mut i = g.items.start;
            while i < g.items.end {
                let src = &layout.sources[i];
                if let (Source::Copy(e), true) = (src, src.input_bytes() > CHUNK) {
                    let span = layout.index.tensors[i].spans()[0];
                    let mut done = 0usize;
                    while done < e.len {
                        let n = (e.len - done).min(CHUNK as usize);
                        send(Msg::Copy {
                            file: e.file,
                            src_offset: (e.offset + done) as u64,
                            len: n as u64,
                            dst: span.offset + done as u64,
                        })?;
                        done += n;
                    }
                    i += 1;
                    continue;
                }
                // A batch of consecutive small tensors, converted in parallel.
                let mut end = i;
                let mut bytes = 0;
                while end < g.items.end
                    && (end == i || bytes < BATCH_BYTES)
                    && !matches!(&layout.sources[end], s @ Source::Copy(_) if s.input_bytes() > CHUNK)
                {
                    bytes += layout.sources[end].input_bytes();
                    end += 1;
                }
                let produced: Vec<Produced> = pool.install(|| {
                    (i..end)
                        .into_par_iter()
                        .map(|j| produce(&layout.sources[j], &layout.index.tensors[j], ck, handles))
                        .collect::<Result<_, CacheError>>()
                })?;
                for p in produced {
                    for (span, b) in p {
                        if b.as_slice().len() as u64 != span.len {
                            return Err(input_err(format!(
                                "internal error: payload of {} bytes for a {}-byte span",
                                b.as_slice().len(),
                                span.len
                            )));
                        }
                        send(Msg::Write(span.offset, b))?;
                    }
                }
                i = end;
            }
            send(Msg::GroupEnd(gi))?;
        }
        Ok(())
    };
    if let Err(e) = run() {
        // The writer may have hung up already; then nobody needs the error.
        let _ = tx.send(Err(e));
    }
}
