//! The `taxon.v1` gRPC contract, shared by the feature-server, the head-trainer, the client and
//! the integration tests, so that no binary imports another's code (they talk gRPC).
//!
//! Also the few conventions every side must agree on: the tenant metadata key and the
//! model-identity format.

#![allow(clippy::doc_markdown, missing_docs)]

/// Generated messages, clients and servers of package `taxon.v1`.
pub mod v1 {
    tonic::include_proto!("taxon.v1");
}

/// Encoded `FileDescriptorSet` of every `taxon.v1` file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/taxon_descriptor.bin"));

/// gRPC metadata key that names the tenant when the server runs without bearer tokens.
pub const TENANT_HEADER: &str = "x-tenant";

/// The tenant a request without `x-tenant` belongs to.
pub const DEFAULT_TENANT: &str = "default";

/// The model identity carried by every embedding: `<backbone>@sha256:<hex>`, with `+f16` or
/// `+bf16` after it when the backbone computes at half precision (f32, the default, keeps the
/// bare form, so caches built before precisions existed stay valid). Embeddings with different
/// identities live in different spaces and must never be mixed.
pub fn model_identity(backbone: &str, weights_sha256: &str, dtype: &str) -> String {
    match dtype {
        "f32" => format!("{backbone}@sha256:{weights_sha256}"),
        other => format!("{backbone}@sha256:{weights_sha256}+{other}"),
    }
}

/// The identity of embeddings made from `model` (a [`model_identity`]) with a view set: views
/// change the embedding, so embeddings from different view sets must never be mixed either.
pub fn embedding_identity(model: &str, views: v1::ViewSet) -> String {
    match views {
        v1::ViewSet::Center => model.to_string(),
        v1::ViewSet::ScalesAndMirrors => format!("{model}+scales-mirrors"),
    }
}

/// Bytes per `FileChunk` of a tenant file (Export, Import): well under any message limit.
pub const FILE_CHUNK_BYTES: usize = 1 << 20;

/// A tenant file as the chunks Export streams and Import takes, in order: slices of the one
/// buffer, not copies. Both sides cut it here, so they agree on the size.
pub fn file_chunks(file: prost::bytes::Bytes) -> Vec<v1::FileChunk> {
    (0..file.len())
        .step_by(FILE_CHUNK_BYTES)
        .map(|at| v1::FileChunk {
            data: file.slice(at..file.len().min(at + FILE_CHUNK_BYTES)),
        })
        .collect()
}

/// Head kinds as they appear on the wire (`ClassifyRequest.head`, `TrainRequest.head`).
pub mod head_kind {
    pub const PROTOTYPE: &str = "prototype";
    pub const FLAT: &str = "flat";
    pub const HIERARCHICAL: &str = "hierarchical";
    /// Nearest class mean plus a trained linear correction.
    pub const COMBINED: &str = "combined";
    /// Shrinkage LDA or nearest class mean, chosen per tenant by cross-validation: the
    /// head-trainer's default.
    pub const LDA: &str = "lda";
}

/// The caller's deadline from the `grpc-timeout` header (`<up to 8 digits><unit>`, unit one
/// of H M S m u n), as gRPC defines it. Tonic enforces it on unary calls itself, but a server
/// that calls another service must pass on what remains of it, and a stream is bounded by it
/// only until its response headers; both sides read it here.
pub fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn timeout_of(value: &str) -> Option<Duration> {
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert("grpc-timeout", value.parse().unwrap());
        grpc_timeout(&metadata)
    }

    #[test]
    fn parses_grpc_timeout() {
        assert_eq!(timeout_of("5S"), Some(Duration::from_secs(5)));
        assert_eq!(timeout_of("250m"), Some(Duration::from_millis(250)));
        assert_eq!(timeout_of("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(timeout_of("10u"), Some(Duration::from_micros(10)));
        assert_eq!(timeout_of("S"), None);
        assert_eq!(timeout_of("+5S"), None);
        assert_eq!(timeout_of("123456789S"), None);
        assert_eq!(timeout_of("5x"), None);
        assert_eq!(grpc_timeout(&tonic::metadata::MetadataMap::new()), None);
    }
}

/// `RESOURCE_EXHAUSTED`: a gRPC status code as the gRPC spec (and every other tool) spells it.
/// One spelling for the client's messages and both servers' metric labels; static, so a
/// label costs no allocation per call.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod code_name_tests {
    #[test]
    fn every_code_is_spelled_as_grpc_does() {
        for i in 0..=16 {
            let code = tonic::Code::from_i32(i);
            // tonic's Debug name in SCREAMING_SNAKE_CASE is the spec's spelling.
            let camel = format!("{code:?}");
            let mut want = String::new();
            for (j, c) in camel.chars().enumerate() {
                if c.is_ascii_uppercase() && j > 0 {
                    want.push('_');
                }
                want.push(c.to_ascii_uppercase());
            }
            assert_eq!(super::code_name(code), want);
        }
        assert_eq!(super::code_name(tonic::Code::from_i32(99)), "UNKNOWN");
    }
}
