//! `rh-bench`'s default run: prompt processing (pp) and token generation
//! (tg) throughput in llama-bench's table format, plus load time, peak RSS,
//! bytes of weights per token and the effective bandwidth that implies.

use serde::Serialize;

/// One test (`pp512`, `tg128`, ...) over several repetitions.
#[derive(Clone, Debug, Serialize)]
pub struct TestResult {
    /// `pp<N>` or `tg<N>`.
    pub test: String,
    /// Tokens per repetition.
    pub tokens: usize,
    /// Tokens/s of each repetition.
    pub samples_tps: Vec<f64>,
    /// Mean tokens/s.
    pub mean_tps: f64,
    /// Sample standard deviation of tokens/s.
    pub sd_tps: f64,
}

impl TestResult {
    /// Summarises per-repetition times (seconds) of `tokens` tokens each.
    pub fn from_times(test: String, tokens: usize, seconds: &[f64]) -> TestResult {
        let samples: Vec<f64> = seconds
            .iter()
            .map(|s| tokens as f64 / s.max(1e-12))
            .collect();
        let (mean, sd) = mean_sd(&samples);
        TestResult {
            test,
            tokens,
            samples_tps: samples,
            mean_tps: mean,
            sd_tps: sd,
        }
    }
}

/// Mean and sample standard deviation (0 for fewer than two samples).
pub fn mean_sd(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct SpeedReport {
    /// Model name (directory name and layer count).
    pub model: String,
    /// Bytes of weights on disk.
    pub size_bytes: u64,
    /// Parameter count.
    pub params: u64,
    /// e.g. `CPU (avx2)`.
    pub backend: String,
    /// Worker threads.
    pub threads: usize,
    /// pp and tg results.
    pub tests: Vec<TestResult>,
    /// Seconds from start to ready (open + validate + first touch).
    pub load_s: f64,
    /// Peak resident set (VmHWM) in bytes.
    pub peak_rss_bytes: u64,
    /// Bytes of weights read per decoded token.
    pub weight_bytes_per_token: u64,
    /// Bytes per token x tg tokens/s, in GB/s.
    pub effective_gbs: Option<f64>,
    /// Read bandwidth measured on this machine (GB/s), and where it came from.
    pub bandwidth_gbs: Option<f64>,
    /// `effective_gbs / bandwidth_gbs`.
    pub bandwidth_ratio: Option<f64>,
    /// Where the bandwidth figure came from (`strategy.toml` or `probe`).
    pub bandwidth_source: Option<String>,
    /// Multiply-adds of the layers' matrices per prompt token.
    pub prefill_macs_per_token: u64,
    /// `2 x prefill_macs_per_token x` pp tokens/s, in GFLOP/s.
    pub prefill_gflops: Option<f64>,
    /// FMA peak of this machine on the same threads (GFLOP/s, measured in
    /// the same run), which prefill is compared with.
    pub fma_peak_gflops: Option<f64>,
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

fn params(p: u64) -> String {
    if p >= 1_000_000_000 {
        format!("{:.2} B", p as f64 / 1e9)
    } else {
        format!("{:.2} M", p as f64 / 1e6)
    }
}

impl SpeedReport {
    /// The llama-bench-style markdown table followed by the summary lines.
    pub fn table(&self) -> String {
        let mut s = String::new();
        s.push_str("| model | size | params | backend | threads | test | t/s |\n");
        s.push_str("| ----- | ---: | -----: | ------- | ------: | ---: | --: |\n");
        for t in &self.tests {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {:.2} ± {:.2} |\n",
                self.model,
                gib(self.size_bytes),
                params(self.params),
                self.backend,
                self.threads,
                t.test,
                t.mean_tps,
                t.sd_tps
            ));
        }
        s.push('\n');
        s.push_str(&format!("load time:               {:.3} s\n", self.load_s));
        s.push_str(&format!(
            "peak RSS:                {}\n",
            crate::cli::human_bytes(self.peak_rss_bytes)
        ));
        s.push_str(&format!(
            "weights read per token:  {}\n",
            crate::cli::human_bytes(self.weight_bytes_per_token)
        ));
        if let Some(e) = self.effective_gbs {
            s.push_str(&format!("effective bandwidth:     {e:.2} GB/s (decode)\n"));
        }
        if let (Some(b), Some(r)) = (self.bandwidth_gbs, self.bandwidth_ratio) {
            s.push_str(&format!(
                "machine read bandwidth:  {b:.2} GB/s ({}); decode reaches {:.0}% of it\n",
                self.bandwidth_source.as_deref().unwrap_or("measured"),
                r * 100.0
            ));
        }
        if let Some(g) = self.prefill_gflops {
            s.push_str(&format!(
                "prefill compute:         {g:.1} GFLOP/s (2 x {:.1} M multiply-adds per prompt token in the layers' matrices)",
                self.prefill_macs_per_token as f64 / 1e6
            ));
            match self.fma_peak_gflops {
                Some(p) if p > 0.0 => s.push_str(&format!(
                    "; {:.0}% of the {p:.1} GFLOP/s FMA peak measured now\n",
                    g / p * 100.0
                )),
                _ => s.push('\n'),
            }
        }
        s
    }

    /// CSV, one row per test, with a header.
    pub fn csv(&self) -> String {
        let mut s = String::from(
            "model,size_bytes,params,backend,threads,test,tokens,mean_tps,sd_tps,load_s,peak_rss_bytes,weight_bytes_per_token,effective_gbs,bandwidth_gbs\n",
        );
        let opt = |v: Option<f64>| v.map(|x| format!("{x:.4}")).unwrap_or_default();
        for t in &self.tests {
            s.push_str(&format!(
                "{},{},{},{},{},{},{},{:.4},{:.4},{:.4},{},{},{},{}\n",
                self.model,
                self.size_bytes,
                self.params,
                self.backend,
                self.threads,
                t.test,
                t.tokens,
                t.mean_tps,
                t.sd_tps,
                self.load_s,
                self.peak_rss_bytes,
                self.weight_bytes_per_token,
                opt(self.effective_gbs),
                opt(self.bandwidth_gbs)
            ));
        }
        s
    }
}

