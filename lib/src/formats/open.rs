//! Opening a model directory as a weight source: the one place that decides
//! between the repacked cache and the safetensors checkpoint, and that runs
//! `rh-verify`'s quick check first when a manifest is there.
//!
//! It sits above both implementations ([`crate::cache`], [`crate::checkpoint`])
//! and [`crate::verify`], so [`crate::weights`], the interface they
//! implement, imports none of them.

use std::path::Path;
use std::sync::Arc;

use crate::cache::{self, CacheError};
use crate::checkpoint::Checkpoint;
use crate::cli::{Classify, Exit};
use crate::verify::{self, VerifyError};
use crate::weights::{WeightError, WeightSource};

/// Why a model directory did not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The directory fails the quick check against its manifest.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// The cache does not open (damaged, another version, locked): its own
    /// error, so a damaged cache exits 3 like any verification failure.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The checkpoint does not open.
    #[error(transparent)]
    Weights(#[from] WeightError),
}

impl Classify for OpenError {
    fn exit(&self) -> Exit {
        match self {
            OpenError::Verify(e) => e.exit(),
            OpenError::Cache(e) => e.exit(),
            OpenError::Weights(e) => e.exit(),
        }
    }
}

/// Opens a model directory as a weight source: the repacked cache when
/// `dir` holds one ([`cache::is_cache`]), else the safetensors checkpoint.
/// When `rh-verify` has left a manifest there, the quick check (sizes,
/// first and last chunk of every file) runs first, so a truncated or
/// swapped cache is refused before it is mapped; a directory without a
/// manifest is opened as is.
pub fn open_weights(dir: &Path) -> Result<Arc<dyn WeightSource>, OpenError> {
    if dir.join(verify::MANIFEST_NAME).is_file() {
        verify::check(
            dir,
            &verify::CheckOptions {
                quick: true,
                expect: None,
                quiet: true,
            },
        )?;
    }
    if cache::is_cache(dir) {
        Ok(Arc::new(cache::Cache::open(dir)?))
    } else {
        Ok(Arc::new(Checkpoint::open(dir)?))
    }
}
