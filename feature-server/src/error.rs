//! The feature-server's one error type, and its one mapping to `tonic::Status`.
//!
//! Per-item errors (a bad photo) travel inside the stream as `ItemError { code, message }`; the
//! same mapping gives their code, so a client sees the same code whether an item failed alone or
//! a whole call failed.

use std::path::PathBuf;

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // --- bad input: one item fails, nothing else is harmed -------------------------------
    #[error("empty image: the request carried no bytes")]
    EmptyImage,
    #[error("image is {size} bytes, over the limit of {limit} bytes (--max-image-bytes)")]
    ImageTooLarge { size: usize, limit: usize },
    #[error(
        "image is {width}x{height} = {pixels} pixels, over the limit of {limit} pixels \
         (--max-image-pixels); rejected before decoding"
    )]
    TooManyPixels {
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
    #[error("unsupported image format: {0} (supported: JPEG, PNG, WebP, GIF, BMP, TIFF)")]
    UnsupportedFormat(String),
    #[error("cannot decode image: {0}")]
    Decode(String),
    #[error(
        "decoding this image needs {need} bytes of memory, over the decode budget of {limit} \
         bytes shared by all images being decoded (--decode-budget-bytes)"
    )]
    DecodeBudget { need: u64, limit: u64 },
    #[error("unknown view set {0} (known: 0 = VIEW_SET_CENTER, 1 = VIEW_SET_SCALES_AND_MIRRORS)")]
    UnknownViewSet(i32),

    // --- capacity and lifecycle -----------------------------------------------------------
    #[error("queue full: {capacity} images queued (--queue-capacity {capacity}); retry later")]
    QueueFull { capacity: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("configuration: {0}")]
    Config(String),
    /// A bug or a panic caught at a boundary (a batch, a decode task): the item fails, the
    /// server goes on.
    #[error("internal error: {0}")]
    Internal(String),

    // --- weights and model ------------------------------------------------------------------
    #[error("weights {path}: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("fetching weights: {0}")]
    Fetch(String),
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
    #[error("device {0} is not available: {1}")]
    Device(String, String),

    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The gRPC code this error answers with, for whole calls and for per-item errors alike.
    pub fn code(&self) -> Code {
        match self {
            Error::EmptyImage
            | Error::ImageTooLarge { .. }
            | Error::TooManyPixels { .. }
            | Error::UnsupportedFormat(_)
            | Error::Decode(_)
            | Error::DecodeBudget { .. }
            | Error::UnknownViewSet(_) => Code::InvalidArgument,
            Error::QueueFull { .. } => Code::ResourceExhausted,
            Error::ShuttingDown => Code::Unavailable,
            Error::Config(_) => Code::InvalidArgument,
            Error::Internal(_) => Code::Internal,
            Error::Weights { .. }
            | Error::Fetch(_)
            | Error::Model(_)
            | Error::Device(..)
            | Error::Io(_)
            | Error::Transport(_) => Code::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        Status::new(err.code(), err.to_string())
    }
}
