//! Depthwise 3x3 convolution (MobileNetV2) with its bias and ReLU6 fused in.
//!
//! Why a kernel of our own: candle's grouped `conv2d` runs one small convolution per group,
//! i.e. 960 separate convolutions for one MobileNetV2 layer, and even expressed as k*k shifted
//! multiply-adds over whole tensors the op is 2-3x the cost of the 1x1 convolution beside it
//! (every tap is a full pass over memory). Here one pass per output plane does the taps, the
//! bias and the clamp, planes in parallel. Other devices fall back to the tensor-op version.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::ops::Act;

/// `act(depthwise(x, w) + b)`; `x: [N,C,H,W]`, `w: [C,1,k,k]`, `b: [C]`.
pub fn depthwise_bias_act(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    stride: usize,
    pad: usize,
    act: Act,
) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        let op = Depthwise { stride, pad, act };
        return x
            .contiguous()?
            .apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &op);
    }
    let (_, c, _, _) = x.dims4()?;
    let y = taps(x, w, w.dim(2)?, stride, pad)?.broadcast_add(&b.reshape((1, c, 1, 1))?)?;
    act.apply(y)
}

struct Depthwise {
    stride: usize,
    pad: usize,
    act: Act,
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        (CpuStorage::F32(_), None) => candle_core::bail!("depthwise: {what} is not contiguous"),
        _ => candle_core::bail!("depthwise: {what} must be f32"),
    }
}

impl CustomOp3 for Depthwise {
    fn name(&self) -> &'static str {
        "depthwise-bias-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (
            f32_slice(s1, l1, "input")?,
            f32_slice(s2, l2, "weight")?,
            f32_slice(s3, l3, "bias")?,
        );
        let (n, c, h, wd) = l1.shape().dims4()?;
        let (wc, one, k, k2) = l2.shape().dims4()?;
        if wc != c
            || one != 1
            || k != k2
            || b.len() != c
            || h + 2 * self.pad < k
            || wd + 2 * self.pad < k
        {
            candle_core::bail!(
                "depthwise: input {:?}, weight {:?}, bias {}",
                l1.dims(),
                l2.dims(),
                b.len()
            );
        }
        let (s, p) = (self.stride, self.pad);
        let (lo, hi) = self.act.bounds();
        let ho = (h + 2 * p - k) / s + 1;
        let wo = (wd + 2 * p - k) / s + 1;
        let mut out = vec![0f32; n * c * ho * wo];
        out.par_chunks_mut(ho * wo)
            .enumerate()
            .for_each(|(plane, o)| {
                let ch = plane % c;
                let xin = &x[plane * h * wd..(plane + 1) * h * wd];
                let wk = &w[ch * k * k..(ch + 1) * k * k];
                o.fill(b[ch]);
                for oy in 0..ho {
                    let orow = &mut o[oy * wo..(oy + 1) * wo];
                    for ky in 0..k {
                        // Input row oy*s + ky - p; skip rows that fall in the zero padding.
                        let Some(iy) = (oy * s + ky).checked_sub(p).filter(|&iy| iy < h) else {
                            continue;
                        };
                        let irow = &xin[iy * wd..(iy + 1) * wd];
                        for kx in 0..k {
                            let wv = wk[ky * k + kx];
                            // Output columns whose input column ox*s + kx - p lies inside the row.
                            let lo = p.saturating_sub(kx).div_ceil(s);
                            let hi = ((wd + p).saturating_sub(kx).div_ceil(s)).min(wo);
                            if lo >= hi {
                                continue;
                            }
                            if s == 1 {
                                let start = lo + kx - p;
                                let src = &irow[start..start + (hi - lo)];
                                for (ov, iv) in orow[lo..hi].iter_mut().zip(src) {
                                    *ov += wv * iv;
                                }
                            } else {
                                for (ox, ov) in orow.iter_mut().enumerate().take(hi).skip(lo) {
                                    *ov += wv * irow[ox * s + kx - p];
                                }
                            }
                        }
                    }
                    if self.act != Act::None {
                        orow.iter_mut().for_each(|v| *v = v.clamp(lo, hi));
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, c, ho, wo))))
    }
}

/// Depthwise convolution as k*k shifted, per-channel-scaled copies of the padded input, for
/// devices without the fused kernel. `w` is `[C, 1, k, k]`. Strided taps come from viewing the
/// padded input as `[N, C, H/s, s, W/s, s]`, so no op needs a step-slice.
pub fn taps(x: &Tensor, w: &Tensor, k: usize, stride: usize, pad: usize) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let ho = (h + 2 * pad - k) / stride + 1;
    let wo = (wd + 2 * pad - k) / stride + 1;
    // Extra zeros at the bottom/right so the padded size divides by the stride; never read.
    let extra_h = (stride - (h + 2 * pad) % stride) % stride;
    let extra_w = (stride - (wd + 2 * pad) % stride) % stride;
    let xp = x
        .pad_with_zeros(2, pad, pad + extra_h)?
        .pad_with_zeros(3, pad, pad + extra_w)?;
    let (hp, wp) = (h + 2 * pad + extra_h, wd + 2 * pad + extra_w);
    let view = xp.reshape((n, c, hp / stride, stride, wp / stride, stride))?;
    let mut acc: Option<Tensor> = None;
    for ky in 0..k {
        for kx in 0..k {
            let tap = view
                .narrow(2, ky / stride, ho)?
                .narrow(3, ky % stride, 1)?
                .narrow(4, kx / stride, wo)?
                .narrow(5, kx % stride, 1)?
                .reshape((n, c, ho, wo))?;
            let wk = w
                .narrow(2, ky, 1)?
                .narrow(3, kx, 1)?
                .reshape((1, c, 1, 1))?;
            let term = tap.broadcast_mul(&wk)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
    }
    acc.ok_or_else(|| candle_core::Error::Msg("depthwise kernel of size 0".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn kernel_and_taps_match_grouped_conv2d() -> Result<()> {
        let dev = Device::Cpu;
        for (h, stride, relu6) in [
            (8, 1, false),
            (8, 2, true),
            (7, 2, false),
            (9, 1, true),
            (1, 1, false),
            (2, 2, false),
        ] {
            let x = Tensor::randn(0f32, 1., (2, 5, h, h + 1), &dev)?;
            let w = Tensor::randn(0f32, 1., (5, 1, 3, 3), &dev)?;
            let b = Tensor::randn(0f32, 1., 5, &dev)?;
            let mut want = x
                .conv2d(&w, 1, stride, 1, 5)?
                .broadcast_add(&b.reshape((1, 5, 1, 1))?)?;
            if relu6 {
                want = want.clamp(0f32, 6f32)?;
            }
            let act = if relu6 { Act::Relu6 } else { Act::None };
            let fused = depthwise_bias_act(&x, &w, &b, stride, 1, act)?;
            let mut tapped =
                taps(&x, &w, 3, stride, 1)?.broadcast_add(&b.reshape((1, 5, 1, 1))?)?;
            if relu6 {
                tapped = tapped.clamp(0f32, 6f32)?;
            }
            for got in [fused, tapped] {
                assert_eq!(got.dims(), want.dims());
                let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "h {h} stride {stride}: {diff}");
            }
        }
        Ok(())
    }
}
