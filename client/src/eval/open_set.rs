//! How well the decision thresholds work, measured rather than assumed: open-set rejection
//! against photos of things the tenant never enrolled (`--open-set DIR`, e.g. birds when
//! evaluating pets), and what the back-off to a parent buys.
//!
//! The service reports each photo's similarity (its highest uncentred cosine to a class mean)
//! and its decision, made with the tenant's own cut-off; the sweep below replays the unknown
//! rule at fixed cut-offs instead, so one run shows what a single global cut-off would do.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::metrics::{self, Prediction};
use super::protocol::SeedRun;
use crate::error::Result;
use crate::files;

/// Cut-offs of the similarity sweep.
const SWEEP: [f32; 8] = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85];

/// Up to `n` photos from `dir` (recursively), evenly spaced through its sorted listing, so the
/// sample is the same on every run and spans every sub-folder.
pub fn sample(dir: &Path, n: usize) -> Result<Vec<PathBuf>> {
    let found = files::collect(&[dir.display().to_string()], files::DEFAULT_MAX_FILE_BYTES)?;
    let all = found.images;
    if all.len() <= n || n == 0 {
        return Ok(if n == 0 { Vec::new() } else { all });
    }
    Ok((0..n).map(|i| all[i * all.len() / n].clone()).collect())
}

/// One out-of-set photo as the live head saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stranger {
    pub similarity: f32,
    pub decision: &'static str,
}

fn pct(hits: usize, n: usize) -> f64 {
    if n == 0 {
        0.0
    } else {
        100.0 * hits as f64 / n as f64
    }
}

/// The default head's decisions on the tenant's own test photos.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DecisionQuality {
    /// % of CHILD decisions that named the right child.
    pub child_precision: f64,
    /// % of PARENT decisions that named the right parent.
    pub parent_precision: f64,
    /// % of photos whose top-1 child was wrong that were answered PARENT or UNKNOWN instead.
    pub wrong_children_caught: f64,
    /// % of photos whose top-1 child was right that were answered PARENT or UNKNOWN anyway.
    pub right_children_withheld: f64,
}

pub fn decision_quality(preds: &[Prediction]) -> DecisionQuality {
    let right = |p: &Prediction| p.predicted.as_deref() == Some(p.child.as_str());
    let is = |p: &Prediction, d: &str| p.decision == Some(d);
    let count = |f: &dyn Fn(&Prediction) -> bool| preds.iter().filter(|p| f(p)).count();
    let withheld = |p: &Prediction| is(p, "parent") || is(p, "unknown");
    DecisionQuality {
        child_precision: pct(
            count(&|p| is(p, "child") && right(p)),
            count(&|p| is(p, "child")),
        ),
        parent_precision: pct(
            count(&|p| is(p, "parent") && p.predicted_parent.as_deref() == Some(&p.parent)),
            count(&|p| is(p, "parent")),
        ),
        wrong_children_caught: pct(count(&|p| !right(p) && withheld(p)), count(&|p| !right(p))),
        right_children_withheld: pct(count(&|p| right(p) && withheld(p)), count(&right)),
    }
}

/// (in-set photos kept %, out-of-set photos rejected %) if the unknown cut-off were `t`.
pub fn at_cutoff(own: &[f32], strangers: &[f32], t: f32) -> (f64, f64) {
    (
        pct(own.iter().filter(|&&s| s >= t).count(), own.len()),
        pct(
            strangers.iter().filter(|&&s| s < t).count(),
            strangers.len(),
        ),
    )
}

