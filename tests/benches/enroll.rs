//! How fast a new class goes live, what training costs, and classify latency.
//!
//! `cargo bench -p taxon-tests --bench enroll`
//!
//! 1. Time to live (real MobileNetV2 weights, real photos from ../shared/datasets/pets): a
//!    tenant knows 36 breeds (5 photos each); an Enroll of 10 new photos of the 37th breed with
//!    `wait_for_head` is timed end to end (embedding included) and from its last photo to the
//!    trained head being live. Target: 2 s.
//! 2. Training time vs classes (10, 37, 100) and examples per class, per head kind, cold and
//!    warm-started, on synthetic 1280-d embeddings (no weights needed).
//! 3. Classify latency p50/p99 for one image: repeated (embedding cached) and new photos.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use feature_server::models::BackboneKind;
use head_trainer::heads::{Head, HeadKind, TrainOptions, TrainSet};
use rand::{Rng, SeedableRng, rngs::StdRng};
use taxon_proto::v1::ClassifyRequest;
use taxon_tests::*;

const TARGET: Duration = Duration::from_secs(2);

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let weights = root.join("weights/mobilenet_v2.safetensors");
    let pets = root.join("../shared/datasets/pets");
    let only_accuracy = std::env::var("TAXON_BENCH_ONLY").is_ok_and(|v| v == "accuracy");
    if !only_accuracy {
        println!("== training time vs classes (synthetic 1280-d embeddings, 2 cores) ==");
        training_table();
    }
    if !weights.exists() {
        println!(
            "\n{} not found: make it with `cargo run -p feature-server -- fetch-weights mobilenet_v2`\n\
             (time-to-live and classify latency need real weights; skipped)",
            weights.display()
        );
        return;
    }
    if !pets.exists() {
        println!(
            "\n{} not found; time-to-live and classify latency skipped",
            pets.display()
        );
        return;
    }
    rt.block_on(live_and_latency(weights, pets));
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Synthetic embeddings, post-ReLU-like (non-negative): a large component shared by every
/// class (as in real CNN features), a small class-specific offset, and per-photo noise larger
/// than the offset, so that training has work to do.
fn synthetic(classes: usize, per: usize, seed: u64) -> Vec<(u64, Vec<f32>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let base: Vec<f32> = (0..1280)
        .map(|_| rng.random_range(0.0f32..1.0).powi(3) * 2.0)
        .collect();
    let mut rows = Vec::new();
    for c in 0..classes {
        let centre: Vec<f32> = base
            .iter()
            .map(|b| b + rng.random_range(-0.15f32..0.15))
            .collect();
        for _ in 0..per {
            let x = centre
                .iter()
                .map(|x| (x + rng.random_range(-0.5f32..0.5)).max(0.0))
                .collect();
            rows.push((c as u64, x));
        }
    }
    rows
}

fn training_table() {
    let opts = TrainOptions::default();
    println!(
        "{:>7} {:>9} {:>8} {:>13} {:>11} {:>13}",
        "classes", "per class", "examples", "kind", "cold ms", "warm +1 ms"
    );
    for classes in [10usize, 37, 100] {
        for per in [5usize, 10] {
            let rows = synthetic(classes, per, 1);
            let group = |c: u64| 1000 + c % 5;
            let before: Vec<_> = rows
                .iter()
                .filter(|r| r.0 < classes as u64 - 1)
                .cloned()
                .collect();
            let ts_before = TrainSet::new("bench", &before, group).unwrap();
            let ts = TrainSet::new("bench", &rows, group).unwrap();
            for kind in HeadKind::ALL {
                let t = Instant::now();
                let cold = Head::train(kind, &ts, None, &opts).unwrap();
                let cold_ms = ms(t.elapsed());
                let prev = Head::train(kind, &ts_before, None, &opts).unwrap();
                let t = Instant::now();
                let warm = Head::train(kind, &ts, Some(&prev), &opts).unwrap();
                let warm_ms = ms(t.elapsed());
                println!(
                    "{classes:>7} {per:>9} {:>8} {:>13} {cold_ms:>8.1} ({:>3} steps) {warm_ms:>8.1} ({:>3} steps)",
                    ts.len(),
                    kind.as_str(),
                    cold.meta.steps,
                    warm.meta.steps
                );
            }
        }
    }
}

