//! Retrying calls that failed because no server answered them.
//!
//! Behind a load balancer a replica can die mid-call; on one machine the head-trainer can be
//! restarting. Both show as `UNAVAILABLE`, and both heal within seconds, so the client waits
//! and tries again instead of failing a folder of photos on one dropped connection. Only
//! `UNAVAILABLE` is retried: it is the status gRPC reserves for "try again later", and every
//! call the client retries is safe to repeat (classify reads; enroll adds examples keyed by
//! the photo's hash, so a photo sent twice is one example).
//!
//! Backoff doubles from [`FIRST_DELAY`] up to [`MAX_DELAY`], with jitter so that many clients
//! cut off by the same failure do not come back in step, until the budget (`--retry-s`) is
//! spent; then the last status is the command's error, as before.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use tonic::{Code, Status};

const FIRST_DELAY: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_secs(2);

/// How long a command keeps retrying, shared by every call it makes.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    budget: Duration,
    /// Retries made so far by every call of this command, for its summary.
    retries: Arc<AtomicU64>,
}

impl RetryPolicy {
    /// `budget` is the longest a single call keeps retrying; zero turns retrying off.
    pub fn new(budget: Duration) -> Self {
        Self {
            budget,
            retries: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Starts counting one call's attempts.
    pub fn start(&self) -> Attempts {
        Attempts {
            policy: self.clone(),
            started: Instant::now(),
            delay: FIRST_DELAY,
        }
    }

    /// Makes the call `attempt` makes, again while it fails with a status worth retrying.
    pub async fn run<T, F, Fut>(&self, call: &str, mut attempt: F) -> Result<T, Status>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut attempts = self.start();
        loop {
            match attempt().await {
                Ok(done) => return Ok(done),
                Err(status) => {
                    if !attempts.wait_after(call, &status).await {
                        return Err(status);
                    }
                }
            }
        }
    }

    /// Retries made so far by calls under this policy.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::new(Duration::from_secs(30))
    }
}

/// One call's attempts: asked after each failure whether, and after how long, to try again.
#[derive(Debug)]
pub struct Attempts {
    policy: RetryPolicy,
    started: Instant,
    delay: Duration,
}

impl Attempts {
    /// How long to wait before trying again after `status`, or `None` when the call has
    /// failed for good (another status, or the budget is spent).
    pub fn after(&mut self, status: &Status) -> Option<Duration> {
        if !retryable(status) {
            return None;
        }
        let left = self.policy.budget.checked_sub(self.started.elapsed())?;
        if left.is_zero() {
            return None;
        }
        // Full jitter: anywhere in [delay/2, delay], never past the budget.
        let half = self.delay / 2;
        let wait = (half + rand::rng().random_range(Duration::ZERO..=half)).min(left);
        self.delay = (self.delay * 2).min(MAX_DELAY);
        self.policy.retries.fetch_add(1, Ordering::Relaxed);
        Some(wait)
    }

    /// Waits as [`Self::after`] says and returns true, or returns false at once when the call
    /// should not be retried. Says so on stderr: a person watching sees why it paused.
    pub async fn wait_after(&mut self, call: &str, status: &Status) -> bool {
        let Some(wait) = self.after(status) else {
            return false;
        };
        eprintln!(
            "{call}: {} ({}); retrying in {} ms",
            crate::error::code_name(status.code() as i32),
            status.message(),
            wait.as_millis()
        );
        tokio::time::sleep(wait).await;
        true
    }
}

/// Whether a failed call may be repeated: only when no server took it (see the module docs).
pub fn retryable(status: &Status) -> bool {
    status.code() == Code::Unavailable
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unavailable_is_retried() {
        let policy = RetryPolicy::new(Duration::from_secs(30));
        let mut a = policy.start();
        assert!(a.after(&Status::invalid_argument("bad photo")).is_none());
        assert!(a.after(&Status::resource_exhausted("quota")).is_none());
        assert!(a.after(&Status::internal("bug")).is_none());
        assert!(a.after(&Status::unavailable("restarting")).is_some());
        assert_eq!(policy.retries(), 1);
    }

    #[test]
    fn delays_grow_to_the_cap_with_jitter() {
        let mut a = RetryPolicy::new(Duration::from_secs(3600)).start();
        let down = Status::unavailable("down");
        let waits: Vec<Duration> = (0..8).map(|_| a.after(&down).unwrap()).collect();
        assert!(
            waits[0] >= FIRST_DELAY / 2 && waits[0] <= FIRST_DELAY,
            "{waits:?}"
        );
        assert!(
            waits[1] >= FIRST_DELAY && waits[1] <= FIRST_DELAY * 2,
            "{waits:?}"
        );
        assert!(waits.iter().all(|w| *w <= MAX_DELAY), "{waits:?}");
        assert!(waits[7] >= MAX_DELAY / 2, "capped, not reset: {waits:?}");
    }

    #[test]
    fn a_spent_or_zero_budget_stops_retrying() {
        let down = Status::unavailable("down");
        assert!(
            RetryPolicy::new(Duration::ZERO)
                .start()
                .after(&down)
                .is_none()
        );
        let mut a = RetryPolicy::new(Duration::from_millis(1)).start();
        a.started -= Duration::from_millis(5);
        assert!(a.after(&down).is_none());
    }
}
