//! Weight matrices as the kernels read them: dense float matrices and
//! group-quantized int4/int8 matrices, each borrowing its bytes from a
//! mapped file or owning them.

use std::fmt;
use std::sync::Arc;

use crate::mmap::MappedFile;

/// Bytes of a tensor: a range of a mapped file (zero-copy) or an owned,
/// 8-byte-aligned buffer.
#[derive(Clone)]
pub enum Bytes {
    /// `len` bytes at `offset` of a mapped file. The constructor checks the
    /// range lies inside the file.
    Mapped {
        /// The mapping (kept alive by the Arc).
        file: Arc<MappedFile>,
        /// Start offset.
        offset: usize,
        /// Length.
        len: usize,
    },
    /// Owned bytes (backed by u64 words so f32 views are aligned).
    Owned(Arc<AlignedBuf>),
    /// `len` bytes at `offset` of a shared owned buffer (an expert read
    /// into one buffer of the expert cache, `crate::experts`). The
    /// constructor checks the range lies inside the buffer.
    Shared {
        /// The buffer (kept alive by the Arc).
        buf: Arc<AlignedBuf>,
        /// Start offset.
        offset: usize,
        /// Length.
        len: usize,
    },
}

/// A heap buffer aligned to 8 bytes, a slot of a huge-page arena
/// (page-aligned; the expert cache's buffers), or a mapping of its own
/// (page-aligned; the per-token weights copied onto huge pages).
pub struct AlignedBuf {
    store: Store,
    len: usize,
}

enum Store {
    Words(Vec<u64>),
    Slot(crate::engine::arena::ArenaSlot),
    /// A private anonymous mapping of its own (page-aligned).
    Anon(memmap2::MmapMut),
}

/// Whether the kernel backs memory with transparent huge pages on request
/// (`/sys/kernel/mm/transparent_hugepage/enabled` says `always` or
/// `madvise`); false elsewhere.
pub fn huge_pages_available() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| s.contains("[always]") || s.contains("[madvise]"))
}

/// Asks for huge pages over the whole 2 MiB pages inside `buf`, before it
/// is first written (a large zeroed allocation is fresh, untouched memory).
pub fn advise_huge(buf: &mut [u8]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (buf.as_ptr() as usize).next_multiple_of(HUGE);
        let end = (buf.as_ptr() as usize + buf.len()) / HUGE * HUGE;
        if end > start {
            // SAFETY: the range lies inside `buf`, which we own mutably;
            // MADV_HUGEPAGE changes how pages are backed, never their
            // contents, and a refusal leaves ordinary pages.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

impl AlignedBuf {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Copies `bytes` into an aligned buffer.
    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut b = Self::zeroed(bytes.len());
        b.as_mut_slice().copy_from_slice(bytes);
        b
    }
    /// Copies `bytes` into a buffer the kernel is asked to back with huge
    /// pages (`MADV_HUGEPAGE`, Linux): a matrix streamed once per token then
    /// costs one TLB entry per 2 MiB instead of per 4 KiB, which under a
    /// hypervisor's nested page tables is most of a 4 KiB page walk's
    /// cost. Elsewhere, or when the kernel declines, a plain copy.
    ///
    /// A buffer of 2 MiB or more is a mapping of its own, not a heap block:
    /// the advice only backs pages not yet touched, and a heap block may
    /// reuse memory already backed by 4 KiB pages (since the heap keeps
    /// freed blocks up to 32 MiB, `crate::heap`, 174 MiB of the bench
    /// model's copies lost their huge pages that way).
    pub fn from_slice_huge(bytes: &[u8]) -> Self {
        const HUGE: usize = 2 << 20;
        let fresh = (bytes.len() >= HUGE)
            .then(|| memmap2::MmapOptions::new().len(bytes.len()).map_anon().ok())
            .flatten();
        let mut b = match fresh {
            Some(map) => AlignedBuf {
                store: Store::Anon(map),
                len: bytes.len(),
            },
            None => Self::zeroed(bytes.len()),
        };
        advise_huge(b.as_mut_slice());
        b.as_mut_slice().copy_from_slice(bytes);
        b
    }
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        AlignedBuf {
            store: Store::Words(vec![0u64; len.div_ceil(8)]),
            len,
        }
    }
    /// A whole arena slot (zeroed until written).
    pub fn from_slot(slot: crate::engine::arena::ArenaSlot) -> Self {
        AlignedBuf {
            len: slot.len(),
            store: Store::Slot(slot),
        }
    }
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match &self.store {
            Store::Words(w) => &bytemuck::cast_slice(w)[..self.len],
            Store::Slot(s) => s.as_slice(),
            Store::Anon(m) => &m[..self.len],
        }
    }
    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.store {
            Store::Words(w) => &mut bytemuck::cast_slice_mut(w)[..self.len],
            Store::Slot(s) => s.as_mut_slice(),
            Store::Anon(m) => &mut m[..self.len],
        }
    }
}

