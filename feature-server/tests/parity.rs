//! Parity with PyTorch/torchvision: the reference outputs in `fixtures/` (copied from
//! ../shared/reference, see its README) prove that our preprocessing and backbones compute
//! what torchvision computes. Every check prints its worst figure, so a regression that still
//! passes is visible in the log.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use feature_server::models::{Backbone, BackboneKind, Precision};
use feature_server::preprocess::{INPUT_SIZE, Limits, preprocess};
use feature_server::weights::{self, formula};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const IMAGES: [&str; 8] = [
    "a_photo.jpg",
    "b_photo.jpg",
    "c_gray.jpg",
    "d_alpha.png",
    "e_tiny.png",
    "f_wide.jpg",
    "g_exif_rot6.jpg",
    "h_photo.webp",
];

/// Where the networks run: `cpu` (default) or, in builds with `--features cuda`, `cuda`
/// (`TAXON_TEST_DEVICE=cuda`), so the same tolerances are checked on a GPU.
fn device() -> Device {
    match std::env::var("TAXON_TEST_DEVICE").as_deref() {
        Ok("cuda") => {
            Device::new_cuda(0).expect("TAXON_TEST_DEVICE=cuda needs a GPU and --features cuda")
        }
        _ => Device::Cpu,
    }
}

/// Runs the backbone on [`device`] and brings the result back for comparison.
fn forward(model: &Backbone, x: &Tensor) -> candle_core::Result<Tensor> {
    model
        .forward(&x.to_device(&device())?)?
        .to_device(&Device::Cpu)
}

/// `TAXON_TEST_FIXTURES`, else this crate's `tests/fixtures`: a test binary carried to another
/// machine (the GPU check) finds them where that machine's checkout has them.
fn fixtures() -> PathBuf {
    std::env::var_os("TAXON_TEST_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
}

fn expected(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.to_vec2())
        .expect("a 2-D f32 tensor")
}

fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

fn dist(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum();
    dot / (norm(a) * norm(b))
}

/// `|a - b| / |b|` per row, with the worst printed under `label`.
fn check_relative(label: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let (got, want) = (rows(got), rows(want));
    assert_eq!(got.len(), want.len(), "{label}: row count");
    let errs: Vec<f64> = got
        .iter()
        .zip(&want)
        .map(|(g, w)| dist(g, w) / norm(w))
        .collect();
    let (worst, at) = worst(&errs);
    println!(
        "{label}: worst |emb-ref|/|ref| = {worst:.3e} ({}) [tol {tol:.1e}]",
        IMAGES[at]
    );
    for (i, e) in errs.iter().enumerate() {
        assert!(
            *e <= tol,
            "{label}: {} relative error {e:.3e} > {tol:.1e}",
            IMAGES[i]
        );
    }
}

fn worst(v: &[f64]) -> (f64, usize) {
    v.iter().copied().enumerate().fold(
        (f64::MIN, 0),
        |(m, at), (i, x)| if x > m { (x, i) } else { (m, at) },
    )
}

fn formula_backbone(kind: BackboneKind, fold: bool) -> Backbone {
    let vb = VarBuilder::from_tensors(formula::tensors(kind), DType::F32, &device());
    Backbone::new_with(kind, vb, fold).expect("formula weights build the backbone")
}

/// Our preprocessing of the eight fixture images, as `[8, 3, 224, 224]`.
fn preprocess_fixtures() -> Tensor {
    let mut data = Vec::with_capacity(IMAGES.len() * 3 * INPUT_SIZE * INPUT_SIZE);
    for name in IMAGES {
        let bytes = std::fs::read(fixtures().join("images").join(name)).expect("fixture image");
        data.extend(
            preprocess(&bytes, &Limits::default()).unwrap_or_else(|e| panic!("{name}: {e}")),
        );
    }
    Tensor::from_vec(
        data,
        (IMAGES.len(), 3, INPUT_SIZE, INPUT_SIZE),
        &Device::Cpu,
    )
    .expect("batch")
}

