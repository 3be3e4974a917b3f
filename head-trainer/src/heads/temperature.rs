//! Temperature scaling: the `T` that makes `softmax(logits / T)` honest on held-out logits.
//!
//! The mean negative log-likelihood is convex in `1 / T` (a log-sum-exp minus a linear term),
//! so it has one minimum along `log T` too, and a golden-section search over `log T` finds it
//! without derivatives, in a fixed number of passes over the logits (deterministic, and
//! `O(n classes)` per pass, so a 6,000-photo tenant costs tens of passes, not thousands).

/// Range searched: `T` in `[1e-3, 1e2]`.
const LOG_T_MIN: f64 = -6.907_755_278_982_137; // ln 1e-3
const LOG_T_MAX: f64 = 4.605_170_185_988_092; // ln 1e2
/// Golden-section steps: the bracket shrinks to 0.618^30 of 11.5 (1e-5 in log T), far
/// finer than the NLL can tell apart; each step is one pass over `n x classes` logits.
const STEPS: usize = 30;

/// The temperature minimising the mean NLL of `softmax(logits / T)` (row-major `n x
/// classes`, labels `y`). 1 when there is nothing to fit.
pub fn fit(logits: &[f32], y: &[u32], classes: usize) -> f64 {
    if y.is_empty() || classes == 0 || logits.len() != y.len() * classes {
        return 1.0;
    }
    let nll = |log_t: f64| mean_nll(logits, y, classes, (-log_t).exp());
    let ratio = (5f64.sqrt() - 1.0) / 2.0;
    let (mut lo, mut hi) = (LOG_T_MIN, LOG_T_MAX);
    let mut x1 = hi - ratio * (hi - lo);
    let mut x2 = lo + ratio * (hi - lo);
    let (mut f1, mut f2) = (nll(x1), nll(x2));
    for _ in 0..STEPS {
        if f1 <= f2 {
            hi = x2;
            (x2, f2) = (x1, f1);
            x1 = hi - ratio * (hi - lo);
            f1 = nll(x1);
        } else {
            lo = x1;
            (x1, f1) = (x2, f2);
            x2 = lo + ratio * (hi - lo);
            f2 = nll(x2);
        }
    }
    ((lo + hi) / 2.0).exp()
}

/// The largest gap, over rows, between a row's best and second-best logit (0 for one class).
pub fn largest_runner_up_gap(logits: &[f32], classes: usize) -> f64 {
    if classes < 2 {
        return 0.0;
    }
    logits
        .chunks_exact(classes)
        .map(|row| {
            let (mut first, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
            for &z in row {
                if z > first {
                    (first, second) = (z, first);
                } else if z > second {
                    second = z;
                }
            }
            f64::from(first - second)
        })
        .filter(|g| g.is_finite())
        .fold(0.0, f64::max)
}

/// Mean over rows of `logsumexp(beta z) - beta z_y`.
pub fn mean_nll(logits: &[f32], y: &[u32], classes: usize, beta: f64) -> f64 {
    let total: f64 = logits
        .chunks_exact(classes)
        .zip(y)
        .map(|(row, &label)| {
            let top = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let sum: f64 = row.iter().map(|&z| (beta * (z as f64 - top)).exp()).sum();
            sum.ln() - beta * (row[label as usize] as f64 - top)
        })
        .sum();
    total / y.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logits that are right 3 times in 4 with margin 2: the best T makes p(right) = 3/4 for
    /// two classes, i.e. 2 / T = ln 3.
    #[test]
    fn finds_the_calibrating_temperature() {
        let logits = [2.0f32, 0.0, 2.0, 0.0, 2.0, 0.0, 0.0, 2.0];
        let y = [0u32, 0, 0, 0];
        let t = fit(&logits, &y, 2);
        assert!((t - 2.0 / 3f64.ln()).abs() < 1e-4, "{t}");
        assert_eq!(largest_runner_up_gap(&logits, 2), 2.0);
        assert_eq!(largest_runner_up_gap(&[1.0, 5.0, 4.0], 3), 1.0);
    }
}
