//! The one matrix-multiply microkernel every convolution ends in, with the output pass fused.
//!
//! Why our own instead of the `gemm` crate candle calls: the weights never change, so they are
//! packed once at load ([`PackedB`]) instead of on every call; the left-hand rows are read in
//! place, row-major, wherever they live (a plain NHWC activation, Winograd's transformed
//! tiles, a small im2col block), so nothing is copied into a packed layout; and bias, residual add and
//! ReLU/ReLU6 are applied to the accumulators while they are still in registers, so a layer's
//! output is written exactly once. Kernels: AVX-512 (12 rows x 32 columns), AVX2+FMA (3 x 32
//! or 6 x 16), and a portable fallback, chosen at run time.

use std::ops::Range;

use super::isa::{Isa, isa};

/// Output channels per packed weight panel (two AVX-512 vectors, four AVX2 vectors).
pub const NR: usize = 32;

/// A `[K, N]` weight matrix (row-major, N = output channels) packed as `ceil(N / 32)` panels
/// of `[K][32]`, zero-padded, with the bias padded alike.
pub struct PackedB {
    pub k: usize,
    pub n: usize,
    panels: Vec<f32>,
    bias: Vec<f32>,
}

impl PackedB {
    /// `b` is `[k, n]` row-major; `bias` has `n` entries.
    pub fn new(b: &[f32], k: usize, n: usize, bias: &[f32]) -> Self {
        assert_eq!(b.len(), k * n, "weight matrix size");
        assert_eq!(bias.len(), n, "bias size");
        let np = n.div_ceil(NR);
        let mut panels = vec![0f32; np * k * NR];
        for p in 0..np {
            for kk in 0..k {
                for j in 0..NR.min(n - p * NR) {
                    panels[(p * k + kk) * NR + j] = b[kk * n + p * NR + j];
                }
            }
        }
        let mut padded = bias.to_vec();
        padded.resize(np * NR, 0.0);
        Self {
            k,
            n,
            panels,
            bias: padded,
        }
    }

    fn panel(&self, p: usize) -> &[f32] {
        &self.panels[p * self.k * NR..(p + 1) * self.k * NR]
    }
}

/// What happens to the accumulators on their way out: `clamp(acc + bias + residual, lo, hi)`.
#[derive(Clone, Copy)]
pub struct Epilogue<'a> {
    /// Add the packed bias (off for Winograd's intermediate products).
    pub bias: bool,
    /// Rows of a tensor to add, `(data, row stride)`, indexed like the output rows.
    pub residual: Option<(&'a [f32], usize)>,
    pub lo: f32,
    pub hi: f32,
}

impl Epilogue<'_> {
    /// Plain store: no bias, no residual, no clamp.
    pub const STORE: Epilogue<'static> = Epilogue {
        bias: false,
        residual: None,
        lo: f32::NEG_INFINITY,
        hi: f32::INFINITY,
    };
}

/// `out[r][j] = epilogue(sum_k a[r * lda + k] * B[k][j])` for `r in 0..m`, `j in 0..b.n`,
/// with `out` rows `ldo` apart. A is read in place, row-major: an NHWC activation, Winograd's
/// transformed tiles or an im2col block, with no packing copy.
pub fn gemm(
    m: usize,
    b: &PackedB,
    a: &[f32],
    lda: usize,
    out: &mut [f32],
    ldo: usize,
    ep: Epilogue,
) {
    gemm_panels(m, b, 0..b.n.div_ceil(NR), a, lda, out, ldo, ep);
}

/// [`gemm`] for the output columns of weight panels `panels` only (32 columns each); column 0
/// of `out` and of the residual is the first column of `panels.start`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_panels(
    m: usize,
    b: &PackedB,
    panels: Range<usize>,
    a: &[f32],
    lda: usize,
    out: &mut [f32],
    ldo: usize,
    ep: Epilogue,
) {
    if m == 0 || panels.is_empty() {
        return;
    }
    let n = b.n.min(panels.end * NR) - panels.start * NR;
    assert!(lda >= b.k && a.len() >= (m - 1) * lda + b.k, "input rows");
    assert!(ldo >= n && out.len() >= (m - 1) * ldo + n, "output rows");
    if let Some((res, ldr)) = ep.residual {
        assert!(ldr >= n && res.len() >= (m - 1) * ldr + n, "residual rows");
    }
    let isa = isa();
    let mr = isa.mr();
    for r0 in (0..m).step_by(mr) {
        let rows = mr.min(m - r0);
        for p in panels.clone() {
            let c0 = (p - panels.start) * NR;
            let tile = Tile {
                k: b.k,
                a: &a[r0 * lda..],
                lda,
                b: b.panel(p),
                bias: &b.bias[p * NR..(p + 1) * NR],
                use_bias: ep.bias,
                res: ep.residual.map(|(r, ldr)| (&r[r0 * ldr + c0..], ldr)),
                lo: ep.lo,
                hi: ep.hi,
                rows,
                cols: NR.min(b.n - p * NR),
            };
            // Bounds: the asserts above cover the last row and column of this tile.
            tile.run(isa, &mut out[r0 * ldo + c0..], ldo);
        }
    }
}

