//! The service's request handling: arbitrary bytes as a protobuf `EmbedRequest` (what tonic
//! hands the service), through the view-set lookup and the image path the engine runs, and the
//! `grpc-timeout` header parser on the same bytes.
#![no_main]

use feature_server::preprocess::{Limits, preprocess_views};
use feature_server::service::views_of_request;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use taxon_proto::v1::EmbedRequest;

const LIMITS: Limits = Limits {
    max_bytes: 1 << 20,
    max_pixels: 4_000_000,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data.get(..data.len().min(24)).unwrap_or_default())
        && let Ok(value) = tonic::metadata::MetadataValue::try_from(text)
    {
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert("grpc-timeout", value);
        let _ = taxon_proto::grpc_timeout(&metadata);
    }
    let Ok(request) = EmbedRequest::decode(data) else {
        return;
    };
    match views_of_request(request.views) {
        Ok((_, views)) => {
            if let Ok(tensors) = preprocess_views(&request.image, &LIMITS, views) {
                assert_eq!(tensors.len(), views.len());
            }
        }
        Err(err) => assert_eq!(err.code(), tonic::Code::InvalidArgument),
    }
});
