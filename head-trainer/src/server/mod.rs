//! Wiring and lifecycle: store, feature-server client, trainer, service, health, reflection,
//! and a graceful shutdown.
//!
//! Health, for orchestrators (grpc.health.v1):
//! - `""` (liveness): SERVING while the process works (the store is open and requests are
//!   served); NOT_SERVING once it drains on shutdown. Restart the process when it fails.
//! - `taxon.v1.Classifier` (readiness): SERVING while a feature-server answers (the probe of
//!   `features`, every `--probe-interval-s`) and the model identity is known; NOT_SERVING when
//!   none answers (classes can still be listed, renamed and removed, but not enrolled or
//!   classified) and while draining. Route traffic by it; do not restart on it.
//!
//! On shutdown: both statuses turn NOT_SERVING, the server stops accepting, and requests in
//! flight get `shutdown_grace` to finish; then streams still open (an idle Enroll, a slow
//! ClassifyStream) are cut with UNAVAILABLE, so an idle client cannot hold a SIGTERM off.
//! Nothing acknowledged is lost by the cut: an enroll writes its class in one transaction at
//! its very end, or not at all. A running training job then gets the same grace to save its
//! head (a whole head in one transaction, or nothing) before the store is closed.

mod severable;

use std::future::Future;
use std::sync::Arc;

use std::time::Duration;

use taxon_proto::v1::classifier_server::ClassifierServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use taxon_ops::grpc_metrics::{GrpcMetricsLayer, Recorder};
use taxon_ops::metrics_http;

use crate::config::Config;
use crate::core::Core;
use crate::features::{EmbeddingSource, FeatureClient, Timeouts};
use crate::http;
use crate::service::{Auth, ClassifierService};
use crate::store::{PostgresStore, RedbStore, Store};
use crate::{Error, Result};
use futures::StreamExt;
use severable::Severable;

/// The sockets a head-trainer serves on: gRPC always; Prometheus metrics
/// (`--metrics-listen`) and the HTTP/JSON API with its web page (`--http-listen`) when given.
pub struct Listeners {
    pub grpc: TcpListener,
    pub metrics: Option<TcpListener>,
    pub http: Option<TcpListener>,
}

impl Listeners {
    /// gRPC only.
    pub fn grpc(grpc: TcpListener) -> Self {
        Self {
            grpc,
            metrics: None,
            http: None,
        }
    }
}

/// Serves `taxon.v1.Classifier` on `listener` until `shutdown` completes, with embeddings
/// from the feature-servers of `config.features_urls`.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    run_on(Listeners::grpc(listener), config, shutdown).await
}

/// [`run`] on every listener of `listeners`.
pub async fn run_on(
    listeners: Listeners,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    config.validate()?;
    let features = FeatureClient::connect(
        &config.features_urls,
        Timeouts {
            connect: config.connect_timeout,
            request: config.request_timeout,
            probe: config.probe_interval,
            resolve: config.resolve_interval,
        },
        (config.max_photo_bytes + (1 << 20)).max(64 << 20),
        config.views,
        &config.features_tls,
    )?;
    serve(listeners, config, features, shutdown).await
}

/// [`run`] with any source of embeddings (tests use a fake).
pub async fn run_with_source(
    listener: TcpListener,
    config: Config,
    features: Arc<dyn EmbeddingSource>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    serve(Listeners::grpc(listener), config, features, shutdown).await
}

