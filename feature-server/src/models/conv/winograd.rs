//! Winograd F(4x4, 3x3) for the stride-1 3x3 convolutions (83 % of ResNet18's arithmetic).
//!
//! Why: a 4x4 output tile from a 6x6 input tile costs 36 multiplies per (input, output)
//! channel pair instead of 144, so the GEMMs shrink 4x. Plain im2col + GEMM tops out near
//! ONNX Runtime's speed on this machine; fewer operations is the only way past it.
//!
//! Per block of whole tile rows: (1) input transform `V = Bt d B` per tile, channels
//! vectorized, laid `[tile][36][c_in]`; (2) 36 GEMMs `M[xi] = V[xi] U[xi]`, one per transform
//! position, in parallel; (3) output transform `Y = At M A` with bias, residual and clamp,
//! written straight into the NHWC output. Blocks are sized so V and M stay in L2. The weight
//! transform `U = G g Gt` is done once at load, in f64. Points 0, +-1, +-2 (Lavin & Gray).

use std::cell::RefCell;
use std::sync::Mutex;

use rayon::prelude::*;

use super::gemm::{Epilogue, PackedB, gemm};
use super::isa::vectorized;
use super::layer::{Shape, finish_pixel};

/// The 6x3 filter transform G.
const G: [[f64; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// Bytes of V + M per block: about half of one core's L2...
const BLOCK_BYTES: usize = 1 << 20;
/// ...but at least this many tiles, because every block streams all 36 U matrices (4x the
/// layer's weights: 38 MB for a 512-channel layer): few tiles per block and deep layers
/// would be bound by that stream instead of arithmetic.
const MIN_TILES: usize = 96;

pub struct Winograd {
    c_in: usize,
    c_out: usize,
    /// `U[xi]`, `[c_in, c_out]` each, packed.
    u: Vec<PackedB>,
    bias: Vec<f32>,
    /// V and M of one block, kept between calls.
    scratch: Mutex<Vec<f32>>,
}

thread_local! {
    /// One tile's intermediate rows (72 channel vectors), per thread.
    static TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl Winograd {
    /// `weight`: `[c_out, c_in, 3, 3]`; `bias`: `[c_out]`.
    pub fn new(weight: &[f32], c_in: usize, c_out: usize, bias: &[f32]) -> Self {
        let mut u = vec![vec![0f32; c_in * c_out]; 36];
        for o in 0..c_out {
            for c in 0..c_in {
                let g = &weight[(o * c_in + c) * 9..][..9];
                // G g Gt, in f64.
                let mut gg = [[0f64; 3]; 6];
                for (i, row) in gg.iter_mut().enumerate() {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = (0..3).map(|k| G[i][k] * f64::from(g[k * 3 + j])).sum();
                    }
                }
                for i in 0..6 {
                    for j in 0..6 {
                        let v: f64 = (0..3).map(|k| gg[i][k] * G[j][k]).sum();
                        u[i * 6 + j][c * c_out + o] = v as f32;
                    }
                }
            }
        }
        let zeros = vec![0f32; c_out];
        Self {
            c_in,
            c_out,
            u: u.iter()
                .map(|m| PackedB::new(m, c_in, c_out, &zeros))
                .collect(),
            bias: bias.to_vec(),
            scratch: Mutex::new(Vec::new()),
        }
    }

    /// 3x3, stride 1, padding 1: `out = clamp(conv(x) + bias [+ residual], lo, hi)`, NHWC.
    pub fn run(
        &self,
        x: &[f32],
        xs: Shape,
        out: &mut [f32],
        residual: Option<&[f32]>,
        lo: f32,
        hi: f32,
    ) {
        let (ci, co) = (self.c_in, self.c_out);
        let (th, tw) = (xs.h.div_ceil(4), xs.w.div_ceil(4));
        let tile_rows = xs.n * th;
        let per_tile = 36 * (ci + co) * 4;
        let rows_per_block = (BLOCK_BYTES / (per_tile * tw))
            .max(MIN_TILES.div_ceil(tw))
            .clamp(1, tile_rows);
        let max_tiles = rows_per_block * tw;
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        if scratch.len() < max_tiles * 36 * (ci + co) {
            scratch.resize(max_tiles * 36 * (ci + co), 0.0);
        }
        let (v, m) = scratch.split_at_mut(max_tiles * 36 * ci);
        let row_floats = xs.w * co;
        let mut rest = &mut out[..xs.len() / ci * co];
        for g0 in (0..tile_rows).step_by(rows_per_block) {
            let rows = rows_per_block.min(tile_rows - g0);
            let tiles = rows * tw;
            let v = &mut v[..tiles * 36 * ci];
            let m = &mut m[..tiles * 36 * co];
            // (1) input transform, tile by tile.
            v.par_chunks_mut(36 * ci).enumerate().for_each(|(t, vt)| {
                let (g, tx) = (g0 + t / tw, t % tw);
                self.input_tile(x, xs, g / th, 4 * (g % th), 4 * tx, vt);
            });
            // (2) the 36 products.
            m.par_chunks_mut(tiles * co)
                .enumerate()
                .for_each(|(xi, mx)| {
                    gemm(
                        tiles,
                        &self.u[xi],
                        &v[xi * ci..],
                        36 * ci,
                        mx,
                        co,
                        Epilogue::STORE,
                    );
                });
            // (3) output transform, one tile row (up to 4 output rows) per task.
            let mut parts = Vec::with_capacity(rows);
            for g in g0..g0 + rows {
                let h = 4.min(xs.h - 4 * (g % th));
                let (part, tail) = std::mem::take(&mut rest).split_at_mut(h * row_floats);
                parts.push((g, part));
                rest = tail;
            }
            let m = &*m;
            parts.into_par_iter().for_each(|(g, part)| {
                let (b, y0) = (g / th, 4 * (g % th));
                let first = ((b * xs.h + y0) * xs.w) * co;
                let res = residual.map(|r| &r[first..first + part.len()]);
                for tx in 0..tw {
                    let t = (g - g0) * tw + tx;
                    self.output_tile(m, tiles, t, xs, y0, 4 * tx, part, res, lo, hi);
                }
            });
        }
    }

    /// `V = Bt d B` for the tile whose top-left output is `(y0, x0)` of image `b`.
    fn input_tile(&self, x: &[f32], xs: Shape, b: usize, y0: usize, x0: usize, vt: &mut [f32]) {
        let c = self.c_in;
        with_tile_scratch(72 * c, |buf| {
            let (d, tmp) = buf.split_at_mut(36 * c);
            vectorized(|| {
                for ky in 0..6 {
                    let iy = (y0 + ky).checked_sub(1).filter(|&iy| iy < xs.h);
                    for kx in 0..6 {
                        let ix = (x0 + kx).checked_sub(1).filter(|&ix| ix < xs.w);
                        let dst = &mut d[(ky * 6 + kx) * c..][..c];
                        match (iy, ix) {
                            (Some(iy), Some(ix)) => {
                                dst.copy_from_slice(&x[((b * xs.h + iy) * xs.w + ix) * c..][..c])
                            }
                            _ => dst.fill(0.0),
                        }
                    }
                }
                // Columns: tmp[kx][i] = sum_k Bt[i][k] d[k][kx]; rows: V[i][j] = Bt tmp[.][i].
                for kx in 0..6 {
                    let src = std::array::from_fn(|k| &d[(k * 6 + kx) * c..][..c]);
                    bt(src, &mut tmp[kx * 6 * c..(kx + 1) * 6 * c], c);
                }
                for i in 0..6 {
                    let src = std::array::from_fn(|k| &tmp[(k * 6 + i) * c..][..c]);
                    bt(src, &mut vt[i * 6 * c..(i + 1) * 6 * c], c);
                }
            });
        });
    }

    /// `Y = At M A` for tile `t`, plus bias and residual, clamped, into the rows of `part`
    /// (the tile row's output, starting at output row `y0`).
    #[allow(clippy::too_many_arguments)]
    fn output_tile(
        &self,
        m: &[f32],
        tiles: usize,
        t: usize,
        xs: Shape,
        y0: usize,
        x0: usize,
        part: &mut [f32],
        res: Option<&[f32]>,
        lo: f32,
        hi: f32,
    ) {
        let c = self.c_out;
        with_tile_scratch(40 * c, |buf| {
            let (tmp, y) = buf.split_at_mut(24 * c);
            vectorized(|| {
                for j in 0..6 {
                    let src = std::array::from_fn(|i| &m[((i * 6 + j) * tiles + t) * c..][..c]);
                    at(src, &mut tmp[j * 4 * c..(j + 1) * 4 * c], c);
                }
                for r in 0..4 {
                    let src = std::array::from_fn(|j| &tmp[(j * 4 + r) * c..][..c]);
                    at(src, &mut y[r * 4 * c..(r + 1) * 4 * c], c);
                }
                for r in 0..4.min(xs.h - y0) {
                    for s in 0..4.min(xs.w - x0) {
                        let at = (r * xs.w + x0 + s) * c;
                        let o = &mut part[at..at + c];
                        let yv = &y[(r * 4 + s) * c..][..c];
                        for ((o, yv), b) in o.iter_mut().zip(yv).zip(&self.bias) {
                            *o = yv + b;
                        }
                        finish_pixel(o, res.map(|r| &r[at..at + c]), lo, hi);
                    }
                }
            });
        });
    }
}

/// Runs `f` on this thread's tile scratch, grown to at least `len` floats (re-entered, on a
/// buffer of its own: see [`super::layer::with_scratch`]).
fn with_tile_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    super::layer::with_scratch(&TILE, len, f)
}

/// Six channel vectors through Bt, into six consecutive rows of `dst`.
#[inline(always)]
fn bt(s: [&[f32]; 6], dst: &mut [f32], c: usize) {
    let (r0, rest) = dst.split_at_mut(c);
    let (r1, rest) = rest.split_at_mut(c);
    let (r2, rest) = rest.split_at_mut(c);
    let (r3, rest) = rest.split_at_mut(c);
    let (r4, r5) = rest.split_at_mut(c);
    // Every slice cut to exactly `c`, so the loop has no bounds checks and vectorizes.
    let [d0, d1, d2, d3, d4, d5] = s.map(|d| &d[..c]);
    let (r0, r1, r2, r3, r4, r5) = (
        &mut r0[..c],
        &mut r1[..c],
        &mut r2[..c],
        &mut r3[..c],
        &mut r4[..c],
        &mut r5[..c],
    );
    for j in 0..c {
        let (a0, a1, a2, a3, a4, a5) = (d0[j], d1[j], d2[j], d3[j], d4[j], d5[j]);
        r0[j] = 4.0 * a0 - 5.0 * a2 + a4;
        r1[j] = -4.0 * (a1 + a2) + a3 + a4;
        r2[j] = 4.0 * (a1 - a2) - a3 + a4;
        r3[j] = 2.0 * (a3 - a1) - a2 + a4;
        r4[j] = 2.0 * (a1 - a3) - a2 + a4;
        r5[j] = 4.0 * a1 - 5.0 * a3 + a5;
    }
}

/// Six channel vectors through At, into four consecutive rows of `dst`.
#[inline(always)]
fn at(s: [&[f32]; 6], dst: &mut [f32], c: usize) {
    let (r0, rest) = dst.split_at_mut(c);
    let (r1, rest) = rest.split_at_mut(c);
    let (r2, r3) = rest.split_at_mut(c);
    let [m0, m1, m2, m3, m4, m5] = s.map(|m| &m[..c]);
    let (r0, r1, r2, r3) = (&mut r0[..c], &mut r1[..c], &mut r2[..c], &mut r3[..c]);
    for j in 0..c {
        let (a0, a1, a2, a3, a4, a5) = (m0[j], m1[j], m2[j], m3[j], m4[j], m5[j]);
        let (p12, d12, p34, d34) = (a1 + a2, a1 - a2, a3 + a4, a3 - a4);
        r0[j] = a0 + p12 + p34;
        r1[j] = d12 + 2.0 * d34;
        r2[j] = p12 + 4.0 * p34;
        r3[j] = d12 + 8.0 * d34 + a5;
    }
}
