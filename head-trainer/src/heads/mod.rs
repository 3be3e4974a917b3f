//! Heads: small classifiers over cached embeddings. Pure candle, no tonic, no store, so each
//! head is tested and benchmarked on its own.
//!
//! - [`prototype`]: nearest class mean, cosine; built in microseconds, so a class is
//!   classifiable the instant its first example is cached.
//! - [`flat`]: one linear layer over the leaf classes.
//! - [`hierarchical`]: the research prototype's two-branch head.
//! - [`combined`]: nearest class mean plus a trained linear correction: NCM where there is
//!   too little data to learn from, a linear head where there is enough.
//! - [`lda`] (the default): shrinkage LDA or nearest class mean, on raw or square-rooted
//!   embeddings, whichever cross-validates best on the tenant's own photos; closed form.
//!
//! Every head starts by standardising the embedding (centre + scale, see [`Standardizer`]),
//! remembers the model identity it was trained for and refuses embeddings from another, and
//! serialises to safetensors with a JSON header ([`Head::to_bytes`]).

pub mod combined;
pub mod flat;
pub mod hierarchical;
pub mod lda;
mod lda_cv;
mod lda_loo;
mod linalg;
pub mod prototype;
mod temperature;
pub mod train;

use std::collections::HashMap;

use candle_core::{D, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};
pub use train::{TrainOptions, TrainSet};

/// The kinds of head, as named on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HeadKind {
    Prototype,
    Flat,
    Hierarchical,
    Combined,
    Lda,
}

impl HeadKind {
    pub const ALL: [HeadKind; 5] = [
        Self::Prototype,
        Self::Flat,
        Self::Hierarchical,
        Self::Combined,
        Self::Lda,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prototype => taxon_proto::head_kind::PROTOTYPE,
            Self::Flat => taxon_proto::head_kind::FLAT,
            Self::Hierarchical => taxon_proto::head_kind::HIERARCHICAL,
            Self::Combined => taxon_proto::head_kind::COMBINED,
            Self::Lda => taxon_proto::head_kind::LDA,
        }
    }

    /// Whether the head needs training (everything but the prototype).
    pub fn is_trained(self) -> bool {
        self != Self::Prototype
    }
}

impl std::str::FromStr for HeadKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown head kind `{s}` (prototype, flat, hierarchical, combined, lda)"
                ))
            })
    }
}

impl std::fmt::Display for HeadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a head is, apart from its tensors.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeadMeta {
    pub kind: String,
    pub version: u64,
    /// Example revision of the tenant the head was trained on.
    pub revision: u64,
    /// Model identity of the embeddings it was trained on.
    pub model: String,
    pub dim: usize,
    /// Leaf class ids in output order.
    pub classes: Vec<u64>,
    /// Group ids in parent-branch order.
    pub groups: Vec<u64>,
    pub class_group: Vec<usize>,
    pub examples: usize,
    pub train_ms: f64,
    pub steps: usize,
}

impl HeadMeta {
    pub fn new(kind: HeadKind, ts: &TrainSet) -> Self {
        Self {
            kind: kind.as_str().to_string(),
            version: 0,
            revision: 0,
            model: ts.model.clone(),
            dim: ts.dim,
            classes: ts.classes.clone(),
            groups: ts.groups.clone(),
            class_group: ts.class_group.clone(),
            examples: ts.len(),
            train_ms: 0.0,
            steps: 0,
        }
    }

    pub fn kind(&self) -> Result<HeadKind> {
        self.kind.parse()
    }
}

/// A head's answer for one embedding.
#[derive(Clone, Debug)]
pub struct Prediction {
    /// Probability per class of `meta.classes`.
    pub probs: Vec<f32>,
    /// The parent branch's own probabilities per `meta.groups` (hierarchical only).
    pub parent_branch: Option<Vec<f32>>,
    /// Cosine to the nearest centred class mean (prototype, combined and lda only).
    pub similarity: Option<f32>,
}

/// Centre and scale: `z = (x - mean) / scale`, with `scale` making the average centred norm
/// 10 (as the PyTorch anchor does): one scalar, because per-dimension variances estimated
/// from a handful of photos would be mostly noise.
#[derive(Clone, Debug)]
pub struct Standardizer {
    pub mean: Tensor,
    pub scale: f32,
}

