//! Health that tells the truth, reconnection, and a shutdown that an idle client cannot hold
//! off.

mod common;

use std::time::{Duration, Instant};

use common::{FakeFeatures, Trainer, blobs, config, enroll_messages, wait_health};
use taxon_proto::v1::{ClassifyRequest, EnrollRequest, EnrollStart, enroll_request};

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_feature_server_and_it_comes_back_on_the_same_address() {
    let features = FakeFeatures::start(usize::MAX, Duration::ZERO).await;
    let addr = features.addr;
    let dir = tempfile::tempdir().unwrap();
    let trainer = Trainer::start(config(&features.url(), dir.path())).await;
    wait_health(trainer.addr, "taxon.v1.Classifier", SERVING).await;
    wait_health(trainer.addr, "", SERVING).await;
    let mut client = trainer.client();
    client
        .enroll(tokio_stream::iter(enroll_messages(
            "mug",
            blobs("m", 3, 100),
        )))
        .await
        .expect("enroll");

    // The feature-server dies: readiness says so, liveness does not.
    features.stop().await;
    wait_health(trainer.addr, "taxon.v1.Classifier", NOT_SERVING).await;
    wait_health(trainer.addr, "", SERVING).await;
    let err = client
        .classify(ClassifyRequest {
            image: b"never seen".to_vec().into(),
            top_k: 1,
            head: String::new(),
        })
        .await
        .expect_err("nothing can embed a new photo");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    // Listing needs no feature-server.
    client
        .list_classes(taxon_proto::v1::ListClassesRequest {})
        .await
        .expect("list without a feature-server");

    // It comes back on the same address: the head-trainer reconnects by itself.
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("the same address again");
    let features = FakeFeatures::serve(listener, usize::MAX, Duration::ZERO).await;
    wait_health(trainer.addr, "taxon.v1.Classifier", SERVING).await;
    let r = client
        .classify(ClassifyRequest {
            image: b"never seen".to_vec().into(),
            top_k: 1,
            head: String::new(),
        })
        .await
        .expect("classify after the feature-server came back")
        .into_inner();
    assert_eq!(r.children.len(), 1);
    features.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_enroll_cannot_hold_shutdown_off() {
    let features = FakeFeatures::start(usize::MAX, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&features.url(), dir.path());
    c.shutdown_grace = Duration::from_millis(300);
    let mut trainer = Trainer::start(c).await;
    wait_health(trainer.addr, "taxon.v1.Classifier", SERVING).await;

    // Health, watched over a connection opened before the shutdown.
    let mut watch =
        tonic_health::pb::health_client::HealthClient::new(common::channel(trainer.addr))
            .watch(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status, SERVING);

    // An Enroll that sends its first message and then nothing, forever.
    let (tx, rx) = tokio::sync::mpsc::channel::<EnrollRequest>(1);
    tx.send(EnrollRequest {
        item: Some(enroll_request::Item::Start(EnrollStart {
            class_name: "idle".into(),
            parent: String::new(),
            wait_for_head: false,
        })),
    })
    .await
    .unwrap();
    let mut client = trainer.client();
    let idle = tokio::spawn(async move {
        client
            .enroll(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });

    let asked = Instant::now();
    trainer.signal_stop();
    // Draining: liveness turns NOT_SERVING at once.
    let mut drained = false;
    while let Ok(Some(m)) = watch.message().await {
        if m.status == NOT_SERVING {
            drained = true;
            break;
        }
    }
    assert!(drained, "health never said NOT_SERVING while draining");
    let stopped = tokio::time::timeout(Duration::from_secs(20), &mut trainer.task)
        .await
        .expect("run returned despite the idle stream")
        .expect("task");
    stopped.expect("a clean shutdown");
    let took = asked.elapsed();
    let err = idle.await.unwrap().expect_err("the idle enroll was cut");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    println!("shutdown with an idle Enroll open: {took:?} (grace 300 ms)");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    drop(tx);
    // The cut enroll left nothing behind: the store reopens with no class.
    let features2 = FakeFeatures::start(usize::MAX, Duration::ZERO).await;
    let trainer = Trainer::start(config(&features2.url(), dir.path())).await;
    let classes = trainer
        .client()
        .list_classes(taxon_proto::v1::ListClassesRequest {})
        .await
        .unwrap()
        .into_inner()
        .classes;
    assert!(classes.is_empty(), "{classes:?}");
    features.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_only_what_the_head_trainer_serves() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let features = FakeFeatures::start(usize::MAX, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let trainer = Trainer::start(config(&features.url(), dir.path())).await;
    let mut client = ServerReflectionClient::new(common::channel(trainer.addr));
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("{msg:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"taxon.v1.Classifier".to_string()),
        "{names:?}"
    );
    assert!(!names.iter().any(|n| n == "taxon.v1.Features"), "{names:?}");
    features.stop().await;
}

#[test]
fn store_files_are_readable_by_their_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("store");
    drop(head_trainer::store::RedbStore::open(&data).unwrap());
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("taxon.redb")), 0o600);
}