#[test]
fn formula_probe_matches_manifest() -> TestResult {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("resnet18_manifest.json"))?)?;
    let tensors = formula::tensors(BackboneKind::Resnet18);
    let probes = manifest["formula_probe"]
        .as_object()
        .ok_or("no formula_probe")?;
    assert_eq!(probes.len(), 4);
    for (name, probe) in probes {
        let t = tensors
            .get(name)
            .ok_or_else(|| format!("formula lacks {name}"))?;
        let shape: Vec<usize> = serde_json::from_value(probe["shape"].clone())?;
        assert_eq!(t.dims(), shape.as_slice(), "{name} shape");
        let values = t.flatten_all()?.to_vec1::<f32>()?;
        let first4: Vec<f64> = serde_json::from_value(probe["first4"].clone())?;
        for (i, (&got, want)) in values.iter().zip(&first4).enumerate() {
            // The manifest prints f64s that round to the f32 values: compare in f32, bit for bit.
            assert_eq!(
                got.to_bits(),
                (*want as f32).to_bits(),
                "{name}[{i}]: {got} vs {want}"
            );
        }
        let sum: f64 = values.iter().map(|&v| f64::from(v)).sum();
        let want = probe["sum_f64"].as_f64().ok_or("sum_f64")?;
        assert!(
            (sum - want).abs() <= 1e-9 * want.abs().max(1.0),
            "{name} sum {sum} != {want}"
        );
    }
    println!("formula probe: 4 tensors match bit for bit (first values) and by f64 sum");
    // Every state-dict tensor: torchvision has 122, of which 20 are num_batches_tracked.
    assert_eq!(tensors.len(), 102);
    Ok(())
}

#[test]
fn resnet18_network_alone_matches_reference() -> TestResult {
    let exp = expected("resnet18_expected.safetensors");
    for fold in [true, false] {
        let model = formula_backbone(BackboneKind::Resnet18, fold);
        let emb = forward(&model, &exp["preprocessed"])?;
        let tag = if fold { "folded" } else { "unfolded" };
        check_relative(
            &format!("resnet18 network ({tag})"),
            &emb,
            &exp["embeddings"],
            1e-4,
        );
        let logits = model
            .fc_logits(&emb.to_device(&device())?)?
            .map(|l| l.to_device(&Device::Cpu))
            .transpose()?
            .ok_or("resnet18 formula weights carry fc")?;
        check_relative(
            &format!("resnet18 fc_logits ({tag})"),
            &logits,
            &exp["fc_logits"],
            1e-4,
        );
    }
    Ok(())
}

#[test]
fn preprocessing_alone_matches_reference() -> TestResult {
    let exp = expected("resnet18_expected.safetensors");
    let ours = preprocess_fixtures();
    let (mut worst_mean, mut worst_max) = ((0.0, 0), (0.0f32, 0));
    for (i, name) in IMAGES.iter().enumerate() {
        let diff = (ours.i(i)? - exp["preprocessed"].i(i)?)?
            .abs()?
            .flatten_all()?;
        let mean = f64::from(diff.mean_all()?.to_scalar::<f32>()?);
        let max = diff.max_all()?.to_scalar::<f32>()?;
        println!("preprocess {name}: mean |diff| {mean:.5}, max {max:.4}");
        assert!(mean <= 0.01, "{name}: mean |diff| {mean} > 0.01");
        assert!(max <= 0.1, "{name}: max |diff| {max} > 0.1");
        if mean > worst_mean.0 {
            worst_mean = (mean, i);
        }
        if max > worst_max.0 {
            worst_max = (max, i);
        }
    }
    println!(
        "preprocessing: worst mean |diff| = {:.5} ({}), worst max |diff| = {:.4} ({}) [tol 0.01 / 0.1]",
        worst_mean.0, IMAGES[worst_mean.1], worst_max.0, IMAGES[worst_max.1]
    );
    Ok(())
}

