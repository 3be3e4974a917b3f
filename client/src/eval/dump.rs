//! `eval --save-embeddings DIR`: what an outside check needs to run its own heads on exactly
//! the embeddings and splits this evaluation used, and to set their answers beside ours.
//!
//! Why: a comparison with another implementation (scikit-learn, PyTorch) is only like for
//! like when both see the same numbers. So the embeddings are not recomputed elsewhere: every
//! photo of the dataset is enrolled once into a scratch tenant and that tenant is exported
//! (the head-trainer's own cached embeddings, four views averaged, with each photo's sha256).
//! With `--share-embedding-cache` on the server, the seeds' tenants then reuse those
//! embeddings instead of embedding their photos again.
//!
//! Files, all paths relative to the dataset's root:
//! - `embeddings.safetensors`: the export (format `taxon-heads`, see the head-trainer's
//!   tenant_file.rs): `examples.embedding`, `examples.class`, `examples.hash`;
//! - `photos.tsv`: `path`, `parent`, `child`, `sha256` per photo;
//! - `splits.jsonl`: one `{"k", "seed", "train": [path], "test": [path]}` per (k, seed);
//! - `predictions.jsonl`: one `{"k", "seed", "head", "answered_by", "train_ms", "test":
//!   [{"path", "predicted", "confidence"}]}` per (k, seed, head); `head` is empty for the
//!   default head.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use futures::{StreamExt, TryStreamExt};
use indicatif::ProgressBar;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::protocol::{self, SeedRun, Split};
use crate::commands::enroll::enroll_class;
use crate::commands::transfer;
use crate::connect::Conn;
use crate::dataset::Dataset;
use crate::error::{Error, Result};

/// Enroll streams in flight at once while embedding the whole set: enough to keep the
/// feature-server's batches full.
const ENROLL_CONCURRENCY: usize = 4;

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::File {
        path: path.to_path_buf(),
        source,
    }
}

/// `path` relative to the dataset's root, with `/` separators, as every file here names it.
pub fn relative(ds: &Dataset, path: &Path) -> String {
    let rel = path.strip_prefix(&ds.root).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// Embeds every photo of `ds` through `conn`'s (fresh) tenant, writes the export and
/// `photos.tsv` into `dir`, and removes what it enrolled. Returns the photos written.
pub async fn embeddings(conn: &Conn, ds: &Dataset, dir: &Path, pb: &ProgressBar) -> Result<usize> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    pb.set_message("embedding every photo once (--save-embeddings)");
    let result = async {
        futures::stream::iter(
            ds.children
                .iter()
                .map(|c| enroll_class(conn, &c.name, &c.parent, false, &c.images, pb)),
        )
        .buffer_unordered(ENROLL_CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
        transfer::download(conn).await
    }
    .await;
    let failures = protocol::clean_up(conn, ds).await;
    let file = result?;
    if let Some(f) = failures.first() {
        tracing::warn!(failure = %f, "could not remove the embedding tenant's classes");
    }
    transfer::write_whole(&dir.join("embeddings.safetensors"), &file)?;
    let mut tsv = String::from("path\tparent\tchild\tsha256\n");
    let mut n = 0;
    for c in &ds.children {
        for p in &c.images {
            let bytes = std::fs::read(p).map_err(io_error(p))?;
            let hash = Sha256::digest(&bytes);
            let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
            tsv += &format!("{}\t{}\t{}\t{hex}\n", relative(ds, p), c.parent, c.name);
            n += 1;
        }
    }
    transfer::write_whole(&dir.join("photos.tsv"), tsv.as_bytes())?;
    Ok(n)
}

/// Writes `splits.jsonl`.
pub fn splits(ds: &Dataset, dir: &Path, plan: &[(usize, u64, Split)]) -> Result<()> {
    let mut out = Vec::new();
    for (k, seed, split) in plan {
        let train: Vec<String> = split
            .train
            .iter()
            .flatten()
            .map(|p| relative(ds, p))
            .collect();
        let test: Vec<String> = split.test.iter().map(|(_, p)| relative(ds, p)).collect();
        let line = json!({"k": k, "seed": seed, "train": train, "test": test});
        writeln!(out, "{line}").map_err(io_error(dir))?;
    }
    transfer::write_whole(&dir.join("splits.jsonl"), &out)
}

/// Writes `predictions.jsonl`: every head's top-1 answer and its probability per test photo.
pub fn predictions(
    ds: &Dataset,
    dir: &Path,
    plan: &[(usize, u64, Split)],
    runs: &[SeedRun],
) -> Result<()> {
    let mut out = Vec::new();
    for run in runs {
        let Some((_, _, split)) = plan.iter().find(|p| p.0 == run.k && p.1 == run.seed) else {
            continue;
        };
        let paths: Vec<&PathBuf> = split.test.iter().map(|(_, p)| p).collect();
        for h in &run.heads {
            let test: Vec<_> = paths
                .iter()
                .zip(&h.preds)
                .map(|(p, pred)| {
                    json!({
                        "path": relative(ds, p),
                        "predicted": pred.predicted,
                        "confidence": pred.confidence,
                    })
                })
                .collect();
            let line = json!({
                "k": run.k, "seed": run.seed, "head": h.head, "answered_by": h.answered_by,
                "train_ms": h.train_ms, "test": test,
            });
            writeln!(out, "{line}").map_err(io_error(dir))?;
        }
    }
    transfer::write_whole(&dir.join("predictions.jsonl"), &out)
}
