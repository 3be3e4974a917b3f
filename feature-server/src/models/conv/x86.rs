//! The x86-64 microkernels behind [`super::gemm`]: a `rows x 32` block of the output,
//! accumulated over the whole K in registers, then bias, residual and clamp, then one masked
//! store. AVX-512: up to 12 rows x 2 vectors (24 accumulators), or x 1 for a panel of 16
//! columns or fewer; AVX2: 3 rows x 4 vectors or 6 x 2 (12), by the panel's width.
//! And the 3x3 depthwise row kernels behind [`super::depthwise`]: their nine tap weights held
//! in registers, one fused multiply-add per tap, every pixel of the row (AVX2: 8 channels at a
//! time; AVX-512: 16).
//!
//! Why the whole K at once: the layers here have K <= 4608, so a 32-column weight panel is at
//! most 590 KB and stays in L2 across row blocks; no partial sums ever go back to memory.
//!
//! The workspace denies `unsafe`; this module (with the two dispatch points in `gemm` and
//! `isa`) is the deliberate exception, because SIMD intrinsics on raw pointers are unsafe by
//! definition. Every pointer stays inside slices whose sizes the safe caller asserts.
//!
//! AVX-512 intrinsics are stable since Rust 1.89 and the workspace's MSRV is 1.88: the
//! AVX-512 kernel is compiled only by 1.89+ (`rustversion`), older compilers use AVX2.
#![allow(unsafe_code)]
#![allow(clippy::incompatible_msrv)] // the AVX-512 items are gated on 1.89 by `rustversion`

use std::arch::x86_64::*;

use super::gemm::{NR, TileParts};

/// Dispatches the row count to a kernel specialised for it (the loops over rows unroll).
macro_rules! by_rows {
    ($rows:expr, $f:ident, $t:expr, $out:expr, $ldo:expr, [$($r:literal),*]) => {
        match $rows {
            $($r => $f::<$r>($t, $out, $ldo),)*
            other => unreachable!("tile of {other} rows"),
        }
    };
    ($rows:expr, $f:ident, $v:tt, $t:expr, $out:expr, $ldo:expr, [$($r:literal),*]) => {
        match $rows {
            $($r => $f::<$r, $v>($t, $out, $ldo),)*
            other => unreachable!("tile of {other} rows"),
        }
    };
}

/// How many k steps ahead the tiles prefetch their weight panel (8 to 64 measured alike).
const PREFETCH_STEPS: usize = 16;

/// Asks for the weight panel's row `PREFETCH_STEPS` k steps ahead (its two cache lines).
/// Why: a panel streams from L3 whenever the layer's weights outgrow L2 (ResNet18's layer4,
/// 9.4 MB a layer, is one at batch 1), and with only the hardware prefetcher the multiplies
/// waited on it. The address may lie past the panel: a prefetch never faults.
#[inline(always)]
fn prefetch_panel(b: *const f32, kk: usize) {
    let ahead = b.wrapping_add((kk + PREFETCH_STEPS) * NR);
    // SAFETY: a prefetch is a hint; it reads nothing and faults on no address.
    unsafe {
        _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(16).cast());
    }
}

/// Whether this build has the AVX-512 kernel (compiled by Rust 1.89 or later).
#[rustversion::since(1.89)]
pub const AVX512_BUILT: bool = true;
#[rustversion::before(1.89)]
pub const AVX512_BUILT: bool = false;

/// # Safety
/// Never called: this compiler predates stable AVX-512 ([`AVX512_BUILT`] is false).
#[rustversion::before(1.89)]
pub unsafe fn tile_avx512(_: TileParts, _: &mut [f32], _: usize) {
    unreachable!("AVX-512 kernel not built")
}

