//! Where one photo's preprocessing time goes: header, decode (with the truncation walk),
//! and the views (resample + normalize), ms per image, single thread, over a photo folder.
//!
//!   cargo run --release -p feature-server --example preprocess_stages -- ../shared/datasets/pets
use std::time::Instant;

use feature_server::preprocess::{self, Limits, View};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::env::args()
        .nth(1)
        .unwrap_or("../shared/datasets/pets".into());
    let mut files = Vec::new();
    let mut stack = vec![std::path::PathBuf::from(root)];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p)
            } else if p.extension().is_some_and(|x| x == "jpg") {
                files.push(p)
            }
        }
    }
    files.sort();
    let photos: Vec<Vec<u8>> = files
        .iter()
        .take(120)
        .map(std::fs::read)
        .collect::<Result<_, _>>()?;
    let limits = Limits::default();
    let single = [View::CENTER];
    let (mut header, mut decode, mut view, mut views4) = (0f64, 0f64, 0f64, 0f64);
    // The engine's way: the JPEG walk beside the decoder, on a second thread.
    let mut beside = 0f64;
    for _ in 0..3 {
        for p in &photos {
            let t = Instant::now();
            let h = preprocess::read_header(p, &limits)?;
            let t1 = Instant::now();
            let img = preprocess::decode_with(p, &limits, &h)?;
            let t2 = Instant::now();
            preprocess::views_of(&img, &single)?;
            let t3 = Instant::now();
            preprocess::views_of(&img, &preprocess::SCALES_AND_MIRRORS)?;
            let t4 = Instant::now();
            header += (t1 - t).as_secs_f64();
            decode += (t2 - t1).as_secs_f64();
            view += (t3 - t2).as_secs_f64();
            views4 += (t4 - t3).as_secs_f64();
            let h = preprocess::read_header_deferring_walk(p, &limits)?;
            preprocess::decode_with(p, &limits, &h)?;
            beside += t4.elapsed().as_secs_f64();
        }
    }
    let n = 3.0 * photos.len() as f64 / 1e3;
    println!(
        "{} photos: header {:.3} decode {:.3} one view {:.3} four views {:.3} ms/img; \
         header + decode with the walk beside the decoder {:.3} (walk first {:.3})",
        photos.len(),
        header / n,
        decode / n,
        view / n,
        views4 / n,
        beside / n,
        (header + decode) / n
    );
    Ok(())
}
