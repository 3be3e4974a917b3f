//! Each tenant's live state in memory: its taxonomy and heads, published through a
//! `tokio::sync::watch` channel.
//!
//! The watch channel is the atomic swap: readers take an `Arc<HeadSet>` (a clone of a pointer)
//! and classify with it while a new set is published, and waiters (an Enroll with
//! `wait_for_head`) are woken by the publication itself, with no polling. A set is replaced
//! only by a newer one (ordered by the store's write sequence and head versions), so two
//! requests finishing out of order never roll the state back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::heads::{Head, HeadKind, TrainOptions, TrainSet};
#[cfg(test)]
use crate::store::RedbStore;
use crate::store::{Snapshot, Store};
use crate::taxonomy::Taxonomy;
use crate::{Error, Result};

/// A tenant's taxonomy and heads at one moment.
#[derive(Clone, Debug, Default)]
pub struct HeadSet {
    pub taxonomy: Arc<Taxonomy>,
    /// Nearest class mean over the current examples; `None` without examples.
    pub prototype: Option<Arc<Head>>,
    /// Latest head of each trained kind (possibly older than the taxonomy).
    pub trained: HashMap<HeadKind, Arc<Head>>,
    /// Revision whose training failed, and why (so that waiters stop waiting).
    pub failed: Option<(u64, String)>,
}

impl HeadSet {
    /// The head answering requests that name none: the default kind once it covers every
    /// class with examples, the prototype until then (a class is classifiable at once).
    pub fn live(&self, default: HeadKind, model: &str) -> Option<Arc<Head>> {
        if let Some(h) = self.trained.get(&default)
            && h.meta.model == model
        {
            let covered = self
                .taxonomy
                .leaves()
                .iter()
                .all(|c| h.meta.classes.contains(c));
            if covered {
                return Some(Arc::clone(h));
            }
        }
        self.prototype.clone()
    }

    /// The latest head of `kind`.
    pub fn head(&self, kind: HeadKind) -> Result<Arc<Head>> {
        match kind {
            HeadKind::Prototype => self.prototype.clone(),
            k => self.trained.get(&k).cloned(),
        }
        .ok_or_else(|| Error::NoHead(kind.to_string()))
    }
}

/// One tenant.
pub struct Tenant {
    pub name: String,
    state: watch::Sender<Arc<HeadSet>>,
    /// Held while a training job of this tenant runs: one job per tenant at a time.
    pub train_lock: tokio::sync::Mutex<()>,
    /// Background job bookkeeping: (a job is running, another one was asked for meanwhile).
    pub(crate) job: Mutex<(bool, bool)>,
    /// When it was last handed out ([`Tenants`]' clock): the least recent idle tenant is the
    /// first to be unloaded.
    last_used: AtomicU64,
}

