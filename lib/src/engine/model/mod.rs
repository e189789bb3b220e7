//! The Qwen3-Next forward pass on CPU (`model_type` `qwen3_next`).
//!
//! [`Model`] holds every weight as a kernel-layout [`Matrix`] (read in place
//! from the weight source) plus the small tensors as f32; [`State`] holds one
//! sequence's conv and recurrent states (linear-attention layers) and KV
//! cache (full-attention layers). [`Model::forward`] feeds any number of
//! tokens after what a state holds: many at once run the batched prefill
//! path (one matmul per weight over all tokens), one runs the decode path;
//! both compute the same function.
//!
//! Files by concern: [`norm`] (RMSNorms, activations), [`delta_net`] (Gated
//! DeltaNet), [`attention`] (gated attention, RoPE, KV cache), [`moe`]
//! (router, experts, shared expert), [`experts`] (the expert cache:
//! routed experts read on demand under a RAM budget), [`qwen3_next`] (layer stack, final norm,
//! lm_head).

pub mod attention;
pub mod delta_net;
pub mod experts;
pub mod moe;
pub mod norm;
pub mod qwen3_next;

use std::path::Path;
use std::sync::Arc;

use crate::cli::{Classify, Exit};
use crate::config::{ConfigError, ModelConfig};
use crate::tensor::Matrix;
use crate::weights::{WeightError, WeightSource};

pub use qwen3_next::{Layer, Mixer};

/// Errors loading a model or feeding it.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A weight is missing, misshapen or of an unusable type (names the tensor).
    #[error(transparent)]
    Weight(#[from] WeightError),
    /// The config's dimensions are unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A token id outside the vocabulary.
    #[error("token id {id} at position {index} is outside the vocabulary (vocab_size {vocab})")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// Its index in the input.
        index: usize,
        /// vocab_size.
        vocab: usize,
    },
    /// No tokens where at least one is needed.
    #[error("no input tokens")]
    Empty,
}

impl Classify for ModelError {
    fn exit(&self) -> Exit {
        match self {
            ModelError::TokenOutOfRange { .. } | ModelError::Empty => Exit::Usage,
            _ => Exit::Failure,
        }
    }
}

/// Fetches a linear module through the weight source.
pub(crate) fn load_matrix(
    w: &dyn WeightSource,
    module: &str,
    rows: usize,
    cols: usize,
) -> Result<Matrix, ModelError> {
    let mut m = w.matrix(module, rows, cols)?;
    if reads_every_token(module, m.bytes_read()) && huge_pages() {
        m = on_huge_pages(m);
    }
    if m.rows() != rows || m.cols() != cols {
        return Err(ModelError::Weight(WeightError::Shape {
            tensor: module.to_string(),
            source_path: w.path(),
            expected: vec![rows, cols],
            found: vec![m.rows(), m.cols()],
        }));
    }
    Ok(m)
}

/// Runs `f` on a thread of rayon's pool while the caller waits. A forward
/// pass opens dozens of parallel regions per token (every batch of
/// matvecs, the recurrence, the norms); opened from a thread outside the
/// pool, each one is handed to the pool and the caller sleeps until the
/// last task wakes it, and a busy core delays both hand-overs. Opened from
/// a worker, the worker takes a share itself and the region never waits
/// for a thread that is not running.
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// Whether decode reads all of `module` every token and it is large enough
/// (a 2 MiB page or more) to gain from huge pages: everything but the
/// embedding (one row a token) and the routed experts (a few a token, and
/// paged by the expert cache under a memory budget).
///
/// Why copy: on the 4 KiB pages of a mapped file each 4 KiB read costs a
/// TLB miss, and under a hypervisor's nested page tables that page walk,
/// not the memory, set the rate: lm_head's matvec read 10.5 GB/s per core
/// from 4 KiB pages against 21 GB/s from 2 MiB ones (docs/performance.md,
/// "Huge pages"). The copy costs its size in RAM once; the mapped pages it
/// came from are no longer touched and the kernel may drop them.
fn reads_every_token(module: &str, bytes: usize) -> bool {
    bytes >= 2 << 20 && module != "model.embed_tokens" && !module.contains(".mlp.experts.")
}

/// Whether matrices are copied onto huge pages: the kernel offers them
/// and `RH_HUGE_PAGES` is not `0` (checked once).
fn huge_pages() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| crate::env::huge_pages() && crate::tensor::huge_pages_available())
}

