//! A stand-in feature-server for the head-trainer's own tests: the real `taxon.v1.Features`
//! contract over gRPC on 127.0.0.1:0, with embeddings derived from the image bytes' hash (no
//! backbone), and a queue of bounded capacity that answers RESOURCE_EXHAUSTED like the real
//! one when it is full, so that backpressure can be tested deterministically and fast.

#![allow(dead_code)]

pub mod http;
pub mod postgres;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use taxon_proto::v1::features_server::{Features, FeaturesServer};
use taxon_proto::v1::{
    EmbedRequest, EmbedResponse, Embedding, InfoRequest, ItemError, ModelInfo, embed_response,
};
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

/// The model identity the fake serves.
pub const MODEL: &str = "fake@sha256:00";
/// Length of its embeddings.
pub const DIM: usize = 16;

/// What the fake has seen, for assertions.
#[derive(Default)]
pub struct Counters {
    /// Items embedded.
    pub embedded: AtomicU64,
    /// Items refused with RESOURCE_EXHAUSTED (queue full).
    pub refused: AtomicU64,
    /// Items being embedded right now, and the most at once.
    pub inflight: AtomicUsize,
    /// The `traceparent` of every Embed call, in arrival order.
    pub traceparents: std::sync::Mutex<Vec<Option<String>>>,
    pub peak_inflight: AtomicUsize,
    /// Milliseconds each item takes; changeable while serving.
    pub work_ms: AtomicU64,
}

#[derive(Clone)]
struct Fake {
    capacity: usize,
    counters: Arc<Counters>,
}

/// A running fake feature-server.
pub struct FakeFeatures {
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl FakeFeatures {
    /// Serves on 127.0.0.1:0; at most `capacity` items are worked on at once (each takes
    /// `work`), the rest are refused as the real server refuses a full queue.
    pub async fn start(capacity: usize, work: Duration) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        Self::serve(listener, capacity, work).await
    }

    /// Serves on an already bound listener (to come back on the same address).
    pub async fn serve(listener: tokio::net::TcpListener, capacity: usize, work: Duration) -> Self {
        let addr = listener.local_addr().expect("addr");
        let counters = Arc::new(Counters::default());
        counters
            .work_ms
            .store(work.as_millis() as u64, Ordering::SeqCst);
        let fake = Fake {
            capacity,
            counters: Arc::clone(&counters),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(FeaturesServer::new(fake))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
        });
        Self {
            addr,
            counters,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving and closes every connection.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(mut t) = self.task.take() {
            // Graceful first (connections close once idle), then by force.
            if tokio::time::timeout(Duration::from_secs(5), &mut t)
                .await
                .is_err()
            {
                t.abort();
                let _ = t.await;
            }
        }
    }
}

/// The fake's embedding of `image`: a unit vector from its hash, the same every time.
pub fn embedding_of(image: &[u8]) -> Vec<f32> {
    let h = Sha256::digest(image);
    let v: Vec<f32> = (0..DIM).map(|i| f32::from(h[i]) - 127.5).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
    v.into_iter().map(|x| x / n).collect()
}

