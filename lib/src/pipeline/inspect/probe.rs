//! What the machine has: cores, SIMD features, caches, memory, huge pages,
//! disk, GPUs and measured memory bandwidth.
//!
//! Every reader tolerates a missing or unreadable source (a container
//! without `/sys`, no `nvidia-smi`): the field falls back to a safe value
//! and a warning says what could not be read. The parsers are pure
//! functions over text so they are tested on canned inputs.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::sys;
pub use super::sys::Disk;
use crate::kernels::isa::cpu_has;
use crate::membw::{self, Bandwidth};

/// CPU SIMD features that matter to the kernels.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatures {
    /// AVX2 (x86).
    pub avx2: bool,
    /// FMA3 (x86).
    pub fma: bool,
    /// F16C half-precision conversions (x86).
    pub f16c: bool,
    /// AVX-512 foundation (x86).
    pub avx512f: bool,
    /// AVX-512 VNNI int8/int16 dot products (x86).
    pub avx512vnni: bool,
    /// AVX-512 byte and word instructions (x86).
    #[serde(default)]
    pub avx512bw: bool,
    /// AVX-512 on 128- and 256-bit vectors (x86).
    #[serde(default)]
    pub avx512vl: bool,
    /// AVX-VNNI (VEX-encoded VNNI, x86).
    pub avx_vnni: bool,
    /// AMX tiles (x86, from `/proc/cpuinfo` flags).
    pub amx: bool,
    /// NEON / ASIMD (aarch64).
    pub neon: bool,
    /// SDOT/UDOT dot products (aarch64).
    pub dotprod: bool,
}

impl CpuFeatures {
    /// Features of the running CPU.
    pub fn detect(cpuinfo_flags: &BTreeSet<String>) -> CpuFeatures {
        #[allow(unused_mut)]
        let mut f = CpuFeatures {
            amx: cpuinfo_flags.contains("amx_tile"),
            avx_vnni: cpuinfo_flags.contains("avx_vnni"),
            ..Default::default()
        };
        // The kernels' features come from the kernels' own detection, so
        // inspect and the kernels cannot disagree about this CPU.
        f.avx2 = cpu_has("avx2");
        f.fma = cpu_has("fma");
        f.f16c = cpu_has("f16c");
        f.avx512f = cpu_has("avx512f");
        f.avx512vnni = cpu_has("avx512vnni");
        f.avx512bw = cpu_has("avx512bw");
        f.avx512vl = cpu_has("avx512vl");
        f.avx_vnni |= cpu_has("avxvnni");
        #[cfg(target_arch = "aarch64")]
        {
            f.neon = std::arch::is_aarch64_feature_detected!("neon");
            f.dotprod = std::arch::is_aarch64_feature_detected!("dotprod");
        }
        f
    }

    /// Whether the feature spelled `name` (as in [`KERNEL_FEATURES`](crate::kernels::isa::KERNEL_FEATURES)) is
    /// present; what [`Isa::highest`](crate::kernels::Isa::highest) asks.
    pub fn has(&self, name: &str) -> bool {
        match name {
            "avx2" => self.avx2,
            "fma" => self.fma,
            "f16c" => self.f16c,
            "avx512f" => self.avx512f,
            "avx512bw" => self.avx512bw,
            "avx512vnni" => self.avx512vnni,
            "avx512vl" => self.avx512vl,
            "avxvnni" => self.avx_vnni,
            _ => false,
        }
    }

    /// The names of the features present, for reports.
    pub fn names(&self) -> Vec<&'static str> {
        let all = [
            (self.avx2, "avx2"),
            (self.fma, "fma"),
            (self.f16c, "f16c"),
            (self.avx512f, "avx512f"),
            (self.avx512vnni, "avx512vnni"),
            (self.avx512bw, "avx512bw"),
            (self.avx512vl, "avx512vl"),
            (self.avx_vnni, "avx-vnni"),
            (self.amx, "amx"),
            (self.neon, "neon"),
            (self.dotprod, "dotprod"),
        ];
        all.iter().filter(|(on, _)| *on).map(|(_, n)| *n).collect()
    }
}

/// One CPU cache level.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cache {
    /// 1, 2, 3...
    pub level: u32,
    /// `Data`, `Instruction` or `Unified`.
    pub kind: String,
    /// Size in bytes of one instance.
    pub size_bytes: u64,
}

