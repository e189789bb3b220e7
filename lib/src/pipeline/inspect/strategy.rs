//! The decision: a pure function of the probe record and the model's sizes.
//! Every choice comes with a one-line reason a person can check.

use super::probe::Probe;
use super::sizes::ModelSizes;
use super::{GpuPlacement, Reasons, Strategy, STRATEGY_FORMAT};
use crate::cli::human_bytes;
use crate::kernels::Isa;

/// Memory the engine needs besides the weights (KV cache and DeltaNet
/// state at a few thousand tokens, activations, the tokenizer).
pub const RUNTIME_OVERHEAD: u64 = 2 << 30;
/// Read rate assumed for paging weights from disk when they do not fit
/// (a typical NVMe SSD); only used for the estimate in that case.
pub const ASSUMED_DISK_GBS: f64 = 2.0;

/// Settings a person forces, which win over the probe.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--threads` / `[inspect] threads`.
    pub threads: Option<usize>,
}

fn gb(b: u64) -> String {
    human_bytes(b)
}

/// Chooses threads, kernel, memory policy, GPU placement and the expected
/// decode speed, one phase each; every phase returns its choice with the
/// reason, and may add warnings.
pub fn decide(p: &Probe, m: &ModelSizes, o: &Overrides) -> Strategy {
    let mut warnings = Vec::new();
    let (threads, threads_reason) = choose_threads(p, o);
    let (kernel, kernel_reason) = choose_kernel(p, &mut warnings);
    let memory = choose_memory(p, m, &mut warnings);
    let gpu = choose_gpu(p, m);
    let bw = p.bandwidth.map(|b| b.all_threads_gbs);
    let (expected, speed_reason) = expected_speed(bw, m, memory.usable, memory.fits);
    if gpu.placement != GpuPlacement::CpuOnly {
        warnings.push(
            "GPU placement is advice for a GPU-capable runtime: rh-serve itself runs on the CPU"
                .into(),
        );
    }

    Strategy {
        format: STRATEGY_FORMAT,
        threads,
        kernel,
        mmap: true,
        populate: memory.populate,
        mlock: memory.mlock,
        fits_in_ram: memory.fits,
        gpu: gpu.placement,
        gpu_index: gpu.index,
        expected_tokens_per_s: expected,
        bandwidth_gbs: bw,
        bytes_per_token: m.per_token_bytes,
        model_bytes: m.total_bytes,
        usable_memory: memory.usable,
        sizes_source: m.source,
        warnings,
        reasons: Reasons {
            threads: threads_reason,
            kernel: kernel_reason,
            memory: memory.reason,
            gpu: gpu.reason,
            speed: speed_reason,
        },
        paging: None,
    }
}

/// Threads: forced, else the physical cores this process may use.
fn choose_threads(p: &Probe, o: &Overrides) -> (usize, String) {
    let cores = p.physical_cores.min(p.usable_cpus).max(1);
    match o.threads {
        Some(t) => (
            t.max(1),
            format!("{} forced by --threads / [inspect] threads (the machine has {} physical cores)", t.max(1), p.physical_cores),
        ),
        None if p.usable_cpus < p.physical_cores => (
            cores,
            format!(
                "{cores}: this process may use only {} of {} CPUs (affinity or cgroup quota)",
                p.usable_cpus, p.logical_cpus
            ),
        ),
        None => (
            cores,
            format!(
                "{cores} = physical cores ({} logical): decode is memory-bound and hyperthreads share a core's load ports",
                p.logical_cpus
            ),
        ),
    }
}

