//! Bounds glibc's allocator so that a server's resident memory follows its live data.
//!
//! Why: glibc gives every thread that meets a locked arena a new one (up to 8 per core) and
//! raises its mmap threshold each time a large block is freed, so that later large blocks come
//! from the arenas' heaps, which are rarely returned to the kernel. A head-trainer enrolling
//! one 5,902-photo tenant four requests at a time peaked at 965-1,036 MiB resident that way,
//! against 495 MiB with two arenas and a fixed 1 MiB threshold (`scripts/memory-large-tenant.sh`,
//! README "Memory"). This sets those two limits at start-up, before the runtime's threads
//! exist, unless the operator set glibc's own variables, which then win.

/// Arenas glibc may create in all (it defaults to 8 per core).
pub const ARENA_MAX: i32 = 2;
/// Blocks of at least this size are mmapped and go back to the kernel when freed; setting it
/// also stops glibc from raising it dynamically.
pub const MMAP_THRESHOLD: i32 = 1 << 20;

/// What [`bound`] did, for the start-up log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both limits set.
    Bounded,
    /// `MALLOC_ARENA_MAX` or `MALLOC_MMAP_THRESHOLD_` is in the environment: left to glibc.
    OperatorSet,
    /// Not glibc (musl, macOS): nothing to do.
    NotGlibc,
    /// glibc refused a setting.
    Refused,
}

/// Sets [`ARENA_MAX`] and [`MMAP_THRESHOLD`]; call first thing in `main`, before any thread.
pub fn bound() -> Outcome {
    if ["MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
    {
        return Outcome::OperatorSet;
    }
    set()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)] // mallopt is a plain C call with integer arguments
fn set() -> Outcome {
    // SAFETY: mallopt takes two ints, touches only the allocator's own parameters and is
    // documented as safe to call at any time; it returns 0 on error.
    let ok = unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX) == 1
            && libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    };
    if ok {
        Outcome::Bounded
    } else {
        Outcome::Refused
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set() -> Outcome {
    Outcome::NotGlibc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_accepts_both_limits() {
        // Calls `set` directly: the test runner's environment may carry glibc's variables.
        let got = set();
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert_eq!(got, Outcome::Bounded);
        } else {
            assert_eq!(got, Outcome::NotGlibc);
        }
    }
}
