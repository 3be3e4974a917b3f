//! What the JPEG decoder does not tell us: whether the file was cut short.
//!
//! JPEG decoders (zune-jpeg here, libjpeg under PIL) fill a scan that ends early with grey and
//! report success, so a truncated upload would be embedded as a different picture. Two checks,
//! from the cheapest:
//! 1. an end-of-image marker (FF D9) must follow the last start-of-scan (FF DA); entropy-coded
//!    data byte-stuffs 0xFF, so neither marker can occur inside it;
//! 2. a file cut short and then patched with FF D9 passes that, so each baseline scan (and
//!    each first scan of a progressive JPEG) is walked symbol by symbol through its Huffman
//!    tables, without any IDCT: if its data ends before the scan's last MCU, the file was cut.
//!    A complete scan ends within its last byte (padded with 1 bits); one last MCU of slack is
//!    allowed for sloppy encoders.
//!
//! What it does not cover: progressive refinement scans (their bit count depends on earlier
//! coefficients), arithmetic-coded and lossless JPEGs (rare; checked by 1 only), and a cut
//! that falls exactly between two scans of a progressive file (indistinguishable from a file
//! with fewer scans). A scan that is corrupt rather than short is left to the decoder.

use crate::error::{Error, Result};

mod entropy;

use entropy::{Bits, Exhausted, Huffman, ac_block, dc_block};

/// Refuses a JPEG whose scan data ends early, with or without an end-of-image marker after it.
pub(super) fn check_complete(bytes: &[u8]) -> Result<()> {
    check_end_marker(bytes)?;
    check_scans(bytes)
}

/// Refuses a JPEG with no end-of-image marker after its last scan (check 1: a scan over the
/// file's bytes, cheap beside decoding).
pub(super) fn check_end_marker(bytes: &[u8]) -> Result<()> {
    let last_scan = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    let last_end = bytes.windows(2).rposition(|w| w == [0xFF, 0xD9]);
    if !matches!((last_scan, last_end), (Some(scan), Some(end)) if end > scan) {
        return Err(Error::Decode(
            "Jpeg: truncated file (no end-of-image marker after the last scan)".into(),
        ));
    }
    Ok(())
}

/// Refuses a JPEG whose scan data ends before the scan's MCUs do (check 2: the walk, about
/// as costly as a third of a decode).
pub(super) fn check_scans(bytes: &[u8]) -> Result<()> {
    if let Some(Short {
        scan,
        decoded,
        total,
    }) = walk(bytes)
    {
        return Err(Error::Decode(format!(
            "Jpeg: truncated file (scan {scan} ends after {decoded} of its {total} MCUs)"
        )));
    }
    Ok(())
}

/// Working memory the decoder needs beside its output: a progressive or multi-scan JPEG is
/// held as 16-bit coefficients for every sample until its last scan.
pub(super) fn scratch_bytes(bytes: &[u8], width: u32, height: u32) -> u64 {
    let frame = frame_info(bytes);
    if !frame.progressive && frame.scans <= 1 {
        return 0;
    }
    let padded = |n: u32| u64::from(n.div_ceil(16) * 16);
    padded(width)
        .saturating_mul(padded(height))
        .saturating_mul(2 * u64::from(frame.components.max(1)))
}

struct FrameSummary {
    progressive: bool,
    scans: usize,
    components: u8,
}

fn frame_info(bytes: &[u8]) -> FrameSummary {
    let mut summary = FrameSummary {
        progressive: false,
        scans: 0,
        components: 3,
    };
    let mut at = 2;
    while let Some((marker, body, next)) = segment(bytes, at) {
        match marker {
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => {
                summary.progressive = matches!(marker, 0xC2 | 0xC6 | 0xCA | 0xCE);
                summary.components = body.get(5).copied().unwrap_or(3);
            }
            0xDA => summary.scans += 1,
            0xD9 => break,
            _ => {}
        }
        at = next;
    }
    summary
}

