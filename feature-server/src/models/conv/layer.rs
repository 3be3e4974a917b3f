//! One NHWC convolution with batch-norm already folded in, and the way it is computed:
//! 1x1 stride 1 as a plain GEMM over the activation rows; 3x3 stride 1 by Winograd F(4x4, 3x3);
//! depthwise by a direct kernel; anything else by an im2col gather fused into the GEMM's
//! packing. Bias, residual add and ReLU/ReLU6 happen in the output pass of each.
//!
//! Why NHWC: a pixel's channels are contiguous, so a 1x1 convolution is a GEMM on the tensor
//! as it lies, im2col copies runs of channels instead of single floats, and the depthwise and
//! Winograd transforms vectorize across channels.

use std::cell::RefCell;

use rayon::prelude::*;

use super::depthwise::{DepthwiseRow, MAX_KERNEL};
use super::gemm::{Epilogue, NR, PackedB, gemm, gemm_panels};
use super::isa::{isa, vectorized};
use super::winograd::Winograd;
use crate::models::fold::ConvSpec;
use crate::models::ops::Act;

/// Below this many 4x4 output tiles in the batch, a Winograd layer runs as im2col instead:
/// each call streams the 36 transformed weight matrices (4x the weights; 38 MB for 512
/// channels), which at batch 1 in ResNet18's layer4 (4 tiles) costs more than the 4x saving.
const MIN_WINOGRAD_TILES: usize = 8;

/// How a convolution is computed.
enum Method {
    /// 1x1 stride 1: the input rows are the GEMM's left-hand matrix.
    Pointwise(PackedB),
    /// Everything else dense: im2col rows packed on the fly.
    Im2col(PackedB),
    /// With the im2col packing too, for batches with too few tiles (see [`MIN_WINOGRAD_TILES`]).
    Winograd(Winograd, PackedB),
    /// Weights `[k*k][C]` (tap-major, channels contiguous).
    Depthwise(Vec<f32>),
}

pub struct Conv {
    pub spec: ConvSpec,
    method: Method,
    bias: Vec<f32>,
}

