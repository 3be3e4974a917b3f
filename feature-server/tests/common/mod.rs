//! Shared by the feature-server's gRPC tests: an in-process server on 127.0.0.1:0, formula
//! weights in a tempdir, synthetic images, and a client that collects a stream's answers.
//!
//! Synchronisation is by events only (health watches, the engine's queue-depth and
//! open-stream watches, the pause gate), never by sleeping.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use candle_core::{Device, Tensor};
use feature_server::engine::{Engine, Model};
use feature_server::models::BackboneKind;
use feature_server::{Config, Server};
use taxon_proto::v1::embed_response::Result as Answer;
use taxon_proto::v1::features_client::FeaturesClient;
use taxon_proto::v1::{EmbedRequest, ItemError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// Waits on a future that must happen, failing the test (instead of hanging it) if it never
/// does. The bound is generous: it is a safety net, not a synchronisation.
pub async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(120), future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A server running in this process, with its engine handle for pausing and watching.
pub struct TestServer {
    pub addr: SocketAddr,
    pub engine: Engine,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<feature_server::error::Result<()>>,
    _dir: Option<tempfile::TempDir>,
}

impl TestServer {
    /// A server over the deterministic "formula" weights of `kind`, written to a tempdir.
    pub async fn real(kind: BackboneKind, config: Config) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let weights = dir.path().join(format!("{kind}.safetensors"));
        feature_server::weights::formula::write_safetensors(kind, &weights)
            .expect("formula weights");
        let config = Config {
            backbone: kind,
            weights,
            ..config
        };
        let server = Server::new(config).expect("server config");
        Self::start(server, Some(dir)).await
    }

    /// A server whose model is [`ChannelMeans`]: the real queue, batcher and service at a tiny
    /// fraction of a backbone's cost.
    pub async fn stand_in(config: Config) -> Self {
        let server = Server::with_model(
            config,
            Box::new(|_device: &Device| {
                Ok((
                    Box::new(ChannelMeans) as Box<dyn Model>,
                    STAND_IN_SHA.to_string(),
                ))
            }),
        )
        .expect("server config");
        Self::start(server, None).await
    }

    /// A server whose model comes from `loader`.
    pub async fn with_model(config: Config, loader: feature_server::engine::Loader) -> Self {
        let server = Server::with_model(config, loader).expect("server config");
        Self::start(server, None).await
    }

    async fn start(server: Server, dir: Option<tempfile::TempDir>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let engine = server.engine().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(listener, async move {
            let _ = stopped.await;
        }));
        within("the model to load", engine.ready())
            .await
            .expect("engine ready");
        Self {
            addr,
            engine,
            stop: Some(stop),
            task,
            _dir: dir,
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn client(&self) -> FeaturesClient<Channel> {
        FeaturesClient::new(self.channel().await).max_decoding_message_size(64 * 1024 * 1024)
    }

    /// Asks the server to shut down without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Shuts down and returns what `serve` returned.
    pub async fn shutdown(mut self) -> feature_server::error::Result<()> {
        self.begin_shutdown();
        within("the server to stop", &mut self.task)
            .await
            .expect("server task")
    }
}

pub const STAND_IN_SHA: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Stand-in model: the mean of each normalized channel, so an embedding still depends on the
/// image (dim 3) while a batch costs microseconds.
pub struct ChannelMeans;

impl Model for ChannelMeans {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.mean((2, 3))
    }

    fn dim(&self) -> usize {
        3
    }
}

/// A small test config: quick batches, tiny queue.
pub fn small_config() -> Config {
    Config {
        max_batch: 8,
        max_wait: Duration::from_millis(2),
        queue_capacity: 32,
        max_inflight_per_stream: 16,
        decode_threads: 2,
        ..Config::default()
    }
}

pub mod images;
#[allow(unused_imports)] // each test binary uses its own few of them
pub use images::{encode, jpeg, picture, png};

pub fn request(id: impl Into<String>, image: Vec<u8>) -> EmbedRequest {
    EmbedRequest {
        id: id.into(),
        image: image.into(),
        ..Default::default()
    }
}

/// Every answer of one stream by id, and the status the stream ended with (`None` for OK).
pub struct Answers {
    pub items: HashMap<String, Result<Vec<f32>, ItemError>>,
    pub models: Vec<String>,
    pub duplicates: usize,
    pub end: Option<tonic::Status>,
}

/// Sends `requests` on one stream and collects everything that comes back.
pub async fn embed_all(
    client: &mut FeaturesClient<Channel>,
    requests: Vec<EmbedRequest>,
) -> Answers {
    let response = client
        .embed(tokio_stream::iter(requests))
        .await
        .expect("stream accepted");
    collect(response.into_inner()).await
}

/// Reads a response stream to its end.
pub async fn collect(mut stream: tonic::Streaming<taxon_proto::v1::EmbedResponse>) -> Answers {
    let mut answers = Answers {
        items: HashMap::new(),
        models: Vec::new(),
        duplicates: 0,
        end: None,
    };
    loop {
        match stream.message().await {
            Ok(Some(response)) => {
                let answer = match response.result {
                    Some(Answer::Embedding(e)) => {
                        answers.models.push(e.model);
                        Ok(e.values)
                    }
                    Some(Answer::Error(e)) => Err(e),
                    None => panic!("response {} carries no result", response.id),
                };
                if answers.items.insert(response.id, answer).is_some() {
                    answers.duplicates += 1;
                }
            }
            Ok(None) => break,
            Err(status) => {
                answers.end = Some(status);
                break;
            }
        }
    }
    answers
}

/// Path of a fixture image from the model engineer's parity fixtures.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/images")
        .join(name)
}

/// Largest absolute difference, relative to the larger norm.
pub fn relative_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "embedding lengths differ");
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let max = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    max / norm(a).max(norm(b)).max(f32::EPSILON)
}
