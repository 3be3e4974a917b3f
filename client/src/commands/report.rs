//! `client report [PHOTOS...]`: "is it good enough?" for the tenant's own classes, from the
//! server's cached embeddings alone: leave-one-out accuracy per class, the pairs most often
//! confused, classes that need more photos, and photos that look mislabelled. The server
//! keeps no photos, only their sha256, so PHOTOS (folders, files, globs: the ones enrolled)
//! let the report name the suspects by file.

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::json;
use sha2::{Digest, Sha256};
use taxon_proto::v1::{ReportRequest, ReportResponse};

use crate::error::Result;
use crate::{Ctx, Outcome, files, output};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The photos that were enrolled (folders, files, globs), to name suspects by file.
    pub photos: Vec<String>,
    /// Suspect photos listed at most.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub max_suspects: u32,
}

/// sha256 (hex) -> file, for every readable photo under `inputs`.
fn hashes(inputs: &[String]) -> Result<HashMap<String, PathBuf>> {
    let found = files::collect(inputs, files::DEFAULT_MAX_FILE_BYTES)?;
    let mut out = HashMap::new();
    for path in found.images {
        if let Ok(bytes) = std::fs::read(&path) {
            let hex: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            out.entry(hex).or_insert(path);
        }
    }
    Ok(out)
}

fn pct(p: f32) -> String {
    format!("{:.0} %", 100.0 * p)
}

pub async fn run(ctx: &mut Ctx<'_>, args: Args) -> Result<Outcome> {
    let files = hashes(&args.photos)?;
    let conn = ctx.connect().await?;
    let r = conn
        .classifier()
        .report(ReportRequest {
            max_suspects: args.max_suspects,
        })
        .await
        .map_err(conn.rpc_error("Report"))?
        .into_inner();
    let file_of = |sha: &str| files.get(sha).map(|p| p.display().to_string());
    if ctx.json {
        output::json_line(ctx.out, &to_json(&r, &file_of))?;
        return Ok(Outcome::Success);
    }
    writeln!(
        ctx.out,
        "leave-one-out accuracy {} over {} photos ({})\n",
        pct(r.accuracy),
        r.checked,
        r.method
    )?;
    let rows: Vec<Vec<String>> = r
        .classes
        .iter()
        .map(|c| {
            vec![
                if c.parent.is_empty() {
                    c.name.clone()
                } else {
                    format!("{}/{}", c.parent, c.name)
                },
                c.examples.to_string(),
                c.accuracy.map_or("—".into(), pct),
                if c.confused_with.is_empty() {
                    String::new()
                } else {
                    format!("{} ({}x)", c.confused_with, c.confused_count)
                },
                if c.needs_more_photos {
                    "needs more photos".into()
                } else {
                    String::new()
                },
            ]
        })
        .collect();
    output::table(
        ctx.out,
        &["class", "photos", "estimate", "taken for", ""],
        &[1, 2],
        &rows,
    )?;
    if !r.confused.is_empty() {
        writeln!(ctx.out, "\nmost confused:")?;
        for p in &r.confused {
            writeln!(
                ctx.out,
                "  {} <-> {}: {} and {} photos",
                p.a, p.b, p.a_taken_for_b, p.b_taken_for_a
            )?;
        }
    }
    if !r.suspects.is_empty() {
        writeln!(
            ctx.out,
            "\nphotos nearer another class than their own (mislabelled?):"
        )?;
        for s in &r.suspects {
            let photo = file_of(&s.sha256).unwrap_or_else(|| format!("sha256 {}", &s.sha256[..12]));
            writeln!(
                ctx.out,
                "  {photo} ({}): nearer {} ({:.2} vs {:.2})",
                s.class_name, s.nearer_class, s.nearer_similarity, s.own_similarity
            )?;
        }
    }
    Ok(Outcome::Success)
}

fn to_json(r: &ReportResponse, file_of: &dyn Fn(&str) -> Option<String>) -> serde_json::Value {
    json!({
        "accuracy": r.accuracy,
        "checked": r.checked,
        "method": r.method,
        "model": r.model,
        "classes": r.classes.iter().map(|c| json!({
            "name": c.name, "parent": c.parent, "examples": c.examples,
            "accuracy": c.accuracy, "confused_with": c.confused_with,
            "confused_count": c.confused_count, "needs_more_photos": c.needs_more_photos,
        })).collect::<Vec<_>>(),
        "confused": r.confused.iter().map(|p| json!({
            "a": p.a, "b": p.b, "a_taken_for_b": p.a_taken_for_b, "b_taken_for_a": p.b_taken_for_a,
        })).collect::<Vec<_>>(),
        "suspects": r.suspects.iter().map(|s| json!({
            "class": s.class_name, "sha256": s.sha256, "file": file_of(&s.sha256),
            "nearer_class": s.nearer_class, "own_similarity": s.own_similarity,
            "nearer_similarity": s.nearer_similarity,
        })).collect::<Vec<_>>(),
    })
}
