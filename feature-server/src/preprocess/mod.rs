//! Image bytes to a normalized `3x224x224` CHW tensor: exactly torchvision's ImageNet recipe
//! (../shared/reference/README.md), because a backbone only means something on the inputs it
//! was trained with.
//!
//! 1. limits first: encoded size, then the header (read by a decoder that is itself limited
//!    before it parses anything: width, height and an allocation cap that also bounds metadata
//!    such as a PNG's compressed colour profile), so a decompression bomb is refused before a
//!    single pixel is allocated, and [`Header::decode_bytes`] says what decoding will cost so
//!    the engine can reserve it from a budget shared by every decode thread;
//! 2. decode (the first frame of a GIF or TIFF only), apply the EXIF orientation, keep 8-bit
//!    grey, grey+alpha, RGB or RGBA as decoded (anything wider becomes 8-bit RGB); alpha is
//!    ignored like PIL's `convert("RGB")` drops it;
//! 3. per view, torchvision's `Resize(S)` then `CenterCrop(224)` computed in *source*
//!    coordinates: the 224x224 window of the resized image is mapped back onto the source and
//!    only that box is resampled (`fast_image_resize`'s crop box, PIL-style bilinear with
//!    antialiasing, whose filter reads the source pixels around the box exactly as a full
//!    resize would). Memory per view is one 224x224 image whatever the aspect ratio: a
//!    1 x 40,000,000 PNG costs what a square photo costs, where resizing it whole would ask for
//!    terabytes;
//! 4. scaling to [0, 1] and the per-channel normalization in one pass over the crop.

mod decode;
mod jpeg;
mod normalize;

pub use decode::{
    Header, decode_rgb8, decode_with, header_bytes, read_header, read_header_deferring_walk,
};

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{ColorType, DynamicImage};

use crate::error::{Error, Result};

pub const INPUT_SIZE: usize = 224;
/// The shorter side after resizing, before the center crop.
pub const RESIZE_SIZE: u32 = 256;
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// What a decoder may allocate beyond the pixels themselves: metadata (an ICC profile, text
/// chunks, EXIF) and working buffers. A colour profile that inflates past it is dropped (we do
/// not colour-manage, like torchvision) and the image still decodes.
pub const METADATA_ALLOWANCE: u64 = 16 * 1024 * 1024;

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
    let header = read_header(bytes, limits)?;
    let img = decode_with(bytes, limits, &header)?;
    views_of(&img, views)
}

/// One normalized CHW tensor per view of a decoded image, in the order given. Each view
/// resamples only its own crop box: a view costs one 224x224 image whatever the shape.
pub fn views_of(img: &DynamicImage, views: &[View]) -> Result<Vec<Vec<f32>>> {
    let (w, h) = (img.width(), img.height());
    let (pixel_type, channels) = match img.color() {
        ColorType::L8 => (PixelType::U8, 1),
        ColorType::La8 => (PixelType::U8x2, 2),
        ColorType::Rgb8 => (PixelType::U8x3, 3),
        ColorType::Rgba8 => (PixelType::U8x4, 4),
        other => {
            return Err(Error::Internal(format!(
                "views of a {other:?} image: decode_with gives 8-bit images only"
            )));
        }
    };
    let src = ImageRef::new(w, h, img.as_bytes(), pixel_type)
        .map_err(|e| Error::Decode(format!("decoded buffer: {e}")))?;
    let mut resizer = Resizer::new();
    let mut crop: Option<(u32, Image)> = None;
    let mut out = Vec::with_capacity(views.len());
    for view in views {
        let side = view.shorter_side.max(INPUT_SIZE as u32);
        if crop.as_ref().is_none_or(|(s, _)| *s != side) {
            crop = Some((side, center_crop(&mut resizer, &src, side)?));
        }
        if let Some((_, dst)) = &crop {
            out.push(normalize::chw(dst.buffer(), channels, view.mirrored)?);
        }
    }
    Ok(out)
}

