//! Compiles `proto/taxon/v1/*.proto` with the pure-Rust `protox`, so a fresh machine needs no
//! system `protoc`. The encoded descriptor set is kept for server reflection.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "proto/taxon/v1/common.proto",
    "proto/taxon/v1/features.proto",
    "proto/taxon/v1/classifier.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("taxon_descriptor.bin"), fds.encode_to_vec())?;
    // Image fields as `bytes::Bytes`: a photo is reference-counted from the socket to the
    // feature-server call instead of copied at every hop (an enroll of 32 x 16 MiB photos
    // otherwise held three copies).
    tonic_prost_build::configure()
        .bytes(".taxon.v1")
        .compile_fds(fds)?;
    Ok(())
}
