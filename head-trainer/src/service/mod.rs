//! The `taxon.v1.Classifier` gRPC service: a thin layer that authenticates, validates,
//! and hands over to the store, the trainer and the heads. One file per group of methods.

pub mod auth;
mod cache;
mod classify;
mod enroll;
mod manage;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use taxon_proto::v1::classifier_server::Classifier;
use taxon_proto::v1::*;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::config::Config;
use crate::features::EmbeddingSource;
use crate::heads::HeadKind;
use crate::inflight::InflightBudget;
use crate::tenants::{Tenant, Tenants};
use crate::trainer::Trainer;
use crate::{Error, Result};
pub use auth::Auth;
use cache::EmbeddingLru;

/// What every method needs, shared by all requests.
pub struct Ctx {
    pub config: Config,
    pub tenants: Tenants,
    pub trainer: Arc<Trainer>,
    pub features: Arc<dyn EmbeddingSource>,
    pub auth: Auth,
    /// Image bytes in flight across every request.
    pub budget: InflightBudget,
    /// Cancelled when shutdown's grace period is over: requests still running end with
    /// UNAVAILABLE (see `server`).
    pub cut: CancellationToken,
    cache: Mutex<EmbeddingLru>,
}

impl Ctx {
    pub fn new(
        config: Config,
        tenants: Tenants,
        trainer: Arc<Trainer>,
        features: Arc<dyn EmbeddingSource>,
        auth: Auth,
        cut: CancellationToken,
    ) -> Self {
        let cache = Mutex::new(EmbeddingLru::new(
            config.classify_cache_entries,
            config.share_embedding_cache,
        ));
        let budget = InflightBudget::new(config.max_inflight_bytes);
        Self {
            config,
            tenants,
            trainer,
            features,
            auth,
            budget,
            cut,
            cache,
        }
    }

    /// When this request must be done: the caller's deadline (`grpc-timeout`) if it set one
    /// shorter than ours, else `--request-timeout-s` from now. What remains of it is passed on
    /// to the feature-server, and waits for the in-flight budget end there too.
    pub fn deadline(&self, md: &tonic::metadata::MetadataMap) -> tokio::time::Instant {
        self.deadline_within(caller_deadline(md))
    }

    /// Our deadline from now, or the caller's when that comes first.
    pub fn deadline_within(&self, caller: Option<tokio::time::Instant>) -> tokio::time::Instant {
        let ours = tokio::time::Instant::now() + self.config.request_timeout;
        caller.map_or(ours, |c| c.min(ours))
    }

    /// The model identity, or UNAVAILABLE while no feature-server has answered `Info`.
    pub fn model(&self) -> Result<Arc<ModelInfo>> {
        self.features
            .info()
            .borrow()
            .clone()
            .ok_or_else(|| Error::Unavailable("no feature-server has answered yet".into()))
    }

    /// Authenticates the request and loads its tenant. A tenant loaded for the first time
    /// whose trained head lags its examples (a crash between an enroll and its training, or a
    /// different `--default-head`) gets a training job.
    pub async fn tenant(
        &self,
        md: &tonic::metadata::MetadataMap,
    ) -> Result<(Arc<Tenant>, Arc<ModelInfo>)> {
        let name = self.auth.tenant(md)?;
        let info = self.model()?;
        self.tenant_named(&name, &info).await
    }

    /// [`Ctx::tenant`] for an already authenticated tenant name.
    pub async fn tenant_named(
        &self,
        name: &str,
        info: &Arc<ModelInfo>,
    ) -> Result<(Arc<Tenant>, Arc<ModelInfo>)> {
        let (tenant, loaded) = self.tenants.get(name, &info.model).await?;
        if loaded {
            let set = tenant.current();
            let kind = self.config.default_head;
            let stale = set.prototype.is_some()
                && set.trained.get(&kind).is_none_or(|h| {
                    h.meta.revision < set.taxonomy.revision || h.meta.model != info.model
                });
            if stale && kind.is_trained() {
                self.trainer.schedule(&tenant, &info.model);
            }
        }
        Ok((tenant, Arc::clone(info)))
    }

