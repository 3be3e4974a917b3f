//! Makes large JPEGs (e.g. 4000x3000, what a phone sends) from real photos, for the soak and
//! memory scripts: `large_photos SRC_DIR OUT_DIR COUNT WIDTH HEIGHT`. Each is a real photo
//! scaled up (Lanczos) with a seeded speckle, so that no two share bytes and the JPEG
//! decoder does real work.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use rand::{Rng, SeedableRng};

fn jpegs(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            jpegs(&p, out);
        } else if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("jpg")) {
            out.push(p);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, src, out, count, width, height] = args.as_slice() else {
        eprintln!("usage: large_photos SRC_DIR OUT_DIR COUNT WIDTH HEIGHT");
        std::process::exit(2);
    };
    let (count, width, height): (usize, u32, u32) =
        match (count.parse(), width.parse(), height.parse()) {
            (Ok(c), Ok(w), Ok(h)) => (c, w, h),
            _ => {
                eprintln!("COUNT, WIDTH and HEIGHT must be numbers");
                std::process::exit(2);
            }
        };
    let mut sources = Vec::new();
    jpegs(Path::new(src), &mut sources);
    if sources.is_empty() {
        eprintln!("no .jpg under {src}");
        std::process::exit(1);
    }
    std::fs::create_dir_all(out).expect("create OUT_DIR");
    let step = (sources.len() / count.max(1)).max(1);
    for i in 0..count {
        let path = &sources[(i * step) % sources.len()];
        let img = image::open(path).expect("decode a source photo").to_rgb8();
        let mut big = image::imageops::resize(&img, width, height, FilterType::Triangle);
        let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
        for p in big.pixels_mut() {
            for c in &mut p.0 {
                *c = c.saturating_add_signed(rng.random_range(-3i8..=3));
            }
        }
        let dest = Path::new(out).join(format!("large-{i:03}.jpg"));
        big.save(&dest).expect("write a large JPEG");
    }
    println!("{count} photos of {width}x{height} in {out}");
}