/// NVIDIA GPU as `nvidia-smi` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    /// Index in `nvidia-smi` order.
    pub index: usize,
    /// Product name.
    pub name: String,
    /// Total memory in bytes.
    pub memory_total: u64,
    /// Free memory in bytes.
    pub memory_free: u64,
}

/// Huge page settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HugePages {
    /// Reserved explicit huge pages.
    pub total: u64,
    /// Of those, free.
    pub free: u64,
    /// Size of one huge page in bytes.
    pub page_bytes: u64,
    /// Transparent huge pages mode (`always`, `madvise`, `never`), if known.
    pub thp: Option<String>,
}

/// Everything probed about the machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    /// `x86_64`, `aarch64`, ...
    pub arch: String,
    /// CPU model name.
    pub cpu_model: String,
    /// Physical cores (all sockets).
    pub physical_cores: usize,
    /// Logical CPUs (hardware threads) online.
    pub logical_cpus: usize,
    /// CPUs this process may run on (affinity and cgroup quota).
    pub usable_cpus: usize,
    /// SIMD features.
    pub features: CpuFeatures,
    /// Cache levels of CPU 0.
    pub caches: Vec<Cache>,
    /// RAM installed, bytes.
    pub mem_total: u64,
    /// RAM available without swapping, bytes (`MemAvailable`).
    pub mem_available: u64,
    /// Swap total, bytes.
    pub swap_total: u64,
    /// Swap free, bytes.
    pub swap_free: u64,
    /// cgroup memory limit for this process, when one is set.
    pub cgroup_limit: Option<u64>,
    /// cgroup memory already charged, when known.
    pub cgroup_usage: Option<u64>,
    /// Huge pages.
    pub huge_pages: HugePages,
    /// `RLIMIT_MEMLOCK` soft limit in bytes (`None` = unlimited).
    pub memlock_limit: Option<u64>,
    /// Free disk in the work dir.
    pub disk: Option<Disk>,
    /// NVIDIA GPUs.
    pub gpus: Vec<Gpu>,
    /// Measured memory read bandwidth (absent when the probe was skipped).
    pub bandwidth: Option<Bandwidth>,
    /// Sources that could not be read, one line each.
    pub warnings: Vec<String>,
}

impl Probe {
    /// RAM this process can use for the model: `MemAvailable`, capped by
    /// what the cgroup limit leaves.
    pub fn usable_memory(&self) -> u64 {
        match self.cgroup_limit {
            Some(limit) => {
                let left = limit.saturating_sub(self.cgroup_usage.unwrap_or(0));
                self.mem_available.min(left)
            }
            None => self.mem_available,
        }
    }

    /// Total RAM as the process sees it (installed, capped by the cgroup).
    pub fn memory_ceiling(&self) -> u64 {
        match self.cgroup_limit {
            Some(limit) => self.mem_total.min(limit),
            None => self.mem_total,
        }
    }

    /// The largest last-level cache, bytes (0 if unknown).
    pub fn last_level_cache(&self) -> u64 {
        self.caches
            .iter()
            .filter(|c| c.kind != "Instruction")
            .max_by_key(|c| (c.level, c.size_bytes))
            .map(|c| c.size_bytes)
            .unwrap_or(0)
    }
}

/// What the `/proc/cpuinfo` text says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuInfo {
    /// `model name` (x86) or a composed name (aarch64).
    pub model: String,
    /// `processor` entries.
    pub logical: usize,
    /// Distinct (physical id, core id) pairs; 0 when the file has no topology.
    pub physical: usize,
    /// `flags` (x86) or `Features` (aarch64) of the first CPU.
    pub flags: BTreeSet<String>,
}

