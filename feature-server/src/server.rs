//! `run(listener, config, shutdown)`: the whole server on a listener the caller bound, so tests
//! run it in-process on 127.0.0.1:0 (mini-redis style) and `main` only adds flags and signals.
//!
//! Order of events: the engine thread starts loading at once and health answers NOT_SERVING;
//! after the warm-up batch, health turns SERVING for `taxon.v1.Features` and `""`. When
//! `shutdown` resolves: health turns NOT_SERVING, no new connections or streams are accepted,
//! open streams stop reading and answer the items they hold, the engine drains its queue, and
//! `run` returns. If the engine thread dies while serving, health turns NOT_SERVING at once,
//! the server stops, and `run` returns the error (so `main` exits non-zero and an orchestrator
//! restarts the process).

use std::future::Future;
use std::sync::Arc;

use taxon_ops::grpc_metrics::GrpcMetricsLayer;
use taxon_proto::v1::features_server::FeaturesServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::config::Config;
use crate::engine::{Engine, Loader};
use crate::error::{Error, Result};
use crate::service::FeaturesService;

/// How long open connections may take to finish after the engine died, before `run` returns.
const DEATH_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The gRPC service name health reports on.
pub const SERVICE_NAME: &str = "taxon.v1.Features";

/// The methods served here, the only values of the metrics' `rpc` label (others: `other`).
const KNOWN_METHODS: [&str; 6] = [
    "taxon.v1.Features/Embed",
    "taxon.v1.Features/Info",
    "grpc.health.v1.Health/Check",
    "grpc.health.v1.Health/Watch",
    "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Runs the server on `listener` until `shutdown` resolves and in-flight work is done.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    Server::new(config)?.serve(listener, shutdown).await
}

/// A server whose engine is already starting; [`Server::engine`] lets tests watch or pause it
/// before [`Server::serve`].
pub struct Server {
    config: Config,
    engine: Engine,
}

impl Server {
    /// Validates the config and starts the engine thread (loading happens there).
    pub fn new(config: Config) -> Result<Self> {
        let engine = Engine::spawn(&config)?;
        Ok(Self { config, engine })
    }

    /// A server whose model comes from `loader` instead of `config.weights`: tests and benches
    /// use it for a cheap stand-in behind the real queue, batcher and service.
    pub fn with_model(config: Config, loader: Loader) -> Result<Self> {
        let engine = Engine::spawn_with(&config, loader)?;
        Ok(Self { config, engine })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Serves until `shutdown` resolves, then shuts down gracefully. Fails if the engine cannot
    /// load its weights or warm up.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        let Server { config, engine } = self;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, ?config, "feature-server starting");

        let (reporter, health) = tonic_health::server::health_reporter();
        set_health(&reporter, ServingStatus::NotServing).await;
        // The descriptor set holds every taxon service; advertise only those served here.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(taxon_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name(SERVICE_NAME)
                .with_service_name("grpc.health.v1.Health")
                .with_service_name("grpc.reflection.v1.ServerReflection")
                .with_service_name("grpc.reflection.v1alpha.ServerReflection")
        };
        let reflection_v1 = reflection()
            .build_v1()
            .map_err(|e| Error::Internal(e.to_string()))?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| Error::Internal(e.to_string()))?;

        let stop = CancellationToken::new();
        let features = FeaturesServer::new(FeaturesService::new(
            engine.clone(),
            config.clone(),
            stop.clone(),
        ))
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);

        // Small messages both ways: Nagle's algorithm would add tens of milliseconds per item.
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let calls = engine.metrics().calls.clone();
        let record: taxon_ops::grpc_metrics::Recorder =
            Arc::new(move |rpc, code, took| calls.record(rpc, code, took));
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = config
            .tls
            .config()
            .map_err(|e| Error::Config(e.to_string()))?
        {
            builder = builder.tls_config(tls)?;
        }
        let serving = builder
            .layer(GrpcMetricsLayer::new(&KNOWN_METHODS, record))
            // One span per call (Info, health, reflection, each Embed stream), so every log
            // line says which call it belongs to.
            .trace_fn(|request| tracing::info_span!("grpc", path = %request.uri().path()))
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(features)
            .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
        tokio::pin!(serving);
        tokio::pin!(shutdown);

        let (mut warmed, mut stopping) = (false, false);
        let served = loop {
            tokio::select! {
                served = &mut serving => break served,
                ready = engine.ready(), if !warmed => {
                    warmed = true;
                    match ready {
                        Ok(_) => {
                            set_health(&reporter, ServingStatus::Serving).await;
                            tracing::info!(%addr, "serving");
                        }
                        Err(_) => {
                            stop.cancel();
                            let _ = (&mut serving).await;
                            // The thread's own error says what went wrong (weights, device).
                            engine.join().await?;
                            return Err(Error::Internal("engine failed to start".into()));
                        }
                    }
                }
                reason = engine.failed(), if warmed && !stopping => {
                    tracing::error!(error = %reason, "engine died: NOT_SERVING, stopping");
                    set_health(&reporter, ServingStatus::NotServing).await;
                    stop.cancel();
                    // Open streams (a health watch never ends by itself) may not hold the exit
                    // off for long: the process must go so that it can be restarted.
                    let _ = tokio::time::timeout(DEATH_GRACE, &mut serving).await;
                    let _ = engine.join().await;
                    return Err(Error::Internal(format!("engine died: {reason}")));
                }
                () = &mut shutdown, if !stopping => {
                    stopping = true;
                    tracing::info!("shutdown requested: finishing in-flight items");
                    set_health(&reporter, ServingStatus::NotServing).await;
                    stop.cancel();
                }
            }
        };
        stop.cancel();
        engine.join().await?;
        tracing::info!("feature-server stopped");
        served.map_err(Error::from)
    }
}

async fn set_health(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    reporter.set_service_status(SERVICE_NAME, status).await;
    reporter.set_service_status("", status).await;
}
