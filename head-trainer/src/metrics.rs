//! Prometheus metrics: calls, what tenants teach and ask, training, the embedding cache.
//!
//! One registry per server (see the feature-server's metrics for why not a global). Labels
//! take values from fixed sets only (head kinds, decisions, outcomes): never a class or photo
//! name, so no caller can grow the number of series. The one exception is opt-in and bounded:
//! with `--metrics-tenants N`, the first N tenants seen get series of their own and every
//! later one is counted under `(other)`. Gauges that mirror state kept elsewhere (loaded
//! tenants, the store's size) are read when scraped.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use taxon_ops::rpc_metrics::{RpcMetrics, seconds_histogram};

/// A photo sent to Enroll: `embedded` (new), `cached` (its embedding was already stored) or
/// `rejected`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhotoLabels {
    pub outcome: &'static str,
}

/// The head that answered a classify and what it decided (`child`, `parent`, `unknown`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub head: &'static str,
    pub decision: &'static str,
}

/// A training job's head kind and how it ended: `trained`, `reused` (a head another replica
/// trained on the same examples) or `failed`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrainingLabels {
    pub head: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HeadLabel {
    pub head: &'static str,
}

/// Where a classified photo's embedding came from: `memory` (the LRU), `store` (enrolled
/// before), or `feature_server`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: &'static str,
}

/// Which quota refused a request: `requests_per_second`, `concurrent_enrolls`, `classes`,
/// `examples` or `stored_bytes`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QuotaLabel {
    pub quota: &'static str,
}

/// A tenant's requests: `admitted`, or `refused` by a quota.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    pub tenant: String,
    pub outcome: &'static str,
}

/// The label of tenants beyond `--metrics-tenants`; not a valid tenant name, so it cannot be
/// mistaken for one.
pub const OTHER_TENANTS: &str = "(other)";

/// Which tenants have series of their own: the first `limit` seen.
struct TenantSeries {
    limit: usize,
    named: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl TenantSeries {
    /// The label for `tenant`, or `None` when per-tenant series are off.
    fn label(&self, tenant: &str) -> Option<String> {
        if self.limit == 0 {
            return None;
        }
        let mut named = self.named.lock().unwrap_or_else(|p| p.into_inner());
        if named.contains(tenant) {
            return Some(tenant.to_string());
        }
        if named.len() < self.limit {
            named.insert(tenant.to_string());
            return Some(tenant.to_string());
        }
        Some(OTHER_TENANTS.to_string())
    }
}

/// Every series the head-trainer exports, named `taxon_head_trainer_*`.
pub struct Metrics {
    registry: Registry,
    /// Calls by method and status, and their durations ([`taxon_ops::grpc_metrics`]).
    pub calls: RpcMetrics,
    pub enrolled_photos: Family<PhotoLabels, Counter>,
    pub classifications: Family<DecisionLabels, Counter>,
    pub training_jobs: Family<TrainingLabels, Counter>,
    pub training_seconds: Family<HeadLabel, Histogram, fn() -> Histogram>,
    /// From an Enroll's last photo to its trained head being live (`wait_for_head` only).
    pub time_to_live_seconds: Histogram,
    pub embeddings: Family<SourceLabel, Counter>,
    pub quota_refusals: Family<QuotaLabel, Counter>,
    loaded_tenants: Gauge,
    store_bytes: Gauge,
    /// Requests per tenant (`--metrics-tenants`; empty when off).
    pub tenant_requests: Family<TenantLabels, Counter>,
    tenants: TenantSeries,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(0)
    }
}