/// Parses `/proc/cpuinfo`.
pub fn parse_cpuinfo(text: &str) -> CpuInfo {
    let mut info = CpuInfo::default();
    let mut cores = BTreeSet::new();
    let (mut phys, mut core): (Option<String>, Option<String>) = (None, None);
    let mut implementer = String::new();
    let mut part = String::new();
    let flush = |phys: &mut Option<String>,
                 core: &mut Option<String>,
                 cores: &mut BTreeSet<(String, String)>| {
        if let (Some(p), Some(c)) = (phys.take(), core.take()) {
            cores.insert((p, c));
        }
    };
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            if line.trim().is_empty() {
                flush(&mut phys, &mut core, &mut cores);
            }
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        match k {
            "processor" => info.logical += 1,
            "model name" | "Model Name" if info.model.is_empty() => info.model = v.to_string(),
            "physical id" => phys = Some(v.to_string()),
            "core id" => core = Some(v.to_string()),
            "flags" | "Features" if info.flags.is_empty() => {
                info.flags = v.split_whitespace().map(str::to_string).collect();
            }
            "CPU implementer" if implementer.is_empty() => implementer = v.to_string(),
            "CPU part" if part.is_empty() => part = v.to_string(),
            _ => {}
        }
    }
    flush(&mut phys, &mut core, &mut cores);
    info.physical = cores.len();
    if info.model.is_empty() && !implementer.is_empty() {
        info.model = format!("ARM implementer {implementer} part {part}");
    }
    info
}

/// Parses `/proc/meminfo` into (key, bytes) pairs (`kB` values scaled).
pub fn parse_meminfo(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let mut it = v.split_whitespace();
            let n: u64 = it.next()?.parse().ok()?;
            let scale = match it.next() {
                Some("kB") => 1024,
                _ => 1,
            };
            Some((k.trim().to_string(), n * scale))
        })
        .collect()
}

fn meminfo_get(m: &[(String, u64)], key: &str) -> Option<u64> {
    m.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
}

/// Parses a sysfs cache size such as `48K`, `2048K`, `32M`.
pub fn parse_size_suffix(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok().map(|n| n * mult)
}

/// Parses a cgroup v2 `memory.max` / v1 `memory.limit_in_bytes` value;
/// `max` and absurdly large v1 "no limit" values give `None`.
pub fn parse_cgroup_limit(s: &str) -> Option<u64> {
    let s = s.trim();
    if s == "max" {
        return None;
    }
    let v: u64 = s.parse().ok()?;
    // cgroup v1 reports "no limit" as a page-rounded i64::MAX.
    (v < (1u64 << 60)).then_some(v)
}

/// A line of `nvidia-smi` output that [`parse_nvidia_smi`] cannot read
/// (probing warns with it and reports no GPU).
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum SmiLineError {
    /// Not three comma-separated fields.
    #[error("line {line}: expected `name, total, free`, got `{text}`")]
    Fields {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// A memory field that is not a number.
    #[error("line {line}: `{text}` is not a memory size")]
    Size {
        /// 1-based line number.
        line: usize,
        /// The field.
        text: String,
    },
    /// A memory unit other than B, KiB, MiB, GiB.
    #[error("line {line}: unknown unit `{unit}`")]
    Unit {
        /// 1-based line number.
        line: usize,
        /// The unit.
        unit: String,
    },
}

/// Parses `nvidia-smi --query-gpu=name,memory.total,memory.free
/// --format=csv,noheader` output (`NAME, 81559 MiB, 80000 MiB` per line;
/// bare numbers, as `nounits` prints them, are MiB too).
pub fn parse_nvidia_smi(text: &str) -> Result<Vec<Gpu>, SmiLineError> {
    let mut gpus = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.rsplitn(3, ',').map(str::trim).collect();
        if fields.len() != 3 {
            return Err(SmiLineError::Fields {
                line: i + 1,
                text: line.to_string(),
            });
        }
        let mem = |s: &str| -> Result<u64, SmiLineError> {
            let mut it = s.split_whitespace();
            let n: f64 =
                it.next()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| SmiLineError::Size {
                        line: i + 1,
                        text: s.to_string(),
                    })?;
            let mult = match it.next().unwrap_or("MiB") {
                "KiB" => 1u64 << 10,
                "MiB" => 1 << 20,
                "GiB" => 1 << 30,
                "B" => 1,
                u => {
                    return Err(SmiLineError::Unit {
                        line: i + 1,
                        unit: u.to_string(),
                    })
                }
            };
            Ok((n * mult as f64) as u64)
        };
        gpus.push(Gpu {
            index: gpus.len(),
            name: fields[2].to_string(),
            memory_total: mem(fields[1])?,
            memory_free: mem(fields[0])?,
        });
    }
    Ok(gpus)
}

