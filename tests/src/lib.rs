//! Helpers for the cross-service tests and benchmarks: both services in-process on
//! 127.0.0.1:0, synthetic images, and small client conveniences.
//!
//! Synchronisation is by events (health watches, replies), never by sleeping; every wait has
//! a generous bound ([`within`]) so that a bug fails a test instead of hanging it.

pub mod webdriver;

use std::future::Future;
use std::io::Cursor;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use feature_server::models::BackboneKind;
use taxon_proto::v1::classifier_client::ClassifierClient;
use taxon_proto::v1::{EnrollRequest, EnrollResponse, EnrollStart, Photo, enroll_request};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Awaits a future that must complete, failing (not hanging) after two minutes.
pub async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(120), future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Runs the `client` command line `args` in-process (what a user types, after `client`):
/// its outcome and what it printed.
pub async fn run_client(args: &[&str]) -> (taxon_client::Result<taxon_client::Outcome>, String) {
    let cli =
        taxon_client::Cli::try_from_args(std::iter::once("client").chain(args.iter().copied()))
            .expect("valid command line");
    let mut out = Vec::new();
    let r = within("the client command", taxon_client::execute(cli, &mut out)).await;
    (r, String::from_utf8(out).expect("utf-8 output"))
}

/// A service running on its own task, stopped by [`Running::stop`] (or on drop).
pub struct Running<E> {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), E>>>,
}

impl<E: std::fmt::Debug> Running<E> {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Graceful shutdown: waits until the service's `run` returned.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            within("the service to stop", t)
                .await
                .expect("service task")
                .expect("service run");
        }
    }
}

impl<E> Drop for Running<E> {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

fn spawn<E, F>(
    listener: tokio::net::TcpListener,
    run: impl FnOnce(tokio::net::TcpListener, oneshot::Receiver<()>) -> F,
) -> Running<E>
where
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: Send + 'static,
{
    let addr = listener.local_addr().expect("local addr");
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(run(listener, stopped));
    Running {
        addr,
        stop: Some(stop),
        task: Some(task),
    }
}

/// Writes the deterministic "formula" weights of `kind` (no download) into `dir`.
pub fn formula_weights(kind: BackboneKind, dir: &Path) -> PathBuf {
    let path = dir.join(format!("{kind}.safetensors"));
    if !path.exists() {
        feature_server::weights::formula::write_safetensors(kind, &path).expect("formula weights");
    }
    path
}

/// Starts a feature-server with `weights` on this runtime and waits until it serves.
pub async fn start_feature_server(
    kind: BackboneKind,
    weights: PathBuf,
) -> Running<feature_server::Error> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let config = feature_server::Config {
        backbone: kind,
        weights,
        ..feature_server::Config::default()
    };
    let running = start_feature_server_with(listener, config);
    wait_serving(running.addr, "").await;
    running
}

/// Starts a feature-server with `config` on `listener`, without waiting for it (a TLS server
/// cannot be asked over [`channel`]'s plaintext).
pub fn start_feature_server_with(
    listener: tokio::net::TcpListener,
    config: feature_server::Config,
) -> Running<feature_server::Error> {
    spawn(listener, move |l, stopped| async move {
        feature_server::run(l, config, async move {
            let _ = stopped.await;
        })
        .await
    })
}

/// One MobileNetV2 feature-server (formula weights) shared by every test of a binary, on its
/// own runtime thread so that it outlives each test's runtime. Returns its URL.
pub fn shared_feature_server() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let dir = tempfile::tempdir().expect("tempdir");
                let weights = formula_weights(BackboneKind::MobileNetV2, dir.path());
                let running = start_feature_server(BackboneKind::MobileNetV2, weights).await;
                tx.send(running.url()).expect("send url");
                std::future::pending::<()>().await;
                drop((running, dir));
            });
        });
        rx.recv().expect("feature-server started")
    })
    .clone()
}

/// Starts a head-trainer with `config` on this runtime (it does not wait for health: a
/// head-trainer without a reachable feature-server never serves, which some tests want).
pub async fn start_head_trainer(config: head_trainer::Config) -> Running<head_trainer::Error> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    spawn(listener, move |l, stopped| async move {
        head_trainer::run(l, config, async move {
            let _ = stopped.await;
        })
        .await
    })
}

