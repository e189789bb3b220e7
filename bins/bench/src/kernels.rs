//! `rh-bench kernels`: effective GB/s and GFLOP/s of the matrix kernels on
//! the real model's shapes, next to the memory read bandwidth and FMA peak
//! measured in the same run (logic in `roundhouse::kernels::bench`).

use roundhouse::cli::CliError;
use roundhouse::kernels::bench::{self, KernelOpts, SHAPES};

/// Flags of `rh-bench kernels`.
#[derive(clap::Args, Clone, Debug)]
pub struct KernelArgs {
    /// Print the report as JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Threads (default: rayon's, one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Only shapes whose name contains one of these (comma-separated):
    /// expert-gate-up, expert-down, qkvz, q_proj, lm_head, big-int4, big-int8.
    #[arg(long, value_delimiter = ',')]
    pub shapes: Vec<String>,
    /// Seconds spent on each measurement (at least one call runs).
    #[arg(long, default_value_t = 0.5)]
    pub seconds: f64,
    /// Tokens of the matrix-matrix (prefill) products.
    #[arg(long, default_value_t = 512)]
    pub tokens: usize,
    /// Skip the matrix-matrix products.
    #[arg(long)]
    pub no_matmul: bool,
    /// MiB of the memory-bandwidth probe's buffer.
    #[arg(long, default_value_t = 1024)]
    pub membw_mib: usize,
    /// MiB of matrix copies each matvec pass walks over, so weights come
    /// from memory as in decode (1 measures cache-resident speed).
    #[arg(long, default_value_t = 512)]
    pub cold_mib: usize,
    /// Also draw each kernel's GB/s against the bandwidth line (and the
    /// matrix-matrix GFLOP/s against the FMA peak), as an SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<std::path::PathBuf>,
}

/// Runs the kernel benchmarks and prints the table (or JSON).
pub fn run(args: &KernelArgs) -> Result<(), CliError> {
    if args.threads == Some(0) {
        return Err(CliError::usage("--threads must be at least 1"));
    }
    if !(args.seconds.is_finite() && args.seconds > 0.0) {
        return Err(CliError::usage("--seconds must be a positive number"));
    }
    if args.membw_mib == 0 {
        return Err(CliError::usage("--membw-mib must be at least 1"));
    }
    for s in &args.shapes {
        if !SHAPES.iter().any(|sh| sh.name.contains(s.as_str())) {
            let names: Vec<_> = SHAPES.iter().map(|sh| sh.name).collect();
            return Err(CliError::usage(format!(
                "--shapes: `{s}` matches no shape (known: {})",
                names.join(", ")
            )));
        }
    }
    if let Some(path) = &args.plot {
        crate::plot::check_target(path)?;
    }
    let opts = KernelOpts {
        threads: args.threads,
        shapes: args.shapes.clone(),
        seconds: args.seconds,
        tokens: args.tokens,
        membw_bytes: args.membw_mib << 20,
        cold_bytes: args.cold_mib.max(1) << 20,
        matmul: !args.no_matmul,
    };
    let report = bench::run(&opts);
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.table());
    }
    if let Some(path) = &args.plot {
        crate::plot::kernels(&report, path)?;
    }
    Ok(())
}
