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

/// Decode of several sequences at once (llama.cpp's batched-bench): each
/// step is one batched forward over every stream's next token.
#[derive(Clone, Debug, Serialize)]
pub struct ParallelResult {
    /// Sequences decoding together.
    pub streams: usize,
    /// Tokens each stream generates per repetition.
    pub tokens_per_stream: usize,
    /// Prompt tokens each stream holds before its tokens are timed.
    pub context: usize,
    /// Tokens/s of all streams together, per repetition.
    pub samples_tps: Vec<f64>,
    /// Mean of `samples_tps`.
    pub aggregate_tps: f64,
    /// Sample standard deviation of `samples_tps`.
    pub aggregate_sd: f64,
    /// `aggregate_tps / streams`: what one stream sees.
    pub per_stream_tps: f64,
    /// `aggregate_tps` over the one-stream run's, when that was measured.
    pub speedup: Option<f64>,
    /// `per_stream_tps` over the one-stream run's.
    pub per_stream_ratio: Option<f64>,
}

impl ParallelResult {
    /// Summarises per-repetition times (seconds) of `streams` x
    /// `tokens_per_stream` tokens each.
    pub fn from_times(
        streams: usize,
        tokens_per_stream: usize,
        context: usize,
        seconds: &[f64],
    ) -> ParallelResult {
        let t = TestResult::from_times(String::new(), streams * tokens_per_stream, seconds);
        ParallelResult {
            streams,
            tokens_per_stream,
            context,
            samples_tps: t.samples_tps,
            aggregate_tps: t.mean_tps,
            aggregate_sd: t.sd_tps,
            per_stream_tps: t.mean_tps / streams.max(1) as f64,
            speedup: None,
            per_stream_ratio: None,
        }
    }

    /// Fills `speedup` and `per_stream_ratio` against the one-stream row.
    pub fn relate(rows: &mut [ParallelResult]) {
        let Some(one) = rows
            .iter()
            .find(|r| r.streams == 1)
            .map(|r| r.aggregate_tps)
        else {
            return;
        };
        for r in rows.iter_mut().filter(|_| one > 0.0) {
            r.speedup = Some(r.aggregate_tps / one);
            r.per_stream_ratio = Some(r.per_stream_tps / one);
        }
    }

    /// The test's name in the table and CSV: `tg<N> x<streams>`.
    pub fn test(&self) -> String {
        format!("tg{} x{}", self.tokens_per_stream, self.streams)
    }
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
    /// Parallel decode results (`--parallel`), fewest streams first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub parallel: Vec<ParallelResult>,
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
    /// The mapped weight files at the end of the run: bytes resident and,
    /// of those, bytes on 2 MiB pages (routed experts are read from the
    /// mapping; on 4 KiB pages each page costs a TLB miss).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mapped: Option<MappedShare>,
}

/// Resident bytes of the mapped weight files and how many are on 2 MiB pages.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct MappedShare {
    /// Bytes resident in the process.
    pub resident_bytes: u64,
    /// Of those, bytes mapped on 2 MiB pages.
    pub huge_page_bytes: u64,
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
        for r in &self.parallel {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {:.2} ± {:.2} |\n",
                self.model,
                gib(self.size_bytes),
                params(self.params),
                self.backend,
                self.threads,
                r.test(),
                r.aggregate_tps,
                r.aggregate_sd
            ));
        }
        s.push('\n');
        if !self.parallel.is_empty() {
            s.push_str(&self.parallel_table());
            s.push('\n');
        }
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
        if let Some(m) = self.mapped.filter(|m| m.resident_bytes > 0) {
            s.push_str(&format!(
                "mapped weights:          {} resident, {:.0}% of it on 2 MiB pages\n",
                crate::cli::human_bytes(m.resident_bytes),
                m.huge_page_bytes as f64 / m.resident_bytes as f64 * 100.0
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

    /// The parallel decode rows as llama.cpp's batched-bench shows them:
    /// aggregate and per-stream tokens/s, and both against one stream.
    fn parallel_table(&self) -> String {
        let mut s = String::from(
            "| streams | ctx | tg/stream | aggregate t/s | per-stream t/s | aggregate vs 1 | per-stream vs 1 |\n",
        );
        s.push_str("| ------: | --: | --------: | ------------: | -------------: | -------------: | --------------: |\n");
        let ratio = |v: Option<f64>| v.map(|x| format!("{x:.2}x")).unwrap_or_else(|| "-".into());
        for r in &self.parallel {
            s.push_str(&format!(
                "| {} | {} | {} | {:.2} ± {:.2} | {:.2} | {} | {} |\n",
                r.streams,
                r.context,
                r.tokens_per_stream,
                r.aggregate_tps,
                r.aggregate_sd,
                r.per_stream_tps,
                ratio(r.speedup),
                ratio(r.per_stream_ratio)
            ));
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
        // Parallel decode rows: tokens are all streams' together, t/s the
        // aggregate.
        for r in &self.parallel {
            s.push_str(&format!(
                "{},{},{},{},{},{},{},{:.4},{:.4},{:.4},{},{},,{}\n",
                self.model,
                self.size_bytes,
                self.params,
                self.backend,
                self.threads,
                r.test(),
                r.streams * r.tokens_per_stream,
                r.aggregate_tps,
                r.aggregate_sd,
                self.load_s,
                self.peak_rss_bytes,
                self.weight_bytes_per_token,
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

/// Resets the peak resident set size to the current one (`clear_refs` 5,
/// Linux 4.0 and later), so that a buffer freed before the measured work
/// (a bandwidth probe's) does not count in [`peak_rss_bytes`]; false where
/// that is not possible.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
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
            parallel: {
                let mut rows = vec![
                    ParallelResult::from_times(1, 8, 16, &[2.0]),
                    ParallelResult::from_times(4, 8, 16, &[4.0]),
                ];
                ParallelResult::relate(&mut rows);
                rows
            },
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
            mapped: Some(MappedShare {
                resident_bytes: 4 << 30,
                huge_page_bytes: 3 << 30,
            }),
        };
        let table = r.table();
        assert!(
            table.contains("mapped weights:          4.00 GiB resident, 75% of it on 2 MiB pages"),
            "{table}"
        );
        assert!(
            table.contains("prefill compute:         6.0 GFLOP/s (2 x 3.0 M multiply-adds per prompt token in the layers' matrices); 10% of the 60.0 GFLOP/s FMA peak"),
            "{table}"
        );
        assert!(
            table.contains("| tiny | 1.00 GiB | 2.00 M | CPU (avx2) | 2 | tg4 | 3.00 ± 1.41 |"),
            "{table}"
        );
        // 1 stream: 4 t/s; 4 streams: 32 tokens in 4 s, 8 t/s together,
        // 2 t/s each.
        assert!(
            table.contains("| 4 | 16 | 8 | 8.00 ± 0.00 | 2.00 | 2.00x | 0.50x |"),
            "{table}"
        );
        assert!(table.contains("| tg8 x4 | 8.00 ± 0.00 |"), "{table}");
        assert_eq!(r.csv().lines().count(), 4);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["parallel"][1]["per_stream_tps"], 2.0);
        assert_eq!(json["mapped"]["huge_page_bytes"], 3u64 << 30);
        assert!(peak_rss_bytes() > 0);
    }
}
