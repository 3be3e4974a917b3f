//! One file per command (or pair of small ones); each exposes `run(ctx, args)`.

pub mod classes;
pub mod classify;
pub mod completions;
pub mod enroll;
pub mod health;
pub mod info;
pub mod manage;
pub mod report;
pub mod transfer;

/// Seconds as a float with millisecond precision, for JSON.
pub(crate) fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
