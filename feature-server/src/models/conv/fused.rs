//! MobileNetV2's inverted-residual block as one step: expand 1x1 + ReLU6 -> depthwise +
//! ReLU6 -> project 1x1 [+ the block's input], a few output rows at a time.
//!
//! Why: run layer by layer, a block writes its 6x-expanded tensor (112x112x96 floats, 4.8 MB
//! an image, in block 2) to memory and reads it back twice, and the network is bound by that
//! traffic rather than by its multiply-adds. Here each task keeps a window of expanded input
//! rows (the depthwise's k rows, plus those of the next few output rows) in a per-thread
//! buffer small enough for L2: a row is expanded, when the window first reaches it, into the
//! slot of a row the window has left behind, and each group of depthwise output rows is
//! projected straight into the block's output. The expanded tensor never exists whole. Only a band's first rows are
//! expanded twice (its halo), so an image is split into bands only when there are fewer
//! images than threads (batch 1).

use std::cell::RefCell;
use std::sync::Mutex;

use rayon::prelude::*;

use super::gemm::gemm;
use super::isa::vectorized;
use super::layer::{Conv, Shape, epilogue, with_scratch};
use crate::models::ops::Act;

/// At most this many output pixels in the batch, and fewer images than threads, the block
/// runs layer by layer: its tensors then fit in L2 anyway, while bands of a 7- or 14-row
/// image would expand a third of their rows twice, and the 1x1 layers split across threads
/// by output channels instead (see `layer::NARROW_ROWS`).
const MAX_LAYERED_PIXELS: usize = 64;

/// Fewest output pixels a group of rows hands the project GEMM: narrower layers (7 and 14
/// pixels wide) take several rows at a time, so that the microkernel's row tiles are full.
const MIN_GROUP_PIXELS: usize = 24;

