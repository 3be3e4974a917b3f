//! Training jobs: one per tenant at a time, off the async runtime, coalesced.
//!
//! An Enroll asks for a job with [`Trainer::schedule`]. If the tenant has none running, one
//! starts; if one is running, a flag asks for one more after it, so ten enrolls during a job
//! give one more job (trained on all ten), not ten. A job reads a snapshot of the examples,
//! trains on the blocking pool (tensor code must not stall the reactor), saves the head in one
//! transaction (so a crash or shutdown mid-job persists nothing half-done) and only then
//! publishes it. The Train RPC runs through the same per-tenant lock. At most
//! `max_jobs` jobs train at once across all tenants (a semaphore): each takes a core while it
//! runs, and a burst of tenants enrolling must not take every core from classification.
//!
//! On a store shared by several head-trainers, a job first takes the tenant's lock in the
//! store ([`Store::try_training_lock`]), asking again every `REPLICA_LOCK_POLL` while another
//! replica holds it (holding no connection and no job slot meanwhile). A scheduled job that
//! then finds a stored head already trained on the current examples (the other replica's)
//! publishes that one instead of training again; if the other replica died mid-job, its lock
//! died with its connection, and this job trains.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::heads::{Head, HeadKind, TrainOptions, TrainSet};
use crate::metrics::Metrics;
use crate::store::{Store, TrainingLock};
use crate::tenants::{Tenant, stored_heads};
use crate::{Error, Result};

/// Between two attempts at a tenant's training lock that another replica holds.
const REPLICA_LOCK_POLL: Duration = Duration::from_millis(200);

/// Where a job starts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    /// A scheduled job: a head another replica already trained on the current examples is
    /// published as it is; otherwise training warm-starts from the previous head of the kind.
    Scheduled,
    /// Warm-started from the previous head of the kind (classes it knew keep their weights).
    Warm,
    /// From the examples alone, so the head does not depend on the heads before it.
    Scratch,
}

/// Schedules and runs training jobs.
pub struct Trainer {
    store: Arc<dyn Store>,
    opts: TrainOptions,
    default_kind: HeadKind,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    jobs: tokio::sync::Semaphore,
    metrics: Arc<Metrics>,
}

