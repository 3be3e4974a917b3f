//! Liveness, readiness and what a client should know first.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;

use super::wire::{ErrorJson, InfoJson, ProbeJson};
use super::{Api, ApiError};
use crate::Error;

/// Alive: the process serves requests (restart it when this fails). 503 while draining.
#[utoipa::path(get, path = "/healthz", tag = "probes",
    responses((status = 200, body = ProbeJson), (status = 503, body = ErrorJson)))]
pub async fn healthz(State(api): State<Arc<Api>>) -> Result<Json<ProbeJson>, ApiError> {
    if api.draining.is_cancelled() {
        return Err(Error::ShuttingDown.into());
    }
    api.core()?;
    Ok(Json(ProbeJson {
        status: "ok".into(),
        model: None,
    }))
}

/// Ready: a feature-server answers and the model identity is known, so enrolls and
/// classifies can succeed. Route traffic by it; do not restart on it.
#[utoipa::path(get, path = "/readyz", tag = "probes",
    responses((status = 200, body = ProbeJson), (status = 503, body = ErrorJson)))]
pub async fn readyz(State(api): State<Arc<Api>>) -> Result<Json<ProbeJson>, ApiError> {
    if api.draining.is_cancelled() {
        return Err(Error::ShuttingDown.into());
    }
    match api.core()?.readiness() {
        (Some(model), true) => Ok(Json(ProbeJson {
            status: "ready".into(),
            model: Some(model),
        })),
        (None, _) => Err(Error::Unavailable("no feature-server has answered yet".into()).into()),
        (Some(_), false) => Err(Error::Unavailable("no feature-server answers now".into()).into()),
    }
}

/// The limits and the model, for a client to check a photo before sending it.
#[utoipa::path(get, path = "/v1/info", tag = "probes",
    responses((status = 200, body = InfoJson), (status = 503, body = ErrorJson)))]
pub async fn info(State(api): State<Arc<Api>>) -> Result<Json<InfoJson>, ApiError> {
    let core = api.core()?;
    let config = core.config();
    Ok(Json(InfoJson {
        model: core.readiness().0,
        max_photo_bytes: core.max_photo_bytes(),
        max_photos_per_enroll: config.max_photos_per_enroll,
        max_body_bytes: api.max_body,
        default_head: config.default_head.to_string(),
        tokens: api.auth.enabled(),
    }))
}