impl Tenant {
    pub fn current(&self) -> Arc<HeadSet> {
        self.state.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<HeadSet>> {
        self.state.subscribe()
    }

    /// Publishes a new taxonomy and prototype if they are newer than what is live.
    pub fn publish_taxonomy(&self, taxonomy: Taxonomy, prototype: Option<Head>) {
        self.state.send_if_modified(|cur| {
            if taxonomy.seq < cur.taxonomy.seq {
                return false;
            }
            let mut next = HeadSet::clone(cur);
            next.taxonomy = Arc::new(taxonomy);
            next.prototype = prototype.map(Arc::new);
            *cur = Arc::new(next);
            true
        });
    }

    /// Publishes a trained head if it is newer than the live one of its kind.
    pub fn publish_head(&self, head: Head) {
        let kind = head.kind();
        self.state.send_if_modified(|cur| {
            if cur
                .trained
                .get(&kind)
                .is_some_and(|h| h.meta.version >= head.meta.version)
            {
                return false;
            }
            let mut next = HeadSet::clone(cur);
            next.trained.insert(kind, Arc::new(head));
            *cur = Arc::new(next);
            true
        });
    }

    /// Publishes a whole set read from the store, trained heads included, if it is newer than
    /// what is live: after a write that replaced the tenant's heads (an import), whose old
    /// heads must not linger in memory.
    pub fn publish_set(&self, set: HeadSet) {
        self.state.send_if_modified(|cur| {
            if set.taxonomy.seq < cur.taxonomy.seq {
                return false;
            }
            *cur = Arc::new(set);
            true
        });
    }

    /// Records that training on `revision` failed, waking waiters.
    pub fn publish_failure(&self, revision: u64, why: String) {
        self.state.send_modify(|cur| {
            let mut next = HeadSet::clone(cur);
            next.failed = Some((revision, why));
            *cur = Arc::new(next);
        });
    }
}

/// Builds the prototype head of a snapshot (`None` without examples).
pub fn prototype_of(snap: &Snapshot, model: &str, opts: &TrainOptions) -> Result<Option<Head>> {
    if snap.examples.is_empty() {
        return Ok(None);
    }
    let ts = TrainSet::new(model, &snap.examples, |c| snap.taxonomy.group_of(c))?;
    let mut head = Head::train(HeadKind::Prototype, &ts, None, opts)?;
    head.meta.version = snap.taxonomy.prototype_version;
    head.meta.revision = snap.taxonomy.revision;
    Ok(Some(head))
}

/// Everything of a tenant the store has: taxonomy, prototype and stored heads.
fn load(store: &dyn Store, tenant: &str, model: &str, opts: &TrainOptions) -> Result<HeadSet> {
    let snap = store.snapshot(tenant, Some(model))?;
    let prototype = prototype_of(&snap, model, opts)?.map(Arc::new);
    Ok(HeadSet {
        taxonomy: Arc::new(snap.taxonomy),
        prototype,
        trained: stored_heads(store, tenant)?,
        failed: None,
    })
}

/// The tenant's stored heads by kind; an unreadable one is skipped (and logged), so that one
/// bad row never makes the tenant unusable.
pub fn stored_heads(store: &dyn Store, tenant: &str) -> Result<HashMap<HeadKind, Arc<Head>>> {
    let mut trained = HashMap::new();
    for (kind, bytes) in store.heads(tenant)? {
        match Head::from_bytes(&bytes) {
            Ok(h) => {
                trained.insert(h.kind(), Arc::new(h));
            }
            Err(e) => tracing::warn!(tenant, kind, error = %e, "skipping unreadable head"),
        }
    }
    Ok(trained)
}

/// The tenants in use, loaded from the store on first use and unloaded, least recently used
/// first, when more than `max_loaded` are in memory. Everything a tenant holds is also in the
/// store, so unloading loses nothing; without the bound, memory would grow with every tenant
/// ever seen (an evaluation creates one per seed).
pub struct Tenants {
    store: Arc<dyn Store>,
    opts: TrainOptions,
    max_loaded: usize,
    clock: AtomicU64,
    map: Mutex<HashMap<String, Arc<Tenant>>>,
    /// Places for reading a tenant's examples whole and building its prototype: each holds
    /// several copies of the tenant's embeddings for a moment (a few hundred MB at 6,000
    /// examples), so concurrent enrolls must not each hold theirs at once. One: the build
    /// takes milliseconds for a tenant of hundreds of photos, and the training jobs (at most
    /// `--max-training-jobs`) hold copies of their own meanwhile.
    rebuilds: tokio::sync::Semaphore,
}

/// Tenants read whole at once (see `Tenants::rebuilds`).
const CONCURRENT_REBUILDS: usize = 1;

impl Tenants {
    pub fn new(store: Arc<dyn Store>, opts: TrainOptions, max_loaded: usize) -> Self {
        Self {
            store,
            opts,
            max_loaded: max_loaded.max(1),
            clock: AtomicU64::new(0),
            map: Mutex::new(HashMap::new()),
            rebuilds: tokio::sync::Semaphore::new(CONCURRENT_REBUILDS),
        }
    }

