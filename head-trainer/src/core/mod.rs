//! The domain core: enroll, classify, list, rename, remove and train, in plain Rust types.
//!
//! It owns every part (the store, the tenants' live state, the trainer, the embedding source,
//! the in-flight budget and the embedding LRU) so that the sequence each operation needs
//! (write -> refresh the tenant -> schedule training) is written once, here, and a face (the
//! gRPC service, an HTTP API next) is only authentication, conversion and `?`. Nothing here
//! knows tonic or the wire types: a face hands in a [`Caller`] (tenant, deadline) and domain
//! values, and gets domain values or a [`crate::Error`] back.

mod cache;
mod classify;
mod enroll;
mod manage;
pub mod report;
mod transfer;
mod types;

pub use classify::Session;
pub use types::*;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Config;
use crate::features::{EmbeddingSource, Model};
use crate::heads::HeadKind;
use crate::inflight::{InflightBudget, Uploads};
use crate::metrics::Metrics;
use crate::quota::Admission;
use crate::store::{Store, StoreEvent};
use crate::tenants::{Tenant, Tenants};
use crate::trainer::Trainer;
use crate::{Error, Result};
use cache::EmbeddingLru;

/// Longest a scrape waits for the store to say its size.
const STORE_SIZE_TIMEOUT: Duration = Duration::from_secs(2);

/// The head-trainer's state and operations, shared by every request of every face.
pub struct Core {
    config: Config,
    store: Arc<dyn Store>,
    tenants: Tenants,
    trainer: Arc<Trainer>,
    features: Arc<dyn EmbeddingSource>,
    /// Image bytes in flight across every request.
    budget: InflightBudget,
    /// Places for image-carrying streams.
    uploads: Uploads,
    /// Embeddings of recently classified photos.
    cache: Mutex<EmbeddingLru>,
    /// Each tenant's request rate and concurrent enrolls.
    admission: Admission,
    /// One quality report at a time: each holds a copy of a tenant's embeddings (up to the
    /// examples quota), so concurrent reports must not add up.
    reports: tokio::sync::Semaphore,
    metrics: Arc<Metrics>,
}

impl Core {
    /// The core over an open store and a source of embeddings.
    pub fn new(config: Config, store: Arc<dyn Store>, features: Arc<dyn EmbeddingSource>) -> Self {
        let metrics = Arc::new(Metrics::new(config.metrics_tenants));
        let trainer = Trainer::new(
            Arc::clone(&store),
            config.train.clone(),
            config.default_head,
            config.max_training_jobs,
            Arc::clone(&metrics),
        );
        let tenants = Tenants::new(
            Arc::clone(&store),
            config.train.clone(),
            config.max_loaded_tenants,
        );
        let cache = Mutex::new(EmbeddingLru::new(
            config.classify_cache_entries,
            config.share_embedding_cache,
        ));
        let budget = InflightBudget::new(config.max_inflight_bytes);
        let uploads = Uploads::new(config.max_concurrent_uploads);
        let admission = Admission::new(config.quotas);
        Self {
            config,
            store,
            tenants,
            trainer,
            features,
            budget,
            uploads,
            cache,
            admission,
            reports: tokio::sync::Semaphore::new(1),
            metrics,
        }
    }

