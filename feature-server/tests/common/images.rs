//! Synthetic pictures, and the hostile images of the hardening tests: every supported format
//! with extreme declared shapes (within and beyond the pixel limit), metadata bombs, unusual
//! sample formats, multi-frame files and a JPEG cut short and patched. Generated, not read
//! from disk. Shared by the feature-server's hostile matrix and the cross-service one
//! (tests/tests/hostile_e2e.rs includes this file by path), so both send the same bytes.

#![allow(dead_code)]

use std::io::Cursor;

use image::{DynamicImage, ImageFormat};

/// A deterministic RGB picture: gradients shifted by `seed`.
pub fn picture(width: u32, height: u32, seed: u32) -> image::RgbImage {
    image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([
            ((x * 7 + seed * 31) % 256) as u8,
            ((y * 5 + seed * 17) % 256) as u8,
            ((x + y + seed * 3) % 256) as u8,
        ])
    })
}

pub fn encode(img: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).expect("encode");
    out.into_inner()
}

pub fn png(width: u32, height: u32, seed: u32) -> Vec<u8> {
    encode(&picture(width, height, seed), image::ImageFormat::Png)
}

pub fn jpeg(width: u32, height: u32, seed: u32) -> Vec<u8> {
    encode(&picture(width, height, seed), image::ImageFormat::Jpeg)
}

/// What a case must get back.
#[derive(Clone, Copy, Debug)]
pub enum Expect {
    Embedding,
    /// An error whose message contains this.
    Error(&'static str),
    /// Either, as long as an embedding is finite and an error is clear.
    Either,
}

pub struct Case {
    pub name: &'static str,
    pub bytes: Vec<u8>,
    pub expect: Expect,
}

fn case(name: &'static str, bytes: Vec<u8>, expect: Expect) -> Case {
    Case {
        name,
        bytes,
        expect,
    }
}

fn encode_dynamic(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).expect("encode");
    out.into_inner()
}

fn grey(width: u32, height: u32) -> DynamicImage {
    DynamicImage::ImageLuma8(image::GrayImage::from_fn(width, height, |x, y| {
        image::Luma([((x + y) / 65_536 % 2 * 200 + 20) as u8])
    }))
}

// --- PNG by hand ------------------------------------------------------------------------------

fn crc32(bytes: &[u8]) -> u32 {
    let table: Vec<u32> = (0..256u32)
        .map(|n| {
            (0..8).fold(n, |c, _| {
                if c & 1 == 1 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                }
            })
        })
        .collect();
    !bytes.iter().fold(!0u32, |crc, &b| {
        table[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8)
    })
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 12);
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32(&out[4..]).to_be_bytes());
    out
}

/// A PNG whose header claims `width x height` (`bit_depth`, `color_type`) with almost no data.
fn png_claiming(width: u32, height: u32, bit_depth: u8, color_type: u8) -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[bit_depth, color_type, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(png_chunk(b"IHDR", &ihdr));
    out.extend(png_chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    ));
    out.extend(png_chunk(b"IEND", &[]));
    out
}

/// A real PNG with `chunk` inserted right after IHDR (before the pixels).
fn png_with_chunk(chunk: Vec<u8>) -> Vec<u8> {
    let png = encode(&picture(64, 64, 9), ImageFormat::Png);
    let ihdr_end = 8 + 4 + 4 + 13 + 4;
    let mut out = png[..ihdr_end].to_vec();
    out.extend(chunk);
    out.extend_from_slice(&png[ihdr_end..]);
    out
}

