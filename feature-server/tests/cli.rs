//! The `feature-server` binary itself: flags and env parse, bad flags fail clearly, and
//! SIGTERM stops it with exit status 0 (the path docker and kubernetes take; draining in-flight
//! items on shutdown is tested in-process in service.rs).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;
use feature_server::models::BackboneKind;

const BIN: &str = env!("CARGO_BIN_EXE_feature-server");

#[test]
fn cuda_without_the_feature_is_a_clear_error() {
    if cfg!(feature = "cuda") {
        return;
    }
    let out = Command::new(BIN)
        .args(["--weights", "nowhere.safetensors", "--device", "cuda"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run the binary");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--features cuda"), "{stderr}");
}

#[test]
fn serving_needs_weights() {
    let out = Command::new(BIN)
        .env_remove("TAXON_WEIGHTS")
        .output()
        .expect("run the binary");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--weights"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_binary_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let weights = dir.path().join("m.safetensors");
    feature_server::weights::formula::write_safetensors(BackboneKind::MobileNetV2, &weights)
        .expect("formula weights");
    // Flags through the environment, as docker-compose passes them.
    let mut child = Command::new(BIN)
        .env("TAXON_LISTEN", "127.0.0.1:0")
        .env("TAXON_BACKBONE", "mobilenet_v2")
        .env("TAXON_WEIGHTS", &weights)
        .env("TAXON_MAX_BATCH", "4")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the binary");
    let stdout = child.stdout.take().expect("stdout");
    // The log says where it listens, then that it is serving.
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let reader = std::thread::spawn(move || {
        let mut addr_tx = Some(addr_tx);
        let mut addr = None;
        let mut logs = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if addr.is_none() {
                addr = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
                    .map(str::to_string);
            }
            if line.contains("serving")
                && let Some(addr) = &addr
                && let Some(tx) = addr_tx.take()
            {
                let _ = tx.send(addr.clone());
            }
            logs.push(line);
        }
        logs
    });
    let addr = within("the binary to serve", addr_rx)
        .await
        .expect("a serving log line");
    let server_addr: std::net::SocketAddr = addr.parse().expect("an address");

    let channel = tonic::transport::Channel::from_shared(format!("http://{server_addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut client = taxon_proto::v1::features_client::FeaturesClient::new(channel);
    let requests = (0..6)
        .map(|i| request(format!("t{i}"), png(32, 32, i)))
        .collect();
    let answers = embed_all(&mut client, requests).await;
    assert_eq!(answers.items.len(), 6);
    assert!(answers.items.values().all(Result::is_ok));

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = within(
        "the binary to exit",
        tokio::task::spawn_blocking(move || child.wait()),
    )
    .await
    .expect("join")
    .expect("wait");
    let logs = reader.join().expect("log reader").join("\n");
    assert!(status.success(), "exit {status:?}\n{logs}");
    assert!(logs.contains("SIGTERM received"), "{logs}");
    assert!(logs.contains("feature-server stopped"), "{logs}");
}
