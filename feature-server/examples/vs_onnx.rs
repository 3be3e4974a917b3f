//! The Rust half of `scripts/bench-vs-onnx.sh`: our forward pass, driven over stdin/stdout by
//! the script's Python process, which times ONNX Runtime in the same run, alternating.
//!
//! Why a line protocol instead of two separate benchmarks: the machine is shared, so two runs
//! minutes apart see different loads; bursts interleaved in one run see the same load.
//!
//! `vs_onnx write-formula OUT` writes ResNet18's formula weights (the ones the parity tests
//! and the throughput bench use). `vs_onnx serve --backbone B --weights W --input X` loads the
//! backbone, reads `X` (raw little-endian f32, `[32, 3, 224, 224]`), prints `ready`, then
//! answers each command line:
//! - `run BATCH SECONDS`: one untimed pass, then passes at batch `BATCH` for at least `SECONDS`
//!   (and at least 2); prints `images seconds`;
//! - `embed BATCH OUT`: writes the `[BATCH, dim]` embeddings as raw f32 to `OUT`, prints `ok`.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use feature_server::models::{Backbone, BackboneKind, Precision};
use feature_server::preprocess::INPUT_SIZE;

const MAX_BATCH: usize = 32;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("write-formula") => {
            let out = args.get(1).context("write-formula OUT")?;
            feature_server::weights::formula::write_safetensors(
                BackboneKind::Resnet18,
                &PathBuf::from(out),
            )?;
            Ok(())
        }
        Some("serve") => serve(&args[1..]),
        _ => bail!("usage: vs_onnx write-formula OUT | serve --backbone B --weights W --input X"),
    }
}

fn flag<'a>(args: &'a [String], name: &str) -> Result<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .with_context(|| format!("missing {name}"))
}

fn serve(args: &[String]) -> Result<()> {
    let kind: BackboneKind = flag(args, "--backbone")?
        .parse()
        .map_err(anyhow::Error::msg)?;
    let weights = PathBuf::from(flag(args, "--weights")?);
    let bytes = std::fs::read(flag(args, "--input")?)?;
    let per_image = 3 * INPUT_SIZE * INPUT_SIZE;
    if bytes.len() != MAX_BATCH * per_image * 4 {
        bail!("input must hold {MAX_BATCH} images of 3x224x224 f32");
    }
    let pixels: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let device = Device::Cpu;
    let (backbone, _) = Backbone::load(kind, &weights, &device, Precision::F32)?;
    let batch = |b: usize| -> Result<Tensor> {
        if b == 0 || b > MAX_BATCH {
            bail!("batch must be 1..={MAX_BATCH}");
        }
        let data = pixels[..b * per_image].to_vec();
        Ok(Tensor::from_vec(
            data,
            (b, 3, INPUT_SIZE, INPUT_SIZE),
            &device,
        )?)
    };
    let mut out = std::io::stdout().lock();
    // What this engine really runs with, for the benchmark's header.
    writeln!(
        out,
        "ready isa={:?} threads={}",
        feature_server::models::conv::isa::isa(),
        rayon::current_num_threads()
    )?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["run", b, secs] => {
                let b: usize = b.parse()?;
                let min = Duration::from_secs_f64(secs.parse()?);
                let x = batch(b)?;
                backbone.forward(&x)?.to_vec2::<f32>()?;
                let t = Instant::now();
                let mut images = 0;
                while images < 2 * b || t.elapsed() < min {
                    backbone.forward(&x)?.to_vec2::<f32>()?;
                    images += b;
                }
                writeln!(out, "{images} {}", t.elapsed().as_secs_f64())?;
            }
            ["embed", b, path] => {
                let emb = backbone.forward(&batch(b.parse()?)?)?;
                let flat: Vec<f32> = emb.flatten_all()?.to_vec1()?;
                let raw: Vec<u8> = flat.iter().flat_map(|v| v.to_le_bytes()).collect();
                std::fs::write(path, raw)?;
                writeln!(out, "ok")?;
            }
            ["quit"] => break,
            _ => bail!("unknown command {line:?}"),
        }
        out.flush()?;
    }
    Ok(())
}
