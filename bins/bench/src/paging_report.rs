//! What the expert cache did over a decode run, for `rh-bench` and
//! serve's stats: hit rate, bytes read from storage per token, and decode
//! time against the storage-bound limit (bytes read per token / the disk's
//! random-read speed, measured on the cache's files).

use std::path::Path;

use serde::Serialize;

use roundhouse::inspect::storage::{self, StorageSpeed};
use roundhouse::model::experts::{BudgetPlan, ExpertPager, PagerStats};

/// What the expert cache did during the tg test.
#[derive(Serialize)]
pub struct PagingReport {
    /// How the budget was split.
    pub plan: BudgetPlan,
    /// Whether reads bypassed the page cache.
    pub direct_reads: bool,
    /// Whether the buffers lie in one mapping advised onto 2 MiB pages.
    pub huge_buffers: bool,
    /// Tokens decoded while counting.
    pub tokens: u64,
    /// The counters over those tokens.
    pub stats: PagerStats,
    /// Resident when asked for.
    pub hit_rate: f64,
    /// Bytes read from storage per decoded token (read-ahead included).
    pub bytes_read_per_token: f64,
    /// Bytes of the experts that were not resident when a token asked for
    /// them (read on demand, or still being read ahead), per token.
    pub bytes_missed_per_token: f64,
    /// Bytes of the experts a token used that had to come from storage
    /// during the run: its misses plus the predicted reads it used (those
    /// count as hits, but the disk still had to read them), per token.
    pub bytes_needed_per_token: f64,
    /// Mean decode seconds per token.
    pub decode_s_per_token: f64,
    /// The disk's speeds, measured after the test on the cache's files.
    pub storage: Option<StorageSpeed>,
    /// `bytes_needed_per_token / random_gbs`: decode can be no faster.
    pub storage_bound_s_per_token: Option<f64>,
    /// `bytes_missed_per_token / random_gbs` (the bound before prediction
    /// was counted; a prediction that works shrinks it).
    pub miss_bound_s_per_token: Option<f64>,
}

impl PagingReport {
    /// Builds the report from the counters around the tg test.
    pub fn new(
        pager: &ExpertPager,
        dir: &Path,
        stats: PagerStats,
        tokens: u64,
        decode_s_per_token: f64,
    ) -> PagingReport {
        let per_token = stats.bytes_read as f64 / tokens.max(1) as f64;
        let plan = pager.plan();
        let expert = plan.expert_bytes as f64 / plan.experts.max(1) as f64;
        let missed = (stats.misses + stats.inflight) as f64 * expert / tokens.max(1) as f64;
        let needed = missed + stats.ahead_used as f64 * expert / tokens.max(1) as f64;
        // Expert-size reads at the queue depth the pager uses (its I/O
        // threads), so the bound is what its reads could reach.
        let storage = storage::measure(
            dir,
            pager.plan().slot_bytes as usize,
            pager.io_threads(),
            3.0,
        );
        let speed = storage
            .as_ref()
            .filter(|s| s.random_gbs > 0.0)
            .map(|s| s.random_gbs * 1e9);
        PagingReport {
            plan: pager.plan().clone(),
            direct_reads: pager.direct_reads(),
            huge_buffers: pager.huge_buffers(),
            tokens,
            stats,
            hit_rate: stats.hit_rate(),
            bytes_read_per_token: per_token,
            bytes_missed_per_token: missed,
            bytes_needed_per_token: needed,
            decode_s_per_token,
            storage,
            storage_bound_s_per_token: speed.map(|v| needed / v),
            miss_bound_s_per_token: speed.map(|v| missed / v),
        }
    }

