//! What PostgreSQL costs, and what a second head-trainer buys.
//!
//! `cargo bench -p taxon-tests --bench replicas` (needs PostgreSQL's `initdb`/`pg_ctl`; the
//! bench starts its own server on a free loopback port, as the tests do).
//!
//! 1. Store cost per request, redb vs PostgreSQL, with the backbone out of the way: an Enroll
//!    of 5 photos already embedded (so only the store works: 5 cache lookups and one write
//!    transaction), and a Classify of a photo in the in-memory cache (PostgreSQL adds the
//!    freshness check, one round trip). Medians and p90 of 200 (enroll) / 500 (classify).
//! 2. Throughput with one and with two head-trainers on one database, over two
//!    feature-servers (MobileNetV2, same compute as the real weights): 16 callers classify new
//!    photos (each one embedded) and 4 enroll new photos, for 20 s per configuration.
//!
//! Every figure is from this machine and this run; the CPU is printed first. On a machine
//! with few cores the feature-servers are the bottleneck and a second head-trainer adds
//! nothing but availability: the figures say so rather than assume a speed-up.

#[path = "../../head-trainer/tests/common/postgres.rs"]
mod postgres;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use feature_server::models::BackboneKind;
use taxon_proto::v1::ClassifyRequest;
use taxon_tests::*;

const TENANT: [(&str, &str); 1] = [("x-tenant", "bench")];

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("CPU: {}", cpu());
    let pg = postgres::TestPostgres::start().expect("the replicas bench needs PostgreSQL");
    rt.block_on(run(&pg));
}

fn cpu() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{model}, {cores} cores")
}

fn config(features: &[String], dir: &std::path::Path, db: Option<&str>) -> head_trainer::Config {
    let mut c = head_trainer::Config::new(features.to_vec(), dir);
    c.views = taxon_proto::v1::ViewSet::Center;
    c.database_url = db.map(str::to_string);
    c
}

async fn run(pg: &postgres::TestPostgres) {
    let dir = tempfile::tempdir().unwrap();
    let weights = formula_weights(BackboneKind::MobileNetV2, dir.path());
    let fs_a = start_feature_server(BackboneKind::MobileNetV2, weights.clone()).await;
    let fs_b = start_feature_server(BackboneKind::MobileNetV2, weights).await;
    let both = [fs_a.url(), fs_b.url()];

    println!("\n== store cost per request (photos already embedded; backbone idle) ==");
    println!("| store | enroll of 5 cached photos p50 / p90 | classify, cached photo p50 / p90 |");
    println!("|---|---|---|");
    let mut rows = Vec::new();
    for (name, db) in [
        ("redb (embedded)", None),
        ("PostgreSQL (loopback)", Some(pg.url())),
    ] {
        let ht =
            start_head_trainer(config(&both[..1], &dir.path().join(name), db.as_deref())).await;
        wait_serving(ht.addr, "taxon.v1.Classifier").await;
        let (enroll, classify) = store_cost(ht.addr, name).await;
        println!(
            "| {name} | {:.2} / {:.2} ms | {:.3} / {:.3} ms |",
            enroll.0, enroll.1, classify.0, classify.1
        );
        rows.push((enroll, classify));
        ht.stop().await;
    }
    println!(
        "PostgreSQL minus redb: enroll {:+.2} ms, classify {:+.3} ms (p50)",
        rows[1].0.0 - rows[0].0.0,
        rows[1].1.0 - rows[0].1.0
    );

    println!("\n== throughput on one database, two feature-servers (20 s each) ==");
    println!(
        "| head-trainers | classify photos/s (16 callers) | enroll photos/s (4 callers) | errors |"
    );
    println!("|---|---|---|---|");
    for replicas in [1, 2] {
        let mut hts = Vec::new();
        for r in 0..replicas {
            let sub = dir.path().join(format!("tp{replicas}-{r}"));
            let ht = start_head_trainer(config(&both, &sub, Some(&pg.url()))).await;
            wait_serving(ht.addr, "taxon.v1.Classifier").await;
            hts.push(ht);
        }
        let addrs: Vec<SocketAddr> = hts.iter().map(|h| h.addr).collect();
        let (classified, enrolled, errors) = throughput(&addrs, replicas).await;
        println!(
            "| {replicas} | {:.1} | {:.1} | {errors} |",
            classified / 20.0,
            enrolled / 20.0
        );
        for ht in hts {
            ht.stop().await;
        }
    }
    fs_a.stop().await;
    fs_b.stop().await;
}

