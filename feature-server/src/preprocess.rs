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
    preprocess_at(bytes, limits, RESIZE_SIZE)
}

/// [`preprocess`] with the shorter side resized to `shorter_side` (at least 224) before the
/// crop: 256 is the ImageNet recipe; 224 keeps the whole shorter side in view.
pub fn preprocess_at(bytes: &[u8], limits: &Limits, shorter_side: u32) -> Result<Vec<f32>> {
    let view = View {
        shorter_side,
        mirrored: false,
    };
    let mut views = preprocess_views(bytes, limits, &[view])?;
    Ok(views.pop().unwrap_or_default())
}

/// One crop of a photo: the shorter side resized to `shorter_side`, center crop 224.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    pub shorter_side: u32,
    /// Left and right swapped: a mirrored photo shows the same thing.
    pub mirrored: bool,
}

impl View {
    pub const CENTER: View = View {
        shorter_side: RESIZE_SIZE,
        mirrored: false,
    };
}

/// The views of `taxon.v1.ViewSet::ScalesAndMirrors`: the whole shorter side and a closer
/// crop, each also mirrored. Chosen on the pets and birds evaluations (docs/evaluation.md):
/// these four beat the ImageNet crop with its mirror, and beat six views that add it.
pub const SCALES_AND_MIRRORS: [View; 4] = [
    View {
        shorter_side: 224,
        mirrored: false,
    },
    View {
        shorter_side: 224,
        mirrored: true,
    },
    View {
        shorter_side: 288,
        mirrored: false,
    },
    View {
        shorter_side: 288,
        mirrored: true,
    },
];

/// Decodes once and returns one normalized CHW tensor per view, in the order given.
pub fn preprocess_views(bytes: &[u8], limits: &Limits, views: &[View]) -> Result<Vec<Vec<f32>>> {
    let rgb = decode_rgb8(bytes, limits)?;
    let (w, h) = rgb.dimensions();
    let src = Image::from_vec_u8(w, h, rgb.into_raw(), PixelType::U8x3)
        .map_err(|e| Error::Decode(format!("decoded buffer: {e}")))?;
    let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    let mut resizer = Resizer::new();
    let mut resized: Option<(u32, Image)> = None;
    let mut out = Vec::with_capacity(views.len());
    for view in views {
        let side = view.shorter_side.max(INPUT_SIZE as u32);
        if resized.as_ref().is_none_or(|(s, _)| *s != side) {
            let (rw, rh) = resized_size_to(w, h, side);
            let mut dst = Image::new(rw, rh, PixelType::U8x3);
            resizer
                .resize(&src, &mut dst, &options)
                .map_err(|e| Error::Decode(format!("resize: {e}")))?;
            resized = Some((side, dst));
        }
        if let Some((_, dst)) = &resized {
            let (rw, rh) = (dst.width() as usize, dst.height() as usize);
            out.push(crop_normalize(dst.buffer(), rw, rh, view.mirrored));
        }
    }
    Ok(out)
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
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format()?;
    // Our own pixel check below gives the clearer error; the decoder's limits come after it.
    reader.no_limits();
    let Some(format) = reader.format() else {
        return Err(Error::UnsupportedFormat(
            "unrecognised file signature".into(),
        ));
    };
    if format == image::ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        // JPEG decoders fill a cut-off scan with grey and report success; a truncated upload
        // would then be embedded as a different picture. Refuse it instead.
        return Err(Error::Decode(format!(
            "{format:?}: truncated file (no end-of-image marker after the last scan)"
        )));
    }
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

/// Whether an end-of-image marker (FF D9) follows the last start-of-scan marker (FF DA).
/// Entropy-coded data byte-stuffs 0xFF, so neither marker can occur inside it; an EXIF
/// thumbnail's own scan and EOI come before the main image's scans and do not count.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last_scan = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    let last_end = bytes.windows(2).rposition(|w| w == [0xFF, 0xD9]);
    matches!((last_scan, last_end), (Some(scan), Some(end)) if end > scan)
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
    resized_size_to(w, h, RESIZE_SIZE)
}

fn resized_size_to(w: u32, h: u32, shorter_side: u32) -> (u32, u32) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = (f64::from(shorter_side) * f64::from(long) / f64::from(short)) as u32;
    if w <= h {
        (shorter_side, new_long)
    } else {
        (new_long, shorter_side)
    }
}

/// torchvision's `CenterCrop(224)` offset along one side: Python's `round`, halves to even.
pub fn crop_offset(size: usize) -> usize {
    ((size as f64 - INPUT_SIZE as f64) / 2.0)
        .round_ties_even()
        .max(0.0) as usize
}

