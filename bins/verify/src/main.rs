//! `rh-verify`: BLAKE3 manifests for the cache (write, check, quick check)
//! and portable tar.zst bundles. Logic lives in `roundhouse::verify`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

use roundhouse::cli::{self, CliError, Verbosity};
use roundhouse::pipeline::Pipeline;
use roundhouse::verify::{self, pack, CheckOptions, StageOptions, VerifyFlags};

/// Check a directory (the repacked cache) against its BLAKE3 manifest,
/// locating damage to a file and chunk; pack and unpack verified bundles.
/// Without a subcommand it runs the pipeline's verify stage: it writes the
/// cache's manifest when there is none, else checks the cache against it.
#[derive(Parser, Debug)]
#[command(
    name = "rh-verify",
    version,
    after_help = "Examples:\n  \
      rh-verify work/cache                      check a cache against its manifest (write one if it has none)\n  \
      rh-verify work/cache --expect HASH        check it is exactly the cache that was shared\n  \
      rh-verify work/cache --quick              sizes and first/last chunks only\n  \
      rh-verify                                 the pipeline's verify stage (pipeline.toml)\n  \
      rh-verify pack work/cache --out c.tar.zst bundle a verified cache\n  \
      rh-verify unpack c.tar.zst --out cache --expect HASH   unpack a bundle, verifying every chunk"
)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Directory to verify: checked against its manifest, or given one when
    /// it has none (a cache must then open with full validation).
    dir: Option<PathBuf>,
    /// Pipeline manifest (default: ./pipeline.toml when present).
    #[arg(long)]
    pipeline: Option<PathBuf>,
    /// Stage: directory to verify (default: [verify] cache, else repack's output).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Stage: check sizes and the first and last chunk of each file only.
    #[arg(long)]
    quick: bool,
    /// Stage: the manifest hash the cache must have (shared out of band).
    #[arg(long)]
    expect: Option<String>,
    /// Stage: redo even when up to date.
    #[arg(long)]
    force: bool,
    /// Print the result as JSON on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// More logs (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Errors only (and no progress bar).
    #[arg(short, long, global = true)]
    quiet: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Hash every file of DIR into DIR/manifest.blake3.json.
    Write {
        /// Directory to hash.
        dir: PathBuf,
        /// Chunk size in MiB (a power of two).
        #[arg(long, default_value_t = 64)]
        chunk_mib: u64,
    },
    /// Check DIR against DIR/manifest.blake3.json (exit 3 on a mismatch).
    Check {
        /// Directory to check.
        dir: PathBuf,
        /// Sizes and the first and last chunk of each file only.
        #[arg(long)]
        quick: bool,
        /// The manifest hash DIR must have.
        #[arg(long)]
        expect: Option<String>,
    },
    /// Stream DIR (manifest first) into a tar.zst bundle, checking as it goes.
    Pack {
        /// Directory with a manifest.
        dir: PathBuf,
        /// Bundle to write (e.g. cache.tar.zst).
        #[arg(long)]
        out: PathBuf,
        /// zstd level (1-19).
        #[arg(long, default_value_t = 3)]
        level: i32,
    },
    /// Extract a bundle into DIR, verifying every chunk as it arrives.
    Unpack {
        /// The bundle.
        bundle: PathBuf,
        /// Directory to fill.
        #[arg(long)]
        out: PathBuf,
        /// The manifest hash the bundle must carry.
        #[arg(long)]
        expect: Option<String>,
    },
}

fn emit<T: serde::Serialize>(json: bool, quiet: bool, value: &T, line: String) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("result serializes")
        );
    } else if !quiet {
        println!("{line}");
    }
}

fn run(a: Args) -> Result<(), CliError> {
    cli::init_logging(&Verbosity {
        verbose: a.verbose,
        quiet: a.quiet,
    });
    // After the logs, so a bad RH_HEAP is reported (roundhouse::heap).
    roundhouse::heap::tune();
    let (json, quiet) = (a.json, a.quiet);
    match a.cmd {
        Some(Cmd::Write { dir, chunk_mib }) => {
            if chunk_mib == 0 || !chunk_mib.is_power_of_two() {
                return Err(CliError::usage(format!(
                    "--chunk-mib {chunk_mib}: must be a power of two"
                )));
            }
            let (_, s) = verify::write_manifest(&dir, chunk_mib << 20, quiet)?;
            emit(json, quiet, &s, s.line());
        }
        Some(Cmd::Check { dir, quick, expect }) => {
            let s = verify::check(
                &dir,
                &CheckOptions {
                    quick,
                    expect,
                    quiet,
                },
            )?;
            emit(json, quiet, &s, s.line());
        }
        Some(Cmd::Pack { dir, out, level }) => {
            if !(1..=19).contains(&level) {
                return Err(CliError::usage(format!("--level {level}: must be 1 to 19")));
            }
            let s = pack::pack(&dir, &out, level, quiet)?;
            emit(json, quiet, &s, s.line("packed"));
        }
        Some(Cmd::Unpack {
            bundle,
            out,
            expect,
        }) => {
            let s = pack::unpack(&bundle, &out, expect.as_deref(), quiet)?;
            emit(json, quiet, &s, s.line("unpacked"));
        }
        None if a.dir.is_some() => {
            let dir = a.dir.expect("checked");
            if dir.join(verify::MANIFEST_NAME).exists() {
                let s = verify::check(
                    &dir,
                    &CheckOptions {
                        quick: a.quick,
                        expect: a.expect,
                        quiet,
                    },
                )?;
                emit(json, quiet, &s, s.line());
            } else {
                let (_, s) = verify::write_manifest(&dir, verify::DEFAULT_CHUNK, quiet)?;
                if let Some(exp) = &a.expect {
                    if !exp.trim().eq_ignore_ascii_case(&s.manifest_blake3) {
                        return Err(verify::VerifyError::Expect {
                            path: dir.join(verify::MANIFEST_NAME),
                            found: s.manifest_blake3,
                            expected: exp.trim().to_string(),
                        }
                        .into());
                    }
                }
                emit(json, quiet, &s, s.line());
            }
        }
        None => {
            let p = Pipeline::discover(a.pipeline.as_deref())?;
            let o = StageOptions::resolve(
                &VerifyFlags {
                    cache: a.cache,
                    expect: a.expect,
                    quick: a.quick,
                    force: a.force,
                    quiet,
                },
                &p,
            );
            let r = verify::run_stage(&p, &o)?;
            let line = match &r.summary {
                Some(s) => s.line(),
                None => format!(
                    "verify: up to date: {} already verified (manifest blake3 {}); use --force to check again",
                    r.dir.display(),
                    r.manifest_blake3
                ),
            };
            emit(json, quiet, &r, line);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    cli::main_with("rh-verify", || run(args))
}
