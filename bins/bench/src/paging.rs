//! `rh-bench --memory-budget SIZE`: opens the model under a RAM budget
//! (routed experts paged by the expert cache, `roundhouse::experts`) and
//! reports the cache's behaviour over the tg test: hit rate, bytes read
//! from storage per token, and decode time against the storage-bound limit
//! (bytes read per token / the disk's random-read speed, measured here).

use std::path::Path;
use std::sync::Arc;

use roundhouse::cli::CliError;
use roundhouse::model::experts::{self, BudgetPlan, ExpertPager, PagerOptions};
use roundhouse::model::Model;
use roundhouse::pipeline::Pipeline;

pub use crate::paging_report::PagingReport;

/// The budget: the flag, else `[bench] memory_budget`, else inspect's
/// (set when the model does not fit in RAM).
pub fn budget(
    flag: Option<&str>,
    p: &Pipeline,
    strategy: Option<&roundhouse::inspect::Strategy>,
) -> Result<Option<u64>, CliError> {
    match (flag, p.bench.memory_budget.as_deref()) {
        (Some(s), _) => experts::parse_size(s)
            .map(Some)
            .map_err(|e| CliError::usage(format!("--memory-budget: {e}"))),
        (None, Some(s)) => experts::parse_size(s)
            .map(Some)
            .map_err(|e| CliError::usage(format!("[bench] memory_budget: {e}"))),
        (None, None) => Ok(strategy.and_then(|s| s.paging.as_ref()?.memory_budget)),
    }
}

/// Loads the model, under `budget` when given.
/// `held`: the sequences the benchmark keeps at once and the context
/// each reaches, set aside from the budget.
pub fn load(
    dir: &Path,
    budget: Option<u64>,
    predict: bool,
    held: (usize, usize),
    p: &Pipeline,
) -> Result<(Model, Option<BudgetPlan>), CliError> {
    let Some(budget) = budget else {
        let model = Model::load(roundhouse::evaluate::open_weights(dir)?)?;
        return Ok((model, None));
    };
    let mut opts = PagerOptions::new(budget);
    opts.predict = predict;
    (opts.sequences, opts.context_tokens) = held;
    let work = p.work_dir();
    if work.is_dir() {
        opts.usage_file = Some(experts::usage_path(&work));
    }
    let (weights, plan) = experts::open_with_budget(dir, &opts)?;
    if let Err(msg) = weights.residency(true, true) {
        tracing::warn!("{msg}; the resident weights stay unlocked");
    }
    Ok((Model::load(weights)?, plan))
}

/// The pager of a loaded model, when its experts are paged.
pub fn pager(model: &Model) -> Option<Arc<ExpertPager>> {
    experts::pager_of(&**model.weights())
}