    /// Runs `f` (which reads a tenant whole) on the blocking pool, in one of the
    /// [`CONCURRENT_REBUILDS`] places.
    async fn rebuild<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let _place = self
            .rebuilds
            .acquire()
            .await
            .map_err(|_| Error::ShuttingDown)?;
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| Error::Store(format!("{what}: {e}")))?
    }

    /// Tenants now in memory.
    pub fn loaded(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    fn touch(&self, t: &Tenant) {
        t.last_used.store(
            self.clock.fetch_add(1, Ordering::Relaxed),
            Ordering::Relaxed,
        );
    }

    /// Unloads idle tenants, least recently used first, until there is room for one more. A
    /// tenant is idle when the map holds its only reference: no request is using it and no
    /// training job runs for it (both hold an `Arc`), so the next request reloads exactly
    /// what the store has.
    fn make_room(&self, map: &mut HashMap<String, Arc<Tenant>>) {
        if map.len() < self.max_loaded {
            return;
        }
        let mut idle: Vec<(u64, String)> = map
            .iter()
            .filter(|(_, t)| Arc::strong_count(t) == 1)
            .map(|(name, t)| (t.last_used.load(Ordering::Relaxed), name.clone()))
            .collect();
        idle.sort_unstable();
        let excess = map.len() + 1 - self.max_loaded;
        for (_, name) in idle.into_iter().take(excess) {
            map.remove(&name);
            tracing::debug!(tenant = %name, "unloaded an idle tenant");
        }
    }

    /// The tenant, loading its taxonomy, prototype and stored heads on first use. The bool is
    /// true when it was loaded now (the caller may want to schedule training).
    pub async fn get(&self, name: &str, model: &str) -> Result<(Arc<Tenant>, bool)> {
        if let Some(t) = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
        {
            self.touch(t);
            return Ok((Arc::clone(t), false));
        }
        let store = Arc::clone(&self.store);
        let (tenant, model, opts) = (name.to_string(), model.to_string(), self.opts.clone());
        let set = self
            .rebuild("loading tenant", move || {
                load(store.as_ref(), &tenant, &model, &opts)
            })
            .await?;
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(t) = map.get(name) {
            self.touch(t);
            return Ok((Arc::clone(t), false)); // loaded concurrently
        }
        self.make_room(&mut map);
        let (state, _) = watch::channel(Arc::new(set));
        let t = Arc::new(Tenant {
            name: name.to_string(),
            state,
            train_lock: tokio::sync::Mutex::new(()),
            job: Mutex::new((false, false)),
            last_used: AtomicU64::new(0),
        });
        self.touch(&t);
        map.insert(name.to_string(), Arc::clone(&t));
        Ok((t, true))
    }

    /// The loaded tenant of that name, if it is loaded.
    pub fn loaded_one(&self, name: &str) -> Option<Arc<Tenant>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    /// Every loaded tenant.
    pub fn loaded_all(&self) -> Vec<Arc<Tenant>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// Brings a loaded tenant up to date with a store that other head-trainers write too:
    /// when the tenant's write sequence moved past what is loaded, re-reads its taxonomy and
    /// prototype, and its heads when a newer one was saved. True when something was re-read.
    /// One round trip when nothing changed; nothing at all for a store only this process
    /// writes.
    pub async fn sync(&self, tenant: &Arc<Tenant>, model: &str) -> Result<bool> {
        if !self.store.shared() {
            return Ok(false); // no hop to the blocking pool on the embedded store's hot path
        }
        let known = tenant.current();
        let known_head = known
            .trained
            .values()
            .map(|h| h.meta.version)
            .chain([known.taxonomy.prototype_version])
            .max()
            .unwrap_or(0);
        let known_seq = known.taxonomy.seq;
        let store = Arc::clone(&self.store);
        let (name, model, opts) = (tenant.name.clone(), model.to_string(), self.opts.clone());
        let fresh = self
            .rebuild("syncing tenant", move || -> Result<_> {
                let Some(now) = store.versions(&name)? else {
                    return Ok(None);
                };
                if now.seq <= known_seq {
                    return Ok(None);
                }
                let snap = store.snapshot(&name, Some(&model))?;
                let prototype = prototype_of(&snap, &model, &opts)?;
                let heads = if now.head_seq > known_head {
                    stored_heads(store.as_ref(), &name)?
                } else {
                    HashMap::new()
                };
                Ok(Some((snap.taxonomy, prototype, heads)))
            })
            .await?;
        let Some((taxonomy, prototype, heads)) = fresh else {
            return Ok(false);
        };
        tracing::debug!(tenant = %tenant.name, seq = taxonomy.seq, heads = heads.len(), "re-read a tenant another replica changed");
        tenant.publish_taxonomy(taxonomy, prototype);
        for head in heads.into_values() {
            tenant.publish_head(Arc::unwrap_or_clone(head));
        }
        Ok(true)
    }

    /// Re-reads everything of the tenant (heads too) and publishes it whole; loads it if it is
    /// not loaded.
    pub async fn reload(&self, name: &str, model: &str) -> Result<Arc<Tenant>> {
        let (tenant, loaded_now) = self.get(name, model).await?;
        if loaded_now {
            return Ok(tenant);
        }
        let store = Arc::clone(&self.store);
        let (n, m, opts) = (name.to_string(), model.to_string(), self.opts.clone());
        let set = self
            .rebuild("reloading tenant", move || {
                load(store.as_ref(), &n, &m, &opts)
            })
            .await?;
        tenant.publish_set(set);
        Ok(tenant)
    }

    /// Re-reads the tenant after a write and publishes the new taxonomy and prototype.
    pub async fn refresh(&self, tenant: &Arc<Tenant>, model: &str) -> Result<()> {
        self.refresh_with(tenant, model, |_| Ok(())).await
    }

    /// [`Tenants::refresh`], also computing `f` on the snapshot it read.
    pub async fn refresh_with<T: Send + 'static>(
        &self,
        tenant: &Arc<Tenant>,
        model: &str,
        f: impl FnOnce(&Snapshot) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let store = Arc::clone(&self.store);
        let (name, model, opts) = (tenant.name.clone(), model.to_string(), self.opts.clone());
        let (taxonomy, prototype, out) = self
            .rebuild("refreshing tenant", move || -> Result<_> {
                let snap = store.snapshot(&name, Some(&model))?;
                let proto = prototype_of(&snap, &model, &opts)?;
                let out = f(&snap)?;
                Ok((snap.taxonomy, proto, out))
            })
            .await?;
        tenant.publish_taxonomy(taxonomy, prototype);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_tenants_are_unloaded_least_recent_first_and_busy_ones_never() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(RedbStore::open(dir.path()).unwrap());
        let tenants = Tenants::new(store, TrainOptions::default(), 2);
        let m = "test@sha256:00";
        let (busy, _) = tenants.get("busy", m).await.unwrap(); // held: never unloaded
        drop(tenants.get("a", m).await.unwrap());
        assert_eq!(tenants.loaded(), 2);
        drop(tenants.get("b", m).await.unwrap()); // over the bound: `a` goes, not `busy`
        assert_eq!(tenants.loaded(), 2);
        let (again, loaded_now) = tenants.get("busy", m).await.unwrap();
        assert!(!loaded_now && Arc::ptr_eq(&busy, &again));
        let (_, loaded_now) = tenants.get("b", m).await.unwrap();
        assert!(!loaded_now, "`b` stayed");
        let (a, loaded_now) = tenants.get("a", m).await.unwrap();
        assert!(loaded_now, "`a` was unloaded and comes back from the store");
        assert_eq!(tenants.loaded(), 2, "`b`, idle, made room");
        // Every tenant busy: the bound yields rather than dropping one in use.
        let (c, _) = tenants.get("c", m).await.unwrap();
        assert_eq!(tenants.loaded(), 3);
        drop((busy, again, a, c));
    }
}
