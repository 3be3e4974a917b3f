//! Hostile images, all in ONE `Embed` stream interleaved with good photos, against a server
//! with ResNet18 loaded: every supported format with extreme declared shapes (within and beyond
//! the pixel limit), metadata bombs (a PNG colour profile inflating to 4 GiB, zTXt/iTXt, a JPEG
//! with 10 MB of EXIF/APP segments), 16-bit and CMYK images, multi-frame GIFs, a JPEG cut short
//! and patched with an end-of-image marker, an image that alone needs more than the decode
//! budget. Each gets a per-item error or a correct embedding, the good photos around them all
//! embed, and the process's peak RSS (VmHWM: server, client and the generated inputs together)
//! stays under 1 GiB. Every input is generated here; nothing is read from disk but fixtures.
//!
//! The only test in this binary, so that VmHWM is this test's alone.

mod common;

use std::time::Instant;

use common::images::{Expect, hostile_cases};
use common::*;
use feature_server::Config;
use feature_server::models::BackboneKind;
use taxon_proto::v1::EmbedRequest;

fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_images_fail_alone_and_memory_stays_bounded() {
    let started = Instant::now();
    let cases = hostile_cases();
    let generated = started.elapsed();
    let config = Config {
        decode_threads: 4,
        ..small_config()
    };
    let server = TestServer::real(BackboneKind::Resnet18, config).await;
    let mut client = server.client().await;

    let mut requests = Vec::new();
    let mut good = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let id = format!("good-{i}");
        requests.push(EmbedRequest {
            id: id.clone(),
            image: jpeg(160 + 8 * i as u32, 120, i as u32).into(),
            ..Default::default()
        });
        good.push(id);
        requests.push(EmbedRequest {
            id: c.name.to_string(),
            image: c.bytes.clone().into(),
            ..Default::default()
        });
    }
    let sent = started.elapsed();
    let answers = within("every answer", embed_all(&mut client, requests)).await;
    let answered = started.elapsed();
    assert!(
        answers.end.is_none(),
        "the stream ended with {:?}",
        answers.end
    );
    assert_eq!(answers.duplicates, 0);

    for id in &good {
        match answers.items.get(id) {
            Some(Ok(v)) => assert_eq!(v.len(), 512, "{id}"),
            other => panic!("good photo {id}: {other:?}"),
        }
    }
    let mut failures = Vec::new();
    println!("{:<34} {:>10}  outcome", "case", "bytes");
    for c in &cases {
        let answer = answers.items.get(c.name);
        let outcome = match answer {
            Some(Ok(v)) => format!("embedding (dim {})", v.len()),
            Some(Err(e)) => format!("error {}: {}", e.code, e.message),
            None => "NO ANSWER".into(),
        };
        println!("{:<34} {:>10}  {outcome}", c.name, c.bytes.len());
        let ok = match (c.expect, answer) {
            (_, None) => false,
            (Expect::Embedding | Expect::Either, Some(Ok(v))) => {
                v.len() == 512 && v.iter().all(|x| x.is_finite())
            }
            (Expect::Error(needle), Some(Err(e))) => {
                e.code == tonic::Code::InvalidArgument as i32 && e.message.contains(needle)
            }
            (Expect::Either, Some(Err(e))) => {
                e.code == tonic::Code::InvalidArgument as i32 && !e.message.is_empty()
            }
            _ => false,
        };
        if !ok {
            failures.push(format!(
                "{}: expected {:?}, got {outcome}",
                c.name, c.expect
            ));
        }
    }
    // A multi-frame GIF is its first frame.
    let embedding = |id: &str| match answers.items.get(id) {
        Some(Ok(v)) => v.clone(),
        other => panic!("{id}: {other:?}"),
    };
    let diff = relative_diff(
        &embedding("gif two frames"),
        &embedding("gif first frame alone"),
    );
    assert!(diff < 1e-5, "two-frame GIF vs its first frame: {diff}");

    let hwm = vm_hwm_kib();
    println!(
        "{} items ({} hostile) in one stream: inputs generated in {:.1} s, answered {:.1} s \
         later; peak RSS (VmHWM) {:.0} MiB of the 1024 MiB budget",
        answers.items.len(),
        cases.len(),
        generated.as_secs_f64(),
        (answered - sent).as_secs_f64(),
        hwm as f64 / 1024.0
    );
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(hwm < 1024 * 1024, "peak RSS {hwm} KiB is over 1 GiB");
    server.shutdown().await.expect("clean shutdown");
}
