//! A backbone as a list of NHWC steps over a few reusable buffers.
//!
//! Why: candle allocates a fresh tensor for every op and keeps NCHW; here the image batch is
//! turned to NHWC once, every layer reads one buffer and writes another that lives as long as
//! the model (grown to the largest batch seen, then reused), and only the pooled `[N, C]`
//! embeddings leave. The models build this from their folded weights at load.

use std::sync::Mutex;

use rayon::prelude::*;

use super::fused::FusedBlock;
use super::layer::{Conv, Shape, for_each_pixel};
use crate::models::fold::ConvBn;
use crate::models::ops::Act;

/// A buffer slot; the builder hands them out.
pub type Slot = usize;

enum Step {
    Conv {
        conv: Box<Conv>,
        input: Slot,
        output: Slot,
        residual: Option<Slot>,
        act: Act,
    },
    /// 3x3 stride 2 padding 1 max-pool of a post-ReLU input (zero padding is then exact).
    MaxPool { input: Slot, output: Slot },
    /// A whole inverted-residual block, its expanded tensor kept in cache (see [`super::fused`]).
    Block {
        block: Box<FusedBlock>,
        input: Slot,
        output: Slot,
    },
}

pub struct Net {
    steps: Vec<Step>,
    /// Images per pass through the steps (0: the whole batch at once).
    sub_batch: usize,
    slots: usize,
    last: Slot,
    buffers: Mutex<Vec<Vec<f32>>>,
    /// `TAXON_CONV_PROFILE` set: print each step's time to stderr after every forward pass.
    profile: bool,
}

/// Builds a [`Net`]: each step names its input, and gets back its output slot.
pub struct NetBuilder {
    steps: Vec<Step>,
    slots: usize,
    sub_batch: usize,
}

impl Default for NetBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl NetBuilder {
    /// Slot 0 holds the NHWC input image batch.
    pub fn new() -> Self {
        Self {
            steps: Vec::new(),
            slots: 1,
            sub_batch: 0,
        }
    }

    pub const INPUT: Slot = 0;

    /// A slot not in `live` (those still needed later), reusing freed ones.
    fn fresh(&mut self, live: &[Slot]) -> Slot {
        let s = (0..).find(|s| !live.contains(s)).unwrap_or(self.slots);
        self.slots = self.slots.max(s + 1);
        s
    }

    /// `act(conv(input) [+ residual])`; `live` are slots whose contents later steps still read.
    pub fn conv(
        &mut self,
        conv: Conv,
        input: Slot,
        residual: Option<Slot>,
        act: Act,
        live: &[Slot],
    ) -> Slot {
        let mut busy = live.to_vec();
        busy.push(input);
        busy.extend(residual);
        let output = self.fresh(&busy);
        let step = Step::Conv {
            conv: Box::new(conv),
            input,
            output,
            residual,
            act,
        };
        self.steps.push(step);
        output
    }

    /// [`Self::conv`] for a folded [`ConvBn`] (see [`super::from_conv_bn`]).
    pub fn conv_bn(
        &mut self,
        cb: &ConvBn,
        winograd: bool,
        (input, residual): (Slot, Option<Slot>),
        act: Act,
        live: &[Slot],
    ) -> candle_core::Result<Slot> {
        let conv = super::from_conv_bn(cb, winograd)?;
        Ok(self.conv(conv, input, residual, act, live))
    }

    /// An inverted-residual block as one step; `live` as in [`Self::conv`].
    pub fn inverted_residual(&mut self, block: FusedBlock, input: Slot, live: &[Slot]) -> Slot {
        let mut busy = live.to_vec();
        busy.push(input);
        let output = self.fresh(&busy);
        self.steps.push(Step::Block {
            block: Box::new(block),
            input,
            output,
        });
        output
    }

    pub fn max_pool(&mut self, input: Slot) -> Slot {
        let output = self.fresh(&[input]);
        self.steps.push(Step::MaxPool { input, output });
        output
    }

