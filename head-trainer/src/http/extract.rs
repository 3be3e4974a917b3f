//! Extractors whose rejections are [`ApiError`]s, so that a malformed query, path or body
//! gets the same JSON error as everything else (axum's own answer plain text), and the
//! authenticated caller, found by the same [`crate::service::Auth`] as gRPC's.

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Multipart, Path, Query, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use tonic::metadata::MetadataMap;

use super::{Api, ApiError};
use crate::Error;
use crate::core::Caller;

/// The tenant that asks: `Authorization: Bearer` when tokens are on, `X-Tenant` otherwise.
pub struct Authed(pub Caller);

impl FromRequestParts<Arc<Api>> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, api: &Arc<Api>) -> Result<Self, ApiError> {
        // The same headers, the same rules: gRPC metadata is HTTP/2 headers.
        let md = MetadataMap::from_headers(parts.headers.clone());
        let tenant = api.auth.tenant(&md)?;
        Ok(Self(Caller {
            tenant,
            // HTTP carries no deadline; the core bounds every request by its own.
            deadline: None,
            trace: crate::service::trace_of(&md),
        }))
    }
}

/// A query string, or 400 naming what is wrong with it.
pub struct Q<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| Self(q))
            .map_err(|e| ApiError(Error::InvalidArgument(format!("query: {}", e.body_text()))))
    }
}

/// The `{name}` of a class route, percent-decoded.
pub struct ClassPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ClassPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(name)| Self(name))
            .map_err(|e| ApiError(Error::InvalidArgument(format!("path: {}", e.body_text()))))
    }
}

/// A JSON body, or 400 naming what is wrong with it.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        axum::Json::<T>::from_request(req, state)
            .await
            .map(|axum::Json(v)| Self(v))
            .map_err(|e| ApiError(Error::InvalidArgument(format!("body: {}", e.body_text()))))
    }
}

/// A `multipart/form-data` body, or 400 saying that one was expected.
pub struct Form(pub Multipart);

impl<S: Send + Sync> FromRequest<S> for Form {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Multipart::from_request(req, state)
            .await
            .map(Self)
            .map_err(|e| {
                ApiError(Error::InvalidArgument(format!(
                    "expected a multipart/form-data body of image files: {}",
                    e.body_text()
                )))
            })
    }
}

/// A multipart error as ours: a body over its limit says so (and which limit).
pub fn multipart_error(e: axum::extract::multipart::MultipartError, limit: usize) -> Error {
    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        Error::BodyTooLarge {
            limit,
            what: "--http-max-body-bytes",
        }
    } else {
        Error::InvalidArgument(format!("multipart body: {}", e.body_text()))
    }
}
