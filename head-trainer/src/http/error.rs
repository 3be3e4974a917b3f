//! [`crate::Error`] as an HTTP answer: the status beside the gRPC code it shares, and a JSON
//! body `{"code", "message"}` whose code is the gRPC code's name, so that a client of either
//! face sees the same spelling and the same message for the same failure.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tonic::Code;

use super::wire::ErrorJson;
use crate::Error;

/// An error on its way out of a handler.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        Self(e)
    }
}

/// The HTTP status of an error: the usual mapping of its gRPC code (as grpc-gateway and
/// Google's APIs do), except where HTTP has a more precise word (a body too large).
pub fn http_status(e: &Error) -> StatusCode {
    match e {
        Error::PhotoTooLarge { .. } | Error::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        other => status_of(other.code()),
    }
}

fn status_of(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted | Code::FailedPrecondition => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = self.0;
        let code = e.code();
        if code == Code::Internal {
            tracing::error!(error = %e, "internal error");
        }
        let status = http_status(&e);
        let body = ErrorJson {
            code: taxon_proto::code_name(code).to_string(),
            message: e.to_string(),
        };
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        match code {
            Code::Unauthenticated => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            // Both say "later works": a hint of when, as for gRPC's retrying clients.
            Code::ResourceExhausted | Code::Unavailable => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

/// Any path that is not a route: JSON like every other error, naming the path.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError(Error::NotFoundPath(uri.path().to_string()))
}
