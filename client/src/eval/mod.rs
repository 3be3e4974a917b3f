//! `client eval`: the k-shot evaluation against live services, every head side by side with
//! the PyTorch anchors; writes report.md, confusion.png and accuracy_vs_k.png.

mod anchors;
pub mod calibration;
pub mod dump;
mod font;
pub mod metrics;
pub mod open_set;
pub mod plot;
pub mod protocol;
pub mod report;

use std::path::{Path, PathBuf};

use serde_json::json;
use taxon_proto::head_kind;
use taxon_proto::v1::ListClassesRequest;

use crate::connect::Auth;
use crate::error::{Error, Result};
use crate::{Ctx, Outcome, dataset, files, output};
use protocol::SeedRun;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A `<parent>/<child>/*.jpg` tree, e.g. ../shared/datasets/pets.
    pub root: PathBuf,
    /// Training photos per child, one evaluation per value.
    #[arg(long, value_delimiter = ',', default_value = "1,3,5,8")]
    pub shots: Vec<usize>,
    /// Seeds per k (0..N), each in its own fresh tenant.
    #[arg(long, default_value_t = 10)]
    pub seeds: u64,
    /// Head kinds trained and compared besides the live (default) head.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "prototype,flat,hierarchical,combined,lda"
    )]
    pub heads: Vec<String>,
    /// Where report.md and the pictures go [default: eval-report/<dataset>].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Fail when the default head's mean child top-1 is below this (%), at any k.
    #[arg(long, value_name = "PCT")]
    pub min_default_child: Option<f64>,
    /// Leave the evaluation tenants' classes on the server (to inspect them).
    #[arg(long)]
    pub keep_tenants: bool,
    /// Photos of things outside the dataset (e.g. ../shared/datasets/birds when evaluating
    /// pets): each tenant classifies a sample, to measure open-set rejection.
    #[arg(long, value_name = "DIR")]
    pub open_set: Option<PathBuf>,
    /// How many photos `--open-set` samples (evenly through its sorted listing).
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub open_set_photos: usize,
    /// Also write, into DIR, every photo's embedding (the server's own, exported), each seed's
    /// split and every head's answers, so that scripts/anchors/same_embeddings.py can run
    /// other heads on exactly the same embeddings and splits. Embeds the whole dataset once
    /// first (with the server's `--share-embedding-cache`, the seeds then reuse it).
    #[arg(long, value_name = "DIR")]
    pub save_embeddings: Option<PathBuf>,
}