/// Peak resident set size of this process (VmHWM), in bytes.
pub fn peak_rss_bytes() -> u64 {
    proc_status_kib("VmHWM:") * 1024
}

/// Anonymous (non-file) resident memory of this process (RssAnon), in bytes.
pub fn anon_rss_bytes() -> u64 {
    proc_status_kib("RssAnon:") * 1024
}

fn proc_status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_and_table() {
        let (m, sd) = mean_sd(&[1.0, 2.0, 3.0]);
        assert!((m - 2.0).abs() < 1e-12 && (sd - 1.0).abs() < 1e-12);
        let t = TestResult::from_times("tg4".into(), 4, &[1.0, 2.0]);
        assert_eq!(t.samples_tps, vec![4.0, 2.0]);
        let r = SpeedReport {
            model: "tiny".into(),
            size_bytes: 1 << 30,
            params: 2_000_000,
            backend: "CPU (avx2)".into(),
            threads: 2,
            tests: vec![t],
            load_s: 0.1,
            peak_rss_bytes: 1 << 20,
            weight_bytes_per_token: 1000,
            effective_gbs: Some(1.0),
            bandwidth_gbs: Some(10.0),
            bandwidth_ratio: Some(0.1),
            bandwidth_source: Some("probe".into()),
            prefill_macs_per_token: 3_000_000,
            prefill_gflops: Some(6.0),
            fma_peak_gflops: Some(60.0),
        };
        let table = r.table();
        assert!(
            table.contains("prefill compute:         6.0 GFLOP/s (2 x 3.0 M multiply-adds per prompt token in the layers' matrices); 10% of the 60.0 GFLOP/s FMA peak"),
            "{table}"
        );
        assert!(
            table.contains("| tiny | 1.00 GiB | 2.00 M | CPU (avx2) | 2 | tg4 | 3.00 ± 1.41 |"),
            "{table}"
        );
        assert_eq!(r.csv().lines().count(), 2);
        assert!(peak_rss_bytes() > 0);
    }
}
