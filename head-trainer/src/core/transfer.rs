//! Export and import: a tenant as one file ([`crate::tenant_file`]) and back, so that a
//! taxonomy and its heads move to another tenant or another server without a photo being
//! sent again. Both hold their bytes (twice: the file and its decoded copy) in the in-flight
//! budget that photos share, and both are bounded by `--max-transfer-bytes`, so a transfer
//! never takes memory that no limit accounts for.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};

use super::{Caller, Core, Imported};
use crate::heads::{Head, HeadMeta, TrainOptions};
use crate::inflight::Reservation;
use crate::store::{HeadStamp, ImportClass, ImportWrite, Snapshot, Store};
use crate::tenant_file::{FileClass, FileExample, TenantFile};
use crate::tenants::{prototype_of, stored_heads};
use crate::{Error, Result};

/// Bytes per example in a file beyond its embedding: the class index and the photo hash.
const EXAMPLE_OVERHEAD: u64 = 4 + 32;
/// What an import reserves of the in-flight budget at a time as its file arrives.
const RESERVE_STEP: usize = 4 << 20;

impl Core {
    /// The caller's tenant as a file: taxonomy, embeddings, class means and trained heads.
    pub async fn export(&self, caller: &Caller) -> Result<Vec<u8>> {
        self.admit(caller)?;
        let model = self.model()?;
        let deadline = self.deadline_within(caller.deadline);
        let limit = self.config.transfer_limit();
        // The size is known from the example counts before any embedding is read, so that a
        // tenant too large to export costs one small read, not its whole file in memory.
        let name = caller.tenant.clone();
        let counts = self
            .blocking("export", move |store| store.snapshot(&name, None))
            .await?
            .taxonomy;
        let examples: u64 = counts.classes.values().map(|c| u64::from(c.examples)).sum();
        let estimate = examples * (u64::from(model.dim) * 4 + EXAMPLE_OVERHEAD);
        if estimate > limit as u64 {
            return Err(Error::FileTooLarge {
                bytes: estimate,
                limit,
            });
        }
        let _held = self.budget.reserve(2 * estimate as usize, deadline).await?;
        let (tenant, id, dim) = (caller.tenant.clone(), model.id.clone(), model.dim as usize);
        let opts = self.config.train.clone();
        let bytes = self
            .blocking("export", move |store| {
                let snap = store.snapshot(&tenant, Some(&id))?;
                if snap.examples.is_empty() {
                    return Err(Error::NoClasses(tenant));
                }
                let heads = stored_heads(store, &tenant)?;
                file_of(
                    &snap,
                    heads.into_values().collect(),
                    &id,
                    dim,
                    &tenant,
                    &opts,
                )?
                .encode()
            })
            .await?;
        if bytes.len() > limit {
            return Err(Error::FileTooLarge {
                bytes: bytes.len() as u64,
                limit,
            });
        }
        tracing::info!(tenant = %caller.tenant, bytes = bytes.len(), "exported");
        Ok(bytes)
    }

    /// Loads a file from [`Core::export`] into the caller's tenant, which must be empty. The
    /// file's model identity must be this server's: embeddings and heads of another backbone
    /// would answer nonsense.
    pub async fn import(
        &self,
        caller: &Caller,
        mut chunks: impl Stream<Item = Result<Bytes>> + Send + Unpin,
    ) -> Result<Imported> {
        self.admit(caller)?;
        let _own = self
            .admission
            .enroll_place(&caller.tenant)
            .inspect_err(|e| self.metrics.refused(e))?;
        let model = self.model()?;
        let deadline = self.deadline_within(caller.deadline);
        let _place = self.uploads.enter(deadline).await?;
        let limit = self.config.transfer_limit();
        // Fail fast, before the file is read: the store checks again in its transaction.
        let name = caller.tenant.clone();
        let existing = self
            .blocking("import", move |store| store.snapshot(&name, None))
            .await?
            .taxonomy;
        crate::store::check_empty(&caller.tenant, &existing)?;
        let mut bytes = Vec::new();
        // Reserved in steps, so that a file sent in tiny chunks holds a few reservations.
        let (mut held, mut reserved): (Vec<Reservation>, usize) = (Vec::new(), 0);
        loop {
            let next = tokio::time::timeout_at(deadline, chunks.next())
                .await
                .map_err(|_| {
                    Error::DeadlineExceeded("the import file was still arriving".into())
                })?;
            let Some(chunk) = next else { break };
            let chunk = chunk?;
            let total = bytes.len() + chunk.len();
            if total > limit {
                return Err(Error::FileTooLarge {
                    bytes: total as u64,
                    limit,
                });
            }
            if 2 * total > reserved {
                let more = (2 * total - reserved)
                    .max(RESERVE_STEP)
                    .min(2 * limit - reserved);
                held.push(self.budget.reserve(more, deadline).await?);
                reserved += more;
            }
            bytes.extend_from_slice(&chunk);
        }
        if bytes.is_empty() {
            return Err(Error::InvalidArgument(
                "empty import: send the file `client export` wrote".into(),
            ));
        }
        let file = tokio::task::spawn_blocking(move || TenantFile::decode(&bytes))
            .await
            .map_err(|e| Error::Store(format!("import task: {e}")))??;
        if file.model != model.id || file.dim != model.dim as usize {
            return Err(Error::Precondition(format!(
                "the file holds embeddings and heads of model `{}` (dim {}), this server \
                 embeds with `{}` (dim {}): import it into a server running that model, or \
                 enroll the photos here again",
                file.model, file.dim, model.id, model.dim
            )));
        }
        let summary = (file.classes.len(), file.examples.len());
        let (classes, kinds) = import_classes(&file);
        let quotas = *self.admission.quotas();
        // The file's examples go here: `classes` holds them now.
        let TenantFile {
            tenant: source,
            heads,
            ..
        } = file;
        let mut heads: HashMap<String, Head> = heads
            .into_iter()
            .filter(|h| h.kind().is_trained())
            .map(|h| (h.meta.kind.clone(), h))
            .collect();
        let (tenant, id) = (caller.tenant.clone(), model.id.clone());
        let outcome = self
            .blocking("import", move |store: &dyn Store| {
                let write = ImportWrite {
                    model: &id,
                    classes,
                    heads: kinds,
                    quotas,
                };
                store.import(&tenant, &write, &mut |kind, stamp| {
                    stamped(&mut heads, kind, stamp)
                })
            })
            .await?;
        // The file's decoded copies are gone once the store has them.
        drop(held);
        tracing::info!(tenant = %caller.tenant, classes = summary.0, examples = summary.1, heads = ?outcome.heads, source = %source, "imported");
        let tenant = self.tenants.reload(&caller.tenant, &model.id).await?;
        self.train_if_stale(&tenant, &model.id);
        Ok(Imported {
            model: model.id.clone(),
            classes: count(summary.0)?,
            examples: count(summary.1)?,
            heads: outcome.heads.into_iter().map(|(kind, _)| kind).collect(),
            head: self.live(&tenant, &model.id),
        })
    }
}

