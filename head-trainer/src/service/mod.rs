//! The `taxon.v1.Classifier` gRPC service: a thin layer that authenticates, validates,
//! and hands over to the store, the trainer and the heads. One file per group of methods.

pub mod auth;
mod cache;
mod classify;
mod enroll;
mod manage;

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::Stream;
use taxon_proto::v1::classifier_server::Classifier;
use taxon_proto::v1::*;
use tonic::{Request, Response, Status, Streaming};

use crate::config::Config;
use crate::features::EmbeddingSource;
use crate::heads::HeadKind;
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
    cache: Mutex<EmbeddingLru>,
}

impl Ctx {
    pub fn new(
        config: Config,
        tenants: Tenants,
        trainer: Arc<Trainer>,
        features: Arc<dyn EmbeddingSource>,
        auth: Auth,
    ) -> Self {
        let cache = Mutex::new(EmbeddingLru::new(
            config.classify_cache_entries,
            config.share_embedding_cache,
        ));
        Self {
            config,
            tenants,
            trainer,
            features,
            auth,
            cache,
        }
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

/// The tonic service.
#[derive(Clone)]
pub struct ClassifierService {
    ctx: Arc<Ctx>,
}

impl ClassifierService {
    pub fn new(ctx: Arc<Ctx>) -> Self {
        Self { ctx }
    }
}

type ClassifyStream = Pin<Box<dyn Stream<Item = Result<ClassifyStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Classifier for ClassifierService {
    async fn enroll(
        &self,
        req: Request<Streaming<EnrollRequest>>,
    ) -> Result<Response<EnrollResponse>, Status> {
        Ok(Response::new(enroll::enroll(&self.ctx, req).await?))
    }

    async fn classify(
        &self,
        req: Request<ClassifyRequest>,
    ) -> Result<Response<ClassifyResponse>, Status> {
        Ok(Response::new(classify::classify(&self.ctx, req).await?))
    }

    type ClassifyStreamStream = ClassifyStream;

    async fn classify_stream(
        &self,
        req: Request<Streaming<ClassifyStreamRequest>>,
    ) -> Result<Response<Self::ClassifyStreamStream>, Status> {
        Ok(Response::new(
            classify::classify_stream(Arc::clone(&self.ctx), req).await?,
        ))
    }

    async fn list_classes(
        &self,
        req: Request<ListClassesRequest>,
    ) -> Result<Response<ListClassesResponse>, Status> {
        Ok(Response::new(manage::list(&self.ctx, req).await?))
    }

    async fn remove_class(
        &self,
        req: Request<RemoveClassRequest>,
    ) -> Result<Response<RemoveClassResponse>, Status> {
        Ok(Response::new(manage::remove(&self.ctx, req).await?))
    }

    async fn rename_class(
        &self,
        req: Request<RenameClassRequest>,
    ) -> Result<Response<RenameClassResponse>, Status> {
        Ok(Response::new(manage::rename(&self.ctx, req).await?))
    }

    async fn train(&self, req: Request<TrainRequest>) -> Result<Response<TrainResponse>, Status> {
        Ok(Response::new(manage::train(&self.ctx, req).await?))
    }
}
