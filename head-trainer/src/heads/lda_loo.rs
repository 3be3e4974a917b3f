//! Leave-one-out logits of a fitted [`super::lda`] head on its own training rows, the
//! evidence its temperature is fitted on.
//!
//! Why leave-one-out of the final head and not the cross-validation folds: a fold model sees
//! a quarter to a half fewer photos than the head a tenant gets, so its held-out answers are
//! less sure than the final head's answers on new photos, and a temperature fitted on them
//! left the head over-confident (issue #15; the fix then was a divisor read off test photos). Leaving
//! one photo out of a head fitted on all the others is what a new photo meets.
//!
//! Refitting once per photo would cost `n` fits. Closed form instead: leaving photo `x`
//! (residual `r`, class `y` of `n_y` photos) out moves its class mean to
//! `m_y' = m_y - r / (n_y - 1)` and takes its share out of the pooled scatter,
//! `Sigma' = Sigma - n_y / ((n_y - 1) n) r r^T` (the shrinkage scale and the `1 / n` kept), whose
//! inverse is one Sherman-Morrison step from `Sigma^-1`. Every logit
//! `x Sigma'^-1 m_c' - m_c' Sigma'^-1 m_c' / 2` then needs only scalars the fit already has or
//! one matmul gives: `x Sigma^-1 m_c` and `m_c Sigma^-1 m_c` from the head's logits and bias,
//! `r Sigma^-1 m_c` from `R P`, and `q = r Sigma^-1 r`, which takes one Cholesky and one
//! triangular solve for all photos. scripts/study/calibration.py checks it against exact refits
//! (within 2-3 % of the logits' scale; keeping `Sigma` instead, the own-class mean moved alone,
//! was off by 90 % and fitted a temperature far too confident). Nearest class mean is left out
//! exactly: the cosine to its class's sum without the photo.
//!
//! One step further: the left-out photo meets a class mean of `n_y - 1` photos, a new photo
//! one of `n_y`, so leave-one-out is less sure than the head will be (its temperature came out
//! 1.06-1.38x the test-optimal one, most at 3 photos a class). Under a Gaussian class a photo's
//! expected squared distance to a mean of `m` others is `s (1 + 1/m)`; from `m = n_y - 1` to
//! `n_y` it shrinks by the factor `1 - 1/n_y^2`, so the own-class logit (minus half that
//! distance, up to terms every class shares) is raised by `d / (2 n_y^2)`, `d` the photo's
//! distance `(x - m_y') Sigma'^-1 (x - m_y')`. No constant is fitted: with it the study's ECE at
//! 5 photos a class fell from 3.5 to 2.1 on birds and from 6.4 to 5.7 on pets, which is pets'
//! noise floor with 185 test photos. NCM's cosines are left as they are.

use candle_core::{DType, Tensor};

use super::Result;
use super::lda::{EPS, Linear, Model, NCM_SCALE, Residuals, counts, residuals};
use super::linalg::{self, Cholesky};
use super::train::class_sums;

/// Rows per triangular solve in the primal form: bounds the `d x rows` f64 right-hand side
/// (10 MiB at d = 1280) whatever the tenant's size.
const SOLVE_ROWS: usize = 1024;

/// Row-major `n x classes` leave-one-out logits of `linear` (fitted as `model` on unit rows
/// `a` with labels `y`). A row whose class has no other row has nothing to leave out against:
/// its logits are finite but meaningless, and callers drop them.
pub fn logits(
    a: &Tensor,
    y: &[u32],
    classes: usize,
    model: Model,
    linear: &Linear,
) -> Result<Vec<f32>> {
    let mut z: Vec<f32> = linear.logits(a)?.flatten_all()?.to_vec1()?;
    match model {
        Model::Lda(gamma) => match residuals(a, y, classes)? {
            Some(res) => lda_left_out(a, y, classes, &res, gamma, linear, &z),
            None => Ok(z),
        },
        Model::Ncm => {
            for (i, (&label, v)) in y.iter().zip(ncm_own(a, y, classes)?).enumerate() {
                z[i * classes + label as usize] = v;
            }
            Ok(z)
        }
    }
}

