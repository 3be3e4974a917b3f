//! `/v1/classes`: list, add photos (multipart), rename, remove.

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use axum::extract::multipart::Multipart;
use bytes::BytesMut;
use serde::Deserialize;
use utoipa::IntoParams;

use super::extract::{Authed, Body, ClassPath, Form, Q, multipart_error};
use super::wire::{ClassesJson, EnrolledJson, ErrorJson, HeadJson, RemovedJson, RenameJson};
use super::{Api, ApiError};
use crate::core::{EnrollStart, Photo, Rejected};
use crate::{Error, Result};

/// The tenant's classes and the head answering for them.
#[utoipa::path(
    get, path = "/v1/classes", tag = "classes",
    params(("X-Tenant" = Option<String>, Header, description = "The tenant, when the server has no tokens file")),
    responses(
        (status = 200, body = ClassesJson),
        (status = "4XX", body = ErrorJson), (status = "5XX", body = ErrorJson),
    ),
    security((), ("bearer" = [])),
)]
pub async fn list(
    State(api): State<Arc<Api>>,
    Authed(caller): Authed,
) -> Result<Json<ClassesJson>, ApiError> {
    let core = api.core()?;
    let list = api.cut_off(core.list(&caller)).await?;
    Ok(Json(list.into()))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EnrollQuery {
    /// The parent class, created if new; none for a top-level class.
    parent: Option<String>,
    /// Answer only once the trained head covering these photos is live.
    wait: Option<bool>,
}

/// Adds photos to a class, creating it (and its parent) if new: `multipart/form-data`, one
/// file per part (any field name; `photos` by convention). A photo that cannot be used is
/// listed in `rejected` and the others go on; the class with all its new examples is
/// written in one transaction once the body has been read, or not at all.
#[utoipa::path(
    post, path = "/v1/classes/{name}/photos", tag = "classes",
    params(
        ("name" = String, Path, description = "The class (created if new)"),
        EnrollQuery,
        ("X-Tenant" = Option<String>, Header, description = "The tenant, when the server has no tokens file"),
    ),
    request_body(content = inline(super::openapi::PhotosForm), content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "The photos that became examples, and those that did not", body = EnrolledJson),
        (status = 400, description = "No photo was usable, or a malformed request", body = ErrorJson),
        (status = 413, description = "Every photo, or the whole body, over its limit", body = ErrorJson),
        (status = "4XX", body = ErrorJson), (status = "5XX", body = ErrorJson),
    ),
    security((), ("bearer" = [])),
)]
pub async fn add_photos(
    State(api): State<Arc<Api>>,
    Authed(caller): Authed,
    ClassPath(name): ClassPath,
    Q(query): Q<EnrollQuery>,
    Form(form): Form,
) -> Result<Json<EnrolledJson>, ApiError> {
    let core = api.core()?;
    let start = EnrollStart {
        class_name: name,
        parent: query.parent.filter(|p| !p.is_empty()),
        wait_for_head: query.wait.unwrap_or(false),
    };
    let (limit, max_body) = (core.max_photo_bytes(), api.max_body);
    let skipped = Arc::new(Mutex::new(Vec::new()));
    let photos = photo_stream(form, limit, max_body, Arc::clone(&skipped));
    let enrolled = api.cut_off(core.enroll(&caller, start, photos)).await;
    let mut skipped = std::mem::take(&mut *skipped.lock().unwrap_or_else(|e| e.into_inner()));
    match enrolled {
        Ok(mut e) => {
            e.rejected.append(&mut skipped);
            Ok(Json(e.into()))
        }
        Err(Error::EmptyStream) if !skipped.is_empty() => Err(skipped.remove(0).error.into()),
        Err(Error::EmptyStream) => Err(Error::InvalidArgument(
            "no photo in the upload: send one or more image files as multipart/form-data parts"
                .into(),
        )
        .into()),
        Err(Error::NothingAccepted(why)) if !skipped.is_empty() => {
            Err(Error::NothingAccepted(format!(
                "{why}; {} more over the photo limit, first: {}",
                skipped.len(),
                skipped[0].error
            ))
            .into())
        }
        Err(e) => Err(e.into()),
    }
}

/// One part of an upload: a photo within the limit, or the size of one over it (read to its
/// end without being kept, so a huge part costs time, never memory).
enum Part {
    Photo(Photo),
    TooLarge { id: String, bytes: usize },
}

