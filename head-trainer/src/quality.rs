//! "Is it good enough?" for a tenant's own classes, from its cached embeddings alone: no test
//! photos, no training, no photo sent again.
//!
//! Each example is classified by nearest class mean with itself left out of its own class's
//! mean (leave-one-out): what the prototype head would answer for a new photo like it. That
//! gives, per class, an accuracy estimate and the class it is most often taken for; across
//! classes, the pairs most often confused; and, per example, the photos nearer another
//! class's mean than their own class's (the likeliest mislabelled ones, largest margin first).
//!
//! Why nearest class mean: its leave-one-out is exact and closed-form (a class sum minus one
//! row), so a report over thousands of examples costs one matrix product, while leaving one
//! out of a trained head means training it again per example. The trained default head is
//! usually a little better than this (docs/evaluation.md), so the estimate is conservative.
//! Embeddings are centred by the mean of all the tenant's examples (no labels involved) and
//! scaled to unit length, as the prototype head does.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use crate::Result;
use crate::heads::prototype::l2_normalize;

/// Below this many examples a class is flagged as needing more photos whatever its estimate.
pub const MIN_EXAMPLES: u32 = 5;
/// Below this leave-one-out accuracy a class is flagged as needing more (or better) photos.
pub const MIN_ACCURACY: f32 = 0.8;

/// One example, checked against every class mean with itself left out of its own.
#[derive(Clone, Debug, PartialEq)]
pub struct Checked {
    /// Row in the examples given.
    pub row: usize,
    pub class: u32,
    pub predicted: u32,
    /// Cosine to its own class's mean without it.
    pub own: f32,
    /// The nearest other class and the cosine to its mean.
    pub nearest_other: Option<(u32, f32)>,
}

impl Checked {
    pub fn right(&self) -> bool {
        self.predicted == self.class
    }
}

/// Leave-one-out nearest class mean over `x` (`n x dim`, row-major) labelled `y` (indices
/// below `classes`). Examples alone in their class have no mean to compare with and are left
/// out of the answer.
pub fn leave_one_out(x: &[f32], dim: usize, y: &[u32], classes: usize) -> Result<Vec<Checked>> {
    let n = y.len();
    if n == 0 || classes == 0 || dim == 0 {
        return Ok(Vec::new());
    }
    let mut counts = vec![0u32; classes];
    for &c in y {
        counts[c as usize] += 1;
    }
    let all = Tensor::from_slice(x, (n, dim), &Device::Cpu)?;
    let rows = l2_normalize(&all.broadcast_sub(&all.mean_keepdim(0)?)?)?;
    let sums = crate::heads::train::class_sums(&rows, y, classes)?; // classes x dim
    let sum_norms: Vec<f32> = sums.sqr()?.sum(1)?.sqrt()?.to_vec1()?;
    // Dot products of the rows with every class sum, a block of rows at a time so that the
    // block's `rows x classes` matrix stays small whatever the tenant's size.
    let sums_t = sums.t()?;
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(ROWS_PER_BLOCK) {
        let len = ROWS_PER_BLOCK.min(n - start);
        let dots: Vec<Vec<f32>> = rows.narrow(0, start, len)?.matmul(&sums_t)?.to_vec2()?;
        for (row, dot) in (start..start + len).zip(&dots) {
            if let Some(checked) = check(row, y[row], dot, &counts, &sum_norms) {
                out.push(checked);
            }
        }
    }
    Ok(out)
}

/// Rows whose dot products with every class sum are held at once.
const ROWS_PER_BLOCK: usize = 512;

/// One row against every class mean, its own without it; `None` alone in its class.
fn check(
    row: usize,
    class: u32,
    dot: &[f32],
    counts: &[u32],
    sum_norms: &[f32],
) -> Option<Checked> {
    let c = class as usize;
    if counts[c] < 2 {
        return None;
    }
    // The own sum without this (unit) row: dot - 1, norm^2 = |S|^2 - 2 dot + 1.
    let own_norm = (sum_norms[c].powi(2) - 2.0 * dot[c] + 1.0).max(0.0).sqrt();
    let own = if own_norm > 1e-6 {
        (dot[c] - 1.0) / own_norm
    } else {
        0.0
    };
    let nearest_other = (0..counts.len())
        .filter(|&k| k != c && counts[k] > 0 && sum_norms[k] > 1e-6)
        .map(|k| (k as u32, dot[k] / sum_norms[k]))
        .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)));
    let predicted = match nearest_other {
        Some((k, sim)) if sim > own => k,
        _ => class,
    };
    Some(Checked {
        row,
        class,
        predicted,
        own,
        nearest_other,
    })
}

/// One class's estimate.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassQuality {
    pub class: u32,
    pub examples: u32,
    /// Examples checked (all of them with two or more) and of those classified right.
    pub checked: u32,
    pub right: u32,
    /// The class its examples were most often taken for, and how often.
    pub confused_with: Option<(u32, u32)>,
}

impl ClassQuality {
    /// Leave-one-out accuracy, when any example could be checked.
    pub fn accuracy(&self) -> Option<f32> {
        (self.checked > 0).then(|| self.right as f32 / self.checked as f32)
    }

    pub fn needs_more_photos(&self) -> bool {
        self.examples < MIN_EXAMPLES || self.accuracy().is_some_and(|a| a < MIN_ACCURACY)
    }
}

/// Two classes taken for each other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfusedPair {
    pub a: u32,
    pub b: u32,
    pub a_as_b: u32,
    pub b_as_a: u32,
}

