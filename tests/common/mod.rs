//! Helpers shared by the integration tests: locate (and build, once) the
//! `rh-*` binaries, run them, and make scratch directories.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Once;

static BUILD: Once = Once::new();

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Path of a built `rh-*` binary. The first call runs `cargo build --bins`
/// (a no-op when up to date) so a plain `cargo test` always tests current
/// binaries, whichever package they belong to.
pub fn bin(name: &str) -> PathBuf {
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "--bins", "--workspace"])
            .current_dir(workspace_root())
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build --bins failed");
    });
    // target/debug/deps/<test-binary> -> target/debug/<name>
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target/debug");
    let p = dir.join(name);
    assert!(p.exists(), "{} not built", p.display());
    p
}

/// A command for an `rh-*` binary with a clean environment for logs.
pub fn rh(name: &str) -> Command {
    let mut c = Command::new(bin(name));
    c.env_remove("RUST_LOG");
    c
}

/// Runs a command, returning its output (never panics on non-zero exit).
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("spawn")
}

/// stdout + stderr as one string, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub mod hub;

/// `cmd` with the file-size limit lowered to `limit` bytes and SIGXFSZ
/// ignored, so a write past it fails with EFBIG like a full disk would.
pub fn with_file_size_limit(
    cmd: &mut std::process::Command,
    limit: u64,
) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls setrlimit and signal, which are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: limit as libc::rlim_t,
                rlim_max: libc::RLIM_INFINITY,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        })
    }
}

/// Writes the synthetic tiny checkpoint (4 layers: linear and full
/// attention; random weights, the real Qwen3 tokenizer and template) once
/// under `tmp_dir` (a test's `CARGO_TARGET_TMPDIR`) and returns its path.
/// The content is deterministic, so test binaries that race to write it
/// produce the same directory; the loser of the final rename drops its copy.
pub fn tiny_checkpoint(tmp_dir: &Path) -> PathBuf {
    use roundhouse::synthetic::{write_shard, Spec};
    let dir = tmp_dir.join("serve-tiny-v1");
    if dir.join("done").exists() {
        return dir;
    }
    let tmp = tempfile::tempdir_in(tmp_dir).unwrap();
    let spec = Spec::preset("tiny", None, 7).unwrap();
    for (name, bytes) in spec.metadata_files() {
        std::fs::write(tmp.path().join(name), bytes).unwrap();
    }
    for (file, tensors) in spec.shards() {
        let mut f = std::io::BufWriter::new(std::fs::File::create(tmp.path().join(file)).unwrap());
        write_shard(&mut f, &tensors, 7).unwrap();
    }
    std::fs::write(tmp.path().join("done"), b"").unwrap();
    let tmp = tmp.keep();
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another test binary got there first.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    dir
}
