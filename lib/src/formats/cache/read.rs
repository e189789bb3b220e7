//! Opening a cache: validate the index header, hash and archive, check every
//! data file's size and header before mapping it, check every tensor's span,
//! then hand out weights as ranges of the mappings (no copies).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::checkpoint::to_f32;
use crate::config::ModelConfig;
use crate::mmap::MappedFile;
use crate::tensor::{Bytes, DenseMatrix, Matrix, QuantMatrix, Zeros};
use crate::weights::{LockRefused, WeightError, WeightSource};

use super::format::{
    DataHeader, Index, IndexHeader, Payload, Span, TensorEntry, HEADER_LEN, INDEX_FILE,
};
use super::CacheError;

/// An opened, validated cache.
pub struct Cache {
    dir: PathBuf,
    header: IndexHeader,
    index: Index,
    config: ModelConfig,
    maps: Vec<Arc<MappedFile>>,
    by_name: HashMap<String, usize>,
    /// Shared lock on the directory while the cache is open: excludes our
    /// own writers (rh-repack, rh-verify unpack) from changing mapped files.
    _lock: Option<crate::fsutil::DirLock>,
}

/// Reads and validates `index.rhc` of `dir` (header, hash, archive, every
/// span against the recorded file sizes) without touching the data files.
pub fn read_index(dir: &Path) -> Result<(IndexHeader, Index), CacheError> {
    let path = dir.join(INDEX_FILE);
    let bytes = match crate::fsutil::read_regular(&path) {
        Ok(b) => b,
        Err(e) if crate::fsutil::is_not_found(&e) => {
            return Err(CacheError::NotACache(dir.to_path_buf()))
        }
        Err(e) => return Err(e.into()),
    };
    let (header, archive) = IndexHeader::decode(&bytes, &path)?;
    let index = Index::from_bytes(archive, &path)?;
    index.validate(&path)?;
    Ok((header, index))
}

impl Cache {
    /// Opens and validates the cache in `dir`, holding a shared lock on it
    /// while open (a writer at work is reported, naming it). Every data
    /// file's length is checked against the index before it is mapped, so
    /// a truncated file is an error here, never a SIGBUS later.
    pub fn open(dir: &Path) -> Result<Cache, CacheError> {
        let lock = crate::fsutil::DirLock::shared(dir)?;
        let mut c = Self::open_unlocked(dir)?;
        c._lock = Some(lock);
        Ok(c)
    }

    /// [`Cache::open`] without taking the lock, for a caller that already
    /// holds the directory's lock (e.g. `rh-verify` before it writes a
    /// manifest).
    pub fn open_unlocked(dir: &Path) -> Result<Cache, CacheError> {
        let (header, index) = read_index(dir)?;
        let index_path = dir.join(INDEX_FILE);
        let config = ModelConfig::from_json(&index.config_json, &index_path).map_err(|e| {
            CacheError::corrupt(
                &index_path,
                format!("config.json in the index: {}", crate::cli::one_line(&e)),
            )
        })?;
        let shapes: HashMap<&str, &[u64]> = index
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice()))
            .collect();
        config
            .check_shapes(&|n: &str| shapes.get(n).map(|s| s.to_vec()), &index_path)
            .map_err(|e| CacheError::corrupt(&index_path, crate::cli::one_line(&e)))?;
        let mut maps = Vec::with_capacity(index.files.len());
        for (i, f) in index.files.iter().enumerate() {
            let path = dir.join(&f.name);
            let len = std::fs::metadata(&path)
                .map_err(|e| crate::fsutil::FsError::io(&path, e))?
                .len();
            if len != f.size {
                return Err(CacheError::corrupt(
                    &path,
                    format!(
                        "is {len} bytes, the index says {}; truncated or modified after repack",
                        f.size
                    ),
                ));
            }
            let map = MappedFile::open(&path)?;
            if map.len() as u64 != f.size {
                return Err(CacheError::corrupt(&path, "changed size while opening"));
            }
            DataHeader {
                file_no: i as u32,
                n_files: index.files.len() as u32,
                size: f.size,
                index_hash: header.index_hash,
            }
            .check(&map.bytes()[..HEADER_LEN.min(map.len())], &path)?;
            maps.push(map);
        }
        let by_name = index
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Cache {
            dir: dir.to_path_buf(),
            header,
            index,
            config,
            maps,
            by_name,
            _lock: None,
        })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The validated index.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The index file's header (its blake3 identifies the cache layout).
    pub fn header(&self) -> &IndexHeader {
        &self.header
    }

    /// The mapped data files, in index order.
    pub fn maps(&self) -> &[Arc<MappedFile>] {
        &self.maps
    }

    /// A tensor-table entry by name.
    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.by_name.get(name).map(|&i| &self.index.tensors[i])
    }

    /// Total bytes of the data files.
    pub fn data_bytes(&self) -> u64 {
        self.index.files.iter().map(|f| f.size).sum()
    }

    fn span(&self, s: Span) -> Bytes {
        Bytes::mapped(
            self.maps[s.file as usize].clone(),
            s.offset as usize,
            s.len as usize,
        )
        .expect("span validated against the file size at open")
    }

    fn src(&self) -> String {
        self.dir.display().to_string()
    }

    fn missing(&self, tensor: &str) -> WeightError {
        WeightError::Missing {
            tensor: tensor.to_string(),
            source_path: self.src(),
        }
    }

    fn shape_err(&self, tensor: &str, expected: &[usize], found: &[u64]) -> WeightError {
        WeightError::Shape {
            tensor: tensor.to_string(),
            source_path: self.src(),
            expected: expected.to_vec(),
            found: found.iter().map(|&d| d as usize).collect(),
        }
    }

    fn dtype_err(&self, tensor: &str, found: &Payload, expected: &str) -> WeightError {
        let dtype = match found {
            Payload::Quant { bits, .. } => format!("int{bits} (quantized)"),
            Payload::Dense { dtype, .. } => format!("{dtype:?}"),
            Payload::Raw { dtype, .. } => dtype.clone(),
        };
        WeightError::Dtype {
            tensor: tensor.to_string(),
            source_path: self.src(),
            dtype,
            expected: expected.into(),
        }
    }

    fn dense(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix, WeightError> {
        let e = self.entry(name).ok_or_else(|| self.missing(name))?;
        if e.shape != [rows as u64, cols as u64] {
            return Err(self.shape_err(name, &[rows, cols], &e.shape));
        }
        match &e.payload {
            Payload::Dense { dtype, data } => Ok(Matrix::Dense(DenseMatrix {
                rows,
                cols,
                dtype: dtype.float_type(),
                data: self.span(*data),
            })),
            p => Err(self.dtype_err(name, p, "F32, F16 or BF16")),
        }
    }
}

