//! The HTTP/JSON face (`--http-listen`) and the web page, over the same [`crate::core`] as
//! gRPC: same tenants (`X-Tenant`), same bearer tokens ([`crate::service::Auth`]), same
//! limits and the same errors, as `{"code": "INVALID_ARGUMENT", "message": "..."}` with the
//! matching HTTP status ([`error`]).
//!
//! Like the gRPC service, every handler is authentication, conversion and one core call. The
//! face holds the core weakly: a keep-alive connection left open after shutdown must not keep
//! the store open; a request that finds the core gone is told the server is shutting down.
//!
//! Bodies are bounded before they are read: a classify takes one of the core's
//! `--max-concurrent-uploads` places first and then reads at most one photo; an enroll's
//! multipart body is streamed photo by photo into the core (which holds each photo's bytes in
//! the shared in-flight budget), a photo over the limit is skipped unread-into-memory and
//! reported as rejected, and the whole body is capped by `--http-max-body-bytes`.

mod classes;
mod classify;
mod error;
mod extract;
mod openapi;
mod page;
mod probes;
mod report;
mod tls;
mod wire;

use std::future::Future;
use std::sync::{Arc, Weak};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::core::Core;
use crate::service::Auth;
use crate::{Error, Result};
pub use error::ApiError;

/// What every handler shares.
pub struct Api {
    core: Weak<Core>,
    auth: Arc<Auth>,
    /// Cancelled when the server starts draining: readiness turns false.
    draining: CancellationToken,
    /// Cancelled when shutdown's grace is over: requests still running end with 503.
    cut: CancellationToken,
    max_body: usize,
}

impl Api {
    pub fn new(
        core: &Arc<Core>,
        auth: Arc<Auth>,
        draining: CancellationToken,
        cut: CancellationToken,
    ) -> Self {
        Self {
            max_body: core.config().http_max_body_bytes,
            core: Arc::downgrade(core),
            auth,
            draining,
            cut,
        }
    }

    /// The core, or `ShuttingDown` once the server has let it go.
    fn core(&self) -> Result<Arc<Core>> {
        self.core.upgrade().ok_or(Error::ShuttingDown)
    }

    /// Runs a request until it finishes or shutdown cuts it (after the grace period).
    async fn cut_off<T>(&self, request: impl Future<Output = Result<T>>) -> Result<T> {
        tokio::select! {
            r = request => r,
            () = self.cut.cancelled() => Err(Error::ShuttingDown),
        }
    }
}

/// Every route: the API under `/v1`, the probes, the OpenAPI document and the page.
pub fn router(api: Arc<Api>) -> Router {
    let max_body = api.max_body;
    Router::new()
        .route("/v1/info", get(probes::info))
        .route("/v1/classes", get(classes::list))
        .route(
            "/v1/classes/{name}/photos",
            // The multipart stream is capped here; each photo in it by the core's limit.
            post(classes::add_photos).layer(DefaultBodyLimit::max(max_body)),
        )
        .route("/v1/classes/{name}/rename", post(classes::rename))
        .route("/v1/classes/{name}", delete(classes::remove))
        // A classify reads its body itself, bounded by the photo limit.
        .route(
            "/v1/classify",
            post(classify::classify).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/report", get(report::report))
        .route("/healthz", get(probes::healthz))
        .route("/readyz", get(probes::readyz))
        .route("/openapi.json", get(openapi::document))
        .merge(page::routes())
        .fallback(error::not_found)
        .with_state(api)
}

/// Serves [`router`] on `listener` until `stop_accepting` completes, then lets requests in
/// flight finish (the caller cuts them after the grace period through [`Api`]'s token).
/// With `tls`, over HTTPS only (the gRPC face's certificate).
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    api: Arc<Api>,
    stop_accepting: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match tls {
        None => {
            axum::serve(listener, router(api))
                .with_graceful_shutdown(stop_accepting)
                .await
        }
        Some(config) => {
            axum::serve(tls::TlsListener::new(listener, config)?, router(api))
                .with_graceful_shutdown(stop_accepting)
                .await
        }
    }
}
