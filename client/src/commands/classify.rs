//! `client classify`: many images over one ClassifyStream, results in the order given.

use std::path::PathBuf;

use indicatif::ProgressBar;
use serde::Serialize;
use taxon_proto::v1::classify_stream_response::Result as Reply;
use taxon_proto::v1::{ClassifyResponse, ClassifyStreamRequest, Decision};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::connect::Conn;
use crate::error::{Error, Result, code_name};
use crate::files;
use crate::output;
use crate::{Ctx, Outcome};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Children to return per image (the table shows them when more than one).
    #[arg(long, default_value_t = 1)]
    pub top_k: u32,
    /// Which head answers: prototype, flat, hierarchical, combined or lda; the live head
    /// when unset.
    #[arg(long, default_value = "")]
    pub head: String,
    /// Skip files larger than this many MiB (keep it at or below the server's photo limit).
    #[arg(long, default_value_t = files::DEFAULT_MAX_FILE_MIB)]
    pub max_file_mib: u64,
    /// Images: files, folders (recursive) or glob patterns.
    #[arg(value_name = "IMG", required = true)]
    pub images: Vec<String>,
}

/// One image's answer, or why there is none (already phrased for a person).
pub type Answer = std::result::Result<ClassifyResponse, String>;

/// Classifies `paths` over one stream and returns the answers in the same order. Shared with
/// the evaluation, which sends every test photo once per head this way.
///
/// When the stream breaks with `UNAVAILABLE` (a replica behind the load balancer died), the
/// answers already received are kept and only the unanswered images are sent again, on a new
/// stream, under the connection's retry policy.
pub async fn classify_many(
    conn: &Conn,
    paths: &[PathBuf],
    top_k: u32,
    head: &str,
    pb: &ProgressBar,
) -> Result<Vec<Answer>> {
    let mut answers: Vec<Option<Answer>> = vec![None; paths.len()];
    let mut attempts = conn.retry().start();
    loop {
        let pending: Vec<usize> = (0..paths.len()).filter(|&i| answers[i].is_none()).collect();
        if pending.is_empty() {
            break;
        }
        match classify_stream(conn, paths, pending, top_k, head, &mut answers, pb).await {
            Ok(()) => break,
            Err(Failure::Status(status)) => {
                if !attempts.wait_after("ClassifyStream", &status).await {
                    return Err(conn.rpc_error("ClassifyStream")(status));
                }
            }
            Err(Failure::Other(e)) => return Err(e),
        }
    }
    Ok(answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err("no reply from the server".to_string())))
        .collect())
}

/// Why one stream ended early: a status may be retried, anything else may not.
enum Failure {
    Status(tonic::Status),
    Other(Error),
}

/// One ClassifyStream call for the images at `pending`, filling `answers` as replies come.
/// Files that cannot be read are answered here, so a retry does not read them again.
async fn classify_stream(
    conn: &Conn,
    paths: &[PathBuf],
    pending: Vec<usize>,
    top_k: u32,
    head: &str,
    answers: &mut [Option<Answer>],
    pb: &ProgressBar,
) -> std::result::Result<(), Failure> {
    let (tx, rx) = mpsc::channel(8);
    let files: Vec<(usize, PathBuf)> = pending.into_iter().map(|i| (i, paths[i].clone())).collect();
    let head = head.to_string();
    let feeder = tokio::spawn(async move {
        let mut unread = Vec::new();
        for (i, path) in files {
            match tokio::fs::read(&path).await {
                Ok(image) => {
                    let req = ClassifyStreamRequest {
                        id: i.to_string(),
                        image: image.into(),
                        top_k,
                        head: head.clone(),
                    };
                    if tx.send(req).await.is_err() {
                        break;
                    }
                }
                Err(e) => unread.push((i, format!("cannot read: {e}"))),
            }
        }
        unread
    });
    let outcome = receive(conn, ReceiverStream::new(rx), answers, pb).await;
    if outcome.is_err() {
        // The transport may still hold the request stream; files it did not take are sent
        // again (or found unreadable again) by the next attempt.
        feeder.abort();
        return outcome;
    }
    for (i, why) in feeder.await.unwrap_or_default() {
        answers[i] = Some(Err(why));
        pb.inc(1);
    }
    outcome
}

async fn receive(
    conn: &Conn,
    requests: ReceiverStream<ClassifyStreamRequest>,
    answers: &mut [Option<Answer>],
    pb: &ProgressBar,
) -> std::result::Result<(), Failure> {
    let mut stream = conn
        .classifier()
        .classify_stream(requests)
        .await
        .map_err(Failure::Status)?
        .into_inner();
    while let Some(msg) = stream.message().await.map_err(Failure::Status)? {
        let slot = msg
            .id
            .parse::<usize>()
            .ok()
            .and_then(|i| answers.get_mut(i))
            .ok_or_else(|| {
                Failure::Other(Error::Protocol {
                    addr: conn.addr.clone(),
                    reason: format!("a reply for id {:?}, which was never sent", msg.id),
                })
            })?;
        *slot = Some(match msg.result {
            Some(Reply::Classification(c)) => Ok(c),
            Some(Reply::Error(e)) => Err(format!("{}: {}", code_name(e.code), e.message)),
            None => Err("the server sent an empty reply".to_string()),
        });
        pb.inc(1);
    }
    Ok(())
}

pub fn decision_name(d: i32) -> &'static str {
    match Decision::try_from(d) {
        Ok(Decision::Child) => "child",
        Ok(Decision::Parent) => "parent",
        Ok(Decision::Unknown) => "unknown",
        _ => "unspecified",
    }
}

#[derive(Serialize)]
struct Top<'a> {
    name: &'a str,
    probability: f32,
    parent: &'a str,
}

