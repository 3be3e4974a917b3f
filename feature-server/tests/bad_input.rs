//! Bad input over gRPC: each bad item gets its own `ItemError` naming the problem (and the
//! limit, where one applies) while its neighbours in the same stream succeed; a message over
//! the gRPC size limit ends only its own stream, and the server keeps serving.

mod common;

use common::*;
use feature_server::Config;
use feature_server::models::BackboneKind;
use feature_server::preprocess::Limits;
use tonic::Code;

/// A PNG whose header claims `width x height` pixels; its data is a few bytes, so only a
/// decoder that trusted the header would try to allocate gigabytes.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter, no interlace
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

/// PNG's CRC-32 (ISO 3309), bit by bit: a few hundred bytes need no table.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_item_fails_alone_with_a_clear_message() {
    let limits = Limits {
        max_bytes: 200_000,
        max_pixels: 40_000_000,
    };
    let config = Config {
        limits,
        ..small_config()
    };
    let server = TestServer::real(BackboneKind::MobileNetV2, config).await;
    let mut client = server.client().await;

    let good = jpeg(120, 90, 3);
    // Cut inside the headers (quantisation and Huffman tables). A cut inside the entropy-coded
    // data is decoded leniently by zune-jpeg (the rest filled in), by the preprocessing's choice.
    let truncated = jpeg(320, 240, 5)[..300].to_vec();
    // Noise does not compress: a PNG well over the 200 kB limit, under the message limit.
    let noisy = image::RgbImage::from_fn(400, 300, |x, y| {
        let v =
            (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)).wrapping_mul(2_246_822_519);
        image::Rgb([(v >> 8) as u8, (v >> 16) as u8, (v >> 24) as u8])
    });
    let oversized = encode(&noisy, image::ImageFormat::Png);
    assert!(oversized.len() > 200_000);

    let requests = vec![
        request("good-1", good.clone()),
        request("empty", Vec::new()),
        request(
            "not-an-image",
            b"this is plain text, not a picture".to_vec(),
        ),
        request("truncated-jpeg", truncated),
        request(
            "unsupported-qoi",
            b"qoif\x00\x00\x00\x10\x00\x00\x00\x10\x03\x00rest".to_vec(),
        ),
        request("bomb-png", png_claiming(30_000, 30_000)),
        request("too-many-bytes", oversized),
        request("good-2", png(50, 70, 4)),
    ];
    let answers = embed_all(&mut client, requests).await;
    assert!(
        answers.end.is_none(),
        "the stream itself succeeds: {:?}",
        answers.end
    );
    assert_eq!(answers.items.len(), 8);
    for id in ["good-1", "good-2"] {
        let embedding = answers.items[id]
            .as_ref()
            .unwrap_or_else(|e| panic!("{id}: {e:?}"));
        assert_eq!(embedding.len(), BackboneKind::MobileNetV2.dim());
    }
    let expect = |id: &str, needles: &[&str]| {
        let err = answers.items[id]
            .as_ref()
            .err()
            .unwrap_or_else(|| panic!("{id} should fail"));
        assert_eq!(err.code, Code::InvalidArgument as i32, "{id}: {err:?}");
        for needle in needles {
            assert!(
                err.message.contains(needle),
                "{id}: {:?} lacks {needle:?}",
                err.message
            );
        }
    };
    expect("empty", &["empty"]);
    expect("not-an-image", &["unsupported image format"]);
    expect("truncated-jpeg", &["Jpeg"]);
    expect("unsupported-qoi", &["unsupported image format", "Qoi"]);
    expect(
        "bomb-png",
        &["30000x30000", "--max-image-pixels", "before decoding"],
    );
    expect("too-many-bytes", &["200000", "--max-image-bytes"]);
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_grpc_limit_ends_its_stream_and_the_server_goes_on() {
    let config = Config {
        max_message_bytes: 64 * 1024,
        ..small_config()
    };
    let server = TestServer::stand_in(config).await;
    let mut client = server.client().await;
    let requests = vec![
        request("small", png(16, 16, 1)),
        request("huge", vec![0xAB; 100 * 1024]),
    ];
    let answers = embed_all(&mut client, requests).await;
    let status = answers.end.expect("the stream ends with a status");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    assert!(
        status.message().contains("65536"),
        "the limit is named: {}",
        status.message()
    );
    // Items read before the oversized message are still answered.
    assert!(answers.items["small"].is_ok());
    assert!(!answers.items.contains_key("huge"));

    let answers = embed_all(&mut client, vec![request("after", png(16, 16, 2))]).await;
    assert!(answers.end.is_none(), "{:?}", answers.end);
    assert!(answers.items["after"].is_ok());
    server.shutdown().await.expect("clean shutdown");
}
