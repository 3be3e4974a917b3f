//! Calibration pooled over seeds, beside what a perfectly calibrated head would show.
//!
//! A 15-bin ECE on one seed's test photos (185 on pets) is mostly noise: a head whose
//! probabilities are exactly right still shows an ECE of several points, because each bin's
//! accuracy is a small sample. So the report pools every seed's answers (10 x 185 on pets) and
//! prints, beside the pooled ECE, its noise floor: the ECE of a simulated head with the same
//! confidences whose answers are right with exactly those probabilities (mean and 95th
//! percentile over [`DRAWS`] draws, a fixed seed so two runs print the same). A pooled ECE
//! inside the floor's range is as calibrated as the measurement can tell; the excess over the
//! floor's mean is the part that is the head's.

use std::fmt::Write as _;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::metrics::{self, ECE_BINS, Prediction};
use super::protocol::SeedRun;

/// Simulated perfectly calibrated heads per noise floor: enough that the 95th percentile
/// moves by less than a tenth of a point between seeds of the generator (pets at k = 5, 1,850
/// answers: 2.46-2.53 over six seeds, checked with numpy on the saved predictions).
pub const DRAWS: usize = 400;

/// The ECE a perfectly calibrated head would show on answers with these confidences:
/// (mean, 95th percentile) over `draws` simulations, in points.
pub fn noise_floor(confidences: &[f64], bins: usize, draws: usize, seed: u64) -> (f64, f64) {
    if confidences.is_empty() || draws == 0 {
        return (0.0, 0.0);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut eces: Vec<f64> = (0..draws)
        .map(|_| {
            let answers = confidences.iter().map(|&c| (c, rng.random::<f64>() < c));
            metrics::ece_of(answers, bins)
        })
        .collect();
    eces.sort_by(f64::total_cmp);
    let mean = eces.iter().sum::<f64>() / draws as f64;
    let p95 = eces[((draws as f64 * 0.95).ceil() as usize).clamp(1, draws) - 1];
    (mean, p95)
}

/// One head at one k, every seed's answers pooled.
#[derive(Debug, Clone, PartialEq)]
pub struct Pooled {
    pub answers: usize,
    /// Mean top-1 probability and accuracy, percent.
    pub confidence: f64,
    pub accuracy: f64,
    pub ece: f64,
    /// (mean, 95th percentile) of a perfectly calibrated head's ECE on the same confidences.
    pub floor: (f64, f64),
}

pub fn pooled(runs: &[SeedRun], k: usize, head: &str) -> Option<Pooled> {
    let preds: Vec<&Prediction> = runs
        .iter()
        .filter(|r| r.k == k)
        .filter_map(|r| r.heads.iter().find(|h| h.head == head))
        .flat_map(|h| &h.preds)
        .collect();
    if preds.is_empty() {
        return None;
    }
    let answers: Vec<(f64, bool)> = preds.iter().map(|p| metrics::answer(p)).collect();
    let n = answers.len() as f64;
    let confidences: Vec<f64> = answers.iter().map(|a| a.0).collect();
    Some(Pooled {
        answers: answers.len(),
        confidence: 100.0 * confidences.iter().sum::<f64>() / n,
        accuracy: 100.0 * answers.iter().filter(|a| a.1).count() as f64 / n,
        ece: metrics::ece_of(answers.iter().copied(), ECE_BINS),
        // One generator seed per k, so the floor does not depend on which heads were asked for.
        floor: noise_floor(&confidences, ECE_BINS, DRAWS, k as u64),
    })
}

/// The report's calibration section: per k and head, the pooled ECE beside its noise floor.
pub fn section(s: &mut String, shots: &[usize], runs: &[SeedRun], heads: &[String]) {
    let _ = writeln!(s, "## Calibration, every seed's answers pooled\n");
    let _ = writeln!(
        s,
        "The per-seed ECE in the tables above is mostly noise at this many test photos. Here \
         each head's answers over all seeds are pooled; *floor* is the ECE a perfectly \
         calibrated head would show on the same confidences (its answers right with exactly \
         the stated probability; mean and 95th percentile of {DRAWS} simulations), so a pooled \
         ECE below the floor's 95th percentile is as calibrated as this test set can tell, and \
         *excess* (pooled ECE minus the floor's mean) is the head's own miscalibration. \
         Confidence and accuracy are means, in percent: confidence above accuracy is \
         over-confidence.\n"
    );
    let _ = writeln!(
        s,
        "| k | head | answers | confidence | accuracy | pooled ECE | floor (mean, 95th pct) | excess |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for &k in shots {
        for head in std::iter::once("").chain(heads.iter().map(String::as_str)) {
            let Some(p) = pooled(runs, k, head) else {
                continue;
            };
            let name = if head.is_empty() { "default" } else { head };
            let _ = writeln!(
                s,
                "| {k} | {name} | {} | {:.1} | {:.1} | {:.1} | {:.1}, {:.1} | {:+.1} |",
                p.answers,
                p.confidence,
                p.accuracy,
                p.ece,
                p.floor.0,
                p.floor.1,
                p.ece - p.floor.0
            );
        }
    }
    let _ = writeln!(s);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certain_answers_have_no_floor() {
        // Confidence 1 is always right and 0 always wrong in simulation: no noise at all.
        assert_eq!(noise_floor(&[1.0, 1.0, 0.0], 15, 50, 7), (0.0, 0.0));
        assert_eq!(noise_floor(&[], 15, 50, 7), (0.0, 0.0));
    }

    #[test]
    fn floor_shrinks_with_more_answers_and_matches_the_binomial() {
        // All answers at 0.5 fall in one bin: ECE = |hits/n - 0.5|, whose mean for a binomial
        // is about sqrt(0.25 / n) * sqrt(2 / pi) = 0.399 / sqrt(n).
        let small = noise_floor(&vec![0.5; 100], 15, 2000, 1);
        let large = noise_floor(&vec![0.5; 10_000], 15, 2000, 1);
        let expect = |n: f64| 100.0 * 0.5 * (2.0 / std::f64::consts::PI).sqrt() / n.sqrt();
        assert!((small.0 - expect(100.0)).abs() < 0.4, "{small:?}");
        assert!((large.0 - expect(10_000.0)).abs() < 0.04, "{large:?}");
        assert!(small.1 > small.0 && large.1 > large.0);
        // Deterministic: the same seed prints the same floor.
        assert_eq!(small, noise_floor(&vec![0.5; 100], 15, 2000, 1));
    }
}
