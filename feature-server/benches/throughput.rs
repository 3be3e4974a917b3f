//! `cargo bench -p feature-server`: where the time goes, batch by batch, on this CPU.
//!
//! For batch 1, 8 and 32: decode+preprocess ms/image (one thread), ResNet18 forward ms/image
//! and images/s, and end-to-end images/s over gRPC with 4 concurrent streams into an
//! in-process server; beside each, the anchors measured on this kind of machine
//! (../shared/anchors/cpu-inference.md) and our ratio to them. Weights are the deterministic
//! formula weights (speed does not depend on values). Photos come from
//! ../shared/datasets/pets when present, else synthetic JPEGs; the header says which.
//! Two alternated rounds, best kept; about three minutes on 2 cores; ends with peak RSS (VmHWM).
//! `TAXON_BENCH_BACKBONE=mobilenet_v2` runs every part on MobileNetV2 instead (the anchor
//! ratios are then left out: the anchors are ResNet18's).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use feature_server::config::DeviceChoice;
use feature_server::models::{Backbone, BackboneKind, Precision};
use feature_server::preprocess::{INPUT_SIZE, Limits, preprocess};
use feature_server::{Config, Server};
use taxon_proto::v1::features_client::FeaturesClient;
use taxon_proto::v1::{EmbedRequest, embed_response};

