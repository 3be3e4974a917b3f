//! The measuring half of `scripts/gpu-check.sh`: the figures a GPU run must leave behind, each
//! printed as one line and appended as one JSON object to `--out`.
//!
//! - `forward`: the forward pass alone, per batch size, on `--device` at `--dtype` (what the
//!   GPU can do with no decoding, no gRPC and no batching delays);
//! - `decode`: JPEG decode + preprocessing alone on `--threads` threads (what the CPU cores
//!   can feed the GPU);
//! - `load`: `--streams` concurrent Embed streams against a running server, each sending
//!   photos back to back for `--seconds` after an untimed warm-up, then one caller sending a
//!   photo at a time (latency).
//!
//! Set beside each other, the three show which one bounds end-to-end throughput. Nothing here
//! needs a GPU: on a CPU the same commands give CPU figures, which is how the script is tried
//! before the GPU machine's few minutes are spent on it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use clap::{Parser, Subcommand};
use feature_server::config::DeviceChoice;
use feature_server::models::{Backbone, BackboneKind, Precision};
use feature_server::preprocess::{INPUT_SIZE, Limits, SCALES_AND_MIRRORS, preprocess_views};
use serde_json::json;
use taxon_proto::v1::features_client::FeaturesClient;
use taxon_proto::v1::{EmbedRequest, ViewSet, embed_response};

