//! FORMULA WEIGHTS (../shared/reference/README.md): deterministic pseudo-random weights that any
//! language regenerates bit for bit from a tensor's name, so parity tests against PyTorch need
//! no 45 MB file, and other crates' tests get a real (if meaningless) backbone for free.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::models::BackboneKind;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const LCG_MUL: u64 = 6_364_136_223_846_793_005;
const LCG_ADD: u64 = 1_442_695_040_888_963_407;

/// FNV-1a-64 of the name's UTF-8 bytes: the generator's seed.
fn fnv1a64(name: &str) -> u64 {
    name.bytes().fold(FNV_OFFSET, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// The values of one tensor, row-major, exactly as the reference defines them.
pub fn values(name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let fan_in: usize = shape.iter().skip(1).product();
    let weight_scale = (6.0 / fan_in as f64).sqrt();
    let map: fn(f64, f64) -> f64 = if name.ends_with("running_var") {
        |v, _| 1.0 + 0.25 * v
    } else if name.ends_with("running_mean") || name.ends_with(".bias") {
        |v, _| 0.1 * v
    } else if shape.len() == 1 {
        |v, _| 1.0 + 0.1 * v
    } else {
        |v, scale| v * scale
    };
    let mut state = fnv1a64(name);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(LCG_MUL).wrapping_add(LCG_ADD);
            let v = 2.0 * ((state >> 40) as f64 / (1u64 << 24) as f64) - 1.0;
            map(v, weight_scale) as f32
        })
        .collect()
}

/// Every tensor of the backbone's torchvision `state_dict()` (ResNet18 including `fc`;
/// MobileNetV2's `features.*`), without `num_batches_tracked`, on the CPU.
pub fn tensors(kind: BackboneKind) -> HashMap<String, Tensor> {
    kind.state_dict_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let data = values(&name, &shape);
            // The shape is built from the same numbers as the data, so this cannot fail.
            let t = Tensor::from_vec(data, shape, &Device::Cpu)
                .expect("formula tensor shape matches its data");
            (name, t)
        })
        .collect()
}

/// Writes the formula weights as `.safetensors` (atomically), for tests in other crates.
pub fn write_safetensors(kind: BackboneKind, path: &Path) -> Result<()> {
    crate::weights::save_safetensors_atomic(&tensors(kind), path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_the_published_test_vector() {
        // FNV-1a-64("a") from the FNV reference test suite.
        assert_eq!(fnv1a64("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(""), FNV_OFFSET);
    }
}