impl Standardizer {
    pub const TARGET_NORM: f32 = 10.0;

    pub fn fit(x: &Tensor) -> Result<Self> {
        let mean = x.mean_keepdim(0)?;
        let norms = x.broadcast_sub(&mean)?.sqr()?.sum(1)?.sqrt()?;
        let avg = norms.mean_all()?.to_scalar::<f32>()?;
        let scale = if avg > 1e-6 {
            avg / Self::TARGET_NORM
        } else {
            1.0
        };
        Ok(Self { mean, scale })
    }

    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok((x.broadcast_sub(&self.mean)? / f64::from(self.scale))?)
    }

    /// A first layer `(w, b)` that read inputs standardized by `self`, rewritten to read inputs
    /// standardized by `new` and compute the same function of the raw embedding:
    /// `w' = w * s_new / s_old`, `b' = b + w (m_new - m_old) / s_old`.
    ///
    /// Why: every training job refits the standardizer on all of the tenant's examples (the
    /// first job may have seen one class), so a warm start must carry what the previous head
    /// learned into the new coordinates rather than reuse stale ones.
    pub fn carry_layer(
        &self,
        new: &Standardizer,
        w: &Tensor,
        b: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let shift = (new.mean.broadcast_sub(&self.mean)? / f64::from(self.scale))?; // 1 x D
        let b2 = (b + w.matmul(&shift.t()?)?.squeeze(1)?)?;
        let w2 = (w * f64::from(new.scale / self.scale))?;
        Ok((w2, b2))
    }

    fn tensors(&self, out: &mut HashMap<String, Tensor>) -> Result<()> {
        out.insert("std.mean".into(), self.mean.clone());
        out.insert(
            "std.scale".into(),
            Tensor::new(&[self.scale], &Device::Cpu)?,
        );
        Ok(())
    }

    fn from_tensors(t: &HashMap<String, Tensor>) -> Result<Self> {
        Ok(Self {
            mean: get(t, "std.mean")?.clone(),
            scale: get(t, "std.scale")?.to_vec1::<f32>()?[0],
        })
    }
}

/// The network behind a head.
#[derive(Clone, Debug)]
pub enum Net {
    Prototype(prototype::Prototype),
    Flat(flat::Flat),
    Hierarchical(hierarchical::Hierarchical),
    Combined(combined::Combined),
    Lda(lda::Lda),
}

/// A head: metadata plus network.
#[derive(Clone, Debug)]
pub struct Head {
    pub meta: HeadMeta,
    pub net: Net,
}

impl Head {
    /// Trains (or, for the prototype, builds) a head of `kind`. `previous` is the last head
    /// of the same kind: classes it knows keep their weights (warm start).
    pub fn train(
        kind: HeadKind,
        ts: &TrainSet,
        previous: Option<&Head>,
        opts: &TrainOptions,
    ) -> Result<Self> {
        if ts.is_empty() {
            return Err(Error::Precondition("no examples to train on".into()));
        }
        let started = std::time::Instant::now();
        let mut meta = HeadMeta::new(kind, ts);
        let previous = previous.filter(|p| p.meta.model == ts.model && p.meta.dim == ts.dim);
        let (net, steps) = match kind {
            HeadKind::Prototype => {
                let p = prototype::Prototype::fit(ts, opts)?.with_open_set(ts)?;
                (Net::Prototype(p), 0)
            }
            HeadKind::Flat => {
                let prev = previous.and_then(|p| match &p.net {
                    Net::Flat(f) => Some((f, &p.meta)),
                    _ => None,
                });
                let (f, steps) = flat::Flat::fit(ts, prev, opts)?;
                (Net::Flat(f), steps)
            }
            HeadKind::Hierarchical => {
                let prev = previous.and_then(|p| match &p.net {
                    Net::Hierarchical(h) => Some((h, &p.meta)),
                    _ => None,
                });
                let (h, steps) = hierarchical::Hierarchical::fit(ts, prev, opts)?;
                (Net::Hierarchical(h), steps)
            }
            HeadKind::Combined => {
                let prev = previous.and_then(|p| match &p.net {
                    Net::Combined(c) => Some((c, &p.meta)),
                    _ => None,
                });
                let (c, steps) = combined::Combined::fit(ts, prev, opts)?;
                (Net::Combined(c), steps)
            }
            // Closed form: nothing to warm-start, no steps.
            HeadKind::Lda => (Net::Lda(lda::Lda::fit(ts, opts)?), 0),
        };
        meta.steps = steps;
        meta.train_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(Self { meta, net })
    }

