//! Which SIMD kernels this CPU runs, decided once per process.
//!
//! Why run-time detection rather than `-C target-cpu`: the binary is built once and runs on
//! whatever the deployment has (the anchors' AVX2 Zen3, an AVX-512 Xeon, an ARM box); each
//! kernel is compiled for its instruction set with `#[target_feature]` and picked here.
//! `TAXON_CONV_ISA=avx2|portable` forces a lower level, to measure or test the fallbacks.

use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    /// Rows per microkernel tile (the packing stride of the left-hand matrix).
    pub fn mr(self) -> usize {
        match self {
            Isa::Avx512 => 12,
            Isa::Avx2 => 6,
            Isa::Portable => 4,
        }
    }
}

fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let forced = std::env::var("TAXON_CONV_ISA").ok();
        let allow_512 = forced.is_none();
        let allow_avx2 = forced.as_deref() != Some("portable");
        if allow_512 && super::x86::AVX512_BUILT && std::arch::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if allow_avx2
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

/// The instruction set the convolution kernels use in this process.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(detect)
}

/// Runs `f` compiled with AVX2 + FMA enabled when the CPU has them, so the plain loops in it
/// (transforms, depthwise taps, pooling) are vectorized 8 wide instead of SSE2's 4.
#[inline(always)]
#[allow(unsafe_code)] // entering a `#[target_feature]` function after detecting the feature.
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if isa() != Isa::Portable {
        // SAFETY: AVX2 and FMA were detected on this CPU.
        return unsafe { with_avx2(f) };
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(unsafe_code)]
unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CI runs the kernel tests once per instruction set the host has, forcing each with
    /// `TAXON_CONV_ISA`: this fails if a forced set were not the one in use, so a kernel can
    /// never pass untested in the other's place.
    #[test]
    fn a_forced_instruction_set_is_the_one_in_use() {
        let forced = std::env::var("TAXON_CONV_ISA").ok();
        println!("kernels in use: {:?} (TAXON_CONV_ISA={forced:?})", isa());
        match forced.as_deref() {
            Some("portable") => assert_eq!(isa(), Isa::Portable),
            #[cfg(target_arch = "x86_64")]
            Some("avx2") if std::arch::is_x86_feature_detected!("avx2") => {
                assert_eq!(isa(), Isa::Avx2)
            }
            Some(other) if other != "avx2" => {
                panic!("TAXON_CONV_ISA={other}: only avx2 and portable can be forced")
            }
            _ => {}
        }
    }
}
