//! Wiring and lifecycle: store, feature-server client, trainer, service, health, reflection,
//! and a graceful shutdown.
//!
//! Health starts NOT_SERVING and turns SERVING once a feature-server has told us the model
//! identity (without it nothing can be enrolled or classified). On shutdown the server stops
//! accepting, lets in-flight requests finish, then lets a running training job finish (a job
//! saves a whole head in one transaction or nothing) before the store is closed.

use std::future::Future;
use std::sync::Arc;

use taxon_proto::v1::classifier_server::ClassifierServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::config::Config;
use crate::features::{EmbeddingSource, FeatureClient, Timeouts};
use crate::service::{Auth, ClassifierService, Ctx};
use crate::store::Store;
use crate::tenants::Tenants;
use crate::trainer::Trainer;
use crate::{Error, Result};

/// Serves `taxon.v1.Classifier` on `listener` until `shutdown` completes, with embeddings
/// from the feature-servers of `config.features_urls`.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let max_message = config.max_photo_bytes + (1 << 20);
    let features = FeatureClient::connect(
        &config.features_urls,
        Timeouts {
            connect: config.connect_timeout,
            request: config.request_timeout,
        },
        max_message.max(64 << 20),
        config.views,
    )?;
    run_with_source(listener, config, features, shutdown).await
}

/// [`run`] with any source of embeddings (tests use a fake).
pub async fn run_with_source(
    listener: TcpListener,
    config: Config,
    features: Arc<dyn EmbeddingSource>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let auth = match &config.tokens_file {
        Some(path) => Auth::from_file(path)?,
        None => Auth::open(),
    };
    let data_dir = config.data_dir.clone();
    let store = Arc::new(
        tokio::task::spawn_blocking(move || Store::open(&data_dir))
            .await
            .map_err(|e| Error::Store(e.to_string()))??,
    );
    let addr = listener.local_addr().ok();
    tracing::info!(
        ?addr,
        features = ?config.features_urls,
        data = %config.data_dir.display(),
        tokens = auth.enabled(),
        default_head = %config.default_head,
        classify_cache_entries = config.classify_cache_entries,
        max_photo_bytes = config.max_photo_bytes,
        thresholds = ?config.thresholds,
        train = ?config.train,
        "head-trainer starting"
    );
    let trainer = Trainer::new(
        Arc::clone(&store),
        config.train.clone(),
        config.default_head,
    );
    let tenants = Tenants::new(
        Arc::clone(&store),
        config.train.clone(),
        config.max_loaded_tenants,
    );
    let grace = config.shutdown_grace;
    let max_message = config.max_photo_bytes + (1 << 20);
    let ctx = Arc::new(Ctx::new(
        config,
        tenants,
        Arc::clone(&trainer),
        Arc::clone(&features),
        auth,
    ));

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_not_serving::<ClassifierServer<ClassifierService>>()
        .await;
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let mut info = features.info();
    let health_task = tokio::spawn(async move {
        if info.wait_for(Option::is_some).await.is_ok() {
            reporter
                .set_serving::<ClassifierServer<ClassifierService>>()
                .await;
            reporter
                .set_service_status("", ServingStatus::Serving)
                .await;
        }
    });

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(taxon_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::InvalidArgument(format!("reflection: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(taxon_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| Error::InvalidArgument(format!("reflection: {e}")))?;

    let service = ClassifierServer::new(ClassifierService::new(Arc::clone(&ctx)))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let served = Server::builder()
        .trace_fn(|req| tracing::info_span!("grpc", path = %req.uri().path()))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    health_task.abort();
    tracing::info!("no longer accepting; waiting for training jobs");
    trainer.shutdown(grace).await;
    drop(ctx);
    served.map_err(|e| Error::Unavailable(format!("server: {e}")))?;
    tracing::info!("head-trainer stopped");
    Ok(())
}