impl Bytes {
    /// Borrows `len` bytes at `offset` of a mapped file; `None` when the
    /// range is outside the file.
    pub fn mapped(file: Arc<MappedFile>, offset: usize, len: usize) -> Option<Bytes> {
        let end = offset.checked_add(len)?;
        (end <= file.len()).then_some(Bytes::Mapped { file, offset, len })
    }
    /// Borrows `len` bytes at `offset` of a shared buffer; `None` when the
    /// range is outside it.
    pub fn shared(buf: Arc<AlignedBuf>, offset: usize, len: usize) -> Option<Bytes> {
        let end = offset.checked_add(len)?;
        (end <= buf.len).then_some(Bytes::Shared { buf, offset, len })
    }
    /// Owns a copy of `bytes`.
    pub fn copy_from(bytes: &[u8]) -> Bytes {
        Bytes::Owned(Arc::new(AlignedBuf::from_slice(bytes)))
    }
    /// Takes an aligned buffer.
    pub fn owned(buf: AlignedBuf) -> Bytes {
        Bytes::Owned(Arc::new(buf))
    }
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped { file, offset, len } => &file.bytes()[*offset..*offset + *len],
            Bytes::Owned(b) => b.as_slice(),
            Bytes::Shared { buf, offset, len } => &buf.as_slice()[*offset..*offset + *len],
        }
    }
    /// Length.
    pub fn len(&self) -> usize {
        match self {
            Bytes::Mapped { len, .. } | Bytes::Shared { len, .. } => *len,
            Bytes::Owned(b) => b.len,
        }
    }
    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether the bytes live in a mapped file (no heap copy).
    pub fn is_mapped(&self) -> bool {
        matches!(self, Bytes::Mapped { .. })
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bytes::Mapped { offset, len, .. } => write!(f, "Mapped({offset}+{len})"),
            Bytes::Owned(b) => write!(f, "Owned({})", b.len),
            Bytes::Shared { offset, len, .. } => write!(f, "Shared({offset}+{len})"),
        }
    }
}

/// Element type of a dense matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatType {
    /// IEEE f32.
    F32,
    /// IEEE f16.
    F16,
    /// bfloat16.
    BF16,
}

impl FloatType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatType::F32 => 4,
            FloatType::F16 | FloatType::BF16 => 2,
        }
    }
}

/// A dense row-major matrix `[rows, cols]` of f32/f16/bf16.
#[derive(Clone, Debug)]
pub struct DenseMatrix {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// Element type.
    pub dtype: FloatType,
    /// `rows * cols * dtype.size()` bytes, little-endian.
    pub data: Bytes,
}

impl DenseMatrix {
    /// Checks the byte length against the shape.
    pub fn check(&self) -> Result<(), LayoutError> {
        let want = self
            .rows
            .checked_mul(self.cols)
            .and_then(|n| n.checked_mul(self.dtype.size()))
            .ok_or(LayoutError::Overflow {
                rows: self.rows,
                cols: self.cols,
            })?;
        if self.data.len() != want {
            return Err(LayoutError::Length {
                what: "dense data is",
                found: self.data.len(),
                want,
            });
        }
        Ok(())
    }
}

