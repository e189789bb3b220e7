//! The two figures serve and bench take from inspect's `strategy.toml`:
//! the thread count and the measured read bandwidth. Read leniently (any
//! table, first match), so a newer strategy format still yields them; a
//! missing or unreadable file gives nothing and callers fall back.

use std::path::Path;

/// What a strategy file says, as far as serve and bench care.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StrategyHints {
    /// `threads`.
    pub threads: Option<usize>,
    /// `bandwidth_gbs` (else `all_threads_gbs`): read GB/s with all threads.
    pub bandwidth_gbs: Option<f64>,
}

fn find(v: &toml::Value, key: &str) -> Option<toml::Value> {
    let t = v.as_table()?;
    if let Some(x) = t.get(key) {
        return Some(x.clone());
    }
    t.values().find_map(|x| find(x, key))
}

fn number(v: &toml::Value) -> Option<f64> {
    v.as_float().or_else(|| v.as_integer().map(|i| i as f64))
}

impl StrategyHints {
    /// Reads `path`; `None` when it does not exist or does not parse.
    pub fn read(path: &Path) -> Option<StrategyHints> {
        let text = std::fs::read_to_string(path).ok()?;
        let v: toml::Value = match toml::from_str(&text) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(
                    "{}: ignoring unreadable strategy: {}",
                    path.display(),
                    e.message()
                );
                return None;
            }
        };
        Some(StrategyHints {
            threads: find(&v, "threads")
                .and_then(|x| x.as_integer())
                .filter(|&t| t > 0)
                .map(|t| t as usize),
            bandwidth_gbs: find(&v, "bandwidth_gbs")
                .or_else(|| find(&v, "all_threads_gbs"))
                .and_then(|x| number(&x))
                .filter(|&g| g > 0.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_threads_and_bandwidth_anywhere() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("strategy.toml");
        std::fs::write(
            &p,
            "format = 1\nthreads = 6\n[memory]\nbandwidth_gbs = 41.5\n",
        )
        .unwrap();
        let h = StrategyHints::read(&p).unwrap();
        assert_eq!(h.threads, Some(6));
        assert_eq!(h.bandwidth_gbs, Some(41.5));
        std::fs::write(&p, "[probe.bandwidth]\nall_threads_gbs = 20\n").unwrap();
        assert_eq!(StrategyHints::read(&p).unwrap().bandwidth_gbs, Some(20.0));
        assert!(StrategyHints::read(&dir.path().join("none.toml")).is_none());
    }
}
