//! The on-disk format (`docs/cache-format.md`): the two fixed headers, the
//! rkyv-archived [`Index`], and the checks every reader applies before it
//! trusts an offset.

use std::cmp::Ordering;
use std::path::Path;

use crate::tensor::{FloatType, QuantMatrix, QBLOCK};

use super::CacheError;

/// Format version written in both headers; other versions are refused.
pub const FORMAT_VERSION: u32 = 1;
/// Magic of `index.rhc`.
pub const INDEX_MAGIC: [u8; 8] = *b"RHCACHE\0";
/// Magic of every data file.
pub const DATA_MAGIC: [u8; 8] = *b"RHDATA\0\0";
/// Length of both fixed headers.
pub const HEADER_LEN: usize = 64;
/// Alignment of every payload in a data file.
pub const ALIGN: u64 = 64;
/// Name of the index file in a cache directory.
pub const INDEX_FILE: &str = "index.rhc";

/// Name of data file `i` (0-based): `data-00001.rhd` for 0.
pub fn data_file_name(i: usize) -> String {
    format!("data-{:05}.rhd", i + 1)
}

/// Whether `name` is a data file name this format uses (for cleanup).
pub fn is_data_file_name(name: &str) -> bool {
    let stem = name.strip_suffix(".tmp").unwrap_or(name);
    stem.len() == "data-00001.rhd".len()
        && stem.starts_with("data-")
        && stem.ends_with(".rhd")
        && stem[5..10].bytes().all(|b| b.is_ascii_digit())
}

/// Rounds `n` up to a multiple of [`ALIGN`].
pub fn align_up(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

/// A byte range of one data file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Span {
    /// Position of the data file in [`Index::files`].
    pub file: u32,
    /// Offset from the start of the file (a multiple of [`ALIGN`]).
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Float element types stored densely.
#[derive(Clone, Copy, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum FloatKind {
    /// IEEE f32.
    F32,
    /// IEEE f16.
    F16,
    /// bfloat16.
    BF16,
}

impl FloatKind {
    /// The kernel-side type.
    pub fn float_type(self) -> FloatType {
        match self {
            FloatKind::F32 => FloatType::F32,
            FloatKind::F16 => FloatType::F16,
            FloatKind::BF16 => FloatType::BF16,
        }
    }
    /// From the kernel-side type.
    pub fn from_float_type(t: FloatType) -> FloatKind {
        match t {
            FloatType::F32 => FloatKind::F32,
            FloatType::F16 => FloatKind::F16,
            FloatType::BF16 => FloatKind::BF16,
        }
    }
}

/// How a tensor's bytes are stored.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Payload {
    /// A group-quantized linear in the [`QuantMatrix`] layout.
    Quant {
        /// 4 or 8.
        bits: u8,
        /// Elements per scale along a row (multiple of 32).
        group_size: u32,
        /// Packed values.
        qdata: Span,
        /// f16 scales `[rows, groups]`.
        scales: Span,
        /// u16 zero points `[rows, groups]`; `None` = symmetric.
        zeros: Option<Span>,
    },
    /// A float tensor, bytes as in the checkpoint.
    Dense {
        /// Element type.
        dtype: FloatKind,
        /// The bytes.
        data: Span,
    },
    /// A tensor of another safetensors dtype, bytes as in the checkpoint.
    Raw {
        /// safetensors dtype name (`I32`, `I64`, ...).
        dtype: String,
        /// The bytes.
        data: Span,
    },
}

/// One entry of the tensor table.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct TensorEntry {
    /// Module name for quantized linears, full tensor name otherwise.
    pub name: String,
    /// `[rows, cols]` for quantized linears, the safetensors shape otherwise.
    pub shape: Vec<u64>,
    /// Where and how the bytes are stored.
    pub payload: Payload,
}

impl TensorEntry {
    /// Every span of the entry.
    pub fn spans(&self) -> Vec<Span> {
        match &self.payload {
            Payload::Quant {
                qdata,
                scales,
                zeros,
                ..
            } => {
                let mut v = vec![*qdata, *scales];
                v.extend(zeros.iter().copied());
                v
            }
            Payload::Dense { data, .. } | Payload::Raw { data, .. } => vec![*data],
        }
    }
}

/// A non-weight file carried in the index.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct AuxFile {
    /// File name as in a hub repository.
    pub name: String,
    /// Contents, verbatim.
    pub bytes: Vec<u8>,
}

