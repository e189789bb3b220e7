//! A safetensors checkpoint directory (sharded with
//! `model.safetensors.index.json`, or single-file): headers validated, data
//! mapped, tensors looked up by name. Implements [`WeightSource`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::Dtype;

use crate::config::{ModelConfig, Precision};
use crate::mmap::MappedFile;
use crate::quant::AutoRoundTensors;
use crate::tensor::{Bytes, DenseMatrix, FloatType, Matrix};
use crate::weights::{WeightError, WeightSource};

/// Where one tensor lives.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    /// Index into the file list.
    pub file: usize,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Absolute byte offset in the file.
    pub offset: usize,
    /// Byte length.
    pub len: usize,
}

/// An opened checkpoint.
pub struct Checkpoint {
    /// The directory.
    pub dir: PathBuf,
    /// Parsed config.json.
    pub config: ModelConfig,
    /// The safetensors files, in index order.
    pub files: Vec<PathBuf>,
    maps: Vec<Arc<MappedFile>>,
    /// Every tensor by name.
    pub tensors: BTreeMap<String, TensorEntry>,
}

fn fmt_err(path: &Path, msg: impl std::fmt::Display) -> WeightError {
    WeightError::Format(format!("{}: {msg}", path.display()))
}

/// Parses and validates a safetensors header against the file's length.
/// Returns tensors with absolute offsets.
pub fn read_header(
    path: &Path,
    bytes: &[u8],
) -> Result<Vec<(String, Dtype, Vec<usize>, usize, usize)>, WeightError> {
    if bytes.len() < 8 {
        return Err(fmt_err(
            path,
            format!(
                "truncated safetensors file ({} bytes, no header)",
                bytes.len()
            ),
        ));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    if n > 100 << 20 || 8 + n > bytes.len() {
        return Err(fmt_err(
            path,
            format!("safetensors header claims {n} bytes but the file has {}; truncated or not a safetensors file", bytes.len()),
        ));
    }
    let meta: safetensors::tensor::Metadata = serde_json::from_slice(&bytes[8..8 + n])
        .map_err(|e| fmt_err(path, format!("invalid safetensors header: {e}")))?;
    let data_start = 8 + n;
    let data_len = bytes.len() - data_start;
    let mut out = Vec::new();
    for (name, info) in meta.tensors() {
        let (s, e) = info.data_offsets;
        // No dimension can exceed the bytes present (an empty tensor may
        // not carry an absurd one either: later stages multiply them).
        if let Some(d) = info.shape.iter().find(|&&d| d > data_len.max(1)) {
            return Err(fmt_err(
                path,
                format!(
                    "tensor `{name}` has shape {:?}: dimension {d} exceeds the file's {data_len} data bytes",
                    info.shape
                ),
            ));
        }
        // Checked: a crafted shape like [2^62, 4] must not wrap to a small
        // size that matches the bytes present.
        let want = info
            .shape
            .iter()
            .try_fold(info.dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                fmt_err(
                    path,
                    format!(
                        "tensor `{name}` has shape {:?}, whose size overflows",
                        info.shape
                    ),
                )
            })?;
        if e < s || e > data_len {
            return Err(fmt_err(
                path,
                format!("tensor `{name}` spans bytes {s}..{e} but the data section has {data_len}; the file is truncated"),
            ));
        }
        if e - s != want {
            return Err(fmt_err(
                path,
                format!(
                    "tensor `{name}` has {} bytes but shape {:?} of {:?} needs {want}",
                    e - s,
                    info.shape,
                    info.dtype
                ),
            ));
        }
        out.push((
            name.clone(),
            info.dtype,
            info.shape.clone(),
            data_start + s,
            e - s,
        ));
    }
    Ok(out)
}

