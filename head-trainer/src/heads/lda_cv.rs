//! Step 5 of the `lda` spec: which grid point a tenant gets, by stratified cross-validation on
//! its own training photos (docs/study/heads-2026-12.md).
//!
//! Why cross-validation and not a rule: whether whitening by the pooled covariance pays depends
//! on how many classes and photos the tenant has and on what they are (it does on birds, not on
//! pets), so each tenant's own photos decide.

use candle_core::Tensor;
use rand::seq::SliceRandom;

use super::Result;
use super::lda::{Config, FALLBACK, Form, Model, Power, fit_models, grid, prepare};
use super::train::rng;

/// Stratified folds: within each class (in class order) its rows in a seeded random order,
/// dealt round-robin to folds `0..folds`. The only row of a class gets `folds`, a fold that
/// is never held out: without it the class would have no mean to be recognised by.
pub fn folds_of(y: &[u32], classes: usize, folds: usize, seed: u64) -> Vec<usize> {
    let mut rng = rng(seed);
    let mut fold = vec![0; y.len()];
    for c in 0..classes as u32 {
        let mut rows: Vec<usize> = (0..y.len()).filter(|&i| y[i] == c).collect();
        rows.shuffle(&mut rng);
        let single = rows.len() == 1;
        for (j, i) in rows.into_iter().enumerate() {
            fold[i] = if single { folds } else { j % folds };
        }
    }
    fold
}

/// Step 5: the grid point with the best cross-validated accuracy (ties: the last).
pub(super) fn select(
    x: &Tensor,
    y: &[u32],
    classes: usize,
    folds: usize,
    seed: u64,
) -> Result<Config> {
    let fold = folds_of(y, classes, folds, seed);
    let grid = grid();
    // Right answers per grid point; `None` once a fold could not fit it (no residuals).
    let mut right: Vec<Option<usize>> = vec![Some(0); grid.len()];
    for power in [Power::Sqrt, Power::Identity] {
        let (_, a) = prepare(x, power)?;
        let at: Vec<usize> = (0..grid.len())
            .filter(|&i| grid[i].power == power)
            .collect();
        let models: Vec<Model> = at.iter().map(|&i| grid[i].model).collect();
        cross_validate(&a, y, classes, &fold, folds, &models, |m, rows, logits| {
            let slot = &mut right[at[m]];
            *slot = match (*slot, logits) {
                (Some(n), Some(l)) => Some(n + count_right(l, rows, y)?),
                _ => None,
            };
            Ok(())
        })?;
    }
    let best = right.iter().flatten().max().copied().unwrap_or(0);
    Ok((0..grid.len())
        .rev()
        .find(|&i| right[i] == Some(best))
        .map_or(FALLBACK, |i| grid[i]))
}

/// For each fold, fits `models` on the other folds' rows of `a` and hands `visit` the model's
/// index, the held-out rows and their logits (`None` where the model could not be fitted).
fn cross_validate(
    a: &Tensor,
    y: &[u32],
    classes: usize,
    fold: &[usize],
    folds: usize,
    models: &[Model],
    mut visit: impl FnMut(usize, &[usize], Option<&Tensor>) -> Result<()>,
) -> Result<()> {
    for f in 0..folds {
        let (held, kept): (Vec<usize>, Vec<usize>) = (0..y.len()).partition(|&i| fold[i] == f);
        if held.is_empty() {
            continue;
        }
        let rows = |r: &[usize]| -> Result<Tensor> {
            let idx: Vec<u32> = r.iter().map(|&i| i as u32).collect();
            Ok(a.index_select(&Tensor::from_vec(idx, r.len(), a.device())?, 0)?)
        };
        let y_kept: Vec<u32> = kept.iter().map(|&i| y[i]).collect();
        let fits = fit_models(&rows(&kept)?, &y_kept, classes, models, Form::Auto)?;
        let a_held = rows(&held)?;
        for (m, fit) in fits.iter().enumerate() {
            let logits = fit.as_ref().map(|l| l.logits(&a_held)).transpose()?;
            visit(m, &held, logits.as_ref())?;
        }
    }
    Ok(())
}

/// Rows (`rows[i]` is row `i` of `logits`) whose first highest logit is their label.
fn count_right(logits: &Tensor, rows: &[usize], y: &[u32]) -> Result<usize> {
    let v = logits.to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .zip(&v)
        .filter(|(r, l)| argmax(l) == y[**r] as usize)
        .count())
}

/// Index of the first largest value (numpy's `argmax`).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}
