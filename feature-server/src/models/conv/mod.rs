//! The CPU convolution engine both backbones run on: NHWC end to end, weights packed once at
//! load, Winograd F(4x4, 3x3) for stride-1 3x3 convolutions, one fused output pass per layer,
//! every layer split across the rayon pool.
//!
//! Why not candle's conv2d: it converts NCHW to NHWC and flattens the weights on every call,
//! builds im2col tiles one by one and allocates every intermediate, reaching 18-56 GFLOP/s
//! where its own matmul reaches 93 (../shared/anchors/cpu-inference.md). Candle tensors still
//! go in and come out; other devices, and the unfolded reference path, keep candle's ops.
//!
//! Files: [`isa`] picks the SIMD level, [`denormals`] sets flush-to-zero, [`gemm`] (+ `x86`) is the packed microkernel with the
//! fused epilogue, [`layer`] one convolution, [`winograd`] the 3x3 fast path, [`depthwise`] the depthwise
//! row kernel, [`fused`] MobileNetV2's whole block in one pass, [`net`] the step list and its
//! reusable buffers.

pub mod denormals;
mod depthwise;
pub mod fused;
pub mod gemm;
pub mod isa;
pub mod layer;
pub mod net;
#[cfg(test)]
pub(crate) mod test_util;
pub mod winograd;
#[cfg(target_arch = "x86_64")]
mod x86;

use candle_core::{DType, Result, Storage, Tensor};

pub use fused::FusedBlock;
pub use layer::{Conv, Shape};
pub use net::{Net, NetBuilder, Slot};

use super::fold::ConvBn;

/// The engine's convolution for a folded [`ConvBn`]; `winograd` allows F(4x4, 3x3) where the
/// shape fits. An error when batch-norm was kept apart (the engine needs folded weights).
pub fn from_conv_bn(cb: &ConvBn, winograd: bool) -> Result<Conv> {
    let Some((spec, w, b)) = cb.folded() else {
        candle_core::bail!("the conv engine needs batch-norm folded into the convolution");
    };
    let w = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let b = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(Conv::new(*spec, &w, &b, winograd))
}

/// Whether MobileNetV2's blocks run fused ([`fused`]); `TAXON_CONV_FUSE=0` runs them layer by
/// layer, to measure what fusing gains.
pub fn fuse_blocks() -> bool {
    static FUSE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FUSE.get_or_init(|| std::env::var("TAXON_CONV_FUSE").map_or(true, |v| v != "0"))
}

/// Whether the engine takes `x`: a CPU tensor, unless `TAXON_CONV_ENGINE=candle` asks for
/// candle's ops (to measure what the engine gains).
pub fn enabled(x: &Tensor) -> bool {
    static CANDLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    x.device().is_cpu()
        && !*CANDLE.get_or_init(|| {
            std::env::var("TAXON_CONV_ENGINE").is_ok_and(|v| v.eq_ignore_ascii_case("candle"))
        })
}

/// Runs `net` on a CPU tensor `[n, c, h, w]`, answering `[n, dim]` on the same device.
pub fn forward(net: &Net, x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let out = {
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("the conv engine runs on CPU tensors only");
        };
        let all = cpu.as_slice::<f32>()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("input is not contiguous");
        };
        denormals::flushed(|| net.forward(&all[start..end], n, c, h, w))
    };
    let dim = out.len() / n.max(1);
    Tensor::from_vec(out, (n, dim), x.device())
}