/// Every logit of every row with the row left out (see the module doc), row-major.
fn lda_left_out(
    a: &Tensor,
    y: &[u32],
    classes: usize,
    res: &Residuals,
    gamma: f64,
    linear: &Linear,
    z: &[f32],
) -> Result<Vec<f32>> {
    let (n, d) = a.dims2()?;
    let shrink = gamma * res.tau;
    let q: Vec<f64> = if n <= d {
        // Woodbury, as the fit's dual form: with K = R R^T,
        // r_i Sigma^-1 r_i = (K_ii - k_i^T (K + n shrink I)^-1 k_i) / shrink.
        let gram = res.r.matmul(&res.r.t()?)?.to_dtype(DType::F64)?;
        let chol = Cholesky::new(&linalg::add_diagonal(&gram, n as f64 * shrink)?)?;
        let through = chol.quadratic_forms(&gram)?.to_vec1::<f64>()?;
        let diag: Vec<f64> = res.r.sqr()?.sum(1)?.to_dtype(DType::F64)?.to_vec1()?;
        diag.iter()
            .zip(&through)
            .map(|(k, t)| ((k - t) / shrink).max(0.0))
            .collect()
    } else {
        let cov = (res.r.t()?.matmul(&res.r)?.to_dtype(DType::F64)? / n as f64)?;
        let chol = Cholesky::new(&linalg::add_diagonal(&cov, shrink)?)?;
        let mut q = Vec::with_capacity(n);
        for start in (0..n).step_by(SOLVE_ROWS) {
            let rows = res.r.narrow(0, start, SOLVE_ROWS.min(n - start))?;
            q.extend(
                chol.quadratic_forms(&rows.t()?.contiguous()?)?
                    .to_vec1::<f64>()?,
            );
        }
        q
    };
    // r_i Sigma^-1 m_c, and m_c Sigma^-1 m_c = -2 b_c.
    let w: Vec<f32> = res.r.matmul(&linear.p)?.flatten_all()?.to_vec1()?;
    let b: Vec<f32> = linear.b.to_vec1()?;
    let count = counts(y, classes);
    let mut out = vec![0f32; n * classes];
    for (i, (&label, q)) in y.iter().zip(q).enumerate() {
        let (own, n_y) = (label as usize, count[label as usize] as f64);
        let m1 = (n_y - 1.0).max(1.0);
        let row = i * classes..(i + 1) * classes;
        let (z, w) = (&z[row.clone()], &w[row.clone()]);
        let w_own = f64::from(w[own]);
        // x Sigma^-1 r, and Sherman-Morrison's factor for Sigma' (0, Sigma kept, should
        // rounding leave Sigma' not positive definite).
        let x_r = w_own + q;
        let k = n_y / (m1 * n as f64);
        let beta = if 1.0 - k * q > EPS {
            k / (1.0 - k * q)
        } else {
            0.0
        };
        for c in 0..classes {
            let (mut x_m, mut m_m, mut r_m) = (
                f64::from(z[c] - b[c]),
                -2.0 * f64::from(b[c]),
                f64::from(w[c]),
            );
            if c == own {
                x_m -= x_r / m1;
                m_m += -2.0 * w_own / m1 + q / (m1 * m1);
                r_m = w_own - q / m1;
            }
            let mut logit = x_m + beta * x_r * r_m - (m_m + beta * r_m * r_m) / 2.0;
            if c == own {
                // From n_y - 1 photos to n_y: see the module doc.
                let d_loo = (n_y / m1).powi(2) * (q + beta * q * q);
                logit += d_loo / (2.0 * n_y * n_y);
            }
            out[i * classes + c] = logit as f32;
        }
    }
    Ok(out)
}

