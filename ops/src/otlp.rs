//! OTLP export of every span over gRPC (cargo feature `otlp`, off by default): the spans the
//! servers already make (a request's `grpc` span, the feature-server's `embed` stream and
//! its batches) become OpenTelemetry spans in the caller's trace, so that a request followed
//! by its `trace_id` in the logs can also be seen whole in Jaeger, Tempo or any collector.
//!
//! The exporter gets a small runtime of its own: the feature-server sets up logging before
//! its runtime exists, and the head-trainer's runtime goes away before the last spans are
//! flushed at exit; a channel bound to either would die with it.

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::trace::TraceContext;

/// A running exporter: spans are batched and sent to the collector until it is dropped, which
/// flushes what is left.
pub struct Exporter {
    provider: SdkTracerProvider,
    service: &'static str,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Exporter {
    /// Sends spans of `service` to the OTLP/gRPC collector at `endpoint`
    /// (`http://collector:4317`). Nothing is sent until a span ends, and a collector that is
    /// down costs dropped spans, never a blocked request.
    pub fn start(endpoint: &str, service: &'static str) -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("taxon-otlp")
            .enable_all()
            .build()
            .map_err(|e| format!("OTLP exporter runtime: {e}"))?;
        let exporter = {
            let _in_runtime = runtime.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| format!("--otlp-endpoint {endpoint}: {e}"))?
        };
        let provider = SdkTracerProvider::builder()
            .with_resource(Resource::builder().with_service_name(service).build())
            .with_batch_exporter(exporter)
            .build();
        Ok(Self {
            provider,
            service,
            runtime: Some(runtime),
        })
    }

    /// The `tracing` layer that turns spans into OpenTelemetry spans for this exporter.
    pub fn layer<S>(
        &self,
    ) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer(self.service))
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        // Flushes the batch (waiting for the collector, bounded by the SDK's export timeout).
        if let Err(e) = self.provider.shutdown() {
            eprintln!("OTLP exporter: {e}");
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Makes the caller's span (`trace`'s parent) the parent of `span`, so that it is exported in
/// the caller's trace.
pub(crate) fn adopt(span: &tracing::Span, trace: &TraceContext) {
    let remote = SpanContext::new(
        TraceId::from_bytes(trace.trace_id.to_be_bytes()),
        SpanId::from_bytes(trace.parent_id.to_be_bytes()),
        TraceFlags::new(trace.flags),
        true,
        TraceState::default(),
    );
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}

/// The OpenTelemetry span id of `span`, when it is exported: what a call made inside it names
/// as its parent.
pub(crate) fn span_id(span: &tracing::Span) -> Option<u64> {
    let id = span.context().span().span_context().span_id();
    (id != SpanId::INVALID).then(|| u64::from_be_bytes(id.to_bytes()))
}