/// Kernel: the highest [`Isa`] the probed features allow (the kernels'
/// own rule, [`Isa::highest`]).
fn choose_kernel(p: &Probe, warnings: &mut Vec<String>) -> (Isa, String) {
    let f = &p.features;
    let isa = Isa::highest(|name| f.has(name));
    let reason = match isa {
        Isa::Avx512Vnni => {
            "avx512-vnni: the CPU has AVX-512 F/BW and VNNI: quantized decode multiplies \
             int16 activations with vpdpwssd, prefill splits them into bytes for vpdpbusd, \
             the rest runs AVX2"
                .to_string()
        }
        Isa::AvxVnni => "avx-vnni: the CPU has AVX2, FMA, F16C and AVX-VNNI: prefill's integer \
                         tiles multiply-add in vpdpwssd, the rest runs AVX2"
            .to_string(),
        Isa::Avx2 => {
            let extra = if f.avx512f {
                "; AVX-512 is present without VNNI/BW, which the integer kernels need"
            } else {
                ""
            };
            format!("avx2: the CPU has AVX2, FMA and F16C{extra}")
        }
        Isa::Scalar => {
            let why = if p.arch == "x86_64" {
                "no AVX2+FMA+F16C on this x86 CPU"
            } else if f.neon {
                "the CPU has NEON, but NEON kernels are not written yet"
            } else {
                "no SIMD kernel for this CPU"
            };
            warnings.push(format!(
                "{why}: the portable scalar kernel is several times slower"
            ));
            format!("scalar: {why}")
        }
    };
    (isa, reason)
}

/// The memory policy and what it rests on.
struct MemoryChoice {
    usable: u64,
    fits: bool,
    populate: bool,
    mlock: bool,
    reason: String,
}

/// Memory: populate when the model fits, lock when it fits comfortably and
/// `RLIMIT_MEMLOCK` allows.
fn choose_memory(p: &Probe, m: &ModelSizes, warnings: &mut Vec<String>) -> MemoryChoice {
    let usable = p.usable_memory();
    let need = m.total_bytes + RUNTIME_OVERHEAD;
    let fits = usable >= need;
    let comfortable = usable as f64 >= need as f64 * 1.2 + (2u64 << 30) as f64;
    let memlock_ok = p.memlock_limit.is_none_or(|l| l >= m.total_bytes);
    let mlock = fits && comfortable && memlock_ok;
    let reason = if !fits {
        let w = format!(
            "the model ({}) plus runtime ({}) does not fit in the {} of RAM this process can use: \
             mmap pages weights in from disk on demand, which is far slower",
            gb(m.total_bytes),
            gb(RUNTIME_OVERHEAD),
            gb(usable)
        );
        warnings.push(w.clone());
        format!("mmap without populate or mlock: {w}")
    } else if mlock {
        format!(
            "mmap + populate + mlock: {} usable RAM comfortably holds the {} model, so pin it and never page",
            gb(usable),
            gb(m.total_bytes)
        )
    } else if !comfortable {
        format!(
            "mmap + populate, no mlock: the {} model fits in {} usable RAM but with little headroom; locking it could starve the system",
            gb(m.total_bytes),
            gb(usable)
        )
    } else {
        format!(
            "mmap + populate, no mlock: RLIMIT_MEMLOCK is {}, below the model's {} (raise it with `ulimit -l unlimited` to lock)",
            gb(p.memlock_limit.unwrap_or(0)),
            gb(m.total_bytes)
        )
    };
    MemoryChoice {
        usable,
        fits,
        populate: fits,
        mlock,
        reason,
    }
}

/// The GPU suggestion.
struct GpuChoice {
    placement: GpuPlacement,
    index: Option<usize>,
    reason: String,
}