    /// The Prometheus series the core and its faces record. A face that records per call
    /// holds this, not the core: a response still in flight must not keep the store open.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The metrics in the text exposition format, the state gauges read now. The store's size
    /// is asked on the blocking pool (PostgreSQL answers over the network), for at most
    /// [`STORE_SIZE_TIMEOUT`]: a scrape never hangs on a database that is down.
    pub async fn render_metrics(&self) -> String {
        let store = Arc::clone(&self.store);
        let size = tokio::task::spawn_blocking(move || store.size_bytes());
        let size = match tokio::time::timeout(STORE_SIZE_TIMEOUT, size).await {
            Ok(Ok(Ok(bytes))) => Some(bytes),
            Ok(Ok(Err(e))) => {
                tracing::debug!(error = %e, "store size unknown for this scrape");
                None
            }
            Ok(Err(_)) | Err(_) => None,
        };
        self.metrics.render(self.tenants.loaded(), size)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The embedding source (the server's readiness follows it).
    pub fn features(&self) -> &Arc<dyn EmbeddingSource> {
        &self.features
    }

    /// The largest photo accepted now: ours, or the feature-server's when it is lower and
    /// known. A face checks bodies against it before handing them in.
    pub fn max_photo_bytes(&self) -> usize {
        self.model()
            .map_or(self.config.max_photo_bytes, |m| self.photo_limit(&m))
    }

    /// The model identity once a feature-server has answered, and whether one answers now:
    /// what readiness is.
    pub fn readiness(&self) -> (Option<String>, bool) {
        let model = self.features.info().borrow().as_ref().map(|m| m.id.clone());
        (model, *self.features.reachable().borrow())
    }

    /// Stops starting training jobs and gives running ones `grace` to save their heads.
    pub async fn shutdown(&self, grace: Duration) {
        self.trainer.shutdown(grace).await;
    }

    /// Our deadline from now, or the caller's when that comes first. What remains of it is
    /// passed on to the feature-server, and waits for the in-flight budget end there too.
    pub fn deadline_within(&self, caller: Option<Instant>) -> Instant {
        let ours = Instant::now() + self.config.request_timeout;
        caller.map_or(ours, |c| c.min(ours))
    }

    /// One request of `caller`'s, against its tenant's rate quota: every operation starts here.
    fn admit(&self, caller: &Caller) -> Result<()> {
        self.admit_tenant(&caller.tenant)
    }

    /// One request of `tenant`'s against its rate quota, counted (per tenant too, when
    /// `--metrics-tenants` asks for it).
    fn admit_tenant(&self, tenant: &str) -> Result<()> {
        let admitted = self.admission.admit(tenant);
        self.metrics.request(tenant, admitted.as_ref().err());
        admitted
    }

    /// The model identity, or UNAVAILABLE while no feature-server has answered `Info`.
    fn model(&self) -> Result<Arc<Model>> {
        self.features
            .info()
            .borrow()
            .clone()
            .ok_or_else(|| Error::Unavailable("no feature-server has answered yet".into()))
    }

    /// Loads the tenant, or brings a loaded one up to date with what other head-trainers on
    /// a shared store wrote (so that a rename or remove through any replica is seen by the
    /// next request through this one).
    async fn tenant(&self, name: &str, model: &Model) -> Result<Arc<Tenant>> {
        let (tenant, loaded) = self.tenants.get(name, &model.id).await?;
        if loaded || self.tenants.sync(&tenant, &model.id).await? {
            self.train_if_stale(&tenant, &model.id);
        }
        Ok(tenant)
    }

    /// Asks for a training job when the tenant's trained head lags its examples: a tenant
    /// read for the first time after a crash between an enroll and its training, a different
    /// `--default-head`, or examples another replica enrolled. Where another replica already
    /// trains it, the job waits for that one and reuses its head (`Trainer`).
    fn train_if_stale(&self, tenant: &Arc<Tenant>, model: &str) {
        let set = tenant.current();
        let kind = self.config.default_head;
        let stale = set.prototype.is_some()
            && set
                .trained
                .get(&kind)
                .is_none_or(|h| h.meta.revision < set.taxonomy.revision || h.meta.model != model);
        if stale && kind.is_trained() {
            self.trainer.schedule(tenant, model);
        }
    }

    /// Follows the changes other head-trainers make to a shared store (saved heads, and
    /// everything after a reconnect), re-reading the loaded tenants they touch, so that a head
    /// trained on another replica is served here without waiting for a request. Runs until
    /// the returned task is aborted; nothing to follow for a store only this process writes.
    pub fn follow_store(self: &Arc<Self>) -> Result<tokio::task::JoinHandle<()>> {
        let (events, mut received) = tokio::sync::mpsc::channel(256);
        self.store.watch(events)?;
        let core = Arc::clone(self);
        Ok(tokio::spawn(async move {
            while let Some(event) = received.recv().await {
                // Before the model identity is known no tenant is loaded.
                let Ok(model) = core.model() else { continue };
                let tenants = match event {
                    StoreEvent::Changed(name) => {
                        core.tenants.loaded_one(&name).into_iter().collect()
                    }
                    StoreEvent::Resync => core.tenants.loaded_all(),
                };
                for tenant in tenants {
                    match core.tenants.sync(&tenant, &model.id).await {
                        Ok(true) => core.train_if_stale(&tenant, &model.id),
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(tenant = %tenant.name, error = %e, "re-reading a changed tenant failed; the next request retries");
                        }
                    }
                }
            }
        }))
    }

    /// The tenant, loaded, when the model identity is known. Before any feature-server has
    /// answered no tenant can have been loaded (loading needs the identity), so a store change
    /// made then is simply read when the tenant is first loaded.
    async fn loaded_tenant(&self, name: &str) -> Result<Option<(Arc<Tenant>, Arc<Model>)>> {
        match self.model() {
            Ok(model) => Ok(Some((self.tenant(name, &model).await?, model))),
            Err(_) => Ok(None),
        }
    }

    /// After a write: publishes the tenant's new taxonomy and prototype and, when the
    /// examples changed, asks for the trained head to be rebuilt.
    async fn written(&self, tenant: &Arc<Tenant>, model: &str, retrain: bool) -> Result<()> {
        self.written_with(tenant, model, retrain, |_| Ok(())).await
    }

    /// [`Core::written`], also computing `f` on the snapshot the refresh read (no second
    /// read of the store).
    async fn written_with<T: Send + 'static>(
        &self,
        tenant: &Arc<Tenant>,
        model: &str,
        retrain: bool,
        f: impl FnOnce(&crate::store::Snapshot) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let out = self.tenants.refresh_with(tenant, model, f).await?;
        if retrain {
            self.trainer.schedule(tenant, model);
        }
        Ok(out)
    }

    /// The head answering requests that name none.
    fn live(&self, tenant: &Tenant, model: &str) -> Option<HeadRef> {
        tenant
            .current()
            .live(self.config.default_head, model)
            .map(|h| HeadRef {
                kind: h.meta.kind.clone(),
                version: h.meta.version,
            })
    }

    /// Runs a store call on the blocking pool: every store method may fsync.
    async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&dyn Store) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| Error::Store(format!("{what} task: {e}")))?
    }

    /// The per-photo byte limit: ours, or the feature-server's if it is lower.
    fn photo_limit(&self, model: &Model) -> usize {
        match usize::try_from(model.max_image_bytes) {
            Ok(0) | Err(_) => self.config.max_photo_bytes,
            Ok(n) => self.config.max_photo_bytes.min(n),
        }
    }

    /// The default head kind, or the one asked for.
    fn kind_or_default(&self, kind: Option<HeadKind>) -> HeadKind {
        kind.unwrap_or(self.config.default_head)
    }
}
