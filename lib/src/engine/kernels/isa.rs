//! The instruction-set levels the kernels run at: what each needs of the
//! CPU, and the one place those features are detected.
//!
//! `rh-inspect` reports the level (`strategy.toml`'s `kernel`), the kernels
//! run at it, and every SIMD function in `kernels/` is compiled for one
//! level's [`Isa::target_features`] through that level's macro
//! (`avx2_fn!`, `avx_vnni_fn!`, `avx512_vnni_fn!`, and `avx_vnni_evex_fn!`
//! for the AVX-VNNI level's other encoding; tests/structure.rs reads the
//! sources and checks), so the features a kernel is compiled for are exactly the
//! ones detected before it may run.

use serde::{Deserialize, Serialize};

/// An instruction-set level the kernels run at, lowest first (the order is
/// the order of capability: a level runs everything the lower ones do).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isa {
    /// The portable reference loops (also what aarch64 runs: NEON kernels
    /// are not written yet, and strategy files that said `neon` read as
    /// this).
    #[serde(alias = "neon")]
    Scalar,
    /// AVX2, FMA and F16C.
    Avx2,
    /// AVX2's kernels, with the prefill tiles' multiply-adds in 256-bit
    /// VNNI (`vpdpwssd`, one instruction where AVX2 takes `vpmaddwd` and
    /// `vpaddd`): AVX-VNNI, on Intel's 12th generation and later and AMD's
    /// Zen 5, which lack AVX-512 (or have it, and run [`Isa::Avx512Vnni`]).
    /// The same instruction in its AVX-512 VL encoding stands in where the
    /// CPU has AVX-512 VNNI and VL but not AVX-VNNI, so the level runs,
    /// and is tested and measured, there too when capped to it.
    AvxVnni,
    /// AVX-512 F/BW and VNNI for int16-activation quantized matvec and
    /// matmul; AVX2 for everything else.
    Avx512Vnni,
}