/// Everything the report says, with classes as indices (the caller names them).
#[derive(Clone, Debug, PartialEq)]
pub struct Quality {
    pub classes: Vec<ClassQuality>,
    /// Most confused first (by a_as_b + b_as_a).
    pub pairs: Vec<ConfusedPair>,
    /// Examples nearer another class's mean than their own, largest margin first.
    pub suspects: Vec<Checked>,
    pub checked: u32,
    pub right: u32,
}

/// Sums the checks up per class and per pair.
pub fn summarize(checks: &[Checked], y: &[u32], classes: usize) -> Quality {
    let mut per: Vec<ClassQuality> = (0..classes as u32)
        .map(|class| ClassQuality {
            class,
            examples: 0,
            checked: 0,
            right: 0,
            confused_with: None,
        })
        .collect();
    for &c in y {
        per[c as usize].examples += 1;
    }
    let mut taken_for: HashMap<(u32, u32), u32> = HashMap::new();
    for ch in checks {
        let q = &mut per[ch.class as usize];
        q.checked += 1;
        if ch.right() {
            q.right += 1;
        } else {
            *taken_for.entry((ch.class, ch.predicted)).or_default() += 1;
        }
    }
    for q in &mut per {
        q.confused_with = taken_for
            .iter()
            .filter(|((a, _), _)| *a == q.class)
            .map(|(&(_, b), &n)| (b, n))
            .max_by(|x, y| x.1.cmp(&y.1).then(y.0.cmp(&x.0)));
    }
    let mut pairs: HashMap<(u32, u32), ConfusedPair> = HashMap::new();
    for (&(from, to), &n) in &taken_for {
        let (a, b) = (from.min(to), from.max(to));
        let p = pairs.entry((a, b)).or_insert(ConfusedPair {
            a,
            b,
            a_as_b: 0,
            b_as_a: 0,
        });
        if from == a {
            p.a_as_b += n;
        } else {
            p.b_as_a += n;
        }
    }
    let mut pairs: Vec<ConfusedPair> = pairs.into_values().collect();
    pairs.sort_by(|x, y| {
        (y.a_as_b + y.b_as_a)
            .cmp(&(x.a_as_b + x.b_as_a))
            .then((x.a, x.b).cmp(&(y.a, y.b)))
    });
    let margin = |c: &Checked| c.nearest_other.map_or(0.0, |(_, s)| s - c.own);
    let mut suspects: Vec<Checked> = checks.iter().filter(|c| !c.right()).cloned().collect();
    suspects.sort_by(|a, b| margin(b).total_cmp(&margin(a)).then(a.row.cmp(&b.row)));
    Quality {
        classes: per,
        pairs,
        suspects,
        checked: checks.len() as u32,
        right: checks.iter().filter(|c| c.right()).count() as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three tight clusters along three axes (four examples each), one example of class 0
    /// placed in class 2's cluster: a mislabelled photo.
    fn clusters() -> (Vec<f32>, Vec<u32>) {
        let dim = 4;
        let mut x = Vec::new();
        let mut y = Vec::new();
        for class in 0..3u32 {
            for j in 0..4 {
                let mut v = vec![0.0f32; dim];
                v[class as usize] = 1.0;
                v[3] = 0.05 * j as f32;
                x.extend(v);
                y.push(class);
            }
        }
        let mut wrong = vec![0.0f32; dim];
        wrong[2] = 1.0;
        wrong[3] = 0.02;
        x.extend(wrong);
        y.push(0);
        (x, y)
    }

    #[test]
    fn a_mislabelled_example_is_the_suspect_and_its_class_is_confused() {
        let (x, y) = clusters();
        let checks = leave_one_out(&x, 4, &y, 3).unwrap();
        assert_eq!(checks.len(), 13);
        let q = summarize(&checks, &y, 3);
        assert_eq!(q.suspects.len(), 1, "{:?}", q.suspects);
        let s = &q.suspects[0];
        assert_eq!((s.row, s.class, s.predicted), (12, 0, 2));
        assert!(s.nearest_other.unwrap().1 > s.own);
        assert_eq!((q.checked, q.right), (13, 12));
        assert_eq!(q.classes[0].examples, 5);
        assert_eq!(q.classes[0].accuracy(), Some(0.8));
        assert_eq!(q.classes[0].confused_with, Some((2, 1)));
        assert_eq!(q.classes[1].accuracy(), Some(1.0));
        assert_eq!(q.classes[1].confused_with, None);
        assert!(
            q.classes[1].needs_more_photos(),
            "four photos are under five"
        );
        assert!(!q.classes[0].needs_more_photos(), "five photos at 80 %");
        assert_eq!(
            q.pairs,
            vec![ConfusedPair {
                a: 0,
                b: 2,
                a_as_b: 1,
                b_as_a: 0
            }]
        );
    }

    #[test]
    fn a_class_of_one_example_has_no_estimate() {
        let x = vec![1.0, 0.0, 0.9, 0.1, 0.0, 1.0];
        let y = vec![0, 0, 1];
        let checks = leave_one_out(&x, 2, &y, 2).unwrap();
        assert_eq!(checks.len(), 2);
        let q = summarize(&checks, &y, 2);
        assert_eq!(q.classes[1].accuracy(), None);
        assert!(q.classes[1].needs_more_photos());
        assert!(leave_one_out(&[], 2, &[], 0).unwrap().is_empty());
    }
}