/// Activation shape of one image batch in NHWC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl Shape {
    pub fn len(&self) -> usize {
        self.n * self.h * self.w * self.c
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Conv {
    /// `weight` is PyTorch's `[c_out, c_in / groups, k, k]`, batch-norm folded; `bias` `[c_out]`.
    /// `winograd` allows Winograd for 3x3 stride-1 convolutions.
    pub fn new(spec: ConvSpec, weight: &[f32], bias: &[f32], winograd: bool) -> Self {
        let (co, ci, k, _) = spec.weight_shape();
        assert_eq!(weight.len(), co * ci * k * k, "weight size for {spec:?}");
        let depthwise = spec.groups > 1 && spec.groups == spec.c_in && spec.groups == spec.c_out;
        let method = if depthwise {
            // [c][1][ky][kx] -> [ky*k + kx][c]
            let mut w = vec![0f32; k * k * co];
            for c in 0..co {
                for t in 0..k * k {
                    w[t * co + c] = weight[c * k * k + t];
                }
            }
            assert!(k <= MAX_KERNEL, "depthwise kernel {k} over {MAX_KERNEL}");
            Method::Depthwise(w)
        } else {
            assert_eq!(spec.groups, 1, "grouped convolutions other than depthwise");
            // [o][c][ky][kx] -> B[(ky*k + kx)*c_in + c][o]
            let kk = k * k * ci;
            let mut b = vec![0f32; kk * co];
            for o in 0..co {
                for c in 0..ci {
                    for t in 0..k * k {
                        b[(t * ci + c) * co + o] = weight[(o * ci + c) * k * k + t];
                    }
                }
            }
            let packed = PackedB::new(&b, kk, co, bias);
            if winograd && k == 3 && spec.stride == 1 && spec.padding == 1 {
                Method::Winograd(Winograd::new(weight, ci, co, bias), packed)
            } else if k == 1 && spec.stride == 1 && spec.padding == 0 {
                Method::Pointwise(packed)
            } else {
                Method::Im2col(packed)
            }
        };
        Self {
            spec,
            method,
            bias: bias.to_vec(),
        }
    }

    /// The packed weights of a 1x1 stride-1 convolution, which [`super::fused`] multiplies by.
    pub(super) fn pointwise(&self) -> Option<&PackedB> {
        match &self.method {
            Method::Pointwise(b) => Some(b),
            _ => None,
        }
    }

    /// Whether [`Self::run_pixels`] can compute it (any dense convolution).
    pub(super) fn is_dense(&self) -> bool {
        !matches!(self.method, Method::Depthwise(_))
    }

    /// Output pixels `p0 .. p0 + pixels` (NHWC order over the batch) of `act(conv(x))`, on
    /// this thread, into `out` (`pixels` rows of `c_out`): what a fused block needs of the
    /// convolution before its depthwise, a few rows at a time.
    pub(super) fn run_pixels(
        &self,
        x: &[f32],
        xs: Shape,
        (p0, pixels): (usize, usize),
        out: &mut [f32],
        act: Act,
    ) {
        let os = self.out_shape(xs);
        let (lo, hi) = act.bounds();
        match &self.method {
            Method::Pointwise(b) => {
                let ep = epilogue(None, os.c, lo, hi);
                gemm(pixels, b, &x[p0 * xs.c..], xs.c, out, os.c, ep);
            }
            Method::Im2col(b) | Method::Winograd(_, b) => {
                self.im2col_gemm(b, x, (xs, os), p0, pixels, out, None, (lo, hi));
            }
            Method::Depthwise(_) => unreachable!("run_pixels on a depthwise convolution"),
        }
    }

    /// The `[k*k][c]` weights of a depthwise convolution.
    pub(super) fn depthwise_weights(&self) -> Option<&[f32]> {
        match &self.method {
            Method::Depthwise(w) => Some(w),
            _ => None,
        }
    }

    /// `3x3/1 64->64 winograd`: for profiles.
    pub fn describe(&self) -> String {
        let s = &self.spec;
        let how = match &self.method {
            Method::Pointwise(_) => "pointwise",
            Method::Im2col(_) => "im2col",
            Method::Winograd(..) => "winograd",
            Method::Depthwise(_) => "depthwise",
        };
        format!(
            "{0}x{0}/{1} {2}->{3} {how}",
            s.kernel, s.stride, s.c_in, s.c_out
        )
    }

    pub fn out_shape(&self, x: Shape) -> Shape {
        let s = &self.spec;
        let o = |i: usize| (i + 2 * s.padding - s.kernel) / s.stride + 1;
        Shape {
            n: x.n,
            h: o(x.h),
            w: o(x.w),
            c: s.c_out,
        }
    }

    /// `out = act(conv(x) + bias [+ residual])`, all NHWC; `out` and `residual` hold
    /// `out_shape(xs).len()` values.
    pub fn run(&self, x: &[f32], xs: Shape, out: &mut [f32], residual: Option<&[f32]>, act: Act) {
        let os = self.out_shape(xs);
        assert_eq!(xs.c, self.spec.c_in, "input channels");
        assert!(x.len() >= xs.len() && out.len() >= os.len(), "buffer sizes");
        let out = &mut out[..os.len()];
        let (lo, hi) = act.bounds();
        match &self.method {
            Method::Winograd(w, _)
                if xs.n * xs.h.div_ceil(4) * xs.w.div_ceil(4) >= MIN_WINOGRAD_TILES =>
            {
                w.run(x, xs, out, residual, lo, hi);
            }
            Method::Pointwise(b) if os.n * os.h * os.w <= NARROW_ROWS => {
                narrow_gemm(os.len() / os.c, b, (x, xs.c), out, residual, (lo, hi));
            }
            Method::Im2col(b) | Method::Winograd(_, b) if os.n * os.h * os.w <= NARROW_ROWS => {
                let m = os.len() / os.c;
                with_scratch(&IM2COL, m * b.k, |a| {
                    // Gathered by every thread: at batch 1 in ResNet18's layer4 this is 0.9 MB
                    // a layer, which one thread copied while the other waited.
                    a.par_chunks_mut(GATHER_ROWS * b.k)
                        .enumerate()
                        .for_each(|(i, rows)| self.gather(x, xs, os, i * GATHER_ROWS, rows, b.k));
                    narrow_gemm(m, b, (a, b.k), out, residual, (lo, hi));
                });
            }
            Method::Pointwise(b) => {
                par_rows(out, os.c, residual, |r0, rows, o, res| {
                    let a = &x[r0 * xs.c..];
                    gemm(rows, b, a, xs.c, o, os.c, epilogue(res, os.c, lo, hi));
                });
            }
            Method::Im2col(b) | Method::Winograd(_, b) => {
                par_rows(out, os.c, residual, |r0, rows, o, res| {
                    self.im2col_gemm(b, x, (xs, os), r0, rows, o, res, (lo, hi));
                });
            }
            Method::Depthwise(w) => self.depthwise(w, x, xs, os, out, residual, lo, hi),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn depthwise(
        &self,
        w: &[f32],
        x: &[f32],
        xs: Shape,
        os: Shape,
        out: &mut [f32],
        residual: Option<&[f32]>,
        lo: f32,
        hi: f32,
    ) {
        let dw = self.depthwise_row(w, xs.w);
        let row_len = xs.w * xs.c;
        out.par_chunks_mut(os.w * os.c)
            .enumerate()
            .for_each(|(row, orow)| {
                let (b, oy) = (row / os.h, row % os.h);
                let taps = dw.taps(oy, xs.h, |iy| &x[(b * xs.h + iy) * row_len..][..row_len]);
                let r = residual.map(|r| &r[row * os.w * os.c..][..os.w * os.c]);
                vectorized(|| dw.run(&taps, orow, r, (lo, hi)));
            });
    }

    /// The depthwise row kernel for this layer at input width `in_w`.
    pub(super) fn depthwise_row<'a>(&'a self, w: &'a [f32], in_w: usize) -> DepthwiseRow<'a> {
        DepthwiseRow {
            weights: w,
            bias: &self.bias,
            kernel: self.spec.kernel,
            stride: self.spec.stride,
            padding: self.spec.padding,
            in_w,
            channels: self.spec.c_in,
        }
    }
}

/// Runs `f(image, y, x, channels)` on every output pixel, output rows in parallel, with the
/// loops vectorized (the per-pixel work runs over contiguous channels).
pub(super) fn for_each_pixel<F>(out: &mut [f32], os: Shape, f: F)
where
    F: Fn(usize, usize, usize, &mut [f32]) + Sync,
{
    out.par_chunks_mut(os.w * os.c)
        .enumerate()
        .for_each(|(row, orow)| {
            let (b, oy) = (row / os.h, row % os.h);
            vectorized(|| {
                for (ox, o) in orow.chunks_exact_mut(os.c).enumerate() {
                    f(b, oy, ox, o);
                }
            })
        });
}

/// The end of a pixel's output pass: `o = clamp(o + residual, lo, hi)`.
#[inline(always)]
pub(super) fn finish_pixel(o: &mut [f32], residual: Option<&[f32]>, lo: f32, hi: f32) {
    if let Some(r) = residual {
        o.iter_mut().zip(r).for_each(|(o, r)| *o += r);
    }
    o.iter_mut().for_each(|v| *v = v.clamp(lo, hi));
}

pub(super) fn epilogue(res: Option<&[f32]>, ld: usize, lo: f32, hi: f32) -> Epilogue<'_> {
    Epilogue {
        bias: true,
        residual: res.map(|r| (r, ld)),
        lo,
        hi,
    }
}

/// Splits the output rows (`ld` floats each) into a few chunks per thread and runs
/// `f(first_row, rows, out_chunk, residual_chunk)` on them in parallel.
pub(super) fn par_rows<F>(out: &mut [f32], ld: usize, residual: Option<&[f32]>, f: F)
where
    F: Fn(usize, usize, &mut [f32], Option<&[f32]>) + Sync,
{
    let m = out.len() / ld;
    let mr = isa().mr();
    let tasks = rayon::current_num_threads() * 4;
    let chunk = m.div_ceil(tasks).div_ceil(mr).max(1) * mr;
    out.par_chunks_mut(chunk * ld)
        .enumerate()
        .for_each(|(i, o)| {
            let r0 = i * chunk;
            let res = residual.map(|r| &r[r0 * ld..r0 * ld + o.len()]);
            f(r0, o.len() / ld, o, res);
        });
}

thread_local! {
    /// One block of im2col rows, per thread, reused by every layer.
    static IM2COL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The per-panel outputs of [`narrow_gemm`], on the calling thread.
    static NARROW: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Bytes of im2col rows gathered at a time: they stay in L2 while the GEMM reads them.
const IM2COL_BYTES: usize = 256 << 10;

/// Pixels per piece of work when the narrow path's im2col rows are gathered in parallel.
const GATHER_ROWS: usize = 8;

/// At most this many output rows (pixels), a layer is split across threads by output
/// channels instead of rows: splitting 49 rows (layer4 at batch 1) by rows would leave a
/// core idle and make every chunk stream all the weights again.
const NARROW_ROWS: usize = 256;

/// Runs `f` on this thread's buffer `cell`, grown to at least `len` floats.
///
/// Re-entered on one thread, `f` gets a buffer of its own instead. Why that can happen: the
/// forward pass runs on a pool worker ([`super::net::Net::forward`]), some layers hold their
/// buffer across a parallel loop, and a worker waiting for that loop runs other queued work,
/// which can be another model's layer asking for the same buffer (two models in one process,
/// as in the tests; the server runs one pass at a time).
pub(super) fn with_scratch<R>(
    cell: &'static std::thread::LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    cell.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![0.0; len]),
    })
}

impl Conv {
    /// Writes im2col rows for output pixels `g0 .. g0 + rows.len() / k` (taps major, channels
    /// minor): each kernel row of taps is one contiguous run of the NHWC input.
    fn gather(&self, x: &[f32], xs: Shape, os: Shape, g0: usize, rows: &mut [f32], kk: usize) {
        let (k, s, p, c) = (self.spec.kernel, self.spec.stride, self.spec.padding, xs.c);
        // The pixel's coordinates advance by counting, not by dividing: three integer
        // divisions a pixel (tens of cycles each on AMD Zen 2) for a copy of 27 floats.
        let (mut bi, mut oy, mut ox) = (g0 / (os.h * os.w), (g0 / os.w) % os.h, g0 % os.w);
        for row in rows.chunks_exact_mut(kk) {
            for (ky, taps) in row.chunks_exact_mut(k * c).enumerate() {
                let Some(iy) = (oy * s + ky).checked_sub(p).filter(|&iy| iy < xs.h) else {
                    taps.fill(0.0);
                    continue;
                };
                // Taps kx in first..end fall inside the row; the rest are padding.
                let first = p.saturating_sub(ox * s);
                let end = (xs.w + p).saturating_sub(ox * s).min(k);
                taps[..first * c].fill(0.0);
                taps[end * c..].fill(0.0);
                if first < end {
                    let ix = ox * s + first - p;
                    let src = &x[((bi * xs.h + iy) * xs.w + ix) * c..][..(end - first) * c];
                    taps[first * c..end * c].copy_from_slice(src);
                }
            }
            ox += 1;
            if ox == os.w {
                ox = 0;
                oy += 1;
                if oy == os.h {
                    oy = 0;
                    bi += 1;
                }
            }
        }
    }

    /// Output rows `r0 .. r0 + rows`, im2col block by block, each multiplied as it is made.
    #[allow(clippy::too_many_arguments)]
    fn im2col_gemm(
        &self,
        b: &PackedB,
        x: &[f32],
        (xs, os): (Shape, Shape),
        r0: usize,
        rows: usize,
        out: &mut [f32],
        res: Option<&[f32]>,
        (lo, hi): (f32, f32),
    ) {
        let kk = b.k;
        let mr = isa().mr();
        let block = (IM2COL_BYTES / (4 * kk)).max(mr) / mr * mr;
        with_scratch(&IM2COL, block * kk, |buf| {
            for q0 in (0..rows).step_by(block) {
                let n = block.min(rows - q0);
                self.gather(x, xs, os, r0 + q0, &mut buf[..n * kk], kk);
                let o = &mut out[q0 * os.c..];
                let r = res.map(|r| &r[q0 * os.c..]);
                gemm(n, b, &buf[..n * kk], kk, o, os.c, epilogue(r, os.c, lo, hi));
            }
        });
    }
}

/// `m` rows (few), threads splitting the output channels: each 32-column panel goes to its
/// own block of scratch, then the blocks are copied into the `[m, n]` output.
///
/// A panel's rows are split too when the panels alone do not divide evenly among the
/// threads: MobileNetV2's 7x7 projections at batch 1 have 5 panels, which left one of two
/// cores idle for a sixth of the layer.
fn narrow_gemm(
    m: usize,
    b: &PackedB,
    (a, lda): (&[f32], usize),
    out: &mut [f32],
    residual: Option<&[f32]>,
    (lo, hi): (f32, f32),
) {
    let np = b.n.div_ceil(NR);
    let chunk = m.div_ceil(row_splits(np, m, rayon::current_num_threads()));
    with_scratch(&NARROW, np * m * NR, |scratch| {
        scratch
            .par_chunks_mut(m * NR)
            .enumerate()
            .flat_map(|(p, s)| {
                s.par_chunks_mut(chunk * NR)
                    .enumerate()
                    .map(move |(j, s)| (p, j * chunk, s))
            })
            .for_each(|(p, r0, s)| {
                let rows = s.len() / NR;
                let res = residual.map(|r| &r[r0 * b.n + p * NR..]);
                let a = &a[r0 * lda..];
                gemm_panels(rows, b, p..p + 1, a, lda, s, NR, epilogue(res, b.n, lo, hi));
            });
        let scratch = &*scratch;
        out[..m * b.n]
            .par_chunks_mut(b.n)
            .enumerate()
            .for_each(|(r, row)| {
                for (p, cols) in row.chunks_mut(NR).enumerate() {
                    cols.copy_from_slice(&scratch[(p * m + r) * NR..][..cols.len()]);
                }
            });
    });
}

/// Into how many row chunks [`narrow_gemm`] cuts each of `panels` panels of `m` rows: the
/// fewest that give every thread the same number of chunks, while a chunk keeps at least
/// [`MIN_NARROW_CHUNK_ROWS`] rows; if none does, as many as that allows (the more chunks,
/// the smaller the last round's imbalance).
fn row_splits(panels: usize, m: usize, threads: usize) -> usize {
    let most = (m / MIN_NARROW_CHUNK_ROWS).max(1);
    (1..=most)
        .find(|s| (panels * s).is_multiple_of(threads))
        .unwrap_or(most)
}

/// The fewest rows [`narrow_gemm`] gives one piece of work: below about this the row loop
/// and a panel's weights read once per chunk cost more than an idle core.
const MIN_NARROW_CHUNK_ROWS: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::conv::test_util::{max_abs_diff, rand_vec, reference_conv, to_nhwc};
    use candle_core::{Device, Result, Tensor};

    /// A buffer asked for again on the same thread while in use (a pool worker running
    /// another pass's layer while it waits) is a second buffer, not a panic.
    #[test]
    fn scratch_re_entered_on_one_thread_is_a_buffer_of_its_own() {
        let sum = with_scratch(&IM2COL, 4, |outer| {
            outer.fill(1.0);
            let inner = with_scratch(&IM2COL, 8, |inner| {
                inner.fill(2.0);
                inner.iter().sum::<f32>()
            });
            inner + outer.iter().sum::<f32>()
        });
        assert_eq!(sum, 16.0 + 4.0);
    }

    /// Panels that do not divide among the threads get their rows split, never below the
    /// least chunk; ones that do are left whole.
    #[test]
    fn narrow_row_splits_even_out_the_threads() {
        assert_eq!(row_splits(5, 49, 2), 2);
        assert_eq!(row_splits(30, 49, 2), 1);
        assert_eq!(row_splits(5, 49, 4), 3, "at most 49 / 16 chunks of a panel");
        assert_eq!(row_splits(3, 196, 4), 4);
        assert_eq!(
            row_splits(5, 20, 2),
            1,
            "20 rows make one chunk of 16 or more"
        );
    }

    /// Every method against candle's conv2d on random data, with residual and both clamps;
    /// small cases take the narrow (split by channels) and small-batch Winograd fallbacks.
    #[test]
    fn methods_match_candle_conv2d() -> Result<()> {
        let cases = [
            // (c_in, c_out, k, stride, groups, h, w, winograd)
            (3, 64, 7, 2, 1, 23, 19, false),
            (16, 24, 1, 1, 1, 9, 7, false),
            (16, 40, 1, 2, 1, 9, 7, false),
            // Five panels of output channels: their rows are split between threads too.
            (24, 150, 1, 1, 1, 7, 7, false),
            (8, 33, 3, 2, 1, 10, 11, false),
            (8, 16, 3, 1, 1, 10, 11, false),
            (24, 24, 3, 1, 24, 9, 10, false),
            (24, 24, 3, 2, 24, 9, 10, false),
            (16, 32, 3, 1, 1, 13, 9, true),
            (32, 40, 3, 1, 1, 4, 7, true),
            // More than NARROW_ROWS output pixels: split by rows, not by output channels.
            (16, 40, 1, 1, 1, 20, 15, false),
            (8, 33, 3, 2, 1, 40, 30, false),
            (32, 40, 3, 1, 1, 12, 25, true),
        ];
        for (seed, &(ci, co, k, s, g, h, w, wino)) in cases.iter().enumerate() {
            let seed = seed as u64 * 100;
            let n = 2;
            let spec = ConvSpec {
                groups: g,
                ..ConvSpec::new(ci, co, k, s)
            };
            let (o, i, _, _) = spec.weight_shape();
            let wv = rand_vec(o * i * k * k, seed);
            let bias = rand_vec(co, seed + 1);
            let xv = rand_vec(n * ci * h * w, seed + 2);
            let conv = Conv::new(spec, &wv, &bias, wino);
            let xs = Shape { n, h, w, c: ci };
            let os = conv.out_shape(xs);
            let res = rand_vec(os.len(), seed + 3);
            let x_t = Tensor::from_vec(xv.clone(), (n, ci, h, w), &Device::Cpu)?;
            let w_t = Tensor::from_vec(wv, (o, i, k, k), &Device::Cpu)?;
            for (act, with_res) in [(Act::None, false), (Act::Relu, true), (Act::Relu6, false)] {
                let (lo, hi) = act.bounds();
                let r = with_res.then_some(res.as_slice());
                let want = reference_conv(&x_t, &w_t, &bias, s, g, r, lo, hi)?;
                let mut got = vec![f32::NAN; os.len()];
                conv.run(&to_nhwc(&xv, n, ci, h, w), xs, &mut got, r, act);
                let d = max_abs_diff(&got, &want);
                assert!(d < 2e-4, "case {seed}: {spec:?} {act:?}: {d}");
            }
        }
        Ok(())
    }
}
