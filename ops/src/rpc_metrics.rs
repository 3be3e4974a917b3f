//! The per-call series both servers export (`<prefix>_rpcs_total`, `<prefix>_rpc_seconds`),
//! fed by [`crate::grpc_metrics`].

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A gRPC method and the status the client saw.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub rpc: &'static str,
    pub code: &'static str,
}

/// A gRPC method, for its latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcName {
    pub rpc: &'static str,
}

/// Calls by method and status, and their durations.
#[derive(Clone)]
pub struct RpcMetrics {
    pub rpcs: Family<RpcLabels, Counter>,
    pub rpc_seconds: Family<RpcName, Histogram, fn() -> Histogram>,
}

/// 1 ms to about 500 s: a stream lasts as long as its client keeps sending.
pub fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

impl RpcMetrics {
    /// Creates both families and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let rpcs = Family::<RpcLabels, Counter>::default();
        registry.register(
            "rpcs",
            "gRPC calls by method and the status the client saw",
            rpcs.clone(),
        );
        let rpc_seconds: Family<RpcName, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(seconds_histogram);
        registry.register(
            "rpc_seconds",
            "Seconds per gRPC call, from its request to the end of its response",
            rpc_seconds.clone(),
        );
        Self { rpcs, rpc_seconds }
    }

    /// Counts one finished call and its duration.
    pub fn record(&self, rpc: &'static str, code: tonic::Code, took: std::time::Duration) {
        let code = crate::code_name(code);
        self.rpcs.get_or_create(&RpcLabels { rpc, code }).inc();
        self.rpc_seconds
            .get_or_create(&RpcName { rpc })
            .observe(took.as_secs_f64());
    }
}
