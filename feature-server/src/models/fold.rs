//! Convolution + batch-norm, folded at load time.
//!
//! In eval mode batch-norm is an affine map per output channel, so it folds into the preceding
//! convolution: `w' = w * g / sqrt(v + eps)`, `b' = beta - mean * g / sqrt(v + eps)`. That removes
//! one full pass over every activation tensor (the anchors measure 7-15 % on ResNet18). The fold
//! is computed in f64 so it adds no rounding of its own beyond the final cast to f32.
//!
//! Depthwise convolutions (groups == channels, MobileNetV2) go to our fused kernel
//! ([`super::depthwise`]) rather than candle's grouped conv2d.

use candle_core::{DType, Module, ModuleT, Result, Tensor};

use super::depthwise::depthwise_bias_act;
use super::ops::{Act, bias_act};
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
    /// Appends the state-dict names and shapes of this convolution (`{conv}.weight`, no bias)
    /// and of the batch-norm after it (`{bn}.weight|bias|running_mean|running_var`), as
    /// torchvision lays out every conv + batch-norm pair of both backbones.
    pub fn push_state_dict_shapes(
        &self,
        out: &mut Vec<(String, Vec<usize>)>,
        conv: &str,
        bn: &str,
    ) {
        let (o, i, k, _) = self.weight_shape();
        out.push((format!("{conv}.weight"), vec![o, i, k, k]));
        for p in ["weight", "bias", "running_mean", "running_var"] {
            out.push((format!("{bn}.{p}"), vec![o]));
        }
    }

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
    ///
    /// The folded weights are computed from the file's f32 values and rounded once, to
    /// `conv.dtype()`: reading them at half precision first would round them twice.
    pub fn new(spec: ConvSpec, conv: VarBuilder, bn: VarBuilder, fold: bool) -> Result<Self> {
        if !fold {
            let weight = conv.get(spec.weight_shape(), "weight")?;
            let bn = candle_nn::batch_norm(spec.c_out, BN_EPS, bn)?;
            return Ok(Self {
                spec,
                weight,
                bias: None,
                bn: Some(bn),
            });
        }
        let dtype = conv.dtype();
        let exact = |vb: &VarBuilder, shape: candle_core::Shape, name: &str| {
            vb.get_with_hints_dtype(shape, name, Default::default(), DType::F64)
        };
        let c = spec.c_out;
        let gamma = exact(&bn, c.into(), "weight")?;
        let beta = exact(&bn, c.into(), "bias")?;
        let mean = exact(&bn, c.into(), "running_mean")?;
        let var = exact(&bn, c.into(), "running_var")?;
        let scale = (gamma / (var + BN_EPS)?.sqrt()?)?;
        let bias = (beta - (mean * &scale)?)?.to_dtype(dtype)?;
        let weight = exact(&conv, spec.weight_shape().into(), "weight")?
            .broadcast_mul(&scale.reshape((c, 1, 1, 1))?)?
            .to_dtype(dtype)?;
        Ok(Self {
            spec,
            weight,
            bias: Some(bias.reshape((1, c, 1, 1))?),
            bn: None,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, Act::None)
    }

    /// What the convolution computes in.
    pub fn dtype(&self) -> DType {
        self.weight.dtype()
    }

    /// The shape, folded weight `[c_out, c_in / groups, k, k]` and bias, when batch-norm was
    /// folded (what the CPU engine in [`super::conv`] packs).
    pub fn folded(&self) -> Option<(&ConvSpec, &Tensor, &Tensor)> {
        self.bias.as_ref().map(|b| (&self.spec, &self.weight, b))
    }

    /// The convolution, its batch-norm (folded or not), then the activation. With batch-norm
    /// folded, bias and activation are one in-place pass (depthwise: one pass for everything).
    pub fn forward_act(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        let s = &self.spec;
        let c = s.c_out;
        let depthwise = s.groups > 1 && s.groups == s.c_in && s.groups == s.c_out;
        let y = match (&self.bias, depthwise) {
            (Some(b), true) => {
                return depthwise_bias_act(x, &self.weight, b, s.stride, s.padding, act);
            }
            (None, true) => {
                let zeros = Tensor::zeros(c, x.dtype(), x.device())?;
                depthwise_bias_act(x, &self.weight, &zeros, s.stride, s.padding, Act::None)?
            }
            (Some(b), false) => {
                let y = x.conv2d(&self.weight, s.padding, s.stride, 1, s.groups)?;
                return bias_act(y, b, act);
            }
            (None, false) => x.conv2d(&self.weight, s.padding, s.stride, 1, s.groups)?,
        };
        let y = match &self.bn {
            Some(bn) => bn.forward_t(&y, false)?,
            None => y,
        };
        act.apply(y)
    }
}

impl Module for ConvBn {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ConvBn::forward(self, x)
    }
}
