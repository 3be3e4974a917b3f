//! ListClasses, RemoveClass, RenameClass and Train: the taxonomy and heads managed from the
//! cached embeddings alone, never the photos.

use std::sync::Arc;

use taxon_proto::v1::{
    ClassInfo, ListClassesRequest, ListClassesResponse, RemoveClassRequest, RemoveClassResponse,
    RenameClassRequest, RenameClassResponse, TrainRequest, TrainResponse,
};
use tonic::Request;

use super::Ctx;
use crate::taxonomy::validate_class_name;
use crate::tenants::Tenant;
use crate::{Error, Result};

pub async fn list(ctx: &Arc<Ctx>, req: Request<ListClassesRequest>) -> Result<ListClassesResponse> {
    let (tenant, info) = ctx.tenant(req.metadata()).await?;
    let set = tenant.current();
    let tax = &set.taxonomy;
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
    let live = set.live(ctx.config.default_head, &info.model);
    Ok(ListClassesResponse {
        classes,
        head_version: live.as_ref().map(|h| h.meta.version).unwrap_or(0),
        head: live.map(|h| h.meta.kind.clone()).unwrap_or_default(),
        model: info.model.clone(),
    })
}

pub async fn remove(
    ctx: &Arc<Ctx>,
    req: Request<RemoveClassRequest>,
) -> Result<RemoveClassResponse> {
    let (tenant, info) = ctx.tenant(req.metadata()).await?;
    let r = req.into_inner();
    validate_class_name(&r.name)?;
    let store = Arc::clone(ctx.tenants.store());
    let name = tenant.name.clone();
    let outcome =
        tokio::task::spawn_blocking(move || store.remove_class(&name, &r.name, r.recursive))
            .await
            .map_err(|e| Error::Store(format!("remove task: {e}")))??;
    tracing::info!(tenant = %tenant.name, removed = ?outcome.removed_classes, examples = outcome.removed_examples, "removed");
    ctx.tenants.refresh(&tenant, &info.model).await?;
    // The live head masks removed classes at once; retrain so it also forgets them.
    ctx.trainer.schedule(&tenant, &info.model);
    Ok(RemoveClassResponse {
        removed_classes: outcome.removed_classes,
        removed_examples: outcome.removed_examples,
        head_version: live_version(ctx, &tenant, &info.model),
    })
}

pub async fn rename(
    ctx: &Arc<Ctx>,
    req: Request<RenameClassRequest>,
) -> Result<RenameClassResponse> {
    let (tenant, info) = ctx.tenant(req.metadata()).await?;
    let r = req.into_inner();
    validate_class_name(&r.name)?;
    validate_class_name(&r.new_name)?;
    let store = Arc::clone(ctx.tenants.store());
    let name = tenant.name.clone();
    let (old, new) = (r.name.clone(), r.new_name.clone());
    tokio::task::spawn_blocking(move || store.rename_class(&name, &old, &new))
        .await
        .map_err(|e| Error::Store(format!("rename task: {e}")))??;
    tracing::info!(tenant = %tenant.name, from = %r.name, to = %r.new_name, "renamed");
    ctx.tenants.refresh(&tenant, &info.model).await?;
    Ok(RenameClassResponse {
        head_version: live_version(ctx, &tenant, &info.model),
    })
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