/// The marker at `at` (after any fill bytes), its segment's body, and where to look next. For
/// SOS the body is followed by the entropy-coded data, and the next position is past it.
/// `None` at EOI's end or on nonsense.
fn segment(bytes: &[u8], mut at: usize) -> Option<(u8, &[u8], usize)> {
    while bytes.get(at) == Some(&0xFF) && bytes.get(at + 1) == Some(&0xFF) {
        at += 1;
    }
    if bytes.get(at) != Some(&0xFF) {
        return None;
    }
    let marker = *bytes.get(at + 1)?;
    match marker {
        0xD8 | 0x01 | 0xD0..=0xD7 => return Some((marker, &[], at + 2)),
        0xD9 => return Some((marker, &[], bytes.len())),
        _ => {}
    }
    let len = usize::from(u16::from_be_bytes([
        *bytes.get(at + 2)?,
        *bytes.get(at + 3)?,
    ]));
    let body = bytes.get(at + 4..at + 2 + len.max(2))?;
    let mut next = at + 2 + len.max(2);
    if marker == 0xDA {
        next = entropy_end(bytes, next);
    }
    Some((marker, body, next))
}

/// The position of the first marker after entropy-coded data starting at `at` (stuffed
/// 0xFF00 and restart markers are part of the data). Jumps from one 0xFF to the next with
/// `memchr`: byte by byte, finding the ends of a photo's scans took a tenth of its decode.
fn entropy_end(bytes: &[u8], mut at: usize) -> usize {
    while let Some(offset) = bytes.get(at..).and_then(|rest| memchr::memchr(0xFF, rest)) {
        at += offset;
        match bytes.get(at + 1) {
            None => break,
            Some(0x00 | 0xD0..=0xD7 | 0xFF) => at += 1,
            Some(_) => return at,
        }
    }
    bytes.len()
}

/// A scan whose data ended before its MCUs did.
#[derive(Debug)]
struct Short {
    scan: usize,
    decoded: u64,
    total: u64,
}

#[derive(Clone, Copy, Default)]
struct Component {
    id: u8,
    h: u8,
    v: u8,
}

/// How a block of one scan is coded.
#[derive(Clone, Copy)]
enum Kind {
    /// Baseline: DC then AC 1..63.
    Sequential,
    /// Progressive first DC scan: DC only.
    DcFirst,
    /// Progressive first AC scan of bands `ss..=se`.
    AcFirst { ss: u8, se: u8 },
}

/// Walks every scan it can; the first that ended early, if any.
fn walk(bytes: &[u8]) -> Option<Short> {
    let mut dc: [Option<Huffman>; 4] = Default::default();
    let mut ac: [Option<Huffman>; 4] = Default::default();
    let mut components: Vec<Component> = Vec::new();
    let (mut width, mut height) = (0u32, 0u32);
    let mut frame: Option<bool> = None; // Some(progressive) for a Huffman frame we can walk
    let mut restart = 0u32;
    let mut scan_index = 0usize;
    let mut at = 2;
    if bytes.get(..2) != Some(&[0xFF, 0xD8]) {
        return None;
    }
    while let Some((marker, body, next)) = segment(bytes, at) {
        match marker {
            0xC0..=0xC2 => {
                height = u32::from(u16::from_be_bytes([*body.get(1)?, *body.get(2)?]));
                width = u32::from(u16::from_be_bytes([*body.get(3)?, *body.get(4)?]));
                let n = usize::from(*body.get(5)?);
                components = (0..n)
                    .map(|i| {
                        let c = body.get(6 + 3 * i..9 + 3 * i)?;
                        Some(Component {
                            id: c[0],
                            h: (c[1] >> 4).max(1),
                            v: (c[1] & 15).max(1),
                        })
                    })
                    .collect::<Option<_>>()?;
                frame = Some(marker == 0xC2);
            }
            0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => return None,
            0xC4 => {
                let mut rest = body;
                while let [class_id, tail @ ..] = rest {
                    let counts = tail.get(..16)?;
                    let n: usize = counts.iter().map(|&c| usize::from(c)).sum();
                    let values = tail.get(16..16 + n)?;
                    let table = Huffman::parse(counts, values)?;
                    let slot = usize::from(class_id & 3);
                    if class_id >> 4 == 0 {
                        dc[slot] = Some(table);
                    } else {
                        ac[slot] = Some(table);
                    }
                    rest = tail.get(16 + n..)?;
                }
            }
            0xDD => restart = u32::from(u16::from_be_bytes([*body.first()?, *body.get(1)?])),
            0xDA => {
                scan_index += 1;
                let progressive = frame?;
                let ns = usize::from(*body.first()?);
                let mut scan = Vec::with_capacity(ns);
                for i in 0..ns {
                    let sel = body.get(1 + 2 * i..3 + 2 * i)?;
                    let c = components.iter().position(|c| c.id == sel[0])?;
                    scan.push((c, usize::from((sel[1] >> 4) & 3), usize::from(sel[1] & 3)));
                }
                let tail = body.get(1 + 2 * ns..4 + 2 * ns)?;
                let (ss, se, ah) = (tail[0], tail[1], tail[2] >> 4);
                let kind = match (progressive, ss, ah) {
                    (false, _, _) => Some(Kind::Sequential),
                    (true, 0, 0) => Some(Kind::DcFirst),
                    (true, 1.., 0) => Some(Kind::AcFirst { ss, se }),
                    _ => None, // refinement scans are not walked
                };
                let data_start = body_end(bytes, body);
                let data = bytes.get(data_start..next)?;
                let ended_at_eoi = bytes.get(next..next + 2) == Some(&[0xFF, 0xD9]);
                if let Some(kind) = kind {
                    let geometry = Geometry {
                        width,
                        height,
                        components: &components,
                    };
                    let walked = walk_scan(data, &geometry, &scan, kind, &dc, &ac, restart);
                    if let Walked::Short { decoded, total } = walked
                        && ended_at_eoi
                        && decoded + 1 < total
                    {
                        return Some(Short {
                            scan: scan_index,
                            decoded,
                            total,
                        });
                    }
                }
            }
            0xD9 => break,
            _ => {}
        }
        at = next;
    }
    None
}

