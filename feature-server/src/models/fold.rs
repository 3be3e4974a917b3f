//! Convolution + batch-norm, folded at load time.
//!
//! In eval mode batch-norm is an affine map per output channel, so it folds into the preceding
//! convolution: `w' = w * g / sqrt(v + eps)`, `b' = beta - mean * g / sqrt(v + eps)`. That removes
//! one full pass over every activation tensor (the anchors measure 7-15 % on ResNet18). The fold
//! is computed in f64 so it adds no rounding of its own beyond the final cast to f32.
//!
//! Depthwise convolutions (groups == channels, MobileNetV2) do not go through candle's grouped
//! conv2d, which runs one tiny convolution per channel (960 of them in one layer); they are
//! computed as k*k shifted multiply-adds over whole tensors instead.

use candle_core::{DType, Module, ModuleT, Result, Tensor};
use candle_nn::{BatchNorm, VarBuilder};

/// PyTorch's default batch-norm epsilon, used by both torchvision backbones.
pub const BN_EPS: f64 = 1e-5;

/// Shape and placement of one convolution.
#[derive(Clone, Copy, Debug)]
pub struct ConvSpec {
    pub c_in: usize,
    pub c_out: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
}

impl ConvSpec {
    pub fn new(c_in: usize, c_out: usize, kernel: usize, stride: usize) -> Self {
        Self {
            c_in,
            c_out,
            kernel,
            stride,
            padding: kernel / 2,
            groups: 1,
        }
    }
    pub fn depthwise(c: usize, stride: usize) -> Self {
        Self {
            groups: c,
            ..Self::new(c, c, 3, stride)
        }
    }
    pub fn weight_shape(&self) -> (usize, usize, usize, usize) {
        (
            self.c_out,
            self.c_in / self.groups,
            self.kernel,
            self.kernel,
        )
    }
}

/// A bias-free convolution followed by batch-norm: folded into one biased convolution, or kept
/// as two ops (for measuring the fold and for checking it is exact).
pub struct ConvBn {
    spec: ConvSpec,
    weight: Tensor,
    bias: Option<Tensor>,
    bn: Option<BatchNorm>,
}

impl ConvBn {
    /// `conv` holds `weight` (torchvision has no conv bias here); `bn` holds `weight`, `bias`,
    /// `running_mean`, `running_var`.
    pub fn new(spec: ConvSpec, conv: VarBuilder, bn: VarBuilder, fold: bool) -> Result<Self> {
        let weight = conv.get(spec.weight_shape(), "weight")?;
        if !fold {
            let bn = candle_nn::batch_norm(spec.c_out, BN_EPS, bn)?;
            return Ok(Self {
                spec,
                weight,
                bias: None,
                bn: Some(bn),
            });
        }
        let c = spec.c_out;
        let gamma = bn.get(c, "weight")?.to_dtype(DType::F64)?;
        let beta = bn.get(c, "bias")?.to_dtype(DType::F64)?;
        let mean = bn.get(c, "running_mean")?.to_dtype(DType::F64)?;
        let var = bn.get(c, "running_var")?.to_dtype(DType::F64)?;
        let scale = (gamma / (var + BN_EPS)?.sqrt()?)?;
        let bias = (beta - (mean * &scale)?)?.to_dtype(DType::F32)?;
        let weight = weight
            .to_dtype(DType::F64)?
            .broadcast_mul(&scale.reshape((c, 1, 1, 1))?)?
            .to_dtype(DType::F32)?;
        Ok(Self {
            spec,
            weight,
            bias: Some(bias.reshape((1, c, 1, 1))?),
            bn: None,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let s = &self.spec;
        let y = if s.groups > 1 && s.groups == s.c_in && s.groups == s.c_out {
            depthwise(x, &self.weight, s.kernel, s.stride, s.padding)?
        } else {
            x.conv2d(&self.weight, s.padding, s.stride, 1, s.groups)?
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        match &self.bn {
            Some(bn) => bn.forward_t(&y, false),
            None => Ok(y),
        }
    }
}

impl Module for ConvBn {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ConvBn::forward(self, x)
    }
}

/// Depthwise convolution as k*k shifted, per-channel-scaled copies of the padded input.
/// `w` is `[C, 1, k, k]`. Strided taps come from viewing the padded input as
/// `[N, C, H/s, s, W/s, s]`, so no op needs a step-slice.
pub fn depthwise(x: &Tensor, w: &Tensor, k: usize, stride: usize, pad: usize) -> Result<Tensor> {
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
    fn depthwise_matches_grouped_conv2d() -> Result<()> {
        let dev = Device::Cpu;
        for (h, stride) in [(8, 1), (8, 2), (7, 2), (9, 1)] {
            let x = Tensor::randn(0f32, 1., (2, 5, h, h + 1), &dev)?;
            let w = Tensor::randn(0f32, 1., (5, 1, 3, 3), &dev)?;
            let a = depthwise(&x, &w, 3, stride, 1)?;
            let b = x.conv2d(&w, 1, stride, 1, 5)?;
            assert_eq!(a.dims(), b.dims());
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "h {h} stride {stride}: {diff}");
        }
        Ok(())
    }
}