impl Checkpoint {
    /// Opens a checkpoint directory: config.json plus its safetensors.
    pub fn open(dir: &Path) -> Result<Checkpoint, WeightError> {
        if !dir.is_dir() {
            return Err(fmt_err(
                dir,
                "not a directory (expected a checkpoint with config.json and *.safetensors)",
            ));
        }
        let config = ModelConfig::load(&dir.join("config.json"))
            .map_err(|e| WeightError::Format(crate::cli::one_line(&e)))?;
        let files = Self::list_files(dir)?;
        let mut maps = Vec::new();
        let mut tensors: BTreeMap<String, TensorEntry> = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            let map = MappedFile::open(f).map_err(|e| WeightError::Format(e.to_string()))?;
            for (name, dtype, shape, offset, len) in read_header(f, map.bytes())? {
                if let Some(prev) = tensors.get(&name) {
                    return Err(fmt_err(
                        dir,
                        format!(
                            "tensor `{name}` is in both {} and {}; remove the stray file",
                            files[prev.file].display(),
                            f.display()
                        ),
                    ));
                }
                tensors.insert(
                    name,
                    TensorEntry {
                        file: i,
                        dtype,
                        shape,
                        offset,
                        len,
                    },
                );
            }
            maps.push(map);
        }
        config
            .check_shapes(
                &|n: &str| {
                    tensors
                        .get(n)
                        .map(|t| t.shape.iter().map(|&d| d as u64).collect())
                },
                &dir.join("config.json"),
            )
            .map_err(|e| WeightError::Format(crate::cli::one_line(&e)))?;
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            files,
            maps,
            tensors,
        })
    }

    /// The safetensors files: from the index when there is one (only the
    /// files it names, as transformers reads them, each checked to exist;
    /// a stray `*.safetensors` beside them is ignored), else every
    /// `*.safetensors` in the dir.
    pub fn list_files(dir: &Path) -> Result<Vec<PathBuf>, WeightError> {
        let index = dir.join("model.safetensors.index.json");
        let mut files: Vec<PathBuf> = Vec::new();
        if index.exists() {
            let text = crate::fsutil::read_regular(&index)
                .map_err(|e| WeightError::Format(e.to_string()))?;
            let v: serde_json::Value = serde_json::from_slice(&text)
                .map_err(|e| fmt_err(&index, format!("invalid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| fmt_err(&index, "no `weight_map` object"))?;
            let mut names: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
            names.sort();
            names.dedup();
            for n in names {
                if n.contains("..") || n.starts_with('/') {
                    return Err(fmt_err(
                        &index,
                        format!("shard name `{n}` escapes the checkpoint directory"),
                    ));
                }
                let p = dir.join(n);
                if !p.exists() {
                    return Err(fmt_err(
                        &p,
                        "listed in model.safetensors.index.json but missing; fetch again",
                    ));
                }
                files.push(p);
            }
        } else {
            for e in std::fs::read_dir(dir)
                .map_err(|e| fmt_err(dir, e))?
                .flatten()
            {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "safetensors") {
                    files.push(p);
                }
            }
            files.sort();
        }
        if files.is_empty() {
            return Err(fmt_err(dir, "no *.safetensors files"));
        }
        Ok(files)
    }

    /// The raw bytes of a tensor.
    pub fn bytes(&self, name: &str) -> Option<(&TensorEntry, &[u8])> {
        let e = self.tensors.get(name)?;
        Some((e, &self.maps[e.file].bytes()[e.offset..e.offset + e.len]))
    }

    fn missing(&self, tensor: &str) -> WeightError {
        WeightError::Missing {
            tensor: tensor.to_string(),
            source_path: self.dir.display().to_string(),
        }
    }

    fn shape_err(&self, tensor: &str, expected: &[usize], found: &[usize]) -> WeightError {
        WeightError::Shape {
            tensor: tensor.to_string(),
            source_path: self.dir.display().to_string(),
            expected: expected.to_vec(),
            found: found.to_vec(),
        }
    }

    fn dense(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix, WeightError> {
        let (e, bytes) = self.bytes(name).ok_or_else(|| self.missing(name))?;
        if e.shape != [rows, cols] {
            return Err(self.shape_err(name, &[rows, cols], &e.shape));
        }
        let dtype = float_type(e.dtype).ok_or_else(|| WeightError::Dtype {
            tensor: name.to_string(),
            source_path: self.dir.display().to_string(),
            dtype: format!("{:?}", e.dtype),
            expected: "F32, F16 or BF16".into(),
        })?;
        // Borrow from the mapping when aligned for the element type; safetensors
        // only guarantees 8-byte alignment of the data section.
        let data = if e.offset % dtype.size() == 0 {
            Bytes::mapped(self.maps[e.file].clone(), e.offset, e.len).expect("validated range")
        } else {
            Bytes::copy_from(bytes)
        };
        Ok(Matrix::Dense(DenseMatrix {
            rows,
            cols,
            dtype,
            data,
        }))
    }

    fn quantized(&self, module: &str, rows: usize, cols: usize) -> Result<Matrix, WeightError> {
        let q = self
            .config
            .quantization_config
            .as_ref()
            .ok_or_else(|| WeightError::Quant {
                source_path: self.dir.display().to_string(),
                reason: format!(
                    "`{module}.qweight` present but config.json has no quantization_config"
                ),
            })?;
        let (bits, group_size) = match self.config.precision(module) {
            Precision::Int {
                bits, group_size, ..
            } => (bits, group_size),
            Precision::Float => {
                return Err(WeightError::Quant {
                    source_path: self.dir.display().to_string(),
                    reason: format!(
                        "`{module}` is quantized on disk but quantization_config says it is 16-bit"
                    ),
                })
            }
        };
        let get = |suffix: &str| {
            let n = format!("{module}.{suffix}");
            self.bytes(&n).ok_or_else(|| self.missing(&n))
        };
        let (qw_e, qweight) = get("qweight")?;
        let (qz_e, qzeros) = get("qzeros")?;
        let (sc_e, scales) = get("scales")?;
        for (e, suffix, want) in [
            (qw_e, "qweight", Dtype::I32),
            (qz_e, "qzeros", Dtype::I32),
            (sc_e, "scales", Dtype::F16),
        ] {
            if e.dtype != want {
                return Err(WeightError::Dtype {
                    tensor: format!("{module}.{suffix}"),
                    source_path: self.dir.display().to_string(),
                    dtype: format!("{:?}", e.dtype),
                    expected: format!("{want:?}"),
                });
            }
        }
        let gs = if group_size <= 0 {
            cols
        } else {
            group_size as usize
        };
        if ![2, 4, 8].contains(&bits) {
            return Err(WeightError::Quant {
                source_path: self.dir.display().to_string(),
                reason: format!("`{module}`: unsupported bit width {bits}"),
            });
        }
        let expected_qw = [cols * bits as usize / 32, rows];
        if qw_e.shape != expected_qw {
            return Err(self.shape_err(&format!("{module}.qweight"), &expected_qw, &qw_e.shape));
        }
        let expected_sc = [cols.div_ceil(gs), rows];
        if sc_e.shape != expected_sc {
            return Err(self.shape_err(&format!("{module}.scales"), &expected_sc, &sc_e.shape));
        }
        let t = AutoRoundTensors {
            module,
            qweight,
            qzeros,
            scales,
            out_features: rows,
            in_features: cols,
            bits: bits as u8,
            group_size: gs,
            zeros_minus_one: q.zeros_minus_one(),
        };
        let m = t.to_kernel_layout().map_err(|e| WeightError::Quant {
            source_path: self.dir.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(Matrix::Quant(m))
    }
}

/// The float element types the kernels read.
pub fn float_type(d: Dtype) -> Option<FloatType> {
    match d {
        Dtype::F32 => Some(FloatType::F32),
        Dtype::F16 => Some(FloatType::F16),
        Dtype::BF16 => Some(FloatType::BF16),
        _ => None,
    }
}

pub use crate::tensor::to_f32;

impl WeightSource for Checkpoint {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn path(&self) -> String {
        self.dir.display().to_string()
    }

    fn matrix(&self, module: &str, rows: usize, cols: usize) -> Result<Matrix, WeightError> {
        if self.tensors.contains_key(&format!("{module}.qweight")) {
            self.quantized(module, rows, cols)
        } else if module == "lm_head"
            && self.config.tie_word_embeddings
            && !self.tensors.contains_key("lm_head.weight")
        {
            self.dense("model.embed_tokens.weight", rows, cols)
        } else {
            self.dense(&format!("{module}.weight"), rows, cols)
        }
    }

    fn vector(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, WeightError> {
        let (e, bytes) = self.bytes(name).ok_or_else(|| self.missing(name))?;
        if e.shape != shape {
            return Err(self.shape_err(name, shape, &e.shape));
        }
        let dtype = float_type(e.dtype).ok_or_else(|| WeightError::Dtype {
            tensor: name.to_string(),
            source_path: self.dir.display().to_string(),
            dtype: format!("{:?}", e.dtype),
            expected: "F32, F16 or BF16".into(),
        })?;
        Ok(to_f32(dtype, bytes))
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
            || self.tensors.contains_key(&format!("{name}.weight"))
            || self.tensors.contains_key(&format!("{name}.qweight"))
    }

    fn aux_file(&self, name: &str) -> Option<Vec<u8>> {
        // Only plain file names: a name with a separator must not reach
        // outside the checkpoint directory.
        if name.contains(['/', '\\']) || name.starts_with('.') {
            return None;
        }
        std::fs::read(self.dir.join(name)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Matrix;

    fn fixture(case: &str, kind: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/reference")
            .join(case)
            .join(kind)
    }

    /// Every quantized module of the checkpoints auto-round itself wrote
    /// converts to the kernel layout losslessly: row by row, the kernel
    /// layout dequantizes to exactly AutoRound's reference formula.
    #[test]
    fn autoround_fixtures_convert_losslessly() {
        for case in ["gs32", "gs128"] {
            let ck = Checkpoint::open(&fixture(case, "quant")).unwrap();
            let q = ck.config.quantization_config.clone().unwrap();
            let modules: Vec<String> = ck
                .tensors
                .keys()
                .filter_map(|n| n.strip_suffix(".qweight").map(str::to_string))
                .collect();
            assert!(
                modules.len() > 100,
                "{case}: {} quantized modules",
                modules.len()
            );
            for m in &modules {
                let (sc, _) = ck.bytes(&format!("{m}.scales")).unwrap();
                let rows = sc.shape[1];
                let (qw, _) = ck.bytes(&format!("{m}.qweight")).unwrap();
                let Precision::Int {
                    bits, group_size, ..
                } = ck.config.precision(m)
                else {
                    panic!("{m} quantized on disk but config says float")
                };
                let cols = qw.shape[0] * 32 / bits as usize;
                let Matrix::Quant(km) = ck.matrix(m, rows, cols).unwrap() else {
                    panic!()
                };
                let t = AutoRoundTensors {
                    module: m,
                    qweight: ck.bytes(&format!("{m}.qweight")).unwrap().1,
                    qzeros: ck.bytes(&format!("{m}.qzeros")).unwrap().1,
                    scales: ck.bytes(&format!("{m}.scales")).unwrap().1,
                    out_features: rows,
                    in_features: cols,
                    bits: bits as u8,
                    group_size: group_size as usize,
                    zeros_minus_one: q.zeros_minus_one(),
                };
                let reference = t.dequantize_reference().unwrap();
                let mut row = vec![0f32; cols];
                for r in 0..rows {
                    crate::quant::dequantize_row(&km, r, &mut row);
                    assert_eq!(
                        &row[..],
                        &reference[r * cols..(r + 1) * cols],
                        "{case} {m} row {r}"
                    );
                }
            }
            // The router and shared-expert gate stay 16-bit (regex extra_config keys).
            assert_eq!(
                ck.config.precision("model.layers.0.mlp.gate"),
                Precision::Float
            );
            assert!(matches!(
                ck.matrix(
                    "model.layers.0.mlp.gate",
                    ck.config.num_experts,
                    ck.config.hidden_size
                )
                .unwrap(),
                Matrix::Dense(_)
            ));
            // The float checkpoint of the same case opens too (transformers 5 config style in gs32).
            let f = Checkpoint::open(&fixture(case, "float")).unwrap();
            assert_eq!(f.config.num_hidden_layers, 4);
        }
    }
}