#[test]
fn resnet18_end_to_end_matches_reference() -> TestResult {
    let exp = expected("resnet18_expected.safetensors");
    let model = formula_backbone(BackboneKind::Resnet18, true);
    let emb = rows(&forward(&model, &preprocess_fixtures())?);
    let want = rows(&exp["embeddings"]);
    // Random weights put most of an embedding in a direction all images share; measuring
    // against the spread around the mean tells a right pipeline from a wrong one.
    let dim = want[0].len();
    let mean: Vec<f32> = (0..dim)
        .map(|j| want.iter().map(|r| r[j]).sum::<f32>() / want.len() as f32)
        .collect();
    let errs: Vec<f64> = emb
        .iter()
        .zip(&want)
        .map(|(e, w)| {
            let centred: Vec<f32> = w.iter().zip(&mean).map(|(a, b)| a - b).collect();
            dist(e, w) / norm(&centred)
        })
        .collect();
    let (w, at) = worst(&errs);
    println!(
        "resnet18 end to end: worst |emb-ref|/|ref-mean_ref| = {w:.4} ({}) [tol 0.03]",
        IMAGES[at]
    );
    for (i, e) in errs.iter().enumerate() {
        assert!(*e <= 0.03, "{}: {e:.4} > 0.03", IMAGES[i]);
    }
    Ok(())
}

/// The real MobileNetV2 weights: `TAXON_MOBILENET_WEIGHTS`, else the workspace's
/// `weights/mobilenet_v2.safetensors` (what `.ci/run` fetches before the tests). Missing weights
/// fail the test in CI (`CI=true`); elsewhere the test says so and checks nothing.
fn mobilenet_weights() -> Option<PathBuf> {
    let path = std::env::var_os("TAXON_MOBILENET_WEIGHTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../weights/mobilenet_v2.safetensors")
        });
    if path.is_file() {
        return Some(path);
    }
    let why = format!(
        "{} not found (feature-server fetch-weights mobilenet_v2 --out weights, or set \
         TAXON_MOBILENET_WEIGHTS)",
        path.display()
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("the MobileNetV2 parity checks need the real weights in CI: {why}");
    }
    println!("SKIPPED (not CI): {why}");
    None
}

#[test]
fn mobilenet_v2_real_weights_match_reference() -> TestResult {
    let Some(path) = mobilenet_weights() else {
        return Ok(());
    };
    let (model, sha) = Backbone::load(BackboneKind::MobileNetV2, &path, &device(), Precision::F32)?;
    println!("mobilenet_v2 weights {} sha256 {sha}", path.display());
    let want = &expected("mobilenet_v2_expected.safetensors")["embeddings"];
    // The mobilenet reference has only embeddings; the inputs are the same images with the
    // same recipe, so resnet18's reference tensors are its inputs too.
    let pre = &expected("resnet18_expected.safetensors")["preprocessed"];
    check_relative("mobilenet_v2 network", &forward(&model, pre)?, want, 1e-4);
    let unfolded = {
        let vb = VarBuilder::from_tensors(
            weights::load_tensors(&path, &Device::Cpu)?,
            DType::F32,
            &device(),
        );
        Backbone::new_with(BackboneKind::MobileNetV2, vb, false)?
    };
    check_relative(
        "mobilenet_v2 network (unfolded)",
        &forward(&unfolded, pre)?,
        want,
        1e-4,
    );
    let emb = rows(&forward(&model, &preprocess_fixtures())?);
    let cos: Vec<f64> = emb
        .iter()
        .zip(&rows(want))
        .map(|(a, b)| -cosine(a, b))
        .collect();
    let (w, at) = worst(&cos);
    println!(
        "mobilenet_v2 end to end: worst cosine = {:.5} ({}) [tol 0.999]",
        -w, IMAGES[at]
    );
    for (i, c) in cos.iter().enumerate() {
        assert!(-c >= 0.999, "{}: cosine {} < 0.999", IMAGES[i], -c);
    }
    Ok(())
}