fn breeds(pets: &Path) -> Vec<(String, String, Vec<Vec<u8>>)> {
    let mut out = Vec::new();
    for parent in ["cat", "dog"] {
        let mut dirs: Vec<_> = std::fs::read_dir(pets.join(parent))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        dirs.sort();
        for d in dirs.into_iter().filter(|d| d.is_dir()) {
            let mut files: Vec<_> = std::fs::read_dir(&d)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            let photos = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
            out.push((
                parent.to_string(),
                d.file_name().unwrap().to_string_lossy().into_owned(),
                photos,
            ));
        }
    }
    out
}

async fn live_and_latency(weights: PathBuf, pets: PathBuf) {
    let fs = start_feature_server(BackboneKind::MobileNetV2, weights).await;
    let dir = tempfile::tempdir().unwrap();
    if std::env::var("TAXON_BENCH_ONLY").is_ok_and(|v| v == "accuracy") {
        accuracy(&fs, &breeds(&pets)).await;
        return;
    }
    let ht = start_head_trainer(head_trainer::Config::new(vec![fs.url()], dir.path())).await;
    wait_serving(ht.addr, "taxon.v1.Classifier").await;
    let mut c = classifier(ht.addr);
    let md: &[(&'static str, &str)] = &[("x-tenant", "bench")];
    let all = breeds(&pets);
    let (last, known) = all.split_last().unwrap();
    let t = Instant::now();
    for (i, (parent, breed, photos)) in known.iter().enumerate() {
        let wait = i + 1 == known.len();
        enroll(&mut c, md, breed, parent, wait, photos[..5].to_vec())
            .await
            .unwrap();
    }
    println!("\n== time to live (MobileNetV2, pets) ==");
    println!(
        "setup: {} breeds x 5 photos enrolled and trained in {:.1} s",
        known.len(),
        t.elapsed().as_secs_f64()
    );
    for (round, photos) in [(1, &last.2[..]), (2, &all[0].2[5..])] {
        let (class, parent) = if round == 1 {
            (last.1.as_str(), last.0.as_str())
        } else {
            (all[0].1.as_str(), all[0].0.as_str())
        };
        let t = Instant::now();
        let r = enroll(&mut c, md, class, parent, true, photos.to_vec())
            .await
            .unwrap();
        let total = t.elapsed();
        println!(
            "enroll {} photos of {class} ({}): whole call {:.0} ms incl. embedding; last photo -> trained `{}` head live {} ms   [target {:.0} ms: {}]",
            photos.len(),
            if round == 1 {
                "a new class"
            } else {
                "an existing class"
            },
            ms(total),
            r.head,
            r.time_to_live_ms,
            ms(TARGET),
            if total <= TARGET { "met" } else { "MISSED" }
        );
    }
    let train = |kind: &'static str| {
        let mut c = c.clone();
        async move {
            let r = c
                .train(request(
                    taxon_proto::v1::TrainRequest {
                        head: kind.into(),
                        ..Default::default()
                    },
                    md,
                ))
                .await
                .unwrap()
                .into_inner();
            println!(
                "Train {kind:>12}: {:>7.1} ms ({} classes, {} examples)",
                r.train_ms, r.classes, r.examples
            );
        }
    };
    for kind in ["prototype", "flat", "hierarchical", "combined", "lda"] {
        train(kind).await;
    }

    accuracy(&fs, &all).await;

    println!("\n== classify latency (one image, live head) ==");
    let probe = all[3].2[9].clone();
    let mut repeated = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        c.classify(request(
            ClassifyRequest {
                image: probe.clone().into(),
                top_k: 5,
                head: String::new(),
            },
            md,
        ))
        .await
        .unwrap();
        repeated.push(t.elapsed());
    }
    let mut fresh = Vec::new();
    for (i, (_, _, photos)) in all.iter().enumerate().take(30) {
        let mut img = photos[9].clone();
        img.extend_from_slice(&(i as u64).to_le_bytes()); // new bytes, same picture: not cached
        let t = Instant::now();
        c.classify(request(
            ClassifyRequest {
                image: img.into(),
                top_k: 5,
                head: String::new(),
            },
            md,
        ))
        .await
        .unwrap();
        fresh.push(t.elapsed());
    }
    report("repeated photo (embedding cached)", &mut repeated);
    report("new photo (embedded by the feature-server)", &mut fresh);
    ht.stop().await;
    fs.stop().await;
}