/// The methods served here, the only values of the metrics' `rpc` label (others: `other`).
const KNOWN_METHODS: [&str; 11] = [
    "taxon.v1.Classifier/Enroll",
    "taxon.v1.Classifier/Classify",
    "taxon.v1.Classifier/ClassifyStream",
    "taxon.v1.Classifier/ListClasses",
    "taxon.v1.Classifier/RemoveClass",
    "taxon.v1.Classifier/RenameClass",
    "taxon.v1.Classifier/Train",
    "grpc.health.v1.Health/Check",
    "grpc.health.v1.Health/Watch",
    "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Everything [`run_on`] does, with any source of embeddings.
pub async fn serve(
    listeners: Listeners,
    config: Config,
    features: Arc<dyn EmbeddingSource>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    config.validate()?;
    let auth = match &config.tokens_file {
        Some(path) => Auth::from_file(path)?,
        None => Auth::open(),
    };
    let Listeners {
        grpc: listener,
        metrics,
        http,
    } = listeners;
    let tls = config
        .tls
        .config()
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    // The HTTP face speaks HTTP/1.1 only (axum is built without h2).
    let http_tls = taxon_ops::tls::rustls_server_config(&config.tls, &[b"http/1.1"])
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let store = open_store(&config).await?;
    let addr = listener.local_addr().ok();
    tracing::info!(
        ?addr,
        features = ?config.features_urls,
        store = %store_name(&config),
        tokens = auth.enabled(),
        tls = config.tls.enabled(),
        mutual_tls = config.tls.client_ca.is_some(),
        default_head = %config.default_head,
        classify_cache_entries = config.classify_cache_entries,
        max_photo_bytes = config.max_photo_bytes,
        thresholds = ?config.thresholds,
        train = ?config.train,
        "head-trainer starting"
    );
    let grace = config.shutdown_grace;
    // A photo a quarter over the limit (at least 1 MiB over) is still read, so that it is
    // refused as one item and the rest of its stream goes on; a larger message ends its
    // stream with the limit named. What streams read before admission is bounded by this
    // times --max-concurrent-uploads (inflight.rs).
    let max_message = config.max_photo_bytes + (config.max_photo_bytes / 4).max(1 << 20);
    let cut = CancellationToken::new();
    let core = Arc::new(Core::new(config, store, Arc::clone(&features)));
    let following = core.follow_store()?;
    let auth = Arc::new(auth);
    let metrics_stop = CancellationToken::new();
    let metrics_task = metrics.map(|listener| {
        // Weak: a scrape connection left open must not keep the core (and the store) alive.
        let core = Arc::downgrade(&core);
        let render = Arc::new(move || {
            let core = core.upgrade();
            async move {
                match core {
                    Some(c) => c.render_metrics().await,
                    None => String::new(),
                }
            }
        });
        tokio::spawn(metrics_http::serve(
            listener,
            render,
            metrics_stop.clone().cancelled_owned(),
        ))
    });
    // The recorder holds the metrics only: a response body dropped after `run` returns (a
    // severed connection) must not keep the core, and so the store, open.
    let calls = core.metrics().calls.clone();
    let record: Recorder = Arc::new(move |rpc, code, took| calls.record(rpc, code, took));

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    reporter
        .set_not_serving::<ClassifierServer<ClassifierService>>()
        .await;
    let draining = CancellationToken::new();
    let mut health_task = tokio::spawn(readiness(
        reporter.clone(),
        Arc::clone(&features),
        draining.clone(),
    ));

    // Only what this server implements: the descriptor set also describes `Features`.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(taxon_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("taxon.v1.Classifier")
            .with_service_name("grpc.health.v1.Health")
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| Error::InvalidArgument(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| Error::InvalidArgument(format!("reflection: {e}")))?;

    let service = ClassifierServer::new(ClassifierService::new(Arc::clone(&core), cut.clone()))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    // Authentication before any method: the tenant travels in the request's extensions.
    let http_task = http.map(|listener| {
        let api = http::Api::new(&core, Arc::clone(&auth), draining.clone(), cut.clone());
        tokio::spawn(http::serve(
            listener,
            http_tls,
            Arc::new(api),
            draining.clone().cancelled_owned(),
        ))
    });
    let service = InterceptedService::new(service, move |req| auth.intercept(req));
    let stop_accepting = draining.clone();
    let sever = CancellationToken::new();
    let cuttable = sever.clone();
    let incoming = TcpListenerStream::new(listener)
        .map(move |conn| conn.map(|c| Severable::new(c, &cuttable)));
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| Error::InvalidArgument(format!("TLS: {e}")))?;
    }
    let mut served = tokio::spawn(
        builder
            .layer(GrpcMetricsLayer::new(&KNOWN_METHODS, record))
            .trace_fn(|req| {
                tracing::info_span!(
                    "grpc",
                    path = %req.uri().path(),
                    trace_id = tracing::field::Empty
                )
            })
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, stop_accepting.cancelled_owned()),
    );
    let early = tokio::select! {
        r = &mut served => Some(r),
        () = shutdown => None,
    };
    let served = match early {
        Some(r) => r,
        None => {
            tracing::info!(
                grace_s = grace.as_secs_f64(),
                "shutting down: draining requests in flight"
            );
            draining.cancel();
            health_task.abort();
            let _ = (&mut health_task).await; // no readiness update may land after ours
            reporter
                .set_service_status("", ServingStatus::NotServing)
                .await;
            reporter
                .set_not_serving::<ClassifierServer<ClassifierService>>()
                .await;
            let grace_ends = tokio::time::Instant::now() + grace;
            let served = drain(&mut served, grace, &cut, &sever).await;
            if let Some(task) = http_task {
                drain_http(task, grace_ends, &cut).await;
            }
            served
        }
    };
    health_task.abort();
    following.abort();
    let _ = following.await; // it holds the core
    tracing::info!("no longer serving; waiting for training jobs");
    core.shutdown(grace).await;
    // Scrapes go on through the drain, then get a second to finish.
    metrics_stop.cancel();
    if let Some(mut task) = metrics_task
        && tokio::time::timeout(Duration::from_secs(1), &mut task)
            .await
            .is_err()
    {
        task.abort();
    }
    drop(core);
    served
        .map_err(|e| Error::Unavailable(format!("server task: {e}")))?
        .map_err(|e| Error::Unavailable(format!("server: {e}")))?;
    tracing::info!("head-trainer stopped");
    Ok(())
}