const BATCHES: [usize; 3] = [1, 8, 32];
/// images/s at batch 1, 8, 32 (ResNet18 fp32, 224x224, 2 threads).
const PYTORCH_EAGER: [f64; 3] = [16.7, 20.3, 19.1];
const ONNX_RUNTIME: [f64; 3] = [32.4, 37.2, 34.7];
const STOCK_CANDLE: [f64; 3] = [5.5, 6.2, 6.9];
const STREAMS: usize = 4;
/// `--max-wait-ms` compared: the default (dispatch at once when idle) and the old 5 ms.
const WAITS: [u64; 2] = [0, 5];
const ROUNDS: usize = 2;

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// The backbone every part runs: `TAXON_BENCH_BACKBONE`, ResNet18 unless set.
fn backbone_kind() -> BackboneKind {
    static KIND: std::sync::OnceLock<BackboneKind> = std::sync::OnceLock::new();
    *KIND.get_or_init(|| {
        std::env::var("TAXON_BENCH_BACKBONE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(BackboneKind::Resnet18)
    })
}

/// `value (anchor a)` ratios, for ResNet18 only (what the anchors measured).
fn vs_anchor(ips: f64, anchor: f64) -> String {
    if backbone_kind() == BackboneKind::Resnet18 {
        format!("{:.2} (anchor {anchor})", ips / anchor)
    } else {
        "n/a".into()
    }
}

/// `TAXON_BENCH_DEVICE=cuda` (in a `--features cuda` build) runs the forward passes and the
/// server on the GPU; the anchors stay the CPU ones, so read the ratios as "GPU over CPU".
fn bench_device() -> BenchResult<(Device, DeviceChoice)> {
    let choice: DeviceChoice = std::env::var("TAXON_BENCH_DEVICE")
        .unwrap_or_else(|_| "cpu".into())
        .parse()?;
    let device = match choice {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda(n) => Device::new_cuda(n)?,
    };
    Ok((device, choice))
}

fn main() -> BenchResult<()> {
    let started = Instant::now();
    let (photos, source) = photos(64)?;
    let dir = tempfile::tempdir()?;
    let resnet = dir.path().join("backbone.safetensors");
    feature_server::weights::formula::write_safetensors(backbone_kind(), &resnet)?;

    let (device, device_choice) = bench_device()?;
    println!(
        "feature-server throughput ({device_choice}, {} CPU threads available)",
        cores()
    );
    println!(
        "images: {source}; {:?} formula weights; fp32 224x224",
        backbone_kind()
    );
    println!();

    // Other work on a shared machine slows whichever run it overlaps: alternate the parts over
    // rounds and keep each figure's best round, as the anchors were measured.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let pixels = photos
        .iter()
        .take(32)
        .map(|p| preprocess(p, &Limits::default()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut pre_ms = f64::INFINITY;
    let mut forward = [f64::INFINITY; 3];
    let mut e2e = [(0.0, 0.0); 3];
    // Per --max-wait-ms of WAITS: (4 streams at max_batch 32: img/s, mean batch), one at a time.
    let mut dispatch: [((f64, f64), f64); 2] = [((0.0, 0.0), 0.0); 2];
    let (mut forward_peak, mut serving_peak) = (0, 0);
    for _round in 0..ROUNDS {
        pre_ms = pre_ms.min(preprocess_ms(&photos)?);
        reset_peak_rss();
        let (backbone, _) = Backbone::load(backbone_kind(), &resnet, &device, Precision::F32)?;
        for (i, &b) in BATCHES.iter().enumerate() {
            forward[i] = forward[i].min(forward_ms(&backbone, b, &pixels, &device)?);
        }
        drop(backbone);
        forward_peak = forward_peak.max(peak_rss_kb());
        // The serving peak on its own, not masked by the bare forward passes above.
        reset_peak_rss();
        for (i, &b) in BATCHES.iter().enumerate() {
            let run = runtime.block_on(end_to_end(
                &resnet,
                b,
                &photos,
                device_choice,
                Config::default().max_wait,
            ))?;
            if run.0 > e2e[i].0 {
                e2e[i] = run;
            }
        }
        serving_peak = serving_peak.max(peak_rss_kb());
        for (i, &wait) in WAITS.iter().enumerate() {
            let wait = Duration::from_millis(wait);
            let streams =
                runtime.block_on(end_to_end(&resnet, 32, &photos, device_choice, wait))?;
            if streams.0 > dispatch[i].0.0 {
                dispatch[i].0 = streams;
            }
            let lone = runtime.block_on(one_at_a_time(&resnet, &photos, device_choice, wait))?;
            dispatch[i].1 = dispatch[i].1.max(lone);
        }
    }

    println!(
        "| batch | decode+preprocess ms/img | forward ms/img | forward img/s | x PyTorch eager | x ONNX Runtime | x stock candle | e2e gRPC img/s ({STREAMS} streams) | mean batch | e2e x PyTorch |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (i, &b) in BATCHES.iter().enumerate() {
        let ips = 1000.0 / forward[i];
        let (e2e_ips, mean_batch) = e2e[i];
        println!(
            "| {b} | {pre_ms:.2} | {:.1} | {ips:.1} | {} | {} | {} | {e2e_ips:.1} | {mean_batch:.1} | {} |",
            forward[i],
            vs_anchor(ips, PYTORCH_EAGER[i]),
            vs_anchor(ips, ONNX_RUNTIME[i]),
            vs_anchor(ips, STOCK_CANDLE[i]),
            vs_anchor(e2e_ips, PYTORCH_EAGER[i]),
        );
    }

    println!();
    println!(
        "| --max-wait-ms | e2e img/s, {STREAMS} streams, max batch 32 | mean batch | x ONNX Runtime b32 | one image at a time img/s | x ONNX Runtime b1 |"
    );
    println!("|---|---|---|---|---|---|");
    for (i, wait) in WAITS.iter().enumerate() {
        let ((ips, mean_batch), lone) = dispatch[i];
        let default = if Duration::from_millis(*wait) == Config::default().max_wait {
            " (default)"
        } else {
            ""
        };
        println!(
            "| {wait}{default} | {ips:.1} | {mean_batch:.1} | {} | {lone:.1} | {} |",
            vs_anchor(ips, ONNX_RUNTIME[2]),
            vs_anchor(lone, ONNX_RUNTIME[0]),
        );
    }

    if std::env::var_os("TAXON_BENCH_SKIP_MOBILENET").is_none()
        && backbone_kind() != BackboneKind::MobileNetV2
    {
        let mobilenet = dir.path().join("mobilenet_v2.safetensors");
        feature_server::weights::formula::write_safetensors(BackboneKind::MobileNetV2, &mobilenet)?;
        let (backbone, _) = Backbone::load(
            BackboneKind::MobileNetV2,
            &mobilenet,
            &device,
            Precision::F32,
        )?;
        println!();
        println!("| MobileNetV2 batch | forward ms/img | forward img/s |");
        println!("|---|---|---|");
        for &b in &BATCHES {
            let ms = forward_ms(&backbone, b, &pixels, &device)?;
            println!("| {b} | {ms:.1} | {:.1} |", 1000.0 / ms);
        }
    }

    println!();
    println!(
        "anchors: ../shared/anchors/cpu-inference.md (PyTorch 2.15 eager NCHW, ONNX Runtime 1.32, candle 0.11 stock conv2d)"
    );
    println!(
        "peak RSS (VmHWM) while serving the gRPC runs: {} MiB",
        serving_peak / 1024
    );
    println!(
        "peak RSS (VmHWM) over the in-process forward runs: {} MiB",
        forward_peak / 1024
    );
    println!("(best of {ROUNDS} alternated rounds per figure)");
    println!("bench wall time: {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Up to `n` JPEGs from the pets dataset, or synthetic ones where it is absent.
fn photos(n: usize) -> BenchResult<(Vec<Vec<u8>>, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/datasets/pets");
    let mut paths = Vec::new();
    collect_jpegs(&root, &mut paths);
    paths.sort();
    if !paths.is_empty() {
        // Spread the picks over the whole dataset (every breed), deterministically.
        let step = (paths.len() / n).max(1);
        let picked: Vec<_> = paths.iter().step_by(step).take(n).collect();
        let bytes = picked
            .iter()
            .map(std::fs::read)
            .collect::<Result<Vec<_>, _>>()?;
        let source = format!("{} real JPEGs from {}", bytes.len(), root.display());
        return Ok((bytes, source));
    }
    let bytes = (0..n as u32)
        .map(|seed| {
            let img = image::RgbImage::from_fn(500, 375, |x, y| {
                image::Rgb([
                    (x + seed * 7) as u8,
                    (y * 2 + seed) as u8,
                    ((x ^ y) + seed * 3) as u8,
                ])
            });
            let mut out = std::io::Cursor::new(Vec::new());
            img.write_to(&mut out, image::ImageFormat::Jpeg)
                .map(|()| out.into_inner())
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((
        bytes,
        format!("{n} synthetic 500x375 JPEGs (../shared/datasets/pets not found)"),
    ))
}

fn collect_jpegs(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_jpegs(&path, out);
        } else if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("jpg"))
        {
            out.push(path);
        }
    }
}

/// Single-threaded decode + preprocess, ms per image, over every photo.
fn preprocess_ms(photos: &[Vec<u8>]) -> BenchResult<f64> {
    let limits = Limits::default();
    preprocess(&photos[0], &limits)?;
    let t = Instant::now();
    for photo in photos {
        preprocess(photo, &limits)?;
    }
    Ok(t.elapsed().as_secs_f64() * 1e3 / photos.len() as f64)
}

/// Forward ms per image at batch `b` over preprocessed photos: one untimed pass, then at
/// least 3 s or 2 passes.
fn forward_ms(
    backbone: &Backbone,
    b: usize,
    pixels: &[Vec<f32>],
    device: &Device,
) -> BenchResult<f64> {
    // The real photos, preprocessed, so the input is what the server feeds the model.
    let data: Vec<f32> = pixels.iter().cycle().take(b).flatten().copied().collect();
    let x = Tensor::from_vec(data, (b, 3, INPUT_SIZE, INPUT_SIZE), device)?;
    backbone.forward(&x)?.to_vec2::<f32>()?;
    let t = Instant::now();
    let mut images = 0;
    while images < 2 * b || t.elapsed() < Duration::from_secs(3) {
        backbone.forward(&x)?.to_vec2::<f32>()?;
        images += b;
    }
    Ok(t.elapsed().as_secs_f64() * 1e3 / images as f64)
}

/// images/s through a real server (`max_batch = b`) with 4 concurrent streams of the photos,
/// and the mean batch size the engine formed.
async fn end_to_end(
    weights: &Path,
    b: usize,
    photos: &[Vec<u8>],
    device: DeviceChoice,
    max_wait: Duration,
) -> BenchResult<(f64, f64)> {
    let (addr, engine, stop, serving) = serve(weights, b, device, max_wait).await?;

    // Enough items that every batch size fills its batches several times.
    let per_stream = b.max(16);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..STREAMS {
        let requests: Vec<_> = (0..per_stream)
            .map(|i| EmbedRequest {
                id: format!("{s}-{i}"),
                image: photos[(s * per_stream + i) % photos.len()].clone().into(),
                ..Default::default()
            })
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut client = FeaturesClient::connect(format!("http://{addr}")).await?;
            let mut answers = client
                .embed(tokio_stream::iter(requests))
                .await?
                .into_inner();
            let mut ok = 0usize;
            while let Some(response) = answers.message().await? {
                if let Some(embed_response::Result::Embedding(_)) = response.result {
                    ok += 1;
                }
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(ok)
        }));
    }
    let mut ok = 0;
    for task in tasks {
        ok += task.await?.map_err(|e| e.to_string())?;
    }
    let secs = t.elapsed().as_secs_f64();
    if ok != STREAMS * per_stream {
        return Err(format!("only {ok} of {} items embedded", STREAMS * per_stream).into());
    }
    let stats = engine.stats();
    let _ = stop.send(());
    serving.await??;
    Ok((
        ok as f64 / secs,
        stats.items as f64 / stats.batches.max(1) as f64,
    ))
}

/// A server on 127.0.0.1:0 with `max_batch = b` and `max_wait`, ready.
async fn serve(
    weights: &Path,
    b: usize,
    device: DeviceChoice,
    max_wait: Duration,
) -> BenchResult<(
    std::net::SocketAddr,
    feature_server::engine::Engine,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), feature_server::Error>>,
)> {
    let config = Config {
        device,
        backbone: backbone_kind(),
        weights: weights.to_path_buf(),
        max_batch: b,
        max_wait,
        ..Config::default()
    };
    let server = Server::new(config)?;
    let engine = server.engine().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(listener, async move {
        let _ = stopped.await;
    }));
    engine.ready().await?;
    Ok((addr, engine, stop, serving))
}