/// Runs `nvidia-smi` from `PATH`. No binary = no GPU (not a warning);
/// a binary that fails or prints garbage gives a warning.
pub fn probe_gpus(warnings: &mut Vec<String>) -> Vec<Gpu> {
    let out = Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,memory.total,memory.free",
            "--format=csv,noheader",
        ])
        .output();
    match out {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            warnings.push(format!("nvidia-smi: cannot run: {e}"));
            Vec::new()
        }
        Ok(o) if !o.status.success() => {
            let err = String::from_utf8_lossy(&o.stderr);
            let first = err.lines().next().unwrap_or("").trim().to_string();
            warnings.push(format!("nvidia-smi failed ({}): {first}", o.status));
            Vec::new()
        }
        Ok(o) => match parse_nvidia_smi(&String::from_utf8_lossy(&o.stdout)) {
            Ok(g) => g,
            Err(e) => {
                warnings.push(format!("nvidia-smi: unexpected output: {e}"));
                Vec::new()
            }
        },
    }
}

fn read(path: &str, warnings: &mut Vec<String>) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(t) => Some(t),
        Err(e) => {
            warnings.push(format!("{path}: cannot read: {e}"));
            None
        }
    }
}

fn read_quiet(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// Physical cores from sysfs thread-sibling lists (used when
/// `/proc/cpuinfo` has no topology, e.g. on ARM).
fn sysfs_physical_cores() -> Option<usize> {
    let mut groups = BTreeSet::new();
    let dir = std::fs::read_dir("/sys/devices/system/cpu").ok()?;
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("cpu") || !name[3..].chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let topo = e.path().join("topology");
        let s = read_quiet(topo.join("core_cpus_list"))
            .or_else(|| read_quiet(topo.join("thread_siblings_list")))?;
        let pkg = read_quiet(topo.join("physical_package_id")).unwrap_or_default();
        groups.insert((pkg.trim().to_string(), s.trim().to_string()));
    }
    (!groups.is_empty()).then_some(groups.len())
}

fn sysfs_caches() -> Vec<Cache> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache") else {
        return out;
    };
    let mut entries: Vec<_> = dir.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if !p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("index"))
        {
            continue;
        }
        let level = read_quiet(p.join("level")).and_then(|s| s.trim().parse().ok());
        let kind = read_quiet(p.join("type")).map(|s| s.trim().to_string());
        let size = read_quiet(p.join("size")).and_then(|s| parse_size_suffix(&s));
        if let (Some(level), Some(kind), Some(size_bytes)) = (level, kind, size) {
            out.push(Cache {
                level,
                kind,
                size_bytes,
            });
        }
    }
    out
}

fn cgroup_memory() -> (Option<u64>, Option<u64>) {
    // cgroup v2 at the unified mount; the process's own group path from
    // /proc/self/cgroup when it is not the root.
    let mut dirs = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Some(s) = read_quiet("/proc/self/cgroup") {
        for l in s.lines() {
            if let Some(rest) = l.strip_prefix("0::") {
                let rel = rest.trim().trim_start_matches('/');
                if !rel.is_empty() {
                    dirs.insert(0, Path::new("/sys/fs/cgroup").join(rel));
                }
            }
        }
    }
    for d in &dirs {
        if let Some(max) = read_quiet(d.join("memory.max")) {
            let usage = read_quiet(d.join("memory.current")).and_then(|s| s.trim().parse().ok());
            return (parse_cgroup_limit(&max), usage);
        }
    }
    // cgroup v1: the process's own memory group (`N:memory:/path` in
    // /proc/self/cgroup), else the root.
    let mut v1 = vec![PathBuf::from("/sys/fs/cgroup/memory")];
    if let Some(s) = read_quiet("/proc/self/cgroup") {
        for l in s.lines() {
            let mut f = l.splitn(3, ':');
            if let (Some(_), Some("memory"), Some(rel)) = (f.next(), f.next(), f.next()) {
                let rel = rel.trim().trim_start_matches('/');
                if !rel.is_empty() {
                    v1.insert(0, Path::new("/sys/fs/cgroup/memory").join(rel));
                }
            }
        }
    }
    for d in &v1 {
        if let Some(max) = read_quiet(d.join("memory.limit_in_bytes")) {
            let usage =
                read_quiet(d.join("memory.usage_in_bytes")).and_then(|s| s.trim().parse().ok());
            return (parse_cgroup_limit(&max), usage);
        }
    }
    (None, None)
}

