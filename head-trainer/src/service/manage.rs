//! ListClasses, RemoveClass, RenameClass and Train: the taxonomy and heads managed from the
//! cached embeddings alone, never the photos. The first three work from the store even before
//! any feature-server has answered; only Train needs the model identity.

use std::sync::Arc;

use taxon_proto::v1::{
    ClassInfo, ListClassesRequest, ListClassesResponse, ModelInfo, RemoveClassRequest,
    RemoveClassResponse, RenameClassRequest, RenameClassResponse, TrainRequest, TrainResponse,
};
use tonic::Request;

use super::Ctx;
use crate::taxonomy::{Taxonomy, class_name};
use crate::tenants::Tenant;
use crate::{Error, Result};

/// Works before any feature-server has answered: the taxonomy is in the store, and only the
/// live head (which needs the model identity) is then left out.
pub async fn list(ctx: &Arc<Ctx>, req: Request<ListClassesRequest>) -> Result<ListClassesResponse> {
    let Ok(info) = ctx.model() else {
        let name = ctx.auth.tenant(req.metadata())?;
        let store = Arc::clone(ctx.tenants.store());
        let snapshot = tokio::task::spawn_blocking(move || store.snapshot(&name, None))
            .await
            .map_err(|e| Error::Store(format!("list task: {e}")))??;
        return Ok(ListClassesResponse {
            classes: class_infos(&snapshot.taxonomy),
            ..Default::default()
        });
    };
    let (tenant, info) = ctx
        .tenant_named(&ctx.auth.tenant(req.metadata())?, &info)
        .await?;
    let set = tenant.current();
    let live = set.live(ctx.config.default_head, &info.model);
    Ok(ListClassesResponse {
        classes: class_infos(&set.taxonomy),
        head_version: live.as_ref().map(|h| h.meta.version).unwrap_or(0),
        head: live.map(|h| h.meta.kind.clone()).unwrap_or_default(),
        model: info.model.clone(),
    })
}

fn class_infos(tax: &Taxonomy) -> Vec<ClassInfo> {
    let mut classes: Vec<ClassInfo> = tax
        .classes
        .values()
        .map(|c| ClassInfo {
            name: c.name.clone(),
            parent: tax.parent_name(c.id).to_string(),
            examples: tax.examples_under(c.id),
            is_parent: tax.is_parent(c.id),
        })
        .collect();
    classes.sort_by(|a, b| (&a.parent, &a.name).cmp(&(&b.parent, &b.name)));
    classes
}

/// The tenant, loaded, when the model identity is known. Before any feature-server has
/// answered, no tenant can have been loaded (loading needs the identity), so a store change
/// made then is simply read when the tenant is first loaded.
async fn loaded_tenant(
    ctx: &Arc<Ctx>,
    md: &tonic::metadata::MetadataMap,
) -> Result<(String, Option<(Arc<Tenant>, Arc<ModelInfo>)>)> {
    let name = ctx.auth.tenant(md)?;
    match ctx.model() {
        Ok(info) => {
            let loaded = ctx.tenant_named(&name, &info).await?;
            Ok((name, Some(loaded)))
        }
        Err(_) => Ok((name, None)),
    }
}

pub async fn remove(
    ctx: &Arc<Ctx>,
    req: Request<RemoveClassRequest>,
) -> Result<RemoveClassResponse> {
    let (name, loaded) = loaded_tenant(ctx, req.metadata()).await?;
    let mut r = req.into_inner();
    r.name = class_name(&r.name)?;
    let store = Arc::clone(ctx.tenants.store());
    let tenant_name = name.clone();
    let outcome =
        tokio::task::spawn_blocking(move || store.remove_class(&tenant_name, &r.name, r.recursive))
            .await
            .map_err(|e| Error::Store(format!("remove task: {e}")))??;
    tracing::info!(tenant = %name, removed = ?outcome.removed_classes, examples = outcome.removed_examples, "removed");
    let mut head_version = 0;
    if let Some((tenant, info)) = loaded {
        ctx.tenants.refresh(&tenant, &info.model).await?;
        // The live head masks removed classes at once; retrain so it also forgets them.
        ctx.trainer.schedule(&tenant, &info.model);
        head_version = live_version(ctx, &tenant, &info.model);
    }
    Ok(RemoveClassResponse {
        removed_classes: outcome.removed_classes,
        removed_examples: outcome.removed_examples,
        head_version,
    })
}

pub async fn rename(
    ctx: &Arc<Ctx>,
    req: Request<RenameClassRequest>,
) -> Result<RenameClassResponse> {
    let (name, loaded) = loaded_tenant(ctx, req.metadata()).await?;
    let mut r = req.into_inner();
    r.name = class_name(&r.name)?;
    r.new_name = class_name(&r.new_name)?;
    let store = Arc::clone(ctx.tenants.store());
    let tenant_name = name.clone();
    let (old, new) = (r.name.clone(), r.new_name.clone());
    tokio::task::spawn_blocking(move || store.rename_class(&tenant_name, &old, &new))
        .await
        .map_err(|e| Error::Store(format!("rename task: {e}")))??;
    tracing::info!(tenant = %name, from = %r.name, to = %r.new_name, "renamed");
    let mut head_version = 0;
    if let Some((tenant, info)) = loaded {
        ctx.tenants.refresh(&tenant, &info.model).await?;
        head_version = live_version(ctx, &tenant, &info.model);
    }
    Ok(RenameClassResponse { head_version })
}

pub async fn train(ctx: &Arc<Ctx>, req: Request<TrainRequest>) -> Result<TrainResponse> {
    let (tenant, info) = ctx.tenant(req.metadata()).await?;
    let kind = Ctx::head_kind(&req.get_ref().head)?.unwrap_or(ctx.config.default_head);
    let head = ctx.trainer.train(&tenant, &info.model, kind).await?;
    Ok(TrainResponse {
        head: kind.to_string(),
        head_version: head.meta.version,
        train_ms: head.meta.train_ms,
        classes: head.meta.classes.len() as u32,
        examples: head.meta.examples as u32,
    })
}

fn live_version(ctx: &Ctx, tenant: &Tenant, model: &str) -> u64 {
    tenant
        .current()
        .live(ctx.config.default_head, model)
        .map(|h| h.meta.version)
        .unwrap_or(0)
}
