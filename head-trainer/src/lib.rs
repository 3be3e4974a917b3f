//! The head-trainer: per-tenant taxonomies, an embedding cache and small heads trained on it
//! in seconds, served as `taxon.v1.Classifier`.
//!
//! Layout, outermost first:
//! - [`server`]: `run(listener, config, shutdown)`: health, reflection, graceful shutdown;
//! - [`service`]: the gRPC face: an auth interceptor and proto <-> domain conversion;
//! - [`http`]: the HTTP/JSON face and the web page, over the same core and the same auth;
//! - [`core`]: enroll, classify, list, rename, remove and train in plain Rust types, owning
//!   every part below (a face never reaches past it);
//! - [`tenants`]: each tenant's live taxonomy and heads, swapped atomically;
//! - [`trainer`]: one training job per tenant at a time, later requests coalesced;
//! - [`features`]: the feature-server client (the only source of embeddings);
//! - [`inflight`]: one budget for image bytes in flight, across all callers;
//! - [`store`]: the durable state behind a trait (redb, embedded, by default); [`heads`]: the
//!   models; [`decision`]: the rules; [`quality`]: leave-one-out estimates of how well each
//!   class is learned.
//!
//! Everything below the faces knows nothing of tonic or axum (`features` is a gRPC client, but its
//! trait speaks plain types).

pub mod config;
pub mod core;
pub mod decision;
pub mod error;
pub mod features;
pub mod heads;
pub mod http;
pub mod inflight;
pub mod metrics;
pub mod quality;
pub mod quota;
pub mod server;
pub mod service;
pub mod store;
pub mod taxonomy;
pub mod tenant_file;
pub mod tenants;
pub mod trainer;

pub use config::Config;
pub use error::{Error, Result};
pub use server::{Listeners, run, run_on, run_with_source, serve};