/// Probes everything but the memory bandwidth (fast: file reads and one
/// `nvidia-smi` call).
pub fn probe_static(work_dir: &Path) -> Probe {
    let mut warnings = Vec::new();
    let cpu = read("/proc/cpuinfo", &mut warnings)
        .map(|t| parse_cpuinfo(&t))
        .unwrap_or_default();
    let usable_cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let logical_cpus = if cpu.logical > 0 {
        cpu.logical
    } else {
        usable_cpus
    };
    let physical_cores = if cpu.physical > 0 {
        cpu.physical
    } else if let Some(n) = sysfs_physical_cores() {
        n
    } else {
        warnings.push("core topology unknown: counting logical CPUs as cores".into());
        logical_cpus
    };
    let mem = read("/proc/meminfo", &mut warnings)
        .map(|t| parse_meminfo(&t))
        .unwrap_or_default();
    let mem_total = meminfo_get(&mem, "MemTotal").unwrap_or(0);
    let mem_available = meminfo_get(&mem, "MemAvailable")
        .or_else(|| meminfo_get(&mem, "MemFree"))
        .unwrap_or(0);
    if mem_total == 0 {
        warnings.push("RAM size unknown: assuming none is available".into());
    }
    let thp = read_quiet("/sys/kernel/mm/transparent_hugepage/enabled").and_then(|s| {
        let (_, rest) = s.split_once('[')?;
        rest.split_once(']').map(|(m, _)| m.to_string())
    });
    let huge_pages = HugePages {
        total: meminfo_get(&mem, "HugePages_Total").unwrap_or(0),
        free: meminfo_get(&mem, "HugePages_Free").unwrap_or(0),
        page_bytes: meminfo_get(&mem, "Hugepagesize").unwrap_or(0),
        thp,
    };
    let (cgroup_limit, cgroup_usage) = cgroup_memory();
    let gpus = probe_gpus(&mut warnings);
    let disk = sys::disk_free(work_dir);
    if disk.is_none() {
        warnings.push(format!(
            "{}: cannot read free disk space",
            work_dir.display()
        ));
    }
    Probe {
        arch: std::env::consts::ARCH.to_string(),
        cpu_model: if cpu.model.is_empty() {
            "unknown".into()
        } else {
            cpu.model.clone()
        },
        physical_cores,
        logical_cpus,
        usable_cpus,
        features: CpuFeatures::detect(&cpu.flags),
        caches: sysfs_caches(),
        mem_total,
        mem_available,
        swap_total: meminfo_get(&mem, "SwapTotal").unwrap_or(0),
        swap_free: meminfo_get(&mem, "SwapFree").unwrap_or(0),
        cgroup_limit,
        cgroup_usage,
        huge_pages,
        memlock_limit: sys::memlock_limit(),
        disk,
        gpus,
        bandwidth: None,
        warnings,
    }
}

/// The bandwidth probe's buffer: four times the last-level cache, at
/// least 512 MiB and at most 1 GiB (256 MiB for a probe shorter than half
/// a second), and never more than an eighth of the usable RAM.
pub fn bandwidth_buffer(p: &Probe, seconds: f64) -> usize {
    let ceiling: u64 = if seconds < 0.5 { 256 << 20 } else { 1 << 30 };
    let want = (512u64 << 20).max(p.last_level_cache() * 4).min(ceiling);
    let cap = (p.usable_memory() / 8).max(16 << 20);
    want.min(cap) as usize
}

/// Spells the bandwidth probe is split into, with [`PROBE_PAUSE`] between
/// them: a virtual machine's bandwidth moves with its host's load for
/// seconds at a time (here 37 GB/s in one spell, 63-71 in the next), and
/// the best spell is what the machine can stream.
const PROBE_SPELLS: usize = 3;

/// The pause between two spells of the bandwidth probe.
const PROBE_PAUSE: std::time::Duration = std::time::Duration::from_millis(300);

