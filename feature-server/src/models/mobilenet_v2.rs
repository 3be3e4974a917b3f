//! MobileNetV2 (Sandler et al. 2018) features as torchvision builds them (width 1.0), with
//! torchvision's parameter names: `features.0.{0,1}` (stem), `features.1.conv.{0.0,0.1,1,2}`,
//! `features.N.conv.{0.0,0.1,1.0,1.1,2,3}` for N in 2..=17, `features.18.{0,1}`. ReLU6
//! activations; depthwise convolutions have groups = channels. The classifier is not built:
//! the embedding is the global average pool of `features(x)`, 1280-d.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::conv::{self, FusedBlock, Net, NetBuilder, Slot};
use super::fold::{ConvBn, ConvSpec};
use super::ops::Act;

pub const DIM: usize = 1280;
/// torchvision's inverted-residual settings: expansion t, channels c, repeats n, stride s.
const SETTINGS: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];
const STEM: usize = 32;

/// One inverted-residual block: [expand 1x1 + ReLU6] -> depthwise 3x3 + ReLU6 -> project 1x1.
struct InvertedResidual {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    residual: bool,
}

/// The block's layers, each with the (conv, bn) names torchvision uses for it.
fn block_layers(
    c_in: usize,
    c_out: usize,
    t: usize,
    stride: usize,
) -> Vec<(ConvSpec, &'static str, &'static str)> {
    let hidden = c_in * t;
    if t == 1 {
        vec![
            (ConvSpec::depthwise(hidden, stride), "conv.0.0", "conv.0.1"),
            (ConvSpec::new(hidden, c_out, 1, 1), "conv.1", "conv.2"),
        ]
    } else {
        vec![
            (ConvSpec::new(c_in, hidden, 1, 1), "conv.0.0", "conv.0.1"),
            (ConvSpec::depthwise(hidden, stride), "conv.1.0", "conv.1.1"),
            (ConvSpec::new(hidden, c_out, 1, 1), "conv.2", "conv.3"),
        ]
    }
}

