//! Nearest class mean: cosine between the centred, unit-length embedding and each class's
//! unit-length mean, softened into probabilities by a temperature.
//!
//! Centring by the tenant's mean matters: raw CNN embeddings are all positive (post-ReLU
//! pooling) and share a large common component, so uncentred cosines are all close to 1. The
//! cosine to the nearest mean is also what open-set rejection looks at.

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
        })
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
        })
    }
}