    /// Run the network on at most `images` images at a time (0: the whole batch): where the
    /// weights are small and the activations large (MobileNetV2), a big batch only pushes
    /// every layer's activations out of cache without saving any weight traffic.
    pub fn sub_batch(&mut self, images: usize) {
        self.sub_batch = images;
    }

    pub fn build(self, last: Slot) -> Net {
        Net {
            steps: self.steps,
            slots: self.slots,
            last,
            sub_batch: self.sub_batch,
            buffers: Mutex::new(Vec::new()),
            profile: std::env::var_os("TAXON_CONV_PROFILE").is_some(),
        }
    }
}

impl Net {
    /// `x`: `[n, c, h, w]` NCHW (as the server hands images) -> `[n, C]` global average pool.
    ///
    /// The whole pass runs on one of rayon's workers, not on the calling thread. Why: every
    /// step is a parallel loop, and a loop started from outside the pool parks its caller on a
    /// latch until the pool is done, then wakes it (a futex round trip through the scheduler)
    /// before the next step can start; MobileNetV2 at batch 1 is some 40 such short loops.
    /// From inside the pool the caller works on the loop itself and goes straight on.
    pub fn forward(&self, x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
        // Locked here, outside the pool: a worker waiting on this lock could be the one whose
        // pass holds it (rayon lets a waiting worker pick up other queued work), a deadlock.
        let mut bufs = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        let bufs: &mut Vec<Vec<f32>> = &mut bufs;
        rayon::scope(|_| {
            let per_image = c * h * w;
            let chunk = if self.sub_batch == 0 {
                n
            } else {
                self.sub_batch.min(n)
            }
            .max(1);
            let mut out = Vec::new();
            for i0 in (0..n).step_by(chunk) {
                let nb = chunk.min(n - i0);
                let x = &x[i0 * per_image..(i0 + nb) * per_image];
                out.extend(self.forward_chunk(bufs, x, Shape { n: nb, h, w, c }));
            }
            out
        })
    }

    fn forward_chunk(&self, bufs: &mut Vec<Vec<f32>>, x: &[f32], xs: Shape) -> Vec<f32> {
        bufs.resize_with(self.slots, Vec::new);
        let mut shapes = vec![xs; self.slots];
        grow(&mut bufs[0], xs.len());
        // Timed as steps of their own: at batch 1 they are a few percent of MobileNetV2.
        let timer = self.profile.then(std::time::Instant::now);
        to_nhwc(x, &mut bufs[0][..xs.len()], xs.c, xs.h * xs.w);
        let transpose = timer.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let mut times = vec![0f64; self.steps.len()];
        for (step, time) in self.steps.iter().zip(&mut times) {
            let t = self.profile.then(std::time::Instant::now);
            run_step(step, bufs, &mut shapes);
            if let Some(t) = t {
                *time = t.elapsed().as_secs_f64();
            }
        }
        let s = shapes[self.last];
        let timer = self.profile.then(std::time::Instant::now);
        let pooled = global_average(&bufs[self.last][..s.len()], s);
        if let Some(t) = timer {
            self.print_profile(transpose, &times, t.elapsed().as_secs_f64(), xs.n);
        }
        pooled
    }

    fn print_profile(&self, transpose: f64, times: &[f64], pool: f64, n: usize) {
        let total = transpose + times.iter().sum::<f64>() + pool;
        eprintln!(
            "conv engine, batch {n}: {:.2} ms/image",
            total * 1e3 / n as f64
        );
        let steps = self.steps.iter().map(|step| match step {
            Step::Conv { conv, .. } => conv.describe(),
            Step::MaxPool { .. } => "max-pool".into(),
            Step::Block { block, .. } => block.describe(),
        });
        let named = std::iter::once(("input NCHW -> NHWC".to_string(), transpose))
            .chain(steps.zip(times.iter().copied()))
            .chain(std::iter::once(("global average pool".to_string(), pool)));
        for (what, t) in named {
            let (ms, pct) = (t * 1e3 / n as f64, 100.0 * t / total);
            eprintln!("  {ms:6.3} ms/img {pct:4.1} %  {what}");
        }
    }
}

