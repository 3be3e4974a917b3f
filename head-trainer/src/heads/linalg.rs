//! Symmetric positive-definite solves for the [`super::lda`] head, on candle tensors.
//!
//! candle has matmul but no Cholesky. The factorisation and the triangular solves here are
//! recursive: a matrix is split in two halves, the off-diagonal work (a triangular solve of
//! the lower-left block, the Schur complement, the update of the right-hand sides) is done by
//! matmuls, which candle runs on its multi-threaded gemm, and only blocks of at most [`LEAF`]
//! rows are handled by plain loops. So an `n x n` factorisation costs about `n^3 / 2` flops,
//! nearly all of them gemm (tens of milliseconds at n = 1280 on two cores), where the
//! textbook loop runs at a fraction of gemm's speed.

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// Blocks up to this size are handled by loops: below it gemm's setup costs more than it
/// saves.
const LEAF: usize = 64;

/// `A = L L^T` of a symmetric positive-definite matrix, for solving `A X = B`.
pub struct Cholesky {
    /// Lower triangular, f64.
    l: Tensor,
}

impl Cholesky {
    /// Factorises `a` (`n x n`; only its lower triangle is read) in f64. A matrix that is not
    /// positive definite (or holds NaN) is an error, never a panic.
    pub fn new(a: &Tensor) -> Result<Self> {
        let (n, m) = a.dims2()?;
        if n != m {
            return Err(not_spd(format!("{n} x {m} matrix is not square")));
        }
        Ok(Self {
            l: factor(&a.to_dtype(DType::F64)?)?,
        })
    }

    /// `A^-1 B` (f64): `L^-T (L^-1 B)`.
    pub fn solve(&self, b: &Tensor) -> Result<Tensor> {
        let y = forward(&self.l, &b.to_dtype(DType::F64)?)?;
        backward(&self.l, &y)
    }

    /// `b_j^T A^-1 b_j` for every column `b_j` of `b` (f64, one value per column): with
    /// `A = L L^T` that is `|L^-1 b_j|^2`, so one triangular solve instead of two.
    pub fn quadratic_forms(&self, b: &Tensor) -> Result<Tensor> {
        Ok(forward(&self.l, &b.to_dtype(DType::F64)?)?.sqr()?.sum(0)?)
    }

    /// `tr(A^-1)`: the quadratic forms of the identity's columns (as costly as the factoring).
    pub fn trace_of_inverse(&self) -> Result<f64> {
        let n = self.l.dim(0)?;
        let eye = Tensor::eye(n, DType::F64, self.l.device())?;
        Ok(self.quadratic_forms(&eye)?.sum_all()?.to_scalar::<f64>()?)
    }
}

/// `a + lambda I` (a square f64 copy).
pub fn add_diagonal(a: &Tensor, lambda: f64) -> Result<Tensor> {
    let n = a.dim(0)?;
    let eye = Tensor::eye(n, DType::F64, a.device())?;
    Ok((a.to_dtype(DType::F64)? + (eye * lambda)?)?)
}

/// Rows `r..r+rn`, columns `c..c+cn` of `a`, contiguous.
fn block(a: &Tensor, r: usize, rn: usize, c: usize, cn: usize) -> Result<Tensor> {
    Ok(a.narrow(0, r, rn)?.narrow(1, c, cn)?.contiguous()?)
}

/// `L` with `L L^T = a`: `L11 = chol(A11)`, `L21 = A21 L11^-T`, `L22 = chol(A22 - L21 L21^T)`.
fn factor(a: &Tensor) -> Result<Tensor> {
    let n = a.dim(0)?;
    if n <= LEAF {
        return leaf_factor(a);
    }
    let h = n / 2;
    let l11 = factor(&block(a, 0, h, 0, h)?)?;
    let l21 = forward(&l11, &block(a, h, n - h, 0, h)?.t()?.contiguous()?)?
        .t()?
        .contiguous()?;
    let schur = (block(a, h, n - h, h, n - h)? - l21.matmul(&l21.t()?)?)?;
    let l22 = factor(&schur)?;
    let top = Tensor::cat(
        &[&l11, &Tensor::zeros((h, n - h), DType::F64, a.device())?],
        1,
    )?;
    let bottom = Tensor::cat(&[&l21, &l22], 1)?;
    Ok(Tensor::cat(&[&top, &bottom], 0)?)
}

/// `X` with `L X = B`, `L` lower triangular: `X1 = L11^-1 B1`, `X2 = L22^-1 (B2 - L21 X1)`.
fn forward(l: &Tensor, b: &Tensor) -> Result<Tensor> {
    let n = l.dim(0)?;
    if n <= LEAF {
        return leaf_solve(l, b, false);
    }
    let (h, c) = (n / 2, b.dim(1)?);
    let x1 = forward(&block(l, 0, h, 0, h)?, &block(b, 0, h, 0, c)?)?;
    let rest = (block(b, h, n - h, 0, c)? - block(l, h, n - h, 0, h)?.matmul(&x1)?)?;
    let x2 = forward(&block(l, h, n - h, h, n - h)?, &rest)?;
    Ok(Tensor::cat(&[&x1, &x2], 0)?)
}

