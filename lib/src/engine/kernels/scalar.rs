//! Portable reference kernels: plain loops, correct for every shape the
//! layout allows. Faster kernels are checked against these.

use crate::tensor::{self, DenseMatrix, FloatType, Matrix, QuantMatrix, Zeros};

/// Per-input precomputation shared by all rows of one product: the sum of
/// the activations in each quantization group, so zero points cost one
/// multiply per group instead of one per element.
pub struct Prepared {
    group_sums: Vec<f32>,
}

impl Prepared {
    /// Prepares `x` for products with `w`.
    pub fn new(w: &Matrix, x: &[f32]) -> Prepared {
        let group_sums = match w {
            Matrix::Quant(q) => x.chunks(q.group_size).map(|c| c.iter().sum()).collect(),
            Matrix::Dense(_) => Vec::new(),
        };
        Prepared { group_sums }
    }
}

/// Dot product of row `r` of `w` with `x`.
pub fn dot_row(w: &Matrix, r: usize, x: &[f32], prep: &Prepared) -> f32 {
    match w {
        Matrix::Dense(d) => dot_dense(d, r, x),
        Matrix::Quant(q) => dot_quant(q, r, x, &prep.group_sums),
    }
}

fn dot_dense(d: &DenseMatrix, r: usize, x: &[f32]) -> f32 {
    let es = d.dtype.size();
    let row = &d.data.as_slice()[r * d.cols * es..(r + 1) * d.cols * es];
    let mut acc = 0f32;
    match d.dtype {
        FloatType::F32 => {
            for (c, xi) in row.chunks_exact(4).zip(x) {
                acc += f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * xi;
            }
        }
        FloatType::F16 => {
            for (c, xi) in row.chunks_exact(2).zip(x) {
                acc += half::f16::from_le_bytes([c[0], c[1]]).to_f32() * xi;
            }
        }
        FloatType::BF16 => {
            for (c, xi) in row.chunks_exact(2).zip(x) {
                acc += half::bf16::from_le_bytes([c[0], c[1]]).to_f32() * xi;
            }
        }
    }
    acc
}

fn dot_quant(q: &QuantMatrix, r: usize, x: &[f32], group_sums: &[f32]) -> f32 {
    let rb = q.row_bytes();
    let row = &q.qdata.as_slice()[r * rb..(r + 1) * rb];
    let sym = matches!(q.zeros, Zeros::Symmetric);
    let mut acc = 0f32;
    for g in 0..q.n_groups() {
        let k0 = g * q.group_size;
        let k1 = (k0 + q.group_size).min(q.cols);
        let mut s = 0f32;
        for (k, xk) in x.iter().enumerate().take(k1).skip(k0) {
            s += tensor::get(row, q.bits, k) as f32 * xk;
        }
        let z = if sym {
            QuantMatrix::symmetric_zero(q.bits) as f32
        } else {
            tensor::zero_of(q, r, g)
        };
        acc += tensor::scale_of(q, r, g) * (s - z * group_sums[g]);
    }
    acc
}

/// Row `r` of `w` as f32.
pub fn row(w: &Matrix, r: usize, out: &mut [f32]) {
    match w {
        Matrix::Quant(q) => tensor::dequantize_row(q, r, out),
        Matrix::Dense(d) => {
            let es = d.dtype.size();
            let bytes = &d.data.as_slice()[r * d.cols * es..(r + 1) * d.cols * es];
            let v = tensor::to_f32(d.dtype, bytes);
            out.copy_from_slice(&v);
        }
    }
}
