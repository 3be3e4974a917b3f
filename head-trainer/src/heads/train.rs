//! What every trained head shares: the training set, the options, seeded initialisation, the
//! class-balanced loss and the AdamW loop with early stopping.
//!
//! Training is full-batch for the sizes a person enrolls by hand (hundreds to a few thousand
//! examples): one large matmul per step beats many small ones on two cores, and it allocates a
//! handful of big buffers per step instead of thousands of small ones (glibc returning freed
//! buffers to the kernel every step is a measurable cost in candle).

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, ops};
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::Result;

/// Examples ready for training: embeddings, leaf labels and the leaf -> group (parent) map.
#[derive(Clone, Debug)]
pub struct TrainSet {
    /// Model identity the embeddings come from.
    pub model: String,
    pub dim: usize,
    /// Row-major `n x dim`.
    pub x: Vec<f32>,
    /// Index into `classes` per row.
    pub y: Vec<u32>,
    /// Leaf class ids, the output order of every head.
    pub classes: Vec<u64>,
    /// Group ids (a leaf's parent, or the leaf itself when top-level), the parent-branch order.
    pub groups: Vec<u64>,
    /// Index into `groups` per class.
    pub class_group: Vec<usize>,
}

impl TrainSet {
    /// Builds a set from (class id, embedding) rows; `group_of` maps a leaf to its group.
    pub fn new(
        model: &str,
        rows: &[(u64, Vec<f32>)],
        group_of: impl Fn(u64) -> u64,
    ) -> Result<Self> {
        let dim = rows.first().map(|r| r.1.len()).unwrap_or(0);
        let mut classes: Vec<u64> = rows.iter().map(|r| r.0).collect();
        classes.sort_unstable();
        classes.dedup();
        let mut groups: Vec<u64> = classes.iter().map(|&c| group_of(c)).collect();
        groups.sort_unstable();
        groups.dedup();
        let class_group = classes
            .iter()
            .map(|&c| groups.binary_search(&group_of(c)).unwrap_or(0))
            .collect();
        let mut x = Vec::with_capacity(rows.len() * dim);
        let mut y = Vec::with_capacity(rows.len());
        for (c, v) in rows {
            if v.len() != dim {
                return Err(crate::Error::Corrupt(format!(
                    "embedding of length {} among length {dim}",
                    v.len()
                )));
            }
            x.extend_from_slice(v);
            y.push(classes.binary_search(c).unwrap_or(0) as u32);
        }
        Ok(Self {
            model: model.to_string(),
            dim,
            x,
            y,
            classes,
            groups,
            class_group,
        })
    }

    pub fn len(&self) -> usize {
        self.y.len()
    }

    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// The embeddings as an `n x dim` tensor.
    pub fn x_tensor(&self) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.x,
            (self.len(), self.dim),
            &Device::Cpu,
        )?)
    }

    pub fn y_tensor(&self) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.y, self.len(), &Device::Cpu)?)
    }

    /// Group label per row.
    pub fn group_labels(&self) -> Result<Tensor> {
        let g: Vec<u32> = self
            .y
            .iter()
            .map(|&y| self.class_group[y as usize] as u32)
            .collect();
        Ok(Tensor::from_slice(&g, self.len(), &Device::Cpu)?)
    }

    /// Per-row weights `1 / examples of its class`, normalised to sum to 1: every class counts
    /// the same in the loss however many photos it has.
    pub fn balanced_weights(&self) -> Result<Tensor> {
        let mut counts = vec![0f32; self.classes.len()];
        for &y in &self.y {
            counts[y as usize] += 1.0;
        }
        let k = counts.iter().filter(|&&c| c > 0.0).count() as f32;
        let w: Vec<f32> = self
            .y
            .iter()
            .map(|&y| 1.0 / (counts[y as usize] * k))
            .collect();
        Ok(Tensor::from_slice(&w, self.len(), &Device::Cpu)?)
    }
}

/// Knobs of training. Defaults chosen on pets k-shot (MobileNetV2, 8 seeds, `cargo bench -p
/// taxon-tests --bench enroll`): with temperature 0.05 and lr 3e-3 the combined head scored
/// 64.6/81.4/85.2/90.2 % at k = 1/3/5/8, prototype 64.6/81.0/85.1/88.5, flat 61.9/79.2/83.3/88.0.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Seeds initialisation, so the same examples give the same head.
    pub seed: u64,
    pub max_steps: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Stop once the loss improved by less than this fraction over `patience` steps.
    pub min_improvement: f64,
    pub patience: usize,
    /// Stop once the loss is below this. Kept tiny: the heads start as nearest class mean,
    /// whose loss on well-separated data is already small, and stopping there would make
    /// `flat` a copy of `prototype` instead of a trained linear head.
    pub min_loss: f64,
    /// Weight of the term tying the hierarchical head's child probabilities to its parent
    /// branch (KL); 0 turns it off, as in the research prototype.
    pub parent_tie: f64,
    /// Temperature of the prototype's cosine similarities.
    pub temperature: f32,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            max_steps: 100,
            lr: 3e-3,
            weight_decay: 1e-4,
            min_improvement: 0.01,
            patience: 10,
            min_loss: 1e-3,
            parent_tie: 0.0,
            temperature: 0.05,
        }
    }
}

