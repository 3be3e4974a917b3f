//! Scoring one head's answers on one split: plain functions over hand-checkable data, so the
//! numbers in the report can be verified by a unit test rather than trusted.

use std::collections::BTreeMap;

/// One test photo: the truth and what a head answered (None where the call failed).
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub child: String,
    pub parent: String,
    /// The top-1 child.
    pub predicted: Option<String>,
    /// The parent of the predicted child.
    pub predicted_parent: Option<String>,
    /// The hierarchical head's own parent branch, when the head has one.
    pub branch_parent: Option<String>,
    /// `child`, `parent` or `unknown` (the service's decision), None where the call failed.
    pub decision: Option<&'static str>,
    /// Cosine to the nearest class mean, as the service reported it.
    pub similarity: Option<f32>,
    /// The probability the head gave its top-1 child (what calibration is measured on).
    pub confidence: Option<f32>,
}

/// Percentages (0..100) for one head on one split.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Scores {
    pub child_top1: f64,
    pub parent_via_child: f64,
    /// Only when every answer carried a parent branch.
    pub parent_branch: Option<f64>,
    /// Wrong child AND wrong parent: the mistakes a user notices most.
    pub severity: f64,
    /// Rates of the decisions child / parent / unknown.
    pub decisions: [f64; 3],
    /// Expected calibration error of the top-1 probability, in points (see [`ece`]).
    pub ece: f64,
}

fn pct(hits: usize, n: usize) -> f64 {
    if n == 0 {
        0.0
    } else {
        100.0 * hits as f64 / n as f64
    }
}

pub fn score(preds: &[Prediction]) -> Scores {
    let n = preds.len();
    let count = |f: &dyn Fn(&Prediction) -> bool| preds.iter().filter(|p| f(p)).count();
    let child_ok = |p: &Prediction| p.predicted.as_deref() == Some(p.child.as_str());
    let parent_ok = |p: &Prediction| p.predicted_parent.as_deref() == Some(p.parent.as_str());
    let has_branch = n > 0 && preds.iter().all(|p| p.branch_parent.is_some());
    Scores {
        child_top1: pct(count(&child_ok), n),
        parent_via_child: pct(count(&parent_ok), n),
        parent_branch: has_branch.then(|| {
            pct(
                count(&|p| p.branch_parent.as_deref() == Some(p.parent.as_str())),
                n,
            )
        }),
        severity: pct(count(&|p| !child_ok(p) && !parent_ok(p)), n),
        decisions: ["child", "parent", "unknown"]
            .map(|d| pct(count(&|p| p.decision == Some(d)), n)),
        ece: ece(preds, ECE_BINS),
    }
}

/// Confidence bins of the expected calibration error: 15, as in Guo et al. 2017 and most
/// papers since, so the figure compares with theirs.
pub const ECE_BINS: usize = 15;

/// Expected calibration error, in points: answers binned by the top-1 probability into `bins`
/// equal-width bins; the gap between mean confidence and accuracy in each bin, weighted by the
/// bin's share of answers. A failed call counts as wrong at confidence 0.
pub fn ece(preds: &[Prediction], bins: usize) -> f64 {
    ece_of(preds.iter().map(answer), bins)
}

/// One answer as calibration sees it: (top-1 probability in 0..=1, right). A failed call is
/// wrong at confidence 0.
pub fn answer(p: &Prediction) -> (f64, bool) {
    (
        f64::from(p.confidence.unwrap_or(0.0)).clamp(0.0, 1.0),
        p.predicted.as_deref() == Some(p.child.as_str()),
    )
}

/// [`ece`] over (confidence, right) pairs.
pub fn ece_of(answers: impl IntoIterator<Item = (f64, bool)>, bins: usize) -> f64 {
    if bins == 0 {
        return 0.0;
    }
    let mut sums = vec![(0f64, 0usize); bins]; // (confidence, right)
    let mut n = 0usize;
    for (conf, right) in answers {
        let bin = ((conf * bins as f64) as usize).min(bins - 1);
        sums[bin].0 += conf;
        sums[bin].1 += usize::from(right);
        n += 1;
    }
    if n == 0 {
        return 0.0;
    }
    100.0
        * sums
            .iter()
            .map(|&(conf, right)| (conf - right as f64).abs() / n as f64)
            .sum::<f64>()
}