/// # Safety
/// AVX-512F must be available; `t.a` holds `t.rows` rows of `t.k` values `t.lda` apart, `t.b` `t.k * 32`, `t.bias` 32;
/// `out` (and the residual) cover `t.rows` rows of `t.cols` columns at their strides.
#[rustversion::since(1.89)]
#[target_feature(enable = "avx512f")]
pub unsafe fn tile_avx512(t: TileParts, out: &mut [f32], ldo: usize) {
    // SAFETY: forwarded from the caller.
    unsafe {
        // A panel of at most 16 columns (the 16-channel layers of MobileNetV2's first block)
        // takes one vector a row: the second would multiply padding.
        if t.cols <= 16 {
            k512_rows::<1>(&t, out, ldo)
        } else {
            k512_rows::<2>(&t, out, ldo)
        }
    }
}

/// [`k512`] with `V` vectors, specialised for the tile's row count.
#[rustversion::since(1.89)]
#[target_feature(enable = "avx512f")]
unsafe fn k512_rows<const V: usize>(t: &TileParts, out: &mut [f32], ldo: usize) {
    // SAFETY: forwarded from the caller.
    unsafe {
        by_rows!(
            t.rows,
            k512,
            V,
            t,
            out,
            ldo,
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
        )
    }
}

/// `R` rows x `V` vectors of 16 columns. AVX-512 masked stores are cheap (unlike AVX2's
/// `vmaskmovps` on AMD), so every vector takes its mask.
#[rustversion::since(1.89)]
#[target_feature(enable = "avx512f")]
unsafe fn k512<const R: usize, const V: usize>(t: &TileParts, out: &mut [f32], ldo: usize) {
    debug_assert!(t.a.len() >= (R - 1) * t.lda + t.k && t.b.len() >= t.k * NR);
    // SAFETY: every pointer below stays inside the slices the caller vouched for; the masked
    // loads and stores touch only columns < t.cols.
    unsafe {
        let b = t.b.as_ptr();
        let rows: [*const f32; R] = std::array::from_fn(|i| t.a.as_ptr().add(i * t.lda));
        // The bias seeds the accumulators (one add fewer per output vector, as in `k256`).
        let seed: [__m512; V] = std::array::from_fn(|v| {
            if t.use_bias {
                _mm512_loadu_ps(t.bias.as_ptr().add(16 * v))
            } else {
                _mm512_setzero_ps()
            }
        });
        let mut acc = [seed; R];
        for kk in 0..t.k {
            prefetch_panel(b, kk);
            let bv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(b.add(kk * NR + 16 * v)));
            for (row, acc) in rows.iter().zip(acc.iter_mut()) {
                let av = _mm512_set1_ps(*row.add(kk));
                for v in 0..V {
                    acc[v] = _mm512_fmadd_ps(av, bv[v], acc[v]);
                }
            }
        }
        let m: [__mmask16; V] = std::array::from_fn(|v| {
            let n = t.cols.saturating_sub(16 * v).min(16);
            ((1u32 << n) - 1) as __mmask16
        });
        let (lo, hi) = (_mm512_set1_ps(t.lo), _mm512_set1_ps(t.hi));
        let o = out.as_mut_ptr();
        for (i, acc) in acc.iter().enumerate() {
            for v in 0..V {
                let mut y = acc[v];
                if let Some((r, ldr)) = t.res {
                    y = _mm512_add_ps(
                        y,
                        _mm512_maskz_loadu_ps(m[v], r.as_ptr().wrapping_add(i * ldr + 16 * v)),
                    );
                }
                y = _mm512_min_ps(_mm512_max_ps(y, lo), hi);
                _mm512_mask_storeu_ps(o.wrapping_add(i * ldo + 16 * v), m[v], y);
            }
        }
    }
}