    /// `None` for the live head, or the kind named on the wire.
    fn head_kind(s: &str) -> Result<Option<HeadKind>> {
        if s.is_empty() {
            Ok(None)
        } else {
            s.parse().map(Some)
        }
    }
}

/// The caller's deadline (`grpc-timeout`), if it set one, a little early: a tenth of it, at
/// most 100 ms, is kept back so that the caller hears why we gave up (the limit we waited
/// on) before its own timer fires with a bare DEADLINE_EXCEEDED.
pub fn caller_deadline(md: &tonic::metadata::MetadataMap) -> Option<tokio::time::Instant> {
    let t = taxon_proto::grpc_timeout(md)?;
    let margin = (t / 10).min(std::time::Duration::from_millis(100));
    Some(tokio::time::Instant::now() + t - margin)
}

/// The tonic service.
#[derive(Clone)]
pub struct ClassifierService {
    ctx: Arc<Ctx>,
}

impl ClassifierService {
    pub fn new(ctx: Arc<Ctx>) -> Self {
        Self { ctx }
    }

    /// Runs a request until it finishes or shutdown cuts it (after the grace period).
    async fn cut_off<T>(&self, request: impl Future<Output = Result<T>>) -> Result<T, Status> {
        tokio::select! {
            r = request => Ok(r?),
            () = self.ctx.cut.cancelled() => Err(Error::ShuttingDown.into()),
        }
    }
}

type ClassifyStream = Pin<Box<dyn Stream<Item = Result<ClassifyStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Classifier for ClassifierService {
    async fn enroll(
        &self,
        req: Request<Streaming<EnrollRequest>>,
    ) -> Result<Response<EnrollResponse>, Status> {
        self.cut_off(enroll::enroll(&self.ctx, req))
            .await
            .map(Response::new)
    }

    async fn classify(
        &self,
        req: Request<ClassifyRequest>,
    ) -> Result<Response<ClassifyResponse>, Status> {
        self.cut_off(classify::classify(&self.ctx, req))
            .await
            .map(Response::new)
    }

    type ClassifyStreamStream = ClassifyStream;

    async fn classify_stream(
        &self,
        req: Request<Streaming<ClassifyStreamRequest>>,
    ) -> Result<Response<Self::ClassifyStreamStream>, Status> {
        let stream = classify::classify_stream(Arc::clone(&self.ctx), req).await?;
        // Shutdown's cut ends the stream (its client sees UNAVAILABLE) instead of waiting for
        // a client that may never close it.
        let cut = self.ctx.cut.clone();
        let was_cut = cut.clone();
        let ended = futures::stream::once(async move { was_cut.is_cancelled() })
            .filter_map(|cut| async move { cut.then(|| Err(Status::from(Error::ShuttingDown))) });
        Ok(Response::new(Box::pin(
            stream.take_until(cut.cancelled_owned()).chain(ended),
        )))
    }

    async fn list_classes(
        &self,
        req: Request<ListClassesRequest>,
    ) -> Result<Response<ListClassesResponse>, Status> {
        self.cut_off(manage::list(&self.ctx, req))
            .await
            .map(Response::new)
    }

    async fn remove_class(
        &self,
        req: Request<RemoveClassRequest>,
    ) -> Result<Response<RemoveClassResponse>, Status> {
        self.cut_off(manage::remove(&self.ctx, req))
            .await
            .map(Response::new)
    }

    async fn rename_class(
        &self,
        req: Request<RenameClassRequest>,
    ) -> Result<Response<RenameClassResponse>, Status> {
        self.cut_off(manage::rename(&self.ctx, req))
            .await
            .map(Response::new)
    }

    async fn train(&self, req: Request<TrainRequest>) -> Result<Response<TrainResponse>, Status> {
        self.cut_off(manage::train(&self.ctx, req))
            .await
            .map(Response::new)
    }
}
