//! Nearest class mean plus a learned linear correction:
//! `logits = cos(centred x, class mean) / T + (W z + b)`, with `W`, `b` starting at zero.
//!
//! Why: on few-shot data nearest class mean beats a trained linear head (too little data to
//! fit C x D weights), while with more photos per class the linear head wins (the anchors:
//! NCM leads on pets up to k = 5, flat leads on birds from k = 3). Here the prototype term is
//! a fixed prior and the linear term only learns what the prior gets wrong: with one photo per
//! class the prior already fits the training set and the correction stays near zero (NCM);
//! with more photos it grows into a linear head. The prototype term also gives the head the
//! same open-set similarity as the prototype head.

use std::collections::HashMap;

use candle_core::{Tensor, Var};

use super::prototype::Prototype;
use super::train::{self, TrainOptions, TrainSet, balanced_ce, linear};
use super::{HeadMeta, Standardizer, carry_bias, carry_rows, get};
use crate::Result;

#[derive(Clone, Debug)]
pub struct Combined {
    pub proto: Prototype,
    pub std: Standardizer,
    pub w: Tensor,
    pub b: Tensor,
}

impl Combined {
    pub fn fit(
        ts: &TrainSet,
        previous: Option<(&Combined, &HeadMeta)>,
        opts: &TrainOptions,
    ) -> Result<(Self, usize)> {
        let x = ts.x_tensor()?;
        let proto = Prototype::fit(ts, opts)?;
        let std = Standardizer::fit(&x)?;
        let z = std.apply(&x)?;
        // The prior is fixed during training: compute it once.
        let prior = (proto.cosines(&x)? * f64::from(proto.inv_temperature))?;
        let c = ts.classes.len();
        let mut w = train::zeros((c, ts.dim))?;
        let mut b = train::zeros(c)?;
        if let Some((p, meta)) = previous {
            let (pw, pb) = p.std.carry_layer(&std, &p.w, &p.b)?;
            w = carry_rows(&w, &ts.classes, &pw, &meta.classes)?;
            b = carry_bias(&b, &ts.classes, &pb, &meta.classes)?;
        }
        let w = Var::from_tensor(&w)?;
        let b = Var::from_tensor(&b)?;
        let y = ts.y_tensor()?;
        let weights = ts.balanced_weights()?;
        let steps = train::optimise(vec![w.clone(), b.clone()], opts, || {
            balanced_ce(&(&prior + linear(&z, &w, &b)?)?, &y, &weights)
        })?;
        Ok((
            Self {
                proto,
                std,
                w: w.as_tensor().detach(),
                b: b.as_tensor().detach(),
            },
            steps,
        ))
    }

    /// Logits of one embedding and its cosine to the nearest class mean.
    pub fn logits(&self, x: &Tensor) -> Result<(Tensor, f32)> {
        let (prior, sim) = self.proto.logits(x)?;
        Ok((
            (prior + linear(&self.std.apply(x)?, &self.w, &self.b)?)?,
            sim,
        ))
    }

    pub fn tensors(&self, out: &mut HashMap<String, Tensor>) -> Result<()> {
        self.proto.tensors(out)?;
        self.std.tensors(out)?;
        out.insert("fc.weight".into(), self.w.clone());
        out.insert("fc.bias".into(), self.b.clone());
        Ok(())
    }

    pub fn from_tensors(t: &HashMap<String, Tensor>) -> Result<Self> {
        Ok(Self {
            proto: Prototype::from_tensors(t)?,
            std: Standardizer::from_tensors(t)?,
            w: get(t, "fc.weight")?.clone(),
            b: get(t, "fc.bias")?.clone(),
        })
    }
}