/// # Safety
/// AVX2 and FMA must be available; as [`tile_avx512`], with at most 6 rows.
///
/// The tile's shape follows its columns, so that no multiply is spent on padding: panels of
/// 17-32 columns run 3 rows x 3-4 vectors at a time, narrower ones (the 16- and 24-channel
/// layers of MobileNetV2's first blocks are half or three quarters of a panel) 6 rows x 1-2
/// vectors. Either way 9-12 accumulators, enough to hide the FMA latency.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tile_avx2(t: TileParts, out: &mut [f32], ldo: usize) {
    debug_assert!(t.rows <= 6 && t.cols <= NR);
    let vectors = t.cols.div_ceil(8);
    // SAFETY: forwarded from the caller; each part covers its own rows of `t` and `out`.
    unsafe {
        if vectors <= 2 {
            return match vectors {
                1 => by_rows!(t.rows, k256, 1, &t, out, ldo, [1, 2, 3, 4, 5, 6]),
                _ => by_rows!(t.rows, k256, 2, &t, out, ldo, [1, 2, 3, 4, 5, 6]),
            };
        }
        for r0 in (0..t.rows).step_by(3) {
            let part = TileParts {
                a: &t.a[r0 * t.lda..],
                res: t.res.map(|(r, ldr)| (&r[r0 * ldr..], ldr)),
                rows: 3.min(t.rows - r0),
                ..t
            };
            let o = &mut out[r0 * ldo..];
            match vectors {
                3 => by_rows!(part.rows, k256, 3, &part, o, ldo, [1, 2, 3]),
                _ => by_rows!(part.rows, k256, 4, &part, o, ldo, [1, 2, 3]),
            }
        }
    }
}

/// `R` rows x `V` vectors of 8 columns. Full vectors are stored plainly: AMD's Zen 1-3 run a
/// masked store (`vmaskmovps`) as a long microcoded sequence, which cost more than the
/// multiplies themselves on the small-K layers; only a partial last vector takes the mask.
#[target_feature(enable = "avx2,fma")]
unsafe fn k256<const R: usize, const V: usize>(t: &TileParts, out: &mut [f32], ldo: usize) {
    debug_assert!(t.a.len() >= (R - 1) * t.lda + t.k && t.b.len() >= t.k * NR);
    // SAFETY: as in `k512`; masked lanes are never touched, full vectors lie below t.cols.
    unsafe {
        let b = t.b.as_ptr();
        let rows: [*const f32; R] = std::array::from_fn(|i| t.a.as_ptr().add(i * t.lda));
        // The bias seeds the accumulators: one add fewer per output vector, which shows on
        // the K = 16-32 expansions where the epilogue is a third of the tile's work.
        let seed: [__m256; V] = std::array::from_fn(|v| {
            if t.use_bias {
                _mm256_loadu_ps(t.bias.as_ptr().add(8 * v))
            } else {
                _mm256_setzero_ps()
            }
        });
        let mut acc = [seed; R];
        // Whichever operand has fewer vectors is held in registers for the step, the other is
        // loaded as it is used, so that accumulators + held values stay within the 16 ymm
        // registers (3x4: 3 row broadcasts held; 6x2: 2 weight vectors held).
        if R <= V {
            for kk in 0..t.k {
                prefetch_panel(b, kk);
                let av: [__m256; R] =
                    std::array::from_fn(|i| _mm256_broadcast_ss(&*rows[i].add(kk)));
                for v in 0..V {
                    let bv = _mm256_loadu_ps(b.add(kk * NR + 8 * v));
                    for (acc, av) in acc.iter_mut().zip(&av) {
                        acc[v] = _mm256_fmadd_ps(*av, bv, acc[v]);
                    }
                }
            }
        } else {
            for kk in 0..t.k {
                prefetch_panel(b, kk);
                let bv: [__m256; V] =
                    std::array::from_fn(|v| _mm256_loadu_ps(b.add(kk * NR + 8 * v)));
                for (row, acc) in rows.iter().zip(acc.iter_mut()) {
                    let av = _mm256_broadcast_ss(&*row.add(kk));
                    for v in 0..V {
                        acc[v] = _mm256_fmadd_ps(av, bv[v], acc[v]);
                    }
                }
            }
        }
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let full = |v: usize| t.cols >= 8 * (v + 1);
        let mask: [__m256i; V] = std::array::from_fn(|v| {
            let left = t.cols.saturating_sub(8 * v).min(8) as i32;
            _mm256_cmpgt_epi32(_mm256_set1_epi32(left), lanes)
        });
        let (lo, hi) = (_mm256_set1_ps(t.lo), _mm256_set1_ps(t.hi));
        let o = out.as_mut_ptr();
        for (i, acc) in acc.iter().enumerate() {
            for v in 0..V {
                let mut y = acc[v];
                if let Some((r, ldr)) = t.res {
                    let p = r.as_ptr().wrapping_add(i * ldr + 8 * v);
                    let rv = if full(v) {
                        _mm256_loadu_ps(p)
                    } else {
                        _mm256_maskload_ps(p, mask[v])
                    };
                    y = _mm256_add_ps(y, rv);
                }
                y = _mm256_min_ps(_mm256_max_ps(y, lo), hi);
                let p = o.wrapping_add(i * ldo + 8 * v);
                if full(v) {
                    _mm256_storeu_ps(p, y);
                } else {
                    _mm256_maskstore_ps(p, mask[v], y);
                }
            }
        }
    }
}

