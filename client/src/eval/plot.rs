//! The report's two pictures, drawn pixel by pixel with the `image` crate and the built-in
//! font: a confusion matrix and accuracy against k per head. Renderers return images (testable
//! without files); `save` writes PNG.

use std::path::Path;

use image::{Rgb, RgbImage};

use super::font;
use crate::error::{Error, Result};

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const BLACK: Rgb<u8> = Rgb([20, 20, 20]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const GREY: Rgb<u8> = Rgb([150, 150, 150]);
/// Distinguishable line colours (Tableau 10).
const PALETTE: [Rgb<u8>; 6] = [
    Rgb([31, 119, 180]),
    Rgb([255, 127, 14]),
    Rgb([44, 160, 44]),
    Rgb([214, 39, 40]),
    Rgb([148, 103, 189]),
    Rgb([140, 86, 75]),
];
const MAX_LABEL: usize = 20;

pub fn save(img: &RgbImage, path: &Path) -> Result<()> {
    img.save_with_format(path, image::ImageFormat::Png)
        .map_err(|source| Error::Image {
            path: path.to_path_buf(),
            source,
        })
}

fn truncate(s: &str) -> String {
    s.chars().take(MAX_LABEL).collect()
}

fn fill(img: &mut RgbImage, x: u32, y: u32, w: u32, h: u32, c: Rgb<u8>) {
    for yy in y..(y + h).min(img.height()) {
        for xx in x..(x + w).min(img.width()) {
            img.put_pixel(xx, yy, c);
        }
    }
}

/// Rows are true classes, columns predicted ones (matrix may carry one extra "none" column,
/// ignored here); cells shaded by the row's share, so rare and common classes read alike.
pub fn render_confusion(names: &[String], matrix: &[Vec<u32>], title: &str) -> RgbImage {
    let n = names.len() as u32;
    let cell = (640 / n.max(1)).clamp(6, 24);
    let label_w = names
        .iter()
        .map(|s| font::width(&truncate(s), 1))
        .max()
        .unwrap_or(0)
        + 8;
    let (left, top) = (label_w, 20 + label_w);
    let width = (left + n * cell + 10).max(font::width(title, 1) + 20);
    let height = top + n * cell + 10;
    let mut img = RgbImage::from_pixel(width, height, WHITE);
    font::draw(&mut img, 10, 6, title, BLACK, 1);
    for (r, row) in matrix.iter().enumerate().take(n as usize) {
        let total: u32 = row.iter().sum();
        for c in 0..n as usize {
            let v = row.get(c).copied().unwrap_or(0);
            let share = if total == 0 {
                0.0
            } else {
                f64::from(v) / f64::from(total)
            };
            let shade = |full: u8| (255.0 - share * (255.0 - f64::from(full))).round() as u8;
            let color = Rgb([shade(8), shade(48), shade(107)]);
            let (x, y) = (left + c as u32 * cell, top + r as u32 * cell);
            fill(&mut img, x, y, cell, cell, GRID);
            fill(&mut img, x + 1, y + 1, cell - 1, cell - 1, color);
        }
    }
    for (i, name) in names.iter().enumerate() {
        let label = truncate(name);
        let y = top + i as u32 * cell + cell.saturating_sub(font::HEIGHT) / 2;
        let x = left - 4 - font::width(&label, 1);
        font::draw(&mut img, i64::from(x), i64::from(y), &label, BLACK, 1);
        let cx = left + i as u32 * cell + cell.saturating_sub(font::HEIGHT) / 2;
        font::draw_vertical(&mut img, i64::from(cx), i64::from(top) - 4, &label, BLACK);
    }
    img
}

/// One line per head: (k, mean, std) points with ±std bars.
pub struct Series {
    pub name: String,
    pub points: Vec<(usize, f64, f64)>,
    /// Drawn dashed (the PyTorch reference).
    pub dashed: bool,
}

pub const ACCURACY_SIZE: (u32, u32) = (760, 480);

/// Accuracy (%) against k; the y range is whole tens around the data.
pub fn render_accuracy(series: &[Series], title: &str) -> RgbImage {
    let (w, h) = ACCURACY_SIZE;
    let mut img = RgbImage::from_pixel(w, h, WHITE);
    let (left, right, top, bottom) = (50i64, 200i64, 30i64, 40i64);
    let (pw, ph) = (i64::from(w) - left - right, i64::from(h) - top - bottom);
    let values = series.iter().flat_map(|s| s.points.iter());
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), &(_, m, s)| {
        (lo.min(m - s), hi.max(m + s))
    });
    let (lo, hi) = if lo > hi { (0.0, 100.0) } else { (lo, hi) };
    let y_lo = ((lo / 10.0).floor() * 10.0).clamp(0.0, 90.0);
    let y_hi = ((hi / 10.0).ceil() * 10.0).clamp(y_lo + 10.0, 100.0);
    let mut ks: Vec<usize> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    ks.sort_unstable();
    ks.dedup();
    let (k_lo, k_hi) = (
        ks.first().copied().unwrap_or(0) as f64,
        ks.last().copied().unwrap_or(1) as f64,
    );
    let px = |k: f64| {
        if k_hi > k_lo {
            left + 15 + ((k - k_lo) / (k_hi - k_lo) * (pw - 30) as f64).round() as i64
        } else {
            left + pw / 2
        }
    };
    let py = |v: f64| top + ph - ((v - y_lo) / (y_hi - y_lo) * ph as f64).round() as i64;

    font::draw(&mut img, left, 10, title, BLACK, 1);
    let mut tick = y_lo;
    while tick <= y_hi + 1e-9 {
        let y = py(tick);
        line(&mut img, (left, y), (left + pw, y), GRID, false);
        let label = format!("{tick:.0}");
        let x = left - 6 - i64::from(font::width(&label, 1));
        font::draw(&mut img, x, y - 3, &label, BLACK, 1);
        tick += if y_hi - y_lo > 50.0 { 20.0 } else { 10.0 };
    }
    line(&mut img, (left, top), (left, top + ph), BLACK, false);
    line(
        &mut img,
        (left, top + ph),
        (left + pw, top + ph),
        BLACK,
        false,
    );
    for &k in &ks {
        let x = px(k as f64);
        line(&mut img, (x, top + ph), (x, top + ph + 4), BLACK, false);
        let label = k.to_string();
        font::draw(
            &mut img,
            x - i64::from(font::width(&label, 1)) / 2,
            top + ph + 8,
            &label,
            BLACK,
            1,
        );
    }
    font::draw(
        &mut img,
        left + pw / 2 - 30,
        top + ph + 22,
        "K (SHOTS)",
        BLACK,
        1,
    );
    font::draw(&mut img, 4, top - 14, "TOP-1 %", BLACK, 1);

    for (i, s) in series.iter().enumerate() {
        let color = if s.dashed {
            GREY
        } else {
            PALETTE[i % PALETTE.len()]
        };
        let pts: Vec<(i64, i64)> = s
            .points
            .iter()
            .map(|&(k, m, _)| (px(k as f64), py(m)))
            .collect();
        for pair in pts.windows(2) {
            thick_line(&mut img, pair[0], pair[1], color, s.dashed);
        }
        for (&(x, y), &(_, m, sd)) in pts.iter().zip(&s.points) {
            line(&mut img, (x, py(m + sd)), (x, py(m - sd)), color, false);
            for d in -2..=2 {
                line(&mut img, (x - 2, y + d), (x + 2, y + d), color, false);
            }
        }
        let ly = top + 10 + i as i64 * 16;
        let lx = left + pw + 15;
        thick_line(&mut img, (lx, ly + 3), (lx + 20, ly + 3), color, s.dashed);
        font::draw(&mut img, lx + 26, ly, &truncate(&s.name), BLACK, 1);
    }
    img
}

