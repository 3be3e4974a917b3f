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

/// A loaded backbone, ready for inference.
pub enum Backbone {
    Resnet18(resnet18::ResNet18),
    MobileNetV2(mobilenet_v2::MobileNetV2),
}

impl Backbone {
    /// Builds from torchvision-named, unfolded tensors; batch-norm is folded here.
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
    pub fn load(kind: BackboneKind, weights: &Path, device: &Device) -> Result<(Self, String)> {
        let sha = crate::weights::sha256_file(weights)?;
        let tensors = crate::weights::load_tensors(weights, device)?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let backbone = Self::new(kind, vb).map_err(|e| Error::Weights {
            path: weights.to_path_buf(),
            message: format!("not {kind} weights with torchvision names: {e}"),
        })?;
        Ok((backbone, sha))
    }

    /// `[N, 3, 224, 224]` normalized images -> `[N, dim]` global-average-pooled embeddings.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Backbone::Resnet18(m) => m.forward(x),
            Backbone::MobileNetV2(m) => m.forward(x),
        }
    }

    /// ImageNet logits from embeddings, where the weights carry a classifier (ResNet18's fc).
    pub fn fc_logits(&self, embeddings: &Tensor) -> candle_core::Result<Option<Tensor>> {
        match self {
            Backbone::Resnet18(m) => m.fc_logits(embeddings),
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
}
