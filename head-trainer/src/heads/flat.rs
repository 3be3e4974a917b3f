//! One linear layer over the leaf classes, on standardised embeddings.
//!
//! Initialised from the class prototypes (each row the unit-length class mean), so step 0 is
//! already nearest class mean and the optimiser only refines it; a warm start copies the rows
//! of classes the previous head knew and keeps its standardiser, so those rows stay valid.

use std::collections::HashMap;

use candle_core::{Tensor, Var};

use super::train::{self, TrainOptions, TrainSet, balanced_ce, linear, prototype_layer};
use super::{HeadMeta, Standardizer, carry_bias, carry_rows, get};
use crate::Result;

#[derive(Clone, Debug)]
pub struct Flat {
    pub std: Standardizer,
    pub w: Tensor,
    pub b: Tensor,
}

impl Flat {
    pub fn fit(
        ts: &TrainSet,
        previous: Option<(&Flat, &HeadMeta)>,
        opts: &TrainOptions,
    ) -> Result<(Self, usize)> {
        let x = ts.x_tensor()?;
        let std = Standardizer::fit(&x)?;
        let z = std.apply(&x)?;
        let c = ts.classes.len();
        let (mut w, mut b) = prototype_layer(&z, &ts.y, c)?;
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
            balanced_ce(&linear(&z, &w, &b)?, &y, &weights)
        })?;
        Ok((
            Self {
                std,
                w: w.as_tensor().detach(),
                b: b.as_tensor().detach(),
            },
            steps,
        ))
    }

    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        linear(&self.std.apply(x)?, &self.w, &self.b)
    }

    pub fn tensors(&self, out: &mut HashMap<String, Tensor>) -> Result<()> {
        self.std.tensors(out)?;
        out.insert("fc.weight".into(), self.w.clone());
        out.insert("fc.bias".into(), self.b.clone());
        Ok(())
    }

    pub fn from_tensors(t: &HashMap<String, Tensor>) -> Result<Self> {
        Ok(Self {
            std: Standardizer::from_tensors(t)?,
            w: get(t, "fc.weight")?.clone(),
            b: get(t, "fc.bias")?.clone(),
        })
    }
}