/// Elements per quantization block; groups are whole numbers of blocks.
pub const QBLOCK: usize = 32;

/// How zero points are stored.
#[derive(Clone, Debug)]
pub enum Zeros {
    /// Every group's zero point is `2^(bits-1)` (AutoRound/GPTQ symmetric).
    Symmetric,
    /// One u16 (LE) zero point per `(row, group)`, row-major.
    PerGroup(Bytes),
}

/// A group-quantized matrix in the kernel layout (see `docs/cache-format.md`):
///
/// * `qdata`: `rows` rows of `cols / 32` blocks. An int4 block is 16 bytes;
///   byte `i` holds element `i` in its low nibble and element `i + 16` in its
///   high nibble. An int8 block is 32 bytes, one unsigned byte per element.
/// * `scales`: f16 `[rows, n_groups]`, sign kept (AutoRound scales may be
///   negative).
/// * weight `W[r, k] = scale[r, k / group_size] * (q[r, k] - zero[r, k / group_size])`.
#[derive(Clone, Debug)]
pub struct QuantMatrix {
    /// Output features.
    pub rows: usize,
    /// Input features (a multiple of 32).
    pub cols: usize,
    /// 4 or 8.
    pub bits: u8,
    /// Elements per scale along a row (a multiple of 32).
    pub group_size: usize,
    /// Packed quantized values.
    pub qdata: Bytes,
    /// f16 scales.
    pub scales: Bytes,
    /// Zero points.
    pub zeros: Zeros,
}

impl QuantMatrix {
    /// Groups per row.
    pub fn n_groups(&self) -> usize {
        self.cols.div_ceil(self.group_size)
    }
    /// Bytes of one packed row.
    pub fn row_bytes(&self) -> usize {
        Self::packed_row_bytes(self.cols, self.bits)
    }
    /// Bytes of one packed row of `cols` elements at `bits`.
    pub fn packed_row_bytes(cols: usize, bits: u8) -> usize {
        cols / QBLOCK * (QBLOCK * bits as usize / 8)
    }
    /// The zero point of every group when symmetric.
    pub fn symmetric_zero(bits: u8) -> u16 {
        1 << (bits - 1)
    }
    /// Checks the byte lengths against the shape.
    pub fn check(&self) -> Result<(), LayoutError> {
        if self.bits != 4 && self.bits != 8 {
            return Err(LayoutError::Bits(self.bits));
        }
        if self.cols % QBLOCK != 0 || self.group_size % QBLOCK != 0 || self.group_size == 0 {
            return Err(LayoutError::Blocks {
                cols: self.cols,
                group_size: self.group_size,
            });
        }
        let length = |what, found: usize, want: usize| {
            if found == want {
                Ok(())
            } else {
                Err(LayoutError::Length { what, found, want })
            }
        };
        let want = self
            .rows
            .checked_mul(self.row_bytes())
            .ok_or(LayoutError::Overflow {
                rows: self.rows,
                cols: self.cols,
            })?;
        length("quantized data is", self.qdata.len(), want)?;
        let ng = self.rows * self.n_groups();
        length("scales are", self.scales.len(), ng * 2)?;
        if let Zeros::PerGroup(z) = &self.zeros {
            length("zeros are", z.len(), ng * 2)?;
        }
        Ok(())
    }
    /// Bytes of weights read by one full matvec.
    pub fn bytes_read(&self) -> usize {
        self.qdata.len()
            + self.scales.len()
            + match &self.zeros {
                Zeros::PerGroup(z) => z.len(),
                Zeros::Symmetric => 0,
            }
    }
}