/// [`start_head_trainer`] with the HTTP face (and the page) on its own 127.0.0.1:0 too;
/// returns the service and the HTTP address.
pub async fn start_head_trainer_http(
    config: head_trainer::Config,
) -> (Running<head_trainer::Error>, SocketAddr) {
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let http = bind().await.expect("bind");
    let http_addr = http.local_addr().expect("local addr");
    let running = spawn(
        bind().await.expect("bind"),
        move |grpc, stopped| async move {
            let listeners = head_trainer::Listeners {
                grpc,
                metrics: None,
                http: Some(http),
            };
            head_trainer::run_on(listeners, config, async move {
                let _ = stopped.await;
            })
            .await
        },
    );
    (running, http_addr)
}

/// A channel to `addr` (connects lazily).
pub fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_lazy()
}

/// Waits (watching, not polling) until `service` on `addr` reports SERVING.
pub async fn wait_serving(addr: SocketAddr, service: &str) {
    within("health SERVING", async {
        loop {
            let mut health = HealthClient::new(channel(addr));
            let watched = health
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
                if msg.status == ServingStatus::Serving as i32 {
                    return;
                }
            }
        }
    })
    .await
}

/// The current health of `service` on `addr`.
pub async fn health(addr: SocketAddr, service: &str) -> ServingStatus {
    let resp = HealthClient::new(channel(addr))
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .expect("health check");
    ServingStatus::try_from(resp.into_inner().status).unwrap_or(ServingStatus::Unknown)
}

/// A Classifier client.
pub fn classifier(addr: SocketAddr) -> ClassifierClient<Channel> {
    ClassifierClient::new(channel(addr))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// Wraps a message in a request carrying `metadata` pairs (e.g. `x-tenant`, `authorization`).
pub fn request<T>(msg: T, metadata: &[(&'static str, &str)]) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    for (k, v) in metadata {
        r.metadata_mut()
            .insert(*k, v.parse().expect("ascii metadata"));
    }
    r
}

/// The messages of an Enroll: start, then one photo per image (ids `p0`, `p1`, ...).
pub fn enroll_messages(
    class: &str,
    parent: &str,
    wait_for_head: bool,
    images: Vec<Vec<u8>>,
) -> Vec<EnrollRequest> {
    let mut msgs = vec![EnrollRequest {
        item: Some(enroll_request::Item::Start(EnrollStart {
            class_name: class.to_string(),
            parent: parent.to_string(),
            wait_for_head,
        })),
    }];
    msgs.extend(
        images
            .into_iter()
            .enumerate()
            .map(|(i, image)| EnrollRequest {
                item: Some(enroll_request::Item::Photo(Photo {
                    id: format!("p{i}"),
                    image: image.into(),
                })),
            }),
    );
    msgs
}

/// Enrolls `images` as `class` (under `parent`, may be empty) for the tenant in `metadata`.
pub async fn enroll(
    client: &mut ClassifierClient<Channel>,
    metadata: &[(&'static str, &str)],
    class: &str,
    parent: &str,
    wait_for_head: bool,
    images: Vec<Vec<u8>>,
) -> Result<EnrollResponse, tonic::Status> {
    let msgs = enroll_messages(class, parent, wait_for_head, images);
    client
        .enroll(request(tokio_stream::iter(msgs), metadata))
        .await
        .map(tonic::Response::into_inner)
}

/// Synthetic photos whose classes are easy to tell apart: `n` PNGs of a pattern in a colour,
/// each with its own seeded speckle so that no two have the same bytes.
pub fn photos(pattern: Pattern, rgb: [u8; 3], n: usize, seed: u64) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| png(pattern, rgb, seed * 1000 + i as u64))
        .collect()
}

/// Image patterns.
#[derive(Clone, Copy, Debug)]
pub enum Pattern {
    Solid,
    /// Horizontal stripes of the colour and black, 8 px.
    Stripes,
    /// Black and white 4 px checkerboard, colour ignored.
    Checker,
}

/// One 96x96 PNG.
pub fn png(pattern: Pattern, rgb: [u8; 3], seed: u64) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let img = image::RgbImage::from_fn(96, 96, |x, y| {
        let base = match pattern {
            Pattern::Solid => rgb,
            Pattern::Stripes => {
                if (y / 8) % 2 == 0 {
                    rgb
                } else {
                    [0, 0, 0]
                }
            }
            Pattern::Checker => {
                if (x / 4 + y / 4) % 2 == 0 {
                    [255, 255, 255]
                } else {
                    [0, 0, 0]
                }
            }
        };
        let mut jitter = |c: u8| c.saturating_add_signed(rng.random_range(-6i8..=6));
        image::Rgb([jitter(base[0]), jitter(base[1]), jitter(base[2])])
    });
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("png");
    out.into_inner()
}
