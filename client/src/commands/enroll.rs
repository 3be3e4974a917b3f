//! `client enroll`: stream photos of one class (or a whole dataset tree, one stream per child)
//! to the head-trainer, with a progress bar and a summary of what was kept and why not.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use serde::Serialize;
use taxon_proto::v1::enroll_request::Item;
use taxon_proto::v1::{EnrollRequest, EnrollResponse, EnrollStart, Photo};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::connect::Conn;
use crate::error::{Error, Result, code_name};
use crate::files::{self, Skipped};
use crate::output::{self, human_duration};
use crate::{Ctx, Outcome, dataset};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The class the photos show, e.g. `mymug`; created if new.
    #[arg(long, required_unless_present = "dataset", conflicts_with = "dataset")]
    pub class: Option<String>,
    /// Optional parent class, e.g. `kitchenware`; created if new.
    #[arg(long, default_value = "", conflicts_with = "dataset")]
    pub parent: String,
    /// Reply only once a trained head including these photos is live.
    #[arg(long)]
    pub wait: bool,
    /// Enroll a whole `<parent>/<child>/*.jpg` tree, one class per child folder.
    #[arg(long, value_name = "ROOT")]
    pub dataset: Option<PathBuf>,
    /// Skip files larger than this many MiB (keep it at or below the server's photo limit).
    #[arg(long, default_value_t = files::DEFAULT_MAX_FILE_MIB)]
    pub max_file_mib: u64,
    /// Photos: files, folders (recursive) or glob patterns.
    #[arg(
        value_name = "PATH",
        required_unless_present = "dataset",
        conflicts_with = "dataset"
    )]
    pub paths: Vec<String>,
}

/// One class's upload as the server saw it, plus the files that vanished before sending.
#[derive(Debug)]
pub struct Enrolled {
    pub response: EnrollResponse,
    pub unread: Vec<Skipped>,
    pub elapsed: Duration,
}

/// Photos per Enroll stream: well under the head-trainer's per-call cap (1000 by default), so a
/// class folder of any size goes through as a few calls instead of failing as one.
const PHOTOS_PER_STREAM: usize = 500;

/// Enrolls `images` as one class, in as few Enroll calls as the server's cap allows (one for
/// any ordinary folder); only the last call waits for the trained head. Shared with the
/// evaluation, which enrolls each child's k training photos the way a user would.
pub async fn enroll_class(
    conn: &Conn,
    class: &str,
    parent: &str,
    wait: bool,
    images: &[PathBuf],
    pb: &ProgressBar,
) -> Result<Enrolled> {
    let started = Instant::now();
    let chunks: Vec<&[PathBuf]> = if images.is_empty() {
        vec![images]
    } else {
        images.chunks(PHOTOS_PER_STREAM).collect()
    };
    let last = chunks.len() - 1;
    let mut total: Option<EnrollResponse> = None;
    let mut unread = Vec::new();
    for (i, chunk) in chunks.into_iter().enumerate() {
        // Made again whole after UNAVAILABLE. Safe to repeat: an example is keyed by its
        // photo's hash, so photos a failed attempt did store count as already embedded.
        let position = pb.position();
        let (r, u) = conn
            .retry()
            .run("Enroll", || {
                pb.set_position(position);
                enroll_stream(conn, class, parent, wait && i == last, chunk, pb)
            })
            .await
            .map_err(conn.rpc_error("Enroll"))?;
        unread.extend(u);
        total = Some(match total {
            None => r,
            Some(mut t) => {
                t.accepted += r.accepted;
                t.cached += r.cached;
                t.rejected.extend(r.rejected);
                t.examples = r.examples;
                t.head_version = r.head_version;
                t.head = r.head;
                t.time_to_live_ms = r.time_to_live_ms;
                t.estimated_accuracy = r.estimated_accuracy;
                t
            }
        });
    }
    Ok(Enrolled {
        response: total.unwrap_or_default(),
        unread,
        elapsed: started.elapsed(),
    })
}

/// One Enroll call: the start message, then the photos as they are read from disk.
async fn enroll_stream(
    conn: &Conn,
    class: &str,
    parent: &str,
    wait: bool,
    images: &[PathBuf],
    pb: &ProgressBar,
) -> std::result::Result<(EnrollResponse, Vec<Skipped>), tonic::Status> {
    // A small buffer: the bar then tracks what was handed to the transport, not what was read.
    let (tx, rx) = mpsc::channel(2);
    let start = EnrollRequest {
        item: Some(Item::Start(EnrollStart {
            class_name: class.to_string(),
            parent: parent.to_string(),
            wait_for_head: wait,
        })),
    };
    let files = images.to_vec();
    let bar = pb.clone();
    let feeder = tokio::spawn(async move {
        let mut unread = Vec::new();
        if tx.send(start).await.is_err() {
            return unread;
        }
        for path in files {
            match tokio::fs::read(&path).await {
                Ok(image) => {
                    let photo = Photo {
                        id: path.display().to_string(),
                        image: image.into(),
                    };
                    let msg = EnrollRequest {
                        item: Some(Item::Photo(photo)),
                    };
                    if tx.send(msg).await.is_err() {
                        break; // the call failed; its status says why
                    }
                }
                Err(e) => unread.push(Skipped {
                    path,
                    reason: format!("cannot read: {e}"),
                }),
            }
            bar.inc(1);
        }
        unread
    });
    let response = match conn.classifier().enroll(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            feeder.abort();
            return Err(status);
        }
    };
    let unread = feeder.await.unwrap_or_default();
    Ok((response, unread))
}

#[derive(Serialize)]
struct Rejected<'a> {
    file: &'a str,
    code: i32,
    message: &'a str,
}