/// One output row of a 3x3, padding 1 depthwise convolution, output pixels `ox`, channels
/// `0..c_vec`. A kernel row that falls in the padding is given as `None`: its weights are
/// zeroed in registers and another row stands in for the loads, so no zero row is ever read.
pub struct Depthwise3<'a> {
    pub rows: [Option<&'a [f32]>; 3],
    /// `[9][c]`, tap-major.
    pub weights: &'a [f32],
    pub bias: &'a [f32],
    pub c: usize,
    /// Channels `0..c_vec` are computed: a multiple of the kernel's vector width.
    pub c_vec: usize,
    pub stride: usize,
    /// Input row width in pixels (the AVX-512 kernel finds the right edge from it).
    pub in_w: usize,
    pub ox: std::ops::Range<usize>,
    pub lo: f32,
    pub hi: f32,
}

/// Generates a 3x3 depthwise row kernel at one vector width: the AVX2 and AVX-512 kernels are
/// the same loop, only the intrinsics' names and the lane count differ (as `k256`/`k512` for
/// the GEMM, but short enough that one body serves both). A macro, not a generic over a lane
/// trait, so that every intrinsic is written inside the `target_feature` function and inlines
/// there.
macro_rules! depthwise3_kernel {
    (
        $(#[$attr:meta])*
        $name:ident, $feature:literal, lanes $lanes:literal, $vec:ty,
        $load:ident, $store:ident, $set1:ident, $zero:ident, $add:ident, $fmadd:ident,
        $min:ident, $max:ident
    ) => {
        $(#[$attr])*
        #[target_feature(enable = $feature)]
        pub unsafe fn $name(d: &Depthwise3, out: &mut [f32]) {
            let Some(&any) = d.rows.iter().flatten().next() else {
                return;
            };
            debug_assert!(d.c_vec.is_multiple_of($lanes) && d.c_vec <= d.c);
            debug_assert!(d.bias.len() >= d.c_vec);
            debug_assert!(d.ox.end > 0 && (d.ox.end - 1) * d.stride < d.in_w && d.in_w >= 2);
            debug_assert!(out.len() >= d.ox.end * d.c && any.len() >= d.in_w * d.c);
            let (c, s) = (d.c, d.stride);
            // SAFETY: every load below reads a column in 0..in_w of a row the caller vouched
            // for, and channels < c_vec; every store writes a pixel < ox.end of `out`.
            unsafe {
                let (lo, hi) = ($set1(d.lo), $set1(d.hi));
                let rows: [*const f32; 3] =
                    std::array::from_fn(|r| d.rows[r].unwrap_or(any).as_ptr());
                let o = out.as_mut_ptr();
                let inner = interior(d);
                for c0 in (0..d.c_vec).step_by($lanes) {
                    let w: [$vec; 9] = std::array::from_fn(|t| {
                        if d.rows[t / 3].is_some() {
                            $load(d.weights.as_ptr().add(t * c + c0))
                        } else {
                            $zero()
                        }
                    });
                    let bias = $load(d.bias.as_ptr().add(c0));
                    let finish = |acc: [$vec; 3], ox: usize| {
                        let y = $add($add(acc[0], acc[1]), acc[2]);
                        $store(o.add(ox * c + c0), $min($max(y, lo), hi));
                    };
                    for ox in inner.clone() {
                        let at = (ox * s - 1) * c + c0;
                        let mut acc = [bias, $zero(), $zero()];
                        for (r, row) in rows.iter().enumerate() {
                            let p = row.add(at);
                            acc[r] = $fmadd($load(p), w[3 * r], acc[r]);
                            acc[r] = $fmadd($load(p.add(c)), w[3 * r + 1], acc[r]);
                            acc[r] = $fmadd($load(p.add(2 * c)), w[3 * r + 2], acc[r]);
                        }
                        finish(acc, ox);
                    }
                    for (ox, kx) in edges(d, &inner) {
                        let mut acc = [bias, $zero(), $zero()];
                        for (r, row) in rows.iter().enumerate() {
                            for kx in kx.clone() {
                                let p = row.add((ox * s + kx - 1) * c + c0);
                                acc[r] = $fmadd($load(p), w[3 * r + kx], acc[r]);
                            }
                        }
                        finish(acc, ox);
                    }
                }
            }
        }
    };
}

depthwise3_kernel!(
    /// One output row of a 3x3, padding 1 depthwise convolution, 8 channels at a time, every
    /// output pixel: the edge pixels, whose outer tap falls in the padding, skip that tap. Why
    /// the edges here: at 7x7 and 14x14 they are a seventh to two sevenths of the pixels, too
    /// many for the portable loop.
    ///
    /// # Safety
    /// AVX2 and FMA must be available. `d.ox` is `0..out_w` for a 3x3, padding 1, stride
    /// `d.stride` convolution of rows `d.in_w >= 2` pixels wide; every row holds `d.in_w * d.c`
    /// values; `d.c_vec` is a multiple of 8; `out` holds `d.ox.end * d.c` values.
    depthwise3_avx2, "avx2,fma", lanes 8, __m256,
    _mm256_loadu_ps, _mm256_storeu_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm256_add_ps,
    _mm256_fmadd_ps, _mm256_min_ps, _mm256_max_ps
);

depthwise3_kernel!(
    /// As [`depthwise3_avx2`], 16 channels at a time.
    ///
    /// # Safety
    /// AVX-512F must be available. `d.ox` is `0..out_w` for a 3x3, padding 1, stride `d.stride`
    /// convolution of rows `d.in_w` pixels wide; every row holds `d.in_w * d.c` values;
    /// `d.c_vec` is a multiple of 16; `out` holds `d.ox.end * d.c` values.
    #[rustversion::since(1.89)]
    depthwise3_avx512, "avx512f", lanes 16, __m512,
    _mm512_loadu_ps, _mm512_storeu_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_add_ps,
    _mm512_fmadd_ps, _mm512_min_ps, _mm512_max_ps
);

/// # Safety
/// Never called: this compiler predates stable AVX-512 ([`AVX512_BUILT`] is false).
#[rustversion::before(1.89)]
pub unsafe fn depthwise3_avx512(_: &Depthwise3, _: &mut [f32]) {
    unreachable!("AVX-512 kernel not built")
}

/// The output pixels of `d.ox` whose three taps per kernel row all lie inside the row.
fn interior(d: &Depthwise3) -> std::ops::Range<usize> {
    1.max(d.ox.start)..d.ox.end.min((d.in_w - 2) / d.stride + 1)
}

/// The other pixels of `d.ox`, each with its taps `kx` inside the row (the rest is padding).
fn edges<'a>(
    d: &'a Depthwise3,
    inner: &'a std::ops::Range<usize>,
) -> impl Iterator<Item = (usize, std::ops::Range<usize>)> + 'a {
    d.ox.clone().filter(|ox| !inner.contains(ox)).map(|ox| {
        let first = usize::from(ox * d.stride == 0);
        let end = if ox * d.stride + 1 < d.in_w { 3 } else { 2 };
        (ox, first..end)
    })
}