/// The 224x224 center crop of `src` resized to `shorter_side`, resampled from its box alone.
fn center_crop(
    resizer: &mut Resizer,
    src: &ImageRef<'_>,
    shorter_side: u32,
) -> Result<Image<'static>> {
    let [left, top, width, height] = crop_box(src.width(), src.height(), shorter_side);
    // Alpha is ignored, as PIL's convert("RGB") drops it: each channel is resampled on its
    // own, exactly as after the conversion.
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
        .use_alpha(false)
        .crop(left, top, width, height);
    let mut dst = Image::new(INPUT_SIZE as u32, INPUT_SIZE as u32, src.pixel_type());
    resizer
        .resize(src, &mut dst, &options)
        .map_err(|e| Error::Decode(format!("resize: {e}")))?;
    Ok(dst)
}

/// torchvision's `Resize(256)`: the shorter side becomes 256 and the longer side
/// `int(256 * long / short)` (rounded down, computed in f64 as Python does).
pub fn resized_size(w: u32, h: u32) -> (u64, u64) {
    resized_size_to(w, h, RESIZE_SIZE)
}

/// The resized size in u64: a 1 x 40,000,000 image resized to a shorter side of 288 is
/// 11.5 billion pixels long, which no u32 holds (it is never allocated, only cropped).
fn resized_size_to(w: u32, h: u32, shorter_side: u32) -> (u64, u64) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = (f64::from(shorter_side) * f64::from(long) / f64::from(short.max(1))) as u64;
    let side = u64::from(shorter_side);
    if w <= h {
        (side, new_long)
    } else {
        (new_long, side)
    }
}

/// torchvision's `CenterCrop(224)` offset along one side: Python's `round`, halves to even.
pub fn crop_offset(size: u64) -> u64 {
    ((size as f64 - INPUT_SIZE as f64) / 2.0)
        .round_ties_even()
        .max(0.0) as u64
}

