//! Operations glue shared by the feature-server and the head-trainer: the Prometheus endpoint
//! (each server keeps its own registry and hands in how to render it), a layer that reports
//! every gRPC call's method, status and duration, the per-call series, TLS configuration
//! from PEM files, log output, W3C trace context and the allocator's limits. Nothing here knows
//! either server's domain.

pub mod grpc_metrics;
pub mod logging;
pub mod malloc;
pub mod metrics_http;
#[cfg(feature = "otlp")]
pub mod otlp;
pub mod rpc_metrics;
pub mod tls;
pub mod trace;

pub use taxon_proto::code_name;
