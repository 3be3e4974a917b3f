//! `GET /v1/report`: how well the tenant's classes are learned, from its cached embeddings
//! (the same report as the gRPC `Report`; see [`crate::quality`]).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::extract::{Authed, Q};
use super::wire::ErrorJson;
use super::{Api, ApiError};
use crate::core::QualityReport;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReportQuery {
    /// Suspect photos listed at most (default 20).
    pub max_suspects: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClassQualityJson {
    pub name: String,
    pub parent: Option<String>,
    pub examples: u32,
    /// Leave-one-out accuracy, 0..1; null for a class of one photo.
    pub accuracy: Option<f32>,
    /// The class its photos were most often taken for.
    pub confused_with: Option<String>,
    pub confused_count: u32,
    /// Fewer than 5 photos, or a leave-one-out accuracy under 80 %.
    pub needs_more_photos: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConfusedPairJson {
    pub a: String,
    pub b: String,
    pub a_taken_for_b: u32,
    pub b_taken_for_a: u32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SuspectJson {
    pub class: String,
    /// The photo's sha256 (hex): photos are not stored.
    pub sha256: String,
    pub nearer_class: String,
    pub own_similarity: f32,
    pub nearer_similarity: f32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReportJson {
    pub classes: Vec<ClassQualityJson>,
    pub confused: Vec<ConfusedPairJson>,
    pub suspects: Vec<SuspectJson>,
    /// Photos checked and the share classified right (0..1).
    pub checked: u32,
    pub accuracy: f32,
    pub model: String,
    pub method: &'static str,
}

impl From<QualityReport> for ReportJson {
    fn from(r: QualityReport) -> Self {
        Self {
            accuracy: r.accuracy(),
            checked: r.checked,
            classes: r
                .classes
                .into_iter()
                .map(|c| {
                    let (confused_with, confused_count) = match c.confused_with {
                        Some((name, n)) => (Some(name), n),
                        None => (None, 0),
                    };
                    ClassQualityJson {
                        name: c.name,
                        parent: c.parent,
                        examples: c.examples,
                        accuracy: c.accuracy,
                        confused_with,
                        confused_count,
                        needs_more_photos: c.needs_more_photos,
                    }
                })
                .collect(),
            confused: r
                .confused
                .into_iter()
                .map(|p| ConfusedPairJson {
                    a: p.a,
                    b: p.b,
                    a_taken_for_b: p.a_as_b,
                    b_taken_for_a: p.b_as_a,
                })
                .collect(),
            suspects: r
                .suspects
                .into_iter()
                .map(|s| SuspectJson {
                    sha256: s.sha256_hex(),
                    class: s.class,
                    nearer_class: s.nearer,
                    own_similarity: s.own_similarity,
                    nearer_similarity: s.nearer_similarity,
                })
                .collect(),
            model: r.model,
            method: crate::core::report::METHOD,
        }
    }
}

/// Leave-one-out estimates per class, confused pairs, and photos that look mislabelled.
#[utoipa::path(
    get, path = "/v1/report", tag = "classes",
    params(
        ReportQuery,
        ("X-Tenant" = Option<String>, Header, description = "The tenant, when the server has no tokens file"),
    ),
    responses(
        (status = 200, body = ReportJson),
        (status = "4XX", body = ErrorJson), (status = "5XX", body = ErrorJson),
    ),
    security((), ("bearer" = [])),
)]
pub async fn report(
    State(api): State<Arc<Api>>,
    Authed(caller): Authed,
    Q(query): Q<ReportQuery>,
) -> Result<Json<ReportJson>, ApiError> {
    let core = api.core()?;
    let max = query.max_suspects.unwrap_or(0) as usize;
    let report = api.cut_off(core.report(&caller, max)).await?;
    Ok(Json(report.into()))
}