/// The source-coordinate box `[left, top, width, height]` whose resampling to 224x224 is the
/// center crop of the image resized to `shorter_side`: each resized pixel `x` samples source
/// position `(x + 0.5) * w / rw`, so the crop starting at resized column `c` is the box
/// starting at `c * w / rw`, `224 * w / rw` wide.
fn crop_box(w: u32, h: u32, shorter_side: u32) -> [f64; 4] {
    let (rw, rh) = resized_size_to(w, h, shorter_side);
    let axis = |size: u32, resized: u64| {
        let scale = f64::from(size) / resized as f64;
        let start = crop_offset(resized) as f64 * scale;
        // Rounding must not push the box past the edge (the resampler refuses that).
        let length = (INPUT_SIZE as f64 * scale).min(f64::from(size) - start);
        (start, length)
    };
    let (left, width) = axis(w, rw);
    let (top, height) = axis(h, rh);
    [left, top, width, height]
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;
    use std::time::{Duration, Instant};

    use image::ImageFormat;

    use super::*;

    const PHOTO: &[u8] = include_bytes!("../../tests/fixtures/images/a_photo.jpg");

    #[test]
    fn sizes_follow_torchvision() {
        assert_eq!(resized_size(900, 160), (1440, 256));
        assert_eq!(resized_size(48, 40), (307, 256));
        assert_eq!(resized_size(300, 451), (256, 384));
        // Past u32: never allocated, only cropped.
        assert_eq!(resized_size_to(1, 40_000_000, 288), (288, 11_520_000_000));
        assert_eq!(crop_offset(257), 16); // 16.5 -> 16, not 17
        assert_eq!(crop_offset(259), 18); // 17.5 -> 18
        assert_eq!(crop_offset(256), 16);
        assert_eq!(crop_offset(225), 0); // 0.5 -> 0
    }

    /// The old way: resize the whole image, then cut the crop out.
    fn full_resize_then_crop(rgb: &image::RgbImage, side: u32) -> Vec<u8> {
        let (w, h) = rgb.dimensions();
        let (rw, rh) = resized_size_to(w, h, side);
        let (rw, rh) = (rw as u32, rh as u32);
        let src = ImageRef::new(w, h, rgb.as_raw(), PixelType::U8x3).expect("src");
        let mut dst = Image::new(rw, rh, PixelType::U8x3);
        let options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
        Resizer::new()
            .resize(&src, &mut dst, &options)
            .expect("resize");
        let (top, left) = (
            crop_offset(u64::from(rh)) as usize,
            crop_offset(u64::from(rw)) as usize,
        );
        let mut out = Vec::with_capacity(INPUT_SIZE * INPUT_SIZE * 3);
        for y in 0..INPUT_SIZE {
            let start = ((top + y) * rw as usize + left) * 3;
            out.extend_from_slice(&dst.buffer()[start..start + INPUT_SIZE * 3]);
        }
        out
    }

    #[test]
    fn crop_box_equals_full_resize_then_crop() {
        let fixtures: [&[u8]; 3] = [
            PHOTO,
            include_bytes!("../../tests/fixtures/images/f_wide.jpg"),
            include_bytes!("../../tests/fixtures/images/b_photo.jpg"),
        ];
        let shapes = [(640, 480), (480, 640), (225, 1000), (300, 224), (999, 257)];
        let mut images: Vec<image::RgbImage> = fixtures
            .iter()
            .map(|f| decode_rgb8(f, &Limits::default()).expect("fixture"))
            .collect();
        for (w, h) in shapes {
            let base = &images[0];
            images.push(image::imageops::resize(
                base,
                w,
                h,
                image::imageops::FilterType::Triangle,
            ));
        }
        let mut worst = 0u8;
        for rgb in &images {
            let (w, h) = rgb.dimensions();
            let src = ImageRef::new(w, h, rgb.as_raw(), PixelType::U8x3).expect("src");
            for side in [224, 256, 288, 320] {
                let boxed = center_crop(&mut Resizer::new(), &src, side).expect("crop");
                let full = full_resize_then_crop(rgb, side);
                let diff = boxed
                    .buffer()
                    .iter()
                    .zip(&full)
                    .map(|(a, b)| a.abs_diff(*b))
                    .max()
                    .unwrap_or(0);
                assert!(
                    diff <= 1,
                    "{w}x{h} at {side}: differs by {diff} grey levels"
                );
                worst = worst.max(diff);
            }
        }
        println!("crop box vs full resize then crop: at most {worst} grey level(s) apart");
    }

    #[test]
    fn extreme_shapes_give_a_full_finite_tensor() {
        let shapes = [
            (1, 10_000),
            (10_000, 1),
            (1, 2_000_000),
            (2_000_000, 1),
            (2, 600_000),
            (600_000, 2),
            (65_535, 2),
            (3, 3),
            (1, 1),
        ];
        for (w, h) in shapes {
            let img = DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x + y) % 256) as u8])
            }));
            let started = Instant::now();
            let views = views_of(&img, &SCALES_AND_MIRRORS).expect("views");
            assert_eq!(views.len(), 4);
            for v in &views {
                assert_eq!(v.len(), 3 * INPUT_SIZE * INPUT_SIZE, "{w}x{h}");
                assert!(v.iter().all(|x| x.is_finite()), "{w}x{h}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{w}x{h} took {:?}",
                started.elapsed()
            );
        }
        // Through the whole path too, as an encoded PNG (grey, so 1x2M stays a small file).
        let tall = image::GrayImage::from_fn(1, 2_000_000, |_, y| image::Luma([(y % 256) as u8]));
        let mut png = Cursor::new(Vec::new());
        tall.write_to(&mut png, ImageFormat::Png).expect("png");
        let views = preprocess_views(png.get_ref(), &Limits::default(), &SCALES_AND_MIRRORS)
            .expect("a 1x2000000 PNG embeds");
        assert!(views.iter().all(|v| v.len() == 3 * INPUT_SIZE * INPUT_SIZE));
    }

    #[test]
    fn grey_and_alpha_are_resampled_like_their_rgb_conversion() {
        let rgba = image::RgbaImage::from_fn(333, 250, |x, y| {
            image::Rgba([
                (x % 256) as u8,
                (y % 256) as u8,
                ((x * y) % 256) as u8,
                (x % 7) as u8 * 30,
            ])
        });
        let grey =
            image::GrayImage::from_fn(250, 333, |x, y| image::Luma([((x + 2 * y) % 256) as u8]));
        for img in [
            DynamicImage::ImageRgba8(rgba),
            DynamicImage::ImageLuma8(grey),
        ] {
            let native = views_of(&img, &SCALES_AND_MIRRORS).expect("native");
            let converted = views_of(&DynamicImage::ImageRgb8(img.to_rgb8()), &SCALES_AND_MIRRORS)
                .expect("converted");
            assert_eq!(native, converted, "{:?}", img.color());
        }
    }

    #[test]
    fn decode_cost_is_known_before_decoding() {
        let header = read_header(PHOTO, &Limits::default()).expect("header");
        let rgb = decode_rgb8(PHOTO, &Limits::default()).expect("decode");
        assert_eq!((header.width, header.height), rgb.dimensions());
        assert!(header.decode_bytes() >= header.pixels() * 3);
        assert!(
            header.decode_bytes()
                <= header.pixels() * 3 + METADATA_ALLOWANCE + header.pixels() * 12
        );
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
    fn truncated_jpeg_patched_with_an_end_marker_is_still_truncated() {
        let fixtures: [&[u8]; 5] = [
            PHOTO,
            include_bytes!("../../tests/fixtures/images/b_photo.jpg"),
            include_bytes!("../../tests/fixtures/images/c_gray.jpg"),
            include_bytes!("../../tests/fixtures/images/f_wide.jpg"),
            include_bytes!("../../tests/fixtures/images/g_exif_rot6.jpg"),
        ];
        for (i, jpeg) in fixtures.iter().enumerate() {
            assert!(
                preprocess(jpeg, &Limits::default()).is_ok(),
                "fixture {i} is whole"
            );
            let scan = jpeg
                .windows(2)
                .rposition(|w| w == [0xFF, 0xDA])
                .expect("a scan");
            for fraction in [0.1, 0.5, 0.9] {
                let cut = scan + ((jpeg.len() - scan) as f64 * fraction) as usize;
                let mut patched = jpeg[..cut].to_vec();
                // Drop a dangling 0xFF, so the patch is a clean end-of-image marker.
                while patched.last() == Some(&0xFF) {
                    patched.pop();
                }
                patched.extend_from_slice(&[0xFF, 0xD9]);
                let r = preprocess(&patched, &Limits::default());
                assert!(
                    matches!(&r, Err(Error::Decode(m)) if m.contains("truncated")),
                    "fixture {i} cut at {fraction}: {:?}",
                    r.map(|_| "embedded")
                );
                // The engine's way: the walk left to the decode, run beside the decoder.
                let r = deferred_decode(&patched);
                assert!(
                    matches!(&r, Err(Error::Decode(m)) if m.contains("scan")),
                    "fixture {i} cut at {fraction}, walk beside the decoder: {:?}",
                    r.map(|_| "decoded")
                );
            }
            let whole = deferred_decode(jpeg).expect("whole, walk beside the decoder");
            let walked_first = decode_rgb8(jpeg, &Limits::default()).expect("whole");
            assert_eq!(
                whole.to_rgb8(),
                walked_first,
                "fixture {i}: the same pixels either way"
            );
        }
    }

    fn deferred_decode(bytes: &[u8]) -> Result<DynamicImage> {
        let header = read_header_deferring_walk(bytes, &Limits::default())?;
        assert!(header.walk_pending, "a JPEG's walk is left to the decode");
        decode_with(bytes, &Limits::default(), &header)
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
