//! Which family of kernels the packed bf16 products run: the best the CPU has, found once, or
//! one the binary forces (`--kernels`, `MOEBIUS_KERNELS`) to test or measure another family on
//! the same machine. The library reads no environment; the binary calls [`force`].

use std::sync::atomic::{AtomicU8, Ordering};

/// A family of kernels, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// AVX-512F for f32 activations, and AVX512-BF16 for the opt-in bf16 activations.
    Avx512Bf16,
    /// AVX-512F (f32 activations only).
    Avx512,
    /// AVX2 with FMA: f32 activations, bf16 weights widened in registers.
    Avx2,
    /// aarch64 NEON (Advanced SIMD, part of every aarch64 CPU): the AVX2 kernel's scheme on
    /// 4-lane vectors and 32 registers.
    Neon,
    /// Plain Rust over the same layout, for CPUs with none of the above.
    Portable,
}

const ALL: [Family; 5] = [
    Family::Avx512Bf16,
    Family::Avx512,
    Family::Avx2,
    Family::Neon,
    Family::Portable,
];

impl Family {
    /// The name `--kernels` takes.
    pub fn name(self) -> &'static str {
        match self {
            Family::Avx512Bf16 => "avx512bf16",
            Family::Avx512 => "avx512",
            Family::Avx2 => "avx2",
            Family::Neon => "neon",
            Family::Portable => "portable",
        }
    }

    /// The family named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        ALL.into_iter().find(|f| f.name() == name)
    }

    /// Whether this CPU can run the family.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Family::Avx512Bf16 => has!("avx512f") && has!("avx512bf16"),
                Family::Avx512 => has!("avx512f"),
                Family::Avx2 => has!("avx2") && has!("fma"),
                Family::Neon => false,
                Family::Portable => true,
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            use std::arch::is_aarch64_feature_detected as has;
            match self {
                Family::Neon => has!("neon"),
                Family::Portable => true,
                _ => false,
            }
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            self == Family::Portable
        }
    }

    /// Every family this CPU can run, best first.
    pub fn supported_here() -> Vec<Self> {
        ALL.into_iter().filter(|f| f.supported()).collect()
    }

    /// The best family this CPU can run.
    pub fn best() -> Self {
        ALL.into_iter()
            .find(|f| f.supported())
            .unwrap_or(Family::Portable)
    }

    /// Whether bf16 activations can run in this family.
    pub fn has_bf16_activations(self) -> bool {
        self == Family::Avx512Bf16
    }
}

/// The forced family, as its index in [`ALL`] plus one; 0: none forced.
static FORCED: AtomicU8 = AtomicU8::new(0);

/// Makes every later product run `family`; refuses a family this CPU cannot run.
pub fn force(family: Family) -> Result<(), String> {
    if !family.supported() {
        let here: Vec<&str> = Family::supported_here()
            .into_iter()
            .map(Family::name)
            .collect();
        return Err(format!(
            "this CPU cannot run the {} kernels; it can run: {}",
            family.name(),
            here.join(", ")
        ));
    }
    let index = ALL
        .iter()
        .position(|f| *f == family)
        .unwrap_or(ALL.len() - 1);
    FORCED.store(index as u8 + 1, Ordering::Relaxed);
    Ok(())
}

/// The family the products run: the forced one, else the best this CPU has (found once, as
/// every product asks).
pub fn active() -> Family {
    static BEST: std::sync::OnceLock<Family> = std::sync::OnceLock::new();
    match FORCED.load(Ordering::Relaxed) {
        0 => *BEST.get_or_init(Family::best),
        i => ALL[usize::from(i - 1).min(ALL.len() - 1)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_the_portable_family_runs_everywhere() {
        for family in ALL {
            assert_eq!(Family::parse(family.name()), Some(family));
        }
        assert_eq!(Family::parse("sse2"), None);
        assert!(Family::Portable.supported());
        assert_eq!(Family::supported_here().first(), Some(&Family::best()));
    }
}
