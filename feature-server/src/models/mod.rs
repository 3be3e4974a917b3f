//! The backbones: ResNet18 and MobileNetV2 in candle, with torchvision parameter names.
//!
//! One file per model (candle's style); [`Backbone`] is the one type the engine holds, so the
//! rest of the server never matches on the architecture.

pub mod conv;
pub mod depthwise;
pub mod fold;
pub mod mobilenet_v2;
pub mod ops;
pub mod resnet18;

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackboneKind {
    Resnet18,
    MobileNetV2,
}

impl BackboneKind {
    pub const ALL: [BackboneKind; 2] = [BackboneKind::Resnet18, BackboneKind::MobileNetV2];

    /// Embedding dimension.
    pub fn dim(self) -> usize {
        match self {
            BackboneKind::Resnet18 => resnet18::DIM,
            BackboneKind::MobileNetV2 => mobilenet_v2::DIM,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BackboneKind::Resnet18 => "resnet18",
            BackboneKind::MobileNetV2 => "mobilenet_v2",
        }
    }

    /// torchvision's state-dict names and shapes (the formula weights are generated over them).
    pub fn state_dict_shapes(self) -> Vec<(String, Vec<usize>)> {
        match self {
            BackboneKind::Resnet18 => resnet18::state_dict_shapes(),
            BackboneKind::MobileNetV2 => mobilenet_v2::state_dict_shapes(),
        }
    }
}

impl fmt::Display for BackboneKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackboneKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "resnet18" => Ok(BackboneKind::Resnet18),
            "mobilenet_v2" | "mobilenetv2" => Ok(BackboneKind::MobileNetV2),
            other => Err(format!(
                "unknown backbone {other:?} (expected resnet18 or mobilenet_v2)"
            )),
        }
    }
}

/// The floating-point type the backbone computes in. Embeddings leave the server as f32
/// whatever it is; the model identity names it (see [`taxon_proto::model_identity`]), so
/// embeddings made at one precision are never cached or compared with another's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    #[default]
    F32,
    F16,
    Bf16,
}

impl Precision {
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::F16, Precision::Bf16];

    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Precision::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown dtype {s:?} (expected f32, f16 or bf16)"))
    }
}

/// A loaded backbone, ready for inference.
pub enum Backbone {
    Resnet18(resnet18::ResNet18),
    MobileNetV2(mobilenet_v2::MobileNetV2),
}

impl Backbone {
    /// Builds from torchvision-named, unfolded tensors; batch-norm is folded here (in f64) and
    /// the network computes in `vb.dtype()`: f32 runs the NHWC CPU engine on a CPU device,
    /// f16/bf16 run candle's ops (a GPU's tensor cores; on a CPU only to measure the tolerance).
    pub fn new(kind: BackboneKind, vb: VarBuilder) -> candle_core::Result<Self> {
        Self::new_with(kind, vb, true)
    }

    /// `fold_bn = false` keeps batch-norm as separate ops (to measure and verify the fold).
    pub fn new_with(
        kind: BackboneKind,
        vb: VarBuilder,
        fold_bn: bool,
    ) -> candle_core::Result<Self> {
        Ok(match kind {
            BackboneKind::Resnet18 => {
                Backbone::Resnet18(resnet18::ResNet18::new_with(vb, fold_bn)?)
            }
            BackboneKind::MobileNetV2 => {
                Backbone::MobileNetV2(mobilenet_v2::MobileNetV2::new_with(vb, fold_bn)?)
            }
        })
    }

    /// Loads a weights file (.safetensors, zip .pth or legacy .pt), folds batch-norm, and
    /// returns the backbone with the file's sha256: the identity of every embedding it makes.
    pub fn load(
        kind: BackboneKind,
        weights: &Path,
        device: &Device,
        precision: Precision,
    ) -> Result<(Self, String)> {
        let sha = crate::weights::sha256_file(weights)?;
        let tensors = crate::weights::load_tensors(weights, device)?;
        let vb = VarBuilder::from_tensors(tensors, precision.dtype(), device);
        let backbone = Self::new(kind, vb).map_err(|e| Error::Weights {
            path: weights.to_path_buf(),
            message: format!("not {kind} weights with torchvision names: {e}"),
        })?;
        Ok((backbone, sha))
    }

