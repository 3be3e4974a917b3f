//! `POST /v1/classify`: one image, as the raw body (any `image/*` type) or as the one file
//! of a `multipart/form-data` body (what a browser form sends).

use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::header::CONTENT_TYPE;
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use utoipa::IntoParams;

use super::extract::{Authed, Q, multipart_error};
use super::wire::{ClassifiedJson, ErrorJson};
use super::{Api, ApiError};
use crate::core::ClassifyInput;
use crate::{Error, Result};

/// Room for a multipart body's boundaries and headers around its one photo.
const MULTIPART_OVERHEAD: usize = 64 << 10;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ClassifyQuery {
    /// Children to rank (default 5).
    top_k: Option<u32>,
    /// The head to ask (`prototype`, `flat`, `hierarchical`, `combined`, `lda`); the live one if unset.
    head: Option<String>,
}

/// Classifies one image: the decision (a child, its parent when the children are too
/// close to call, or unknown), the ranked children and the parent.
#[utoipa::path(
    post, path = "/v1/classify", tag = "classify",
    params(
        ClassifyQuery,
        ("X-Tenant" = Option<String>, Header, description = "The tenant, when the server has no tokens file"),
    ),
    request_body(
        description = "The image as the raw body with an image/* content type, or one file in multipart/form-data",
        content(
            (super::openapi::RawImage = "image/*"),
            (super::openapi::PhotoForm = "multipart/form-data"),
        ),
    ),
    responses(
        (status = 200, body = ClassifiedJson),
        (status = 400, description = "Not an image, or an image that cannot be decoded", body = ErrorJson),
        (status = 409, description = "The tenant has no classes yet", body = ErrorJson),
        (status = 413, description = "Over the photo limit", body = ErrorJson),
        (status = "4XX", body = ErrorJson), (status = "5XX", body = ErrorJson),
    ),
    security((), ("bearer" = [])),
)]
pub async fn classify(
    State(api): State<Arc<Api>>,
    Authed(caller): Authed,
    Q(query): Q<ClassifyQuery>,
    req: Request,
) -> Result<Json<ClassifiedJson>, ApiError> {
    let core = api.core()?;
    let head = match query.head.as_deref() {
        None | Some("") => None,
        Some(kind) => Some(kind.parse()?),
    };
    let classified = api.cut_off(async {
        // A place among the image-carrying calls before the body is read: what is read at
        // once is bounded by --max-concurrent-uploads photos.
        let session = core.session(&caller).await?;
        let image = read_image(req, core.max_photo_bytes()).await?;
        let input = ClassifyInput {
            image,
            top_k: query.top_k.unwrap_or(0),
            head,
        };
        core.classify_in(&session, input).await
    });
    Ok(Json(classified.await?.into()))
}

/// The image of a classify body, refused when over `limit` bytes.
async fn read_image(req: Request, limit: usize) -> Result<Bytes> {
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let too_large = || Error::BodyTooLarge {
        limit,
        what: "the photo limit",
    };
    if content_type.starts_with("multipart/form-data") {
        let mut form = Multipart::from_request(req, &())
            .await
            .map_err(|e| Error::InvalidArgument(format!("multipart body: {}", e.body_text())))?;
        let mut field = form
            .next_field()
            .await
            .map_err(|e| multipart_error(e, limit + MULTIPART_OVERHEAD))?
            .ok_or_else(|| Error::InvalidArgument("multipart body without a file".into()))?;
        let mut image = BytesMut::new();
        while let Some(chunk) = field
            .chunk()
            .await
            .map_err(|e| multipart_error(e, limit + MULTIPART_OVERHEAD))?
        {
            if image.len() + chunk.len() > limit {
                return Err(too_large());
            }
            image.extend_from_slice(&chunk);
        }
        Ok(image.freeze())
    } else if content_type.starts_with("image/")
        || content_type.starts_with("application/octet-stream")
    {
        axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| too_large())
    } else {
        Err(Error::InvalidArgument(format!(
            "content type {content_type:?}: send the image as the raw body with an image/* type, \
             or as one file of a multipart/form-data body"
        )))
    }
}