#[derive(Serialize)]
struct Summary<'a> {
    class: &'a str,
    parent: &'a str,
    accepted: u32,
    rejected: Vec<Rejected<'a>>,
    skipped: &'a [Skipped],
    head_version: u64,
    head: &'a str,
    cached: u32,
    examples: u32,
    time_to_live_ms: u64,
    /// The class's leave-one-out accuracy (0..1), when the server could estimate it.
    estimated_accuracy: Option<f32>,
    elapsed_ms: u64,
}

pub async fn run(ctx: &mut Ctx<'_>, args: Args) -> Result<Outcome> {
    let max_bytes = args.max_file_mib.saturating_mul(1024 * 1024);
    let jobs: Vec<(String, String, Vec<PathBuf>)>;
    let skipped: Vec<Skipped>;
    if let Some(root) = &args.dataset {
        let ds = dataset::read(root, max_bytes)?;
        skipped = ds.skipped;
        jobs = ds
            .children
            .into_iter()
            .map(|c| (c.name, c.parent, c.images))
            .collect();
    } else {
        let class = args.class.clone().unwrap_or_default();
        if class.trim().is_empty() {
            return Err(Error::Usage(
                "--class needs a name, e.g. --class mymug".into(),
            ));
        }
        let found = files::collect(&args.paths, max_bytes)?;
        if found.images.is_empty() {
            print_skipped(ctx, &found.skipped)?;
            return Err(Error::NoImages {
                skipped: found.skipped.len(),
            });
        }
        skipped = found.skipped;
        jobs = vec![(class, args.parent.clone(), found.images)];
    }
    let conn = ctx.connect().await?;
    let total: usize = jobs.iter().map(|j| j.2.len()).sum();
    let pb = output::progress(total as u64, "photos", ctx.json);
    let dataset_mode = args.dataset.is_some();
    if !ctx.json {
        print_skipped(ctx, &skipped)?;
    }
    let mut accepted_total = 0u32;
    for (i, (class, parent, images)) in jobs.iter().enumerate() {
        pb.set_message(class.clone());
        let last = i + 1 == jobs.len();
        // In dataset mode only the last class waits: one trained head then covers them all.
        let wait = args.wait && (!dataset_mode || last);
        let done = enroll_class(&conn, class, parent, wait, images, &pb).await?;
        accepted_total += done.response.accepted;
        pb.suspend(|| report(ctx, &done, if dataset_mode { &[] } else { &skipped }, wait))?;
    }
    pb.finish_and_clear();
    if accepted_total == 0 {
        return Ok(Outcome::Failed(
            "the server accepted no photo (see the rejections above)".into(),
        ));
    }
    Ok(Outcome::Success)
}

fn print_skipped(ctx: &mut Ctx<'_>, skipped: &[Skipped]) -> Result<()> {
    if ctx.json || skipped.is_empty() {
        return Ok(());
    }
    writeln!(ctx.out, "skipped {} path(s):", skipped.len())?;
    for s in skipped {
        writeln!(ctx.out, "  {}: {}", s.path.display(), s.reason)?;
    }
    Ok(())
}

fn report(ctx: &mut Ctx<'_>, done: &Enrolled, skipped: &[Skipped], waited: bool) -> Result<()> {
    let r = &done.response;
    let mut all_skipped = skipped.to_vec();
    all_skipped.extend(done.unread.iter().cloned());
    if ctx.json {
        let summary = Summary {
            class: &r.class_name,
            parent: &r.parent,
            accepted: r.accepted,
            rejected: r
                .rejected
                .iter()
                .map(|x| Rejected {
                    file: &x.id,
                    code: x.code,
                    message: &x.message,
                })
                .collect(),
            skipped: &all_skipped,
            head_version: r.head_version,
            head: &r.head,
            cached: r.cached,
            examples: r.examples,
            time_to_live_ms: r.time_to_live_ms,
            estimated_accuracy: r.estimated_accuracy,
            elapsed_ms: super::ms(done.elapsed),
        };
        return output::json_line(ctx.out, &summary);
    }
    let out = &mut *ctx.out;
    let parent = if r.parent.is_empty() {
        String::new()
    } else {
        format!(" (parent {})", r.parent)
    };
    writeln!(
        out,
        "{}{parent}: {} accepted ({} already embedded), {} rejected, {} skipped; {} examples now",
        r.class_name,
        r.accepted,
        r.cached,
        r.rejected.len(),
        all_skipped.len(),
        r.examples
    )?;
    if let Some(a) = r.estimated_accuracy {
        writeln!(
            out,
            "  estimated accuracy {:.0} % (its photos, each left out, against every class; \
             `client report` says more)",
            100.0 * a
        )?;
    }
    for s in &done.unread {
        writeln!(out, "  skipped {}: {}", s.path.display(), s.reason)?;
    }
    for x in &r.rejected {
        let code = code_name(x.code);
        writeln!(out, "  rejected {}: {code}: {}", short(&x.id), x.message)?;
    }
    if waited {
        writeln!(
            out,
            "  live head: {} v{}, live {} after the last photo",
            r.head,
            r.head_version,
            human_duration(Duration::from_millis(r.time_to_live_ms))
        )?;
    } else {
        writeln!(
            out,
            "  classifiable now (live head: {} v{}); a trained head follows in the background (--wait waits for it)",
            r.head, r.head_version
        )?;
    }
    writeln!(out, "  took {}", human_duration(done.elapsed))?;
    Ok(())
}

/// Rejections echo our id (the path); the file name is what a person scans for.
fn short(id: &str) -> &str {
    Path::new(id)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(id)
}
