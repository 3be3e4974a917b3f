//! Nearest class mean: cosine between the centred, unit-length embedding and each class's
//! unit-length mean, softened into probabilities by a temperature.
//!
//! Centring by the tenant's mean matters for telling classes apart: raw CNN embeddings are all
//! positive (post-ReLU pooling) and share a large common component, so uncentred cosines of
//! the tenant's own classes are all close to each other.
//!
//! Open-set rejection ([`OpenSet`]) is the opposite case and does not centre: it asks whether
//! a photo is like the tenant's photos at all, and centring by a tenant's mean removes exactly
//! what its photos share (in a tenant of 100 bird species, "bird"), after which a cat is as
//! near some bird species' mean as a bird is.

use std::collections::HashMap;

use candle_core::{D, Tensor};

use super::get;
use super::train::{TrainOptions, TrainSet, one_hot};
use crate::Result;

#[derive(Clone, Debug)]
pub struct Prototype {
    /// Mean of every example of the tenant, `1 x dim`.
    pub mean: Tensor,
    /// Unit-length class means, `classes x dim`.
    pub means: Tensor,
    /// 1 / temperature.
    pub inv_temperature: f32,
    /// What open-set rejection compares with: built by [`Prototype::with_open_set`] for the
    /// tenant's live prototype; absent in a trained head's copy and in stored tensors.
    pub open: Option<OpenSet>,
}

/// The share of a tenant's own photos its cut-off is set to keep.
pub const KEEP_OWN: f64 = 0.95;

/// Open-set rejection with the tenant's own cut-off: the score of a photo is its highest
/// cosine to a class mean, both uncentred and unit-length; the cut-off is the
/// `1 - KEEP_OWN` quantile of the same score of the tenant's own photos, each measured
/// against its class's mean computed without it (leave-one-out). So the cut-off keeps about
/// 95 % of photos like the tenant's own, in a tenant of 6 classes or of 100, and adapts to
/// how spread out its classes are; one global cut-off could not (docs/evaluation.md).
#[derive(Clone, Debug)]
pub struct OpenSet {
    /// Unit-length means of each class's unit-length uncentred embeddings, `classes x dim`.
    pub means: Tensor,
    /// `None` until some class has two examples (nothing to leave one out of): the server's
    /// `--unknown-similarity` applies then.
    pub cutoff: Option<f32>,
}

impl OpenSet {
    pub fn fit(x: &Tensor, y: &[u32], classes: usize) -> Result<Self> {
        let rows = l2_normalize(x)?;
        let sums = one_hot(y, classes)?.t()?.matmul(&rows)?;
        let norms: Vec<f32> = sums.sqr()?.sum(1)?.sqrt()?.to_vec1()?;
        let mut counts = vec![0u32; classes];
        for &c in y {
            counts[c as usize] += 1;
        }
        // Each row against its own class's sum: (S - r) . r / |S - r| with |r| = 1. The
        // `n x classes` products, then each row's own column: no second `n x dim` copy.
        let index = Tensor::from_slice(y, (y.len(), 1), x.device())?;
        let dots: Vec<f32> = rows
            .matmul(&sums.t()?)?
            .gather(&index, 1)?
            .squeeze(1)?
            .to_vec1()?;
        drop(rows);
        let mut loo: Vec<f32> = y
            .iter()
            .zip(&dots)
            .filter(|(c, _)| counts[**c as usize] >= 2)
            .map(|(&c, &dot)| {
                let n = (norms[c as usize].powi(2) - 2.0 * dot + 1.0)
                    .max(1e-12)
                    .sqrt();
                (dot - 1.0) / n
            })
            .collect();
        Ok(Self {
            means: l2_normalize(&sums)?,
            cutoff: quantile(&mut loo, 1.0 - KEEP_OWN),
        })
    }

    /// The score of a batch of raw embeddings: each row's highest cosine to a class mean.
    pub fn similarity(&self, x: &Tensor) -> Result<f32> {
        Ok(l2_normalize(x)?
            .matmul(&self.means.t()?)?
            .max_all()?
            .to_scalar::<f32>()?)
    }
}

/// The `q` quantile of `v` with linear interpolation between order statistics (numpy's
/// default); `None` for no values.
pub fn quantile(v: &mut [f32], q: f64) -> Option<f32> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f32::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, frac) = (pos.floor() as usize, (pos - pos.floor()) as f32);
    let hi = (lo + 1).min(v.len() - 1);
    Some(v[lo] + (v[hi] - v[lo]) * frac)
}

/// Rows scaled to unit length.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let n = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f32::MAX)?;
    Ok(x.broadcast_div(&n)?)
}