/// Compiles the wrapped `fn` items for [`Isa::Avx2`]: each gets
/// `#[target_feature(enable = ...)]` with exactly that level's
/// [`Isa::target_features`] list (tests/structure.rs checks the two agree
/// and that no kernel writes the attribute itself). Wrap one function or
/// several:
///
/// ```ignore
/// avx2_fn! {
/// /// Doc comments and other attributes stay on the function.
/// #[inline]
/// unsafe fn dot(a: *const f32, b: *const f32, n: usize) -> f32 { ... }
/// }
/// ```
///
/// The body is left unindented so wrapping a function is a two-line edit.
/// Callers must check the level first ([`Isa::supported`]), as for any
/// `#[target_feature]` function.
#[cfg(target_arch = "x86_64")]
macro_rules! avx2_fn {
    ($($item:item)*) => {
        $(
            #[target_feature(enable = "avx2,fma,f16c")]
            $item
        )*
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use avx2_fn;

/// `avx2_fn!` for [`Isa::Avx512Vnni`]: AVX-512 F/BW/VNNI plus AVX2's list.
#[cfg(target_arch = "x86_64")]
macro_rules! avx512_vnni_fn {
    ($($item:item)*) => {
        $(
            #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
            $item
        )*
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use avx512_vnni_fn;

/// `avx2_fn!` for [`Isa::AvxVnni`]: AVX-VNNI (VEX-encoded `vpdpwssd` on
/// 256-bit vectors) plus AVX2's list.
#[cfg(target_arch = "x86_64")]
macro_rules! avx_vnni_fn {
    ($($item:item)*) => {
        $(
            #[target_feature(enable = "avxvnni,avx2,fma,f16c")]
            $item
        )*
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use avx_vnni_fn;

/// `avx_vnni_fn!` in the AVX-512 encoding (the second of
/// [`Isa::AvxVnni`]'s [`Isa::encodings`]): the same 256-bit `vpdpwssd`
/// where the CPU has AVX-512 VNNI and VL instead of AVX-VNNI.
#[cfg(target_arch = "x86_64")]
macro_rules! avx_vnni_evex_fn {
    ($($item:item)*) => {
        $(
            #[target_feature(enable = "avx512vnni,avx512vl,avx2,fma,f16c")]
            $item
        )*
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use avx_vnni_evex_fn;

/// Every CPU feature some level needs, as `is_x86_feature_detected!` and
/// `#[target_feature]` spell them.
pub const KERNEL_FEATURES: [&str; 8] = [
    "avx2",
    "fma",
    "f16c",
    "avxvnni",
    "avx512f",
    "avx512bw",
    "avx512vnni",
    "avx512vl",
];

impl Isa {
    /// Every level, lowest first.
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni];

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2+fma",
            Isa::AvxVnni => "avx-vnni",
            Isa::Avx512Vnni => "avx512-vnni",
        }
    }

    /// The feature lists this level's kernels are compiled for, one per
    /// encoding of its instructions, the preferred first; each exactly as
    /// its macro lists it (`avx2_fn!`, `avx_vnni_fn!` then
    /// `avx_vnni_evex_fn!`, `avx512_vnni_fn!`). Only AVX-VNNI has two: a
    /// CPU with AVX-512 VNNI and VL but not AVX-VNNI runs the same
    /// instructions in their AVX-512 encoding.
    pub const fn encodings(self) -> &'static [&'static str] {
        match self {
            Isa::Scalar => &[""],
            Isa::Avx2 => &["avx2,fma,f16c"],
            Isa::AvxVnni => &["avxvnni,avx2,fma,f16c", "avx512vnni,avx512vl,avx2,fma,f16c"],
            Isa::Avx512Vnni => &["avx512f,avx512bw,avx512vnni,avx2,fma,f16c"],
        }
    }

    /// The features of this level's preferred encoding.
    pub const fn target_features(self) -> &'static str {
        self.encodings()[0]
    }

    /// The features this level needs, one by one.
    pub fn required(self) -> impl Iterator<Item = &'static str> {
        self.target_features().split(',').filter(|f| !f.is_empty())
    }

    /// Which of [`Isa::encodings`] a CPU whose features `has` reports runs
    /// (the first it has every feature of), if any.
    pub fn encoding_on(self, has: impl Fn(&str) -> bool) -> Option<usize> {
        self.encodings()
            .iter()
            .position(|list| list.split(',').filter(|f| !f.is_empty()).all(&has))
    }

    /// Whether a CPU whose features `has` reports runs this level, in any
    /// of its encodings.
    pub fn runs_on(self, has: impl Fn(&str) -> bool) -> bool {
        self.encoding_on(has).is_some()
    }

    /// The highest level whose features `has` reports (a pure function, so
    /// inspect can decide for a recorded probe and tests can feed any CPU).
    pub fn highest(has: impl Fn(&str) -> bool) -> Isa {
        *Isa::ALL
            .iter()
            .rev()
            .find(|isa| isa.runs_on(&has))
            .unwrap_or(&Isa::Scalar)
    }

    /// The highest level the running CPU supports.
    pub fn detect() -> Isa {
        Isa::highest(cpu_has)
    }

    /// Whether the running CPU has every feature this level needs.
    pub fn supported(self) -> bool {
        self.runs_on(cpu_has)
    }

    /// Reads a level as `RH_KERNELS` and strategy files spell it
    /// (`scalar`, `avx2`, `avx-vnni`, `avx_vnni`, `avx512`, `avx512_vnni`,
    /// `avx512-vnni`, any case); `None` for anything else.
    pub fn parse(s: &str) -> Option<Isa> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" | "neon" => Some(Isa::Scalar),
            "avx2" | "avx2+fma" => Some(Isa::Avx2),
            "avx-vnni" | "avx_vnni" | "avxvnni" => Some(Isa::AvxVnni),
            "avx512" | "avx512_vnni" | "avx512-vnni" => Some(Isa::Avx512Vnni),
            _ => None,
        }
    }
}

