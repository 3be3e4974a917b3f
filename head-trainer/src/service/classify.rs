//! Classify and ClassifyStream: an image in, ranked children, the parent and a decision out.
//!
//! The embedding comes from, in order: the in-memory LRU of recently classified photos, the
//! tenant's persistent cache (enrolled photos), and only then the feature-server. The head
//! answering is read once per request from the tenant's published set, so a head swapped in
//! mid-request never mixes with the old one. Classes removed since the head was trained are
//! masked out and the rest renormalised, so a remove is effective before any retraining.

use std::sync::Arc;

use futures::StreamExt;
use prost::bytes::Bytes;
use taxon_proto::v1::{
    ClassScore, ClassifyRequest, ClassifyResponse, ClassifyStreamRequest, ClassifyStreamResponse,
    Decision as WireDecision, ItemError, ModelInfo, classify_stream_response,
};
use tonic::{Request, Streaming};

use super::{ClassifyStream, Ctx};
use crate::decision::{Decision, Scored, decide};
use crate::tenants::Tenant;
use crate::{Error, Result};

/// Images of one ClassifyStream processed at the same time.
const STREAM_CONCURRENCY: usize = 8;

pub async fn classify(ctx: &Arc<Ctx>, req: Request<ClassifyRequest>) -> Result<ClassifyResponse> {
    let (tenant, info) = ctx.tenant(req.metadata()).await?;
    let deadline = ctx.deadline(req.metadata());
    let r = req.into_inner();
    classify_image(ctx, &tenant, &info, r.image, r.top_k, &r.head, deadline).await
}

pub async fn classify_stream(
    ctx: Arc<Ctx>,
    req: Request<Streaming<ClassifyStreamRequest>>,
) -> Result<ClassifyStream> {
    let (tenant, info) = ctx.tenant(req.metadata()).await?;
    // A stream may run for hours: each item gets our deadline from when it arrives, bounded
    // by the caller's deadline for the whole stream.
    let caller = super::caller_deadline(req.metadata());
    let input = req.into_inner();
    let out = input
        .map(move |item| {
            let (ctx, tenant, info) = (Arc::clone(&ctx), Arc::clone(&tenant), Arc::clone(&info));
            async move {
                let item = item?;
                let deadline = ctx.deadline_within(caller);
                let result = match classify_image(
                    &ctx, &tenant, &info, item.image, item.top_k, &item.head, deadline,
                )
                .await
                {
                    Ok(c) => classify_stream_response::Result::Classification(c),
                    Err(e) => classify_stream_response::Result::Error(ItemError {
                        code: e.code() as i32,
                        message: e.to_string(),
                    }),
                };
                Ok(ClassifyStreamResponse {
                    id: item.id,
                    result: Some(result),
                })
            }
        })
        .buffer_unordered(STREAM_CONCURRENCY);
    Ok(Box::pin(out))
}