/// A data file of the cache.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct DataFile {
    /// File name in the cache directory.
    pub name: String,
    /// Exact size in bytes.
    pub size: u64,
}

/// The archived index.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Index {
    /// [`FORMAT_VERSION`].
    pub format: u32,
    /// [`ALIGN`].
    pub alignment: u32,
    /// `config.json`, verbatim.
    pub config_json: Vec<u8>,
    /// Tokenizer, chat template, generation defaults, quantization config.
    pub aux: Vec<AuxFile>,
    /// The data files in order.
    pub files: Vec<DataFile>,
    /// Every tensor, in (file, offset) order.
    pub tensors: Vec<TensorEntry>,
}

impl Index {
    /// Serializes to rkyv bytes (deterministic).
    pub fn to_bytes(&self) -> Vec<u8> {
        rkyv::to_bytes::<rkyv::rancor::Error>(self)
            .expect("serializing to memory cannot fail")
            .to_vec()
    }

    /// Validates and deserializes rkyv bytes (`bytecheck`); `path` names the
    /// file in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Index, CacheError> {
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        rkyv::from_bytes::<Index, rkyv::rancor::Error>(&aligned)
            .map_err(|e| CacheError::corrupt(path, format!("index does not validate: {e}")))
    }

    /// Checks every entry against the file table: spans inside their file,
    /// aligned, past the data header, and of the length the shape implies.
    pub fn validate(&self, path: &Path) -> Result<(), CacheError> {
        let bad = |msg: String| CacheError::corrupt(path, msg);
        if self.format != FORMAT_VERSION {
            return Err(bad(format!(
                "index says format {}, header says {FORMAT_VERSION}",
                self.format
            )));
        }
        if self.alignment as u64 != ALIGN {
            return Err(bad(format!(
                "payload alignment {} (this reader needs {ALIGN})",
                self.alignment
            )));
        }
        for f in &self.files {
            if !is_data_file_name(&f.name) || f.name.ends_with(".tmp") {
                return Err(bad(format!("data file name `{}` is not allowed", f.name)));
            }
        }
        let mut names = std::collections::HashSet::new();
        for t in &self.tensors {
            if !names.insert(t.name.as_str()) {
                return Err(bad(format!("tensor `{}` is listed twice", t.name)));
            }
            for s in t.spans() {
                let file = self.files.get(s.file as usize).ok_or_else(|| {
                    bad(format!(
                        "tensor `{}` points at data file #{} but the index lists {}",
                        t.name,
                        s.file,
                        self.files.len()
                    ))
                })?;
                let end = s.offset.checked_add(s.len);
                if s.offset % ALIGN != 0
                    || s.offset < HEADER_LEN as u64
                    || end.is_none_or(|e| e > file.size)
                {
                    return Err(bad(format!(
                        "tensor `{}` spans bytes {}..+{} of {} ({} bytes): out of range or not {ALIGN}-byte aligned",
                        t.name, s.offset, s.len, file.name, file.size
                    )));
                }
            }
            let want = expected_lens(t).map_err(|m| bad(format!("tensor `{}`: {m}", t.name)))?;
            let got: Vec<u64> = t.spans().iter().map(|s| s.len).collect();
            if want != got {
                return Err(bad(format!(
                    "tensor `{}` has payload lengths {got:?}, its shape {:?} needs {want:?}",
                    t.name, t.shape
                )));
            }
        }
        Ok(())
    }
}

/// Why an entry's shape implies no payload lengths (the index check adds
/// the tensor's name).
#[derive(Debug, thiserror::Error)]
enum ShapeProblem {
    #[error("shape overflows")]
    ShapeOverflows,
    #[error("quantized shape {0:?} is not 2-D")]
    NotTwoD(Vec<u64>),
    #[error("unsupported quantization: {bits} bits, {cols} columns, group size {group_size}")]
    Unsupported {
        bits: u8,
        cols: u64,
        group_size: u64,
    },
    #[error("overflow")]
    Overflow,
}

