//! Deterministic inputs and comparisons for the kernel tests.

use candle_core::{Device, Result, Tensor};

/// `n` values uniform in [-1, 1) from a fixed-seed xorshift: the same on every run.
pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// NCHW `[n, c, h, w]` -> NHWC.
pub fn to_nhwc(x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for b in 0..n {
        for ch in 0..c {
            for p in 0..h * w {
                out[(b * h * w + p) * c + ch] = x[(b * c + ch) * h * w + p];
            }
        }
    }
    out
}

/// candle's conv2d (the reference) on NHWC data, answered in NHWC, with bias, residual and clamp.
#[allow(clippy::too_many_arguments)]
pub fn reference_conv(
    x_nchw: &Tensor,
    w: &Tensor,
    bias: &[f32],
    stride: usize,
    groups: usize,
    residual_nhwc: Option<&[f32]>,
    lo: f32,
    hi: f32,
) -> Result<Vec<f32>> {
    let k = w.dim(2)?;
    let y = x_nchw.conv2d(w, k / 2, stride, 1, groups)?;
    let (n, c, h, wd) = y.dims4()?;
    let b = Tensor::from_slice(bias, (1, c, 1, 1), &Device::Cpu)?;
    let y = y.broadcast_add(&b)?.flatten_all()?.to_vec1::<f32>()?;
    let mut y = to_nhwc(&y, n, c, h, wd);
    if let Some(r) = residual_nhwc {
        y.iter_mut().zip(r).for_each(|(v, r)| *v += r);
    }
    y.iter_mut().for_each(|v| *v = v.clamp(lo, hi));
    Ok(y)
}