#[derive(Parser)]
struct Args {
    /// Appends every figure as one JSON line to this file.
    #[arg(long, global = true)]
    out: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Writes a backbone's formula weights (what the parity tests use) to a file.
    WriteFormula {
        backbone: BackboneKind,
        out: PathBuf,
    },
    /// Forward passes alone, per batch size.
    Forward {
        #[arg(long)]
        backbone: BackboneKind,
        #[arg(long)]
        weights: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: DeviceChoice,
        #[arg(long, default_value = "f32")]
        dtype: Precision,
        #[arg(long, value_delimiter = ',', default_value = "1,8,32,64,128,256")]
        batches: Vec<usize>,
        /// Timed seconds per batch size (after one untimed pass).
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// Decode + preprocess alone, on this many threads.
    Decode {
        #[arg(long)]
        images: PathBuf,
        #[arg(long, value_delimiter = ',', default_value = "1,16")]
        threads: Vec<usize>,
        /// Four views per photo (scales and mirrors) instead of the center crop.
        #[arg(long)]
        four_views: bool,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// Embed streams against a running feature-server.
    Load {
        /// e.g. http://127.0.0.1:50051
        #[arg(long)]
        addr: String,
        #[arg(long)]
        images: PathBuf,
        #[arg(long, value_delimiter = ',', default_value = "16,32,64")]
        streams: Vec<usize>,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        #[arg(long, default_value_t = 3.0)]
        warmup_seconds: f64,
        /// Label for the output (e.g. the server's --max-batch and --dtype).
        #[arg(long, default_value = "")]
        label: String,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    let record = |value: serde_json::Value| -> Result<()> {
        if let Some(path) = &args.out {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| path.display().to_string())?;
            writeln!(f, "{value}")?;
        }
        Ok(())
    };
    match &args.command {
        Command::WriteFormula { backbone, out } => Ok(
            feature_server::weights::formula::write_safetensors(*backbone, out)?,
        ),
        Command::Forward {
            backbone,
            weights,
            device,
            dtype,
            batches,
            seconds,
        } => forward(
            *backbone, weights, *device, *dtype, batches, *seconds, record,
        ),
        Command::Decode {
            images,
            threads,
            four_views,
            seconds,
        } => decode(&photos(images)?, threads, *four_views, *seconds, record),
        Command::Load {
            addr,
            images,
            streams,
            seconds,
            warmup_seconds,
            label,
        } => tokio::runtime::Runtime::new()?.block_on(load(
            addr,
            Arc::new(photos(images)?),
            streams,
            (*warmup_seconds, *seconds),
            label,
            record,
        )),
    }
}

fn forward(
    kind: BackboneKind,
    weights: &Path,
    choice: DeviceChoice,
    precision: Precision,
    batches: &[usize],
    seconds: f64,
    record: impl Fn(serde_json::Value) -> Result<()>,
) -> Result<()> {
    let device = match choice {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda(n) => Device::new_cuda(n)?,
    };
    let (model, _) = Backbone::load(kind, weights, &device, precision)?;
    let per_image = 3 * INPUT_SIZE * INPUT_SIZE;
    for &b in batches {
        // Normalised-pixel-like values; content does not change a GPU's speed.
        let data: Vec<f32> = (0..b * per_image)
            .map(|i| ((i * 7919 % 1000) as f32 / 250.0) - 2.0)
            .collect();
        let x = Tensor::from_vec(data, (b, 3, INPUT_SIZE, INPUT_SIZE), &device)?;
        // Reading the result back waits for the device, so each pass is timed whole.
        model.forward(&x)?.to_vec2::<f32>()?;
        let t = Instant::now();
        let mut images = 0;
        while images < 2 * b || t.elapsed().as_secs_f64() < seconds {
            model.forward(&x)?.to_vec2::<f32>()?;
            images += b;
        }
        let rate = images as f64 / t.elapsed().as_secs_f64();
        println!("forward {kind} {precision} on {choice} batch {b:>3}: {rate:>9.1} img/s");
        record(
            json!({"what": "forward", "backbone": kind.as_str(), "dtype": precision.as_str(),
            "device": choice.to_string(), "batch": b, "images_per_s": rate}),
        )?;
    }
    Ok(())
}

fn decode(
    photos: &[Vec<u8>],
    threads: &[usize],
    four_views: bool,
    seconds: f64,
    record: impl Fn(serde_json::Value) -> Result<()>,
) -> Result<()> {
    let views = if four_views {
        &SCALES_AND_MIRRORS[..]
    } else {
        &SCALES_AND_MIRRORS[..1]
    };
    let limits = Limits::default();
    for &n in threads {
        let done = AtomicU64::new(0);
        let next = AtomicU64::new(0);
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..n {
                s.spawn(|| {
                    while t.elapsed().as_secs_f64() < seconds {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize % photos.len();
                        if preprocess_views(&photos[i], &limits, views).is_ok() {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let rate = done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64();
        println!(
            "decode {} view(s) on {n:>2} threads: {rate:>9.1} photos/s",
            views.len()
        );
        record(json!({"what": "decode", "views": views.len(), "threads": n,
            "photos_per_s": rate}))?;
    }
    Ok(())
}

async fn load(
    addr: &str,
    photos: Arc<Vec<Vec<u8>>>,
    streams: &[usize],
    (warmup, seconds): (f64, f64),
    label: &str,
    record: impl Fn(serde_json::Value) -> Result<()>,
) -> Result<()> {
    let info = wait_ready(addr).await?;
    println!(
        "server: {} {} on {}, max batch {}",
        info.backbone, info.dtype, info.device, info.max_batch
    );
    for &n in streams {
        streams_for(addr, &photos, n, warmup).await?;
        let (ok, failed, secs) = streams_for(addr, &photos, n, seconds).await?;
        let rate = ok as f64 / secs;
        println!("load {label} {n:>3} streams: {rate:>9.1} img/s ({ok} embedded, {failed} failed)");
        record(
            json!({"what": "load", "label": label, "streams": n, "images_per_s": rate,
            "embedded": ok, "failed": failed, "seconds": secs}),
        )?;
    }
    // One caller, one photo at a time, each in its own Embed call: a user's classify.
    let mut client = FeaturesClient::connect(addr.to_string()).await?;
    let mut latencies = Vec::new();
    for i in 0..50 {
        let t = Instant::now();
        let (ok, _) = embed_until(&mut client, &photos, i, 1, None).await?;
        if ok != 1 {
            bail!("a lone photo was not embedded");
        }
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
    }
    latencies.sort_by(f64::total_cmp);
    let (p50, max) = (latencies[24], latencies[49]);
    println!("load {label} one at a time: p50 {p50:.2} ms, max {max:.2} ms over 50 photos");
    record(json!({"what": "lone", "label": label, "p50_ms": p50, "max_ms": max}))?;
    Ok(())
}

/// Info from the server once its engine has loaded and warmed up (at most two minutes).
async fn wait_ready(addr: &str) -> Result<taxon_proto::v1::ModelInfo> {
    let t = Instant::now();
    loop {
        let answer = match FeaturesClient::connect(addr.to_string()).await {
            Ok(mut client) => client
                .info(taxon_proto::v1::InfoRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(anyhow::Error::from),
            Err(e) => Err(e.into()),
        };
        match answer {
            Ok(info) => return Ok(info),
            Err(e) if t.elapsed() > Duration::from_secs(120) => {
                return Err(e.context("the server was not ready within 120 s"));
            }
            // Polling a server that is starting: nothing to wait on but time.
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// `n` streams, each sending photos back to back until `seconds` have passed: (embedded,
/// failed, seconds taken until the last answer).
async fn streams_for(
    addr: &str,
    photos: &Arc<Vec<Vec<u8>>>,
    n: usize,
    seconds: f64,
) -> Result<(u64, u64, f64)> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..n {
        let (addr, photos) = (addr.to_string(), photos.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = FeaturesClient::connect(addr).await?;
            embed_until(&mut client, &photos, s * 7919, usize::MAX, Some(deadline)).await
        }));
    }
    let (mut ok, mut failed) = (0, 0);
    for task in tasks {
        let (o, f) = task.await??;
        ok += o;
        failed += f;
    }
    Ok((ok, failed, t.elapsed().as_secs_f64()))
}

/// One Embed call sending up to `count` photos (from `first`, cycling) until `deadline`:
/// (embedded, failed items).
async fn embed_until(
    client: &mut FeaturesClient<tonic::transport::Channel>,
    photos: &Arc<Vec<Vec<u8>>>,
    first: usize,
    count: usize,
    deadline: Option<Instant>,
) -> Result<(u64, u64)> {
    let photos = photos.clone();
    // Polled as the stream is sent, so the deadline is checked per photo, under HTTP/2 flow
    // control: the stream never runs ahead of what the server takes.
    let requests = (0..count).map_while(move |i| {
        deadline
            .is_none_or(|d| Instant::now() < d)
            .then(|| EmbedRequest {
                id: i.to_string(),
                image: photos[(first + i) % photos.len()].clone().into(),
                views: ViewSet::Center as i32,
            })
    });
    let mut answers = client
        .embed(tokio_stream::iter(requests))
        .await?
        .into_inner();
    let (mut ok, mut failed) = (0, 0);
    while let Some(response) = answers.message().await? {
        match response.result {
            Some(embed_response::Result::Embedding(_)) => ok += 1,
            _ => failed += 1,
        }
    }
    Ok((ok, failed))
}

/// Every JPEG under `dir`, read into memory (a few hundred photos: the load must not be bound
/// by the disk).
fn photos(dir: &Path) -> Result<Vec<Vec<u8>>> {
    let mut paths = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| d.display().to_string())? {
            let path = entry?.path();
            if path.is_dir() {
                todo.push(path);
            } else if path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("jpg") || e.eq_ignore_ascii_case("jpeg"))
            {
                paths.push(path);
            }
        }
    }
    paths.sort();
    if paths.is_empty() {
        bail!("no JPEG photos under {}", dir.display());
    }
    paths.iter().map(|p| Ok(std::fs::read(p)?)).collect()
}