/// images/s of one caller that sends a photo, waits for its embedding, then sends the next,
/// each in an Embed call of its own: what `client classify photo.jpg` does.
async fn one_at_a_time(
    weights: &Path,
    photos: &[Vec<u8>],
    device: DeviceChoice,
    max_wait: Duration,
) -> BenchResult<f64> {
    let (addr, _engine, stop, serving) = serve(weights, 32, device, max_wait).await?;
    let mut client = FeaturesClient::connect(format!("http://{addr}")).await?;
    embed_one(&mut client, photos, 0).await?; // connection and first-call costs, untimed
    let n = 24;
    let t = Instant::now();
    for i in 1..=n {
        embed_one(&mut client, photos, i).await?;
    }
    let ips = n as f64 / t.elapsed().as_secs_f64();
    let _ = stop.send(());
    serving.await??;
    Ok(ips)
}

/// Photo `i` in an Embed call of its own, answered.
async fn embed_one(
    client: &mut FeaturesClient<tonic::transport::Channel>,
    photos: &[Vec<u8>],
    i: usize,
) -> BenchResult<()> {
    let request = EmbedRequest {
        id: i.to_string(),
        image: photos[i % photos.len()].clone().into(),
        ..Default::default()
    };
    let mut answers = client
        .embed(tokio_stream::iter([request]))
        .await?
        .into_inner();
    match answers.message().await?.and_then(|r| r.result) {
        Some(embed_response::Result::Embedding(_)) => Ok(()),
        other => Err(format!("photo {i}: {other:?}").into()),
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The process's peak resident set in KiB (VmHWM), 0 where /proc is unavailable.
fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Restarts the VmHWM high-water mark at the current RSS (Linux: clear_refs 5).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
