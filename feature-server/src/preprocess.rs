//! Image bytes to a normalized `3x224x224` CHW tensor: exactly torchvision's ImageNet recipe
//! (../shared/reference/README.md), because a backbone only means something on the inputs it
//! was trained with.
//!
//! 1. limits first: encoded size, then the pixel count read from the header, so a
//!    decompression bomb is refused before a single pixel is allocated;
//! 2. decode, apply the EXIF orientation, convert to 8-bit RGB (alpha dropped, like PIL's
//!    `convert("RGB")`);
//! 3. shorter side to 256 with torchvision's rounding of the long side, PIL-style bilinear with
//!    antialiasing (`fast_image_resize`'s convolution resampler: ~5x faster than `image`'s and
//!    within a fraction of a grey level of PIL);
//! 4. center crop 224 (offsets rounded half-to-even, like Python's `round`) fused with the
//!    scaling to [0, 1] and the per-channel normalization in one pass over the crop.

use std::io::Cursor;

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, ImageDecoder, ImageError, ImageReader};

use crate::error::{Error, Result};

pub const INPUT_SIZE: usize = 224;
/// The shorter side after resizing, before the center crop.
pub const RESIZE_SIZE: u32 = 256;
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// What one image may cost before it is decoded.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Encoded size.
    pub max_bytes: usize,
    /// Width x height as declared by the file header.
    pub max_pixels: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 20 * 1024 * 1024,
            max_pixels: 40_000_000,
        }
    }
}

/// Bytes -> normalized CHW f32 of length `3 * 224 * 224`. Bad input is an error, never a panic.
pub fn preprocess(bytes: &[u8], limits: &Limits) -> Result<Vec<f32>> {
    let rgb = decode_rgb8(bytes, limits)?;
    let (w, h) = rgb.dimensions();
    let (rw, rh) = resized_size(w, h);
    let src = Image::from_vec_u8(w, h, rgb.into_raw(), PixelType::U8x3)
        .map_err(|e| Error::Decode(format!("decoded buffer: {e}")))?;
    let mut dst = Image::new(rw, rh, PixelType::U8x3);
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .map_err(|e| Error::Decode(format!("resize: {e}")))?;
    Ok(crop_normalize(dst.buffer(), rw as usize, rh as usize))
}

/// Decodes to 8-bit RGB, upright, after checking the limits.
pub fn decode_rgb8(bytes: &[u8], limits: &Limits) -> Result<image::RgbImage> {
    if bytes.is_empty() {
        return Err(Error::EmptyImage);
    }
    if bytes.len() > limits.max_bytes {
        return Err(Error::ImageTooLarge {
            size: bytes.len(),
            limit: limits.max_bytes,
        });
    }
    let reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format()?;
    let Some(format) = reader.format() else {
        return Err(Error::UnsupportedFormat(
            "unrecognised file signature".into(),
        ));
    };
    let mut decoder = reader.into_decoder().map_err(|e| decode_error(e, format))?;
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(Error::TooManyPixels {
            width,
            height,
            pixels,
            limit: limits.max_pixels,
        });
    }
    if pixels == 0 {
        return Err(Error::Decode(format!("image is {width}x{height}")));
    }
    // Belt and braces: the decoder also refuses to allocate more than the pixel budget allows
    // (RGBA at 16 bits per channel, the widest it produces), whatever the header claimed.
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).max(1 << 20));
    decoder
        .set_limits(decoder_limits)
        .map_err(|e| decode_error(e, format))?;
    let orientation = decoder.orientation().map_err(|e| decode_error(e, format))?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(e, format))?;
    img.apply_orientation(orientation);
    Ok(match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.into_rgb8(),
    })
}

fn decode_error(e: ImageError, format: image::ImageFormat) -> Error {
    match e {
        ImageError::Unsupported(u) => Error::UnsupportedFormat(format!("{format:?}: {u}")),
        ImageError::Limits(l) => Error::Decode(format!("{format:?}: {l}")),
        other => Error::Decode(format!("{format:?}: {other}")),
    }
}

/// torchvision's `Resize(256)`: the shorter side becomes 256 and the longer side
/// `int(256 * long / short)` (rounded down, computed in f64 as Python does).
pub fn resized_size(w: u32, h: u32) -> (u32, u32) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = (f64::from(RESIZE_SIZE) * f64::from(long) / f64::from(short)) as u32;
    if w <= h {
        (RESIZE_SIZE, new_long)
    } else {
        (new_long, RESIZE_SIZE)
    }
}

/// torchvision's `CenterCrop(224)` offset along one side: Python's `round`, halves to even.
pub fn crop_offset(size: usize) -> usize {
    ((size as f64 - INPUT_SIZE as f64) / 2.0)
        .round_ties_even()
        .max(0.0) as usize
}

/// Center crop of an interleaved RGB buffer, scaled to [0, 1] and normalized, laid out CHW.
/// The arithmetic order is torchvision's (`x / 255`, then `(x - mean) / std`, in f32).
fn crop_normalize(rgb: &[u8], w: usize, h: usize) -> Vec<f32> {
    let (top, left) = (crop_offset(h), crop_offset(w));
    let plane = INPUT_SIZE * INPUT_SIZE;
    let mut out = vec![0f32; 3 * plane];
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for y in 0..INPUT_SIZE {
        let row_start = ((top + y) * w + left) * 3;
        let row = &rgb[row_start..row_start + INPUT_SIZE * 3];
        let at = y * INPUT_SIZE;
        for (x, px) in row.chunks_exact(3).enumerate() {
            r[at + x] = (f32::from(px[0]) / 255.0 - MEAN[0]) / STD[0];
            g[at + x] = (f32::from(px[1]) / 255.0 - MEAN[1]) / STD[1];
            b[at + x] = (f32::from(px[2]) / 255.0 - MEAN[2]) / STD[2];
        }
    }
    out
}