/// The store the config names: PostgreSQL with a database URL, the embedded redb otherwise.
async fn open_store(config: &Config) -> Result<Arc<dyn Store>> {
    let (url, options, data_dir, cache) = (
        config.database_url.clone(),
        config.database.clone(),
        config.data_dir.clone(),
        config.store_cache_bytes,
    );
    tokio::task::spawn_blocking(move || -> Result<Arc<dyn Store>> {
        Ok(match url {
            Some(url) => Arc::new(PostgresStore::connect(&url, &options)?),
            None => Arc::new(RedbStore::open_with_cache(&data_dir, cache)?),
        })
    })
    .await
    .map_err(|e| Error::Store(e.to_string()))?
}

/// The store, for the log (never the database password).
fn store_name(config: &Config) -> String {
    match &config.database_url {
        Some(url) => crate::store::describe_postgres(url),
        None => format!(
            "redb in {} (page cache {} MiB)",
            config.data_dir.display(),
            config.store_cache_bytes >> 20
        ),
    }
}

/// Waits `grace` for requests in flight to finish, then cuts the requests still running
/// (they end with UNAVAILABLE) and gives them a second to say so, then severs the connections
/// still open (a health `Watch`, a client that never closes its stream).
async fn drain<T>(
    served: &mut tokio::task::JoinHandle<T>,
    grace: Duration,
    cut: &CancellationToken,
    sever: &CancellationToken,
) -> std::result::Result<T, tokio::task::JoinError> {
    if let Ok(r) = tokio::time::timeout(grace, &mut *served).await {
        return r;
    }
    tracing::warn!("grace period over: cutting the requests still running");
    cut.cancel();
    if let Ok(r) = tokio::time::timeout(Duration::from_secs(1), &mut *served).await {
        return r;
    }
    tracing::warn!("closing the connections still open");
    sever.cancel();
    (&mut *served).await
}

/// The HTTP face drains like gRPC: requests in flight get what is left of the grace period,
/// then the cut, then a second; a connection still open after that is dropped with the task.
async fn drain_http(
    mut task: tokio::task::JoinHandle<std::io::Result<()>>,
    grace_ends: tokio::time::Instant,
    cut: &CancellationToken,
) {
    if tokio::time::timeout_at(grace_ends, &mut task)
        .await
        .is_err()
    {
        cut.cancel();
        if tokio::time::timeout(Duration::from_secs(1), &mut task)
            .await
            .is_err()
        {
            tracing::warn!("closing the HTTP connections still open");
            task.abort();
        }
    }
}

/// Keeps `taxon.v1.Classifier` SERVING exactly while a feature-server answers and the model
/// identity is known, until the server drains.
async fn readiness(
    reporter: HealthReporter,
    features: Arc<dyn EmbeddingSource>,
    draining: CancellationToken,
) {
    let mut info = features.info();
    let mut reachable = features.reachable();
    loop {
        if draining.is_cancelled() {
            return;
        }
        let ready = info.borrow_and_update().is_some() && *reachable.borrow_and_update();
        if ready {
            reporter
                .set_serving::<ClassifierServer<ClassifierService>>()
                .await;
        } else {
            reporter
                .set_not_serving::<ClassifierServer<ClassifierService>>()
                .await;
        }
        tokio::select! {
            r = info.changed() => if r.is_err() { return },
            r = reachable.changed() => if r.is_err() { return },
            () = draining.cancelled() => return,
        }
    }
}
