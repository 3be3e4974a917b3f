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

/// A head-trainer serving gRPC and `/metrics`, each on its own 127.0.0.1:0.
struct Running {
    addr: std::net::SocketAddr,
    metrics: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<head_trainer::Result<()>>,
}

async fn start(config: head_trainer::Config) -> Running {
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
    let server = tokio::spawn(head_trainer::run_on(listeners, config, async {
        let _ = stopped.await;
    }));
    wait_health(addr, "taxon.v1.Classifier", 1).await;
    Running {
        addr,
        metrics: metrics_addr,
        stop,
        server,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_by_what_was_done() {
    let features = FakeFeatures::start(64, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let Running {
        addr,
        metrics: metrics_addr,
        stop,
        server,
    } = start(config(&features.url(), dir.path())).await;
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
            ..Default::default()
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
    let file = std::fs::metadata(dir.path().join("taxon.redb"))
        .unwrap()
        .len();
    assert_eq!(
        value(&text, "taxon_head_trainer_store_bytes"),
        file as f64,
        "{text}"
    );
    assert!(
        !text.contains("taxon_head_trainer_tenant_requests_total{"),
        "no tenant in any label unless --metrics-tenants asks"
    );

    let _ = stop.send(());
    server.await.unwrap().expect("clean shutdown");
    features.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_tenant_series_for_the_first_tenants_only() {
    let features = FakeFeatures::start(64, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&features.url(), dir.path());
    c.metrics_tenants = 2;
    // One request per tenant per 100 s, bursts of 2: the third request of a tenant is refused.
    c.quotas = head_trainer::quota::Quotas {
        requests_per_s: 0.01,
        burst: 2,
        ..head_trainer::quota::Quotas::unlimited()
    };
    let running = start(c).await;
    let mut client =
        taxon_proto::v1::classifier_client::ClassifierClient::new(channel(running.addr));
    let list = |tenant: &str| {
        let mut r = tonic::Request::new(taxon_proto::v1::ListClassesRequest {});
        r.metadata_mut()
            .insert(taxon_proto::TENANT_HEADER, tenant.parse().unwrap());
        r
    };
    for (tenant, n) in [("a", 3), ("b", 1), ("c", 2), ("d", 1)] {
        for _ in 0..n {
            let _ = client.list_classes(list(tenant)).await;
        }
    }
    let text = scrape(running.metrics).await.expect("scrape");
    let series = |tenant: &str, outcome: &str| {
        value(
            &text,
            &format!(
                r#"taxon_head_trainer_tenant_requests_total{{tenant="{tenant}",outcome="{outcome}"}}"#
            ),
        )
    };
    assert_eq!(
        (series("a", "admitted"), series("a", "refused")),
        (2.0, 1.0),
        "{text}"
    );
    assert_eq!(series("b", "admitted"), 1.0, "{text}");
    assert_eq!(
        series("(other)", "admitted"),
        3.0,
        "c and d, beyond the first two: {text}"
    );
    assert_eq!(
        series("c", "admitted") + series("d", "admitted"),
        0.0,
        "{text}"
    );
    let _ = running.stop.send(());
    running.server.await.unwrap().expect("clean shutdown");
}