thread_local! {
    /// The window of expanded rows and the depthwise output of one group, per thread.
    static WINDOW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

pub struct FusedBlock {
    expand: Conv,
    depthwise: Conv,
    project: Conv,
    /// Add the block's input to its output (stride 1, as many channels out as in).
    residual: bool,
    /// The expanded and depthwise tensors when the block runs layer by layer.
    layered: Mutex<Vec<f32>>,
}

impl FusedBlock {
    /// The three convolutions of a block, batch-norm folded: `expand` any dense convolution
    /// (the 1x1 expansion, or the network's stem before its first, unexpanded block),
    /// `depthwise` with as many groups as channels, `project` 1x1 stride 1.
    pub fn new(expand: Conv, depthwise: Conv, project: Conv) -> candle_core::Result<Self> {
        let hidden = expand.spec.c_out;
        let fits = expand.is_dense()
            && project.pointwise().is_some()
            && depthwise.depthwise_weights().is_some()
            && depthwise.spec.c_in == hidden
            && project.spec.c_in == hidden;
        if !fits {
            candle_core::bail!(
                "not an inverted-residual block: {} / {} / {}",
                expand.describe(),
                depthwise.describe(),
                project.describe()
            );
        }
        let residual = expand.spec.stride == 1
            && depthwise.spec.stride == 1
            && expand.spec.c_in == project.spec.c_out;
        Ok(Self {
            expand,
            depthwise,
            project,
            residual,
            layered: Mutex::new(Vec::new()),
        })
    }

    pub fn out_shape(&self, x: Shape) -> Shape {
        let h = self.expand.out_shape(x);
        self.project.out_shape(self.depthwise.out_shape(h))
    }

    /// `1x1 16->96 | 3x3/2 dw | 1x1 96->24`: for profiles.
    pub fn describe(&self) -> String {
        let (e, d, p) = (&self.expand.spec, &self.depthwise.spec, &self.project.spec);
        format!(
            "fused {}x{}/{} {}->{} | {}x{}/{} dw | 1x1 {}->{}{}",
            e.kernel,
            e.kernel,
            e.stride,
            e.c_in,
            e.c_out,
            d.kernel,
            d.kernel,
            d.stride,
            p.c_in,
            p.c_out,
            if self.residual { " +x" } else { "" }
        )
    }

    /// `out = block(x)`, NHWC; `out` holds `out_shape(xs).len()` values.
    pub fn run(&self, x: &[f32], xs: Shape, out: &mut [f32]) {
        let os = self.out_shape(xs);
        assert_eq!(xs.c, self.expand.spec.c_in, "input channels");
        assert!(x.len() >= xs.len() && out.len() >= os.len(), "buffer sizes");
        if os.is_empty() {
            return;
        }
        let out = &mut out[..os.len()];
        let threads = rayon::current_num_threads();
        if xs.n < threads && os.len() / os.c <= MAX_LAYERED_PIXELS {
            return self.run_layered(x, xs, out);
        }
        let bands = threads.div_ceil(xs.n).clamp(1, os.h);
        let band_rows = os.h.div_ceil(bands);
        let image_len = os.h * os.w * os.c;
        out.par_chunks_mut(image_len)
            .enumerate()
            .flat_map(|(b, image)| {
                image
                    .par_chunks_mut(band_rows * os.w * os.c)
                    .enumerate()
                    .map(move |(band, o)| (b, band * band_rows, o))
            })
            .for_each(|(b, oy0, o)| vectorized(|| self.band(x, xs, os, b, oy0, o)));
    }

    /// The three layers one after another, through `self.layered`.
    fn run_layered(&self, x: &[f32], xs: Shape, out: &mut [f32]) {
        let hs = self.expand.out_shape(xs);
        let ds = self.depthwise.out_shape(hs);
        let mut buf = self.layered.lock().unwrap_or_else(|e| e.into_inner());
        if buf.len() < hs.len() + ds.len() {
            buf.resize(hs.len() + ds.len(), 0.0);
        }
        let (h, d) = buf.split_at_mut(hs.len());
        let d = &mut d[..ds.len()];
        self.expand.run(x, xs, h, None, Act::Relu6);
        self.depthwise.run(h, hs, d, None, Act::Relu6);
        let res = self.residual.then(|| &x[..out.len()]);
        self.project.run(d, ds, out, res, Act::None);
    }

    /// Output rows `oy0 ..` of image `b`, as many as `out` holds.
    fn band(&self, x: &[f32], xs: Shape, os: Shape, b: usize, oy0: usize, out: &mut [f32]) {
        let (Some(project), Some(dw_weights)) =
            (self.project.pointwise(), self.depthwise.depthwise_weights())
        else {
            unreachable!("checked in FusedBlock::new")
        };
        // The expanded tensor's shape: the depthwise's input.
        let hs = self.expand.out_shape(xs);
        let dw = self.depthwise.depthwise_row(dw_weights, hs.w);
        let (k, s, p) = (dw.kernel, dw.stride, dw.padding);
        let hidden = dw.channels;
        let oy1 = oy0 + out.len() / (os.w * os.c);
        let group = MIN_GROUP_PIXELS.div_ceil(os.w).clamp(1, oy1 - oy0);
        let row_in = hs.w * hidden;
        let row_mid = os.w * hidden;
        let window_rows = (group - 1) * s + k;
        let relu6 = Act::Relu6.bounds();
        let none = Act::None.bounds();
        debug_assert!(!self.residual || (hs.h, hs.w) == (xs.h, xs.w));
        with_scratch(&WINDOW, window_rows * row_in + group * row_mid, |buf| {
            let (window, mid) = buf.split_at_mut(window_rows * row_in);
            // The window is a ring: input row `iy` lives in slot `iy % window_rows`, so that
            // sliding it copies nothing (copying the kept rows down moved about 9 MB per image
            // in the 112- and 56-wide blocks). Rows below `hi` are expanded;
            // a group never needs more rows than there are slots, so none it needs is
            // overwritten.
            let mut hi = 0;
            for g0 in (oy0..oy1).step_by(group) {
                let g1 = (g0 + group).min(oy1);
                let need_lo = (g0 * s).saturating_sub(p);
                let need_hi = ((g1 - 1) * s + k).saturating_sub(p).min(hs.h);
                hi = hi.max(need_lo);
                while hi < need_hi {
                    let slot = hi % window_rows;
                    let rows = (need_hi - hi).min(window_rows - slot);
                    let pixels = ((b * hs.h + hi) * hs.w, rows * hs.w);
                    let o = &mut window[slot * row_in..(slot + rows) * row_in];
                    self.expand.run_pixels(x, xs, pixels, o, Act::Relu6);
                    hi += rows;
                }
                for oy in g0..g1 {
                    let taps = dw.taps(oy, hs.h, |iy| {
                        &window[(iy % window_rows) * row_in..][..row_in]
                    });
                    dw.run(
                        &taps,
                        &mut mid[(oy - g0) * row_mid..][..row_mid],
                        None,
                        relu6,
                    );
                }
                let m = (g1 - g0) * os.w;
                let o = &mut out[(g0 - oy0) * os.w * os.c..];
                // With a residual the block keeps its shape, so the input rows line up.
                let res = self
                    .residual
                    .then(|| &x[(b * xs.h + g0) * xs.w * xs.c..][..m * xs.c]);
                let ep = epilogue(res, os.c, none.0, none.1);
                gemm(m, project, mid, hidden, o, os.c, ep);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::conv::test_util::{max_abs_diff, rand_vec};
    use crate::models::fold::ConvSpec;

    fn conv(spec: ConvSpec, seed: u64) -> Conv {
        let (o, i, k, _) = spec.weight_shape();
        let w: Vec<f32> = rand_vec(o * i * k * k, seed)
            .iter()
            .map(|v| v * 0.5)
            .collect();
        Conv::new(spec, &w, &rand_vec(spec.c_out, seed + 1), false)
    }

    /// The fused block against its three layers run one after another, for every shape of
    /// block MobileNetV2 has (stride 1 with residual, stride 2, channel change), on sizes
    /// that make the windows slide, groups span several rows, bands split one image, and
    /// small batches run layer by layer.
    #[test]
    fn fused_block_matches_the_layers_run_apart() {
        let cases = [
            // (c_in, hidden, c_out, stride, h, w, n, expand kernel and stride)
            (16, 96, 24, 2, 17, 15, 1, (1, 1)),
            // Over MAX_LAYERED_PIXELS at batch 1: bands split the image.
            (16, 96, 24, 2, 40, 30, 1, (1, 1)),
            (24, 144, 24, 1, 20, 20, 1, (1, 1)),
            (32, 64, 32, 1, 40, 3, 1, (1, 1)),
            (24, 144, 24, 1, 12, 13, 2, (1, 1)),
            (32, 48, 40, 1, 7, 7, 3, (1, 1)),
            (24, 40, 24, 1, 3, 30, 1, (1, 1)),
            (160, 960, 160, 1, 7, 7, 1, (1, 1)),
            (160, 960, 160, 1, 7, 7, 4, (1, 1)),
            (8, 24, 8, 2, 2, 2, 2, (1, 1)),
            (8, 24, 8, 1, 1, 1, 1, (1, 1)),
            // MobileNetV2's stem in front of its first block (an im2col "expansion").
            (3, 32, 16, 1, 45, 38, 1, (3, 2)),
            (3, 32, 16, 1, 33, 30, 2, (3, 2)),
            (3, 32, 16, 1, 13, 11, 1, (3, 2)),
        ];
        for (seed, &(ci, hid, co, s, h, w, n, (ek, es))) in cases.iter().enumerate() {
            let seed = seed as u64 * 10;
            let e = ConvSpec::new(ci, hid, ek, es);
            let d = ConvSpec::depthwise(hid, s);
            let pj = ConvSpec::new(hid, co, 1, 1);
            let block = FusedBlock::new(conv(e, seed), conv(d, seed + 2), conv(pj, seed + 4))
                .expect("a block");
            let xs = Shape { n, h, w, c: ci };
            let x = rand_vec(xs.len(), seed + 6);
            let (ce, cd, cp) = (conv(e, seed), conv(d, seed + 2), conv(pj, seed + 4));
            let hs = ce.out_shape(xs);
            let mut hbuf = vec![0f32; hs.len()];
            ce.run(&x, xs, &mut hbuf, None, Act::Relu6);
            let ds = cd.out_shape(hs);
            let mut dbuf = vec![0f32; ds.len()];
            cd.run(&hbuf, hs, &mut dbuf, None, Act::Relu6);
            let os = cp.out_shape(ds);
            let mut want = vec![0f32; os.len()];
            let res = (es == 1 && s == 1 && ci == co).then_some(&x[..]);
            cp.run(&dbuf, ds, &mut want, res, Act::None);
            assert_eq!(block.out_shape(xs), os);
            let mut got = vec![f32::NAN; os.len()];
            block.run(&x, xs, &mut got);
            let diff = max_abs_diff(&got, &want);
            assert!(diff < 1e-4, "case {seed}: {}: {diff}", block.describe());
        }
    }

    #[test]
    fn refuses_what_is_not_a_block() {
        let e = conv(ConvSpec::new(8, 24, 1, 1), 1);
        let d = conv(ConvSpec::new(24, 24, 3, 1), 2);
        let p = conv(ConvSpec::new(24, 8, 1, 1), 3);
        assert!(FusedBlock::new(e, d, p).is_err());
    }
}