/// `m` copied into memory backed by huge pages ([`AlignedBuf::from_slice_huge`]).
fn on_huge_pages(m: Matrix) -> Matrix {
    use crate::tensor::{AlignedBuf, Bytes, Zeros};
    // The copy replaces the mapped range for good: unlock and unmap the
    // source so RAM holds one copy even where the strategy or a memory
    // budget locked the mapping before the load.
    let huge = |b: &Bytes| {
        let copy = Bytes::owned(AlignedBuf::from_slice_huge(b.as_slice()));
        if let Bytes::Mapped { file, offset, len } = b {
            file.release(*offset, *len);
        }
        copy
    };
    match m {
        Matrix::Dense(mut d) => {
            d.data = huge(&d.data);
            Matrix::Dense(d)
        }
        Matrix::Quant(mut q) => {
            q.qdata = huge(&q.qdata);
            q.scales = huge(&q.scales);
            if let Zeros::PerGroup(z) = &q.zeros {
                q.zeros = Zeros::PerGroup(huge(z));
            }
            Matrix::Quant(q)
        }
    }
}

/// Fetches a small tensor as f32 through the weight source.
pub(crate) fn load_vector(
    w: &dyn WeightSource,
    name: &str,
    shape: &[usize],
) -> Result<Vec<f32>, ModelError> {
    let v = w.vector(name, shape)?;
    let want: usize = shape.iter().product();
    if v.len() != want {
        return Err(ModelError::Weight(WeightError::Shape {
            tensor: name.to_string(),
            source_path: w.path(),
            expected: shape.to_vec(),
            found: vec![v.len()],
        }));
    }
    Ok(v)
}

/// Most tokens one pass of the layer stack takes; longer inputs run in
/// chunks of this many (bounds activation memory during prefill, a few
/// hundred MiB at this size on Qwen3-Next's shapes). Each chunk reads every
/// routed expert once and meets it with its share of the chunk's tokens
/// (top-k / experts of them, about 10 per 512 tokens on the real model), so
/// longer chunks build each expert's weight tiles for more tokens: with 512
/// a 4096-token prompt ran at 0.74x the speed of a 512-token one.
pub const PREFILL_CHUNK: usize = 2048;

/// One sequence's part of [`Model::forward_batch`].
pub struct BatchSeq<'a> {
    /// Its state, advanced by `ids`.
    pub state: &'a mut State,
    /// The tokens to feed (at least one).
    pub ids: &'a [u32],
    /// Whether to compute the logits of its last token (false for an inner
    /// chunk of a prompt).
    pub logits: bool,
}

/// A loaded Qwen3-Next model.
pub struct Model {
    config: ModelConfig,
    weights: Arc<dyn WeightSource>,
    embed: Matrix,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Matrix,
}

/// Per-layer part of a [`State`].
#[derive(Clone, Debug)]
pub enum LayerState {
    /// Conv and recurrent state of a Gated DeltaNet layer.
    Linear(delta_net::DeltaState),
    /// KV cache of a full-attention layer.
    Full(attention::KvCache),
}

/// One sequence's state: everything the model needs to continue it.
#[derive(Clone, Debug)]
pub struct State {
    pos: usize,
    layers: Vec<LayerState>,
}

impl State {
    /// Tokens consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes held (conv/recurrent states and KV cache).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                LayerState::Linear(d) => (d.conv.len() + d.ssm.len()) * 4,
                LayerState::Full(kv) => (kv.k.len() + kv.v.len()) * 4,
            })
            .sum()
    }
}

