//! Fused per-channel bias + activation, applied in place to a fresh convolution output.
//!
//! Why: after folding, every convolution is followed by `+ bias` and usually a ReLU/ReLU6; as
//! separate candle ops that is two or three more passes over the activation (ReLU6 is a
//! `maximum` then a `minimum`), each allocating a new tensor. In early MobileNetV2 layers they
//! cost about as much as the 1x1 convolution itself. One in-place pass does all of it.

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Tensor};
use rayon::prelude::*;

/// The activation after a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    None,
    Relu,
    Relu6,
}

impl Act {
    /// The clamp bounds the activation amounts to.
    pub fn bounds(self) -> (f32, f32) {
        match self {
            Act::None => (f32::NEG_INFINITY, f32::INFINITY),
            Act::Relu => (0.0, f32::INFINITY),
            Act::Relu6 => (0.0, 6.0),
        }
    }

    /// The activation as ordinary tensor ops (devices without the fused kernel).
    pub fn apply(self, x: Tensor) -> Result<Tensor> {
        match self {
            Act::None => Ok(x),
            Act::Relu => x.relu(),
            Act::Relu6 => x.clamp(0f32, 6f32),
        }
    }
}

/// `act(y + b)` with `y: [N, C, H, W]` and `b: [C]`; in place when `y` is a contiguous CPU
/// tensor that nothing else holds (a convolution's fresh output).
pub fn bias_act(y: Tensor, b: &Tensor, act: Act) -> Result<Tensor> {
    if y.device().is_cpu() && y.dtype() == DType::F32 && y.is_contiguous() && y.rank() == 4 {
        y.inplace_op2(&b.contiguous()?, &BiasAct(act))?;
        return Ok(y);
    }
    // `b` is `[C]` or already `[1, C, 1, 1]` (a folded convolution's bias).
    let c = b.elem_count();
    act.apply(y.broadcast_add(&b.reshape((1, c, 1, 1))?)?)
}

struct BiasAct(Act);

impl InplaceOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "bias-act"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (_, c, h, w) = l1.shape().dims4()?;
        let (CpuStorage::F32(y), CpuStorage::F32(b)) = (s1, s2) else {
            candle_core::bail!("bias-act: f32 only");
        };
        let (Some((ys, ye)), Some((bs, be))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("bias-act: inputs must be contiguous");
        };
        let b = &b[bs..be];
        if b.len() != c {
            candle_core::bail!("bias-act: {} biases for {c} channels", b.len());
        }
        let (lo, hi) = self.0.bounds();
        y[ys..ye]
            .par_chunks_mut((h * w).max(1))
            .enumerate()
            .for_each(|(plane, p)| {
                let bias = b[plane % c];
                p.iter_mut().for_each(|v| *v = (*v + bias).clamp(lo, hi));
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fused_matches_separate_ops() -> Result<()> {
        for act in [Act::None, Act::Relu, Act::Relu6] {
            let y = (Tensor::randn(0f32, 4., (2, 3, 4, 5), &Device::Cpu)? * 1.0)?;
            let b = Tensor::randn(0f32, 1., 3, &Device::Cpu)?;
            let want = act.apply(y.broadcast_add(&b.reshape((1, 3, 1, 1))?)?)?;
            let got = bias_act(y.copy()?, &b, act)?;
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff == 0.0, "{act:?}: {diff}");
        }
        Ok(())
    }
}