/// Each row's scaled cosine to the sum of the other rows of its class.
fn ncm_own(a: &Tensor, y: &[u32], classes: usize) -> Result<Vec<f32>> {
    let n = a.dim(0)?;
    let scale = NCM_SCALE as f32;
    let sums = class_sums(a, y, classes)?;
    let others = (sums.index_select(&Tensor::from_slice(y, n, a.device())?, 0)? - a)?;
    let dot: Vec<f32> = (a * &others)?.sum(1)?.to_vec1()?;
    let norm: Vec<f32> = others.sqr()?.sum(1)?.sqrt()?.to_vec1()?;
    Ok(dot
        .iter()
        .zip(norm)
        .map(|(d, l)| scale * d / l.max(EPS as f32))
        .collect())
}

/// The rows of `logits` (row-major, `classes` wide) and labels of the classes with a second
/// photo: a class's only photo cannot be left out of it.
pub(super) fn held_out_rows(
    logits: &[f32],
    y: &[u32],
    count: &[usize],
    classes: usize,
) -> (Vec<f32>, Vec<u32>) {
    logits
        .chunks_exact(classes)
        .zip(y)
        .filter(|(_, label)| count[**label as usize] >= 2)
        .fold(
            (Vec::new(), Vec::new()),
            |(mut z, mut kept), (row, &label)| {
                z.extend_from_slice(row);
                kept.push(label);
                (z, kept)
            },
        )
}

#[cfg(test)]
mod tests {
    use candle_core::{D, Device};

    use super::*;
    use crate::heads::TrainSet;
    use crate::heads::lda::{self, Form, Power};
    use crate::heads::lda_tests::anisotropic;
    use crate::heads::tests::{DIM, M, group};

    /// Row-major logits of row `i` computed the long way: the class means without it and
    /// `Sigma' = Sigma - n_y / ((n_y - 1) n) r r^T` built and solved directly, then the
    /// own-class logit raised by `d / (2 n_y^2)`, `d` the distance to its class's new mean.
    fn direct(a: &Tensor, y: &[u32], classes: usize, gamma: f64, i: usize) -> Vec<f64> {
        let a = a.to_dtype(DType::F64).unwrap();
        let (n, d) = a.dims2().unwrap();
        let res = residuals(&a.to_dtype(DType::F32).unwrap(), y, classes)
            .unwrap()
            .unwrap();
        let r = res.r.to_dtype(DType::F64).unwrap();
        let sigma = (r.t().unwrap().matmul(&r).unwrap() / n as f64).unwrap();
        let n_y = y.iter().filter(|&&c| c == y[i]).count() as f64;
        let r_i = r.narrow(0, i, 1).unwrap();
        let down =
            (r_i.t().unwrap().matmul(&r_i).unwrap() * (n_y / ((n_y - 1.0) * n as f64))).unwrap();
        let sigma = linalg::add_diagonal(&(sigma - down).unwrap(), gamma * res.tau).unwrap();
        let mut m = res
            .m
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        let r_row = r_i.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for (v, rv) in m[y[i] as usize].iter_mut().zip(&r_row) {
            *v -= rv / (n_y - 1.0);
        }
        let m = Tensor::new(m, &Device::Cpu).unwrap(); // classes x d
        let solved = Cholesky::new(&sigma)
            .unwrap()
            .solve(&m.t().unwrap().contiguous().unwrap())
            .unwrap(); // d x classes
        let x = a.narrow(0, i, 1).unwrap();
        let xm = x.matmul(&solved).unwrap().flatten_all().unwrap();
        let mm = (&m * solved.t().unwrap()).unwrap().sum(D::Minus1).unwrap();
        assert_eq!(d, m.dim(1).unwrap());
        let mut out = (xm - (mm * 0.5).unwrap())
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let own = y[i] as usize;
        let gap = (x - m.narrow(0, own, 1).unwrap()).unwrap(); // 1 x d
        let dist = Cholesky::new(&sigma)
            .unwrap()
            .quadratic_forms(&gap.t().unwrap().contiguous().unwrap())
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[0];
        out[own] += dist / (2.0 * n_y * n_y);
        out
    }

