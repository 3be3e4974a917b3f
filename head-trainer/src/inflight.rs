//! One budget for image bytes in flight across every Enroll and Classify call.
//!
//! Without it, memory grows with the number of callers: four concurrent enrolls of 32
//! photos of 15 MiB held 2 GB. A photo is admitted once it has been read from the stream and
//! holds its share of the budget until its embedding is back (then only the embedding, a few
//! KiB, is kept). A caller that finds the budget spent waits, up to its deadline, then gets
//! RESOURCE_EXHAUSTED naming the limit. What the budget does not cover is bounded elsewhere:
//! each open stream may hold one more decoded message (`--max-photo-bytes` + 1 MiB) that
//! waits for admission; HTTP/2 flow control holds the rest on the caller's side.
//!
//! The photo a stream is reading before it can ask the budget is bounded by counting the
//! streams themselves: at most `--max-concurrent-uploads` Enroll and ClassifyStream calls carry
//! images at once ([`Uploads`]); more wait for a place, up to their deadline.
//!
//! Deadlock-free by construction for the callers here: an Enroll that must wait first sends
//! the photos it holds to the feature-server (releasing their bytes), so nobody waits while
//! holding a share that others need.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::{Error, Result};

/// The shared budget.
#[derive(Clone, Debug)]
pub struct InflightBudget {
    permits: Arc<Semaphore>,
    limit: usize,
}

/// A photo's share of the budget, given back on drop.
#[derive(Debug)]
pub struct Reservation {
    _permit: Option<OwnedSemaphorePermit>,
}

impl InflightBudget {
    /// A budget of `limit` bytes (at least 1).
    pub fn new(limit: usize) -> Self {
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }

    /// The configured limit in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes not reserved right now.
    pub fn available(&self) -> usize {
        self.permits.available_permits()
    }

    /// `bytes` at once, or `None` when the budget is spent.
    pub fn try_reserve(&self, bytes: usize) -> Result<Option<Reservation>> {
        let n = self.permits_for(bytes)?;
        if n == 0 {
            return Ok(Some(Reservation { _permit: None }));
        }
        match Arc::clone(&self.permits).try_acquire_many_owned(n) {
            Ok(p) => Ok(Some(Reservation { _permit: Some(p) })),
            Err(_) => Ok(None),
        }
    }

    /// `bytes`, waiting until `deadline` for others to give theirs back.
    pub async fn reserve(&self, bytes: usize, deadline: Instant) -> Result<Reservation> {
        let n = self.permits_for(bytes)?;
        if n == 0 {
            return Ok(Reservation { _permit: None });
        }
        let acquire = Arc::clone(&self.permits).acquire_many_owned(n);
        match tokio::time::timeout_at(deadline, acquire).await {
            Ok(Ok(p)) => Ok(Reservation { _permit: Some(p) }),
            Ok(Err(_)) => Err(Error::ShuttingDown),
            Err(_) => Err(Error::Busy(format!(
                "{bytes} bytes of image waited until the deadline for room in the in-flight \
                 budget (--max-inflight-bytes {}, all in use by other requests); retry later",
                self.limit
            ))),
        }
    }

    fn permits_for(&self, bytes: usize) -> Result<u32> {
        if bytes > self.limit {
            return Err(Error::InvalidArgument(format!(
                "an image of {bytes} bytes is larger than the whole in-flight budget \
                 (--max-inflight-bytes {})",
                self.limit
            )));
        }
        u32::try_from(bytes)
            .map_err(|_| Error::InvalidArgument(format!("an image of {bytes} bytes is over 4 GiB")))
    }
}

/// Places for image-carrying streams (Enroll, ClassifyStream), so that the messages they read
/// before admission are bounded too.
#[derive(Clone, Debug)]
pub struct Uploads {
    places: Arc<Semaphore>,
    limit: usize,
}

/// One stream's place, given back when the stream ends.
#[derive(Debug)]
pub struct UploadPlace {
    _permit: OwnedSemaphorePermit,
}

impl Uploads {
    /// `limit` streams at once (at least 1).
    pub fn new(limit: usize) -> Self {
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            places: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }

    /// A place, waiting until `deadline` for one.
    pub async fn enter(&self, deadline: Instant) -> Result<UploadPlace> {
        let acquire = Arc::clone(&self.places).acquire_owned();
        match tokio::time::timeout_at(deadline, acquire).await {
            Ok(Ok(p)) => Ok(UploadPlace { _permit: p }),
            Ok(Err(_)) => Err(Error::ShuttingDown),
            Err(_) => Err(Error::Busy(format!(
                "{} image streams are open (--max-concurrent-uploads {}) and none ended before \
                 the deadline; retry later",
                self.limit, self.limit
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn waits_then_names_the_limit() {
        let budget = InflightBudget::new(100);
        let a = budget.try_reserve(60).unwrap().expect("room for 60");
        assert!(budget.try_reserve(60).unwrap().is_none(), "over budget");
        assert_eq!(budget.available(), 40);
        let deadline = Instant::now() + Duration::from_millis(20);
        let err = budget.reserve(60, deadline).await.unwrap_err();
        assert!(
            matches!(&err, Error::Busy(m) if m.contains("--max-inflight-bytes 100")),
            "{err}"
        );
        drop(a);
        let b = budget
            .reserve(60, Instant::now() + Duration::from_secs(5))
            .await;
        assert!(b.is_ok());
    }

    #[tokio::test]
    async fn a_waiter_is_admitted_when_bytes_come_back() {
        let budget = InflightBudget::new(100);
        let held = budget.try_reserve(100).unwrap().expect("all of it");
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move {
                budget
                    .reserve(50, Instant::now() + Duration::from_secs(60))
                    .await
                    .map(|_| ())
            })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(held);
        waiter.await.unwrap().expect("admitted after the release");
    }

    #[tokio::test]
    async fn a_stream_beyond_the_limit_waits_then_names_it() {
        let uploads = Uploads::new(1);
        let first = uploads
            .enter(Instant::now() + Duration::from_secs(5))
            .await
            .unwrap();
        let err = uploads
            .enter(Instant::now() + Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("--max-concurrent-uploads 1"),
            "{err}"
        );
        drop(first);
        uploads
            .enter(Instant::now() + Duration::from_secs(5))
            .await
            .expect("a place once the first stream ended");
    }

    #[test]
    fn larger_than_the_budget_is_refused_at_once() {
        let budget = InflightBudget::new(100);
        let err = budget.try_reserve(101).unwrap_err();
        assert!(
            err.to_string()
                .contains("larger than the whole in-flight budget")
        );
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
}