fn p50_p90(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.9))
}

/// (enroll p50/p90, classify p50/p90) in ms.
async fn store_cost(addr: SocketAddr, tag: &str) -> ((f64, f64), (f64, f64)) {
    let mut client = classifier(addr);
    let images = photos(Pattern::Stripes, [200, 40, 40], 5, 1);
    // Embedded once here; every timed enroll below finds them in the store's cache.
    enroll(&mut client, &TENANT, "warm", "", false, images.clone())
        .await
        .unwrap();
    let mut enrolls = Vec::new();
    for i in 0..200 {
        let class = format!("{tag}-{i}");
        let t = Instant::now();
        let r = enroll(&mut client, &TENANT, &class, "", false, images.clone())
            .await
            .unwrap();
        enrolls.push(t.elapsed());
        assert_eq!(r.cached, 5, "the photos were embedded again");
    }
    let mut classifies = Vec::new();
    for _ in 0..500 {
        let t = Instant::now();
        client
            .classify(request(
                ClassifyRequest {
                    image: images[0].clone().into(),
                    top_k: 1,
                    head: String::new(),
                },
                &TENANT,
            ))
            .await
            .unwrap();
        classifies.push(t.elapsed());
    }
    (p50_p90(enrolls), p50_p90(classifies))
}

/// Photos classified and enrolled in 20 s, and errors.
async fn throughput(addrs: &[SocketAddr], replicas: usize) -> (f64, f64, u64) {
    let tenant = format!("tp{replicas}");
    let mut client = classifier(addrs[0]);
    enroll(
        &mut client,
        &[("x-tenant", &tenant)],
        "seed",
        "",
        false,
        photos(Pattern::Solid, [0, 90, 200], 5, 2),
    )
    .await
    .unwrap();
    let (classified, enrolled, errors) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let end = Instant::now() + Duration::from_secs(20);
    let mut tasks = Vec::new();
    for caller in 0..20u64 {
        let mut client = classifier(addrs[caller as usize % addrs.len()]);
        let (classified, enrolled, errors) = (
            Arc::clone(&classified),
            Arc::clone(&enrolled),
            Arc::clone(&errors),
        );
        let tenant = tenant.clone();
        tasks.push(tokio::spawn(async move {
            let meta = [("x-tenant", tenant.as_str())];
            let mut n = 0u64;
            while Instant::now() < end {
                n += 1;
                // A new photo every time: each one is embedded.
                let seed = 1_000_000 * (caller + 1) + n;
                let ok = if caller < 16 {
                    let image = png(Pattern::Checker, [0, 0, 0], seed);
                    let r = client
                        .classify(request(
                            ClassifyRequest {
                                image: image.into(),
                                top_k: 1,
                                head: String::new(),
                            },
                            &meta,
                        ))
                        .await;
                    r.is_ok()
                        .then(|| classified.fetch_add(1, Ordering::Relaxed))
                } else {
                    let images = photos(Pattern::Stripes, [(seed % 255) as u8, 80, 80], 4, seed);
                    let class = format!("c{caller}");
                    let r = enroll(&mut client, &meta, &class, "", false, images).await;
                    r.is_ok().then(|| enrolled.fetch_add(4, Ordering::Relaxed))
                };
                if ok.is_none() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (
        classified.load(Ordering::Relaxed) as f64,
        enrolled.load(Ordering::Relaxed) as f64,
        errors.load(Ordering::Relaxed),
    )
}