/// f16 and bf16 against the same PyTorch references (made in f32): what each precision costs,
/// per image, held to a tolerance measured on it. Runs on [`device`], so with
/// `TAXON_TEST_DEVICE=cuda` it measures the GPU's half-precision kernels.
#[test]
fn half_precision_matches_reference_within_its_tolerance() -> TestResult {
    let exp = expected("resnet18_expected.safetensors");
    let mobilenet = mobilenet_weights();
    let mobilenet_want = &expected("mobilenet_v2_expected.safetensors")["embeddings"];
    // candle has no bf16 matrix product on a CPU; the server refuses `--dtype bf16` there.
    let precisions: &[Precision] = if device().is_cpu() {
        &[Precision::F16]
    } else {
        &[Precision::F16, Precision::Bf16]
    };
    for &precision in precisions {
        let vb = VarBuilder::from_tensors(
            formula::tensors(BackboneKind::Resnet18),
            precision.dtype(),
            &device(),
        );
        let model = Backbone::new(BackboneKind::Resnet18, vb)?;
        let emb = forward(&model, &exp["preprocessed"])?;
        check_relative(
            &format!("resnet18 network ({precision})"),
            &emb,
            &exp["embeddings"],
            half_tolerance(BackboneKind::Resnet18, precision),
        );
        if let Some(path) = &mobilenet {
            let (model, _) = Backbone::load(BackboneKind::MobileNetV2, path, &device(), precision)?;
            check_relative(
                &format!("mobilenet_v2 network ({precision})"),
                &forward(&model, &exp["preprocessed"])?,
                mobilenet_want,
                half_tolerance(BackboneKind::MobileNetV2, precision),
            );
        }
    }
    Ok(())
}

/// Relative embedding error allowed at half precision (f32 is held to 1e-4). f16, measured on
/// a CPU (candle's ops; the worst of the eight images): ResNet18 1.1e-3, MobileNetV2 2.1e-2
/// (its activations are rounded to 11 bits after each of 52 layers, and the linear bottlenecks
/// carry the error on). Twice that is allowed. bf16 keeps 3 fewer mantissa bits, so about 8x
/// f16's error is expected; it runs on GPUs only and is not yet measured on one (issue #16).
fn half_tolerance(kind: BackboneKind, precision: Precision) -> f64 {
    match (kind, precision) {
        (_, Precision::F32) => 1e-4,
        (BackboneKind::Resnet18, Precision::F16) => 2.5e-3,
        (BackboneKind::MobileNetV2, Precision::F16) => 4.5e-2,
        (BackboneKind::Resnet18, Precision::Bf16) => 2e-2,
        (BackboneKind::MobileNetV2, Precision::Bf16) => 0.35,
    }
}

/// A legacy (pre-1.6) `torch.save` file, written by hand in the old deep-sort key layout, is
/// read back bit for bit, renamed to torchvision's names, and strided views are honoured.
#[test]
fn legacy_reader_and_renamer_round_trip() -> TestResult {
    let w: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
    let gamma = vec![1.0f32, 2.0, 3.0, 4.0];
    let entries = vec![
        legacy_writer::Entry::f32("features.0.0.weight", &[4, 2, 3, 1], &w),
        legacy_writer::Entry::f32("features.1.conv.3.weight", &[4], &gamma),
        // A transposed view: size (3, 2) with stride (1, 3) over a 6-element storage.
        legacy_writer::Entry::strided_f32(
            "features.5.conv.7.bias",
            &[3, 2],
            &[1, 3],
            &[0., 1., 2., 3., 4., 5.],
        ),
        legacy_writer::Entry::i64("features.5.conv.7.num_batches_tracked", 42),
    ];
    let bytes = legacy_writer::write(&entries);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("tiny_legacy.pt");
    std::fs::write(&path, &bytes)?;
    assert_eq!(
        weights::sniff_layout(&bytes),
        Some(weights::Layout::TorchLegacy)
    );

    let raw = weights::load_tensors(&path, &Device::Cpu)?;
    assert_eq!(
        raw.len(),
        3,
        "num_batches_tracked is dropped: {:?}",
        raw.keys()
    );
    assert_eq!(raw["features.0.0.weight"].dims(), &[4, 2, 3, 1]);
    assert_eq!(
        raw["features.0.0.weight"].flatten_all()?.to_vec1::<f32>()?,
        w
    );
    assert_eq!(
        raw["features.5.conv.7.bias"].to_vec2::<f32>()?,
        vec![vec![0., 3.], vec![1., 4.], vec![2., 5.]]
    );

    let renamed = feature_server::weights::fetch::convert_deep_sort(&bytes)?;
    let mut names: Vec<_> = renamed.keys().cloned().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "features.0.0.weight",
            "features.1.conv.1.weight",
            "features.5.conv.3.bias"
        ]
    );
    assert_eq!(renamed["features.1.conv.1.weight"].to_vec1::<f32>()?, gamma);

    // Truncation anywhere is an error, never a panic.
    for cut in [0, 1, 14, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..cut])?;
        assert!(
            weights::load_tensors(&path, &Device::Cpu).is_err(),
            "cut at {cut}"
        );
    }
    Ok(())
}