/// One step: reads its input (and residual) buffer, writes its output buffer and shape.
fn run_step(step: &Step, bufs: &mut [Vec<f32>], shapes: &mut [Shape]) {
    let (input, output) = match step {
        Step::Conv { input, output, .. }
        | Step::MaxPool { input, output }
        | Step::Block { input, output, .. } => (*input, *output),
    };
    let xs = shapes[input];
    let os = match step {
        Step::Conv { conv, .. } => conv.out_shape(xs),
        Step::MaxPool { .. } => Shape {
            h: (xs.h - 1) / 2 + 1,
            w: (xs.w - 1) / 2 + 1,
            ..xs
        },
        Step::Block { block, .. } => block.out_shape(xs),
    };
    let mut out = std::mem::take(&mut bufs[output]);
    grow(&mut out, os.len());
    let o = &mut out[..os.len()];
    let x = &bufs[input][..xs.len()];
    match step {
        Step::Conv {
            conv,
            residual,
            act,
            ..
        } => conv.run(x, xs, o, residual.map(|r| &bufs[r][..os.len()]), *act),
        Step::MaxPool { .. } => max_pool(x, xs, o, os),
        Step::Block { block, .. } => block.run(x, xs, o),
    }
    bufs[output] = out;
    shapes[output] = os;
}

fn grow(buf: &mut Vec<f32>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
}

/// `[n][c][hw]` -> `[n][hw][c]`, images in parallel.
fn to_nhwc(x: &[f32], out: &mut [f32], c: usize, hw: usize) {
    // Pixel-major, each output pixel written once, in chunks that every thread shares even at
    // batch 1: channel by channel over whole images, one image per thread, this was 0.2 ms of
    // MobileNetV2's 5.3 at batch 1 on a 2-core Zen 3 (`scripts/conv-profile.sh 1`).
    const PIXELS: usize = 2048;
    out.par_chunks_mut(c * hw)
        .zip(x.par_chunks(c * hw))
        .for_each(|(o, x)| {
            o.par_chunks_mut(PIXELS * c).enumerate().for_each(|(i, o)| {
                let first = i * PIXELS;
                for (p, px) in o.chunks_exact_mut(c).enumerate() {
                    for (ch, v) in px.iter_mut().enumerate() {
                        *v = x[ch * hw + first + p];
                    }
                }
            });
        });
}

fn max_pool(x: &[f32], xs: Shape, out: &mut [f32], os: Shape) {
    let c = xs.c;
    for_each_pixel(out, os, |b, oy, ox, o| {
        o.fill(0.0);
        for iy in (2 * oy).saturating_sub(1)..(2 * oy + 2).min(xs.h) {
            for ix in (2 * ox).saturating_sub(1)..(2 * ox + 2).min(xs.w) {
                let p = &x[((b * xs.h + iy) * xs.w + ix) * c..][..c];
                o.iter_mut().zip(p).for_each(|(o, &v)| *o = o.max(v));
            }
        }
    });
}

fn global_average(x: &[f32], s: Shape) -> Vec<f32> {
    let hw = s.h * s.w;
    let mut out = vec![0f32; s.n * s.c];
    out.par_chunks_mut(s.c).enumerate().for_each(|(b, o)| {
        let mut acc = vec![0f64; s.c];
        for p in 0..hw {
            let px = &x[(b * hw + p) * s.c..][..s.c];
            acc.iter_mut()
                .zip(px)
                .for_each(|(a, &v)| *a += f64::from(v));
        }
        o.iter_mut()
            .zip(&acc)
            .for_each(|(o, a)| *o = (a / hw as f64) as f32);
    });
    out
}
