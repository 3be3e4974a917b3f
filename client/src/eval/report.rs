//! Turning seed runs into numbers (mean ± std per head and k) and those into `report.md`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::anchors::{self, Anchor};
use super::metrics::{self, Scores};
use super::protocol::SeedRun;
use crate::dataset::Dataset;

/// One head at one k, over seeds. Percentages; (mean, std).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HeadSummary {
    /// Empty for the live (default) head.
    pub head: String,
    /// Which kind answered: for the default head, the live kind.
    pub answered_by: String,
    pub seeds: usize,
    pub child: (f64, f64),
    pub parent_via_child: (f64, f64),
    pub parent_branch: Option<(f64, f64)>,
    pub severity: (f64, f64),
    pub train_ms: Option<(f64, f64)>,
    /// Expected calibration error of the top-1 probability, points.
    pub ece: (f64, f64),
    /// Mean rates of the decisions child / parent / unknown.
    pub decisions: [f64; 3],
}

impl HeadSummary {
    pub fn display_name(&self) -> String {
        if self.head.is_empty() {
            format!("default (live: {})", self.answered_by)
        } else {
            self.head.clone()
        }
    }
}

pub fn summarize(runs: &[SeedRun], k: usize, head: &str) -> Option<HeadSummary> {
    let heads: Vec<_> = runs
        .iter()
        .filter(|r| r.k == k)
        .filter_map(|r| r.heads.iter().find(|h| h.head == head))
        .collect();
    if heads.is_empty() {
        return None;
    }
    let scores: Vec<Scores> = heads.iter().map(|h| metrics::score(&h.preds)).collect();
    let stat =
        |f: &dyn Fn(&Scores) -> f64| metrics::mean_std(&scores.iter().map(f).collect::<Vec<_>>());
    let branches: Option<Vec<f64>> = scores.iter().map(|s| s.parent_branch).collect();
    let trains: Option<Vec<f64>> = heads.iter().map(|h| h.train_ms).collect();
    Some(HeadSummary {
        head: head.to_string(),
        answered_by: heads[0].answered_by.clone(),
        seeds: heads.len(),
        child: stat(&|s| s.child_top1),
        parent_via_child: stat(&|s| s.parent_via_child),
        parent_branch: branches.map(|b| metrics::mean_std(&b)),
        severity: stat(&|s| s.severity),
        train_ms: trains.map(|t| metrics::mean_std(&t)),
        ece: stat(&|s| s.ece),
        decisions: [0, 1, 2].map(|i| stat(&|s| s.decisions[i]).0),
    })
}

pub fn pm((m, s): (f64, f64)) -> String {
    format!("{m:.1} ± {s:.1}")
}

fn opt(v: Option<(f64, f64)>) -> String {
    v.map_or_else(|| "—".to_string(), pm)
}

/// Everything the report needs besides the runs.
pub struct Context<'a> {
    pub command: String,
    pub ds: &'a Dataset,
    pub shots: &'a [usize],
    pub seeds: u64,
    pub heads: &'a [String],
    pub model: String,
    pub notes: Vec<String>,
    /// (k, seed) of the confusion picture.
    pub confusion_of: Option<(usize, u64)>,
    /// `--open-set`, when given.
    pub open_set: Option<&'a std::path::Path>,
}

/// The head rows of one k's table, default head first.
pub fn table_rows(runs: &[SeedRun], k: usize, heads: &[String]) -> Vec<HeadSummary> {
    std::iter::once("")
        .chain(heads.iter().map(String::as_str))
        .filter_map(|h| summarize(runs, k, h))
        .collect()
}