/// The payload lengths an entry's shape implies (same order as
/// [`TensorEntry::spans`]).
fn expected_lens(t: &TensorEntry) -> Result<Vec<u64>, ShapeProblem> {
    let numel = t
        .shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or(ShapeProblem::ShapeOverflows)?;
    match &t.payload {
        Payload::Quant {
            bits,
            group_size,
            zeros,
            ..
        } => {
            let [rows, cols] = t.shape[..] else {
                return Err(ShapeProblem::NotTwoD(t.shape.clone()));
            };
            let gs = *group_size as u64;
            if (*bits != 4 && *bits != 8)
                || cols % QBLOCK as u64 != 0
                || gs == 0
                || gs % QBLOCK as u64 != 0
            {
                return Err(ShapeProblem::Unsupported {
                    bits: *bits,
                    cols,
                    group_size: gs,
                });
            }
            let row = QuantMatrix::packed_row_bytes(cols as usize, *bits) as u64;
            let groups = rows
                .checked_mul(cols.div_ceil(gs))
                .ok_or(ShapeProblem::Overflow)?
                * 2;
            let mut v = vec![rows.checked_mul(row).ok_or(ShapeProblem::Overflow)?, groups];
            if zeros.is_some() {
                v.push(groups);
            }
            Ok(v)
        }
        Payload::Dense { dtype, .. } => Ok(vec![numel
            .checked_mul(dtype.float_type().size() as u64)
            .ok_or(ShapeProblem::Overflow)?]),
        Payload::Raw { dtype, data } => {
            let el = match dtype.as_str() {
                "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
                "U16" | "I16" => 2,
                "U32" | "I32" => 4,
                "U64" | "I64" | "F64" => 8,
                // Unknown element size: accept the recorded length.
                _ => return Ok(vec![data.len]),
            };
            Ok(vec![numel * el])
        }
    }
}

/// The fixed header of `index.rhc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexHeader {
    /// Format version.
    pub version: u32,
    /// Offset of the archive (64).
    pub index_offset: u64,
    /// Length of the archive.
    pub index_len: u64,
    /// blake3 of the archive.
    pub index_hash: [u8; 32],
}

impl IndexHeader {
    /// The 64 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&INDEX_MAGIC);
        h[8..12].copy_from_slice(&self.version.to_le_bytes());
        h[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.index_offset.to_le_bytes());
        h[24..32].copy_from_slice(&self.index_len.to_le_bytes());
        h[32..64].copy_from_slice(&self.index_hash);
        h
    }

    /// Parses and checks a whole `index.rhc` (header, lengths, hash);
    /// returns the header and the archive bytes.
    pub fn decode<'a>(bytes: &'a [u8], path: &Path) -> Result<(IndexHeader, &'a [u8]), CacheError> {
        let bad = |msg: String| CacheError::corrupt(path, msg);
        if bytes.len() < HEADER_LEN || bytes[0..8] != INDEX_MAGIC {
            return Err(bad(format!(
                "not a roundhouse cache index (bad magic or only {} bytes)",
                bytes.len()
            )));
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4"));
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8"));
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(CacheError::Version {
                path: path.to_path_buf(),
                found: version,
            });
        }
        if u32_at(12) as usize != HEADER_LEN {
            return Err(bad(format!(
                "header length {} (expected {HEADER_LEN})",
                u32_at(12)
            )));
        }
        let (off, len) = (u64_at(16), u64_at(24));
        if off != HEADER_LEN as u64 || off.checked_add(len) != Some(bytes.len() as u64) {
            return Err(bad(format!(
                "index at {off}..+{len} does not end the {}-byte file; truncated or damaged",
                bytes.len()
            )));
        }
        let mut index_hash = [0u8; 32];
        index_hash.copy_from_slice(&bytes[32..64]);
        let archive = &bytes[HEADER_LEN..];
        if *blake3::hash(archive).as_bytes() != index_hash {
            return Err(bad(
                "index bytes do not match their blake3 in the header; damaged".into(),
            ));
        }
        Ok((
            IndexHeader {
                version,
                index_offset: off,
                index_len: len,
                index_hash,
            },
            archive,
        ))
    }
}

/// The fixed header of a data file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataHeader {
    /// 0-based file number.
    pub file_no: u32,
    /// Number of data files.
    pub n_files: u32,
    /// Size of this file.
    pub size: u64,
    /// blake3 of the index this file belongs to.
    pub index_hash: [u8; 32],
}

