//! Per-tenant quotas through the gRPC face: over each, RESOURCE_EXHAUSTED naming the quota,
//! its value and its flag, nothing of the request written, and other tenants untouched. (The
//! store-side quotas, classes, examples and stored bytes, are also tested against both stores
//! in the store contract; the token bucket's arithmetic in `quota`'s unit tests.)

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{FakeFeatures, Trainer, blobs, config, enroll_messages};
use head_trainer::quota::Quotas;
use taxon_proto::v1::{ListClassesRequest, ListClassesResponse};

const SERVING: i32 = 1;

fn as_tenant<T>(tenant: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert(taxon_proto::TENANT_HEADER, tenant.parse().unwrap());
    r
}

async fn start(quotas: Quotas) -> (FakeFeatures, Trainer, tempfile::TempDir) {
    let features = FakeFeatures::start(64, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&features.url(), dir.path());
    c.quotas = quotas;
    let trainer = Trainer::start(c).await;
    common::wait_health(trainer.addr, "taxon.v1.Classifier", SERVING).await;
    (features, trainer, dir)
}

fn assert_quota(status: &tonic::Status, words: &[&str]) {
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
    for w in words {
        assert!(status.message().contains(w), "{w:?} not in: {status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_second_per_tenant() {
    // One token per 100 s: nothing refills during the test, so the count is exact.
    let (_features, trainer, _dir) = start(Quotas {
        requests_per_s: 0.01,
        burst: 3,
        ..Quotas::unlimited()
    })
    .await;
    let mut client = trainer.client();
    for i in 0..3 {
        client
            .list_classes(as_tenant("busy", ListClassesRequest {}))
            .await
            .unwrap_or_else(|s| panic!("request {i} of the burst: {s}"));
    }
    let refused = client
        .list_classes(as_tenant("busy", ListClassesRequest {}))
        .await
        .expect_err("over the burst");
    assert_quota(
        &refused,
        &[
            "busy",
            "0.01 requests per second",
            "--quota-rps",
            "retry in",
        ],
    );
    // Another tenant has its own bucket.
    client
        .list_classes(as_tenant("quiet", ListClassesRequest {}))
        .await
        .expect("another tenant is not limited by the first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classes_per_tenant_and_nothing_written_over_it() {
    let (_features, trainer, _dir) = start(Quotas {
        classes: 2,
        ..Quotas::unlimited()
    })
    .await;
    let mut client = trainer.client();
    for class in ["a", "b"] {
        let msgs = enroll_messages(class, blobs(class, 2, 64));
        client
            .enroll(as_tenant("t", tokio_stream::iter(msgs)))
            .await
            .unwrap_or_else(|s| panic!("enroll {class}: {s}"));
    }
    let msgs = enroll_messages("c", blobs("c", 2, 64));
    let refused = client
        .enroll(as_tenant("t", tokio_stream::iter(msgs)))
        .await
        .expect_err("a third class");
    assert_quota(&refused, &["quota of 2 classes", "--quota-classes"]);
    let list: ListClassesResponse = client
        .list_classes(as_tenant("t", ListClassesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = list.classes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["a", "b"], "the refused enroll wrote nothing");
    // More photos into an existing class need no new class.
    let msgs = enroll_messages("a", blobs("a-more", 2, 64));
    client
        .enroll(as_tenant("t", tokio_stream::iter(msgs)))
        .await
        .expect("more photos of a class the tenant has");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_enrolls_per_tenant() {
    let (features, trainer, _dir) = start(Quotas {
        concurrent_enrolls: 1,
        ..Quotas::unlimited()
    })
    .await;
    // The first enroll's photo stays at the feature-server, so the enroll stays open.
    features.counters.work_ms.store(60_000, Ordering::SeqCst);
    let mut client = trainer.client();
    let held = {
        let mut client = client.clone();
        let msgs = enroll_messages("slow", blobs("slow", 1, 64));
        tokio::spawn(async move {
            client
                .enroll(as_tenant("t", tokio_stream::iter(msgs)))
                .await
        })
    };
    tokio::time::timeout(Duration::from_secs(60), async {
        while features.counters.inflight.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the first enroll reached the feature-server");
    features.counters.work_ms.store(0, Ordering::SeqCst);

    let msgs = enroll_messages("second", blobs("second", 1, 64));
    let refused = client
        .enroll(as_tenant("t", tokio_stream::iter(msgs.clone())))
        .await
        .expect_err("a second enroll at once");
    assert_quota(
        &refused,
        &["1 enrolls at once", "--quota-concurrent-enrolls"],
    );
    client
        .enroll(as_tenant("other", tokio_stream::iter(msgs.clone())))
        .await
        .expect("another tenant's enroll");

    // The place comes back when the first enroll ends, even by the caller giving up.
    held.abort();
    let _ = held.await;
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match client
                .enroll(as_tenant("t", tokio_stream::iter(msgs.clone())))
                .await
            {
                Ok(_) => return,
                // The server may not have seen the cancel yet.
                Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                    tokio::task::yield_now().await
                }
                Err(s) => panic!("{s}"),
            }
        }
    })
    .await
    .expect("the place came back");
}