impl Prototype {
    pub fn fit(ts: &TrainSet, opts: &TrainOptions) -> Result<Self> {
        let x = ts.x_tensor()?;
        let mean = x.mean_keepdim(0)?;
        let (means, _) = Self::class_means(&x, &mean, &ts.y, ts.classes.len())?;
        Ok(Self {
            mean,
            means,
            inv_temperature: 1.0 / opts.temperature.max(1e-3),
            open: None,
        })
    }

    /// With what open-set rejection needs ([`OpenSet`]): for the tenant's live prototype,
    /// not for the copy inside a trained head, which never rejects by it.
    pub fn with_open_set(mut self, ts: &TrainSet) -> Result<Self> {
        self.open = Some(OpenSet::fit(&ts.x_tensor()?, &ts.y, ts.classes.len())?);
        Ok(self)
    }

    /// Unit-length means of the unit-length centred rows of each class, and those rows.
    pub fn class_means(
        x: &Tensor,
        mean: &Tensor,
        y: &[u32],
        classes: usize,
    ) -> Result<(Tensor, Tensor)> {
        let rows = l2_normalize(&x.broadcast_sub(mean)?)?;
        let sums = one_hot(y, classes)?.t()?.matmul(&rows)?;
        Ok((l2_normalize(&sums)?, rows))
    }

    /// Cosines to every class mean (`n x classes`) of a batch of raw embeddings.
    pub fn cosines(&self, x: &Tensor) -> Result<Tensor> {
        let c = l2_normalize(&x.broadcast_sub(&self.mean)?)?;
        Ok(c.matmul(&self.means.t()?)?)
    }

    /// Logits of one embedding (`1 x dim`) and its cosine to the nearest mean.
    pub fn logits(&self, x: &Tensor) -> Result<(Tensor, f32)> {
        let cos = self.cosines(x)?;
        let sim = cos.max_all()?.to_scalar::<f32>()?;
        Ok(((cos * f64::from(self.inv_temperature))?, sim))
    }

    pub fn tensors(&self, out: &mut HashMap<String, Tensor>) -> Result<()> {
        out.insert("proto.mean".into(), self.mean.clone());
        out.insert("proto.means".into(), self.means.clone());
        out.insert(
            "proto.inv_temperature".into(),
            Tensor::new(&[self.inv_temperature], &candle_core::Device::Cpu)?,
        );
        Ok(())
    }

    pub fn from_tensors(t: &HashMap<String, Tensor>) -> Result<Self> {
        Ok(Self {
            mean: get(t, "proto.mean")?.clone(),
            means: get(t, "proto.means")?.clone(),
            inv_temperature: get(t, "proto.inv_temperature")?.to_vec1::<f32>()?[0],
            open: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn quantile_interpolates_like_numpy() {
        // numpy.quantile([1, 2, 3, 4, 5], 0.05) = 1.2; of [3, 1] at 0.5 = 2.0.
        assert!((quantile(&mut [5.0, 1.0, 3.0, 2.0, 4.0], 0.05).unwrap() - 1.2).abs() < 1e-6);
        assert_eq!(quantile(&mut [3.0, 1.0], 0.5), Some(2.0));
        assert_eq!(quantile(&mut [7.0], 0.05), Some(7.0));
        assert_eq!(quantile(&mut [], 0.05), None);
    }

    /// Two tight classes along two axes of three; a photo along the third axis is far below
    /// the cut-off, the tenant's own photos are above it.
    #[test]
    fn the_cut_off_keeps_own_photos_and_not_strangers() {
        let x = Tensor::new(
            &[
                [1.0f32, 0.1, 0.0],
                [1.0, 0.0, 0.1],
                [1.0, 0.05, 0.05],
                [0.1, 1.0, 0.0],
                [0.0, 1.0, 0.1],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let open = OpenSet::fit(&x, &[0, 0, 0, 1, 1], 2).unwrap();
        let cutoff = open.cutoff.unwrap();
        assert!(cutoff > 0.9 && cutoff < 1.0, "{cutoff}");
        let own = Tensor::new(&[[1.0f32, 0.02, 0.03]], &Device::Cpu).unwrap();
        assert!(open.similarity(&own).unwrap() >= cutoff);
        let stranger = Tensor::new(&[[0.1f32, 0.1, 1.0]], &Device::Cpu).unwrap();
        assert!(open.similarity(&stranger).unwrap() < 0.2);
        // One example per class: nothing to leave out, no cut-off of its own.
        let single = OpenSet::fit(&x.narrow(0, 2, 2).unwrap(), &[0, 1], 2).unwrap();
        assert_eq!(single.cutoff, None);
    }
}