fn quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./,:=@".contains(c))
    {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// The command that reproduces this run, for the report's first line.
fn command_line(server: &str, args: &Args, out: &Path) -> String {
    let list = |v: &[String]| v.join(",");
    let shots: Vec<String> = args.shots.iter().map(usize::to_string).collect();
    let mut parts = vec![
        "client".to_string(),
        "--server".into(),
        quote(server),
        "eval".into(),
        quote(&args.root.display().to_string()),
        "--shots".into(),
        list(&shots),
        "--seeds".into(),
        args.seeds.to_string(),
        "--heads".into(),
        quote(&list(&args.heads)),
        "--out".into(),
        quote(&out.display().to_string()),
    ];
    if let Some(p) = args.min_default_child {
        parts.extend(["--min-default-child".into(), p.to_string()]);
    }
    if let Some(dir) = &args.save_embeddings {
        parts.extend([
            "--save-embeddings".into(),
            quote(&dir.display().to_string()),
        ]);
    }
    if let Some(dir) = &args.open_set {
        parts.extend([
            "--open-set".into(),
            quote(&dir.display().to_string()),
            "--open-set-photos".into(),
            args.open_set_photos.to_string(),
        ]);
    }
    parts.join(" ")
}

fn validate(args: &Args) -> Result<()> {
    let known = [
        head_kind::PROTOTYPE,
        head_kind::FLAT,
        head_kind::HIERARCHICAL,
        head_kind::COMBINED,
        head_kind::LDA,
    ];
    if let Some(bad) = args.heads.iter().find(|h| !known.contains(&h.as_str())) {
        return Err(Error::Usage(format!(
            "unknown head {bad:?}; --heads takes {}",
            known.join(",")
        )));
    }
    if args.shots.is_empty() || args.shots.contains(&0) || args.seeds == 0 {
        return Err(Error::Usage(
            "--shots needs values >= 1 and --seeds at least 1".into(),
        ));
    }
    Ok(())
}

pub async fn run(ctx: &mut Ctx<'_>, args: Args) -> Result<Outcome> {
    validate(&args)?;
    let ds = dataset::read(&args.root, files::DEFAULT_MAX_FILE_BYTES)?;
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| Path::new("eval-report").join(&ds.name));
    std::fs::create_dir_all(&out_dir).map_err(|source| Error::File {
        path: out_dir.clone(),
        source,
    })?;
    let strangers = match &args.open_set {
        Some(dir) => open_set::sample(dir, args.open_set_photos)?,
        None => Vec::new(),
    };
    let base = ctx.connect().await?;
    let pid = std::process::id();
    let plan: Vec<(usize, u64, protocol::Split)> = args
        .shots
        .iter()
        .flat_map(|&k| (0..args.seeds).map(move |seed| (k, seed)))
        .map(|(k, seed)| (k, seed, protocol::split(&ds, k, seed)))
        .collect();
    let dump_steps = if args.save_embeddings.is_some() {
        ds.images() as u64
    } else {
        0
    };
    let total = plan
        .iter()
        .map(|p| protocol::steps(&p.2, args.heads.len(), strangers.len()))
        .sum::<u64>()
        + dump_steps;
    let pb = output::progress(total, "steps", ctx.json);
    if let Some(dir) = &args.save_embeddings {
        let tenant = format!("eval-{pid}-{}-all", protocol::clean_name(&ds.name));
        let conn = base
            .with_auth(Auth::new(Some(&tenant), ctx.token.as_deref())?.with_timeout(ctx.timeout));
        dump::embeddings(&conn, &ds, dir, &pb).await?;
        dump::splits(&ds, dir, &plan)?;
    }
    let mut runs: Vec<SeedRun> = Vec::new();
    let mut notes = Vec::new();
    let mut model = String::new();
    for (k, seed, split) in &plan {
        let tenant = protocol::tenant_name(pid, &ds.name, *k, *seed);
        let conn = base
            .with_auth(Auth::new(Some(&tenant), ctx.token.as_deref())?.with_timeout(ctx.timeout));
        let result =
            protocol::run_one(&conn, &ds, split, (*k, *seed), &args.heads, &strangers, &pb).await;
        if model.is_empty()
            && let Ok(list) = conn.classifier().list_classes(ListClassesRequest {}).await
        {
            model = list.into_inner().model;
        }
        if !args.keep_tenants {
            for failure in protocol::clean_up(&conn, &ds).await {
                notes.push(format!("clean-up of tenant {tenant} failed: {failure}"));
            }
        }
        let run = result?;
        if !split.left_out.is_empty() && *seed == 0 {
            notes.push(format!(
                "k = {k}: left out {} class(es) with no photo left to test: {}",
                split.left_out.len(),
                split.left_out.join(", ")
            ));
        }
        if run.rejected > 0 {
            notes.push(format!(
                "k = {k}, seed {seed}: the server rejected {} training photo(s)",
                run.rejected
            ));
        }
        pb.suspend(|| progress_line(ctx, &run))?;
        runs.push(run);
    }
    pb.finish_and_clear();
    if ctx.token.is_some() {
        notes.push(
            "run with a bearer token: if the token decides the tenant, seeds shared one".into(),
        );
    }
    let confusion_of = args.shots.iter().max().map(|&k| (k, 0));
    let cx = report::Context {
        command: command_line(&ctx.server, &args, &out_dir),
        ds: &ds,
        shots: &args.shots,
        seeds: args.seeds,
        heads: &args.heads,
        model,
        notes,
        confusion_of,
        open_set: args.open_set.as_deref(),
    };
    write_outputs(&out_dir, &cx, &runs)?;
    if let Some(dir) = &args.save_embeddings {
        dump::predictions(&ds, dir, &plan, &runs)?;
    }
    summarize(ctx, &cx, &runs, &out_dir, args.min_default_child)
}