/// `X` with `L^T X = B`: `X2 = L22^-T B2`, `X1 = L11^-T (B1 - L21^T X2)`.
fn backward(l: &Tensor, b: &Tensor) -> Result<Tensor> {
    let n = l.dim(0)?;
    if n <= LEAF {
        return leaf_solve(l, b, true);
    }
    let (h, c) = (n / 2, b.dim(1)?);
    let x2 = backward(&block(l, h, n - h, h, n - h)?, &block(b, h, n - h, 0, c)?)?;
    let l21 = block(l, h, n - h, 0, h)?;
    let rest = (block(b, 0, h, 0, c)? - l21.t()?.matmul(&x2)?)?;
    let x1 = backward(&block(l, 0, h, 0, h)?, &rest)?;
    Ok(Tensor::cat(&[&x1, &x2], 0)?)
}

/// Plain Cholesky of a small block.
fn leaf_factor(a: &Tensor) -> Result<Tensor> {
    let n = a.dim(0)?;
    let a: Vec<f64> = a.flatten_all()?.to_vec1()?;
    // Row-major, lower triangle.
    let mut l = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let dot: f64 = (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum();
            let v = a[i * n + j] - dot;
            if i == j {
                // `is_finite` also catches NaN.
                if !v.is_finite() || v <= 0.0 {
                    return Err(not_spd(format!("pivot {i} is {v}")));
                }
                l[i * n + i] = v.sqrt();
            } else {
                l[i * n + j] = v / l[j * n + j];
            }
        }
    }
    Ok(Tensor::from_vec(l, (n, n), &candle_core::Device::Cpu)?)
}

/// Substitution on a small block: `L X = B`, or `L^T X = B` when `transposed`.
fn leaf_solve(l: &Tensor, b: &Tensor, transposed: bool) -> Result<Tensor> {
    let (n, c) = b.dims2()?;
    let l: Vec<f64> = l.flatten_all()?.to_vec1()?;
    let mut x: Vec<f64> = b.flatten_all()?.to_vec1()?;
    let order: Vec<usize> = if transposed {
        (0..n).rev().collect()
    } else {
        (0..n).collect()
    };
    for (step, &i) in order.iter().enumerate() {
        // Rows already solved, and their coefficient in row `i`'s equation.
        for &k in &order[..step] {
            let coef = if transposed {
                l[k * n + i]
            } else {
                l[i * n + k]
            };
            if coef != 0.0 {
                for j in 0..c {
                    x[i * c + j] -= coef * x[k * c + j];
                }
            }
        }
        let d = l[i * n + i];
        for v in &mut x[i * c..(i + 1) * c] {
            *v /= d;
        }
    }
    Ok(Tensor::from_vec(x, (n, c), &candle_core::Device::Cpu)?)
}

fn not_spd(why: String) -> Error {
    Error::Model(candle_core::Error::Msg(format!(
        "matrix is not positive definite ({why}): non-finite embeddings?"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// A random SPD matrix `X X^T / m + 0.1 I` solved at sizes below, at and well above the
    /// leaf size: `A (A^-1 B) = B`.
    #[test]
    fn solves_random_spd_systems() {
        let mut rng = StdRng::seed_from_u64(5);
        for n in [1usize, 7, 64, 65, 200, 300] {
            let m = n + 3;
            let x: Vec<f64> = (0..n * m).map(|_| rng.random_range(-1.0..1.0)).collect();
            let x = Tensor::from_vec(x, (n, m), &Device::Cpu).unwrap();
            let a = add_diagonal(
                &(x.matmul(&x.t().unwrap()).unwrap() / m as f64).unwrap(),
                0.1,
            )
            .unwrap();
            let b: Vec<f64> = (0..n * 3).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b = Tensor::from_vec(b, (n, 3), &Device::Cpu).unwrap();
            let back = a
                .matmul(&Cholesky::new(&a).unwrap().solve(&b).unwrap())
                .unwrap();
            let err = (back - &b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(err < 1e-9, "n = {n}: residual {err}");
            // The quadratic forms against the full solve: b_j . (A^-1 b)_j.
            let chol = Cholesky::new(&a).unwrap();
            let q = chol.quadratic_forms(&b).unwrap().to_vec1::<f64>().unwrap();
            let full = (&b * chol.solve(&b).unwrap())
                .unwrap()
                .sum(0)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for (q, f) in q.iter().zip(&full) {
                assert!(
                    (q - f).abs() < 1e-9 * f.abs().max(1.0),
                    "n = {n}: {q} vs {f}"
                );
            }
        }
    }

    #[test]
    fn refuses_what_is_not_positive_definite() {
        let a = Tensor::new(&[[1.0f64, 2.0], [2.0, 1.0]], &Device::Cpu).unwrap();
        assert!(Cholesky::new(&a).is_err());
        let nan = Tensor::new(&[[f64::NAN, 0.0], [0.0, 1.0]], &Device::Cpu).unwrap();
        assert!(Cholesky::new(&nan).is_err());
    }
}