pub fn markdown(cx: &Context, runs: &[SeedRun]) -> String {
    let mut s = String::new();
    let ds = cx.ds;
    let _ = writeln!(s, "# Taxon k-shot evaluation: {}\n", ds.name);
    let _ = writeln!(s, "Command: `{}`\n", cx.command);
    let _ = writeln!(
        s,
        "Dataset `{}`: {} parents, {} children, {} photos. Model: `{}`. Seeds 0..{}; each \
         (k, seed) ran in a fresh tenant, removed afterwards.\n",
        ds.root.display(),
        ds.parents().len(),
        ds.children.len(),
        ds.images(),
        if cx.model.is_empty() {
            "unknown"
        } else {
            &cx.model
        },
        cx.seeds.saturating_sub(1),
    );
    let _ = writeln!(
        s,
        "Top-1 %, mean ± std over seeds (population std, as numpy). *parent (via child)*: the \
         parent of the predicted child; *parent (branch)*: the hierarchical head's own parent \
         branch; *severity*: % of test photos with the wrong child AND the wrong parent (via \
         child) — lower is better; *ECE*: expected calibration error of the top-1 probability \
         ({} bins), in points — lower is better; *train ms*: the Train call's own training \
         time. Every head, the default included, is trained from scratch on the seed's \
         examples (enrolled one class at a time in the dataset's order), so two runs of this \
         command print the same numbers.\n",
        metrics::ECE_BINS
    );
    for &k in cx.shots {
        k_section(&mut s, cx, runs, k);
    }
    super::calibration::section(&mut s, cx.shots, runs, cx.heads);
    summary_vs_pytorch(&mut s, cx, runs);
    super::open_set::section(&mut s, cx.shots, runs, cx.open_set);
    per_class_section(&mut s, cx, runs);
    let _ = writeln!(s, "## Pictures\n\n![accuracy vs k](accuracy_vs_k.png)\n");
    if let Some((k, seed)) = cx.confusion_of {
        let _ = writeln!(
            s,
            "![confusion matrix](confusion.png)\n\nConfusion matrix of the default head, k = {k}, \
             seed {seed}: rows are the true children, columns the predicted ones, shaded by the \
             row's share.\n"
        );
    }
    if !cx.notes.is_empty() {
        let _ = writeln!(s, "## Notes\n");
        for n in &cx.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}

fn k_section(s: &mut String, cx: &Context, runs: &[SeedRun], k: usize) {
    let rows = table_rows(runs, k, cx.heads);
    let Some(default) = rows.first().filter(|r| r.head.is_empty()) else {
        return;
    };
    let tests = runs
        .iter()
        .find(|r| r.k == k)
        .and_then(|r| r.heads.first())
        .map_or(0, |h| h.preds.len());
    let _ = writeln!(s, "## k = {k} ({tests} test photos per seed)\n");
    let _ = writeln!(
        s,
        "| head | child top-1 | parent (via child) | parent (branch) | severity | ECE | train ms |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for r in &rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.display_name(),
            pm(r.child),
            pm(r.parent_via_child),
            opt(r.parent_branch),
            pm(r.severity),
            pm(r.ece),
            opt(r.train_ms)
        );
    }
    let d = default.decisions;
    let _ = writeln!(
        s,
        "\nDecisions of the default head: child {:.1} %, parent {:.1} %, unknown {:.1} %.\n",
        d[0], d[1], d[2]
    );
    if let Some(a) = anchors::at(&cx.ds.name, k) {
        side_by_side(s, &rows, &a);
    }
}

/// (what, Taxon's number if measured, PyTorch's).
type Comparison = (String, Option<(f64, f64)>, (f64, f64));

