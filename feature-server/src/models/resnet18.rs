//! ResNet18 (He et al. 2015) exactly as torchvision builds it, with torchvision's parameter
//! names (`conv1`, `bn1`, `layer1.0.conv1`, ..., `layer2.0.downsample.{0,1}`, `fc`), so
//! torchvision's release weights and timm's `resnet18.tv_in1k` load unchanged.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::conv::{self, Net, NetBuilder};
use super::fold::{ConvBn, ConvSpec};
use super::ops::Act;

/// Output channels and first-block stride of layer1..layer4.
const STAGES: [(usize, usize); 4] = [(64, 1), (128, 2), (256, 2), (512, 2)];
pub const DIM: usize = 512;
pub const NUM_CLASSES: usize = 1000;

struct BasicBlock {
    conv1: ConvBn,
    conv2: ConvBn,
    downsample: Option<ConvBn>,
}

impl BasicBlock {
    fn new(c_in: usize, c_out: usize, stride: usize, vb: VarBuilder, fold: bool) -> Result<Self> {
        let conv1 = ConvBn::new(
            ConvSpec::new(c_in, c_out, 3, stride),
            vb.pp("conv1"),
            vb.pp("bn1"),
            fold,
        )?;
        let conv2 = ConvBn::new(
            ConvSpec::new(c_out, c_out, 3, 1),
            vb.pp("conv2"),
            vb.pp("bn2"),
            fold,
        )?;
        let downsample = if stride != 1 || c_in != c_out {
            let ds = vb.pp("downsample");
            Some(ConvBn::new(
                ConvSpec::new(c_in, c_out, 1, stride),
                ds.pp("0"),
                ds.pp("1"),
                fold,
            )?)
        } else {
            None
        };
        Ok(Self {
            conv1,
            conv2,
            downsample,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv2.forward(&self.conv1.forward_act(x, Act::Relu)?)?;
        let shortcut = match &self.downsample {
            Some(ds) => ds.forward(x)?,
            None => x.clone(),
        };
        (y + shortcut)?.relu()
    }
}

pub struct ResNet18 {
    stem: ConvBn,
    blocks: Vec<BasicBlock>,
    /// The ImageNet classifier, when the weights carry it (only used to check parity).
    fc: Option<Linear>,
    /// The CPU engine's version of the same network (folded weights on a CPU device).
    net: Option<Net>,
}

impl ResNet18 {
    /// Builds the network with batch-norm folded into the convolutions.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Self::new_with(vb, true)
    }

    /// `fold = false` keeps batch-norm as its own op (to measure and verify the fold).
    pub fn new_with(vb: VarBuilder, fold: bool) -> Result<Self> {
        let stem = ConvBn::new(
            ConvSpec::new(3, 64, 7, 2),
            vb.pp("conv1"),
            vb.pp("bn1"),
            fold,
        )?;
        let mut blocks = Vec::with_capacity(8);
        let mut c_in = 64;
        for (i, &(c_out, stride)) in STAGES.iter().enumerate() {
            let layer = vb.pp(format!("layer{}", i + 1));
            blocks.push(BasicBlock::new(c_in, c_out, stride, layer.pp("0"), fold)?);
            blocks.push(BasicBlock::new(c_out, c_out, 1, layer.pp("1"), fold)?);
            c_in = c_out;
        }
        let fc = if vb.contains_tensor("fc.weight") {
            Some(candle_nn::linear(DIM, NUM_CLASSES, vb.pp("fc"))?)
        } else {
            None
        };
        let mut model = Self {
            stem,
            blocks,
            fc,
            net: None,
        };
        model.net = model.cpu_net(vb.device())?;
        Ok(model)
    }

    /// The network as NHWC engine steps, for folded weights on a CPU device.
    fn cpu_net(&self, device: &Device) -> Result<Option<Net>> {
        // The engine computes in f32; other precisions run candle's ops.
        if !device.is_cpu() || self.stem.folded().is_none() || self.dtype() != DType::F32 {
            return Ok(None);
        }
        let mut b = NetBuilder::new();
        // 16 images at a time: as fast as 32 (measured), with half the activation buffers
        // (the stem's output alone is 3.2 MB an image).
        b.sub_batch(16);
        let x = b.conv_bn(&self.stem, false, (NetBuilder::INPUT, None), Act::Relu, &[])?;
        let mut x = b.max_pool(x);
        for block in &self.blocks {
            let h = b.conv_bn(&block.conv1, true, (x, None), Act::Relu, &[x])?;
            let shortcut = match &block.downsample {
                Some(ds) => b.conv_bn(ds, false, (x, None), Act::None, &[h])?,
                None => x,
            };
            x = b.conv_bn(&block.conv2, true, (h, Some(shortcut)), Act::Relu, &[])?;
        }
        Ok(Some(b.build(x)))
    }

    /// `[N, 3, 224, 224]` -> `[N, 512]`: the global average pool of layer4 (the fc input).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(net) = self.net.as_ref().filter(|_| conv::enabled(x)) {
            return conv::forward(net, x);
        }
        self.forward_candle(x)
    }

    pub fn dtype(&self) -> DType {
        self.stem.dtype()
    }

    /// The same network through candle's ops (other devices, unfolded batch-norm).
    pub(crate) fn forward_candle(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.stem.forward_act(x, Act::Relu)?;
        // Max-pool 3x3/2 with padding 1. The input is post-ReLU (>= 0), so zero padding gives
        // exactly what PyTorch's -inf padding gives.
        let x = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
        let mut x = x.max_pool2d_with_stride(3, 2)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        x.mean((2, 3))
    }

    /// ImageNet logits from embeddings, when the weights include `fc`.
    pub fn fc_logits(&self, embeddings: &Tensor) -> Result<Option<Tensor>> {
        self.fc
            .as_ref()
            .map(|fc| fc.forward(embeddings))
            .transpose()
    }
}

/// torchvision's `resnet18().state_dict()` names and shapes, minus `num_batches_tracked`.
pub fn state_dict_shapes() -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    let mut conv_bn = |conv: String, bn: String, spec: ConvSpec| {
        spec.push_state_dict_shapes(&mut out, &conv, &bn)
    };
    conv_bn("conv1".into(), "bn1".into(), ConvSpec::new(3, 64, 7, 2));
    let mut c_in = 64;
    for (i, &(c_out, stride)) in STAGES.iter().enumerate() {
        for b in 0..2 {
            let p = format!("layer{}.{b}", i + 1);
            let (ci, s) = if b == 0 { (c_in, stride) } else { (c_out, 1) };
            conv_bn(
                format!("{p}.conv1"),
                format!("{p}.bn1"),
                ConvSpec::new(ci, c_out, 3, s),
            );
            conv_bn(
                format!("{p}.conv2"),
                format!("{p}.bn2"),
                ConvSpec::new(c_out, c_out, 3, 1),
            );
            if b == 0 && (s != 1 || ci != c_out) {
                let spec = ConvSpec::new(ci, c_out, 1, s);
                conv_bn(
                    format!("{p}.downsample.0"),
                    format!("{p}.downsample.1"),
                    spec,
                );
            }
        }
        c_in = c_out;
    }
    out.push(("fc.weight".into(), vec![NUM_CLASSES, DIM]));
    out.push(("fc.bias".into(), vec![NUM_CLASSES]));
    out
}