/// GPU: the one with the most free memory, holding everything, the dense
/// weights, or nothing.
fn choose_gpu(p: &Probe, m: &ModelSizes) -> GpuChoice {
    let Some(g) = p.gpus.iter().max_by_key(|g| g.memory_free) else {
        return GpuChoice {
            placement: GpuPlacement::CpuOnly,
            index: None,
            reason: "cpu only: no NVIDIA GPU found".to_string(),
        };
    };
    let all_need = m.total_bytes + RUNTIME_OVERHEAD;
    let dense_need = m.dense_bytes() + RUNTIME_OVERHEAD;
    if g.memory_free >= all_need {
        GpuChoice {
            placement: GpuPlacement::AllOnGpu,
            index: Some(g.index),
            reason: format!(
                "all on GPU {} ({}): {} free holds the whole model ({}) and runtime",
                g.index,
                g.name,
                gb(g.memory_free),
                gb(m.total_bytes)
            ),
        }
    } else if g.memory_free >= dense_need {
        GpuChoice {
            placement: GpuPlacement::AttentionOnGpu,
            index: Some(g.index),
            reason: format!(
                "attention on GPU {} ({}), experts on CPU: {} free holds the {} of dense weights but not the {} of experts",
                g.index,
                g.name,
                gb(g.memory_free),
                gb(m.dense_bytes()),
                gb(m.expert_bytes)
            ),
        }
    } else {
        GpuChoice {
            placement: GpuPlacement::CpuOnly,
            index: None,
            reason: format!(
                "cpu only: GPU {} ({}) has {} free, less than the {} the dense weights and runtime need",
                g.index,
                g.name,
                gb(g.memory_free),
                gb(dense_need)
            ),
        }
    }
}

/// Records the paging advice in the strategy. When the model does not fit
/// and the advice predicts decode under its budget, that prediction is the
/// expected speed: rh-serve and rh-bench run under the budget by default,
/// so plain mmap's figure would describe a run that does not happen.
pub(super) fn add_paging(s: &mut Strategy, advice: super::storage::PagingAdvice) {
    if let (false, Some(e), Some(b)) = (s.fits_in_ram, &advice.estimate, advice.memory_budget) {
        s.expected_tokens_per_s = Some(e.tokens_per_s);
        s.reasons.speed = format!(
            "about {:.1} tokens/s under the proposed --memory-budget {} ({:.1} if routing is uniform): \
             the weights every token reads stay resident, {} of {} routed experts fit beside them, \
             and each token reads its missed experts from storage while it computes (see storage)",
            e.tokens_per_s,
            human_bytes(b),
            e.tokens_per_s_uniform,
            e.cached_experts,
            e.experts
        );
    }
    s.paging = Some(advice);
}