/// Whether the running CPU has `feature`, one of [`KERNEL_FEATURES`]
/// (anything else, and every feature off x86_64, is `false`). This is the
/// one place the kernels' CPU features are detected; `rh-inspect`'s probe
/// asks here too.
pub fn cpu_has(feature: &str) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match feature {
            "avx2" => std::is_x86_feature_detected!("avx2"),
            "fma" => std::is_x86_feature_detected!("fma"),
            "f16c" => std::is_x86_feature_detected!("f16c"),
            "avx512f" => std::is_x86_feature_detected!("avx512f"),
            "avx512bw" => std::is_x86_feature_detected!("avx512bw"),
            "avx512vnni" => std::is_x86_feature_detected!("avx512vnni"),
            "avx512vl" => std::is_x86_feature_detected!("avx512vl"),
            "avxvnni" => std::is_x86_feature_detected!("avxvnni"),
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = feature;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_highest_level_needs_all_its_features() {
        let only = |list: &'static [&'static str]| move |f: &str| list.contains(&f);
        assert_eq!(Isa::highest(only(&[])), Isa::Scalar);
        assert_eq!(Isa::highest(only(&["avx2", "fma"])), Isa::Scalar, "no F16C");
        assert_eq!(Isa::highest(only(&["avx2", "fma", "f16c"])), Isa::Avx2);
        assert_eq!(
            Isa::highest(only(&["avx2", "fma", "f16c", "avx512f", "avx512vnni"])),
            Isa::Avx2,
            "AVX-512 without BW"
        );
        assert_eq!(Isa::highest(only(&KERNEL_FEATURES)), Isa::Avx512Vnni);
        // Alder Lake and later: AVX-VNNI without AVX-512.
        assert_eq!(
            Isa::highest(only(&["avx2", "fma", "f16c", "avxvnni"])),
            Isa::AvxVnni
        );
        // Ice Lake, Zen 4: AVX-512 VNNI and VL without AVX-VNNI run the
        // level in its other encoding, and the AVX-512 one above it.
        let zen4 = only(&[
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vnni",
            "avx512vl",
        ]);
        assert!(Isa::AvxVnni.runs_on(zen4));
        assert_eq!(Isa::highest(zen4), Isa::Avx512Vnni);
        assert!(
            !Isa::AvxVnni.runs_on(only(&["avx2", "fma", "f16c", "avx512vnni"])),
            "no VL"
        );
        for isa in Isa::ALL {
            assert!(isa.required().all(|f| KERNEL_FEATURES.contains(&f)));
            for list in isa.encodings() {
                let mut fs = list.split(',').filter(|f| !f.is_empty());
                assert!(fs.all(|f| KERNEL_FEATURES.contains(&f)), "{list}");
            }
        }
    }

    #[test]
    fn levels_read_back_from_their_names() {
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
            let toml = toml::to_string(
                &[("k", isa)]
                    .into_iter()
                    .collect::<std::collections::BTreeMap<_, _>>(),
            )
            .unwrap();
            let back: std::collections::BTreeMap<String, Isa> = toml::from_str(&toml).unwrap();
            assert_eq!(back["k"], isa);
        }
        assert_eq!(Isa::parse("AVX512"), Some(Isa::Avx512Vnni));
        assert_eq!(Isa::parse("sse"), None);
        // Strategy files written before the kinds were one type.
        let old: std::collections::BTreeMap<String, Isa> =
            toml::from_str("a = \"neon\"\nb = \"avx512_vnni\"\nc = \"avx2\"").unwrap();
        assert_eq!(
            (old["a"], old["b"], old["c"]),
            (Isa::Scalar, Isa::Avx512Vnni, Isa::Avx2)
        );
    }
}
