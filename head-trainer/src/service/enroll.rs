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
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::bytes::Bytes;
use sha2::{Digest, Sha256};
use taxon_proto::v1::{EnrollRequest, EnrollResponse, ModelInfo, RejectedPhoto, enroll_request};
use tokio::time::Instant as Deadline;
use tonic::{Request, Streaming};

use super::Ctx;
use crate::inflight::Reservation;
use crate::store::{EnrollWrite, Hash};
use crate::taxonomy::class_name;
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
    rejected: Vec<RejectedPhoto>,
}

impl Accepted {
    fn reject(&mut self, id: String, e: &Error) {
        self.rejected.push(RejectedPhoto {
            id,
            code: e.code() as i32,
            message: e.to_string(),
        });
    }
}

pub async fn enroll(
    ctx: &Arc<Ctx>,
    req: Request<Streaming<EnrollRequest>>,
) -> Result<EnrollResponse> {
    let tenant_name = ctx.auth.tenant(req.metadata())?;
    let deadline = ctx.deadline(req.metadata());
    let mut stream = req.into_inner();
    let start = match stream.message().await.map_err(status_err)? {
        None => return Err(Error::EmptyStream),
        Some(EnrollRequest {
            item: Some(enroll_request::Item::Start(s)),
        }) => s,
        Some(_) => {
            return Err(Error::InvalidArgument(
                "the first message of Enroll must be EnrollStart".into(),
            ));
        }
    };
    let mut start = start;
    start.class_name = class_name(&start.class_name)?;
    if !start.parent.is_empty() {
        start.parent = class_name(&start.parent)?;
    }
    let parent = (!start.parent.is_empty()).then_some(start.parent.as_str());
    if parent == Some(start.class_name.as_str()) {
        return Err(Error::InvalidArgument(
            "a class cannot be its own parent".into(),
        ));
    }
    // Fail fast, before reading photos, when no feature-server is known.
    let info = ctx.model()?;
    let limit = photo_limit(ctx, &info);
    let mut acc = Accepted::default();
    let mut chunk: Vec<Pending> = Vec::new();
    let mut chunk_bytes = 0usize;
    let mut photos = 0usize;
    while let Some(msg) = stream.message().await.map_err(status_err)? {
        let photo = match msg.item {
            Some(enroll_request::Item::Photo(p)) => p,
            _ => {
                return Err(Error::InvalidArgument(
                    "only the first message of Enroll may be EnrollStart".into(),
                ));
            }
        };
        photos += 1;
        if photos > ctx.config.max_photos_per_enroll {
            return Err(Error::InvalidArgument(format!(
                "more than {} photos in one enroll",
                ctx.config.max_photos_per_enroll
            )));
        }
        if photo.image.is_empty() {
            acc.reject(photo.id, &Error::InvalidArgument("empty image".into()));
            continue;
        }
        if photo.image.len() > limit {
            let e = Error::PhotoTooLarge {
                id: photo.id.clone(),
                bytes: photo.image.len(),
                limit,
            };
            acc.reject(photo.id, &e);
            continue;
        }
        let bytes = photo.image.len();
        let reservation = match ctx.budget.try_reserve(bytes)? {
            Some(r) => r,
            None => {
                // Send what we hold before waiting, so that we wait holding nothing.
                chunk_bytes = 0;
                let held = std::mem::take(&mut chunk);
                embed_chunk(ctx, &tenant_name, &info.model, held, deadline, &mut acc).await?;
                ctx.budget.reserve(bytes, deadline).await?
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
            embed_chunk(ctx, &tenant_name, &info.model, full, deadline, &mut acc).await?;
        }
    }
    embed_chunk(ctx, &tenant_name, &info.model, chunk, deadline, &mut acc).await?;
    let last_photo = Instant::now();
    if photos == 0 {
        return Err(Error::EmptyStream);
    }
    if acc.examples.is_empty() {
        let first = acc
            .rejected
            .first()
            .map(|r| format!("{}: {}", r.id, r.message));
        return Err(Error::NothingAccepted(first.unwrap_or_default()));
    }

    let (tenant, _) = ctx.tenant_named(&tenant_name, &info).await?;
    let store = Arc::clone(ctx.tenants.store());
    let (class_name, parent_name, model) = (
        start.class_name.clone(),
        parent.map(str::to_string),
        info.model.clone(),
    );
    let examples = std::mem::take(&mut acc.examples);
    let name2 = tenant_name.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        store.enroll(
            &name2,
            &EnrollWrite {
                class_name: &class_name,
                parent: parent_name.as_deref(),
                model: &model,
                examples,
            },
        )
    })
    .await
    .map_err(|e| Error::Store(format!("enroll task: {e}")))??;
    tracing::info!(
        tenant = %tenant_name, class = %start.class_name, accepted = acc.accepted, cached = acc.cached,
        rejected = acc.rejected.len(), examples = outcome.examples, revision = outcome.revision, "enrolled"
    );
    ctx.tenants.refresh(&tenant, &info.model).await?;
    ctx.trainer.schedule(&tenant, &info.model);

    let mut time_to_live_ms = 0;
    if start.wait_for_head && ctx.config.default_head.is_trained() {
        wait_for_head(
            ctx,
            &tenant,
            outcome.revision,
            ctx.config.wait_for_head_timeout,
        )
        .await?;
        time_to_live_ms = last_photo.elapsed().as_millis() as u64;
    }
    let set = tenant.current();
    let live = set.live(ctx.config.default_head, &info.model);
    Ok(EnrollResponse {
        class_name: start.class_name,
        parent: outcome.parent.unwrap_or_default(),
        accepted: acc.accepted,
        rejected: acc.rejected,
        head_version: live.as_ref().map(|h| h.meta.version).unwrap_or(0),
        cached: acc.cached,
        examples: outcome.examples,
        head: live.map(|h| h.meta.kind.clone()).unwrap_or_default(),
        time_to_live_ms,
    })
}