    /// `[N, 3, 224, 224]` normalized images -> `[N, dim]` global-average-pooled embeddings,
    /// f32 in and out whatever the network computes in.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.to_dtype(self.dtype())?;
        let y = match self {
            Backbone::Resnet18(m) => m.forward(&x),
            Backbone::MobileNetV2(m) => m.forward(&x),
        }?;
        y.to_dtype(DType::F32)
    }

    /// What the network computes in (the [`Precision`] it was built with).
    pub fn dtype(&self) -> DType {
        match self {
            Backbone::Resnet18(m) => m.dtype(),
            Backbone::MobileNetV2(m) => m.dtype(),
        }
    }

    /// ImageNet logits from embeddings, where the weights carry a classifier (ResNet18's fc).
    pub fn fc_logits(&self, embeddings: &Tensor) -> candle_core::Result<Option<Tensor>> {
        match self {
            Backbone::Resnet18(m) => m
                .fc_logits(&embeddings.to_dtype(self.dtype())?)?
                .map(|l| l.to_dtype(DType::F32))
                .transpose(),
            Backbone::MobileNetV2(_) => Ok(None),
        }
    }

    /// The forward pass through candle's ops, bypassing the CPU engine (tests compare them).
    #[cfg(test)]
    fn forward_candle(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Backbone::Resnet18(m) => m.forward_candle(x),
            Backbone::MobileNetV2(m) => m.forward_candle(x),
        }
    }

    pub fn kind(&self) -> BackboneKind {
        match self {
            Backbone::Resnet18(_) => BackboneKind::Resnet18,
            Backbone::MobileNetV2(_) => BackboneKind::MobileNetV2,
        }
    }

    pub fn dim(&self) -> usize {
        self.kind().dim()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::conv::test_util::rand_vec;

    /// The CPU engine computes what candle's ops compute, on an odd-sized batch, for both.
    #[test]
    fn engine_matches_candle_ops() -> candle_core::Result<()> {
        for kind in BackboneKind::ALL {
            let tensors = crate::weights::formula::tensors(kind);
            let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
            let model = Backbone::new(kind, vb)?;
            let x = Tensor::from_vec(rand_vec(3 * 3 * 72 * 60, 7), (3, 3, 72, 60), &Device::Cpu)?;
            let got = model.forward(&x)?;
            let want = model.forward_candle(&x)?;
            let err = (got - &want)?
                .sqr()?
                .sum_all()?
                .sqrt()?
                .to_scalar::<f32>()?
                / want.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
            println!("{kind}: engine vs candle ops, relative error {err:.2e}");
            assert!(err < 1e-5, "{kind}: relative error {err}");
        }
        Ok(())
    }

    /// f16 computes in f16 (not f32 in disguise), answers f32, and stays near the f32 answer.
    /// bf16 is the GPU's: candle has no bf16 matrix product on a CPU (the parity tests measure
    /// it with `TAXON_TEST_DEVICE=cuda`), so here it must fail, not answer.
    #[test]
    fn half_precision_computes_at_its_dtype_and_answers_f32() -> candle_core::Result<()> {
        let x = Tensor::from_vec(rand_vec(2 * 3 * 64 * 64, 11), (2, 3, 64, 64), &Device::Cpu)?;
        for kind in BackboneKind::ALL {
            let build = |p: Precision| {
                let tensors = crate::weights::formula::tensors(kind);
                Backbone::new(
                    kind,
                    VarBuilder::from_tensors(tensors, p.dtype(), &Device::Cpu),
                )
            };
            let want = build(Precision::F32)?.forward(&x)?;
            let model = build(Precision::F16)?;
            assert_eq!(model.dtype(), DType::F16);
            let got = model.forward(&x)?;
            assert_eq!(got.dtype(), DType::F32);
            let err = relative_error(&got, &want)?;
            println!("{kind} f16: relative error to f32 {err:.2e}");
            // f16 keeps 11 bits of mantissa (2^-11 = 4.9e-4 per rounding); measured here 7.0e-4
            // (ResNet18) and 1.0e-2 (MobileNetV2's 52 layers, on these untrained weights).
            let tol = match kind {
                BackboneKind::Resnet18 => 2e-3,
                BackboneKind::MobileNetV2 => 2e-2,
            };
            assert!(err < tol, "{kind} f16: {err} >= {tol}");
            assert!(
                err > 0.0,
                "{kind} f16: identical to f32, so not half precision"
            );
            assert!(build(Precision::Bf16)?.forward(&x).is_err());
        }
        Ok(())
    }

    fn relative_error(got: &Tensor, want: &Tensor) -> candle_core::Result<f32> {
        let diff = (got - want)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        Ok(diff / want.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?)
    }

    #[test]
    fn precision_names_round_trip() {
        for p in Precision::ALL {
            assert_eq!(p.to_string().parse::<Precision>(), Ok(p));
        }
        assert_eq!("BF16".parse::<Precision>(), Ok(Precision::Bf16));
        let err = "f8".parse::<Precision>().unwrap_err();
        assert!(err.contains("f32, f16 or bf16"), "{err}");
    }
}
