//! Runs the kernel benchmarks until `rh-bench kernels` is wired in:
//! `cargo run --release -p roundhouse --example kernel_bench -- [THREADS] [SHAPE...]`.

fn main() {
    let mut args = std::env::args().skip(1);
    let mut opts = roundhouse::kernels::bench::KernelOpts::default();
    if let Some(t) = args.next() {
        opts.threads = t.parse().ok();
    }
    opts.shapes = args.collect();
    if let Ok(s) = std::env::var("RH_BENCH_SECONDS") {
        opts.seconds = s.parse().unwrap_or(opts.seconds);
    }
    if let Ok(s) = std::env::var("RH_BENCH_COLD") {
        opts.cold_bytes = s.parse().unwrap_or(opts.cold_bytes);
    }
    if let Ok(s) = std::env::var("RH_BENCH_MEMBW") {
        opts.membw_bytes = s.parse().unwrap_or(opts.membw_bytes);
    }
    opts.matmul = std::env::var("RH_BENCH_NO_MATMUL").is_err();
    let rep = roundhouse::kernels::bench::run(&opts);
    print!("{}", rep.table());
    if std::env::var("RH_BENCH_JSON").is_ok() {
        println!("{}", serde_json::to_string_pretty(&rep).unwrap());
    }
}
