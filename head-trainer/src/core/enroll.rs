//! Enroll: photos of one class in, examples stored, class classifiable at once.
//!
//! Order matters for "nothing half-written": photos are hashed and embedded (only those the
//! tenant never sent before) while the stream is read, and the class with all its examples is
//! created in one transaction at the very end. If the feature-servers are down the call fails
//! before anything is written; if the process dies before the commit, nothing was
//! acknowledged. Embedding in chunks as the photos arrive bounds memory to one chunk of
//! photos, whatever the size of the enroll; every photo also holds its share of the
//! server-wide in-flight budget until it is embedded (see `inflight`), and an enroll that has
//! to wait for room first sends what it holds, so that no two enrolls wait on each other.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::time::Instant as Deadline;

use super::{Caller, Core, EnrollStart, Enrolled, Photo, Rejected};
use crate::inflight::Reservation;
use crate::store::{EnrollWrite, Hash};
use crate::taxonomy::class_name;
use crate::tenants::Tenant;
use crate::{Error, Result};

/// Photos sent to the feature-server per Embed call while the stream is still arriving.
const CHUNK_PHOTOS: usize = 32;
/// ... or fewer, once they add up to this many bytes: one enroll of large photos must not
/// take the whole in-flight budget before it sends any.
const CHUNK_BYTES: usize = 64 << 20;

/// A photo read from the stream, not yet embedded.
struct Pending {
    id: String,
    image: Bytes,
    hash: Hash,
    /// Its share of the in-flight budget, given back once it is embedded (or dropped).
    _reservation: Reservation,
}

/// What the photos of one enroll became.
#[derive(Default)]
struct Accepted {
    /// Distinct photos with their embedding, in arrival order.
    examples: Vec<(Hash, Vec<f32>)>,
    index: HashMap<Hash, usize>,
    accepted: u32,
    cached: u32,
    rejected: Vec<Rejected>,
}

impl Accepted {
    fn reject(&mut self, id: String, error: Error) {
        self.rejected.push(Rejected { id, error });
    }
}

