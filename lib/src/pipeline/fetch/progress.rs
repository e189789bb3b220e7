//! Progress output of the hub downloads: one bar per file above an overall
//! bar (hidden when stderr is not a terminal, or `-q`), and warnings drawn
//! above the bars instead of through them.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A warning drawn above the progress bars instead of through them.
macro_rules! bar_warn {
    ($bars:expr, $($arg:tt)*) => {
        $bars.multi.suspend(|| tracing::warn!($($arg)*))
    };
}
pub(crate) use bar_warn;

/// The bars of one fetch.
pub(crate) struct Bars {
    /// All bars.
    pub multi: MultiProgress,
    /// The overall bar.
    pub overall: ProgressBar,
    /// Whether bars are hidden.
    pub hidden: bool,
}

impl Bars {
    /// The overall bar of `total` bytes named `name`, alone for now.
    pub fn new(total: u64, name: &str, quiet: bool) -> Bars {
        let hidden = quiet || !crate::cli::stderr_is_tty();
        let multi = if hidden {
            MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
        } else {
            MultiProgress::new()
        };
        let overall = multi.add(crate::cli::bytes_bar(total, name, quiet));
        overall.set_style(bar_style());
        Bars {
            multi,
            overall,
            hidden,
        }
    }

    /// A bar for one file, above the overall bar (removed when done).
    pub fn file_bar(&self, path: &str, len: u64) -> ProgressBar {
        if self.hidden {
            return ProgressBar::hidden();
        }
        let b = self
            .multi
            .insert_before(&self.overall, ProgressBar::new(len));
        b.set_style(bar_style());
        b.set_message(short_name(path, NAME_WIDTH));
        b
    }

    /// Removes a file's bar.
    pub fn remove(&self, bar: &ProgressBar) {
        bar.finish_and_clear();
        self.multi.remove(bar);
    }
}

/// Width of the name column of the bars.
pub(crate) const NAME_WIDTH: usize = 32;

/// The style of the file bars and of the overall bar under them (the same
/// columns as [`crate::cli::bytes_bar`], with a wider name).
pub(crate) fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{msg:32!} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    )
    .expect("static template")
    .progress_chars("=> ")
}

/// `path` in at most `n` characters: without `.safetensors` when that is
/// enough, else its end (shard numbers are what tells bars apart).
pub(crate) fn short_name(path: &str, n: usize) -> String {
    let count = path.chars().count();
    if count <= n {
        return path.to_string();
    }
    if let Some(stem) = path.strip_suffix(".safetensors") {
        if stem.chars().count() <= n {
            return stem.to_string();
        }
    }
    let tail: String = path.chars().skip(count - (n - 1)).collect();
    format!("…{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_column() {
        assert_eq!(
            short_name("model-00001-of-00041.safetensors", 32),
            "model-00001-of-00041.safetensors"
        );
        assert_eq!(
            short_name("model_extra_tensors_mtp.safetensors", 32),
            "model_extra_tensors_mtp"
        );
        assert_eq!(short_name("abcdefghij", 5), "…ghij");
    }
}