impl Model {
    /// Loads every weight through the source (cheap: matrices stay mapped
    /// where the source allows); checks every shape against the config.
    pub fn load(weights: Arc<dyn WeightSource>) -> Result<Model, ModelError> {
        let config = weights.config().clone();
        config.validate(Path::new(&weights.path()))?;
        let w: &dyn WeightSource = weights.as_ref();
        // Before the first touch, so the weights copied onto huge pages are
        // read from 2 MiB mappings too.
        w.map_pages(huge_pages());
        let (v, h) = (config.vocab_size, config.hidden_size);
        let embed = load_matrix(w, "model.embed_tokens", v, h)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| Layer::load(w, &config, i))
            .collect::<Result<Vec<_>, _>>()?;
        let norm = load_vector(w, "model.norm.weight", &[h])?;
        let lm_head = load_matrix(w, "lm_head", v, h)?;
        Ok(Model {
            config,
            weights,
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Where the weights come from.
    pub fn weights(&self) -> &Arc<dyn WeightSource> {
        &self.weights
    }

    /// The decoder layers.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// A fresh per-sequence state.
    pub fn new_state(&self) -> State {
        State {
            pos: 0,
            layers: self.layers.iter().map(Layer::new_state).collect(),
        }
    }

    /// Checks that every id is inside the vocabulary and that there is at
    /// least one: call before [`Model::forward`] on untrusted input.
    pub fn check_ids(&self, ids: &[u32]) -> Result<(), ModelError> {
        if ids.is_empty() {
            return Err(ModelError::Empty);
        }
        let vocab = self.config.vocab_size;
        match ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            Some((index, &id)) => Err(ModelError::TokenOutOfRange { id, index, vocab }),
            None => Ok(()),
        }
    }

    /// Feeds `ids` after what `state` already holds (prefill when many,
    /// decode when one), updates `state`, and returns the logits of the last
    /// position (`vocab_size` values).
    ///
    /// Panics when `ids` is empty or holds an id outside the vocabulary;
    /// see [`Model::check_ids`].
    pub fn forward(&self, state: &mut State, ids: &[u32]) -> Vec<f32> {
        self.run(state, ids, false)
    }

    /// Like [`Model::forward`], but returns the logits of every position,
    /// row-major `[ids.len(), vocab_size]`.
    pub fn forward_all(&self, state: &mut State, ids: &[u32]) -> Vec<f32> {
        self.run(state, ids, true)
    }

    fn run(&self, state: &mut State, ids: &[u32], all: bool) -> Vec<f32> {
        self.run_chunked(state, ids, all, PREFILL_CHUNK)
    }

    fn run_chunked(&self, state: &mut State, ids: &[u32], all: bool, chunk: usize) -> Vec<f32> {
        if let Err(e) = self.check_ids(ids) {
            panic!("Model::forward: {e}");
        }
        // Long prompts run in chunks so activations stay bounded; the
        // result is the same as one call (states carry across chunks).
        let chunks: Vec<&[u32]> = ids.chunks(chunk.max(1)).collect();
        let mut out = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            let want = match (all, last) {
                (true, _) => qwen3_next::Logits::All,
                (false, true) => qwen3_next::Logits::Last,
                (false, false) => qwen3_next::Logits::None,
            };
            let mut step = [qwen3_next::Step {
                state: &mut *state,
                ids: c,
                want,
            }];
            out.extend(on_pool(|| qwen3_next::forward(self, &mut step)).remove(0));
        }
        if ids.len() > 1 {
            // A prefill's reused temporaries stay only for its own layers
            // and chunks (see `scratch`).
            rayon::broadcast(|_| crate::scratch::release());
        }
        out
    }

    /// Feeds several sequences at once, each its own tokens after its own
    /// state (one token for a sequence that decodes, a chunk of its prompt
    /// for one that prefills), in one pass over the weights: every
    /// projection, the MoE and lm_head see all the batch's tokens as one
    /// matrix product; the recurrence and attention run per sequence, side
    /// by side. Returns, per sequence, the logits of its last token
    /// (`vocab_size` values), or nothing where `logits` is false.
    ///
    /// A sequence's logits equal [`Model::forward`]'s of the same tokens
    /// up to rounding: with two or more tokens in the batch the products
    /// run as matmuls, whose sums are ordered differently from decode's
    /// matvecs (see the batch tests for the bound). The caller keeps the
    /// batch's total tokens at most [`PREFILL_CHUNK`] (activation memory).
    ///
    /// Panics when a sequence has no ids or an id outside the vocabulary
    /// (see [`Model::check_ids`]).
    pub fn forward_batch(&self, batch: &mut [BatchSeq]) -> Vec<Vec<f32>> {
        for b in batch.iter() {
            if let Err(e) = self.check_ids(b.ids) {
                panic!("Model::forward_batch: {e}");
            }
        }
        if batch.is_empty() {
            return Vec::new();
        }
        let prefills = batch.iter().any(|b| b.ids.len() > 1);
        let mut steps: Vec<qwen3_next::Step> = batch
            .iter_mut()
            .map(|b| qwen3_next::Step {
                state: &mut *b.state,
                ids: b.ids,
                want: if b.logits {
                    qwen3_next::Logits::Last
                } else {
                    qwen3_next::Logits::None
                },
            })
            .collect();
        let out = on_pool(|| qwen3_next::forward(self, &mut steps));
        if prefills {
            // As in `run_chunked`: nothing kept beyond the step.
            rayon::broadcast(|_| crate::scratch::release());
        }
        out
    }

