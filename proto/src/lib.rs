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

/// The model identity carried by every embedding: `<backbone>@sha256:<hex>`. Embeddings with
/// different identities live in different spaces and must never be mixed.
pub fn model_identity(backbone: &str, weights_sha256: &str) -> String {
    format!("{backbone}@sha256:{weights_sha256}")
}

/// The identity of embeddings made from `model` (a [`model_identity`]) with a view set: views
/// change the embedding, so embeddings from different view sets must never be mixed either.
pub fn embedding_identity(model: &str, views: v1::ViewSet) -> String {
    match views {
        v1::ViewSet::Center => model.to_string(),
        v1::ViewSet::ScalesAndMirrors => format!("{model}+scales-mirrors"),
    }
}

/// Head kinds as they appear on the wire (`ClassifyRequest.head`, `TrainRequest.head`).
pub mod head_kind {
    pub const PROTOTYPE: &str = "prototype";
    pub const FLAT: &str = "flat";
    pub const HIERARCHICAL: &str = "hierarchical";
    /// Nearest class mean plus a trained linear correction: the head-trainer's default.
    pub const COMBINED: &str = "combined";
}
