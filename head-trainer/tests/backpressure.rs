//! Backpressure, not failure: a busy feature-server and a spent in-flight budget make callers
//! wait (up to their deadline), never lose an enroll; one oversized photo is one rejected
//! item, and the rest of its stream goes on.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{FakeFeatures, Trainer, blobs, config, enroll_messages};
use taxon_proto::v1::{ClassifyStreamRequest, classify_stream_response};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_enrolls_of_large_photos_all_succeed_through_a_full_queue() {
    // A feature-server that takes 4 images at a time and refuses the rest, like a full
    // queue; a budget that holds 12 of the 1 MiB photos at once.
    let features = FakeFeatures::start(4, Duration::from_millis(5)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&features.url(), dir.path());
    c.max_photo_bytes = 2 << 20;
    c.max_inflight_bytes = 12 << 20;
    // One tenant's 16 enrolls at once: the server-wide bounds are under test here, not the
    // per-tenant one (tests/quotas.rs).
    c.quotas.concurrent_enrolls = 16;
    let trainer = Trainer::start(c).await;
    common::wait_health(trainer.addr, "taxon.v1.Classifier", 1).await;

    let mut calls = Vec::new();
    for e in 0..16 {
        let mut client = trainer.client();
        calls.push(tokio::spawn(async move {
            let msgs = enroll_messages(&format!("class{e}"), blobs(&format!("e{e}"), 8, 1 << 20));
            client.enroll(tokio_stream::iter(msgs)).await
        }));
    }
    for (e, call) in calls.into_iter().enumerate() {
        let r = call
            .await
            .unwrap()
            .unwrap_or_else(|s| panic!("enroll {e}: {s}"));
        let r = r.into_inner();
        assert_eq!((r.accepted, r.examples), (8, 8), "enroll {e}: {r:?}");
        assert!(r.rejected.is_empty(), "enroll {e}: {:?}", r.rejected);
    }
    let refused = features.counters.refused.load(Ordering::SeqCst);
    let peak = features.counters.peak_inflight.load(Ordering::SeqCst);
    println!(
        "16 enrolls x 8 photos of 1 MiB: all stored; the feature-server refused {refused} \
         items as busy (retried), at most {peak} at once"
    );
    assert!(
        refused > 0,
        "the queue was never full: backpressure was not exercised"
    );
    assert!(peak <= 4);
    assert_eq!(features.counters.embedded.load(Ordering::SeqCst), 128);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_budget_makes_callers_wait_then_names_the_limit() {
    let features = FakeFeatures::start(usize::MAX, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&features.url(), dir.path());
    c.max_photo_bytes = 1 << 20;
    c.max_inflight_bytes = 1 << 20; // one photo at a time
    let trainer = Trainer::start(c).await;
    common::wait_health(trainer.addr, "taxon.v1.Classifier", 1).await;

    // A holds the whole budget while its photo is embedded slowly.
    features.counters.work_ms.store(1500, Ordering::SeqCst);
    let mut a = trainer.client();
    let holder = tokio::spawn(async move {
        let msgs = enroll_messages("slow", blobs("a", 1, 1 << 20));
        a.enroll(tokio_stream::iter(msgs)).await
    });
    // Until A's photo is with the feature-server, B could still get in: wait for that.
    while features.counters.inflight.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let mut b = trainer.client();
    let mut req = tonic::Request::new(tokio_stream::iter(enroll_messages(
        "impatient",
        blobs("b", 1, 1 << 20),
    )));
    req.set_timeout(Duration::from_millis(300));
    let err = b
        .enroll(req)
        .await
        .expect_err("no room before the deadline");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert!(
        err.message().contains("--max-inflight-bytes 1048576"),
        "{err}"
    );
    let a = holder.await.unwrap().expect("the holder's enroll succeeds");
    assert_eq!(a.into_inner().examples, 1);

    // Once A is done, B fits; and B's refused attempt wrote nothing.
    features.counters.work_ms.store(0, Ordering::SeqCst);
    let mut b = trainer.client();
    let classes = b
        .list_classes(taxon_proto::v1::ListClassesRequest {})
        .await
        .unwrap()
        .into_inner()
        .classes;
    assert_eq!(classes.len(), 1, "{classes:?}");
    let msgs = enroll_messages("impatient", blobs("b", 1, 1 << 20));
    b.enroll(tokio_stream::iter(msgs)).await.expect("room now");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_oversized_photo_is_one_rejected_item() {
    let features = FakeFeatures::start(usize::MAX, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&features.url(), dir.path());
    c.max_photo_bytes = 1 << 20;
    let trainer = Trainer::start(c).await;
    common::wait_health(trainer.addr, "taxon.v1.Classifier", 1).await;
    let mut client = trainer.client();

    let mut photos = blobs("ok", 3, 1000);
    photos.insert(1, vec![7u8; (1 << 20) + 1]);
    let r = client
        .enroll(tokio_stream::iter(enroll_messages("mug", photos)))
        .await
        .expect("the enroll goes on")
        .into_inner();
    assert_eq!(r.accepted, 3);
    assert_eq!(r.rejected.len(), 1);
    assert_eq!(r.rejected[0].id, "p1");
    assert!(
        r.rejected[0]
            .message
            .contains("over the limit of 1048576 bytes"),
        "{:?}",
        r.rejected
    );

    let items = vec![
        ClassifyStreamRequest {
            id: "small".into(),
            image: blobs("x", 1, 1000).remove(0).into(),
            top_k: 1,
            head: String::new(),
        },
        ClassifyStreamRequest {
            id: "big".into(),
            image: vec![1u8; (1 << 20) + 10].into(),
            top_k: 1,
            head: String::new(),
        },
        ClassifyStreamRequest {
            id: "small2".into(),
            image: blobs("y", 1, 1000).remove(0).into(),
            top_k: 1,
            head: String::new(),
        },
    ];
    let mut stream = client
        .classify_stream(tokio_stream::iter(items))
        .await
        .unwrap()
        .into_inner();
    let mut seen = std::collections::BTreeMap::new();
    while let Some(m) = stream.message().await.expect("stream stays up") {
        seen.insert(m.id.clone(), m.result);
    }
    assert_eq!(seen.len(), 3);
    assert!(matches!(
        seen["small"],
        Some(classify_stream_response::Result::Classification(_))
    ));
    assert!(matches!(
        seen["small2"],
        Some(classify_stream_response::Result::Classification(_))
    ));
    match &seen["big"] {
        Some(classify_stream_response::Result::Error(e)) => {
            assert_eq!(e.code, tonic::Code::InvalidArgument as i32);
            assert!(e.message.contains("1048576"), "{}", e.message);
        }
        other => panic!("big: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_expires_mid_enroll_leaves_no_half_written_class() {
    let features = FakeFeatures::start(64, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let trainer = Trainer::start(config(&features.url(), dir.path())).await;
    common::wait_health(trainer.addr, "taxon.v1.Classifier", 1).await;
    let mut client = trainer.client();
    let kept = enroll_messages("kept", blobs("kept", 2, 64));
    client
        .enroll(tokio_stream::iter(kept))
        .await
        .expect("enroll");

    // The feature-server now takes far longer than the caller will wait.
    features.counters.work_ms.store(5_000, Ordering::SeqCst);
    let late = enroll_messages("late", blobs("late", 3, 64));
    let mut req = tonic::Request::new(tokio_stream::iter(late));
    req.set_timeout(Duration::from_millis(300));
    let err = client.enroll(req).await.expect_err("past its deadline");
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err}");

    features.counters.work_ms.store(0, Ordering::SeqCst);
    let classes = client
        .list_classes(taxon_proto::v1::ListClassesRequest {})
        .await
        .unwrap()
        .into_inner()
        .classes;
    let names: Vec<(&str, u32)> = classes
        .iter()
        .map(|c| (c.name.as_str(), c.examples))
        .collect();
    assert_eq!(names, [("kept", 2)], "the late enroll wrote nothing");
    features.stop().await;
}
