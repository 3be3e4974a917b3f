//! Flush-to-zero and denormals-are-zero on the threads that run the engine.
//!
//! Why: an x86 core computes on subnormal floats (below 1.2e-38) through a microcode assist
//! that costs tens to hundreds of cycles per operation. Deep activations and Winograd
//! transforms make such values now and then, and one slow lane stalls the whole SIMD op. For
//! an embedding they are zero in all but name, so the engine asks the CPU to treat them as
//! zero (MXCSR's FTZ and DAZ bits), as ONNX Runtime and most inference engines do. The caller's
//! own setting is put back after each forward pass; rayon's workers run only numeric work, so
//! they keep the setting once given.
//!
//! `TAXON_DENORMALS=keep` leaves the CPU's default (IEEE) behaviour, to measure the difference.

use std::sync::OnceLock;

/// MXCSR's flush-to-zero (bit 15) and denormals-are-zero (bit 6).
#[cfg(target_arch = "x86_64")]
const FTZ_DAZ: u32 = (1 << 15) | (1 << 6);

/// Whether the engine flushes denormals (decided once per process).
pub fn flushing() -> bool {
    static FLUSH: OnceLock<bool> = OnceLock::new();
    *FLUSH.get_or_init(|| {
        let keep = std::env::var("TAXON_DENORMALS").is_ok_and(|v| v.eq_ignore_ascii_case("keep"));
        let flush = cfg!(target_arch = "x86_64") && !keep;
        if flush {
            // Every worker of the pool, once; a worker started later (the pool does not grow)
            // would not have it, which costs speed, never correctness.
            rayon::broadcast(|_| set(read() | FTZ_BITS));
        }
        flush
    })
}

#[cfg(target_arch = "x86_64")]
const FTZ_BITS: u32 = FTZ_DAZ;
#[cfg(not(target_arch = "x86_64"))]
const FTZ_BITS: u32 = 0;

/// Runs `f` with denormals flushed on this thread too, restoring its setting afterwards.
pub fn flushed<R>(f: impl FnOnce() -> R) -> R {
    if !flushing() {
        return f();
    }
    let before = read();
    set(before | FTZ_BITS);
    let out = f();
    set(before);
    out
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)] // reading and writing this thread's MXCSR register
fn read() -> u32 {
    let mut csr = 0u32;
    // SAFETY: stmxcsr stores the 32-bit control/status register to the given address, which
    // points at a live local; it has no other effect.
    unsafe {
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags));
    }
    csr
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
fn set(csr: u32) {
    // SAFETY: ldmxcsr loads a value read by `read` with only the FTZ/DAZ bits (both defined on
    // every x86-64 CPU) changed, so no reserved bit is set and no exception is unmasked.
    unsafe {
        std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, preserves_flags));
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn read() -> u32 {
    0
}

#[cfg(not(target_arch = "x86_64"))]
fn set(_: u32) {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inside `flushed` a subnormal product is zero (when flushing is on); after it, this
    /// thread computes IEEE subnormals again.
    #[test]
    fn flushes_inside_and_restores_after() {
        let tiny = std::hint::black_box(1e-30f32);
        let scale = std::hint::black_box(1e-10f32);
        let inside = flushed(|| std::hint::black_box(tiny * scale));
        let after = std::hint::black_box(tiny) * scale;
        assert!(after > 0.0, "IEEE gives a subnormal, not {after}");
        if flushing() {
            assert_eq!(inside, 0.0);
        } else {
            assert_eq!(inside, after);
        }
    }
}