impl Trainer {
    pub fn new(
        store: Arc<dyn Store>,
        opts: TrainOptions,
        default_kind: HeadKind,
        max_jobs: usize,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            opts,
            default_kind,
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            jobs: tokio::sync::Semaphore::new(max_jobs.max(1)),
            metrics,
        })
    }

    /// Asks for the default head of `tenant` to be retrained on its current examples.
    pub fn schedule(self: &Arc<Self>, tenant: &Arc<Tenant>, model: &str) {
        if !self.default_kind.is_trained() || self.shutdown.is_cancelled() {
            return;
        }
        {
            let mut job = tenant
                .job
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if job.0 {
                job.1 = true; // coalesced into the next job
                return;
            }
            *job = (true, false);
        }
        let (this, tenant, model) = (Arc::clone(self), Arc::clone(tenant), model.to_string());
        self.tracker.spawn(async move {
            loop {
                if this.shutdown.is_cancelled() {
                    break;
                }
                let kind = this.default_kind;
                if let Err(e) = this.run(&tenant, &model, kind, Start::Scheduled).await {
                    tracing::warn!(tenant = %tenant.name, %kind, error = %e, "training failed");
                    let revision = tenant.current().taxonomy.revision;
                    tenant.publish_failure(revision, e.to_string());
                }
                let mut job = tenant
                    .job
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if job.1 && !this.shutdown.is_cancelled() {
                    job.1 = false;
                } else {
                    *job = (false, false);
                    break;
                }
            }
        });
    }

    /// Trains a head of `kind` on the tenant's current examples now (waiting for a running
    /// job first), saves it and makes it live. Returns the head, or `NoClasses`. With
    /// `from_scratch` the previous head of the kind is not used as the starting point.
    pub async fn train(
        &self,
        tenant: &Arc<Tenant>,
        model: &str,
        kind: HeadKind,
        from_scratch: bool,
    ) -> Result<Arc<Head>> {
        let start = if from_scratch {
            Start::Scratch
        } else {
            Start::Warm
        };
        self.run(tenant, model, kind, start).await
    }

    /// One job, starting from `start`.
    async fn run(
        &self,
        tenant: &Arc<Tenant>,
        model: &str,
        kind: HeadKind,
        start: Start,
    ) -> Result<Arc<Head>> {
        let _one_at_a_time = tenant.train_lock.lock().await;
        let one_replica = self.replica_lock(&tenant.name).await?;
        let _a_core = self.jobs.acquire().await.map_err(|_| Error::ShuttingDown)?;
        let previous = match start {
            Start::Scratch => None,
            Start::Scheduled | Start::Warm => tenant.current().trained.get(&kind).cloned(),
        };
        let (store, opts) = (Arc::clone(&self.store), self.opts.clone());
        let (name, model) = (tenant.name.clone(), model.to_string());
        let metrics = Arc::clone(&self.metrics);
        let head = tokio::task::spawn_blocking(move || -> Result<Arc<Head>> {
            // Released here, off the reactor: releasing is a round trip to the database.
            let _one_replica = one_replica;
            let started = Instant::now();
            let snap = store.snapshot(&name, Some(&model))?;
            if snap.examples.is_empty() {
                return Err(Error::NoClasses(name));
            }
            if start == Start::Scheduled && kind.is_trained() {
                let current = stored_heads(store.as_ref(), &name)?
                    .remove(&kind)
                    .filter(|h| h.meta.revision >= snap.taxonomy.revision && h.meta.model == model);
                if let Some(head) = current {
                    tracing::info!(tenant = %name, %kind, version = head.meta.version, "head already trained on these examples (by another replica)");
                    metrics.trained(kind.as_str(), "reused", None);
                    return Ok(head);
                }
            }
            let ts = TrainSet::new(&model, &snap.examples, |c| snap.taxonomy.group_of(c))?;
            let mut head = Head::train(kind, &ts, previous.as_deref(), &opts)
                .inspect_err(|_| metrics.trained(kind.as_str(), "failed", None))?;
            head.meta.revision = snap.taxonomy.revision;
            if kind == HeadKind::Prototype {
                head.meta.version = snap.taxonomy.prototype_version;
                metrics.trained(kind.as_str(), "trained", Some(started.elapsed()));
                return Ok(Arc::new(head));
            }
            let version = store
                .save_head(&name, kind.as_str(), &mut |v| {
                    head.meta.version = v;
                    head.to_bytes()
                })
                .inspect_err(|_| metrics.trained(kind.as_str(), "failed", None))?;
            head.meta.version = version;
            metrics.trained(kind.as_str(), "trained", Some(started.elapsed()));
            tracing::info!(
                tenant = %name, %kind, version, classes = ts.classes.len(), examples = ts.len(),
                steps = head.meta.steps, train_ms = head.meta.train_ms,
                job_ms = started.elapsed().as_secs_f64() * 1e3, "head trained"
            );
            Ok(Arc::new(head))
        })
        .await
        .map_err(|e| Error::Store(format!("training task: {e}")))??;
        if kind == HeadKind::Prototype {
            return Ok(head);
        }
        tenant.publish_head(Arc::unwrap_or_clone(head));
        tenant.current().head(kind)
    }

    /// The tenant's training lock in the store, waiting while another replica holds it.
    async fn replica_lock(&self, tenant: &str) -> Result<TrainingLock> {
        let mut waiting = false;
        loop {
            let (store, name) = (Arc::clone(&self.store), tenant.to_string());
            let lock = tokio::task::spawn_blocking(move || store.try_training_lock(&name))
                .await
                .map_err(|e| Error::Store(format!("training lock task: {e}")))??;
            if let Some(lock) = lock {
                return Ok(lock);
            }
            if !waiting {
                tracing::debug!(tenant, "another replica trains this tenant: waiting for it");
                waiting = true;
            }
            tokio::select! {
                () = tokio::time::sleep(REPLICA_LOCK_POLL) => {}
                () = self.shutdown.cancelled() => return Err(Error::ShuttingDown),
            }
        }
    }

    /// Stops starting jobs and waits for running ones to finish (they save whole heads or
    /// nothing), at most `grace`.
    pub async fn shutdown(&self, grace: std::time::Duration) {
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("training jobs still running at shutdown; their heads are not saved");
        }
    }
}