/// Class-balanced cross-entropy: `-(sum_i w_i log p_i[y_i])`, `w` summing to 1.
pub fn balanced_ce(logits: &Tensor, y: &Tensor, w: &Tensor) -> Result<Tensor> {
    let logp = ops::log_softmax(logits, D::Minus1)?;
    let picked = logp.gather(&y.unsqueeze(1)?, 1)?.squeeze(1)?;
    Ok((picked * w)?.sum_all()?.neg()?)
}

/// Runs AdamW on `loss()` until it converges or `max_steps`; returns the steps taken.
pub fn optimise(
    vars: Vec<Var>,
    opts: &TrainOptions,
    mut loss: impl FnMut() -> Result<Tensor>,
) -> Result<usize> {
    let params = ParamsAdamW {
        lr: opts.lr,
        weight_decay: opts.weight_decay,
        ..ParamsAdamW::default()
    };
    let mut adam = AdamW::new(vars, params)?;
    let mut history: Vec<f64> = Vec::with_capacity(opts.max_steps);
    for step in 0..opts.max_steps {
        let l = loss()?;
        let value = f64::from(l.to_scalar::<f32>()?);
        if value < opts.min_loss {
            return Ok(step);
        }
        if history.len() >= opts.patience {
            let before = history[history.len() - opts.patience];
            if before - value < opts.min_improvement * before {
                return Ok(step);
            }
        }
        history.push(value);
        adam.backward_step(&l)?;
    }
    Ok(opts.max_steps)
}

/// Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) weights from a seeded generator: PyTorch's
/// `nn.Linear` default, but reproducible across runs and machines.
pub fn uniform(rng: &mut StdRng, out: usize, fan_in: usize) -> Result<Tensor> {
    let bound = 1.0 / (fan_in as f32).sqrt();
    let v: Vec<f32> = (0..out * fan_in)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    Ok(Tensor::from_vec(v, (out, fan_in), &Device::Cpu)?)
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// A linear layer that starts out as nearest class mean over `features`: each row is the
/// unit-length mean of its class's centred rows, scaled so that logits have the magnitude of
/// 10 x cosine, and the bias cancels the offset of the uncentred features.
pub fn prototype_layer(features: &Tensor, y: &[u32], classes: usize) -> Result<(Tensor, Tensor)> {
    let mean = features.mean_keepdim(0)?;
    let centred = features.broadcast_sub(&mean)?;
    let avg_norm = centred
        .sqr()?
        .sum(1)?
        .sqrt()?
        .mean_all()?
        .to_scalar::<f32>()?;
    let scale = if avg_norm > 1e-6 {
        10.0 / avg_norm
    } else {
        1.0
    };
    let sums = one_hot(y, classes)?.t()?.matmul(&centred)?; // C x h
    let norms = sums.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-6, f32::MAX)?;
    let w = (sums.broadcast_div(&norms)? * f64::from(scale))?;
    let b = w.matmul(&mean.t()?)?.squeeze(1)?.neg()?;
    Ok((w, b))
}

/// Per class, the sum of its rows of `x` (`n x dim`): `classes x dim`. Added row by row,
/// not as one-hot^T x, whose `n x classes` matrix alone is 80 MB for a tenant at the
/// examples quota with a thousand classes. (The heads still use the one-hot product: moving
/// them changes float rounding under the committed evaluation, so it waits for a re-run.)
pub fn class_sums(x: &Tensor, y: &[u32], classes: usize) -> Result<Tensor> {
    let dim = x.dim(1)?;
    let index = Tensor::from_slice(y, y.len(), x.device())?;
    Ok(Tensor::zeros((classes, dim), x.dtype(), x.device())?.index_add(&index, x, 0)?)
}

/// `n x classes` one-hot matrix of labels.
pub fn one_hot(y: &[u32], classes: usize) -> Result<Tensor> {
    let mut m = vec![0f32; y.len() * classes];
    for (i, &c) in y.iter().enumerate() {
        m[i * classes + c as usize] = 1.0;
    }
    Ok(Tensor::from_vec(m, (y.len(), classes), &Device::Cpu)?)
}

/// `x W^T + b`.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.t()?)?.broadcast_add(b)?)
}

pub fn zeros(shape: impl Into<candle_core::Shape>) -> Result<Tensor> {
    Ok(Tensor::zeros(shape, DType::F32, &Device::Cpu)?)
}