    /// Lines appended to the table.
    pub fn text(&self) -> String {
        let h = crate::cli::human_bytes;
        let p = &self.plan;
        let s = &self.stats;
        let held = if p.reserved_bytes > 0 {
            format!(" + {} sequence states", h(p.reserved_bytes))
        } else {
            String::new()
        };
        let mut out = format!(
            "memory budget:           {} = {} resident weights + {} working memory{held} + {} experts x {} (of {}; {}, {})\n",
            h(p.budget),
            h(p.resident_bytes),
            h(p.overhead_bytes),
            p.slots,
            h(p.slot_bytes),
            p.experts,
            if self.direct_reads { "O_DIRECT reads" } else { "buffered reads, pages dropped" },
            if self.huge_buffers { "buffers on 2 MiB pages" } else { "buffers on 4 KiB pages" }
        );
        out.push_str(&format!(
            "expert cache (tg):       {:.1}% hits, {} missed and {} read per token ({} reads), waited {:.1} ms per token\n",
            100.0 * self.hit_rate,
            h(self.bytes_missed_per_token as u64),
            h(self.bytes_read_per_token as u64),
            s.reads,
            1e3 * s.stall_s / self.tokens.max(1) as f64
        ));
        let pct = |a: u64, b: u64| 100.0 * a as f64 / b.max(1) as f64;
        if s.predicted > 0 {
            out.push_str(&format!(
                "prediction:              next layer {:.0}% right, two layers ahead {:.0}% right ({} guesses); {} read ahead: {} used, {} cancelled before reading, {} evicted unused\n",
                pct(s.predicted_right, s.predicted),
                pct(s.predicted2_right, s.predicted2),
                s.predicted2,
                s.ahead_issued,
                s.ahead_used,
                s.ahead_cancelled,
                s.ahead_wasted
            ));
        }
        if s.routes > 0 {
            let n = s.demand_reads.max(1) as f64;
            out.push_str(&format!(
                "expert waits (tg):       {} of {} routings waited, {:.1} ms from routing to all experts ready; demand reads queued {:.2} ms behind {:.1} read-ahead reads in flight (mean), {} guesses moved to the demand queue\n",
                s.routes_waited,
                s.routes,
                1e3 * s.route_wait_s / s.routes_waited.max(1) as f64,
                1e3 * s.demand_queue_s / n,
                s.ahead_running_at_demand as f64 / n,
                s.ahead_promoted
            ));
        }
        if s.io_busy_s > 0.0 {
            let decode_s = self.decode_s_per_token * self.tokens as f64;
            // The speed the pager's own reads got, in this run: a fair
            // random-read speed when the after-test probe swings.
            let speed = s.bytes_read as f64 / s.io_busy_s;
            let bound = self.bytes_needed_per_token / speed;
            out.push_str(&format!(
                "storage while decoding:  a read in flight {:.0}% of the decode time ({:.1} at once on average), {:.2} GB/s while one was; the needed bytes at that speed take {:.1} ms per token ({:.2}x)\n",
                100.0 * (s.io_busy_s / decode_s.max(1e-9)).min(1.0),
                s.read_s / s.io_busy_s,
                speed / 1e9,
                1e3 * bound,
                self.decode_s_per_token / bound.max(1e-12)
            ));
        }
        if let (Some(st), Some(b), Some(m)) = (
            &self.storage,
            self.storage_bound_s_per_token,
            self.miss_bound_s_per_token,
        ) {
            out.push_str(&format!(
                "storage:                 {:.2} GB/s sequential, {:.2} GB/s random {} reads ({} in flight), {:.2} GB/s one at a time{}\n",
                st.sequential_gbs,
                st.random_gbs,
                h(st.random_block),
                st.queue_depth,
                st.random_qd1_gbs,
                if st.direct { "" } else { " (buffered: may include the page cache)" }
            ));
            let d = self.decode_s_per_token;
            out.push_str(&format!(
                "decode vs storage bound: {:.1} ms per token vs {:.1} ms to read the {} of experts it needed from storage ({:.2}x); vs {:.1} ms to read its misses alone ({:.2}x)\n",
                1e3 * d,
                1e3 * b,
                h(self.bytes_needed_per_token as u64),
                d / b.max(1e-12),
                1e3 * m,
                d / m.max(1e-12)
            ));
        }
        out
    }
}