/// Looks the chunk's photos up in the tenant's cache and embeds the rest.
async fn embed_chunk(
    ctx: &Ctx,
    tenant: &str,
    model: &str,
    chunk: Vec<Pending>,
    deadline: Deadline,
    acc: &mut Accepted,
) -> Result<()> {
    if chunk.is_empty() {
        return Ok(());
    }
    // Cache lookups: the same photo twice in one enroll, or sent in an earlier one.
    let store = Arc::clone(ctx.tenants.store());
    let hashes: Vec<Hash> = chunk.iter().map(|c| c.hash).collect();
    let (t, m) = (tenant.to_string(), model.to_string());
    let known = tokio::task::spawn_blocking(move || -> Result<Vec<Option<Vec<f32>>>> {
        hashes.iter().map(|h| store.embedding(&t, h, &m)).collect()
    })
    .await
    .map_err(|e| Error::Store(format!("cache lookup: {e}")))??;
    let mut to_embed = Vec::new();
    for (pending, cached) in chunk.into_iter().zip(known) {
        let hash = pending.hash;
        if acc.index.contains_key(&hash) {
            acc.accepted += 1;
            acc.cached += 1;
        } else if let Some(v) = cached.or_else(|| shared_cached(ctx, tenant, model, &hash)) {
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
    let results = ctx.features.embed(items, deadline).await?;
    for (p, r) in to_embed.into_iter().zip(results) {
        match r {
            Ok(v) => {
                acc.index.insert(p.hash, acc.examples.len());
                acc.examples.push((p.hash, v));
                acc.accepted += 1;
            }
            Err(e) => acc.reject(p.id, &e),
        }
    }
    Ok(())
}

/// The content hash of a photo, computed on the blocking pool: 16 MiB of SHA-256 is tens of
/// milliseconds that must not stall the runtime threads serving every other request.
pub(super) async fn hash_of(image: Bytes) -> Result<Hash> {
    tokio::task::spawn_blocking(move || Sha256::digest(&image).into())
        .await
        .map_err(|e| Error::Store(format!("hash task: {e}")))
}

/// With `--share-embedding-cache`, a photo another tenant classified recently is not embedded
/// again; without it the lookup is skipped (tenants' caches stay apart).
fn shared_cached(ctx: &Ctx, tenant: &str, model: &str, hash: &Hash) -> Option<Vec<f32>> {
    if !ctx.config.share_embedding_cache {
        return None;
    }
    let mut cache = ctx
        .cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    cache.get(tenant, model, hash).map(|v| v.as_ref().clone())
}

/// Waits until a trained head of the default kind covering `revision` is live (or its
/// training failed, or `timeout`): the publication wakes us, no polling.
async fn wait_for_head(
    ctx: &Ctx,
    tenant: &crate::tenants::Tenant,
    revision: u64,
    timeout: Duration,
) -> Result<()> {
    let kind = ctx.config.default_head;
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

/// The per-photo byte limit: ours, or the feature-server's if it is lower.
pub(super) fn photo_limit(ctx: &Ctx, info: &ModelInfo) -> usize {
    match info.max_image_bytes {
        0 => ctx.config.max_photo_bytes,
        n => ctx.config.max_photo_bytes.min(n as usize),
    }
}

/// A broken client stream ends the enroll; nothing has been written yet.
fn status_err(s: tonic::Status) -> Error {
    Error::InvalidArgument(format!("enroll stream: {}", s.message()))
}