/// The file of a snapshot: classes in id order (a parent is always created before its
/// children, so it comes first), and the heads that speak of this taxonomy's classes only,
/// with ids turned into indices. A head naming a removed class is left out: the importing
/// server trains its own.
fn file_of(
    snap: &Snapshot,
    heads: Vec<Arc<Head>>,
    model: &str,
    dim: usize,
    tenant: &str,
    opts: &TrainOptions,
) -> Result<TenantFile> {
    let tax = &snap.taxonomy;
    let index: HashMap<u64, usize> = tax
        .classes
        .keys()
        .enumerate()
        .map(|(i, &id)| (id, i))
        .collect();
    let mut classes = Vec::with_capacity(tax.classes.len());
    for (i, c) in tax.classes.values().enumerate() {
        let parent = c.parent.and_then(|p| index.get(&p).copied());
        if parent.is_some_and(|p| p >= i) {
            return Err(Error::Corrupt(format!(
                "class `{}` was created before its parent",
                c.name
            )));
        }
        classes.push(FileClass {
            name: c.name.clone(),
            parent,
            examples: c.examples,
        });
    }
    let examples = snap
        .examples
        .iter()
        .zip(&snap.hashes)
        .map(|((class, v), hash)| FileExample {
            class: index[class],
            hash: *hash,
            embedding: v.clone(),
        })
        .collect();
    let to_index = |ids: &[u64]| -> Option<Vec<u64>> {
        ids.iter()
            .map(|id| index.get(id).map(|&i| i as u64))
            .collect()
    };
    let mut out = Vec::with_capacity(heads.len() + 1);
    let prototype = prototype_of(snap, model, opts)?.map(Arc::new);
    for h in prototype.into_iter().chain(heads) {
        if h.meta.model != model {
            continue;
        }
        let (Some(classes), Some(groups)) = (to_index(&h.meta.classes), to_index(&h.meta.groups))
        else {
            continue;
        };
        let mut head = Arc::unwrap_or_clone(h);
        head.meta = HeadMeta {
            classes,
            groups,
            ..head.meta
        };
        out.push(head);
    }
    out.sort_by(|a, b| a.meta.kind.cmp(&b.meta.kind));
    Ok(TenantFile {
        model: model.to_string(),
        dim,
        tenant: tenant.to_string(),
        classes,
        examples,
        heads: out,
    })
}

/// What the store write of a decoded file holds: each class with its examples, and the
/// kinds of its trained heads.
fn import_classes(file: &TenantFile) -> (Vec<ImportClass>, Vec<String>) {
    let mut classes: Vec<ImportClass> = file
        .classes
        .iter()
        .map(|c| ImportClass {
            name: c.name.clone(),
            parent: c.parent,
            examples: Vec::new(),
        })
        .collect();
    for e in &file.examples {
        classes[e.class]
            .examples
            .push((e.hash, e.embedding.clone()));
    }
    let kinds = file
        .trained_kinds()
        .iter()
        .map(|k| k.as_str().to_string())
        .collect();
    (classes, kinds)
}

/// A file's head with the ids, revision and version the import gave it, as stored bytes.
fn stamped(
    heads: &mut HashMap<String, Head>,
    kind: &str,
    stamp: &HeadStamp<'_>,
) -> Result<Vec<u8>> {
    let head = heads
        .get_mut(kind)
        .ok_or_else(|| Error::Corrupt(format!("no `{kind}` head to import")))?;
    let id = |i: &u64| -> Result<u64> {
        usize::try_from(*i)
            .ok()
            .and_then(|i| stamp.ids.get(i).copied())
            .ok_or_else(|| Error::Corrupt(format!("`{kind}` head names class index {i}")))
    };
    let mut meta = head.meta.clone();
    meta.classes = meta.classes.iter().map(id).collect::<Result<_>>()?;
    meta.groups = meta.groups.iter().map(id).collect::<Result<_>>()?;
    meta.revision = stamp.revision;
    meta.version = stamp.version;
    Head {
        meta,
        net: head.net.clone(),
    }
    .to_bytes()
}

fn count(n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::Corrupt(format!("{n} is more than a file can hold")))
}