type EmbedStream = Pin<Box<dyn Stream<Item = Result<EmbedResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Features for Fake {
    type EmbedStream = EmbedStream;

    async fn embed(
        &self,
        request: Request<Streaming<EmbedRequest>>,
    ) -> Result<Response<Self::EmbedStream>, Status> {
        let traceparent = request
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        self.counters.traceparents.lock().unwrap().push(traceparent);
        let this = self.clone();
        let out = request.into_inner().then(move |item| {
            let this = this.clone();
            async move {
                let item = item?;
                let c = &this.counters;
                let now = c.inflight.fetch_add(1, Ordering::SeqCst) + 1;
                let result = if now > this.capacity {
                    c.refused.fetch_add(1, Ordering::SeqCst);
                    embed_response::Result::Error(ItemError {
                        code: tonic::Code::ResourceExhausted as i32,
                        message: format!(
                            "queue full: {} images queued (--queue-capacity {}); retry later",
                            this.capacity, this.capacity
                        ),
                    })
                } else {
                    c.peak_inflight.fetch_max(now, Ordering::SeqCst);
                    let work = Duration::from_millis(c.work_ms.load(Ordering::SeqCst));
                    tokio::time::sleep(work).await; // the cost of a forward pass
                    c.embedded.fetch_add(1, Ordering::SeqCst);
                    embed_response::Result::Embedding(Embedding {
                        values: embedding_of(&item.image),
                        model: taxon_proto::embedding_identity(
                            MODEL,
                            taxon_proto::v1::ViewSet::try_from(item.views)
                                .unwrap_or(taxon_proto::v1::ViewSet::Center),
                        ),
                    })
                };
                c.inflight.fetch_sub(1, Ordering::SeqCst);
                Ok(EmbedResponse {
                    id: item.id,
                    result: Some(result),
                })
            }
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<ModelInfo>, Status> {
        Ok(Response::new(ModelInfo {
            backbone: "fake".into(),
            dim: DIM as u32,
            weights_sha256: "00".into(),
            device: "cpu".into(),
            max_batch: 8,
            model: MODEL.into(),
            max_wait_ms: 0,
            max_image_bytes: 64 << 20,
            max_image_pixels: 40_000_000,
            ..Default::default()
        }))
    }
}

/// Starts a head-trainer in-process on 127.0.0.1:0 with `config`; `stop` shuts it down.
pub struct Trainer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<head_trainer::Result<()>>,
}

impl Trainer {
    pub async fn start(config: head_trainer::Config) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(head_trainer::run(listener, config, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// [`Trainer::start`] with the HTTP face on its own 127.0.0.1:0 too; returns its address.
    pub async fn start_with_http(config: head_trainer::Config) -> (Self, SocketAddr) {
        let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
        let (listener, http) = (bind().await.expect("bind"), bind().await.expect("bind"));
        let (addr, http_addr) = (listener.local_addr().unwrap(), http.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let listeners = head_trainer::Listeners {
            grpc: listener,
            metrics: None,
            http: Some(http),
        };
        let task = tokio::spawn(head_trainer::run_on(listeners, config, async {
            let _ = stopped.await;
        }));
        let trainer = Self {
            addr,
            stop: Some(stop),
            task,
        };
        (trainer, http_addr)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends the shutdown signal (like SIGTERM) without waiting.
    pub fn signal_stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    pub fn client(
        &self,
    ) -> taxon_proto::v1::classifier_client::ClassifierClient<tonic::transport::Channel> {
        taxon_proto::v1::classifier_client::ClassifierClient::new(channel(self.addr))
            .max_encoding_message_size(256 << 20)
            .max_decoding_message_size(256 << 20)
    }
}

pub fn channel(addr: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_lazy()
}

/// Waits (watching, not polling) until `service` on `addr` reports `want`; fails after 60 s.
pub async fn wait_health(addr: SocketAddr, service: &str, want: i32) {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let watched = HealthClient::new(channel(addr))
                .watch(HealthCheckRequest {
                    service: service.to_string(),
                })
                .await;
            let Ok(stream) = watched else {
                tokio::task::yield_now().await;
                continue;
            };
            let mut stream = stream.into_inner();
            while let Ok(Some(msg)) = stream.message().await {
                if msg.status == want {
                    return;
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{service:?} never reported {want}"));
}

/// The messages of an Enroll of `images` as `class`.
pub fn enroll_messages(class: &str, images: Vec<Vec<u8>>) -> Vec<taxon_proto::v1::EnrollRequest> {
    use taxon_proto::v1::{EnrollRequest, EnrollStart, Photo, enroll_request};
    let mut msgs = vec![EnrollRequest {
        item: Some(enroll_request::Item::Start(EnrollStart {
            class_name: class.to_string(),
            parent: String::new(),
            wait_for_head: false,
        })),
    }];
    for (i, image) in images.into_iter().enumerate() {
        msgs.push(EnrollRequest {
            item: Some(enroll_request::Item::Photo(Photo {
                id: format!("p{i}"),
                image: image.into(),
            })),
        });
    }
    msgs
}

/// `n` distinct photos of `bytes` each (the fake never decodes them).
pub fn blobs(tag: &str, n: usize, bytes: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let mut v = format!("{tag}/{i}/").into_bytes();
            v.resize(bytes.max(v.len()), (i % 251) as u8);
            v
        })
        .collect()
}

/// A head-trainer config for the fake at `url`, storing in `dir`.
pub fn config(url: &str, dir: &std::path::Path) -> head_trainer::Config {
    let mut c = head_trainer::Config::new(vec![url.to_string()], dir);
    c.views = taxon_proto::v1::ViewSet::Center;
    c.probe_interval = Duration::from_millis(100);
    c
}

/// Starts the real `head-trainer` binary on 127.0.0.1:0 against `features`, with `store` (its
/// `--data DIR` or `--database-url URL` flags), and returns it with the address it logged:
/// for tests that must SIGKILL it.
pub fn spawn_head_trainer(
    features: &str,
    store: &[&std::ffi::OsStr],
) -> (std::process::Child, String) {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_head-trainer"))
        .args(["--listen", "127.0.0.1:0", "--features-url", features])
        .args(store)
        .args(["--views", "center", "--probe-interval-s", "0.2"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start head-trainer");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        // Read to the end, so the child never writes to a closed pipe.
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if !sent && let Some(at) = line.find("listen=") {
                let addr: String = line[at + 7..]
                    .chars()
                    .take_while(|c| !c.is_whitespace())
                    .collect();
                let _ = tx.send(addr);
                sent = true;
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("head-trainer logged its address");
    (child, addr)
}
