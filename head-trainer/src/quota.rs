//! Per-tenant quotas, so that one tenant on a shared server cannot take it from the others:
//! how much a tenant may keep (classes, examples, stored embedding bytes: checked inside the
//! enroll's own transaction, see `store::rules`), how fast it may ask (a token bucket of
//! requests per second), and how many enrolls it may run at once.
//!
//! Over a quota the answer is RESOURCE_EXHAUSTED naming the quota, its value and its flag;
//! nothing of the refused request is written.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::{Error, Result};

/// The limits, each 0 for "none".
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Quotas {
    /// Classes (parents included) one tenant may have.
    pub classes: u64,
    /// Examples (distinct photos' embeddings) one tenant may have.
    pub examples: u64,
    /// Bytes of embeddings one tenant may keep in the store (photos themselves are never
    /// stored: this is what a tenant's photos cost the database).
    pub stored_bytes: u64,
    /// Sustained requests per second per tenant; each photo of a classify stream counts.
    pub requests_per_s: f64,
    /// Requests a tenant may make at once above the sustained rate.
    pub burst: u64,
    /// Enrolls one tenant may run at the same time.
    pub concurrent_enrolls: u64,
}

impl Default for Quotas {
    /// Generous for one user, protective of a shared server: 1,000 classes, 20,000 examples
    /// (20 photos for each of 1,000 classes), 256 MiB of embeddings (about 52,000 ResNet18 or
    /// 52,000 / 2.5 MobileNetV2 examples), 200 requests per second with bursts of 400, and 4
    /// enrolls at once.
    fn default() -> Self {
        Self {
            classes: 1_000,
            examples: 20_000,
            stored_bytes: 256 << 20,
            requests_per_s: 200.0,
            burst: 400,
            concurrent_enrolls: 4,
        }
    }
}

impl Quotas {
    /// No limit at all (benchmarks, single-user deployments).
    pub fn unlimited() -> Self {
        Self {
            classes: 0,
            examples: 0,
            stored_bytes: 0,
            requests_per_s: 0.0,
            burst: 0,
            concurrent_enrolls: 0,
        }
    }
}

/// RESOURCE_EXHAUSTED for `what` (as the user would name it), its value and its flag;
/// `quota` is its fixed name in metrics.
pub fn exceeded(
    tenant: &str,
    quota: &'static str,
    what: &str,
    limit: impl std::fmt::Display,
    flag: &str,
) -> Error {
    Error::Quota {
        quota,
        message: format!("tenant `{tenant}` is over its quota of {limit} {what} ({flag})"),
    }
}

/// A tenant's bucket: `tokens` as of `at`.
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets kept at most; beyond it, buckets that have refilled (idle tenants) are dropped,
/// which changes nothing (a full bucket is what a new one is).
const MAX_BUCKETS: usize = 100_000;

/// The buckets are split by tenant over this many locks, so that tenants rarely wait on each
/// other's admission, and the sweep of idle buckets holds one shard, not every tenant.
const SHARDS: usize = 16;

/// The rate and concurrency state of every tenant that asked lately.
pub struct Admission {
    quotas: Quotas,
    buckets: [Mutex<HashMap<String, Bucket>>; SHARDS],
    enrolls: Arc<Mutex<HashMap<String, u64>>>,
}

/// One of a tenant's concurrent-enroll places, given back on drop.
pub struct EnrollPlace {
    tenant: String,
    enrolls: Arc<Mutex<HashMap<String, u64>>>,
}

impl Drop for EnrollPlace {
    fn drop(&mut self) {
        let mut enrolls = self.enrolls.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = enrolls.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                enrolls.remove(&self.tenant);
            }
        }
    }
}

