//! One output row of a depthwise convolution (NHWC), bias and clamp fused in.
//!
//! Why pixel-major with the channels in register-sized chunks: each output vector then takes
//! its k*k taps into one accumulator and is stored once. Going tap by tap over a whole output
//! row instead loads and stores the row k*k times, which made the depthwise layers cost as
//! much as the 1x1 convolutions around them. Both the plain depthwise layer and the fused
//! inverted-residual block ([`super::fused`]) run this.

/// Channels per accumulator chunk: two AVX2 vectors, one AVX-512 vector.
const CHUNK: usize = 16;

/// Largest depthwise kernel side: the tap rows of an output row fit in a fixed array, so
/// the per-row hot loop never allocates.
pub(super) const MAX_KERNEL: usize = 7;

/// The input rows under each kernel row; entries past the kernel side stay `None`.
pub(super) type Taps<'x> = [Option<&'x [f32]>; MAX_KERNEL];

/// A depthwise layer's geometry and weights.
#[derive(Clone, Copy)]
pub(super) struct DepthwiseRow<'a> {
    /// `[k*k][c]`: tap-major, channels contiguous.
    pub weights: &'a [f32],
    pub bias: &'a [f32],
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    /// Input row width in pixels.
    pub in_w: usize,
    pub channels: usize,
}