/// A matrix whose bytes disagree with its shape, as [`QuantMatrix::check`]
/// and [`DenseMatrix::check`] find it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// A width the kernels do not read.
    #[error("{0} bits (supported: 4, 8)")]
    Bits(u8),
    /// Inputs or groups that are not whole blocks.
    #[error("input size {cols} and group size {group_size} must be multiples of {QBLOCK}")]
    Blocks {
        /// Input size.
        cols: usize,
        /// Group size.
        group_size: usize,
    },
    /// A payload of the wrong length.
    #[error("{what} {found} bytes, expected {want}")]
    Length {
        /// Which payload (`"scales are"`).
        what: &'static str,
        /// Its bytes.
        found: usize,
        /// What the shape implies.
        want: usize,
    },
    /// A shape whose byte count does not fit in memory's address range.
    #[error("shape [{rows}, {cols}] overflows")]
    Overflow {
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
    },
}

/// A 2-D weight, `[rows = out_features, cols = in_features]`.
#[derive(Clone, Debug)]
pub enum Matrix {
    /// Float weights.
    Dense(DenseMatrix),
    /// Group-quantized weights.
    Quant(QuantMatrix),
}

impl Matrix {
    /// Output features.
    pub fn rows(&self) -> usize {
        match self {
            Matrix::Dense(d) => d.rows,
            Matrix::Quant(q) => q.rows,
        }
    }
    /// Input features.
    pub fn cols(&self) -> usize {
        match self {
            Matrix::Dense(d) => d.cols,
            Matrix::Quant(q) => q.cols,
        }
    }
    /// Bytes a full matvec reads.
    pub fn bytes_read(&self) -> usize {
        match self {
            Matrix::Dense(d) => d.data.len(),
            Matrix::Quant(q) => q.bytes_read(),
        }
    }
    /// Whether every byte lives in a mapped file.
    pub fn is_mapped(&self) -> bool {
        match self {
            Matrix::Dense(d) => d.data.is_mapped(),
            Matrix::Quant(q) => {
                q.qdata.is_mapped()
                    && q.scales.is_mapped()
                    && match &q.zeros {
                        Zeros::PerGroup(z) => z.is_mapped(),
                        Zeros::Symmetric => true,
                    }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Reading the layout element by element (the scalar reference kernels and
// the format code both read weights through these).

/// Reads element `k` of a packed row.
#[inline]
pub fn get(row: &[u8], bits: u8, k: usize) -> u8 {
    if bits == 8 {
        row[k]
    } else {
        let b = row[(k / QBLOCK) * 16 + (k % 16)];
        if k % QBLOCK < 16 {
            b & 0x0F
        } else {
            b >> 4
        }
    }
}

/// The zero point of group `g` in row `r`.
#[inline]
pub fn zero_of(m: &QuantMatrix, r: usize, g: usize) -> f32 {
    match &m.zeros {
        Zeros::Symmetric => QuantMatrix::symmetric_zero(m.bits) as f32,
        Zeros::PerGroup(z) => {
            let i = (r * m.n_groups() + g) * 2;
            let s = z.as_slice();
            u16::from_le_bytes([s[i], s[i + 1]]) as f32
        }
    }
}

/// The scale of group `g` in row `r`.
#[inline]
pub fn scale_of(m: &QuantMatrix, r: usize, g: usize) -> f32 {
    let i = (r * m.n_groups() + g) * 2;
    let s = m.scales.as_slice();
    half::f16::from_le_bytes([s[i], s[i + 1]]).to_f32()
}

/// Dequantizes row `r` into `out` (length `cols`).
pub fn dequantize_row(m: &QuantMatrix, r: usize, out: &mut [f32]) {
    let rb = m.row_bytes();
    let row = &m.qdata.as_slice()[r * rb..(r + 1) * rb];
    for (k, o) in out.iter_mut().enumerate().take(m.cols) {
        let g = k / m.group_size;
        *o = scale_of(m, r, g) * (get(row, m.bits, k) as f32 - zero_of(m, r, g));
    }
}

/// Converts float bytes of any supported dtype to f32.
pub fn to_f32(dtype: FloatType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        FloatType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        FloatType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        FloatType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}