impl InvertedResidual {
    fn new(
        c_in: usize,
        c_out: usize,
        t: usize,
        stride: usize,
        vb: VarBuilder,
        fold: bool,
    ) -> Result<Self> {
        let mut layers = block_layers(c_in, c_out, t, stride)
            .into_iter()
            .map(|(spec, conv, bn)| ConvBn::new(spec, vb.pp(conv), vb.pp(bn), fold))
            .collect::<Result<Vec<_>>>()?;
        let project = layers
            .pop()
            .ok_or_else(|| candle_core::Error::Msg("empty block".into()))?;
        let depthwise = layers
            .pop()
            .ok_or_else(|| candle_core::Error::Msg("empty block".into()))?;
        Ok(Self {
            expand: layers.pop(),
            depthwise,
            project,
            residual: stride == 1 && c_in == c_out,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = match &self.expand {
            Some(e) => e.forward_act(x, Act::Relu6)?,
            None => x.clone(),
        };
        let y = self
            .project
            .forward(&self.depthwise.forward_act(&h, Act::Relu6)?)?;
        if self.residual { y + x } else { Ok(y) }
    }

    /// Appends the block to the engine's steps.
    fn push_steps(&self, b: &mut NetBuilder, x: Slot) -> Result<Slot> {
        if let Some(e) = self.expand.as_ref().filter(|_| conv::fuse_blocks()) {
            let block = FusedBlock::new(
                conv::from_conv_bn(e, false)?,
                conv::from_conv_bn(&self.depthwise, false)?,
                conv::from_conv_bn(&self.project, false)?,
            )?;
            return Ok(b.inverted_residual(block, x, &[]));
        }
        let h = match &self.expand {
            Some(e) => b.conv_bn(e, false, (x, None), Act::Relu6, &[x])?,
            None => x,
        };
        let h = b.conv_bn(&self.depthwise, false, (h, None), Act::Relu6, &[x])?;
        let residual = self.residual.then_some(x);
        b.conv_bn(&self.project, false, (h, residual), Act::None, &[])
    }
}

pub struct MobileNetV2 {
    stem: ConvBn,
    blocks: Vec<InvertedResidual>,
    head: ConvBn,
    /// The CPU engine's version of the same network (folded weights on a CPU device).
    net: Option<Net>,
}

/// (c_in, c_out, t, stride) of features.1..=17, in order.
fn blocks() -> Vec<(usize, usize, usize, usize)> {
    let mut out = Vec::new();
    let mut c_in = STEM;
    for (t, c, n, s) in SETTINGS {
        for i in 0..n {
            out.push((c_in, c, t, if i == 0 { s } else { 1 }));
            c_in = c;
        }
    }
    out
}

impl MobileNetV2 {
    /// Builds the network with batch-norm folded into the convolutions.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Self::new_with(vb, true)
    }

    pub fn new_with(vb: VarBuilder, fold: bool) -> Result<Self> {
        let f = vb.pp("features");
        let stem = ConvBn::new(ConvSpec::new(3, STEM, 3, 2), f.pp("0.0"), f.pp("0.1"), fold)?;
        let blocks = blocks()
            .into_iter()
            .enumerate()
            .map(|(i, (ci, co, t, s))| InvertedResidual::new(ci, co, t, s, f.pp(i + 1), fold))
            .collect::<Result<Vec<_>>>()?;
        let head = ConvBn::new(
            ConvSpec::new(320, DIM, 1, 1),
            f.pp("18.0"),
            f.pp("18.1"),
            fold,
        )?;
        let mut model = Self {
            stem,
            blocks,
            head,
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
        // Two images at a time: its 14 MB of weights stay cached anyway, while a whole batch's
        // 112x112x96 activations (4.8 MB an image) would not (batch 32: ~80 -> ~98 img/s).
        b.sub_batch(2);
        let mut blocks = self.blocks.iter().peekable();
        // The stem's 112x112x32 output feeds the first block, which has no expansion: the
        // stem stands in for it, so that this largest tensor never goes to memory either.
        let first = blocks
            .next_if(|blk| blk.expand.is_none() && conv::fuse_blocks())
            .map(|blk| {
                FusedBlock::new(
                    conv::from_conv_bn(&self.stem, false)?,
                    conv::from_conv_bn(&blk.depthwise, false)?,
                    conv::from_conv_bn(&blk.project, false)?,
                )
            })
            .transpose()?;
        let mut x = match first {
            Some(block) => b.inverted_residual(block, NetBuilder::INPUT, &[]),
            None => b.conv_bn(
                &self.stem,
                false,
                (NetBuilder::INPUT, None),
                Act::Relu6,
                &[],
            )?,
        };
        for block in blocks {
            x = block.push_steps(&mut b, x)?;
        }
        let x = b.conv_bn(&self.head, false, (x, None), Act::Relu6, &[])?;
        Ok(Some(b.build(x)))
    }

    /// `[N, 3, 224, 224]` -> `[N, 1280]`: global average pool of `features(x)`.
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
        let mut x = self.stem.forward_act(x, Act::Relu6)?;
        for b in &self.blocks {
            x = b.forward(&x)?;
        }
        self.head.forward_act(&x, Act::Relu6)?.mean((2, 3))
    }
}

/// torchvision's `mobilenet_v2().features` state-dict names and shapes (prefixed `features.`),
/// minus `num_batches_tracked`.
pub fn state_dict_shapes() -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    let mut conv_bn = |conv: String, bn: String, spec: ConvSpec| {
        spec.push_state_dict_shapes(&mut out, &conv, &bn)
    };
    conv_bn(
        "features.0.0".into(),
        "features.0.1".into(),
        ConvSpec::new(3, STEM, 3, 2),
    );
    for (i, (ci, co, t, s)) in blocks().into_iter().enumerate() {
        for (spec, conv, bn) in block_layers(ci, co, t, s) {
            conv_bn(
                format!("features.{}.{conv}", i + 1),
                format!("features.{}.{bn}", i + 1),
                spec,
            );
        }
    }
    conv_bn(
        "features.18.0".into(),
        "features.18.1".into(),
        ConvSpec::new(320, DIM, 1, 1),
    );
    out
}
