//! The caller's W3C trace context continues from the head-trainer into its feature-server
//! calls (same trace id, our span as the parent), and a request without one starts a trace of
//! its own, so that a feature-server's lines can always be tied to the request that caused them.

mod common;

use std::time::Duration;

use common::{FakeFeatures, Trainer, blobs, config, enroll_messages};
use taxon_ops::trace::TraceContext;
use taxon_proto::v1::ClassifyRequest;

const CALLER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn traced<T>(msg: T, traceparent: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = traceparent {
        r.metadata_mut().insert("traceparent", t.parse().unwrap());
    }
    r
}

/// The trace contexts the fake saw, parsed (each must be valid).
fn seen(features: &FakeFeatures) -> Vec<TraceContext> {
    let seen = features.counters.traceparents.lock().unwrap().clone();
    seen.iter()
        .map(|t| {
            let t = t.as_deref().expect("an Embed call without traceparent");
            TraceContext::parse(t).unwrap_or_else(|| panic!("invalid traceparent {t:?}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_trace_reaches_the_feature_server() {
    let features = FakeFeatures::start(64, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let trainer = Trainer::start(config(&features.url(), dir.path())).await;
    common::wait_health(trainer.addr, "taxon.v1.Classifier", 1).await;
    let caller = TraceContext::parse(CALLER).unwrap();
    let mut client = trainer.client();

    let msgs = enroll_messages("a", blobs("a", 2, 64));
    client
        .enroll(traced(tokio_stream::iter(msgs), Some(CALLER)))
        .await
        .expect("enroll");
    let photo = blobs("fresh", 1, 64).remove(0);
    client
        .classify(traced(
            ClassifyRequest {
                image: photo.into(),
                ..Default::default()
            },
            Some(CALLER),
        ))
        .await
        .expect("classify");
    let with_caller = seen(&features);
    assert_eq!(with_caller.len(), 2, "one Embed call per request");
    for t in &with_caller {
        assert_eq!(t.trace_id, caller.trace_id, "the trace did not continue");
        assert_ne!(
            t.parent_id, caller.parent_id,
            "the head-trainer's span is the parent"
        );
    }

    // No trace from the caller: a new one, different per request.
    for i in 0..2 {
        let photo = blobs(&format!("untraced{i}"), 1, 64).remove(0);
        client
            .classify(traced(
                ClassifyRequest {
                    image: photo.into(),
                    ..Default::default()
                },
                None,
            ))
            .await
            .expect("classify");
    }
    let all = seen(&features);
    let (a, b) = (all[2], all[3]);
    assert_ne!(a.trace_id, caller.trace_id);
    assert_ne!(a.trace_id, b.trace_id, "two requests shared a trace");

    // A malformed traceparent is ignored (W3C), not an error.
    let photo = blobs("malformed", 1, 64).remove(0);
    client
        .classify(traced(
            ClassifyRequest {
                image: photo.into(),
                ..Default::default()
            },
            Some("00-not-a-trace-01"),
        ))
        .await
        .expect("a malformed traceparent does not fail the call");
    assert_eq!(seen(&features).len(), 5);
}