impl Core {
    /// Enrolls `photos` into the class of `start`. The stream's errors end the enroll with
    /// nothing written (a face maps its transport's errors to [`Error`] as it sees fit).
    pub async fn enroll(
        &self,
        caller: &Caller,
        start: EnrollStart,
        mut photos: impl Stream<Item = Result<Photo>> + Send + Unpin,
    ) -> Result<Enrolled> {
        self.admit(caller)?;
        // The tenant's own bound first: its enrolls beyond it must not queue for (and take)
        // the places every tenant shares.
        let _own = self
            .admission
            .enroll_place(&caller.tenant)
            .inspect_err(|e| self.metrics.refused(e))?;
        let deadline = self.deadline_within(caller.deadline);
        let _place = self.uploads.enter(deadline).await?;
        let class = class_name(&start.class_name)?;
        let parent = match start.parent.as_deref() {
            None | Some("") => None,
            Some(p) => Some(class_name(p)?),
        };
        if parent.as_deref() == Some(class.as_str()) {
            return Err(Error::InvalidArgument(
                "a class cannot be its own parent".into(),
            ));
        }
        // Fail fast, before reading photos, when no feature-server is known.
        let model = self.model()?;
        let limit = self.photo_limit(&model);
        let tenant_name = caller.tenant.as_str();
        let mut acc = Accepted::default();
        let mut chunk: Vec<Pending> = Vec::new();
        let mut chunk_bytes = 0usize;
        let mut count = 0usize;
        while let Some(photo) = photos.next().await {
            let photo = photo?;
            count += 1;
            if count > self.config.max_photos_per_enroll {
                return Err(Error::InvalidArgument(format!(
                    "more than {} photos in one enroll",
                    self.config.max_photos_per_enroll
                )));
            }
            if photo.image.is_empty() {
                acc.reject(photo.id, Error::InvalidArgument("empty image".into()));
                continue;
            }
            let bytes = photo.image.len();
            if bytes > limit {
                let e = Error::PhotoTooLarge {
                    id: photo.id.clone(),
                    bytes,
                    limit,
                };
                acc.reject(photo.id, e);
                continue;
            }
            let reservation = match self.budget.try_reserve(bytes)? {
                Some(r) => r,
                None => {
                    // Send what we hold before waiting, so that we wait holding nothing.
                    chunk_bytes = 0;
                    let held = std::mem::take(&mut chunk);
                    self.embed_chunk(
                        tenant_name,
                        &model.id,
                        held,
                        deadline,
                        caller.trace,
                        &mut acc,
                    )
                    .await?;
                    self.budget.reserve(bytes, deadline).await?
                }
            };
            let hash = hash_of(photo.image.clone()).await?;
            chunk.push(Pending {
                id: photo.id,
                image: photo.image,
                hash,
                _reservation: reservation,
            });
            chunk_bytes += bytes;
            if chunk.len() >= CHUNK_PHOTOS || chunk_bytes >= CHUNK_BYTES {
                chunk_bytes = 0;
                let full = std::mem::take(&mut chunk);
                self.embed_chunk(
                    tenant_name,
                    &model.id,
                    full,
                    deadline,
                    caller.trace,
                    &mut acc,
                )
                .await?;
            }
        }
        self.embed_chunk(
            tenant_name,
            &model.id,
            chunk,
            deadline,
            caller.trace,
            &mut acc,
        )
        .await?;
        let last_photo = Instant::now();
        if count == 0 {
            return Err(Error::EmptyStream);
        }
        if acc.examples.is_empty() {
            let first = acc
                .rejected
                .first()
                .map(|r| format!("{}: {}", r.id, r.error));
            return Err(Error::NothingAccepted(first.unwrap_or_default()));
        }

        let tenant = self.tenant(tenant_name, &model).await?;
        let examples = std::mem::take(&mut acc.examples);
        let quotas = self.config.quotas;
        let (t, c, p, m) = (
            tenant_name.to_string(),
            class.clone(),
            parent.clone(),
            model.id.clone(),
        );
        let outcome = self
            .blocking("enroll", move |store| {
                store.enroll(
                    &t,
                    &EnrollWrite {
                        class_name: &c,
                        parent: p.as_deref(),
                        model: &m,
                        examples,
                        quotas,
                    },
                )
            })
            .await
            .inspect_err(|e| self.metrics.refused(e))?;
        tracing::info!(
            tenant = %tenant_name, class = %class, accepted = acc.accepted, cached = acc.cached,
            rejected = acc.rejected.len(), examples = outcome.examples, revision = outcome.revision, "enrolled"
        );
        let estimate_of = class.clone();
        let estimate = self
            .written_with(&tenant, &model.id, true, move |snap| {
                super::report::class_estimate(snap, &estimate_of)
            })
            .await?;
        let m = &self.metrics;
        m.photos(
            "embedded",
            u64::from(acc.accepted.saturating_sub(acc.cached)),
        );
        m.photos("cached", u64::from(acc.cached));
        m.photos("rejected", acc.rejected.len() as u64);

        let mut time_to_live = None;
        if start.wait_for_head && self.config.default_head.is_trained() {
            self.wait_for_head(&tenant, outcome.revision, self.config.wait_for_head_timeout)
                .await?;
            let took = last_photo.elapsed();
            m.time_to_live_seconds.observe(took.as_secs_f64());
            time_to_live = Some(took);
        }
        Ok(Enrolled {
            class_name: class,
            parent: outcome.parent,
            accepted: acc.accepted,
            cached: acc.cached,
            rejected: acc.rejected,
            examples: outcome.examples,
            head: self.live(&tenant, &model.id),
            time_to_live,
            estimate,
        })
    }