impl WeightSource for Cache {
    fn map_pages(&self, huge: bool) {
        for m in &self.maps {
            m.advise_page_size(huge);
        }
    }

    fn mapped_pages(&self) -> Option<crate::mmap::MappedPages> {
        crate::mmap::mapped_pages(&self.maps)
    }

    fn residency(&self, populate: bool, lock: bool) -> Result<(), LockRefused> {
        for m in &self.maps {
            if populate {
                m.advise_willneed();
            }
            if lock {
                if let Some(raw) = m.raw() {
                    raw.lock().map_err(|source| LockRefused {
                        dir: self.dir.display().to_string(),
                        what: "mlock",
                        source,
                    })?;
                }
            }
        }
        Ok(())
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn path(&self) -> String {
        self.src()
    }

    fn matrix(&self, module: &str, rows: usize, cols: usize) -> Result<Matrix, WeightError> {
        if let Some(e) = self.entry(module) {
            if let Payload::Quant {
                bits,
                group_size,
                qdata,
                scales,
                zeros,
            } = &e.payload
            {
                if e.shape != [rows as u64, cols as u64] {
                    return Err(self.shape_err(module, &[rows, cols], &e.shape));
                }
                let m = QuantMatrix {
                    rows,
                    cols,
                    bits: *bits,
                    group_size: *group_size as usize,
                    qdata: self.span(*qdata),
                    scales: self.span(*scales),
                    zeros: match zeros {
                        Some(z) => Zeros::PerGroup(self.span(*z)),
                        None => Zeros::Symmetric,
                    },
                };
                m.check().map_err(|e| WeightError::Quant {
                    source_path: self.src(),
                    reason: format!("`{module}`: {e}"),
                })?;
                return Ok(Matrix::Quant(m));
            }
        }
        if module == "lm_head"
            && self.config.tie_word_embeddings
            && self.entry("lm_head.weight").is_none()
        {
            self.dense("model.embed_tokens.weight", rows, cols)
        } else {
            self.dense(&format!("{module}.weight"), rows, cols)
        }
    }

    fn vector(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, WeightError> {
        let e = self.entry(name).ok_or_else(|| self.missing(name))?;
        if e.shape.len() != shape.len() || e.shape.iter().zip(shape).any(|(&a, &b)| a != b as u64) {
            return Err(self.shape_err(name, shape, &e.shape));
        }
        match &e.payload {
            Payload::Dense { dtype, data } => {
                Ok(to_f32(dtype.float_type(), self.span(*data).as_slice()))
            }
            p => Err(self.dtype_err(name, p, "F32, F16 or BF16")),
        }
    }

    fn contains(&self, name: &str) -> bool {
        let quant = |m: &str| {
            matches!(
                self.entry(m).map(|e| &e.payload),
                Some(Payload::Quant { .. })
            )
        };
        self.entry(name).is_some()
            || self.entry(&format!("{name}.weight")).is_some()
            || [".qweight", ".qzeros", ".scales"]
                .iter()
                .any(|s| name.strip_suffix(s).is_some_and(quant))
    }

    fn aux_file(&self, name: &str) -> Option<Vec<u8>> {
        if name == "config.json" {
            return Some(self.index.config_json.clone());
        }
        self.index
            .aux
            .iter()
            .find(|a| a.name == name)
            .map(|a| a.bytes.clone())
    }
}
