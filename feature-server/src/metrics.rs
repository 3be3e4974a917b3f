//! Prometheus metrics: what an operator of a model server expects to graph and alert on.
//!
//! One registry per [`crate::engine::Engine`], not a process-global recorder: tests run several
//! servers in one process, and each must count only its own work. Gauges that mirror state the
//! engine already keeps (queue depth, open streams) are read when scraped rather than updated
//! on the hot path. Served over HTTP by [`taxon_ops::metrics_http::serve`] on
//! `--metrics-listen`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
pub use taxon_ops::code_name;
use taxon_ops::rpc_metrics::RpcMetrics;

/// An item's view set (`center`, `scales_and_mirrors`, or `unknown` for a number this
/// server does not know) and how it ended: `ok`, or the gRPC code name of its error.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ItemLabels {
    pub views: &'static str,
    pub outcome: &'static str,
}

/// Every series the feature-server exports, named `taxon_features_*`.
pub struct Metrics {
    registry: Registry,
    /// Calls by method and the status the client saw, and their durations (an `Embed` stream
    /// counts once, when it ends), recorded by [`taxon_ops::grpc_metrics`] around the server.
    pub calls: RpcMetrics,
    /// Items answered, by view set and outcome.
    pub items: Family<ItemLabels, Counter>,
    /// Views per forward pass.
    pub batch_views: Histogram,
    /// Seconds per forward pass.
    pub forward_seconds: Histogram,
    /// Seconds an item waited in the queue before its batch was formed.
    pub queue_wait_seconds: Histogram,
    queue_depth: Gauge,
    open_streams: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("taxon_features");
        let calls = RpcMetrics::register(&mut registry);
        let items = Family::<ItemLabels, Counter>::default();
        registry.register(
            "items",
            "Embed items answered, by view set and outcome (ok or the error's code)",
            items.clone(),
        );
        // 1, 2, 4 ... 128 views: a batch holds up to --max-batch images plus one item's views.
        let batch_views = Histogram::new(exponential_buckets(1.0, 2.0, 8));
        registry.register("batch_views", "Views per forward pass", batch_views.clone());
        // 1 ms to about 16 s.
        let forward_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "forward_seconds",
            "Seconds per forward pass",
            forward_seconds.clone(),
        );
        // 100 us to about 3 s.
        let queue_wait_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 15));
        registry.register(
            "queue_wait_seconds",
            "Seconds an item waited in the queue before its batch was formed",
            queue_wait_seconds.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Items queued for the engine and not yet in a batch",
            queue_depth.clone(),
        );
        let open_streams = Gauge::default();
        registry.register("open_streams", "Embed streams open", open_streams.clone());
        Self {
            registry,
            calls,
            items,
            batch_views,
            forward_seconds,
            queue_wait_seconds,
            queue_depth,
            open_streams,
        }
    }
}

impl Metrics {
    /// Counts one answered item; `outcome` is `None` for an embedding.
    pub fn item(&self, views: &'static str, error: Option<tonic::Code>) {
        let outcome = error.map_or("ok", code_name);
        self.items
            .get_or_create(&ItemLabels { views, outcome })
            .inc();
    }

    /// The text exposition, with the state gauges as they are now.
    pub fn render(&self, queue_depth: usize, open_streams: usize) -> String {
        self.queue_depth.set(queue_depth as i64);
        self.open_streams.set(open_streams as i64);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_render_in_the_text_format() {
        let m = Metrics::default();
        let took = std::time::Duration::from_millis(3);
        m.calls.record("Embed", tonic::Code::Ok, took);
        m.calls
            .record("Embed", tonic::Code::ResourceExhausted, took);
        m.item("center", None);
        m.item("center", None);
        m.item("unknown", Some(tonic::Code::InvalidArgument));
        m.batch_views.observe(3.0);
        let text = m.render(5, 2);
        for line in [
            r#"taxon_features_rpcs_total{rpc="Embed",code="OK"} 1"#,
            r#"taxon_features_rpcs_total{rpc="Embed",code="RESOURCE_EXHAUSTED"} 1"#,
            r#"taxon_features_items_total{views="center",outcome="ok"} 2"#,
            r#"taxon_features_items_total{views="unknown",outcome="INVALID_ARGUMENT"} 1"#,
            "taxon_features_batch_views_count 1",
            r#"taxon_features_rpc_seconds_count{rpc="Embed"} 2"#,
            r#"taxon_features_batch_views_bucket{le="4.0"} 1"#,
            "taxon_features_queue_depth 5",
            "taxon_features_open_streams 2",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