impl DataHeader {
    /// The 64 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&DATA_MAGIC);
        h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.file_no.to_le_bytes());
        h[16..20].copy_from_slice(&self.n_files.to_le_bytes());
        h[24..32].copy_from_slice(&self.size.to_le_bytes());
        h[32..64].copy_from_slice(&self.index_hash);
        h
    }

    /// Checks `bytes` (at least the first 64 bytes of a data file) against
    /// what the index expects.
    pub fn check(&self, bytes: &[u8], path: &Path) -> Result<(), CacheError> {
        if bytes.len() < HEADER_LEN || bytes[..HEADER_LEN] != self.encode() {
            let why = if bytes.len() < HEADER_LEN || bytes[0..8] != DATA_MAGIC {
                "not a roundhouse cache data file (bad magic)"
            } else if bytes[8..12] != FORMAT_VERSION.to_le_bytes() {
                "data file of another format version"
            } else if bytes[32..64] != self.index_hash {
                "data file belongs to another index (mixed caches?); rerun rh-repack"
            } else {
                "data file header does not match the index"
            };
            return Err(CacheError::corrupt(path, why));
        }
        Ok(())
    }
}

/// Compares names with runs of digits compared as numbers, so
/// `experts.2` < `experts.10`.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, _) => return Ordering::Less,
            (_, None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (da, db) = (&a[..na], &b[..nb]);
                let ta = trim_zeros(da);
                let tb = trim_zeros(db);
                let o = ta.len().cmp(&tb.len()).then(ta.cmp(tb)).then(na.cmp(&nb));
                if o != Ordering::Equal {
                    return o;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let z = d.iter().take_while(|&&c| c == b'0').count();
    &d[z.min(d.len().saturating_sub(1))..]
}

/// The resumption group of a tensor: `model.layers.N` / `mtp.layers.N` for
/// layer tensors, the tensor's own name otherwise.
pub fn group_of(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    for i in 0..parts.len().saturating_sub(1) {
        if parts[i] == "layers" && parts[i + 1].bytes().all(|b| b.is_ascii_digit()) {
            return parts[..i + 2].join(".");
        }
    }
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_and_groups() {
        let mut v = vec![
            "model.layers.10.a",
            "model.layers.2.mlp.experts.10.up_proj",
            "model.layers.2.mlp.experts.2.up_proj",
            "lm_head.weight",
        ];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            [
                "lm_head.weight",
                "model.layers.2.mlp.experts.2.up_proj",
                "model.layers.2.mlp.experts.10.up_proj",
                "model.layers.10.a"
            ]
        );
        assert_eq!(group_of("model.layers.3.mlp.gate.weight"), "model.layers.3");
        assert_eq!(group_of("mtp.layers.0.x"), "mtp.layers.0");
        assert_eq!(group_of("model.norm.weight"), "model.norm.weight");
        assert!(is_data_file_name("data-00012.rhd"));
        assert!(is_data_file_name("data-00012.rhd.tmp"));
        assert!(!is_data_file_name("data-0001.rhd"));
        assert!(!is_data_file_name("../data-00001.rhd"));
    }

    #[test]
    fn index_round_trips_through_rkyv() {
        let idx = Index {
            format: FORMAT_VERSION,
            alignment: ALIGN as u32,
            config_json: b"{}".to_vec(),
            aux: vec![AuxFile {
                name: "tokenizer.json".into(),
                bytes: b"tok".to_vec(),
            }],
            files: vec![DataFile {
                name: data_file_name(0),
                size: 64 + 64 * 3,
            }],
            tensors: vec![TensorEntry {
                name: "m".into(),
                shape: vec![2, 32],
                payload: Payload::Quant {
                    bits: 4,
                    group_size: 32,
                    qdata: Span {
                        file: 0,
                        offset: 64,
                        len: 32,
                    },
                    scales: Span {
                        file: 0,
                        offset: 128,
                        len: 4,
                    },
                    zeros: Some(Span {
                        file: 0,
                        offset: 192,
                        len: 4,
                    }),
                },
            }],
        };
        let bytes = idx.to_bytes();
        let back = Index::from_bytes(&bytes, Path::new("x")).unwrap();
        assert_eq!(back, idx);
        back.validate(Path::new("x")).unwrap();
        let mut bad = idx.clone();
        bad.files[0].size = 100;
        let e = bad.validate(Path::new("x")).unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
        // Garbage never panics.
        assert!(Index::from_bytes(&bytes[..bytes.len() / 2], Path::new("x")).is_err());
    }
}