/// Center crop of an interleaved RGB buffer (optionally mirrored), scaled to [0, 1] and normalized, laid out CHW.
/// The arithmetic order is torchvision's (`x / 255`, then `(x - mean) / std`, in f32).
fn crop_normalize(rgb: &[u8], w: usize, h: usize, mirrored: bool) -> Vec<f32> {
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
            let x = if mirrored { INPUT_SIZE - 1 - x } else { x };
            r[at + x] = (f32::from(px[0]) / 255.0 - MEAN[0]) / STD[0];
            g[at + x] = (f32::from(px[1]) / 255.0 - MEAN[1]) / STD[1];
            b[at + x] = (f32::from(px[2]) / 255.0 - MEAN[2]) / STD[2];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    const PHOTO: &[u8] = include_bytes!("../tests/fixtures/images/a_photo.jpg");

    #[test]
    fn sizes_follow_torchvision() {
        assert_eq!(resized_size(900, 160), (1440, 256));
        assert_eq!(resized_size(48, 40), (307, 256));
        assert_eq!(resized_size(300, 451), (256, 384));
        assert_eq!(crop_offset(257), 16); // 16.5 -> 16, not 17
        assert_eq!(crop_offset(259), 18); // 17.5 -> 18
        assert_eq!(crop_offset(256), 16);
        assert_eq!(crop_offset(225), 0); // 0.5 -> 0
    }

    #[test]
    fn good_photo_gives_a_full_tensor() {
        let t = preprocess(PHOTO, &Limits::default()).expect("fixture decodes");
        assert_eq!(t.len(), 3 * INPUT_SIZE * INPUT_SIZE);
        assert!(t.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn views_share_one_decode_and_mirror_exactly() {
        let limits = Limits::default();
        let views = preprocess_views(PHOTO, &limits, &SCALES_AND_MIRRORS).expect("views");
        assert_eq!(views.len(), 4);
        assert_eq!(views[0], preprocess_at(PHOTO, &limits, 224).expect("224"));
        assert_eq!(views[2], preprocess_at(PHOTO, &limits, 288).expect("288"));
        assert_ne!(views[0], views[2]);
        let row = INPUT_SIZE;
        for (plain, mirrored) in [(&views[0], &views[1]), (&views[2], &views[3])] {
            for (a, b) in plain.chunks_exact(row).zip(mirrored.chunks_exact(row)) {
                assert!(
                    a.iter().eq(b.iter().rev()),
                    "a row is not its mirror's reverse"
                );
            }
        }
        let center = preprocess_views(PHOTO, &limits, &[View::CENTER]).expect("center");
        assert_eq!(center[0], preprocess(PHOTO, &limits).expect("recipe"));
    }

    #[test]
    fn empty_bytes() {
        assert!(matches!(
            preprocess(&[], &Limits::default()),
            Err(Error::EmptyImage)
        ));
    }

    #[test]
    fn not_an_image() {
        let r = preprocess(
            b"hello, this is plainly not an image at all",
            &Limits::default(),
        );
        assert!(matches!(r, Err(Error::UnsupportedFormat(_))), "{r:?}");
    }

    #[test]
    fn format_not_compiled_in() {
        // A Radiance HDR signature: recognised by `image`, but not a format we enable.
        let r = preprocess(
            b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 2 +X 2\n",
            &Limits::default(),
        );
        assert!(matches!(r, Err(Error::UnsupportedFormat(_))), "{r:?}");
    }

    #[test]
    fn truncated_jpeg_is_an_error_not_a_panic() {
        for cut in [20, 200, 600] {
            let r = preprocess(&PHOTO[..cut], &Limits::default());
            assert!(matches!(r, Err(Error::Decode(_))), "cut at {cut}: {r:?}");
        }
        // Cut inside the entropy-coded data, where decoders would fill the rest with grey.
        for cut in [PHOTO.len() / 3, PHOTO.len() / 2, PHOTO.len() - 10] {
            let r = preprocess(&PHOTO[..cut], &Limits::default());
            assert!(
                matches!(&r, Err(Error::Decode(m)) if m.contains("truncated")),
                "cut at {cut}: {r:?}"
            );
        }
    }

    #[test]
    fn over_max_bytes() {
        let limits = Limits {
            max_bytes: 1000,
            ..Limits::default()
        };
        let r = preprocess(PHOTO, &limits);
        assert!(
            matches!(r, Err(Error::ImageTooLarge { limit: 1000, .. })),
            "{r:?}"
        );
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend(kind);
        out.extend(data);
        let crc = crc32(&out[start..]);
        out.extend(crc.to_be_bytes());
    }

    /// A PNG whose header claims 30000x30000 RGB (2.7 GB decoded) but carries almost no data.
    fn bomb_png() -> Vec<u8> {
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend(30_000u32.to_be_bytes());
        ihdr.extend(30_000u32.to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter, no interlace
        png_chunk(&mut png, b"IHDR", &ihdr);
        png_chunk(
            &mut png,
            b"IDAT",
            &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
        );
        png_chunk(&mut png, b"IEND", &[]);
        png
    }

    #[test]
    fn decompression_bomb_rejected_from_the_header() {
        let start = Instant::now();
        let r = preprocess(&bomb_png(), &Limits::default());
        let elapsed = start.elapsed();
        match r {
            Err(Error::TooManyPixels {
                width: 30_000,
                height: 30_000,
                pixels,
                limit,
            }) => {
                assert_eq!((pixels, limit), (900_000_000, 40_000_000));
            }
            other => panic!("expected TooManyPixels, got {other:?}"),
        }
        assert!(elapsed < Duration::from_millis(200), "took {elapsed:?}");
    }
}