/// Classifies one encoded image for a tenant.
pub async fn classify_image(
    ctx: &Ctx,
    tenant: &Tenant,
    info: &ModelInfo,
    image: Bytes,
    top_k: u32,
    head: &str,
    deadline: tokio::time::Instant,
) -> Result<ClassifyResponse> {
    let kind = Ctx::head_kind(head)?;
    let set = tenant.current();
    if set.taxonomy.leaves().is_empty() || set.prototype.is_none() {
        return Err(Error::NoClasses(tenant.name.clone()));
    }
    if image.is_empty() {
        return Err(Error::InvalidArgument("empty image".into()));
    }
    let limit = super::enroll::photo_limit(ctx, info);
    if image.len() > limit {
        return Err(Error::PhotoTooLarge {
            id: String::new(),
            bytes: image.len(),
            limit,
        });
    }
    let head = match kind {
        None => set
            .live(ctx.config.default_head, &info.model)
            .ok_or_else(|| Error::NoClasses(tenant.name.clone()))?,
        Some(k) => set.head(k)?,
    };
    let embedding = {
        let _bytes = ctx.budget.reserve(image.len(), deadline).await?;
        embedding_of(ctx, &tenant.name, &info.model, image, deadline).await?
    };
    // Head inference on the blocking pool: a hierarchical head over many classes is
    // milliseconds of tensor code that must not stall the runtime threads.
    let (h, prototype, model) = (Arc::clone(&head), set.prototype.clone(), info.model.clone());
    let (pred, similarity) = tokio::task::spawn_blocking(move || -> Result<_> {
        let pred = h.predict(&model, &embedding)?;
        let similarity = match (pred.similarity, &prototype) {
            (Some(s), _) => s,
            (None, Some(p)) => p.predict(&model, &embedding)?.similarity.unwrap_or(1.0),
            (None, None) => 1.0,
        };
        Ok((pred, similarity))
    })
    .await
    .map_err(|e| Error::Model(candle_core::Error::Msg(format!("head task: {e}"))))??;
    let tax = &set.taxonomy;
    // Mask classes removed since the head was trained, renormalise the rest.
    let mut scored: Vec<Scored> = head
        .meta
        .classes
        .iter()
        .zip(&pred.probs)
        .filter(|(c, _)| tax.classes.get(c).is_some_and(|e| e.examples > 0))
        .map(|(&class, &probability)| Scored {
            class,
            group: tax.group_of(class),
            probability,
        })
        .collect();
    let total: f32 = scored.iter().map(|s| s.probability).sum();
    if scored.is_empty() || total <= 0.0 {
        return Err(Error::NoClasses(tenant.name.clone()));
    }
    for s in &mut scored {
        s.probability /= total;
    }
    let outcome = decide(
        &scored,
        Some(similarity),
        |g| tax.is_parent(g),
        &ctx.config.thresholds,
    );
    let k = if top_k == 0 { 5 } else { top_k as usize };
    let children = outcome
        .ranked
        .iter()
        .take(k)
        .map(|s| ClassScore {
            name: tax.name(s.class).to_string(),
            probability: s.probability,
            parent: tax.parent_name(s.class).to_string(),
        })
        .collect();
    let (group, group_p) = outcome.best_group;
    let parent = ClassScore {
        name: tax.name(group).to_string(),
        probability: group_p,
        parent: String::new(),
    };
    let (decision, label) = match outcome.decision {
        Decision::Child(c) => (WireDecision::Child, tax.name(c).to_string()),
        Decision::Parent(p) => (WireDecision::Parent, tax.name(p).to_string()),
        Decision::Unknown => (WireDecision::Unknown, String::new()),
    };
    let parent_branch = pred.parent_branch.as_ref().and_then(|probs| {
        let (i, p) = probs.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1))?;
        let g = *head.meta.groups.get(i)?;
        Some(ClassScore {
            name: tax.name(g).to_string(),
            probability: *p,
            parent: String::new(),
        })
    });
    Ok(ClassifyResponse {
        children,
        parent: Some(parent),
        decision: decision as i32,
        label,
        probability: outcome.probability,
        head_version: head.meta.version,
        head: head.meta.kind.clone(),
        similarity,
        parent_branch,
    })
}

/// The embedding of a photo: LRU, then the tenant's store, then the feature-server.
async fn embedding_of(
    ctx: &Ctx,
    tenant: &str,
    model: &str,
    image: Bytes,
    deadline: tokio::time::Instant,
) -> Result<Arc<Vec<f32>>> {
    let hash = super::enroll::hash_of(image.clone()).await?;
    let cached = ctx
        .cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(tenant, model, &hash);
    if let Some(v) = cached {
        return Ok(v);
    }
    let store = Arc::clone(ctx.tenants.store());
    let (t, m) = (tenant.to_string(), model.to_string());
    let stored = tokio::task::spawn_blocking(move || store.embedding(&t, &hash, &m))
        .await
        .map_err(|e| Error::Store(format!("cache lookup: {e}")))??;
    let v = match stored {
        Some(v) => Arc::new(v),
        None => {
            let mut r = ctx
                .features
                .embed(vec![(String::new(), image)], deadline)
                .await?;
            Arc::new(
                r.pop()
                    .ok_or_else(|| Error::Unavailable("empty answer".into()))??,
            )
        }
    };
    ctx.cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .put(tenant, model, &hash, Arc::clone(&v));
    Ok(v)
}