#[test]
fn renamer_follows_the_reference_table() {
    use feature_server::weights::legacy_pt::rename_mobilenet_v2_key as rename;
    let cases = [
        ("features.0.1.running_var", "features.0.1.running_var"),
        ("features.18.0.weight", "features.18.0.weight"),
        ("features.1.conv.0.weight", "features.1.conv.0.0.weight"),
        ("features.1.conv.4.bias", "features.1.conv.2.bias"),
        ("features.2.conv.3.weight", "features.2.conv.1.0.weight"),
        (
            "features.17.conv.4.running_mean",
            "features.17.conv.1.1.running_mean",
        ),
        ("features.9.conv.6.weight", "features.9.conv.2.weight"),
        ("features.9.conv.7.bias", "features.9.conv.3.bias"),
    ];
    for (old, new) in cases {
        assert_eq!(rename(old).as_deref(), Ok(new), "{old}");
    }
    assert!(rename("features.1.conv.6.weight").is_err());
    assert!(rename("classifier.1.weight").is_err());
}

/// Formula weights written by `write_safetensors` load through `Backbone::load` for both
/// kinds (other crates' tests rely on this), and the identity is the file's sha256.
#[test]
fn formula_safetensors_load_for_both_backbones() -> TestResult {
    let dir = tempfile::tempdir()?;
    for kind in BackboneKind::ALL {
        let path = dir.path().join(format!("{kind}.safetensors"));
        formula::write_safetensors(kind, &path)?;
        let (model, sha) = Backbone::load(kind, &path, &Device::Cpu, Precision::F32)?;
        assert_eq!(sha, weights::sha256_file(&path)?);
        assert_eq!((model.kind(), model.dim()), (kind, kind.dim()));
        assert_eq!(kind.to_string().parse::<BackboneKind>()?, kind);
        let x = Tensor::zeros((1, 3, INPUT_SIZE, INPUT_SIZE), DType::F32, &Device::Cpu)?;
        assert_eq!(model.forward(&x)?.dims(), &[1, kind.dim()]);
    }
    Ok(())
}

