//! `client export` and `client import`: a tenant as one image-free file (taxonomy, the
//! examples' embeddings and photo hashes, class means, trained heads, model identity), to
//! back it up or move it to another tenant or server without sending a photo again.

use std::path::{Path, PathBuf};

use serde_json::json;
use taxon_proto::v1::ExportRequest;

use crate::connect::Conn;
use crate::error::{Error, Result};
use crate::output;
use crate::{Ctx, Outcome};

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Where to write the file (safetensors with JSON metadata); replaced whole, never left
    /// half-written.
    pub file: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// A file written by `client export`.
    pub file: PathBuf,
}

pub async fn export(ctx: &mut Ctx<'_>, args: ExportArgs) -> Result<Outcome> {
    let conn = ctx.connect().await?;
    let file = download(&conn).await?;
    write_whole(&args.file, &file)?;
    if ctx.json {
        output::json_line(
            ctx.out,
            &json!({"file": args.file.display().to_string(), "bytes": file.len()}),
        )?;
    } else {
        writeln!(
            ctx.out,
            "exported {} bytes to {}",
            file.len(),
            args.file.display()
        )?;
    }
    Ok(Outcome::Success)
}

/// The tenant's file, from `Export`'s chunks.
pub async fn download(conn: &Conn) -> Result<Vec<u8>> {
    let mut stream = conn
        .classifier()
        .export(ExportRequest {})
        .await
        .map_err(conn.rpc_error("Export"))?
        .into_inner();
    let mut file = Vec::new();
    while let Some(chunk) = stream.message().await.map_err(conn.rpc_error("Export"))? {
        file.extend_from_slice(&chunk.data);
    }
    Ok(file)
}

/// Writes `bytes` beside `path` and renames it over `path`: a crash leaves the old file or
/// the new one, never a torn one.
pub fn write_whole(path: &Path, bytes: &[u8]) -> Result<()> {
    let partial = path.with_extension("partial");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::File { path, source }
    };
    std::fs::write(&partial, bytes).map_err(io(&partial))?;
    std::fs::rename(&partial, path).map_err(io(path))
}

pub async fn import(ctx: &mut Ctx<'_>, args: ImportArgs) -> Result<Outcome> {
    let file = std::fs::read(&args.file).map_err(|source| Error::File {
        path: args.file.clone(),
        source,
    })?;
    let chunks = taxon_proto::file_chunks(file.into());
    let conn = ctx.connect().await?;
    let r = conn
        .classifier()
        .import(futures::stream::iter(chunks))
        .await
        .map_err(conn.rpc_error("Import"))?
        .into_inner();
    if ctx.json {
        output::json_line(
            ctx.out,
            &json!({
                "model": r.model,
                "classes": r.classes,
                "examples": r.examples,
                "heads": r.heads,
                "head": r.head,
                "head_version": r.head_version,
            }),
        )?;
    } else {
        writeln!(
            ctx.out,
            "imported {} classes, {} examples and heads [{}] of {}; live head {} v{}",
            r.classes,
            r.examples,
            r.heads.join(", "),
            r.model,
            r.head,
            r.head_version
        )?;
    }
    Ok(Outcome::Success)
}