/// Measures memory read bandwidth for about `seconds` of reading
/// (skipped when 0), in [`PROBE_SPELLS`] spells, keeping the best.
pub fn probe_bandwidth(p: &mut Probe, seconds: f64) {
    if seconds <= 0.0 {
        return;
    }
    let probe = membw::Probe::new(bandwidth_buffer(p, seconds));
    let mut best = probe.run(seconds / PROBE_SPELLS as f64).bandwidth;
    for _ in 1..PROBE_SPELLS {
        std::thread::sleep(PROBE_PAUSE);
        best = membw::best_of(best, probe.run(seconds / PROBE_SPELLS as f64).bandwidth);
    }
    p.bandwidth = Some(best);
}

#[cfg(test)]
mod tests {
    use super::*;

    const X86: &str = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nphysical id\t: 0\n\
        core id\t\t: 0\nflags\t\t: fpu avx2 fma f16c avx_vnni amx_tile\n\n\
        processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Processor\nphysical id\t: 0\ncore id\t\t: 0\n\
        flags\t\t: fpu avx2\n\n\
        processor\t: 2\nphysical id\t: 0\ncore id\t\t: 1\n\n\
        processor\t: 3\nphysical id\t: 1\ncore id\t\t: 0\n\n";

    #[test]
    fn cpuinfo_counts_cores_and_threads() {
        let c = parse_cpuinfo(X86);
        assert_eq!(c.logical, 4);
        assert_eq!(c.physical, 3, "two siblings share (0,0)");
        assert_eq!(c.model, "Intel(R) Xeon(R) Processor");
        assert!(c.flags.contains("amx_tile") && c.flags.contains("avx_vnni"));
    }

    #[test]
    fn cpuinfo_arm_has_no_topology() {
        let t = "processor\t: 0\nFeatures\t: fp asimd asimddp\nCPU implementer\t: 0x41\n\
                 CPU part\t: 0xd0c\n\nprocessor\t: 1\nFeatures\t: fp asimd\n\n";
        let c = parse_cpuinfo(t);
        assert_eq!((c.logical, c.physical), (2, 0));
        assert!(c.model.contains("0x41"));
        assert!(c.flags.contains("asimddp"));
    }

    #[test]
    fn meminfo_scales_kb() {
        let m = parse_meminfo(
            "MemTotal:       24000000 kB\nMemAvailable:   1000 kB\nHugePages_Total:       4\n",
        );
        assert_eq!(meminfo_get(&m, "MemTotal"), Some(24_000_000 * 1024));
        assert_eq!(meminfo_get(&m, "MemAvailable"), Some(1_024_000));
        assert_eq!(meminfo_get(&m, "HugePages_Total"), Some(4));
    }

    #[test]
    fn sizes_and_cgroup_limits() {
        assert_eq!(parse_size_suffix("48K"), Some(48 << 10));
        assert_eq!(parse_size_suffix("266240K\n"), Some(266240 << 10));
        assert_eq!(parse_size_suffix("32M"), Some(32 << 20));
        assert_eq!(parse_size_suffix("x"), None);
        assert_eq!(parse_cgroup_limit("max\n"), None);
        assert_eq!(parse_cgroup_limit("9223372036854771712"), None);
        assert_eq!(parse_cgroup_limit("8589934592"), Some(8 << 30));
    }

    #[test]
    fn nvidia_smi_csv() {
        let g = parse_nvidia_smi(
            "NVIDIA H100 80GB HBM3, 81559 MiB, 81000 MiB\nNVIDIA GeForce RTX 4090, 24564, 1000\n",
        )
        .unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].name, "NVIDIA H100 80GB HBM3");
        assert_eq!(g[0].memory_total, 81559 << 20);
        assert_eq!(g[0].memory_free, 81000 << 20);
        assert_eq!(g[1].index, 1);
        assert_eq!(g[1].memory_free, 1000 << 20);
        assert!(parse_nvidia_smi("garbage\n").is_err());
        assert!(parse_nvidia_smi("a, b MiB, 3 MiB").is_err());
        assert!(parse_nvidia_smi("").unwrap().is_empty());
    }

    #[test]
    fn static_probe_of_this_machine_is_sane() {
        let p = probe_static(Path::new("."));
        assert!(p.logical_cpus >= 1 && p.physical_cores >= 1);
        assert!(p.physical_cores <= p.logical_cpus);
        assert!(p.usable_memory() <= p.mem_total || p.mem_total == 0);
    }
}