impl Admission {
    pub fn new(quotas: Quotas) -> Self {
        Self {
            quotas,
            buckets: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            enrolls: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    /// Takes one request's token from `tenant`'s bucket, or refuses with how long until one
    /// is there.
    pub fn admit(&self, tenant: &str) -> Result<()> {
        self.admit_at(tenant, Instant::now())
    }

    fn admit_at(&self, tenant: &str, now: Instant) -> Result<()> {
        let rate = self.quotas.requests_per_s;
        if rate <= 0.0 {
            return Ok(());
        }
        let burst = self.quotas.burst.max(1) as f64;
        let mut buckets = self.shard(tenant).lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_BUCKETS / SHARDS && !buckets.contains_key(tenant) {
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
            if buckets.len() >= MAX_BUCKETS / SHARDS {
                return Err(Error::Busy(format!(
                    "{MAX_BUCKETS} tenants are being rate-limited at once: retry in a moment"
                )));
            }
        }
        let bucket = buckets.entry(tenant.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let refilled = bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate;
        bucket.tokens = refilled.min(burst);
        bucket.at = now;
        if bucket.tokens < 1.0 {
            let wait = (1.0 - bucket.tokens) / rate;
            return Err(Error::Quota {
                quota: "requests_per_second",
                message: format!(
                    "tenant `{tenant}` is over its quota of {rate} requests per second, bursts \
                     of {} (--quota-rps, --quota-burst): retry in {wait:.2} s",
                    burst as u64
                ),
            });
        }
        bucket.tokens -= 1.0;
        Ok(())
    }

    /// The lock over `tenant`'s bucket.
    fn shard(&self, tenant: &str) -> &Mutex<HashMap<String, Bucket>> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        tenant.hash(&mut h);
        &self.buckets[h.finish() as usize % SHARDS]
    }

    /// A place among `tenant`'s concurrent enrolls, or RESOURCE_EXHAUSTED when all are taken.
    pub fn enroll_place(&self, tenant: &str) -> Result<EnrollPlace> {
        let limit = self.quotas.concurrent_enrolls;
        let mut enrolls = self.enrolls.lock().unwrap_or_else(|p| p.into_inner());
        let n = enrolls.entry(tenant.to_string()).or_insert(0);
        if limit > 0 && *n >= limit {
            return Err(exceeded(
                tenant,
                "concurrent_enrolls",
                "enrolls at once",
                limit,
                "--quota-concurrent-enrolls",
            ));
        }
        *n += 1;
        Ok(EnrollPlace {
            tenant: tenant.to_string(),
            enrolls: Arc::clone(&self.enrolls),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rated(rps: f64, burst: u64) -> Admission {
        Admission::new(Quotas {
            requests_per_s: rps,
            burst,
            ..Quotas::unlimited()
        })
    }

    #[test]
    fn the_bucket_allows_its_burst_then_the_rate() {
        let a = rated(10.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            a.admit_at("t", t0).unwrap();
        }
        let e = a.admit_at("t", t0).unwrap_err().to_string();
        assert!(
            e.contains("10 requests per second") && e.contains("--quota-rps"),
            "{e}"
        );
        assert!(e.contains("retry in 0.10 s"), "{e}");
        // Another tenant is not affected.
        a.admit_at("u", t0).unwrap();
        // 100 ms later, one token (and only one) is back.
        let t1 = t0 + Duration::from_millis(100);
        a.admit_at("t", t1).unwrap();
        assert!(a.admit_at("t", t1).is_err());
        // Idle for long, the bucket is full again but not fuller than the burst.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            a.admit_at("t", t2).unwrap();
        }
        assert!(a.admit_at("t", t2).is_err());
    }

    #[test]
    fn buckets_are_bounded_and_idle_ones_make_room() {
        // A bucket takes 100 s to refill: none does while the tenants arrive.
        let a = rated(0.01, 1);
        let t0 = Instant::now();
        let mut admitted = 0;
        let refused = (0..2 * MAX_BUCKETS).find_map(|i| match a.admit_at(&format!("t{i}"), t0) {
            Ok(()) => {
                admitted += 1;
                None
            }
            Err(e) => Some(e),
        });
        let e = refused.expect("the bound holds");
        assert!(matches!(e, Error::Busy(_)), "{e}");
        assert!(
            (MAX_BUCKETS / 2..=MAX_BUCKETS).contains(&admitted),
            "{admitted} buckets before a shard was full"
        );
        // Once they have refilled, they are forgotten to make room (a full bucket is a new one).
        a.admit_at("late", t0 + Duration::from_secs(1000)).unwrap();
        // The tenant refused for room is admitted once there is room.
        let refused_one = format!("t{admitted}");
        a.admit_at(&refused_one, t0 + Duration::from_secs(1000))
            .unwrap();
    }

    #[test]
    fn no_rate_means_no_limit() {
        let a = rated(0.0, 0);
        let t0 = Instant::now();
        for _ in 0..10_000 {
            a.admit_at("t", t0).unwrap();
        }
    }

    #[test]
    fn enroll_places_are_per_tenant_and_come_back() {
        let a = Admission::new(Quotas {
            concurrent_enrolls: 2,
            ..Quotas::unlimited()
        });
        let p1 = a.enroll_place("t").unwrap();
        let _p2 = a.enroll_place("t").unwrap();
        let e = a.enroll_place("t").err().unwrap().to_string();
        assert!(
            e.contains("2 enrolls at once") && e.contains("--quota-concurrent-enrolls"),
            "{e}"
        );
        let _other = a.enroll_place("u").unwrap();
        drop(p1);
        let _p3 = a.enroll_place("t").unwrap();
    }
}