/// The report section: decision quality per k, and with `--open-set`, rejection per k.
pub fn section(s: &mut String, shots: &[usize], runs: &[SeedRun], open_set: Option<&Path>) {
    let _ = writeln!(s, "## Decisions of the default head\n");
    let _ = writeln!(
        s,
        "Mean over seeds. *child precision*: CHILD answers that were right; *parent \
         precision*: PARENT (back-off) answers whose parent was right; *wrong caught*: photos \
         whose top child was wrong that were answered PARENT or UNKNOWN instead of a wrong \
         child; *right withheld*: photos whose top child was right that were answered PARENT or \
         UNKNOWN anyway (the price).\n"
    );
    let _ = writeln!(
        s,
        "| k | child precision | parent precision | wrong caught | right withheld |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    for &k in shots {
        let q: Vec<DecisionQuality> = default_preds(runs, k).map(decision_quality).collect();
        if q.is_empty() {
            continue;
        }
        let mean = |f: &dyn Fn(&DecisionQuality) -> f64| {
            metrics::mean_std(&q.iter().map(f).collect::<Vec<_>>()).0
        };
        let _ = writeln!(
            s,
            "| {k} | {:.1} | {:.1} | {:.1} | {:.1} |",
            mean(&|d| d.child_precision),
            mean(&|d| d.parent_precision),
            mean(&|d| d.wrong_children_caught),
            mean(&|d| d.right_children_withheld)
        );
    }
    let Some(dir) = open_set else {
        let _ = writeln!(s);
        return;
    };
    let _ = writeln!(
        s,
        "\n## Open-set rejection\n\nStrangers: photos from `{}` classified in every tenant. \
         *service*: what the service did, each tenant with its own cut-off (% of the tenant's \
         own test photos answered UNKNOWN, % of strangers answered UNKNOWN). Then, for one \
         global cut-off of the similarity (highest uncentred cosine to a class mean) instead: \
         own photos kept % / strangers rejected %.\n",
        dir.display()
    );
    let header: Vec<String> = SWEEP.iter().map(|t| format!("{t:.2}")).collect();
    let _ = writeln!(
        s,
        "| k | service: own unknown | service: strangers unknown | {} |",
        header.join(" | ")
    );
    let _ = writeln!(s, "|---|---|---|{}", "---|".repeat(SWEEP.len()));
    for &k in shots {
        let runs_k: Vec<&SeedRun> = runs.iter().filter(|r| r.k == k).collect();
        let own: Vec<f32> = default_preds(runs, k)
            .flat_map(|p| p.iter().filter_map(|p| p.similarity))
            .collect();
        let strangers: Vec<&Stranger> = runs_k.iter().flat_map(|r| &r.strangers).collect();
        if own.is_empty() || strangers.is_empty() {
            continue;
        }
        let own_unknown = pct(
            default_preds(runs, k)
                .flatten()
                .filter(|p| p.decision == Some("unknown"))
                .count(),
            own.len(),
        );
        let strangers_unknown = pct(
            strangers.iter().filter(|x| x.decision == "unknown").count(),
            strangers.len(),
        );
        let sims: Vec<f32> = strangers.iter().map(|x| x.similarity).collect();
        let cells: Vec<String> = SWEEP
            .iter()
            .map(|&t| {
                let (kept, rejected) = at_cutoff(&own, &sims, t);
                format!("{kept:.0} / {rejected:.0}")
            })
            .collect();
        let _ = writeln!(
            s,
            "| {k} | {own_unknown:.1} | {strangers_unknown:.1} | {} |",
            cells.join(" | ")
        );
    }
    let _ = writeln!(s);
}

fn default_preds(runs: &[SeedRun], k: usize) -> impl Iterator<Item = &[Prediction]> {
    runs.iter()
        .filter(move |r| r.k == k)
        .filter_map(|r| r.heads.iter().find(|h| h.head.is_empty()))
        .map(|h| h.preds.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pred(child: &str, predicted: &str, parent_ok: bool, decision: &'static str) -> Prediction {
        Prediction {
            child: child.into(),
            parent: "dog".into(),
            predicted: Some(predicted.into()),
            predicted_parent: Some(if parent_ok { "dog" } else { "cat" }.into()),
            branch_parent: None,
            decision: Some(decision),
            similarity: Some(0.5),
            confidence: Some(0.9),
        }
    }

    #[test]
    fn decision_quality_counts_by_hand() {
        let preds = [
            pred("pug", "pug", true, "child"),
            pred("pug", "boxer", true, "child"),
            pred("pug", "boxer", true, "parent"),
            pred("pug", "sphynx", false, "parent"),
            pred("pug", "pug", true, "parent"),
            pred("pug", "sphynx", false, "unknown"),
        ];
        let q = decision_quality(&preds);
        assert_eq!(q.child_precision, 50.0); // 1 of 2 CHILD answers right
        assert!((q.parent_precision - 200.0 / 3.0).abs() < 1e-9); // 2 of 3 parents right
        assert_eq!(q.wrong_children_caught, 75.0); // 3 of 4 wrong children withheld
        assert_eq!(q.right_children_withheld, 50.0); // 1 of 2 right children withheld
    }

    #[test]
    fn cutoff_sweep_counts_by_hand() {
        let own = [0.5, 0.3, 0.2, 0.1];
        let strangers = [0.05, 0.15, 0.25, 0.35];
        assert_eq!(at_cutoff(&own, &strangers, 0.2), (75.0, 50.0));
        assert_eq!(at_cutoff(&own, &strangers, 0.0), (100.0, 0.0));
        assert_eq!(at_cutoff(&[], &[], 0.2), (0.0, 0.0));
    }

    #[test]
    fn sample_is_even_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["a", "b"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
            for i in 0..5 {
                let img = image::RgbImage::from_pixel(4, 4, image::Rgb([i * 40, 0, 0]));
                img.save(dir.path().join(sub).join(format!("{i}.png")))
                    .unwrap();
            }
        }
        let four = sample(dir.path(), 4).unwrap();
        assert_eq!(four, sample(dir.path(), 4).unwrap());
        assert_eq!(four.len(), 4);
        assert!(four.iter().any(|p| p.starts_with(dir.path().join("a"))));
        assert!(four.iter().any(|p| p.starts_with(dir.path().join("b"))));
        assert_eq!(sample(dir.path(), 50).unwrap().len(), 10);
        assert!(sample(dir.path(), 0).unwrap().is_empty());
    }
}
