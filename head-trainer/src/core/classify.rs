//! Classify: an image in, ranked children, the parent and a decision out.
//!
//! The embedding comes from, in order: the in-memory LRU of recently classified photos, the
//! tenant's persistent cache (enrolled photos), and only then the feature-server. The head
//! answering is read once per image from the tenant's published set, so a head swapped in
//! mid-request never mixes with the old one. Classes removed since the head was trained are
//! masked out and the rest renormalised, so a remove is effective before any retraining.

use std::sync::Arc;

use bytes::Bytes;
use candle_core::{Device, Tensor};
use tokio::time::Instant;

use super::{Caller, ClassScore, Classification, ClassifyInput, Core, HeadRef, Label};
use crate::decision::{Decision, Scored, Thresholds, decide};
use crate::features::Model;
use crate::heads::HeadKind;
use crate::tenants::Tenant;
use crate::{Error, Result};

/// A tenant resolved once for many images (a stream may run for hours): each image then gets
/// our deadline from when it arrives, bounded by the caller's deadline for the whole session.
pub struct Session {
    tenant: Arc<Tenant>,
    model: Arc<Model>,
    caller_deadline: Option<Instant>,
    trace: taxon_ops::trace::TraceContext,
    /// A stream's place among the image-carrying streams (none for a single Classify).
    _place: Option<crate::inflight::UploadPlace>,
}

impl Core {
    /// Classifies one image.
    pub async fn classify(&self, caller: &Caller, input: ClassifyInput) -> Result<Classification> {
        let session = self.open_session(caller, None).await?;
        self.classify_in(&session, input).await
    }

    /// Loads the caller's tenant for a stream of [`Core::classify_in`] calls; the stream
    /// takes one of the `--max-concurrent-uploads` places while it lives.
    pub async fn session(&self, caller: &Caller) -> Result<Session> {
        let place = self
            .uploads
            .enter(self.deadline_within(caller.deadline))
            .await?;
        self.open_session(caller, Some(place)).await
    }

    async fn open_session(
        &self,
        caller: &Caller,
        place: Option<crate::inflight::UploadPlace>,
    ) -> Result<Session> {
        let model = self.model()?;
        let tenant = self.tenant(&caller.tenant, &model).await?;
        Ok(Session {
            tenant,
            model,
            caller_deadline: caller.deadline,
            trace: caller.trace,
            _place: place,
        })
    }

