//! A 224x224 8-bit crop to the model's input: scaled to [0, 1], normalized per channel, CHW.
//!
//! Each output value depends on one byte and its channel only, so the 256 possible values per
//! channel are computed once, in torchvision's arithmetic order (`x / 255`, then
//! `(x - mean) / std`, in f32), and looked up: bit for bit what computing them per pixel gives,
//! without two divisions per value. Computed per pixel this pass was most of a view's cost
//! (0.5 of 0.8 ms on a pet photo, AMD EPYC Zen 3), more than the resampling before it.

use std::sync::LazyLock;

use super::{INPUT_SIZE, MEAN, STD};
use crate::error::{Error, Result};

/// `TABLE[c][v]`: the normalized value of byte `v` in channel `c`.
static TABLE: LazyLock<[[f32; 256]; 3]> =
    LazyLock::new(|| std::array::from_fn(|c| std::array::from_fn(|v| value(c, v as u8))));

/// One byte of channel `c`, normalized as torchvision does it.
fn value(c: usize, v: u8) -> f32 {
    (f32::from(v) / 255.0 - MEAN[c]) / STD[c]
}

/// A 224x224 interleaved crop (grey, grey+alpha, RGB or RGBA; optionally mirrored) as a
/// normalized CHW tensor. Grey is spread over the three channels and alpha dropped, as PIL's
/// `convert("RGB")` does.
pub(super) fn chw(crop: &[u8], channels: usize, mirrored: bool) -> Result<Vec<f32>> {
    let plane = INPUT_SIZE * INPUT_SIZE;
    if !(1..=4).contains(&channels) || crop.len() != plane * channels {
        return Err(Error::Internal(format!(
            "crop holds {} bytes in {channels} channels, expected {} per channel",
            crop.len(),
            plane
        )));
    }
    // Built plane by plane with `extend`, not into a zeroed buffer: zeroing 600 KB a view
    // cost about as much as filling it.
    let mut out = Vec::with_capacity(3 * plane);
    match channels {
        1 => planes::<1>(crop, mirrored, &mut out),
        2 => planes::<2>(crop, mirrored, &mut out),
        3 => planes::<3>(crop, mirrored, &mut out),
        _ => planes::<4>(crop, mirrored, &mut out),
    }
    Ok(out)
}

/// The three planes of a crop with `CH` interleaved channels: a constant stride, so that the
/// loop is one load, one lookup and one store per value.
fn planes<const CH: usize>(crop: &[u8], mirrored: bool, out: &mut Vec<f32>) {
    // Grey (and grey + alpha) reads channel 0 three times; colour reads 0, 1, 2.
    let sources = if CH >= 3 { [0, 1, 2] } else { [0, 0, 0] };
    for (table, source) in TABLE.iter().zip(sources) {
        for row in crop.chunks_exact(INPUT_SIZE * CH) {
            let start = out.len();
            out.extend(
                row.chunks_exact(CH)
                    .map(|px| table[usize::from(px[source])]),
            );
            if mirrored {
                // Reversed after the fact: extending from a reversed iterator went value by
                // value, three times slower.
                out[start..].reverse();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_the_per_pixel_arithmetic_bit_for_bit() {
        for c in 0..3 {
            for v in 0..=255u8 {
                let direct = (f32::from(v) / 255.0 - MEAN[c]) / STD[c];
                assert_eq!(
                    TABLE[c][usize::from(v)].to_bits(),
                    direct.to_bits(),
                    "{c} {v}"
                );
            }
        }
    }

    #[test]
    fn layouts_and_mirroring() {
        let plane = INPUT_SIZE * INPUT_SIZE;
        // Pixel (x, y) of channel c holds (x + 3y + c) mod 256 in every layout.
        let px = |x: usize, y: usize, c: usize| ((x + 3 * y + c) % 256) as u8;
        for channels in 1..=4 {
            let crop: Vec<u8> = (0..plane * channels)
                .map(|i| {
                    let (p, c) = (i / channels, i % channels);
                    px(p % INPUT_SIZE, p / INPUT_SIZE, c)
                })
                .collect();
            let colour = |c: usize| if channels >= 3 { c } else { 0 };
            for mirrored in [false, true] {
                let out = chw(&crop, channels, mirrored).expect("crop");
                for (x, y) in [(0, 0), (5, 7), (223, 0), (100, 223)] {
                    let sx = if mirrored { INPUT_SIZE - 1 - x } else { x };
                    for c in 0..3 {
                        let got = out[c * plane + y * INPUT_SIZE + x];
                        assert_eq!(got, value(c, px(sx, y, colour(c))), "{channels} {c}");
                    }
                }
            }
        }
    }

    #[test]
    fn wrong_sizes_are_errors() {
        assert!(chw(&[0; 10], 3, false).is_err());
        assert!(chw(&vec![0; 224 * 224 * 5], 5, false).is_err());
        assert!(chw(&[], 0, false).is_err());
    }
}