fn side_by_side(s: &mut String, rows: &[HeadSummary], a: &Anchor) {
    let find = |h: &str| rows.iter().find(|r| r.head == h);
    let (best_name, best) = a.best_child();
    let mut lines: Vec<Comparison> = vec![(
        format!("default head child vs best PyTorch ({best_name})"),
        rows.first().map(|r| r.child),
        best,
    )];
    lines.push((
        "prototype vs NCM".into(),
        find("prototype").map(|r| r.child),
        a.ncm,
    ));
    lines.push(("flat vs flat".into(), find("flat").map(|r| r.child), a.flat));
    let hier = find("hierarchical");
    lines.push((
        "hierarchical vs hier (child)".into(),
        hier.map(|r| r.child),
        a.hier_child,
    ));
    lines.push((
        "hierarchical parent branch vs hier (parent branch)".into(),
        hier.and_then(|r| r.parent_branch),
        a.hier_parent_branch,
    ));
    lines.push((
        "flat parent via child vs flat (parent via child)".into(),
        find("flat").map(|r| r.parent_via_child),
        a.flat_parent_via_child,
    ));
    let _ = writeln!(
        s,
        "The product against PyTorch's heads (../shared/anchors/heads-pytorch.md), the \
         comparison a user makes, **not like for like**: Taxon's embeddings average four views \
         of each photo, PyTorch's are one center crop, and the splits are drawn by other \
         random generators (and only comparable when the model above is MobileNetV2 with the \
         real ImageNet weights). Heads on the same embeddings and splits: `same-embeddings.md`, \
         written by scripts/anchors/same_embeddings.py from `--save-embeddings`.\n"
    );
    let _ = writeln!(s, "| comparison | Taxon | PyTorch | Δ |");
    let _ = writeln!(s, "|---|---|---|---|");
    for (what, ours, theirs) in lines {
        let Some(o) = ours else { continue };
        let _ = writeln!(
            s,
            "| {what} | {} | {} | {:+.1} |",
            pm(o),
            pm(theirs),
            o.0 - theirs.0
        );
    }
    let _ = writeln!(s);
}

fn summary_vs_pytorch(s: &mut String, cx: &Context, runs: &[SeedRun]) {
    let Some((_, anchor_seeds)) = anchors::for_dataset(&cx.ds.name) else {
        let _ = writeln!(
            s,
            "No PyTorch anchors for a dataset named `{}` (only pets, birds).\n",
            cx.ds.name
        );
        return;
    };
    let _ = writeln!(
        s,
        "## Default head against the best PyTorch column (not like for like)\n"
    );
    let _ = writeln!(
        s,
        "PyTorch: {anchor_seeds} seeds, ../shared/anchors/heads-pytorch.md, one center crop per \
         photo and its own splits; Taxon: four views per photo. For the comparison on the same \
         embeddings and splits see `same-embeddings.md`.\n"
    );
    let _ = writeln!(s, "| k | default head | best PyTorch | Δ | beats it |");
    let _ = writeln!(s, "|---|---|---|---|---|");
    for &k in cx.shots {
        let (Some(d), Some(a)) = (summarize(runs, k, ""), anchors::at(&cx.ds.name, k)) else {
            continue;
        };
        let (name, best) = a.best_child();
        let delta = d.child.0 - best.0;
        let _ = writeln!(
            s,
            "| {k} | {} | {} ({name}) | {delta:+.1} | {} |",
            pm(d.child),
            pm(best),
            if delta > 0.0 { "yes" } else { "no" }
        );
    }
    let _ = writeln!(s);
}

fn per_class_section(s: &mut String, cx: &Context, runs: &[SeedRun]) {
    let mut table: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (ki, &k) in cx.shots.iter().enumerate() {
        let mut pooled: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for r in runs.iter().filter(|r| r.k == k) {
            if let Some(h) = r.heads.iter().find(|h| h.head.is_empty()) {
                for (name, (hit, n)) in metrics::per_class(&h.preds) {
                    let e = pooled.entry(name).or_default();
                    e.0 += hit;
                    e.1 += n;
                }
            }
        }
        for c in &cx.ds.children {
            let cell = pooled.get(&c.name).map_or("—".to_string(), |&(hit, n)| {
                format!("{:.0}", 100.0 * hit as f64 / n as f64)
            });
            let row = table
                .entry(c.name.as_str())
                .or_insert_with(|| vec![String::new(); cx.shots.len()]);
            row[ki] = cell;
        }
    }
    let _ = writeln!(
        s,
        "## Per-class child top-1 (default head, %, pooled over seeds)\n"
    );
    let ks: Vec<String> = cx.shots.iter().map(|k| format!("k={k}")).collect();
    let _ = writeln!(s, "| parent | child | {} |", ks.join(" | "));
    let _ = writeln!(s, "|---|---|{}", "---|".repeat(ks.len()));
    for c in &cx.ds.children {
        let cells = table
            .get(c.name.as_str())
            .map(|v| v.join(" | "))
            .unwrap_or_default();
        let _ = writeln!(s, "| {} | {} | {cells} |", c.parent, c.name);
    }
    let _ = writeln!(s);
}