/// One `rows x cols` (at most MR x 32) block of the output and everything it needs.
struct Tile<'a> {
    k: usize,
    a: &'a [f32],
    lda: usize,
    b: &'a [f32],
    bias: &'a [f32],
    use_bias: bool,
    res: Option<(&'a [f32], usize)>,
    lo: f32,
    hi: f32,
    rows: usize,
    cols: usize,
}

impl Tile<'_> {
    #[allow(unsafe_code)] // calls the x86 kernels; see `x86`'s module doc.
    fn run(&self, isa: Isa, out: &mut [f32], ldo: usize) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the ISA was detected on this CPU; slices cover every row and column.
            Isa::Avx512 => unsafe { super::x86::tile_avx512(self.parts(), out, ldo) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2 => unsafe { super::x86::tile_avx2(self.parts(), out, ldo) },
            _ => self.portable(out, ldo),
        }
    }

    fn parts(&self) -> TileParts<'_> {
        TileParts {
            k: self.k,
            a: self.a,
            lda: self.lda,
            b: self.b,
            bias: self.bias,
            use_bias: self.use_bias,
            res: self.res,
            lo: self.lo,
            hi: self.hi,
            rows: self.rows,
            cols: self.cols,
        }
    }

    fn portable(&self, out: &mut [f32], ldo: usize) {
        for i in 0..self.rows {
            let mut acc = [0f32; NR];
            for kk in 0..self.k {
                let av = self.a[i * self.lda + kk];
                let brow = &self.b[kk * NR..(kk + 1) * NR];
                for (c, bv) in acc.iter_mut().zip(brow) {
                    *c += av * bv;
                }
            }
            for (j, &v) in acc.iter().enumerate().take(self.cols) {
                let mut v = v;
                if self.use_bias {
                    v += self.bias[j];
                }
                if let Some((r, ldr)) = self.res {
                    v += r[i * ldr + j];
                }
                out[i * ldo + j] = v.clamp(self.lo, self.hi);
            }
        }
    }
}

/// The tile, handed to the SIMD kernels.
#[derive(Clone, Copy)]
pub struct TileParts<'a> {
    pub k: usize,
    /// `rows` rows of `k` values, `lda` apart.
    pub a: &'a [f32],
    pub lda: usize,
    pub b: &'a [f32],
    pub bias: &'a [f32],
    pub use_bias: bool,
    pub res: Option<(&'a [f32], usize)>,
    pub lo: f32,
    pub hi: f32,
    pub rows: usize,
    pub cols: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::conv::test_util::{max_abs_diff, rand_vec};

    #[test]
    fn matches_naive_product_with_epilogue() {
        for (m, k, n, seed) in [
            (1, 1, 1, 1),
            (13, 7, 33, 2),
            (25, 64, 24, 3),
            (40, 147, 64, 4),
            (7, 5, 16, 5),
            (19, 12, 8, 6),
            (11, 9, 20, 7),
        ] {
            let a = rand_vec(m * k, seed);
            let bm = rand_vec(k * n, seed + 10);
            let bias = rand_vec(n, seed + 20);
            let res = rand_vec(m * (n + 3), seed + 30);
            let packed = PackedB::new(&bm, k, n, &bias);
            let ldo = n + 5;
            let mut out = vec![0f32; m * ldo];
            let ep = Epilogue {
                bias: true,
                residual: Some((&res, n + 3)),
                lo: 0.0,
                hi: 6.0,
            };
            gemm(m, &packed, &a, k, &mut out, ldo, ep);
            let mut want = vec![0f32; m * ldo];
            let mut got = vec![0f32; m * ldo];
            for i in 0..m {
                for j in 0..n {
                    let s: f64 = (0..k)
                        .map(|kk| f64::from(a[i * k + kk]) * f64::from(bm[kk * n + j]))
                        .sum();
                    let v = s as f32 + bias[j] + res[i * (n + 3) + j];
                    want[i * ldo + j] = v.clamp(0.0, 6.0);
                    got[i * ldo + j] = out[i * ldo + j];
                }
            }
            let d = max_abs_diff(&got, &want);
            assert!(d < 1e-4, "{m}x{k}x{n}: {d}");
        }
    }
}