/// LSB-first bit writer for a deflate stream.
struct Bits {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits {
    fn put(&mut self, value: u32, count: u32) {
        self.acc |= u64::from(value) << self.n;
        self.n += count;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    /// A Huffman code, most significant bit first.
    fn code(&mut self, code: u32, len: u32) {
        let reversed = (0..len).fold(0, |r, i| (r << 1) | ((code >> i) & 1));
        self.put(reversed, len);
    }
}

/// A zlib stream that inflates to exactly `n` zero bytes in about `n / 1032` bytes: one
/// dynamic Huffman block in which "copy 258 bytes from distance 1" costs two bits. Both the
/// decompression bombs and the honest all-black pictures of extreme shapes are made with it.
fn zlib_zeros(n: u64) -> Vec<u8> {
    let mut b = Bits {
        out: vec![0x78, 0x01],
        acc: 0,
        n: 0,
    };
    b.put(1, 1); // final block
    b.put(2, 2); // dynamic Huffman
    b.put(29, 5); // 286 literal/length codes
    b.put(1, 5); // 2 distance codes
    b.put(14, 4); // 18 code-length codes
    // Code-length code lengths in the order RFC 1951 lists them: 18 -> 1 bit, 1 and 2 -> 2.
    let order = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1];
    for sym in order {
        let len = match sym {
            18 => 1,
            1 | 2 => 2,
            _ => 0,
        };
        b.put(len, 3);
    }
    // Canonical codes: 18 = 0, 1 = 10, 2 = 11.
    let (c18, c1, c2) = ((0, 1), (2, 2), (3, 2));
    // Literal 0 and end-of-block get 2 bits, length 258 (285) 1 bit; distances 1 and 2, 1 bit.
    b.code(c2.0, c2.1); // sym 0: 2
    b.code(c18.0, c18.1);
    b.put(138 - 11, 7); // syms 1..=138: 0
    b.code(c18.0, c18.1);
    b.put(117 - 11, 7); // syms 139..=255: 0
    b.code(c2.0, c2.1); // 256: 2
    b.code(c18.0, c18.1);
    b.put(28 - 11, 7); // 257..=284: 0
    b.code(c1.0, c1.1); // 285: 1
    b.code(c1.0, c1.1); // distance 0: 1
    b.code(c1.0, c1.1); // distance 1: 1
    // Codes: 285 = 0, literal 0 = 10, end of block = 11; distance 1 = 0.
    if n > 0 {
        b.code(2, 2); // one literal zero to copy from
        let copies = (n - 1) / 258;
        for _ in 0..copies / 16 {
            b.put(0, 32); // 16 x (length 258, distance 1)
        }
        for _ in 0..copies % 16 {
            b.put(0, 2);
        }
        for _ in 0..(n - 1) % 258 {
            b.code(2, 2);
        }
    }
    b.code(3, 2); // end of block
    b.put(0, 7);
    // Adler-32 of n zeros: a stays 1, b gains 1 a byte.
    let adler = (((n % 65_521) as u32) << 16) | 1;
    b.out.extend_from_slice(&adler.to_be_bytes());
    b.out
}

/// An all-black 8-bit grey PNG of any shape, its pixels deflated at 1032:1 (a 1 x 40,000,000
/// one is the 77 KB file).
fn black_png(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(png_chunk(b"IHDR", &ihdr));
    // Each row: filter type 0, then `width` zero pixels.
    let raw = (u64::from(width) + 1) * u64::from(height);
    out.extend(png_chunk(b"IDAT", &zlib_zeros(raw)));
    out.extend(png_chunk(b"IEND", &[]));
    out
}

// --- JPEG by hand -----------------------------------------------------------------------------

fn jpeg_segment(marker: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![0xFF, marker];
    out.extend_from_slice(&((body.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// An 8x8 baseline JPEG with `components` components (4: CMYK, with Adobe's marker) of
/// `precision` bits, every block flat: one-symbol Huffman tables, two bits a block.
fn tiny_jpeg(components: u8, precision: u8) -> Vec<u8> {
    let mut out = vec![0xFF, 0xD8];
    if components == 4 {
        out.extend(jpeg_segment(0xEE, b"Adobe\x00\x64\x00\x00\x00\x00\x00"));
    }
    let mut dqt = vec![0];
    dqt.extend([1u8; 64]);
    out.extend(jpeg_segment(0xDB, &dqt));
    let mut sof = vec![precision, 0, 8, 0, 8, components];
    for id in 1..=components {
        sof.extend([id, 0x11, 0]);
    }
    out.extend(jpeg_segment(if precision > 8 { 0xC1 } else { 0xC0 }, &sof));
    for class in [0x00, 0x10] {
        let mut dht = vec![class, 1];
        dht.extend([0u8; 15]);
        dht.push(0); // the one symbol: DC size 0 / AC end of block
        out.extend(jpeg_segment(0xC4, &dht));
    }
    let mut sos = vec![components];
    for id in 1..=components {
        sos.extend([id, 0x00]);
    }
    sos.extend([0, 63, 0]);
    out.extend(jpeg_segment(0xDA, &sos));
    out.extend([0x00, 0x00]);
    out.extend([0xFF, 0xD9]);
    out
}

/// A real JPEG with `n` APP1 segments of 64 KB after its start marker (EXIF-looking junk).
fn jpeg_with_app_segments(n: usize) -> Vec<u8> {
    let jpeg = jpeg(200, 150, 4);
    let mut out = jpeg[..2].to_vec();
    let mut body = b"Exif\0\0MM\0\x2a\0\0\0\x08\xff\xff".to_vec();
    body.resize(65_533, 0x41);
    for _ in 0..n {
        out.extend(jpeg_segment(0xE1, &body));
    }
    out.extend_from_slice(&jpeg[2..]);
    out
}

/// A JPEG cut inside its scan and patched with an end-of-image marker.
fn jpeg_cut_and_patched() -> Vec<u8> {
    let jpeg = jpeg(320, 240, 6);
    let scan = jpeg
        .windows(2)
        .rposition(|w| w == [0xFF, 0xDA])
        .expect("scan");
    let mut out = jpeg[..scan + (jpeg.len() - scan) / 2].to_vec();
    while out.last() == Some(&0xFF) {
        out.pop();
    }
    out.extend([0xFF, 0xD9]);
    out
}

// --- TIFF by hand ----------------------------------------------------------------------------

/// A little-endian TIFF of two pages: a small grey first page, then a second whose header
/// claims 65535 x 65535 with no data. Only the first page is ever decoded.
fn tiff_two_pages() -> Vec<u8> {
    let (w, h) = (64u32, 48u32);
    let pixels: Vec<u8> = (0..w * h).map(|i| (i % 251) as u8).collect();
    let ifd = |width: u32, height: u32, data_at: u32, next: u32| {
        let entries: [(u16, u16, u32); 9] = [
            (256, 4, width),
            (257, 4, height),
            (258, 3, 8),
            (259, 3, 1),
            (262, 3, 1),
            (273, 4, data_at),
            (277, 3, 1),
            (278, 4, height),
            (279, 4, width * height),
        ];
        let mut out = (entries.len() as u16).to_le_bytes().to_vec();
        for (tag, kind, value) in entries {
            out.extend(tag.to_le_bytes());
            out.extend(kind.to_le_bytes());
            out.extend(1u32.to_le_bytes());
            if kind == 3 {
                out.extend((value as u16).to_le_bytes());
                out.extend([0, 0]);
            } else {
                out.extend(value.to_le_bytes());
            }
        }
        out.extend(next.to_le_bytes());
        out
    };
    let first_ifd = 8 + pixels.len() as u32;
    let second_ifd = first_ifd + 2 + 9 * 12 + 4;
    let mut out = b"II*\0".to_vec();
    out.extend(first_ifd.to_le_bytes());
    out.extend(&pixels);
    out.extend(ifd(w, h, 8, second_ifd));
    out.extend(ifd(65_535, 65_535, 8, 0));
    out
}

// --- the rest ---------------------------------------------------------------------------------

fn gif_frames(frames: &[image::RgbaImage]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = image::codecs::gif::GifEncoder::new(&mut out);
        for f in frames {
            encoder
                .encode_frame(image::Frame::new(f.clone()))
                .expect("gif frame");
        }
    }
    out
}

fn flat_rgba(width: u32, height: u32, v: u8) -> image::RgbaImage {
    image::RgbaImage::from_fn(width, height, |x, _| {
        image::Rgba([v, if x % 2 == 0 { 0 } else { 255 }, 255 - v, 255])
    })
}

/// A GIF header claiming `width x height`, one palette, no image data.
fn gif_claiming(width: u16, height: u16) -> Vec<u8> {
    let mut out = b"GIF89a".to_vec();
    out.extend_from_slice(&width.to_le_bytes());
    out.extend_from_slice(&height.to_le_bytes());
    out.extend([0x80, 0, 0, 0, 0, 0, 255, 255, 255]);
    out.extend([0x2C, 0, 0, 0, 0]);
    out.extend_from_slice(&width.to_le_bytes());
    out.extend_from_slice(&height.to_le_bytes());
    out.extend([0, 2, 2, 0x4C, 0x01, 0, 0x3B]);
    out
}

/// A BMP header claiming `width x height` 24-bit pixels, with none of them.
fn bmp_claiming(width: i32, height: i32) -> Vec<u8> {
    let mut out = b"BM".to_vec();
    out.extend(54u32.to_le_bytes()); // file size (a lie)
    out.extend([0; 4]);
    out.extend(54u32.to_le_bytes());
    out.extend(40u32.to_le_bytes());
    out.extend(width.to_le_bytes());
    out.extend(height.to_le_bytes());
    out.extend(1u16.to_le_bytes());
    out.extend(24u16.to_le_bytes());
    out.extend([0; 24]);
    out
}

/// Every hostile case, each with what it must get back from the feature-server.
pub fn hostile_cases() -> Vec<Case> {
    let rgb = |w, h, f| encode_dynamic(&DynamicImage::ImageRgb8(picture(w, h, 2)), f);
    let first = flat_rgba(40, 30, 10);
    let mut cases = vec![
        // Extreme shapes within the 40 M pixel limit: resampled from the crop box, cheap.
        case(
            "png 1x40000000 grey",
            black_png(1, 40_000_000),
            Expect::Embedding,
        ),
        case(
            "png 40000000x1 grey",
            black_png(40_000_000, 1),
            Expect::Embedding,
        ),
        case(
            "png 6324x6324 grey",
            black_png(6324, 6324),
            Expect::Embedding,
        ),
        case(
            "png 20000x2",
            rgb(20_000, 2, ImageFormat::Png),
            Expect::Embedding,
        ),
        case(
            "tiff 2x600000 grey",
            encode_dynamic(&grey(2, 600_000), ImageFormat::Tiff),
            Expect::Embedding,
        ),
        case(
            "bmp 65535x2",
            rgb(65_535, 2, ImageFormat::Bmp),
            Expect::Embedding,
        ),
        case(
            "webp 16383x2",
            rgb(16_383, 2, ImageFormat::WebP),
            Expect::Embedding,
        ),
        case(
            "gif 65535x2",
            gif_frames(&[flat_rgba(65_535, 2, 90)]),
            Expect::Embedding,
        ),
        // Beyond the limit: refused from the header.
        case(
            "png claims 1x50000000",
            png_claiming(1, 50_000_000, 8, 2),
            Expect::Error("--max-image-pixels"),
        ),
        case(
            "png claims 30000x30000",
            png_claiming(30_000, 30_000, 8, 2),
            Expect::Error("--max-image-pixels"),
        ),
        case(
            "gif claims 65535x65535",
            gif_claiming(65_535, 65_535),
            Expect::Error("--max-image-pixels"),
        ),
        case(
            "bmp claims 65535x65535",
            bmp_claiming(65_535, 65_535),
            Expect::Error("--max-image-pixels"),
        ),
        case(
            "bmp claims 2x-2000000000",
            bmp_claiming(2, -2_000_000_000),
            Expect::Error(""),
        ),
        // Within the pixel limit, over the decode budget (16-bit RGBA: 8 bytes a pixel).
        case(
            "png claims 6000x6000 rgba16",
            png_claiming(6000, 6000, 16, 6),
            Expect::Error("--decode-budget-bytes"),
        ),
        // Metadata bombs: the decoder's allocation cap is set before it parses them.
        case(
            "png iCCP inflating to 4 GiB",
            png_with_chunk(png_chunk(
                b"iCCP",
                &[b"icc\0\0".as_slice(), &zlib_zeros(4 << 30)].concat(),
            )),
            Expect::Embedding,
        ),
        case(
            "png zTXt inflating to 1 GiB",
            png_with_chunk(png_chunk(
                b"zTXt",
                &[b"Comment\0\0".as_slice(), &zlib_zeros(1 << 30)].concat(),
            )),
            Expect::Either,
        ),
        case(
            "png iTXt inflating to 1 GiB",
            png_with_chunk(png_chunk(
                b"iTXt",
                &[b"Comment\0\x01\0\0\0".as_slice(), &zlib_zeros(1 << 30)].concat(),
            )),
            Expect::Either,
        ),
        case(
            "jpeg with 150 x 64 KB APP1",
            jpeg_with_app_segments(150),
            Expect::Embedding,
        ),
        // Unusual sample formats.
        case(
            "png 300x200 rgba16",
            encode_dynamic(
                &DynamicImage::ImageRgba16(image::ImageBuffer::from_fn(300, 200, |x, y| {
                    image::Rgba([(x * 200) as u16, (y * 300) as u16, 40_000, 65_535])
                })),
                ImageFormat::Png,
            ),
            Expect::Embedding,
        ),
        case("jpeg cmyk 8x8", tiny_jpeg(4, 8), Expect::Either),
        case("jpeg 12-bit 8x8", tiny_jpeg(3, 12), Expect::Either),
        case(
            "tiff two pages, 2nd 65535x65535",
            tiff_two_pages(),
            Expect::Embedding,
        ),
        case(
            "gif two frames",
            gif_frames(&[first.clone(), flat_rgba(40, 30, 200)]),
            Expect::Embedding,
        ),
        case(
            "jpeg cut and patched with FF D9",
            jpeg_cut_and_patched(),
            Expect::Error("truncated"),
        ),
    ];
    for c in &cases {
        assert!(
            c.bytes.len() < 20 << 20,
            "{} is {} bytes",
            c.name,
            c.bytes.len()
        );
    }
    let single_frame = gif_frames(&[first]);
    cases.push(case(
        "gif first frame alone",
        single_frame,
        Expect::Embedding,
    ));
    cases
}
