//! `client remove` and `client rename`: taxonomy edits that need no photos.

use serde_json::json;
use taxon_proto::v1::{RemoveClassRequest, RenameClassRequest};

use crate::error::Result;
use crate::output;
use crate::{Ctx, Outcome};

#[derive(Debug, clap::Args)]
pub struct RemoveArgs {
    /// The class to remove.
    pub name: String,
    /// Also remove a parent's children (needed to remove a parent).
    #[arg(long, short = 'r')]
    pub recursive: bool,
}

#[derive(Debug, clap::Args)]
pub struct RenameArgs {
    pub old: String,
    pub new: String,
}

pub async fn remove(ctx: &mut Ctx<'_>, args: RemoveArgs) -> Result<Outcome> {
    let conn = ctx.connect().await?;
    let r = conn
        .classifier()
        .remove_class(RemoveClassRequest {
            name: args.name.clone(),
            recursive: args.recursive,
        })
        .await
        .map_err(conn.rpc_error("RemoveClass"))?
        .into_inner();
    if ctx.json {
        output::json_line(
            ctx.out,
            &json!({
                "removed_classes": r.removed_classes,
                "removed_examples": r.removed_examples,
                "head_version": r.head_version,
            }),
        )?;
    } else {
        writeln!(
            ctx.out,
            "removed {} ({} examples); head v{}",
            r.removed_classes.join(", "),
            r.removed_examples,
            r.head_version
        )?;
    }
    Ok(Outcome::Success)
}

pub async fn rename(ctx: &mut Ctx<'_>, args: RenameArgs) -> Result<Outcome> {
    let conn = ctx.connect().await?;
    let r = conn
        .classifier()
        .rename_class(RenameClassRequest {
            name: args.old.clone(),
            new_name: args.new.clone(),
        })
        .await
        .map_err(conn.rpc_error("RenameClass"))?
        .into_inner();
    if ctx.json {
        output::json_line(
            ctx.out,
            &json!({"name": args.old, "new_name": args.new, "head_version": r.head_version}),
        )?;
    } else {
        writeln!(
            ctx.out,
            "renamed {} to {}; head v{}",
            args.old, args.new, r.head_version
        )?;
    }
    Ok(Outcome::Success)
}