fn progress_line(ctx: &mut Ctx<'_>, run: &SeedRun) -> Result<()> {
    if ctx.json {
        return Ok(());
    }
    let parts: Vec<String> = run
        .heads
        .iter()
        .map(|h| {
            let name = if h.head.is_empty() {
                "default"
            } else {
                &h.head
            };
            format!("{name} {:.1}", metrics::score(&h.preds).child_top1)
        })
        .collect();
    writeln!(
        ctx.out,
        "k={} seed={}: child top-1 {} ({:.1} s)",
        run.k,
        run.seed,
        parts.join(", "),
        run.wall_s
    )?;
    Ok(())
}

fn write_outputs(dir: &Path, cx: &report::Context, runs: &[SeedRun]) -> Result<()> {
    let md = dir.join("report.md");
    std::fs::write(&md, report::markdown(cx, runs))
        .map_err(|source| Error::File { path: md, source })?;
    if let Some((k, seed)) = cx.confusion_of {
        let default = runs
            .iter()
            .find(|r| r.k == k && r.seed == seed)
            .and_then(|r| r.heads.iter().find(|h| h.head.is_empty()));
        if let Some(h) = default {
            let names: Vec<String> = cx.ds.children.iter().map(|c| c.name.clone()).collect();
            let m = metrics::confusion(&h.preds, &names);
            let title = format!("{} DEFAULT HEAD K={k} SEED {seed}", cx.ds.name);
            plot::save(
                &plot::render_confusion(&names, &m, &title),
                &dir.join("confusion.png"),
            )?;
        }
    }
    let mut series: Vec<plot::Series> = std::iter::once("")
        .chain(cx.heads.iter().map(String::as_str))
        .map(|h| plot::Series {
            name: if h.is_empty() {
                "default".into()
            } else {
                h.to_string()
            },
            points: cx
                .shots
                .iter()
                .filter_map(|&k| report::summarize(runs, k, h).map(|s| (k, s.child.0, s.child.1)))
                .collect(),
            dashed: false,
        })
        .collect();
    let best: Vec<(usize, f64, f64)> = cx
        .shots
        .iter()
        .filter_map(|&k| {
            anchors::at(&cx.ds.name, k).map(|a| (k, a.best_child().1.0, a.best_child().1.1))
        })
        .collect();
    if !best.is_empty() {
        series.push(plot::Series {
            name: "PyTorch best".into(),
            points: best,
            dashed: true,
        });
    }
    let title = format!("{}: CHILD TOP-1 VS K", cx.ds.name);
    plot::save(
        &plot::render_accuracy(&series, &title),
        &dir.join("accuracy_vs_k.png"),
    )
}

fn summarize(
    ctx: &mut Ctx<'_>,
    cx: &report::Context,
    runs: &[SeedRun],
    dir: &Path,
    min: Option<f64>,
) -> Result<Outcome> {
    let mut below = Vec::new();
    let mut results = Vec::new();
    for &k in cx.shots {
        let rows = report::table_rows(runs, k, cx.heads);
        if let (Some(min), Some(d)) = (min, rows.first())
            && d.child.0 < min
        {
            below.push(format!("k={k}: {:.1} % < {min} %", d.child.0));
        }
        if !ctx.json {
            writeln!(ctx.out, "\nk = {k}")?;
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.display_name(),
                        report::pm(r.child),
                        report::pm(r.parent_via_child),
                        report::pm(r.severity),
                        r.train_ms.map_or("—".into(), |t| format!("{:.0}", t.0)),
                    ]
                })
                .collect();
            output::table(
                ctx.out,
                &["head", "child", "parent", "severity", "train ms"],
                &[],
                &table,
            )?;
        }
        results.push(json!({"k": k, "heads": rows}));
    }
    let files = ["report.md", "confusion.png", "accuracy_vs_k.png"].map(|f| dir.join(f));
    if ctx.json {
        output::json_line(
            ctx.out,
            &json!({"dataset": cx.ds.name, "out": dir, "results": results, "below_min": below}),
        )?;
    } else {
        writeln!(
            ctx.out,
            "\nwrote {}",
            files.map(|f| f.display().to_string()).join(", ")
        )?;
    }
    if below.is_empty() {
        Ok(Outcome::Success)
    } else {
        Ok(Outcome::Failed(format!(
            "the default head's child top-1 is below --min-default-child: {}",
            below.join("; ")
        )))
    }
}
