//! One error type for the whole crate and one table that maps it onto gRPC status codes.
//!
//! Keeping the mapping in a single `From<Error> for Status` means a reviewer can check every
//! code the service can answer in one screen, and the model/store code never sees tonic.

use tonic::{Code, Status};

/// Everything that can go wrong in the head-trainer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A class name that the tenant does not have.
    #[error("unknown class `{0}`")]
    UnknownClass(String),
    /// An HTTP path that is not a route of the API.
    #[error("no route `{0}`: the routes are described at /openapi.json")]
    NotFoundPath(String),
    /// A class name that is empty, too long or has control characters.
    #[error("invalid class name {name:?}: {why}")]
    InvalidClassName { name: String, why: &'static str },
    /// Any other malformed request (missing first message, bad head kind, bad tenant...).
    #[error("{0}")]
    InvalidArgument(String),
    /// An Enroll stream that carried no photo at all.
    #[error("empty enroll stream: send EnrollStart and then at least one Photo")]
    EmptyStream,
    /// A photo over the configured byte limit (checked before it is sent anywhere).
    #[error("photo `{id}` is {bytes} bytes, over the limit of {limit} bytes")]
    PhotoTooLarge {
        id: String,
        bytes: usize,
        limit: usize,
    },
    /// An HTTP request body over its limit (`--http-max-body-bytes`, or one photo's).
    #[error("request body is over the limit of {limit} bytes ({what})")]
    BodyTooLarge { limit: usize, what: &'static str },
    /// A tenant file (Export's or Import's) over `--max-transfer-bytes`.
    #[error(
        "tenant file of {bytes} bytes or more, over the limit of {limit} bytes \
         (--max-transfer-bytes, and at most half --max-inflight-bytes)"
    )]
    FileTooLarge { bytes: u64, limit: usize },
    /// Every photo of an Enroll was rejected, so nothing was written.
    #[error("no photo accepted ({0})")]
    NothingAccepted(String),
    /// The tenant has no class (with examples) yet, so there is nothing to classify against.
    #[error("tenant `{0}` has no classes yet: enroll some photos first")]
    NoClasses(String),
    /// A request that is well-formed but conflicts with the current taxonomy.
    #[error("{0}")]
    Precondition(String),
    /// A rename onto a name that is already taken.
    #[error("class `{0}` already exists")]
    AlreadyExists(String),
    /// No head of the requested kind has been trained yet.
    #[error("no `{0}` head trained yet for this tenant: call Train first")]
    NoHead(String),
    /// A head trained on one backbone was handed an embedding from another.
    #[error("head was trained for model `{expected}`, embedding comes from `{got}`")]
    ModelMismatch { expected: String, got: String },
    /// No feature-server answered (all down, or the model identity is not known yet).
    #[error("feature-server unavailable: {0}")]
    Unavailable(String),
    /// A limit shared by every caller is reached (the in-flight image bytes, or a feature-server
    /// that stayed busy until the deadline): the message names the limit; retrying later works.
    #[error("busy: {0}")]
    Busy(String),
    /// The tenant is over one of its quotas (`quota`, a fixed name for metrics): the message
    /// names it, its value and its flag. Nothing of the request was written.
    #[error("quota: {message}")]
    Quota {
        quota: &'static str,
        message: String,
    },
    /// The caller's deadline (or ours) passed before the work was done; nothing was written.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// The feature-server rejected one image (undecodable, too large, ...).
    #[error("{message}")]
    Item { code: i32, message: String },
    /// Missing or wrong bearer token.
    #[error("unauthenticated: {0}")]
    Unauthenticated(&'static str),
    /// The server is shutting down and takes no new work.
    #[error("shutting down")]
    ShuttingDown,
    /// The database cannot be reached (PostgreSQL down or restarting): retrying later works,
    /// and nothing unacknowledged was written.
    #[error("database unavailable: {0}")]
    DatabaseUnavailable(String),
    /// The database failed.
    #[error("store: {0}")]
    Store(String),
    /// Tensor code failed (shape bugs, corrupt head bytes).
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
    /// A stored record could not be decoded.
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

/// Crate-wide result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// redb splits its errors into one type per operation; they all mean "the store failed".
macro_rules! store_error {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Store(e.to_string())
            }
        }
    )*};
}
store_error!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// PostgreSQL: a lost connection (or none to be had) is UNAVAILABLE, so that callers retry
/// while the database restarts; an error the server answered is the store failing.
impl From<postgres::Error> for Error {
    fn from(e: postgres::Error) -> Self {
        if e.as_db_error().is_some() {
            Error::Store(e.to_string())
        } else {
            Error::DatabaseUnavailable(e.to_string())
        }
    }
}

impl From<r2d2_postgres::r2d2::Error> for Error {
    fn from(e: r2d2_postgres::r2d2::Error) -> Self {
        Error::DatabaseUnavailable(e.to_string())
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Corrupt(e.to_string())
    }
}

impl From<safetensors::SafeTensorError> for Error {
    fn from(e: safetensors::SafeTensorError) -> Self {
        Error::Corrupt(e.to_string())
    }
}

impl Error {
    /// The gRPC code of this error; also used for per-photo rejections in Enroll.
    pub fn code(&self) -> Code {
        match self {
            Error::UnknownClass(_) | Error::NoHead(_) | Error::NotFoundPath(_) => Code::NotFound,
            Error::InvalidClassName { .. }
            | Error::InvalidArgument(_)
            | Error::EmptyStream
            | Error::PhotoTooLarge { .. }
            | Error::BodyTooLarge { .. }
            | Error::NothingAccepted(_) => Code::InvalidArgument,
            Error::NoClasses(_) | Error::Precondition(_) | Error::ModelMismatch { .. } => {
                Code::FailedPrecondition
            }
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::Unavailable(_) | Error::DatabaseUnavailable(_) | Error::ShuttingDown => {
                Code::Unavailable
            }
            Error::Busy(_) | Error::Quota { .. } | Error::FileTooLarge { .. } => {
                Code::ResourceExhausted
            }
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Item { code, .. } => Code::from_i32(*code),
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::Store(_) | Error::Model(_) | Error::Corrupt(_) => Code::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = e.code();
        if code == Code::Internal {
            tracing::error!(error = %e, "internal error");
        }
        Status::new(code, e.to_string())
    }
}
