//! What every binary shares: exit codes, one-line error reporting, logging
//! and progress bars.
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success |
//! | 1 | failure (bad input, I/O, a stage error) |
//! | 2 | usage error (bad flags; clap uses 2 as well) |
//! | 3 | verification failed (a hash, size or format check did not match) |
//! | 4 | a predecessor stage has not finished: run it first |

use std::fmt;
use std::process::ExitCode;

/// The process exit codes used by every `rh-*` binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Success.
    Ok = 0,
    /// A failure: bad input, I/O error, a failed stage.
    Failure = 1,
    /// Wrong flags or arguments.
    Usage = 2,
    /// Data did not match its hash, size or format.
    VerifyFailed = 3,
    /// A predecessor stage has not finished.
    NotReady = 4,
}

/// Errors that know which exit code they deserve.
pub trait Classify: std::error::Error {
    /// The exit code a binary should end with for this error.
    fn exit(&self) -> Exit {
        Exit::Failure
    }
}

/// The error a binary's `run` function returns: a code and a one-line message.
#[derive(Debug)]
pub struct CliError {
    /// The exit code.
    pub code: Exit,
    /// The message printed after `error: `.
    pub message: String,
}

impl CliError {
    /// A usage error (exit 2).
    pub fn usage(message: impl Into<String>) -> Self {
        CliError {
            code: Exit::Usage,
            message: message.into(),
        }
    }
    /// A plain failure (exit 1).
    pub fn failure(message: impl Into<String>) -> Self {
        CliError {
            code: Exit::Failure,
            message: message.into(),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E: Classify> From<E> for CliError {
    fn from(e: E) -> Self {
        CliError {
            code: e.exit(),
            message: one_line(&e),
        }
    }
}

/// Flattens an error and its sources into one line.
pub fn one_line(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let s_msg = s.to_string();
        if !msg.contains(&s_msg) {
            msg.push_str(": ");
            msg.push_str(&s_msg);
        }
        src = s.source();
    }
    msg.replace('\n', " ")
}

/// Runs a binary's body and turns its result into an exit code, printing
/// errors as a single `error: ...` line on stderr.
pub fn main_with(tool: &str, body: impl FnOnce() -> Result<(), CliError>) -> ExitCode {
    match body() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{tool}: error: {}", e.message);
            ExitCode::from(e.code as u8)
        }
    }
}

/// Flags every binary accepts.
#[derive(Clone, Debug, Default)]
pub struct Verbosity {
    /// `-v` count.
    pub verbose: u8,
    /// `-q`.
    pub quiet: bool,
}

/// Sets up `tracing` logs on stderr: warnings by default, `-v` info,
/// `-vv` debug, `-vvv` trace, `-q` errors only. `RUST_LOG` overrides.
pub fn init_logging(v: &Verbosity) {
    use tracing_subscriber::EnvFilter;
    let level = if v.quiet {
        "error"
    } else {
        match v.verbose {
            0 => "warn",
            1 => "info",
            2 => "debug",
            _ => "trace",
        }
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(stderr_is_tty())
        .without_time()
        .try_init();
}

/// Whether stderr is a terminal (progress bars and colour only then).
pub fn stderr_is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

/// A byte-count progress bar with rate and ETA; hidden when stderr is not a
/// terminal or when `quiet`.
pub fn bytes_bar(total: u64, message: &str, quiet: bool) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if quiet || !stderr_is_tty() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:20} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

/// A count progress bar (tensors, files), hidden like [`bytes_bar`].
pub fn count_bar(total: u64, message: &str, quiet: bool) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if quiet || !stderr_is_tty() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{msg:20} [{bar:30}] {pos}/{len} eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

/// Human-readable byte size (GiB, MiB, KiB).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}
