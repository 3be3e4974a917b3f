//! `client info`: what the head-trainer serves (head, version, model, classes), or with
//! `--features` what a feature-server runs (backbone, weights, limits).

use serde_json::json;
use taxon_proto::v1::{InfoRequest, ListClassesRequest};

use crate::connect::{Conn, DEFAULT_FEATURES, Service};
use crate::error::Result;
use crate::output;
use crate::{Ctx, Outcome};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Ask a feature-server instead (its address; 127.0.0.1:50051 when given without one).
    #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = DEFAULT_FEATURES)]
    pub features: Option<String>,
}

pub async fn run(ctx: &mut Ctx<'_>, args: Args) -> Result<Outcome> {
    match args.features {
        Some(url) => features(ctx, &url).await,
        None => head_trainer(ctx).await,
    }
}

async fn head_trainer(ctx: &mut Ctx<'_>) -> Result<Outcome> {
    let conn = ctx.connect().await?;
    let list = conn
        .classifier()
        .list_classes(ListClassesRequest {})
        .await
        .map_err(conn.rpc_error("ListClasses"))?
        .into_inner();
    let children = list.classes.iter().filter(|c| !c.is_parent).count();
    let parents = list.classes.len() - children;
    let examples: u32 = list
        .classes
        .iter()
        .filter(|c| !c.is_parent)
        .map(|c| c.examples)
        .sum();
    if ctx.json {
        output::json_line(
            ctx.out,
            &json!({
                "server": conn.addr, "head": list.head, "head_version": list.head_version,
                "model": list.model, "classes": children, "parents": parents,
                "examples": examples,
            }),
        )?;
    } else {
        let head = if list.head.is_empty() {
            "none yet (enroll photos first)".to_string()
        } else {
            format!("{} v{}", list.head, list.head_version)
        };
        let pairs = [
            ("server", conn.addr.clone()),
            ("head", head),
            ("model", list.model.clone()),
            ("classes", format!("{children} ({parents} parents)")),
            ("examples", examples.to_string()),
        ];
        output::key_values(ctx.out, &pairs)?;
    }
    Ok(Outcome::Success)
}

async fn features(ctx: &mut Ctx<'_>, url: &str) -> Result<Outcome> {
    let conn = Conn::connect(url, Service::FeatureServer, ctx.auth()?, &ctx.tls).await?;
    let i = conn
        .features()
        .info(InfoRequest {})
        .await
        .map_err(conn.rpc_error("Info"))?
        .into_inner();
    if ctx.json {
        output::json_line(
            ctx.out,
            &json!({
                "server": conn.addr, "backbone": i.backbone, "dim": i.dim,
                "weights_sha256": i.weights_sha256, "device": i.device,
                "max_batch": i.max_batch, "max_wait_ms": i.max_wait_ms, "model": i.model,
                "max_image_bytes": i.max_image_bytes, "max_image_pixels": i.max_image_pixels,
                "images_embedded": i.images_embedded, "batches": i.batches,
            }),
        )?;
    } else {
        let pairs = [
            ("server", conn.addr.clone()),
            ("backbone", format!("{} ({}-d)", i.backbone, i.dim)),
            ("weights", format!("sha256:{}", i.weights_sha256)),
            ("device", i.device.clone()),
            (
                "batching",
                format!("up to {} per batch, {} ms wait", i.max_batch, i.max_wait_ms),
            ),
            (
                "limits",
                format!(
                    "{} per image, {} pixels",
                    crate::files::human_bytes(i.max_image_bytes),
                    i.max_image_pixels
                ),
            ),
            (
                "embedded",
                format!(
                    "{} images in {} batches since start",
                    i.images_embedded, i.batches
                ),
            ),
        ];
        output::key_values(ctx.out, &pairs)?;
    }
    Ok(Outcome::Success)
}