/// Folding batch-norm must not make inference slower. Timing-sensitive, so run on demand:
/// `cargo test --release -p feature-server --test parity -- --ignored --nocapture fold_speed`.
#[test]
#[ignore]
fn fold_speed() -> TestResult {
    let batch = std::env::var("TAXON_BENCH_BATCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8usize);
    let rounds = 5;
    for kind in BackboneKind::ALL {
        let models = [formula_backbone(kind, false), formula_backbone(kind, true)];
        let x = Tensor::randn(0f32, 1., (batch, 3, INPUT_SIZE, INPUT_SIZE), &Device::Cpu)?;
        models[0].forward(&x)?;
        models[1].forward(&x)?;
        let mut times = [Vec::new(), Vec::new()];
        for _ in 0..rounds {
            // Alternate the two so drift in machine load hits both alike.
            for (m, t) in models.iter().zip(times.iter_mut()) {
                let start = Instant::now();
                m.forward(&x)?;
                t.push(start.elapsed().as_secs_f64());
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (unfolded, folded) = (median(&mut times[0]), median(&mut times[1]));
        println!(
            "{kind} batch {batch}: unfolded {:.1} img/s, folded {:.1} img/s ({:+.1} %)",
            batch as f64 / unfolded,
            batch as f64 / folded,
            (unfolded / folded - 1.0) * 100.0
        );
    }
    Ok(())
}

/// A minimal writer of PyTorch's legacy `torch.save` layout (protocol-2 pickles, then raw
/// storages), so the reader is tested without PyTorch and without the 9 MB real file.
mod legacy_writer {
    pub struct Entry {
        name: String,
        storage: &'static str,
        size: Vec<usize>,
        stride: Vec<usize>,
        data: Vec<u8>,
        numel: usize,
    }

    fn contiguous_stride(size: &[usize]) -> Vec<usize> {
        let mut stride = vec![1; size.len()];
        for d in (0..size.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * size[d + 1];
        }
        stride
    }

    impl Entry {
        pub fn f32(name: &str, size: &[usize], data: &[f32]) -> Self {
            Self::strided_f32(name, size, &contiguous_stride(size), data)
        }
        pub fn strided_f32(name: &str, size: &[usize], stride: &[usize], data: &[f32]) -> Self {
            Self {
                name: name.into(),
                storage: "FloatStorage",
                size: size.to_vec(),
                stride: stride.to_vec(),
                data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                numel: data.len(),
            }
        }
        pub fn i64(name: &str, v: i64) -> Self {
            let (size, stride) = (vec![], vec![]);
            let data = v.to_le_bytes().to_vec();
            Self {
                name: name.into(),
                storage: "LongStorage",
                size,
                stride,
                data,
                numel: 1,
            }
        }
    }

    fn unicode(out: &mut Vec<u8>, s: &str) {
        out.push(b'X');
        out.extend((s.len() as u32).to_le_bytes());
        out.extend(s.as_bytes());
    }

    fn int(out: &mut Vec<u8>, v: usize) {
        out.push(b'J');
        out.extend((v as i32).to_le_bytes());
    }

    fn ints(out: &mut Vec<u8>, vs: &[usize]) {
        out.push(b'(');
        vs.iter().for_each(|&v| int(out, v));
        out.push(b't');
    }

    pub fn write(entries: &[Entry]) -> Vec<u8> {
        let mut out = vec![0x80, 2, 0x8a, 10];
        out.extend(&0x1950a86a20f9469cfc6c_u128.to_le_bytes()[..10]);
        out.push(b'.');
        out.extend([0x80, 2, b'M', 0xe9, 0x03, b'.']); // 1001
        out.extend([0x80, 2, b'}', b'(']);
        unicode(&mut out, "protocol_version");
        out.extend([b'M', 0xe9, 0x03]);
        unicode(&mut out, "little_endian");
        out.push(0x88);
        out.extend(b"u.");
        // The state dict: OrderedDict() filled by SETITEMS, then a BUILD of its attributes.
        out.extend([0x80, 2]);
        out.extend(b"ccollections\nOrderedDict\nq\x00)R(");
        for (i, e) in entries.iter().enumerate() {
            unicode(&mut out, &e.name);
            if i == 0 {
                out.extend(b"ctorch._utils\n_rebuild_tensor_v2\nq\x01");
            } else {
                out.extend(b"h\x01");
            }
            out.extend(b"((");
            unicode(&mut out, "storage");
            out.extend(format!("ctorch\n{}\n", e.storage).as_bytes());
            unicode(&mut out, &format!("key{i}"));
            unicode(&mut out, "cpu");
            int(&mut out, e.numel);
            out.extend(b"NtQ");
            int(&mut out, 0);
            ints(&mut out, &e.size);
            ints(&mut out, &e.stride);
            out.extend(b"\x89h\x00)RtR");
        }
        out.extend(b"u}b.");
        out.extend([0x80, 2, b']', b'(']);
        (0..entries.len()).for_each(|i| unicode(&mut out, &format!("key{i}")));
        out.extend(b"e.");
        for e in entries {
            out.extend((e.numel as u64).to_le_bytes());
            out.extend(&e.data);
        }
        out
    }
}
