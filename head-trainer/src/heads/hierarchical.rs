//! The research prototype's head, faithfully: a child branch `fc(D->512) + ReLU`; a parent
//! branch `fc(D->P)` whose output is the parent logits, then `fc(P->128) + ReLU`; the two
//! concatenated (640) and `fc(640->C)` gives the child logits. Loss: CE(child) + CE(parent),
//! plus optionally a KL term tying the children's summed probabilities to the parent branch
//! (off by default, as in the prototype).
//!
//! Parameter names follow the prototype's PyTorch module (`child_fc`, `parent_fc`,
//! `parent_proj`, `out_fc`) so weights can be compared with it.

use std::collections::HashMap;

use candle_core::{D, Tensor, Var};
use candle_nn::ops;

use super::train::{self, TrainOptions, TrainSet, balanced_ce, linear, one_hot, prototype_layer};
use super::{HeadMeta, Standardizer, carry_bias, carry_rows, get};
use crate::Result;

pub const CHILD_HIDDEN: usize = 512;
pub const PARENT_HIDDEN: usize = 128;

#[derive(Clone, Debug)]
pub struct Hierarchical {
    pub std: Standardizer,
    pub child_w: Tensor,
    pub child_b: Tensor,
    pub parent_w: Tensor,
    pub parent_b: Tensor,
    pub proj_w: Tensor,
    pub proj_b: Tensor,
    pub out_w: Tensor,
    pub out_b: Tensor,
}

struct Params<'a> {
    child_w: &'a Tensor,
    child_b: &'a Tensor,
    parent_w: &'a Tensor,
    parent_b: &'a Tensor,
    proj_w: &'a Tensor,
    proj_b: &'a Tensor,
}

/// Hidden features (`n x 640`) and parent logits.
fn trunk(z: &Tensor, p: &Params<'_>) -> Result<(Tensor, Tensor)> {
    let h1 = linear(z, p.child_w, p.child_b)?.relu()?;
    let parent = linear(z, p.parent_w, p.parent_b)?;
    let h2 = linear(&parent, p.proj_w, p.proj_b)?.relu()?;
    Ok((Tensor::cat(&[h1, h2], 1)?, parent))
}

/// Columns of `fresh` whose id matches copied from `old` (for a layer whose input is groups).
fn carry_cols(fresh: &Tensor, ids: &[u64], old: &Tensor, old_ids: &[u64]) -> Result<Tensor> {
    Ok(carry_rows(
        &fresh.t()?.contiguous()?,
        ids,
        &old.t()?.contiguous()?,
        old_ids,
    )?
    .t()?
    .contiguous()?)
}