    /// Bytes of weights read to decode one token: one embedding row, every
    /// non-expert linear, the top-k routed experts (at the layer's average
    /// expert size), the shared expert, and lm_head.
    pub fn weight_bytes_per_token(&self) -> u64 {
        let embed_row = self.embed.bytes_read() as u64 / self.config.vocab_size as u64;
        let mut total = embed_row + self.lm_head.bytes_read() as u64;
        for l in &self.layers {
            total += l.bytes_per_token(self.config.num_experts_per_tok);
        }
        total
    }

    /// Multiply-adds of the layers' matrices per prompt token: what
    /// prefill computes for each token besides attention and the recurrence
    /// (lm_head runs for the last token only, so it is left out).
    pub fn prefill_macs_per_token(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| l.macs_per_token(self.config.num_experts_per_tok))
            .sum()
    }

    /// Total bytes of all weights (matrices as stored, small tensors at 4
    /// bytes per element as held).
    pub fn weight_bytes(&self) -> u64 {
        let mut total = (self.embed.bytes_read() + self.lm_head.bytes_read()) as u64;
        total += self.norm.len() as u64 * 4;
        for l in &self.layers {
            total += l
                .matrices()
                .iter()
                .map(|m| m.bytes_read() as u64)
                .sum::<u64>();
            total += l.vector_params() as u64 * 4;
        }
        total
    }

    /// Parameter count.
    pub fn params(&self) -> u64 {
        let mp = |m: &Matrix| (m.rows() * m.cols()) as u64;
        let mut total = mp(&self.embed) + mp(&self.lm_head) + self.norm.len() as u64;
        for l in &self.layers {
            total += l.matrices().iter().map(|m| mp(m)).sum::<u64>();
            total += l.vector_params() as u64;
        }
        total
    }

    pub(crate) fn parts(&self) -> (&Matrix, &[Layer], &[f32], &Matrix) {
        (&self.embed, &self.layers, &self.norm, &self.lm_head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Checkpoint;
    use std::path::PathBuf;

    fn fixture(case: &str, kind: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/reference")
            .join(case)
            .join(kind)
    }

    fn checkpoint(case: &str, kind: &str) -> Arc<Checkpoint> {
        Arc::new(Checkpoint::open(&fixture(case, kind)).unwrap())
    }

    /// A source that hides one tensor.
    struct Hiding(Arc<Checkpoint>, &'static str);
    impl WeightSource for Hiding {
        fn config(&self) -> &ModelConfig {
            self.0.config()
        }
        fn path(&self) -> String {
            self.0.path()
        }
        fn matrix(&self, module: &str, rows: usize, cols: usize) -> Result<Matrix, WeightError> {
            if module == self.1 {
                return Err(WeightError::Missing {
                    tensor: format!("{module}.weight"),
                    source_path: self.path(),
                });
            }
            self.0.matrix(module, rows, cols)
        }
        fn vector(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, WeightError> {
            if name == self.1 {
                return Err(WeightError::Missing {
                    tensor: name.into(),
                    source_path: self.path(),
                });
            }
            self.0.vector(name, shape)
        }
        fn contains(&self, name: &str) -> bool {
            name != self.1 && self.0.contains(name)
        }
        fn aux_file(&self, name: &str) -> Option<Vec<u8>> {
            self.0.aux_file(name)
        }
    }

    #[test]
    fn missing_weights_are_named() {
        for name in [
            "model.layers.2.linear_attn.A_log",
            "model.layers.1.self_attn.q_norm.weight",
            "model.layers.3.mlp.experts.5.down_proj",
            "lm_head",
        ] {
            let src = Hiding(checkpoint("gs32", "quant"), name);
            let e = Model::load(Arc::new(src)).err().expect("load must fail");
            assert!(e.to_string().contains(name), "{e}");
        }
    }

    #[test]
    fn params_count_every_tensor_of_the_checkpoint() {
        let ck = checkpoint("gs128", "float");
        let stored: u64 = ck
            .tensors
            .values()
            .map(|t| t.shape.iter().product::<usize>() as u64)
            .sum();
        let m = Model::load(ck).unwrap();
        assert_eq!(m.params(), stored);
        assert!(m.weight_bytes_per_token() < m.weight_bytes());
        // BF16 matrices: 2 bytes per element; vectors counted at 4.
        assert!(m.weight_bytes() >= 2 * (m.params() - 1_000));
    }

    #[test]
    fn ids_are_checked() {
        let m = Model::load(checkpoint("gs32", "float")).unwrap();
        let e = m.check_ids(&[1, 2, 512]).unwrap_err();
        assert!(matches!(
            e,
            ModelError::TokenOutOfRange {
                id: 512,
                index: 2,
                vocab: 512
            }
        ));
        assert!(matches!(m.check_ids(&[]), Err(ModelError::Empty)));
        assert!(m.check_ids(&[0, 511]).is_ok());
    }

    #[test]
    fn cloned_state_continues_independently() {
        let m = Model::load(checkpoint("gs32", "quant")).unwrap();
        let mut a = m.new_state();
        m.forward(&mut a, &[5, 6, 7]);
        let mut b = a.clone();
        let la = m.forward(&mut a, &[8]);
        let lb = m.forward(&mut b, &[8]);
        assert_eq!(la, lb);
        assert_eq!(a.position(), 4);
        assert!(a.bytes() > 0);
        // and a different continuation gives different logits
        let mut c = m.new_state();
        m.forward(&mut c, &[5, 6, 9]);
        assert_ne!(m.forward(&mut c, &[8]), la);
    }

    #[test]
    fn long_prefill_in_chunks_equals_decode() {
        let m = Model::load(checkpoint("gs32", "quant")).unwrap();
        // Chunks of 512 (not PREFILL_CHUNK) keep the stepwise decode
        // below short.
        let chunk = 512;
        let n = chunk + 40;
        let ids: Vec<u32> = (0..n as u32).map(|i| (i * 131 + 7) % 512).collect();
        let mut a = m.new_state();
        let all = m.run_chunked(&mut a, &ids, true, chunk);
        assert_eq!(all.len(), n * 512);
        let mut b = m.new_state();
        let last = m.run_chunked(&mut b, &ids, false, chunk);
        // The last row of a full prefill and a last-only prefill run the
        // same layers but lm_head as a matmul or a matvec, which sum in a
        // different order: equal to rounding, not bit for bit.
        let tail = &all[(n - 1) * 512..];
        let scale = last.iter().fold(0f32, |r, v| r.max(v.abs()));
        let diff = tail
            .iter()
            .zip(&last)
            .fold(0f32, |e, (x, y)| e.max((x - y).abs()));
        assert!(
            diff <= 1e-5 * scale,
            "forward_all vs forward: {diff} (range {scale})"
        );
        let mut c = m.new_state();
        let mut step = Vec::new();
        for &id in &ids {
            step = m.forward(&mut c, &[id]);
        }
        let range = last.iter().fold(0f32, |r, v| r.max(v.abs()));
        let err = last
            .iter()
            .zip(&step)
            .fold(0f32, |e, (x, y)| e.max((x - y).abs()));
        // Decode's matvecs quantize activations to int16 per 32-block
        // (kernels::default_path) while prefill's matmuls stay f32; over 552
        // recurrent steps that drifts by ~4e-3 x range here, inside the
        // issue's quantized-path bound of 2e-2 that prefill and decode must
        // both meet.
        assert!(
            err <= 2e-2 * range,
            "chunked prefill vs decode: {err} (range {range})"
        );
        assert_eq!(a.position(), n);
    }

    /// Greedy argmax and the gap to the runner-up.
    fn top1(logits: &[f32]) -> (u32, f32) {
        let mut best = (0usize, f32::NEG_INFINITY);
        let mut second = f32::NEG_INFINITY;
        for (i, &v) in logits.iter().enumerate() {
            if v > best.1 {
                second = best.1;
                best = (i, v);
            } else if v > second {
                second = v;
            }
        }
        (best.0 as u32, best.1 - second)
    }

    /// One sequence's script: its prompt, when it joins the batch (step
    /// index) and how many tokens it generates before it leaves.
    struct Script {
        prompt: Vec<u32>,
        joins: usize,
        gen: usize,
    }

    /// Greedy generation of one sequence alone: the logits before each
    /// generated token, and the tokens.
    fn alone(m: &Model, s: &Script) -> (Vec<Vec<f32>>, Vec<u32>) {
        let mut st = m.new_state();
        let mut logits = m.forward(&mut st, &s.prompt);
        let (mut seen, mut toks) = (Vec::new(), Vec::new());
        for _ in 0..s.gen {
            let (id, _) = top1(&logits);
            seen.push(logits.clone());
            toks.push(id);
            logits = m.forward(&mut st, &[id]);
        }
        (seen, toks)
    }

    #[test]
    fn batched_sequences_match_each_alone() {
        let m = Model::load(checkpoint("gs32", "quant")).unwrap();
        let p = |n: u32, k: u32| -> Vec<u32> { (0..n).map(|i| (i * k + 3) % 512).collect() };
        // Different prompt lengths; B joins while A decodes, C (prefilled
        // in two chunks) while both do; A leaves first.
        let scripts = [
            Script {
                prompt: p(5, 37),
                joins: 0,
                gen: 6,
            },
            Script {
                prompt: p(11, 101),
                joins: 2,
                gen: 12,
            },
            Script {
                prompt: p(40, 13),
                joins: 4,
                gen: 7,
            },
        ];
        let solo: Vec<_> = scripts.iter().map(|s| alone(&m, s)).collect();
        // The batched run feeds each sequence the tokens it chose alone, so
        // every step's logits can be compared with the lone run's.
        let mut states: Vec<State> = scripts.iter().map(|_| m.new_state()).collect();
        let mut fed = vec![0usize; scripts.len()]; // prompt tokens fed
        let mut made = vec![0usize; scripts.len()]; // tokens generated
        let chunk = 24;
        let (mut worst, mut steps_mixed) = (0f32, 0);
        for step in 0.. {
            let live: Vec<usize> = (0..scripts.len())
                .filter(|&i| scripts[i].joins <= step && made[i] < scripts[i].gen)
                .collect();
            if live.is_empty() && step > 4 {
                break;
            }
            let mut ids: Vec<Vec<u32>> = Vec::new();
            for &i in &live {
                let s = &scripts[i];
                ids.push(if fed[i] < s.prompt.len() {
                    let end = (fed[i] + chunk).min(s.prompt.len());
                    s.prompt[fed[i]..end].to_vec()
                } else {
                    vec![solo[i].1[made[i] - 1]]
                });
            }
            let mut batch: Vec<BatchSeq> = Vec::new();
            let mut rest: &mut [State] = &mut states;
            let mut base = 0;
            for (j, &i) in live.iter().enumerate() {
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(i + 1 - base);
                base = i + 1;
                rest = tail;
                batch.push(BatchSeq {
                    state: head.last_mut().unwrap(),
                    ids: &ids[j],
                    logits: true,
                });
            }
            let out = m.forward_batch(&mut batch);
            if ids.iter().any(|v| v.len() > 1) && ids.len() > 1 {
                steps_mixed += 1;
            }
            for (j, &i) in live.iter().enumerate() {
                let s = &scripts[i];
                if fed[i] < s.prompt.len() {
                    fed[i] += ids[j].len();
                    if fed[i] < s.prompt.len() {
                        continue;
                    }
                } else if made[i] >= s.gen {
                    continue;
                }
                let want = &solo[i].0[made[i]];
                let range = want.iter().fold(0f32, |r, v| r.max(v.abs()));
                let err = want
                    .iter()
                    .zip(&out[j])
                    .fold(0f32, |e, (x, y)| e.max((x - y).abs()));
                worst = worst.max(err / range);
                let (a, gap) = top1(want);
                let (b, _) = top1(&out[j]);
                // Same top-1 unless the lone run's top two are within the
                // bound of each other (a tie the rounding may break).
                assert!(
                    a == b || gap <= 2.0 * err,
                    "sequence {i}, token {}: top-1 {b} batched vs {a} alone",
                    made[i]
                );
                made[i] += 1;
            }
        }
        assert_eq!(made, vec![6, 12, 7]);
        assert!(steps_mixed >= 2, "prefill chunks ran beside decodes");
        // Batched products are matmuls, lone decode's matvecs: both keep
        // int16 activations, so they agree to rounding (~1e-4 of the range
        // here), far inside the quantized-path bound of 2e-2.
        assert!(worst <= 2e-3, "batched vs alone: {worst} x range");
        eprintln!("batched vs alone: worst {worst:.2e} x range");
        assert_eq!(states[0].position(), 5 + 6 - 1);
    }
}