/// Where `body`, a subslice of `bytes`, ends in it.
fn body_end(bytes: &[u8], body: &[u8]) -> usize {
    (body.as_ptr() as usize - bytes.as_ptr() as usize) + body.len()
}

struct Geometry<'a> {
    width: u32,
    height: u32,
    components: &'a [Component],
}

enum Walked {
    Complete,
    Short {
        decoded: u64,
        total: u64,
    },
    /// A bad code or a missing table: corrupt, for the decoder to judge.
    Unknown,
}

/// Walks one scan's MCUs (blocks, for a one-component scan) through the Huffman tables.
fn walk_scan(
    data: &[u8],
    g: &Geometry<'_>,
    scan: &[(usize, usize, usize)],
    kind: Kind,
    dc: &[Option<Huffman>; 4],
    ac: &[Option<Huffman>; 4],
    restart: u32,
) -> Walked {
    let hmax = u32::from(g.components.iter().map(|c| c.h).max().unwrap_or(1));
    let vmax = u32::from(g.components.iter().map(|c| c.v).max().unwrap_or(1));
    // Blocks per MCU for each scan component, and the MCU count.
    let (total, per_mcu): (u64, Vec<u32>) = if let [(c, _, _)] = scan {
        let Some(comp) = g.components.get(*c) else {
            return Walked::Unknown;
        };
        let cw = (g.width * u32::from(comp.h)).div_ceil(hmax).div_ceil(8);
        let ch = (g.height * u32::from(comp.v)).div_ceil(vmax).div_ceil(8);
        (u64::from(cw) * u64::from(ch), vec![1])
    } else {
        let mx = g.width.div_ceil(8 * hmax);
        let my = g.height.div_ceil(8 * vmax);
        let blocks = scan
            .iter()
            .map(|(c, _, _)| {
                g.components
                    .get(*c)
                    .map_or(1, |c| u32::from(c.h) * u32::from(c.v))
            })
            .collect();
        (u64::from(mx) * u64::from(my), blocks)
    };
    let mut segments = split_restarts(data);
    let Some(first) = segments.next() else {
        return Walked::Short { decoded: 0, total };
    };
    let mut bits = Bits::new(first);
    let mut eobrun = 0u32;
    let mut decoded = 0u64;
    while decoded < total {
        if restart > 0 && decoded > 0 && decoded.is_multiple_of(u64::from(restart)) {
            match segments.next() {
                Some(next) => bits = Bits::new(next),
                None => return Walked::Short { decoded, total },
            }
            eobrun = 0;
        }
        for (&(_, td, ta), &blocks) in scan.iter().zip(&per_mcu) {
            for _ in 0..blocks {
                let step = match kind {
                    Kind::Sequential => dc[td].as_ref().zip(ac[ta].as_ref()).map(|(d, a)| {
                        dc_block(&mut bits, d).and_then(|ok| {
                            if ok {
                                ac_block(&mut bits, a, 1, 63, &mut eobrun)
                            } else {
                                Ok(false)
                            }
                        })
                    }),
                    Kind::DcFirst => dc[td].as_ref().map(|d| dc_block(&mut bits, d)),
                    Kind::AcFirst { ss, se } => ac[ta]
                        .as_ref()
                        .map(|a| ac_block(&mut bits, a, ss, se, &mut eobrun)),
                };
                match step {
                    None | Some(Ok(false)) => return Walked::Unknown,
                    Some(Ok(true)) => {}
                    Some(Err(Exhausted)) => return Walked::Short { decoded, total },
                }
            }
        }
        decoded += 1;
    }
    Walked::Complete
}

