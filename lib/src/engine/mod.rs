//! What runs the model: weight layouts (`tensor`), the SIMD and scalar
//! kernels (`kernels`), `config.json` (`config`), the weight-source
//! interface (`weights`), the Qwen3-Next forward pass and expert cache
//! (`model`), token choice (`sample`) and the memory-bandwidth probe
//! (`membw`), the expert cache's huge-page buffers (`arena`), and reused
//! buffers for a long prefill's largest temporaries (`scratch`).
//!
//! Each module keeps its top-level path (`crate::NAME`): lib.rs
//! re-exports it. scripts/group-modules.sh made this layout.

pub mod arena;
pub mod config;
pub mod kernels;
pub mod membw;
pub mod model;
pub mod sample;
pub mod scratch;
pub mod tensor;
pub mod weights;
