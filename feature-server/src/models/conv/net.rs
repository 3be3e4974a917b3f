//! A backbone as a list of NHWC steps over a few reusable buffers.
//!
//! Why: candle allocates a fresh tensor for every op and keeps NCHW; here the image batch is
//! turned to NHWC once, every layer reads one buffer and writes another that lives as long as
//! the model (grown to the largest batch seen, then reused), and only the pooled `[N, C]`
//! embeddings leave. The models build this from their folded weights at load.

use std::sync::Mutex;

use rayon::prelude::*;

use super::layer::{Conv, Shape, for_each_pixel};
use crate::models::fold::ConvBn;
use crate::models::ops::Act;

/// A buffer slot; the builder hands them out.
pub type Slot = usize;

enum Step {
    Conv {
        conv: Conv,
        input: Slot,
        output: Slot,
        residual: Option<Slot>,
        act: Act,
    },
    /// 3x3 stride 2 padding 1 max-pool of a post-ReLU input (zero padding is then exact).
    MaxPool { input: Slot, output: Slot },
}

pub struct Net {
    /// Each step with the sub-batch size it runs at (0: the whole batch).
    steps: Vec<(usize, Step)>,
    slots: usize,
    last: Slot,
    buffers: Mutex<Vec<Vec<f32>>>,
    /// `TAXON_CONV_PROFILE` set: print each step's time to stderr after every forward pass.
    profile: bool,
}

/// Builds a [`Net`]: each step names its input, and gets back its output slot.
pub struct NetBuilder {
    steps: Vec<(usize, Step)>,
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
            conv,
            input,
            output,
            residual,
            act,
        };
        self.steps.push((self.sub_batch, step));
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

    pub fn max_pool(&mut self, input: Slot) -> Slot {
        let output = self.fresh(&[input]);
        self.steps
            .push((self.sub_batch, Step::MaxPool { input, output }));
        output
    }

    /// Steps added from now on run `images` images at a time (0: the whole batch), so that
    /// the large early activations of a big batch stay in cache from one layer to the next.
    pub fn sub_batch(&mut self, images: usize) {
        self.sub_batch = images;
    }

    pub fn build(self, last: Slot) -> Net {
        Net {
            steps: self.steps,
            slots: self.slots,
            last,
            buffers: Mutex::new(Vec::new()),
            profile: std::env::var_os("TAXON_CONV_PROFILE").is_some(),
        }
    }
}

impl Net {
    /// `x`: `[n, c, h, w]` NCHW (as the server hands images) -> `[n, C]` global average pool.
    pub fn forward(&self, x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
        let mut bufs = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        bufs.resize_with(self.slots, Vec::new);
        let mut shapes = vec![Shape { n, h, w, c }; self.slots];
        grow(&mut bufs[0], n * h * w * c);
        to_nhwc(x, &mut bufs[0][..n * h * w * c], c, h * w);
        let mut times = vec![0f64; self.steps.len()];
        let mut i = 0;
        while i < self.steps.len() {
            // A run of steps with the same sub-batch size, done sub-batch by sub-batch.
            let sub = self.steps[i].0;
            let end = (i..self.steps.len())
                .find(|&j| self.steps[j].0 != sub)
                .unwrap_or(self.steps.len());
            let sub = if sub == 0 { n } else { sub.min(n) };
            for i0 in (0..n).step_by(sub.max(1)) {
                for (j, (_, step)) in self.steps[i..end].iter().enumerate() {
                    let t = self.profile.then(std::time::Instant::now);
                    run_step(step, &mut bufs, &mut shapes, i0, sub.min(n - i0));
                    if let Some(t) = t {
                        times[i + j] += t.elapsed().as_secs_f64();
                    }
                }
            }
            i = end;
        }
        if self.profile {
            self.print_profile(&times, n);
        }
        let s = shapes[self.last];
        global_average(&bufs[self.last][..s.len()], s)
    }

    fn print_profile(&self, times: &[f64], n: usize) {
        let total: f64 = times.iter().sum();
        eprintln!(
            "conv engine, batch {n}: {:.2} ms/image",
            total * 1e3 / n as f64
        );
        for ((sub, step), t) in self.steps.iter().zip(times) {
            let what = match step {
                Step::Conv { conv, .. } => conv.describe(),
                Step::MaxPool { .. } => "max-pool".into(),
            };
            eprintln!(
                "  {:6.3} ms/img {:4.1} %  sub {sub:2}  {what}",
                t * 1e3 / n as f64,
                100.0 * t / total
            );
        }
    }
}

/// One step on images `i0 .. i0 + nb` of every buffer it touches; `shapes` hold whole-batch
/// shapes and are updated for the output.
fn run_step(step: &Step, bufs: &mut [Vec<f32>], shapes: &mut [Shape], i0: usize, nb: usize) {
    let (input, output) = match step {
        Step::Conv { input, output, .. } | Step::MaxPool { input, output } => (*input, *output),
    };
    let full = shapes[input];
    let xs = Shape { n: nb, ..full };
    let os = match step {
        Step::Conv { conv, .. } => conv.out_shape(xs),
        Step::MaxPool { .. } => Shape {
            h: (xs.h - 1) / 2 + 1,
            w: (xs.w - 1) / 2 + 1,
            ..xs
        },
    };
    let (per_in, per_out) = (xs.len() / nb, os.len() / nb);
    let mut out = std::mem::take(&mut bufs[output]);
    grow(&mut out, per_out * full.n);
    let o = &mut out[i0 * per_out..(i0 + nb) * per_out];
    let x = &bufs[input][i0 * per_in..(i0 + nb) * per_in];
    match step {
        Step::Conv {
            conv,
            residual,
            act,
            ..
        } => {
            let res = residual.map(|r| &bufs[r][i0 * per_out..(i0 + nb) * per_out]);
            conv.run(x, xs, o, res, *act);
        }
        Step::MaxPool { .. } => max_pool(x, xs, o, os),
    }
    bufs[output] = out;
    shapes[output] = Shape { n: full.n, ..os };
}

fn grow(buf: &mut Vec<f32>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
}

/// `[n][c][hw]` -> `[n][hw][c]`, images in parallel.
fn to_nhwc(x: &[f32], out: &mut [f32], c: usize, hw: usize) {
    out.par_chunks_mut(c * hw)
        .zip(x.par_chunks(c * hw))
        .for_each(|(o, x)| {
            for ch in 0..c {
                for (p, &v) in x[ch * hw..(ch + 1) * hw].iter().enumerate() {
                    o[p * c + ch] = v;
                }
            }
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