impl Metrics {
    /// Every series, with per-tenant ones for the first `tenant_series` tenants (0: none).
    pub fn new(tenant_series: usize) -> Self {
        let mut r = Registry::with_prefix("taxon_head_trainer");
        let calls = RpcMetrics::register(&mut r);
        let enrolled_photos = Family::<PhotoLabels, Counter>::default();
        r.register(
            "enrolled_photos",
            "Photos sent to Enroll, by outcome (embedded, cached, rejected)",
            enrolled_photos.clone(),
        );
        let classifications = Family::<DecisionLabels, Counter>::default();
        r.register(
            "classifications",
            "Images classified, by the head that answered and its decision",
            classifications.clone(),
        );
        let training_jobs = Family::<TrainingLabels, Counter>::default();
        r.register(
            "training_jobs",
            "Training jobs by head kind and outcome (trained, reused, failed)",
            training_jobs.clone(),
        );
        let training_seconds: Family<HeadLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(seconds_histogram);
        r.register(
            "training_seconds",
            "Seconds per training job that trained a head",
            training_seconds.clone(),
        );
        let time_to_live_seconds = seconds_histogram();
        r.register(
            "time_to_live_seconds",
            "Seconds from an Enroll's last photo to its trained head being live (wait_for_head)",
            time_to_live_seconds.clone(),
        );
        let embeddings = Family::<SourceLabel, Counter>::default();
        r.register(
            "classify_embeddings",
            "Embeddings of classified photos, by where they came from (memory, store, feature_server)",
            embeddings.clone(),
        );
        let quota_refusals = Family::<QuotaLabel, Counter>::default();
        r.register(
            "quota_refusals",
            "Requests refused because a tenant was over a quota, by quota",
            quota_refusals.clone(),
        );
        let loaded_tenants = Gauge::default();
        r.register(
            "loaded_tenants",
            "Tenants held in memory",
            loaded_tenants.clone(),
        );
        let store_bytes = Gauge::default();
        r.register(
            "store_bytes",
            "Bytes the store takes (the redb file, or Taxon's tables in PostgreSQL), read per scrape",
            store_bytes.clone(),
        );
        let tenant_requests = Family::<TenantLabels, Counter>::default();
        r.register(
            "tenant_requests",
            "Requests per tenant, admitted or refused by a quota (--metrics-tenants; the tenants \
             beyond it as (other))",
            tenant_requests.clone(),
        );
        Self {
            registry: r,
            calls,
            enrolled_photos,
            classifications,
            training_jobs,
            training_seconds,
            time_to_live_seconds,
            embeddings,
            quota_refusals,
            loaded_tenants,
            store_bytes,
            tenant_requests,
            tenants: TenantSeries {
                limit: tenant_series,
                named: Default::default(),
            },
        }
    }

    /// Counts one of `tenant`'s requests as admitted, or refused when `refusal` is a quota's.
    pub fn request(&self, tenant: &str, refusal: Option<&crate::Error>) {
        if let Some(e) = refusal {
            self.refused(e);
        }
        if let Some(label) = self.tenants.label(tenant) {
            let outcome = match refusal {
                Some(crate::Error::Quota { .. }) => "refused",
                Some(_) => return,
                None => "admitted",
            };
            self.tenant_requests
                .get_or_create(&TenantLabels {
                    tenant: label,
                    outcome,
                })
                .inc();
        }
    }

    pub fn photos(&self, outcome: &'static str, n: u64) {
        self.enrolled_photos
            .get_or_create(&PhotoLabels { outcome })
            .inc_by(n);
    }

    pub fn classified(&self, head: &'static str, decision: &'static str) {
        self.classifications
            .get_or_create(&DecisionLabels { head, decision })
            .inc();
    }

    pub fn trained(
        &self,
        head: &'static str,
        outcome: &'static str,
        took: Option<std::time::Duration>,
    ) {
        if let Some(took) = took {
            self.training_seconds
                .get_or_create(&HeadLabel { head })
                .observe(took.as_secs_f64());
        }
        self.training_jobs
            .get_or_create(&TrainingLabels { head, outcome })
            .inc();
    }

    /// Counts `e` when it is a quota's refusal.
    pub fn refused(&self, e: &crate::Error) {
        if let crate::Error::Quota { quota, .. } = e {
            self.quota_refusals
                .get_or_create(&QuotaLabel { quota })
                .inc();
        }
    }

    pub fn embedding_from(&self, source: &'static str) {
        self.embeddings.get_or_create(&SourceLabel { source }).inc();
    }

    /// The text exposition, with the state gauges as they are now (`store_bytes` keeps its
    /// last value when the store could not say).
    pub fn render(&self, loaded_tenants: usize, store_bytes: Option<u64>) -> String {
        self.loaded_tenants.set(loaded_tenants as i64);
        if let Some(b) = store_bytes {
            self.store_bytes.set(i64::try_from(b).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
