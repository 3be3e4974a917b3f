//! The `taxon.v1.Features` service end to end, in-process over real gRPC: health, reflection,
//! `Info`, embeddings equal to the in-process backbone's, batching across streams, a 10,000
//! item stream, cancellation, admission control, deadlines and graceful shutdown.
//!
//! Backbone tests use MobileNetV2 formula weights (about 6x cheaper than ResNet18); protocol
//! tests that need many items use the `ChannelMeans` stand-in behind the real engine.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use candle_core::{Device, Tensor};
use common::*;
use feature_server::Config;
use feature_server::models::{Backbone, BackboneKind, Precision};
use feature_server::preprocess::{
    INPUT_SIZE, Limits, SCALES_AND_MIRRORS, preprocess, preprocess_views,
};
use taxon_proto::v1::{EmbedRequest, InfoRequest, ViewSet};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Watches `service`'s health until it says SERVING; the watch goes on for later changes.
async fn serving_watch(
    health: &mut HealthClient<tonic::transport::Channel>,
    service: &str,
) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    let mut watch = health
        .watch(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("watch")
        .into_inner();
    within("SERVING", async {
        while let Some(update) = watch.message().await.expect("health update") {
            if update.status == ServingStatus::Serving as i32 {
                return;
            }
        }
        panic!("health stream ended before SERVING");
    })
    .await;
    watch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_serving_after_warm_up_and_reflection_lists_the_service() {
    let server = TestServer::stand_in(small_config()).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["taxon.v1.Features", ""] {
        serving_watch(&mut health, service).await;
    }

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("reflection answer")
        .expect("one answer");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("not a service list: {response:?}");
    };
    let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    // Only what this server implements: not the head-trainer's Classifier, which shares the
    // descriptor set.
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "taxon.v1.Features",
        ],
    );
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_and_embeddings_match_the_in_process_backbone() {
    let server = TestServer::real(BackboneKind::MobileNetV2, small_config()).await;
    let mut client = server.client().await;
    let info = client
        .info(InfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.backbone, "mobilenet_v2");
    assert_eq!(info.dim as usize, BackboneKind::MobileNetV2.dim());
    assert_eq!(info.device, "cpu");
    assert_eq!(info.max_batch, 8);
    assert_eq!(info.weights_sha256.len(), 64);
    assert_eq!(
        info.model,
        taxon_proto::model_identity("mobilenet_v2", &info.weights_sha256, "f32")
    );
    assert_eq!(info.max_image_bytes, Limits::default().max_bytes as u64);

    let images = [
        std::fs::read(fixture("a_photo.jpg")).expect("fixture"),
        std::fs::read(fixture("d_alpha.png")).expect("fixture"),
        jpeg(300, 200, 1),
    ];
    let requests = images
        .iter()
        .enumerate()
        .map(|(i, b)| request(format!("img{i}"), b.clone()))
        .collect();
    let answers = embed_all(&mut client, requests).await;
    assert!(answers.end.is_none(), "{:?}", answers.end);
    assert!(answers.models.iter().all(|m| *m == info.model));

    let (dir, weights) = formula_weights(BackboneKind::MobileNetV2);
    let (backbone, sha) = Backbone::load(
        BackboneKind::MobileNetV2,
        &weights,
        &Device::Cpu,
        Precision::F32,
    )
    .expect("load");
    assert_eq!(sha, info.weights_sha256);
    for (i, bytes) in images.iter().enumerate() {
        let pixels = preprocess(bytes, &Limits::default()).expect("preprocess");
        let x =
            Tensor::from_vec(pixels, (1, 3, INPUT_SIZE, INPUT_SIZE), &Device::Cpu).expect("tensor");
        let expected = backbone
            .forward(&x)
            .and_then(|y| y.to_vec2::<f32>())
            .expect("forward");
        let got = answers.items[&format!("img{i}")]
            .as_ref()
            .expect("embedded");
        let diff = relative_diff(got, &expected[0]);
        assert!(diff < 1e-4, "img{i}: relative difference {diff}");
    }
    drop(dir);
    server.shutdown().await.expect("clean shutdown");
}