fn thick_line(img: &mut RgbImage, a: (i64, i64), b: (i64, i64), c: Rgb<u8>, dashed: bool) {
    for d in 0..2 {
        line(img, (a.0, a.1 + d), (b.0, b.1 + d), c, dashed);
    }
}

/// Bresenham; `dashed` draws 6 pixels on, 4 off.
fn line(img: &mut RgbImage, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb<u8>, dashed: bool) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err, mut step) = (x0, y0, dx + dy, 0u32);
    loop {
        let on = !dashed || step % 10 < 6;
        if on && x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
            img.put_pixel(x as u32, y as u32, c);
        }
        if x == x1 && y == y1 {
            break;
        }
        step += 1;
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(img: &RgbImage) -> (u32, u32) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.png");
        save(img, &path).unwrap();
        let decoded = image::open(&path).unwrap();
        (decoded.width(), decoded.height())
    }

    #[test]
    fn confusion_png_decodes_at_the_computed_size() {
        let names: Vec<String> = ["abyssinian", "pug", "sphynx"].map(String::from).to_vec();
        let m = vec![vec![3, 1, 0, 0], vec![0, 4, 0, 0], vec![1, 0, 2, 1]];
        let img = render_confusion(&names, &m, "CONFUSION K=5 SEED 0");
        let label_w = font::width("abyssinian", 1) + 8;
        let cell = 24;
        assert_eq!(img.height(), 20 + label_w + 3 * cell + 10);
        assert_eq!(roundtrip(&img), (img.width(), img.height()));
        // The diagonal cell of a perfect row is the darkest colour.
        let (x, y) = (label_w + cell + cell / 2, 20 + label_w + cell + cell / 2);
        assert_eq!(img.get_pixel(x, y).0, [8, 48, 107]);
    }

    #[test]
    fn accuracy_png_decodes_at_the_fixed_size() {
        let series = vec![
            Series {
                name: "flat".into(),
                points: vec![(1, 60.0, 2.0), (5, 85.0, 1.0)],
                dashed: false,
            },
            Series {
                name: "PyTorch best".into(),
                points: vec![(1, 62.3, 2.1), (5, 86.2, 1.2)],
                dashed: true,
            },
        ];
        let img = render_accuracy(&series, "PETS");
        assert_eq!(roundtrip(&img), ACCURACY_SIZE);
        assert_eq!(roundtrip(&render_accuracy(&[], "EMPTY")), ACCURACY_SIZE);
    }
}