impl Hierarchical {
    pub fn fit(
        ts: &TrainSet,
        previous: Option<(&Hierarchical, &HeadMeta)>,
        opts: &TrainOptions,
    ) -> Result<(Self, usize)> {
        let x = ts.x_tensor()?;
        let (c, p, d) = (ts.classes.len(), ts.groups.len(), ts.dim);
        let mut rng = train::rng(opts.seed);
        let std = Standardizer::fit(&x)?;
        let z = std.apply(&x)?;
        let g_labels: Vec<u32> =
            ts.y.iter()
                .map(|&y| ts.class_group[y as usize] as u32)
                .collect();

        let (mut child_w, mut child_b) = (
            train::uniform(&mut rng, CHILD_HIDDEN, d)?,
            train::zeros(CHILD_HIDDEN)?,
        );
        let (mut parent_w, mut parent_b) = prototype_layer(&z, &g_labels, p)?;
        let (mut proj_w, mut proj_b) = (
            train::uniform(&mut rng, PARENT_HIDDEN, p)?,
            train::zeros(PARENT_HIDDEN)?,
        );
        if let Some((h, meta)) = previous {
            (child_w, child_b) = h.std.carry_layer(&std, &h.child_w, &h.child_b)?;
            let (pw, pb) = h.std.carry_layer(&std, &h.parent_w, &h.parent_b)?;
            parent_w = carry_rows(&parent_w, &ts.groups, &pw, &meta.groups)?;
            parent_b = carry_bias(&parent_b, &ts.groups, &pb, &meta.groups)?;
            proj_w = carry_cols(&proj_w, &ts.groups, &h.proj_w, &meta.groups)?;
            proj_b = h.proj_b.clone();
        }
        // The output layer starts as nearest class mean over the initial hidden features.
        let (feats, _) = trunk(
            &z,
            &Params {
                child_w: &child_w,
                child_b: &child_b,
                parent_w: &parent_w,
                parent_b: &parent_b,
                proj_w: &proj_w,
                proj_b: &proj_b,
            },
        )?;
        let (mut out_w, mut out_b) = prototype_layer(&feats, &ts.y, c)?;
        if let Some((h, meta)) = previous {
            out_w = carry_rows(&out_w, &ts.classes, &h.out_w, &meta.classes)?;
            out_b = carry_bias(&out_b, &ts.classes, &h.out_b, &meta.classes)?;
        }

        let vars: Vec<Var> = [
            &child_w, &child_b, &parent_w, &parent_b, &proj_w, &proj_b, &out_w, &out_b,
        ]
        .into_iter()
        .map(Var::from_tensor)
        .collect::<candle_core::Result<_>>()?;
        let y = ts.y_tensor()?;
        let g = ts.group_labels()?;
        let weights = ts.balanced_weights()?;
        let membership = {
            let cg: Vec<u32> = ts.class_group.iter().map(|&g| g as u32).collect();
            one_hot(&cg, p)? // C x P
        };
        let steps = train::optimise(vars.clone(), opts, || {
            let v: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
            let (feats, parent) = trunk(
                &z,
                &Params {
                    child_w: v[0],
                    child_b: v[1],
                    parent_w: v[2],
                    parent_b: v[3],
                    proj_w: v[4],
                    proj_b: v[5],
                },
            )?;
            let child = linear(&feats, v[6], v[7])?;
            let mut loss =
                (balanced_ce(&child, &y, &weights)? + balanced_ce(&parent, &g, &weights)?)?;
            if opts.parent_tie > 0.0 {
                let q = ops::softmax(&child, D::Minus1)?.matmul(&membership)?;
                let log_p = ops::log_softmax(&parent, D::Minus1)?;
                let kl = (&q * ((&q + 1e-8)?.log()? - log_p)?)?.sum(1)?;
                loss = (loss + ((kl * &weights)?.sum_all()? * opts.parent_tie)?)?;
            }
            Ok(loss)
        })?;
        let t = |i: usize| vars[i].as_tensor().detach();
        Ok((
            Self {
                std,
                child_w: t(0),
                child_b: t(1),
                parent_w: t(2),
                parent_b: t(3),
                proj_w: t(4),
                proj_b: t(5),
                out_w: t(6),
                out_b: t(7),
            },
            steps,
        ))
    }

    /// Child logits and the parent branch's logits.
    pub fn logits(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let z = self.std.apply(x)?;
        let (feats, parent) = trunk(
            &z,
            &Params {
                child_w: &self.child_w,
                child_b: &self.child_b,
                parent_w: &self.parent_w,
                parent_b: &self.parent_b,
                proj_w: &self.proj_w,
                proj_b: &self.proj_b,
            },
        )?;
        Ok((linear(&feats, &self.out_w, &self.out_b)?, parent))
    }

    pub fn tensors(&self, out: &mut HashMap<String, Tensor>) -> Result<()> {
        self.std.tensors(out)?;
        for (k, v) in [
            ("child_fc.weight", &self.child_w),
            ("child_fc.bias", &self.child_b),
            ("parent_fc.weight", &self.parent_w),
            ("parent_fc.bias", &self.parent_b),
            ("parent_proj.weight", &self.proj_w),
            ("parent_proj.bias", &self.proj_b),
            ("out_fc.weight", &self.out_w),
            ("out_fc.bias", &self.out_b),
        ] {
            out.insert(k.into(), v.clone());
        }
        Ok(())
    }

    pub fn from_tensors(t: &HashMap<String, Tensor>) -> Result<Self> {
        let g = |k: &str| get(t, k).cloned();
        Ok(Self {
            std: Standardizer::from_tensors(t)?,
            child_w: g("child_fc.weight")?,
            child_b: g("child_fc.bias")?,
            parent_w: g("parent_fc.weight")?,
            parent_b: g("parent_fc.bias")?,
            proj_w: g("parent_proj.weight")?,
            proj_b: g("parent_proj.bias")?,
            out_w: g("out_fc.weight")?,
            out_b: g("out_fc.bias")?,
        })
    }
}
