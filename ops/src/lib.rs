//! Operations glue shared by the feature-server and the head-trainer: the Prometheus endpoint
//! (each server keeps its own registry and hands in how to render it), a layer that reports
//! every gRPC call's method, status and duration, and the status names metrics are labelled
//! with. Nothing here knows either server's domain.

pub mod grpc_metrics;
pub mod metrics_http;
pub mod rpc_metrics;

/// `RESOURCE_EXHAUSTED`: a gRPC code as gRPC documents it (and as clients print it).
pub fn code_name(code: tonic::Code) -> String {
    let camel = format!("{code:?}");
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn code_names_are_grpcs() {
        assert_eq!(super::code_name(tonic::Code::Ok), "OK");
        assert_eq!(
            super::code_name(tonic::Code::ResourceExhausted),
            "RESOURCE_EXHAUSTED"
        );
        assert_eq!(
            super::code_name(tonic::Code::DeadlineExceeded),
            "DEADLINE_EXCEEDED"
        );
    }
}