/// Expected decode speed: the measured bandwidth over the bytes a token
/// reads, with the share left on disk read at [`ASSUMED_DISK_GBS`].
fn expected_speed(
    bw: Option<f64>,
    m: &ModelSizes,
    usable: u64,
    fits: bool,
) -> (Option<f64>, String) {
    let per_token = m.per_token_bytes.max(1) as f64;
    match bw {
        None => (
            None,
            "unknown: the bandwidth probe was skipped (probe_seconds = 0)".to_string(),
        ),
        Some(bw) if fits => {
            let tps = bw * 1e9 / per_token;
            (
                Some(tps),
                format!(
                    "{tps:.1} tokens/s upper bound = {bw:.1} GB/s measured read bandwidth / {:.2} GB read per token; \
                     engines reach 50-85% of it",
                    per_token / 1e9
                ),
            )
        }
        Some(bw) => {
            let resident = usable.saturating_sub(RUNTIME_OVERHEAD) as f64;
            let missing = (1.0 - resident / m.total_bytes.max(1) as f64).clamp(0.0, 1.0);
            let secs = per_token / (bw * 1e9) + missing * per_token / (ASSUMED_DISK_GBS * 1e9);
            let tps = 1.0 / secs;
            (
                Some(tps),
                format!(
                    "about {tps:.2} tokens/s: {:.0}% of the weights stay on disk, and each token reads that share of its {:.2} GB \
                     at an assumed {ASSUMED_DISK_GBS} GB/s (NVMe) besides {bw:.1} GB/s from RAM",
                    missing * 100.0,
                    per_token / 1e9
                ),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::probe::{CpuFeatures, Gpu, HugePages};
    use super::*;
    use crate::membw::Bandwidth;

    const GIB: u64 = 1 << 30;

    fn machine(ram_gib: u64, cores: usize, gpu_gib: Option<u64>, avx2: bool, bw: f64) -> Probe {
        Probe {
            arch: "x86_64".into(),
            cpu_model: "test".into(),
            physical_cores: cores,
            logical_cpus: cores * 2,
            usable_cpus: cores * 2,
            features: CpuFeatures {
                avx2,
                fma: avx2,
                f16c: avx2,
                ..Default::default()
            },
            caches: vec![],
            mem_total: ram_gib * GIB,
            mem_available: ram_gib * GIB * 9 / 10,
            swap_total: 0,
            swap_free: 0,
            cgroup_limit: None,
            cgroup_usage: None,
            huge_pages: HugePages::default(),
            memlock_limit: None,
            disk: None,
            gpus: gpu_gib
                .map(|g| {
                    vec![Gpu {
                        index: 0,
                        name: "GPU".into(),
                        memory_total: g * GIB,
                        memory_free: g * GIB - GIB / 2,
                    }]
                })
                .unwrap_or_default(),
            bandwidth: Some(Bandwidth {
                single_thread_gbs: bw / 2.0,
                all_threads_gbs: bw,
                threads: cores * 2,
                buffer_bytes: 1 << 29,
            }),
            warnings: vec![],
        }
    }

    fn decide_preset(p: &Probe) -> Strategy {
        decide(p, &ModelSizes::preset(), &Overrides::default())
    }

    #[test]
    fn laptop_16gb_pages_from_disk() {
        let s = decide_preset(&machine(16, 4, None, true, 40.0));
        assert!(!s.fits_in_ram && !s.mlock && !s.populate && s.mmap);
        assert_eq!(s.gpu, GpuPlacement::CpuOnly);
        assert_eq!(s.threads, 4);
        let ram_bound = 40e9 / 3.24e9;
        let tps = s.expected_tokens_per_s.unwrap();
        assert!(tps < ram_bound / 2.0, "paging must cost: {tps}");
        assert!(s.warnings.iter().any(|w| w.contains("does not fit")));
    }

    #[test]
    fn a_budget_estimate_is_the_expected_speed_when_the_model_does_not_fit() {
        use super::super::storage::{PagingAdvice, PagingEstimate};
        let advice = || PagingAdvice {
            memory_budget: Some(13 * GIB),
            estimate: Some(PagingEstimate {
                cached_experts: 4000,
                experts: 24576,
                tokens_per_s: 3.5,
                tokens_per_s_uniform: 2.5,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut s = decide_preset(&machine(16, 4, None, true, 40.0));
        add_paging(&mut s, advice());
        assert_eq!(s.expected_tokens_per_s, Some(3.5));
        assert!(
            s.reasons.speed.contains("--memory-budget 13.00 GiB")
                && s.reasons.speed.contains("2.5 if routing is uniform"),
            "{}",
            s.reasons.speed
        );
        assert!(s.paging.is_some());
        // A model that fits keeps the bandwidth bound.
        let mut fits = decide_preset(&machine(64, 8, None, true, 70.0));
        let before = fits.expected_tokens_per_s;
        add_paging(&mut fits, advice());
        assert_eq!(fits.expected_tokens_per_s, before);
        assert!(
            fits.reasons.speed.contains("upper bound"),
            "{}",
            fits.reasons.speed
        );
    }

    #[test]
    fn avx512_vnni_cpu_gets_the_integer_kernels() {
        let mut m = machine(64, 8, None, true, 70.0);
        m.features.avx512f = true;
        m.features.avx512vnni = true;
        assert_eq!(decide_preset(&m).kernel, Isa::Avx2, "no AVX-512 BW");
        m.features.avx512bw = true;
        let s = decide_preset(&m);
        assert_eq!(s.kernel, Isa::Avx512Vnni);
        assert!(
            s.reasons.kernel.starts_with("avx512-vnni"),
            "{}",
            s.reasons.kernel
        );
    }

    #[test]
    fn avx_vnni_cpu_without_avx512_gets_its_level() {
        // Alder Lake and later: AVX-VNNI, no AVX-512.
        let mut m = machine(64, 8, None, true, 70.0);
        m.features.avx_vnni = true;
        let s = decide_preset(&m);
        assert_eq!(s.kernel, Isa::AvxVnni);
        assert!(
            s.reasons.kernel.starts_with("avx-vnni"),
            "{}",
            s.reasons.kernel
        );
        // With AVX-512 F/BW/VNNI as well (Sapphire Rapids), the AVX-512 level.
        m.features.avx512f = true;
        m.features.avx512bw = true;
        m.features.avx512vnni = true;
        m.features.avx512vl = true;
        assert_eq!(decide_preset(&m).kernel, Isa::Avx512Vnni);
    }

    #[test]
    fn desktop_64gb_with_16gb_gpu_puts_attention_on_gpu() {
        let s = decide_preset(&machine(64, 8, Some(16), true, 70.0));
        assert!(s.fits_in_ram && s.populate);
        assert_eq!(s.gpu, GpuPlacement::AttentionOnGpu);
        assert_eq!(s.gpu_index, Some(0));
        assert_eq!(s.kernel, Isa::Avx2);
        let tps = s.expected_tokens_per_s.unwrap();
        assert!((tps - 70e9 / 3.24e9).abs() < 1e-6, "{tps}");
    }

    #[test]
    fn desktop_128gb_with_24gb_gpu_locks_and_offloads_attention() {
        let s = decide_preset(&machine(128, 16, Some(24), true, 80.0));
        assert!(s.fits_in_ram && s.mlock);
        assert_eq!(s.gpu, GpuPlacement::AttentionOnGpu);
        assert_eq!(s.threads, 16);
    }

    #[test]
    fn server_512gb_cpu_only_all_cores() {
        let s = decide_preset(&machine(512, 64, None, true, 300.0));
        assert!(s.fits_in_ram && s.mlock);
        assert_eq!(s.threads, 64);
        assert_eq!(s.gpu, GpuPlacement::CpuOnly);
        assert!(s.reasons.gpu.contains("no NVIDIA GPU"));
    }

    #[test]
    fn big_gpu_takes_everything() {
        let s = decide_preset(&machine(256, 32, Some(80), true, 200.0));
        assert_eq!(s.gpu, GpuPlacement::AllOnGpu);
    }

    #[test]
    fn no_avx2_gets_scalar_with_a_warning() {
        let s = decide_preset(&machine(64, 4, None, false, 30.0));
        assert_eq!(s.kernel, Isa::Scalar);
        assert!(s.reasons.kernel.contains("no AVX2"));
        assert!(!s.warnings.is_empty());
    }

    #[test]
    fn memlock_limit_and_overrides_are_respected() {
        let mut p = machine(128, 16, None, true, 80.0);
        p.memlock_limit = Some(64 << 10);
        let s = decide(&p, &ModelSizes::preset(), &Overrides { threads: Some(3) });
        assert!(!s.mlock && s.fits_in_ram);
        assert!(s.reasons.memory.contains("RLIMIT_MEMLOCK"));
        assert_eq!(s.threads, 3);
        assert!(s.reasons.threads.contains("forced"));
    }

    #[test]
    fn cgroup_limit_caps_memory() {
        let mut p = machine(512, 64, None, true, 300.0);
        p.cgroup_limit = Some(32 * GIB);
        let s = decide_preset(&p);
        assert!(!s.fits_in_ram);
        assert_eq!(s.usable_memory, 32 * GIB);
    }

    #[test]
    fn skipped_bandwidth_gives_no_speed() {
        let mut p = machine(64, 8, None, true, 1.0);
        p.bandwidth = None;
        let s = decide_preset(&p);
        assert!(s.expected_tokens_per_s.is_none());
        assert!(s.reasons.speed.contains("skipped"));
    }
}