/// Child top-1 per true class, as (hits, total), keyed by class name.
pub fn per_class(preds: &[Prediction]) -> BTreeMap<String, (usize, usize)> {
    let mut out: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for p in preds {
        let e = out.entry(p.child.clone()).or_default();
        e.1 += 1;
        if p.predicted.as_deref() == Some(p.child.as_str()) {
            e.0 += 1;
        }
    }
    out
}

/// Counts with rows = true class and columns = predicted class, both in `names` order, plus a
/// last column for answers outside `names` (failed calls, classes of no test photo).
pub fn confusion(preds: &[Prediction], names: &[String]) -> Vec<Vec<u32>> {
    let index: BTreeMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let mut m = vec![vec![0u32; names.len() + 1]; names.len()];
    for p in preds {
        let Some(&row) = index.get(p.child.as_str()) else {
            continue;
        };
        let col = p
            .predicted
            .as_deref()
            .and_then(|c| index.get(c).copied())
            .unwrap_or(names.len());
        m[row][col] += 1;
    }
    m
}

/// Mean and population standard deviation (numpy's default, as the PyTorch anchors use).
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(
        child: &str,
        parent: &str,
        pred: Option<(&str, &str)>,
        branch: Option<&str>,
    ) -> Prediction {
        Prediction {
            child: child.into(),
            parent: parent.into(),
            predicted: pred.map(|(c, _)| c.to_string()),
            predicted_parent: pred.map(|(_, p)| p.to_string()),
            branch_parent: branch.map(String::from),
            decision: pred.map(|_| "child"),
            similarity: None,
            confidence: pred.map(|_| 0.5),
        }
    }

    fn sample() -> Vec<Prediction> {
        vec![
            p("pug", "dog", Some(("pug", "dog")), Some("dog")), // right
            p("pug", "dog", Some(("beagle", "dog")), Some("dog")), // wrong child, right parent
            p("sphynx", "cat", Some(("pug", "dog")), Some("cat")), // wrong both
            p("sphynx", "cat", None, Some("dog")),              // failed call: wrong both
        ]
    }

    #[test]
    fn accuracy_and_severity() {
        let s = score(&sample());
        assert_eq!(s.child_top1, 25.0);
        assert_eq!(s.parent_via_child, 50.0);
        assert_eq!(s.parent_branch, Some(75.0));
        assert_eq!(s.severity, 50.0);
        assert_eq!(s.decisions, [75.0, 0.0, 0.0]);
    }

    #[test]
    fn parent_branch_only_when_every_answer_has_one() {
        let mut preds = sample();
        preds[0].branch_parent = None;
        assert_eq!(score(&preds).parent_branch, None);
        assert_eq!(score(&[]).child_top1, 0.0);
    }

    #[test]
    fn per_class_and_confusion() {
        let preds = sample();
        let pc = per_class(&preds);
        assert_eq!(pc["pug"], (1, 2));
        assert_eq!(pc["sphynx"], (0, 2));
        let names: Vec<String> = ["beagle", "pug", "sphynx"].map(String::from).to_vec();
        let m = confusion(&preds, &names);
        assert_eq!(m[1], vec![1, 1, 0, 0]); // pug: once beagle, once pug
        assert_eq!(m[2], vec![0, 1, 0, 1]); // sphynx: once pug, once no answer
        assert_eq!(m[0], vec![0, 0, 0, 0]);
    }

    #[test]
    fn calibration_error_by_hand() {
        // Two answers at 0.9, one right: |1.8 - 1| / 4. Two at 0.3, both wrong: 0.6 / 4.
        let mut preds = sample();
        for (p, c) in preds.iter_mut().zip([0.9, 0.9, 0.3, 0.3]) {
            p.confidence = Some(c);
        }
        // (The confidences are f32: 0.9 is 0.89999998 as f64.)
        let got = ece(&preds, 15);
        assert!((got - 100.0 * (0.8 + 0.6) / 4.0).abs() < 1e-4, "{got}");
        // Confidence equal to accuracy in every bin: calibrated.
        preds[1].predicted = Some("pug".into());
        preds[0].confidence = Some(1.0);
        preds[1].confidence = Some(1.0);
        preds[2].confidence = Some(0.0);
        preds[3].confidence = None;
        assert_eq!(ece(&preds, 15), 0.0);
        assert_eq!(ece(&[], 15), 0.0);
    }

    #[test]
    fn mean_and_population_std() {
        let (m, s) = mean_std(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert_eq!(m, 5.0);
        assert_eq!(s, 2.0);
        assert!(mean_std(&[]).0.is_nan());
        assert_eq!(mean_std(&[3.0]), (3.0, 0.0));
    }
}
