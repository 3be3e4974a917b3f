//! The feature-server: a frozen ImageNet backbone that turns images into embeddings over gRPC
//! streams, with dynamic batching.
//!
//! Layout, outermost first:
//! - [`server`]: `run(listener, config, shutdown)`, health, reflection, graceful shutdown;
//! - [`service`]: the `taxon.v1.Features` gRPC service (streams in, per-item results out);
//! - [`engine`]: one OS thread owns the model and is fed batches through a bounded queue;
//! - [`preprocess`]: bytes to a normalized 3x224x224 tensor, exactly torchvision's recipe;
//! - [`models`]: ResNet18 and MobileNetV2 in candle, torchvision parameter names;
//! - [`weights`]: loading (.safetensors, .pth, legacy .pt), identity (sha256), and fetching.
//!
//! Everything below `service` knows nothing of tonic, so it is tested and benchmarked alone.

pub mod config;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod models;
pub mod preprocess;
pub mod server;
pub mod service;
pub mod weights;

pub use config::Config;
pub use error::Error;
pub use server::{Server, run};