    pub fn kind(&self) -> HeadKind {
        match self.net {
            Net::Prototype(_) => HeadKind::Prototype,
            Net::Flat(_) => HeadKind::Flat,
            Net::Hierarchical(_) => HeadKind::Hierarchical,
            Net::Combined(_) => HeadKind::Combined,
            Net::Lda(_) => HeadKind::Lda,
        }
    }

    /// What open-set rejection compares with, when this head was built from examples (the
    /// tenant's live prototype always is; see [`prototype::OpenSet`]).
    pub fn open_set(&self) -> Option<&prototype::OpenSet> {
        match &self.net {
            Net::Prototype(p) => p.open.as_ref(),
            Net::Combined(c) => c.proto.open.as_ref(),
            Net::Lda(l) => l.proto.open.as_ref(),
            Net::Flat(_) | Net::Hierarchical(_) => None,
        }
    }

    /// Scores one embedding; refuses one from another model than the head was trained for.
    pub fn predict(&self, model: &str, x: &[f32]) -> Result<Prediction> {
        if model != self.meta.model {
            return Err(Error::ModelMismatch {
                expected: self.meta.model.clone(),
                got: model.to_string(),
            });
        }
        if x.len() != self.meta.dim {
            return Err(Error::InvalidArgument(format!(
                "embedding of length {}, head expects {}",
                x.len(),
                self.meta.dim
            )));
        }
        let x = Tensor::from_slice(x, (1, x.len()), &Device::Cpu)?;
        let row = |t: Tensor| -> Result<Vec<f32>> {
            Ok(candle_nn::ops::softmax(&t, D::Minus1)?
                .squeeze(0)?
                .to_vec1()?)
        };
        Ok(match &self.net {
            Net::Prototype(p) => {
                let (logits, sim) = p.logits(&x)?;
                Prediction {
                    probs: row(logits)?,
                    parent_branch: None,
                    similarity: Some(sim),
                }
            }
            Net::Flat(f) => Prediction {
                probs: row(f.logits(&x)?)?,
                parent_branch: None,
                similarity: None,
            },
            Net::Hierarchical(h) => {
                let (child, parent) = h.logits(&x)?;
                Prediction {
                    probs: row(child)?,
                    parent_branch: Some(row(parent)?),
                    similarity: None,
                }
            }
            Net::Combined(c) => {
                let (logits, sim) = c.logits(&x)?;
                Prediction {
                    probs: row(logits)?,
                    parent_branch: None,
                    similarity: Some(sim),
                }
            }
            Net::Lda(l) => {
                let (logits, sim) = l.logits(&x)?;
                Prediction {
                    probs: row(logits)?,
                    parent_branch: None,
                    similarity: Some(sim),
                }
            }
        })
    }