    /// Looks the chunk's photos up in the tenant's cache and embeds the rest.
    async fn embed_chunk(
        &self,
        tenant: &str,
        model: &str,
        chunk: Vec<Pending>,
        deadline: Deadline,
        trace: taxon_ops::trace::TraceContext,
        acc: &mut Accepted,
    ) -> Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        // Cache lookups: the same photo twice in one enroll, or sent in an earlier one.
        let hashes: Vec<Hash> = chunk.iter().map(|c| c.hash).collect();
        let (t, m) = (tenant.to_string(), model.to_string());
        let known = self
            .blocking(
                "cache lookup",
                move |store| -> Result<Vec<Option<Vec<f32>>>> {
                    hashes.iter().map(|h| store.embedding(&t, h, &m)).collect()
                },
            )
            .await?;
        let mut to_embed = Vec::new();
        for (pending, cached) in chunk.into_iter().zip(known) {
            let hash = pending.hash;
            if acc.index.contains_key(&hash) {
                acc.accepted += 1;
                acc.cached += 1;
            } else if let Some(v) = cached.or_else(|| self.shared_cached(tenant, model, &hash)) {
                acc.index.insert(hash, acc.examples.len());
                acc.examples.push((hash, v));
                acc.accepted += 1;
                acc.cached += 1;
            } else if to_embed.iter().any(|p: &Pending| p.hash == hash) {
                // The same photo twice in this chunk: embedded once, counted as cached.
                acc.accepted += 1;
                acc.cached += 1;
            } else {
                to_embed.push(pending);
            }
        }
        if to_embed.is_empty() {
            return Ok(());
        }
        let items: Vec<(String, Bytes)> = to_embed
            .iter()
            .map(|p| (p.id.clone(), p.image.clone()))
            .collect();
        let results = self.features.embed(items, deadline, trace).await?;
        for (p, r) in to_embed.into_iter().zip(results) {
            match r {
                Ok(v) => {
                    acc.index.insert(p.hash, acc.examples.len());
                    acc.examples.push((p.hash, v));
                    acc.accepted += 1;
                }
                Err(e) => acc.reject(p.id, e),
            }
        }
        Ok(())
    }

    /// With `--share-embedding-cache`, a photo another tenant classified recently is not
    /// embedded again; without it the lookup is skipped (tenants' caches stay apart).
    fn shared_cached(&self, tenant: &str, model: &str, hash: &Hash) -> Option<Vec<f32>> {
        if !self.config.share_embedding_cache {
            return None;
        }
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cache.get(tenant, model, hash).map(|v| v.as_ref().clone())
    }

    /// Waits until a trained head of the default kind covering `revision` is live (or its
    /// training failed, or `timeout`): the publication wakes us, no polling.
    async fn wait_for_head(&self, tenant: &Tenant, revision: u64, timeout: Duration) -> Result<()> {
        let kind = self.config.default_head;
        let mut rx = tenant.subscribe();
        let waited = tokio::time::timeout(
            timeout,
            rx.wait_for(|set| {
                set.trained
                    .get(&kind)
                    .is_some_and(|h| h.meta.revision >= revision)
                    || set.failed.as_ref().is_some_and(|(r, _)| *r >= revision)
            }),
        )
        .await;
        match waited {
            Ok(Ok(set)) => match (&set.failed, set.trained.get(&kind)) {
                (_, Some(h)) if h.meta.revision >= revision => Ok(()),
                (Some((_, why)), _) => Err(Error::Precondition(format!("training failed: {why}"))),
                _ => Ok(()),
            },
            Ok(Err(_)) => Err(Error::ShuttingDown),
            Err(_) => {
                tracing::warn!(tenant = %tenant.name, revision, "wait_for_head timed out; replying with the prototype");
                Ok(())
            }
        }
    }
}

/// The content hash of a photo, computed on the blocking pool: 16 MiB of SHA-256 is tens of
/// milliseconds that must not stall the runtime threads serving every other request.
pub(super) async fn hash_of(image: Bytes) -> Result<Hash> {
    tokio::task::spawn_blocking(move || Sha256::digest(&image).into())
        .await
        .map_err(|e| Error::Store(format!("hash task: {e}")))
}