/// Entropy-coded data split at its restart markers.
fn split_restarts(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let d = rest?;
        let cut = d
            .windows(2)
            .position(|w| w[0] == 0xFF && (0xD0..=0xD7).contains(&w[1]));
        match cut {
            Some(i) => {
                rest = d.get(i + 2..);
                d.get(..i)
            }
            None => {
                rest = None;
                Some(d)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    fn segment_bytes(marker: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![0xFF, marker];
        out.extend_from_slice(&((body.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// SOI, a flat quantisation table, a one-component (grey) frame `sof` of `height` x
    /// `width`, and DC and AC Huffman tables of one 1-bit code each (symbol 0).
    fn grey_header(sof: u8, height: u8, width: u8) -> Vec<u8> {
        let mut out = vec![0xFF, 0xD8];
        let mut dqt = vec![0];
        dqt.extend([1u8; 64]);
        out.extend(segment_bytes(0xDB, &dqt));
        out.extend(segment_bytes(sof, &[8, 0, height, 0, width, 1, 1, 0x11, 0]));
        for class in [0x00, 0x10] {
            let mut dht = vec![class, 1];
            dht.extend([0u8; 15]);
            dht.push(0);
            out.extend(segment_bytes(0xC4, &dht));
        }
        out
    }

    /// A 64x64 grey progressive JPEG, flat: a DC first scan and an AC first scan (bands
    /// 1..=63), with one-symbol Huffman tables, so each block costs one bit in each scan.
    /// `ac_bytes` of the AC scan's 8 are kept (fewer: cut short, then FF D9).
    fn progressive(ac_bytes: usize) -> Vec<u8> {
        let mut out = grey_header(0xC2, 64, 64);
        out.extend(segment_bytes(0xDA, &[1, 1, 0x00, 0, 0, 0]));
        out.extend([0u8; 8]); // 64 blocks: DC size 0
        out.extend(segment_bytes(0xDA, &[1, 1, 0x00, 1, 63, 0]));
        out.extend(vec![0u8; ac_bytes]); // 64 blocks: end of band
        out.extend([0xFF, 0xD9]);
        out
    }

    #[test]
    fn a_progressive_scan_cut_short_is_found() {
        assert!(check_complete(&progressive(8)).is_ok());
        let cut = check_complete(&progressive(2)).expect_err("cut");
        assert!(
            cut.to_string()
                .contains("scan 2 ends after 16 of its 64 MCUs"),
            "{cut}"
        );
        assert!(scratch_bytes(&progressive(8), 64, 64) >= 64 * 64 * 2);
    }

    #[test]
    fn restart_intervals_are_followed() {
        // The 8x8 blocks of a 64x16 grey baseline image, a restart marker every 4 blocks.
        let mut out = grey_header(0xC0, 16, 64);
        out.extend(segment_bytes(0xDD, &[0, 4]));
        out.extend(segment_bytes(0xDA, &[1, 1, 0x00, 0, 63, 0]));
        let whole = {
            let mut o = out.clone();
            for i in 0..4u8 {
                o.push(0x00); // 4 blocks x 2 bits
                if i < 3 {
                    o.extend([0xFF, 0xD0 + i]);
                }
            }
            o.extend([0xFF, 0xD9]);
            o
        };
        assert!(check_complete(&whole).is_ok());
        let mut cut = out;
        cut.extend([0x00, 0xFF, 0xD0, 0xFF, 0xD9]);
        let err = check_complete(&cut).expect_err("cut after 8 of 16 blocks");
        assert!(err.to_string().contains("truncated"), "{err}");
    }
}
