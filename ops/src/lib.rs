//! Operations glue shared by the feature-server and the head-trainer: the Prometheus endpoint
//! (each server keeps its own registry and hands in how to render it), a layer that reports
//! every gRPC call's method, status and duration, and the per-call series. Nothing here knows
//! either server's domain.

pub mod grpc_metrics;
pub mod metrics_http;
pub mod rpc_metrics;

pub use taxon_proto::code_name;