/// One line of `classify --json`: the keys scripts rely on, then the detail.
#[derive(Serialize)]
pub(crate) struct Line<'a> {
    image: String,
    decision: Option<&'static str>,
    label: Option<&'a str>,
    probability: Option<f32>,
    parent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_probability: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    head: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    head_version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    similarity: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top: Option<Vec<Top<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

pub(crate) fn line<'a>(image: String, answer: &'a Answer) -> Line<'a> {
    match answer {
        Ok(c) => Line {
            image,
            decision: Some(decision_name(c.decision)),
            label: Some(&c.label),
            probability: Some(c.probability),
            parent: Some(c.parent.as_ref().map_or("", |p| p.name.as_str())),
            parent_probability: c.parent.as_ref().map(|p| p.probability),
            head: Some(&c.head),
            head_version: Some(c.head_version),
            similarity: Some(c.similarity),
            top: Some(
                c.children
                    .iter()
                    .map(|s| Top {
                        name: &s.name,
                        probability: s.probability,
                        parent: &s.parent,
                    })
                    .collect(),
            ),
            error: None,
        },
        Err(e) => Line {
            image,
            decision: None,
            label: None,
            probability: None,
            parent: None,
            parent_probability: None,
            head: None,
            head_version: None,
            similarity: None,
            top: None,
            error: Some(e),
        },
    }
}

pub async fn run(ctx: &mut Ctx<'_>, args: Args) -> Result<Outcome> {
    let found = files::collect(&args.images, args.max_file_mib.saturating_mul(1024 * 1024))?;
    if !ctx.json {
        for s in &found.skipped {
            writeln!(ctx.out, "skipped {}: {}", s.path.display(), s.reason)?;
        }
    }
    if found.images.is_empty() {
        return Err(Error::NoImages {
            skipped: found.skipped.len(),
        });
    }
    let conn = ctx.connect().await?;
    let pb = output::progress(found.images.len() as u64, "images", ctx.json);
    let answers = classify_many(&conn, &found.images, args.top_k, &args.head, &pb).await?;
    pb.finish_and_clear();
    let failed = answers.iter().filter(|a| a.is_err()).count();
    if ctx.json {
        for (path, a) in found.images.iter().zip(&answers) {
            output::json_line(ctx.out, &line(path.display().to_string(), a))?;
        }
        // Skipped paths get a line too (decision null), so a script sees every path it gave.
        for s in &found.skipped {
            let why: Answer = Err(format!("skipped: {}", s.reason));
            output::json_line(ctx.out, &line(s.path.display().to_string(), &why))?;
        }
    } else {
        print_table(ctx, &found.images, &answers, args.top_k > 1)?;
    }
    if failed > 0 {
        return Ok(Outcome::Failed(format!(
            "{failed} of {} image(s) could not be classified",
            answers.len()
        )));
    }
    Ok(Outcome::Success)
}

fn print_table(ctx: &mut Ctx<'_>, paths: &[PathBuf], answers: &[Answer], top: bool) -> Result<()> {
    let mut headers = vec!["image", "decision", "label", "probability", "parent"];
    if top {
        headers.push("top-k");
    }
    let rows: Vec<Vec<String>> = paths
        .iter()
        .zip(answers)
        .map(|(p, a)| {
            let mut row = vec![p.display().to_string()];
            match a {
                Ok(c) => {
                    row.push(decision_name(c.decision).to_string());
                    row.push(c.label.clone());
                    row.push(format!("{:.3}", c.probability));
                    row.push(c.parent.as_ref().map_or(String::new(), |p| {
                        format!("{} ({:.3})", p.name, p.probability)
                    }));
                    if top {
                        let list: Vec<String> = c
                            .children
                            .iter()
                            .map(|s| format!("{} {:.3}", s.name, s.probability))
                            .collect();
                        row.push(list.join(", "));
                    }
                }
                Err(e) => {
                    row.push("error".to_string());
                    row.push(e.clone());
                }
            }
            row
        })
        .collect();
    output::table(ctx.out, &headers, &[3], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use taxon_proto::v1::ClassScore;

    #[test]
    fn json_line_has_the_keys_scripts_rely_on() {
        let answer: Answer = Ok(ClassifyResponse {
            children: vec![ClassScore {
                name: "pug".into(),
                probability: 0.9,
                parent: "dog".into(),
            }],
            parent: Some(ClassScore {
                name: "dog".into(),
                probability: 0.99,
                parent: String::new(),
            }),
            decision: Decision::Child as i32,
            label: "pug".into(),
            probability: 0.9,
            ..Default::default()
        });
        let v = serde_json::to_value(line("a.jpg".into(), &answer)).unwrap();
        assert_eq!(v["image"], "a.jpg");
        assert_eq!(v["decision"], "child");
        assert_eq!(v["label"], "pug");
        assert_eq!(v["parent"], "dog");
        assert!((v["probability"].as_f64().unwrap() - 0.9).abs() < 1e-6);
        assert_eq!(v["top"][0]["name"], "pug");

        let failed: Answer = Err("INVALID_ARGUMENT: not an image".into());
        let v = serde_json::to_value(line("b.jpg".into(), &failed)).unwrap();
        assert_eq!(v["image"], "b.jpg");
        assert!(v["decision"].is_null());
        assert_eq!(v["error"], "INVALID_ARGUMENT: not an image");
    }

    #[test]
    fn decisions_have_script_friendly_names() {
        assert_eq!(decision_name(Decision::Parent as i32), "parent");
        assert_eq!(decision_name(Decision::Unknown as i32), "unknown");
        assert_eq!(decision_name(99), "unspecified");
    }
}