    /// Classifies one image for the session's tenant.
    pub async fn classify_in(
        &self,
        session: &Session,
        input: ClassifyInput,
    ) -> Result<Classification> {
        // Each image is a request for the rate quota, whether alone or in a stream.
        self.admit_tenant(&session.tenant.name)?;
        let deadline = self.deadline_within(session.caller_deadline);
        let (tenant, model) = (&session.tenant, &session.model);
        let set = tenant.current();
        if set.taxonomy.leaves().is_empty() || set.prototype.is_none() {
            return Err(Error::NoClasses(tenant.name.clone()));
        }
        let image = input.image;
        if image.is_empty() {
            return Err(Error::InvalidArgument("empty image".into()));
        }
        let limit = self.photo_limit(model);
        if image.len() > limit {
            return Err(Error::PhotoTooLarge {
                id: String::new(),
                bytes: image.len(),
                limit,
            });
        }
        let head = match input.head {
            None => set
                .live(self.config.default_head, &model.id)
                .ok_or_else(|| Error::NoClasses(tenant.name.clone()))?,
            Some(k) => set.head(k)?,
        };
        let embedding = {
            let _bytes = self.budget.reserve(image.len(), deadline).await?;
            self.embedding_of(&tenant.name, &model.id, image, deadline, session.trace)
                .await?
        };
        // Head inference on the blocking pool: a hierarchical head over many classes is
        // milliseconds of tensor code that must not stall the runtime threads.
        let (h, prototype, m) = (Arc::clone(&head), set.prototype.clone(), model.id.clone());
        let (pred, (similarity, cutoff)) = tokio::task::spawn_blocking(move || -> Result<_> {
            let pred = h.predict(&m, &embedding)?;
            // Open-set rejection asks the tenant's live prototype, always built from its
            // current examples, whichever head answers (see `heads::prototype::OpenSet`).
            let open = prototype
                .as_ref()
                .and_then(|p| p.open_set())
                .map(|o| -> Result<_> {
                    let x = Tensor::from_slice(&embedding, (1, embedding.len()), &Device::Cpu)?;
                    Ok((o.similarity(&x)?, o.cutoff))
                })
                .transpose()?
                .unwrap_or((pred.similarity.unwrap_or(1.0), None));
            Ok((pred, open))
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
        // The tenant's own cut-off, once it has one; the server's until then.
        let thresholds = Thresholds {
            unknown_similarity: cutoff.unwrap_or(self.config.thresholds.unknown_similarity),
            ..self.config.thresholds
        };
        let outcome = decide(&scored, Some(similarity), |g| tax.is_parent(g), &thresholds);
        let k = if input.top_k == 0 {
            5
        } else {
            input.top_k as usize
        };
        let group_score = |id: u64, probability: f32| ClassScore {
            name: tax.name(id).to_string(),
            probability,
            parent: None,
        };
        let children = outcome
            .ranked
            .iter()
            .take(k)
            .map(|s| ClassScore {
                name: tax.name(s.class).to_string(),
                probability: s.probability,
                parent: tax.parent_of(s.class).map(str::to_string),
            })
            .collect();
        let (group, group_p) = outcome.best_group;
        let (label, decision) = match outcome.decision {
            Decision::Child(c) => (Label::Child(tax.name(c).to_string()), "child"),
            Decision::Parent(p) => (Label::Parent(tax.name(p).to_string()), "parent"),
            Decision::Unknown => (Label::Unknown, "unknown"),
        };
        // The label from the fixed set of kinds, whatever a stored head's name says.
        let kind = head
            .meta
            .kind
            .parse::<HeadKind>()
            .map_or("other", HeadKind::as_str);
        self.metrics.classified(kind, decision);
        let parent_branch = pred.parent_branch.as_ref().and_then(|probs| {
            let (i, p) = probs.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1))?;
            let g = *head.meta.groups.get(i)?;
            Some(group_score(g, *p))
        });
        Ok(Classification {
            children,
            parent: group_score(group, group_p),
            label,
            probability: outcome.probability,
            head: HeadRef {
                kind: head.meta.kind.clone(),
                version: head.meta.version,
            },
            similarity,
            parent_branch,
        })
    }

    /// The embedding of a photo: LRU, then the tenant's store, then the feature-server.
    async fn embedding_of(
        &self,
        tenant: &str,
        model: &str,
        image: Bytes,
        deadline: Instant,
        trace: taxon_ops::trace::TraceContext,
    ) -> Result<Arc<Vec<f32>>> {
        let hash = super::enroll::hash_of(image.clone()).await?;
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(tenant, model, &hash);
        if let Some(v) = cached {
            self.metrics.embedding_from("memory");
            return Ok(v);
        }
        let (t, m) = (tenant.to_string(), model.to_string());
        let stored = self
            .blocking("cache lookup", move |store| store.embedding(&t, &hash, &m))
            .await?;
        let v = match stored {
            Some(v) => {
                self.metrics.embedding_from("store");
                Arc::new(v)
            }
            None => {
                self.metrics.embedding_from("feature_server");
                let mut r = self
                    .features
                    .embed(vec![(String::new(), image)], deadline, trace)
                    .await?;
                Arc::new(
                    r.pop()
                        .ok_or_else(|| Error::Unavailable("empty answer".into()))??,
                )
            }
        };
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .put(tenant, model, &hash, Arc::clone(&v));
        Ok(v)
    }
}