    /// The head's tensors by name (`std.mean`, `fc.weight`, ...): what [`Head::to_bytes`]
    /// stores and a tenant file carries, readable by any safetensors reader.
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut t = HashMap::new();
        match &self.net {
            Net::Prototype(p) => p.tensors(&mut t)?,
            Net::Flat(f) => f.tensors(&mut t)?,
            Net::Hierarchical(h) => h.tensors(&mut t)?,
            Net::Combined(c) => c.tensors(&mut t)?,
            Net::Lda(l) => l.tensors(&mut t)?,
        }
        Ok(t)
    }

    /// The head that `meta` and `tensors` (from [`Head::tensors`]) describe. A missing tensor
    /// is `Corrupt`; shapes that disagree with `meta` are refused by [`Head::check`].
    pub fn from_parts(meta: HeadMeta, t: &HashMap<String, Tensor>) -> Result<Self> {
        let net = match meta.kind()? {
            HeadKind::Prototype => Net::Prototype(prototype::Prototype::from_tensors(t)?),
            HeadKind::Flat => Net::Flat(flat::Flat::from_tensors(t)?),
            HeadKind::Hierarchical => {
                Net::Hierarchical(hierarchical::Hierarchical::from_tensors(t)?)
            }
            HeadKind::Combined => Net::Combined(combined::Combined::from_tensors(t)?),
            HeadKind::Lda => Net::Lda(lda::Lda::from_tensors(t)?),
        };
        Ok(Self { meta, net })
    }

    /// Scores one all-zero embedding and checks that the answer has one probability per class
    /// (and per group for the parent branch): a head assembled from outside (an imported
    /// file) whose tensors disagree with its metadata is refused here, not at the first
    /// classify.
    pub fn check(&self) -> Result<()> {
        let bad = |why: String| Error::InvalidArgument(format!("`{}` head: {why}", self.meta.kind));
        if self.meta.classes.len() != self.meta.class_group.len() {
            return Err(bad("classes and class groups differ in length".into()));
        }
        if let Some(g) = self
            .meta
            .class_group
            .iter()
            .find(|&&g| g >= self.meta.groups.len())
        {
            return Err(bad(format!(
                "class group {g} of {} groups",
                self.meta.groups.len()
            )));
        }
        let p = self
            .predict(&self.meta.model.clone(), &vec![0.0; self.meta.dim])
            .map_err(|e| bad(e.to_string()))?;
        if p.probs.len() != self.meta.classes.len() {
            return Err(bad(format!(
                "{} outputs for {} classes",
                p.probs.len(),
                self.meta.classes.len()
            )));
        }
        if let Some(parent) = &p.parent_branch
            && parent.len() != self.meta.groups.len()
        {
            return Err(bad(format!(
                "{} parent outputs for {} groups",
                parent.len(),
                self.meta.groups.len()
            )));
        }
        Ok(())
    }

    /// `u32 LE length | meta JSON | safetensors`: self-describing, and the tensors load with
    /// any safetensors reader.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let t = self.tensors()?;
        let meta = serde_json::to_vec(&self.meta)?;
        let st = safetensors::serialize(t.iter().map(|(k, v)| (k.as_str(), v)), None)?;
        let mut out = Vec::with_capacity(4 + meta.len() + st.len());
        out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        out.extend_from_slice(&meta);
        out.extend_from_slice(&st);
        Ok(out)
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let corrupt = || Error::Corrupt("head record too short".into());
        let len = u32::from_le_bytes(
            b.get(..4)
                .ok_or_else(corrupt)?
                .try_into()
                .map_err(|_| corrupt())?,
        ) as usize;
        let meta: HeadMeta = serde_json::from_slice(b.get(4..4 + len).ok_or_else(corrupt)?)?;
        let t = candle_core::safetensors::load_buffer(&b[4 + len..], &Device::Cpu)?;
        Self::from_parts(meta, &t)
    }
}

fn get<'a>(t: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a Tensor> {
    t.get(name)
        .ok_or_else(|| Error::Corrupt(format!("head has no tensor `{name}`")))
}

/// Rows of `old` (indexed by `old_ids`) copied into the rows of `fresh` whose id matches:
/// a warm start keeps what the previous head learned for classes it already knew.
fn carry_rows(fresh: &Tensor, fresh_ids: &[u64], old: &Tensor, old_ids: &[u64]) -> Result<Tensor> {
    let (_, cols) = fresh.dims2()?;
    if old.dims2()?.1 != cols {
        return Ok(fresh.clone());
    }
    let mut rows = Vec::with_capacity(fresh_ids.len());
    for (i, id) in fresh_ids.iter().enumerate() {
        match old_ids.iter().position(|o| o == id) {
            Some(j) => rows.push(old.narrow(0, j, 1)?),
            None => rows.push(fresh.narrow(0, i, 1)?),
        }
    }
    Ok(Tensor::cat(&rows, 0)?)
}

/// Same as [`carry_rows`] for a bias vector.
fn carry_bias(fresh: &Tensor, fresh_ids: &[u64], old: &Tensor, old_ids: &[u64]) -> Result<Tensor> {
    carry_rows(&fresh.unsqueeze(1)?, fresh_ids, &old.unsqueeze(1)?, old_ids)?
        .squeeze(1)
        .map_err(Into::into)
}

#[cfg(test)]
mod lda_tests;
#[cfg(test)]
mod tests;
