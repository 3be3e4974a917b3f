//! `--metrics-listen`: the head-trainer's Prometheus endpoint, scraped over real HTTP after a
//! known workload through the gRPC face (and the stand-in feature-server), each series checked
//! against what was done.

mod common;

use std::time::Duration;

use common::*;
use taxon_ops::metrics_http::{scrape, value};
use taxon_proto::v1::{ClassifyRequest, TrainRequest};

/// The sum over every series of a family whose name starts `prefix{`.
fn family_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{prefix}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_by_what_was_done() {
    let features = FakeFeatures::start(64, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, metrics_addr) = (
        listener.local_addr().unwrap(),
        metrics.local_addr().unwrap(),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let listeners = head_trainer::Listeners {
        grpc: listener,
        metrics: Some(metrics),
        http: None,
    };
    let server = tokio::spawn(head_trainer::run_on(
        listeners,
        config(&features.url(), dir.path()),
        async {
            let _ = stopped.await;
        },
    ));
    wait_health(addr, "taxon.v1.Classifier", 1).await;
    let mut client = taxon_proto::v1::classifier_client::ClassifierClient::new(channel(addr));

    let photos = blobs("mug", 4, 64);
    let enroll = || tokio_stream::iter(enroll_messages("mug", photos.clone()));
    client.enroll(enroll()).await.expect("enroll");
    client
        .enroll(enroll())
        .await
        .expect("the same photos again");
    let classify = |image: Vec<u8>| ClassifyRequest {
        image: image.into(),
        top_k: 1,
        head: String::new(),
    };
    client
        .classify(classify(photos[0].clone()))
        .await
        .expect("from the store");
    client
        .classify(classify(photos[0].clone()))
        .await
        .expect("from memory");
    let new = blobs("new", 1, 64).remove(0);
    client
        .classify(classify(new))
        .await
        .expect("from the feature-server");
    let refused = client
        .classify(classify(Vec::new()))
        .await
        .expect_err("empty image");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    client
        .train(TrainRequest {
            head: "flat".into(),
        })
        .await
        .expect("train");

    let text = scrape(metrics_addr).await.expect("scrape");
    let rpc = |method: &str, code: &str| {
        value(
            &text,
            &format!(
                r#"taxon_head_trainer_rpcs_total{{rpc="taxon.v1.Classifier/{method}",code="{code}"}}"#
            ),
        )
    };
    assert_eq!(rpc("Enroll", "OK"), 2.0, "{text}");
    assert_eq!(rpc("Classify", "OK"), 3.0, "{text}");
    assert_eq!(rpc("Classify", "INVALID_ARGUMENT"), 1.0, "{text}");
    assert_eq!(rpc("Train", "OK"), 1.0, "{text}");
    assert_eq!(
        value(
            &text,
            r#"taxon_head_trainer_rpc_seconds_count{rpc="taxon.v1.Classifier/Classify"}"#
        ),
        4.0
    );
    let photos_by = |outcome: &str| {
        value(
            &text,
            &format!(r#"taxon_head_trainer_enrolled_photos_total{{outcome="{outcome}"}}"#),
        )
    };
    assert_eq!(photos_by("embedded"), 4.0, "{text}");
    assert_eq!(photos_by("cached"), 4.0, "{text}");
    assert_eq!(photos_by("rejected"), 0.0, "{text}");
    let from = |source: &str| {
        value(
            &text,
            &format!(r#"taxon_head_trainer_classify_embeddings_total{{source="{source}"}}"#),
        )
    };
    assert_eq!(
        (from("store"), from("memory"), from("feature_server")),
        (1.0, 1.0, 1.0)
    );
    assert_eq!(
        family_sum(&text, "taxon_head_trainer_classifications_total"),
        3.0,
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            r#"taxon_head_trainer_training_jobs_total{head="flat",outcome="trained"}"#
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            r#"taxon_head_trainer_training_seconds_count{head="flat"}"#
        ),
        1.0
    );
    assert_eq!(
        value(&text, "taxon_head_trainer_loaded_tenants"),
        1.0,
        "{text}"
    );

    let _ = stop.send(());
    server.await.unwrap().expect("clean shutdown");
    features.stop().await;
}
