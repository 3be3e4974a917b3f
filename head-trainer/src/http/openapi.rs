//! `GET /openapi.json`: the OpenAPI 3.1 document, generated from the handlers' attributes
//! and the wire types, so it describes exactly the routes that are served.

use axum::Json;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use super::{classes, classify, probes, report, wire};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Taxon head-trainer",
        description = "Teach an image classifier new classes from a handful of photos. \
            The same operations as the gRPC service taxon.v1.Classifier, over HTTP/JSON."
    ),
    paths(
        classes::list, classes::add_photos, classes::rename, classes::remove,
        classify::classify, probes::healthz, probes::readyz, probes::info, report::report,
    ),
    components(schemas(
        wire::ErrorJson, wire::ClassJson, wire::ClassesJson, wire::RejectedJson,
        wire::EnrolledJson, wire::ChildJson, wire::ParentJson, wire::ClassifiedJson,
        wire::RenameJson, wire::HeadJson, wire::RemovedJson, wire::InfoJson, wire::ProbeJson,
        report::ReportJson, report::ClassQualityJson, report::ConfusedPairJson,
        report::SuspectJson,
    )),
    modifiers(&BearerAuth),
)]
struct ApiDoc;

/// Declares the `bearer` scheme the operations name (needed only with a tokens file).
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The document, built once.
pub fn spec() -> &'static utoipa::openapi::OpenApi {
    static SPEC: std::sync::OnceLock<utoipa::openapi::OpenApi> = std::sync::OnceLock::new();
    SPEC.get_or_init(ApiDoc::openapi)
}

pub async fn document() -> Json<&'static utoipa::openapi::OpenApi> {
    Json(spec())
}

/// An upload's body, for the document only (the handler streams the parts itself).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct PhotosForm {
    /// One or more image files.
    #[schema(value_type = Vec<String>, format = Binary)]
    photos: Vec<Vec<u8>>,
}

/// A classify's multipart body, for the document only.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct PhotoForm {
    /// The image file.
    #[schema(value_type = String, format = Binary)]
    photo: Vec<u8>,
}

/// A raw image body (JPEG, PNG, WebP, GIF, BMP or TIFF), for the document only.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
pub struct RawImage(Vec<u8>);