fn report(what: &str, v: &mut [Duration]) {
    v.sort();
    let p = |q: f64| ms(v[((v.len() - 1) as f64 * q).round() as usize]);
    println!(
        "{what:<45} n={:<4} p50 {:>7.2} ms  p99 {:>7.2} ms",
        v.len(),
        p(0.5),
        p(0.99)
    );
}

/// k-shot child top-1 of every head kind on pets (the anchors' protocol, fewer seeds): a quick
/// check of the default head before the full `client eval`.
async fn accuracy(fs: &Running<feature_server::Error>, all: &[(String, String, Vec<Vec<u8>>)]) {
    use taxon_proto::v1::{EmbedRequest, ViewSet, embed_response, features_client::FeaturesClient};
    let mut client = FeaturesClient::new(channel(fs.addr))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let mut reqs = Vec::new();
    for (ci, (_, _, photos)) in all.iter().enumerate() {
        for (pi, p) in photos.iter().enumerate() {
            reqs.push(EmbedRequest {
                id: format!("{ci}/{pi}"),
                image: p.clone().into(),
                // The head-trainer's default, so the heads see what they see in service.
                views: ViewSet::ScalesAndMirrors as i32,
            });
        }
    }
    let mut stream = client
        .embed(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let mut emb: Vec<Vec<Option<Vec<f32>>>> = all.iter().map(|b| vec![None; b.2.len()]).collect();
    let mut model = String::new();
    while let Some(r) = stream.message().await.unwrap() {
        let (ci, pi) = r.id.split_once('/').unwrap();
        if let Some(embed_response::Result::Embedding(e)) = r.result {
            model = e.model.clone();
            emb[ci.parse::<usize>().unwrap()][pi.parse::<usize>().unwrap()] = Some(e.values);
        }
    }
    let parent_of = |c: u64| {
        if all[c as usize].0 == "cat" {
            1000
        } else {
            1001
        }
    };
    println!(
        "\n== k-shot child top-1 % on pets (MobileNetV2, 8 seeds; anchors: NCM 62.3/81.2/86.2/87.2, flat 60.3/80.5/84.6/88.0) =="
    );
    let variants: Vec<(&str, HeadKind, TrainOptions)> = vec![
        ("prototype", HeadKind::Prototype, TrainOptions::default()),
        ("flat", HeadKind::Flat, TrainOptions::default()),
        (
            "hierarchical",
            HeadKind::Hierarchical,
            TrainOptions::default(),
        ),
        ("combined", HeadKind::Combined, TrainOptions::default()),
        ("lda", HeadKind::Lda, TrainOptions::default()),
    ];
    print!(" k");
    for (name, _, _) in &variants {
        print!(" {name:>12}");
    }
    println!();
    for k in [1usize, 3, 5, 8] {
        let mut acc = vec![0f64; variants.len()];
        let seeds = 8;
        for seed in 0..seeds {
            let mut rng = StdRng::seed_from_u64(seed);
            let (mut train, mut test) = (Vec::new(), Vec::new());
            for (ci, photos) in emb.iter().enumerate() {
                let mut idx: Vec<usize> =
                    (0..photos.len()).filter(|&i| photos[i].is_some()).collect();
                for i in (1..idx.len()).rev() {
                    idx.swap(i, rng.random_range(0..=i));
                }
                for (n, &i) in idx.iter().enumerate() {
                    let row = (ci as u64, photos[i].clone().unwrap());
                    if n < k {
                        train.push(row)
                    } else {
                        test.push(row)
                    }
                }
            }
            let ts = TrainSet::new(&model, &train, parent_of).unwrap();
            for (ki, (_, kind, opts)) in variants.iter().enumerate() {
                let head = Head::train(*kind, &ts, None, opts).unwrap();
                let right = test
                    .iter()
                    .filter(|(c, x)| {
                        let p = head.predict(&model, x).unwrap().probs;
                        let best = p
                            .iter()
                            .enumerate()
                            .max_by(|a, b| a.1.total_cmp(b.1))
                            .unwrap()
                            .0;
                        head.meta.classes[best] == *c
                    })
                    .count();
                acc[ki] += 100.0 * right as f64 / test.len() as f64 / seeds as f64;
            }
        }
        print!("{k:>2}");
        for a in &acc {
            print!(" {a:>12.1}");
        }
        println!();
    }
}
