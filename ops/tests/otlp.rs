//! With the `otlp` feature: spans reach an OTLP/gRPC collector (a stand-in on 127.0.0.1:0)
//! in the caller's trace, under the caller's span, and a call made inside a span names that
//! span as its parent. Run by CI with `cargo test -p taxon-ops --features otlp`.
#![cfg(feature = "otlp")]

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use taxon_ops::otlp::Exporter;
use taxon_ops::trace::TraceContext;
use tracing_subscriber::layer::SubscriberExt;

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = req
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans);
        self.0.lock().unwrap().extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_in_the_callers_trace() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let collector = Collector::default();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let caller =
        TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
    let exporter = Exporter::start(&format!("http://{addr}"), "taxon-test").unwrap();
    let subscriber = tracing_subscriber::registry().with(exporter.layer());
    let downstream = tracing::subscriber::with_default(subscriber, || {
        let request = tracing::info_span!("grpc", trace_id = tracing::field::Empty);
        caller.adopt(&request);
        let _in = request.enter();
        let batch = tracing::info_span!("batch");
        let _in_batch = batch.enter();
        TraceContext::child(&caller)
    });
    // Dropping the exporter flushes its batch to the collector before it returns.
    tokio::task::spawn_blocking(move || drop(exporter))
        .await
        .unwrap();

    let spans = collector.0.lock().unwrap().clone();
    let by_name = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no `{name}` span among {spans:?}"))
            .clone()
    };
    let (request, batch) = (by_name("grpc"), by_name("batch"));
    let trace_id = caller.trace_id.to_be_bytes().to_vec();
    assert_eq!(request.trace_id, trace_id, "the caller's trace");
    assert_eq!(batch.trace_id, trace_id);
    assert_eq!(
        request.parent_span_id,
        caller.parent_id.to_be_bytes().to_vec(),
        "under the caller's span"
    );
    assert_eq!(
        batch.parent_span_id, request.span_id,
        "nested as the spans were"
    );
    assert_eq!(downstream.trace_id, caller.trace_id);
    assert_eq!(
        downstream.parent_id.to_be_bytes().to_vec(),
        batch.span_id,
        "a call made inside a span names it as the parent"
    );
}
