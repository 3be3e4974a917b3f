//! `--metrics-listen`: the Prometheus endpoint, scraped over real HTTP before and after a
//! known workload, each counter checked against what was sent (and against the engine's own
//! counters where the count depends on how items were batched).

mod common;

use std::sync::Arc;

use common::*;
use feature_server::metrics::code_name;
use taxon_ops::metrics_http::{self as http, scrape, value};
use taxon_proto::v1::{EmbedRequest, InfoRequest};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_by_what_was_sent() {
    let server = TestServer::stand_in(small_config()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let engine = server.engine.clone();
    let stop = CancellationToken::new();
    let serving = tokio::spawn(http::serve(
        listener,
        Arc::new(move || std::future::ready(engine.render_metrics())),
        stop.clone().cancelled_owned(),
    ));

    let before = scrape(addr).await.expect("scrape");
    assert_eq!(value(&before, "taxon_features_forward_seconds_count"), 0.0);
    assert!(
        before.contains("# TYPE taxon_features_batch_views histogram"),
        "{before}"
    );

    let mut client = server.client().await;
    let mut requests: Vec<EmbedRequest> = (0..5u32)
        .map(|i| request(format!("good{i}"), png(8, 8, i)))
        .collect();
    requests.push(request("garbage", b"not an image".to_vec()));
    requests.push(EmbedRequest {
        views: 99,
        ..request("unknown-views", png(8, 8, 9))
    });
    let answers = embed_all(&mut client, requests).await;
    assert!(answers.end.is_none(), "{:?}", answers.end);
    let garbage = answers.items["garbage"].as_ref().expect_err("refused");
    let garbage_code = code_name(tonic::Code::from_i32(garbage.code));
    client.info(InfoRequest {}).await.expect("info");

    let after = scrape(addr).await.expect("scrape");
    let items = |views: &str, outcome: &str| {
        value(
            &after,
            &format!(r#"taxon_features_items_total{{views="{views}",outcome="{outcome}"}}"#),
        )
    };
    assert_eq!(items("center", "ok"), 5.0, "{after}");
    assert_eq!(items("center", garbage_code), 1.0, "{after}");
    assert_eq!(items("unknown", "INVALID_ARGUMENT"), 1.0, "{after}");
    let rpcs = |rpc: &str| {
        value(
            &after,
            &format!(r#"taxon_features_rpcs_total{{rpc="taxon.v1.Features/{rpc}",code="OK"}}"#),
        )
    };
    assert_eq!(rpcs("Embed"), 1.0, "{after}");
    assert_eq!(rpcs("Info"), 1.0, "{after}");
    // How the five were batched is the batcher's business; the histograms must agree with it.
    let stats = server.engine.stats();
    assert_eq!(stats.items, 5);
    let batches = stats.batches as f64;
    assert_eq!(value(&after, "taxon_features_batch_views_count"), batches);
    assert_eq!(value(&after, "taxon_features_batch_views_sum"), 5.0);
    assert_eq!(
        value(&after, "taxon_features_forward_seconds_count"),
        batches
    );
    assert_eq!(
        value(&after, "taxon_features_queue_wait_seconds_count"),
        5.0
    );
    assert_eq!(value(&after, "taxon_features_queue_depth"), 0.0);

    stop.cancel();
    serving
        .await
        .unwrap()
        .expect("metrics server stops cleanly");
    server.shutdown().await.expect("clean shutdown");
}