    /// Leave-one-out and full logits, row-major.
    fn both(
        a: &Tensor,
        y: &[u32],
        classes: usize,
        model: Model,
        linear: &Linear,
    ) -> (Vec<f32>, Vec<f32>) {
        let full = linear.logits(a).unwrap().flatten_all().unwrap();
        (
            logits(a, y, classes, model, linear).unwrap(),
            full.to_vec1().unwrap(),
        )
    }

    /// The closed form agrees with the downdated system solved directly, for every row, with
    /// n below d (the dual form) and above it (the primal), at a light and a heavy shrinkage.
    #[test]
    fn closed_form_matches_the_direct_solve() {
        for (classes, per) in [(5, 6), (10, 12)] {
            let rows = anisotropic(classes, per, DIM, 9);
            let ts = TrainSet::new(M, &rows, group).unwrap();
            let (_, a) = lda::prepare(&ts.x_tensor().unwrap(), Power::Sqrt).unwrap();
            for gamma in [1.0, 10.0] {
                let fit = lda::lda_fit(&a, &ts.y, classes, &[gamma], Form::Auto).unwrap();
                let linear = fit[0].as_ref().unwrap();
                let (loo, full) = both(&a, &ts.y, classes, Model::Lda(gamma), linear);
                let mut moved = 0f64;
                for i in 0..ts.len() {
                    let want = direct(&a, &ts.y, classes, gamma, i);
                    let scale = want.iter().fold(1f64, |s, v| s.max(v.abs()));
                    for c in 0..classes {
                        let got = f64::from(loo[i * classes + c]);
                        assert!(
                            (got - want[c]).abs() <= 1e-3 * scale,
                            "n = {}, gamma {gamma}, row {i}, class {c}: {got} vs {}",
                            ts.len(),
                            want[c]
                        );
                        moved =
                            moved.max((f64::from(full[i * classes + c]) - want[c]).abs() / scale);
                    }
                }
                // Leaving a photo out must matter, or the comparison above proves nothing.
                assert!(moved > 1e-2, "n = {}, gamma {gamma}: {moved}", ts.len());
            }
        }
    }

    /// Nearest class mean: each row's own-class logit is its scaled cosine to the unit sum of
    /// the other rows of its class; other classes' logits are the head's own.
    #[test]
    fn nearest_class_mean_is_left_out_exactly() {
        let (classes, per) = (4, 3);
        let ts = TrainSet::new(M, &anisotropic(classes, per, DIM, 2), group).unwrap();
        let (_, a) = lda::prepare(&ts.x_tensor().unwrap(), Power::Identity).unwrap();
        let linear = lda::ncm(&a, &ts.y, classes).unwrap();
        let (loo, full) = both(&a, &ts.y, classes, Model::Ncm, &linear);
        let rows = a.to_vec2::<f32>().unwrap();
        for (i, &label) in ts.y.iter().enumerate() {
            let mut other = vec![0f32; DIM];
            for (j, row) in rows.iter().enumerate() {
                if j != i && ts.y[j] == label {
                    other.iter_mut().zip(row).for_each(|(o, v)| *o += v);
                }
            }
            let norm = other.iter().map(|v| v * v).sum::<f32>().sqrt();
            let cos: f32 = rows[i].iter().zip(&other).map(|(x, o)| x * o).sum::<f32>() / norm;
            for c in 0..classes {
                let want = if c == label as usize {
                    NCM_SCALE as f32 * cos
                } else {
                    full[i * classes + c]
                };
                assert!(
                    (loo[i * classes + c] - want).abs() < 1e-4,
                    "row {i}, class {c}"
                );
            }
        }
    }
}