async fn next_part(form: &mut Multipart, limit: usize, max_body: usize) -> Result<Option<Part>> {
    let Some(mut field) = form
        .next_field()
        .await
        .map_err(|e| multipart_error(e, max_body))?
    else {
        return Ok(None);
    };
    let id = field
        .file_name()
        .or(field.name())
        .unwrap_or("photo")
        .to_string();
    let (mut image, mut bytes) = (BytesMut::new(), 0usize);
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| multipart_error(e, max_body))?
    {
        bytes = bytes.saturating_add(chunk.len());
        if bytes <= limit {
            image.extend_from_slice(&chunk);
        } else if !image.is_empty() {
            image = BytesMut::new();
        }
    }
    Ok(Some(if bytes > limit {
        Part::TooLarge { id, bytes }
    } else {
        Part::Photo(Photo {
            id,
            image: image.freeze(),
        })
    }))
}

/// The upload's photos, read as the core asks for them; parts over the limit go to
/// `skipped` instead (the core never sees their bytes).
fn photo_stream(
    form: Multipart,
    limit: usize,
    max_body: usize,
    skipped: Arc<Mutex<Vec<Rejected>>>,
) -> std::pin::Pin<Box<dyn futures::Stream<Item = Result<Photo>> + Send>> {
    Box::pin(futures::stream::unfold(Some(form), move |form| {
        let skipped = Arc::clone(&skipped);
        async move {
            let mut form = form?;
            loop {
                match next_part(&mut form, limit, max_body).await {
                    Ok(None) => return None,
                    Err(e) => return Some((Err(e), None)),
                    Ok(Some(Part::Photo(p))) => return Some((Ok(p), Some(form))),
                    Ok(Some(Part::TooLarge { id, bytes })) => {
                        let error = Error::PhotoTooLarge {
                            id: id.clone(),
                            bytes,
                            limit,
                        };
                        skipped
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(Rejected { id, error });
                    }
                }
            }
        }
    }))
}

/// Renames a class (a parent keeps its children); examples and heads follow it.
#[utoipa::path(
    post, path = "/v1/classes/{name}/rename", tag = "classes",
    params(
        ("name" = String, Path, description = "The class to rename"),
        ("X-Tenant" = Option<String>, Header, description = "The tenant, when the server has no tokens file"),
    ),
    request_body = RenameJson,
    responses(
        (status = 200, description = "The head answering after the rename", body = HeadJson),
        (status = 404, body = ErrorJson), (status = 409, description = "The new name is taken", body = ErrorJson),
        (status = "4XX", body = ErrorJson), (status = "5XX", body = ErrorJson),
    ),
    security((), ("bearer" = [])),
)]
pub async fn rename(
    State(api): State<Arc<Api>>,
    Authed(caller): Authed,
    ClassPath(name): ClassPath,
    Body(body): Body<RenameJson>,
) -> Result<Json<HeadJson>, ApiError> {
    let core = api.core()?;
    let head = api
        .cut_off(core.rename(&caller, &name, &body.new_name))
        .await?;
    Ok(Json(head.into()))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RemoveQuery {
    /// Also remove a parent's children (without it, removing a parent with children fails).
    recursive: Option<bool>,
}

/// Removes a class and its examples; it stops being answered at once (before retraining).
#[utoipa::path(
    delete, path = "/v1/classes/{name}", tag = "classes",
    params(
        ("name" = String, Path, description = "The class to remove"),
        RemoveQuery,
        ("X-Tenant" = Option<String>, Header, description = "The tenant, when the server has no tokens file"),
    ),
    responses(
        (status = 200, body = RemovedJson),
        (status = 404, body = ErrorJson), (status = 409, description = "A parent with children, without recursive=true", body = ErrorJson),
        (status = "4XX", body = ErrorJson), (status = "5XX", body = ErrorJson),
    ),
    security((), ("bearer" = [])),
)]
pub async fn remove(
    State(api): State<Arc<Api>>,
    Authed(caller): Authed,
    ClassPath(name): ClassPath,
    Q(query): Q<RemoveQuery>,
) -> Result<Json<RemovedJson>, ApiError> {
    let core = api.core()?;
    let recursive = query.recursive.unwrap_or(false);
    let removed = api.cut_off(core.remove(&caller, &name, recursive)).await?;
    Ok(Json(removed.into()))
}