/// `--dtype f16`: Info and every embedding's identity name the precision (so a cache never
/// mixes it with f32 embeddings), and the embeddings, still f32 on the wire, stay within f16's
/// tolerance of the f32 backbone's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_precision_server_names_its_dtype_in_every_identity() {
    let config = Config {
        precision: Precision::F16,
        ..small_config()
    };
    let server = TestServer::real(BackboneKind::MobileNetV2, config).await;
    let mut client = server.client().await;
    let info = client
        .info(InfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.dtype, "f16");
    assert_eq!(
        info.model,
        taxon_proto::model_identity("mobilenet_v2", &info.weights_sha256, "f16")
    );
    assert!(info.model.ends_with("+f16"), "{}", info.model);
    let photo = std::fs::read(fixture("a_photo.jpg")).expect("fixture");
    let answers = embed_all(&mut client, vec![request("a", photo.clone())]).await;
    assert!(answers.end.is_none(), "{:?}", answers.end);
    assert_eq!(answers.models, vec![info.model.clone()]);
    let got = answers.items["a"].as_ref().expect("embedded");

    let (dir, weights) = formula_weights(BackboneKind::MobileNetV2);
    let (f32_backbone, _) = Backbone::load(
        BackboneKind::MobileNetV2,
        &weights,
        &Device::Cpu,
        Precision::F32,
    )
    .expect("load");
    let pixels = preprocess(&photo, &Limits::default()).expect("preprocess");
    let x = Tensor::from_vec(pixels, (1, 3, INPUT_SIZE, INPUT_SIZE), &Device::Cpu).expect("x");
    let want = f32_backbone
        .forward(&x)
        .and_then(|y| y.to_vec2::<f32>())
        .expect("forward");
    let diff = relative_diff(got, &want[0]);
    assert!(
        diff > 0.0 && diff < 5e-3,
        "f16 vs f32: relative difference {diff}"
    );
    drop(dir);
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_set_embeds_the_mean_of_its_views_and_says_so_in_the_identity() {
    let server = TestServer::real(BackboneKind::MobileNetV2, small_config()).await;
    let mut client = server.client().await;
    let info = client
        .info(InfoRequest {})
        .await
        .expect("info")
        .into_inner();
    let photo = std::fs::read(fixture("f_wide.jpg")).expect("fixture");
    let requests = vec![
        EmbedRequest {
            views: ViewSet::ScalesAndMirrors as i32,
            ..request("four", photo.clone())
        },
        EmbedRequest {
            views: 99,
            ..request("unknown-set", photo.clone())
        },
        request("center", photo.clone()),
    ];
    let answers = embed_all(&mut client, requests).await;
    assert!(answers.end.is_none(), "{:?}", answers.end);
    let refused = answers.items["unknown-set"].as_ref().expect_err("refused");
    assert_eq!(refused.code, Code::InvalidArgument as i32);
    assert!(refused.message.contains("99"), "{}", refused.message);
    let mut models = answers.models.clone();
    models.sort();
    assert_eq!(
        models,
        vec![
            info.model.clone(),
            taxon_proto::embedding_identity(&info.model, ViewSet::ScalesAndMirrors)
        ]
    );

    let (dir, weights) = formula_weights(BackboneKind::MobileNetV2);
    let (backbone, _) = Backbone::load(
        BackboneKind::MobileNetV2,
        &weights,
        &Device::Cpu,
        Precision::F32,
    )
    .expect("load");
    let views = preprocess_views(&photo, &Limits::default(), &SCALES_AND_MIRRORS).expect("views");
    let x = Tensor::from_vec(views.concat(), (4, 3, INPUT_SIZE, INPUT_SIZE), &Device::Cpu)
        .expect("tensor");
    let expected = backbone
        .forward(&x)
        .and_then(|y| y.mean(0))
        .and_then(|y| y.to_vec1::<f32>())
        .expect("forward");
    let four = answers.items["four"].as_ref().expect("embedded");
    let diff = relative_diff(four, &expected);
    assert!(
        diff < 1e-4,
        "mean of four views: relative difference {diff}"
    );
    let center = answers.items["center"].as_ref().expect("embedded");
    assert!(
        relative_diff(four, center) > 1e-3,
        "four views gave the center crop's embedding"
    );
    // Two images embedded (the unknown view set never reached the engine), five views.
    let stats = server.engine.stats();
    assert_eq!((stats.images, stats.items), (2, 5), "{stats:?}");
    drop(dir);
    server.shutdown().await.expect("clean shutdown");
}