impl DepthwiseRow<'_> {
    /// Output width for this input width.
    pub fn out_w(&self) -> usize {
        (self.in_w + 2 * self.padding - self.kernel) / self.stride + 1
    }

    /// The input rows under output row `oy`: `row(iy)` is input row `iy` (of `in_h`), and rows
    /// in the padding are `None`. Shared by the plain layer and the fused block's window.
    #[inline(always)]
    pub fn taps<'x>(&self, oy: usize, in_h: usize, row: impl Fn(usize) -> &'x [f32]) -> Taps<'x> {
        let mut taps: Taps<'x> = [None; MAX_KERNEL];
        for (ky, tap) in taps.iter_mut().enumerate().take(self.kernel) {
            *tap = (oy * self.stride + ky)
                .checked_sub(self.padding)
                .filter(|&iy| iy < in_h)
                .map(&row);
        }
        taps
    }

    /// `out = clamp(bias + sum of taps [+ residual], lo, hi)` for one output row of
    /// `out_w() * channels` values; `rows[ky]` is the input row under kernel row `ky`, or
    /// `None` where that row is padding. Call inside [`super::isa::vectorized`].
    #[inline(always)]
    pub fn run(
        &self,
        taps: &Taps<'_>,
        out: &mut [f32],
        residual: Option<&[f32]>,
        bounds: (f32, f32),
    ) {
        let c = self.channels;
        let rows = &taps[..self.kernel];
        let out = &mut out[..self.out_w() * c];
        // A 3x3 with padding 1 by the SIMD kernel, every pixel, in whole vectors of channels;
        // the channels past the last vector by the portable loop.
        #[cfg(target_arch = "x86_64")]
        if let Some((done, c_vec)) = self.run_simd(rows, out, residual, bounds) {
            for (ox, o) in out.chunks_exact_mut(c).enumerate() {
                let from = if done.contains(&ox) { c_vec } else { 0 };
                if from < c {
                    self.pixel(rows, ox, from, o, residual, bounds);
                }
            }
            return;
        }
        for (ox, o) in out.chunks_exact_mut(c).enumerate() {
            self.pixel(rows, ox, 0, o, residual, bounds);
        }
    }

    /// Runs the x86 kernel where it applies; answers the output pixels it did, and the
    /// channels `0..c_vec` it did of them.
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)] // entering the kernel after checking the ISA and the geometry
    #[inline(always)]
    fn run_simd(
        &self,
        rows: &[Option<&[f32]>],
        out: &mut [f32],
        residual: Option<&[f32]>,
        (lo, hi): (f32, f32),
    ) -> Option<(std::ops::Range<usize>, usize)> {
        use super::isa::{Isa, isa};
        use super::x86::{Depthwise3, depthwise3_avx2, depthwise3_avx512};
        let fits = self.kernel == 3 && self.padding == 1 && residual.is_none();
        if !fits || isa() == Isa::Portable || self.channels < 8 || self.in_w < 3 {
            return None;
        }
        let rows: [Option<&[f32]>; 3] = [rows[0], rows[1], rows[2]];
        let row_len = self.in_w * self.channels;
        if rows.iter().flatten().any(|r| r.len() < row_len) {
            return None;
        }
        let wide = isa() == Isa::Avx512 && self.channels >= 16;
        let ox = 0..self.out_w();
        let lanes = if wide { 16 } else { 8 };
        let d = Depthwise3 {
            rows,
            weights: &self.weights[..9 * self.channels],
            bias: self.bias,
            c: self.channels,
            c_vec: self.channels / lanes * lanes,
            stride: self.stride,
            in_w: self.in_w,
            ox: ox.clone(),
            lo,
            hi,
        };
        // SAFETY: the ISA was detected (AVX-512F for `wide`, else AVX2 and FMA: any ISA but
        // portable); the rows hold whole input rows of `in_w >= 3` pixels, `ox` is the whole
        // output row of this 3x3, padding 1 convolution, and `out` holds it.
        unsafe {
            if wide {
                depthwise3_avx512(&d, out);
            } else {
                depthwise3_avx2(&d, out);
            }
        }
        Some((ox, d.c_vec))
    }

    /// Channels `from..` of output pixel `ox`.
    #[inline(always)]
    fn pixel(
        &self,
        rows: &[Option<&[f32]>],
        ox: usize,
        from: usize,
        o: &mut [f32],
        residual: Option<&[f32]>,
        (lo, hi): (f32, f32),
    ) {
        let (k, s, p, c) = (self.kernel, self.stride, self.padding, self.channels);
        // Kernel columns kx whose input column ox*s + kx - p lies inside the row.
        let first = p.saturating_sub(ox * s);
        let end = (self.in_w + p).saturating_sub(ox * s).min(k);
        let ix0 = ox * s + first - p;
        let res = residual.map(|r| &r[ox * c..][..c]);
        let mut c0 = from;
        while c0 + CHUNK <= c {
            let mut acc = [0f32; CHUNK];
            acc.copy_from_slice(&self.bias[c0..c0 + CHUNK]);
            for (ky, row) in rows.iter().enumerate() {
                let Some(row) = row else { continue };
                for kx in first..end {
                    let x = &row[(ix0 + kx - first) * c + c0..][..CHUNK];
                    let w = &self.weights[(ky * k + kx) * c + c0..][..CHUNK];
                    for ((a, x), w) in acc.iter_mut().zip(x).zip(w) {
                        *a += x * w;
                    }
                }
            }
            let o = &mut o[c0..c0 + CHUNK];
            store(o, &acc, res.map(|r| &r[c0..c0 + CHUNK]), lo, hi);
            c0 += CHUNK;
        }
        // Channels past the last whole chunk, one by one.
        for ch in c0..c {
            let mut acc = self.bias[ch];
            for (ky, row) in rows.iter().enumerate() {
                let Some(row) = row else { continue };
                for kx in first..end {
                    acc += row[(ix0 + kx - first) * c + ch] * self.weights[(ky * k + kx) * c + ch];
                }
            }
            let r = res.map_or(0.0, |r| r[ch]);
            o[ch] = (acc + r).clamp(lo, hi);
        }
    }
}

#[inline(always)]
fn store(o: &mut [f32], acc: &[f32], residual: Option<&[f32]>, lo: f32, hi: f32) {
    match residual {
        Some(r) => {
            for ((o, a), r) in o.iter_mut().zip(acc).zip(r) {
                *o = (a + r).clamp(lo, hi);
            }
        }
        None => {
            for (o, a) in o.iter_mut().zip(acc) {
                *o = a.clamp(lo, hi);
            }
        }
    }
}