fn formula_weights(kind: BackboneKind) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("w.safetensors");
    feature_server::weights::formula::write_safetensors(kind, &path).expect("formula weights");
    (dir, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_from_concurrent_streams_share_one_batch() {
    let server = TestServer::real(BackboneKind::MobileNetV2, small_config()).await;
    // Hold the engine so that all eight items are queued before it forms a batch.
    server.engine.pause();
    let mut streams = Vec::new();
    for s in 0..4u32 {
        let mut client = server.client().await;
        let requests = (0..2u32)
            .map(|i| request(format!("s{s}-{i}"), png(64, 48, s * 2 + i)))
            .collect();
        streams.push(tokio::spawn(async move {
            embed_all(&mut client, requests).await
        }));
    }
    let mut depth = server.engine.queue_depth();
    within("8 queued items", depth.wait_for(|d| *d == 8))
        .await
        .expect("depth");
    assert_eq!(server.engine.stats().batches, 0);
    server.engine.resume();
    for stream in streams {
        let answers = stream.await.expect("stream task");
        assert!(answers.end.is_none(), "{:?}", answers.end);
        assert_eq!(answers.items.len(), 2);
        assert!(answers.items.values().all(Result::is_ok));
    }
    let stats = server.engine.stats();
    assert_eq!(stats.items, 8);
    assert_eq!(stats.largest_batch, 8, "{stats:?}");
    assert_eq!(stats.batches, 1, "{stats:?}");
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_ten_thousand_items_is_answered_exactly_once_each() {
    let config = Config {
        max_batch: 16,
        queue_capacity: 64,
        max_inflight_per_stream: 32,
        ..small_config()
    };
    let server = TestServer::stand_in(config).await;
    let mut client = server.client().await;
    let image = png(8, 8, 7);
    let requests: Vec<_> = (0..10_000)
        .map(|i| request(i.to_string(), image.clone()))
        .collect();
    let answers = within("10,000 answers", embed_all(&mut client, requests)).await;
    assert!(answers.end.is_none(), "{:?}", answers.end);
    assert_eq!(answers.duplicates, 0);
    assert_eq!(answers.items.len(), 10_000);
    let ids: HashSet<_> = answers.items.keys().cloned().collect();
    assert!((0..10_000).all(|i| ids.contains(&i.to_string())));
    assert!(
        answers
            .items
            .values()
            .all(|a| a.as_ref().is_ok_and(|v| v.len() == 3))
    );
    let stats = server.engine.stats();
    assert_eq!(stats.items, 10_000);
    assert_eq!(stats.images, 10_000);
    assert!(stats.largest_batch <= 16, "{stats:?}");
    // The same counters reach operators through Info, per replica.
    let info = client
        .info(InfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.images_embedded, 10_000);
    assert_eq!(info.batches, stats.batches);
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_stream_frees_everything_and_others_are_served() {
    let server = TestServer::stand_in(small_config()).await;
    server.engine.pause();
    let mut client = server.client().await;
    let (tx, rx) = mpsc::channel(8);
    let response = client
        .embed(ReceiverStream::new(rx))
        .await
        .expect("stream accepted");
    for i in 0..3 {
        tx.send(request(format!("c{i}"), png(16, 16, i)))
            .await
            .expect("send");
    }
    let mut depth = server.engine.queue_depth();
    within("3 queued items", depth.wait_for(|d| *d == 3))
        .await
        .expect("depth");
    // Cancel: drop both halves of the call while its items sit in the queue.
    drop(response);
    drop(tx);
    let mut open = server.engine.open_streams();
    within("the stream to close", open.wait_for(|n| *n == 0))
        .await
        .expect("streams");
    server.engine.resume();
    within("the queue to drain", depth.wait_for(|d| *d == 0))
        .await
        .expect("depth");
    assert!(!server.engine.is_full());

    let answers = embed_all(&mut client, vec![request("after", png(16, 16, 9))]).await;
    assert!(answers.end.is_none(), "{:?}", answers.end);
    assert!(answers.items["after"].is_ok());
    // The cancelled items were skipped, not embedded for no one.
    assert_eq!(server.engine.stats().items, 1);
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_new_streams_while_existing_ones_wait() {
    let config = Config {
        queue_capacity: 4,
        max_batch: 2,
        ..small_config()
    };
    let server = TestServer::stand_in(config).await;
    server.engine.pause();
    let mut client = server.client().await;
    // Five items: four fill the queue, the fifth waits for a slot inside its stream.
    let requests = (0..5)
        .map(|i| request(format!("q{i}"), png(16, 16, i)))
        .collect();
    let mut first = client.clone();
    let waiting = tokio::spawn(async move { embed_all(&mut first, requests).await });
    let mut depth = server.engine.queue_depth();
    within("a full queue", depth.wait_for(|d| *d == 4))
        .await
        .expect("depth");
    assert!(server.engine.is_full());

    let refused = client
        .embed(tokio_stream::iter(vec![request("new", png(16, 16, 1))]))
        .await;
    let status = refused.expect_err("a new stream is refused while the queue is full");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("queue full: 4 images queued (--queue-capacity 4); retry later"),
        "{}",
        status.message()
    );

    server.engine.resume();
    let answers = within("the waiting stream", waiting)
        .await
        .expect("stream task");
    assert!(answers.end.is_none(), "{:?}", answers.end);
    assert_eq!(answers.items.len(), 5);
    assert!(answers.items.values().all(Result::is_ok));
    // And the server takes new streams again.
    let answers = embed_all(&mut client, vec![request("later", png(16, 16, 2))]).await;
    assert!(answers.items["later"].is_ok());
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_past_its_deadline_ends_with_deadline_exceeded() {
    let server = TestServer::stand_in(small_config()).await;
    server.engine.pause();
    let mut client = server.client().await;
    let (tx, rx) = mpsc::channel(8);
    tx.send(request("slow", png(16, 16, 1)))
        .await
        .expect("send");
    let mut call = tonic::Request::new(ReceiverStream::new(rx));
    call.set_timeout(Duration::from_millis(300));
    let response = client.embed(call).await.expect("stream accepted");
    let answers = within("the deadline", collect(response.into_inner())).await;
    let status = answers.end.expect("the stream ends with a status");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    drop(tx);
    server.engine.resume();
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_answers_items_in_flight() {
    let mut server = TestServer::stand_in(small_config()).await;
    server.engine.pause();
    let mut client = server.client().await;
    let (tx, rx) = mpsc::channel(8);
    let response = client
        .embed(ReceiverStream::new(rx))
        .await
        .expect("stream accepted");
    for i in 0..3 {
        tx.send(request(format!("g{i}"), png(16, 16, i)))
            .await
            .expect("send");
    }
    let mut depth = server.engine.queue_depth();
    within("3 queued items", depth.wait_for(|d| *d == 3))
        .await
        .expect("depth");
    server.begin_shutdown();
    server.engine.resume();
    let answers = within("the in-flight answers", collect(response.into_inner())).await;
    assert_eq!(answers.items.len(), 3);
    assert!(answers.items.values().all(Result::is_ok));
    // The client never closed its side: the server says why it stopped reading.
    let status = answers.end.expect("a closing status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    drop(tx);
    let addr = server.addr;
    server.shutdown().await.expect("clean shutdown");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}

/// A stand-in whose forward passes after the warm-up panic with a payload that panics again
/// when dropped: the batch's `catch_unwind` cannot contain it, as it could not contain a bug
/// outside the paths that catch panics.
struct DiesAfterWarmUp(std::sync::atomic::AtomicUsize);

struct PanicsWhenDropped;

impl Drop for PanicsWhenDropped {
    fn drop(&mut self) {
        panic!("a panic outside the caught paths");
    }
}

impl feature_server::engine::Model for DiesAfterWarmUp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            x.mean((2, 3))
        } else {
            std::panic::panic_any(PanicsWhenDropped)
        }
    }

    fn dim(&self) -> usize {
        3
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_thread_death_turns_health_not_serving_and_run_fails() {
    let server = TestServer::with_model(
        small_config(),
        Box::new(|_device: &Device| {
            let model = DiesAfterWarmUp(std::sync::atomic::AtomicUsize::new(0));
            Ok((
                Box::new(model) as Box<dyn feature_server::engine::Model>,
                STAND_IN_SHA.to_string(),
            ))
        }),
    )
    .await;
    let mut health = HealthClient::new(server.channel().await);
    let mut watch = serving_watch(&mut health, "taxon.v1.Features").await;

    let mut client = server.client().await;
    let answers = embed_all(&mut client, vec![request("doomed", png(32, 32, 1))]).await;
    let failed = match (answers.items.get("doomed"), &answers.end) {
        (Some(Err(item)), _) => item.code != Code::Ok as i32,
        (None, Some(_)) => true,
        _ => false,
    };
    assert!(
        failed,
        "the item must fail: {:?} {:?}",
        answers.items, answers.end
    );

    within("NOT_SERVING", async {
        loop {
            match watch.message().await {
                Ok(Some(update)) if update.status == ServingStatus::NotServing as i32 => return,
                Ok(Some(_)) => {}
                // The server went away after saying so, or without: both end here.
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    drop((watch, health, client));
    let result = server.shutdown().await;
    let message = result
        .expect_err("run must fail when the engine died")
        .to_string();
    assert!(
        message.contains("engine died") && message.contains("panic"),
        "{message}"
    );
}
