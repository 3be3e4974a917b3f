//! Configuration: a plain struct with public fields and a constructor (tests and embedders
//! build it in code), plus the clap parser the binary uses, with `env` on every flag.

use std::path::PathBuf;
use std::time::Duration;

use taxon_proto::v1::ViewSet;

use crate::decision::Thresholds;
use crate::heads::{HeadKind, TrainOptions};

/// Everything `run` needs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Feature-server URLs, balanced over.
    pub features_urls: Vec<String>,
    /// Directory of the embedded store (`taxon.redb`); unused with `database_url`.
    pub data_dir: PathBuf,
    /// Page cache of the embedded store, in bytes: redb's own default is 1 GiB, which would
    /// take the whole memory budget as the file grows.
    pub store_cache_bytes: usize,
    /// PostgreSQL instead of the embedded store: several head-trainers share one database.
    pub database_url: Option<String>,
    /// Pool size, connection timeout and TLS trust for `database_url`.
    pub database: crate::store::PoolOptions,
    /// File of `token tenant` lines; when set, every request needs a valid bearer token.
    pub tokens_file: Option<PathBuf>,
    /// The head kind that becomes live once trained (and that Enroll trains). `lda` by
    /// default: shrinkage LDA or nearest class mean, chosen per tenant by cross-validation on
    /// its own photos; it led the same-embedding anchors on birds in the issue #15 study
    /// (docs/study/heads-2026-12.md). `combined`, the previous default, is still available.
    pub default_head: HeadKind,
    /// Embeddings of classified photos kept in memory (photos enrolled are in the store).
    pub classify_cache_entries: usize,
    /// Tenants kept loaded in memory; idle ones beyond it are unloaded (they reload from the
    /// store on their next request).
    pub max_loaded_tenants: usize,
    /// Share that in-memory cache between tenants (and consult it when enrolling). Off by
    /// default: a shared cache lets one tenant tell, by timing, that another sent the same
    /// bytes recently. The evaluation turns it on, since its fresh tenant per seed would
    /// otherwise embed every photo once per seed.
    pub share_embedding_cache: bool,
    /// The views the feature-server embeds of each photo (their mean is the embedding).
    /// Scales and mirrors by default: on the evaluation it lifts nearest-class-mean accuracy
    /// 1-3 points at every k for four forward passes per photo (docs/evaluation.md).
    pub views: ViewSet,
    /// Largest photo accepted, in bytes (checked before it is sent anywhere).
    pub max_photo_bytes: usize,
    /// Most photos in one Enroll.
    pub max_photos_per_enroll: usize,
    /// Largest HTTP request body (an enroll's multipart upload); a photo over
    /// `max_photo_bytes` inside it is refused on its own, the rest goes on.
    pub http_max_body_bytes: usize,
    /// Image bytes held at once across every Enroll and Classify call (see `inflight`).
    pub max_inflight_bytes: usize,
    /// Largest tenant file Export writes and Import reads. A transfer holds its share of
    /// `max_inflight_bytes` (twice its size: the file and what it decodes to) while it runs,
    /// so the limit in force is at most half of that budget ([`Config::transfer_limit`]).
    pub max_transfer_bytes: usize,
    /// Training jobs running at once, across tenants (each uses a core while it runs).
    pub max_training_jobs: usize,
    /// Enroll and ClassifyStream calls carrying images at once.
    pub max_concurrent_uploads: usize,
    pub thresholds: Thresholds,
    pub train: TrainOptions,
    pub connect_timeout: Duration,
    /// Deadline of a request whose caller set none.
    pub request_timeout: Duration,
    /// Between two probes of the feature-servers (readiness).
    pub probe_interval: Duration,
    /// Between two DNS lookups of the feature-server names (scaling follows it).
    pub resolve_interval: Duration,
    /// Longest an Enroll with `wait_for_head` waits for the trained head.
    pub wait_for_head_timeout: Duration,
    /// On shutdown, how long requests in flight may take to finish before their streams are
    /// cut (an idle client must not hold a SIGTERM off), and then how long a running training
    /// job may take to save its head.
    pub shutdown_grace: Duration,
    /// What each tenant may hold and how fast it may ask.
    pub quotas: crate::quota::Quotas,
    /// Tenants that get Prometheus series of their own (the first seen); 0: none.
    pub metrics_tenants: usize,
    /// TLS (and mutual TLS) on the gRPC listener; plaintext when no certificate is given.
    pub tls: taxon_ops::tls::ServerTls,
    /// How `https://` feature-servers are trusted, and our certificate for them.
    pub features_tls: taxon_ops::tls::ClientTls,
}

impl Config {
    /// A config with every default, for the given feature-servers and data directory.
    pub fn new(features_urls: Vec<String>, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            features_urls,
            data_dir: data_dir.into(),
            store_cache_bytes: crate::store::DEFAULT_CACHE_BYTES,
            database_url: None,
            database: crate::store::PoolOptions::default(),
            tokens_file: None,
            default_head: HeadKind::Lda,
            classify_cache_entries: 8192,
            max_loaded_tenants: 256,
            share_embedding_cache: false,
            views: ViewSet::ScalesAndMirrors,
            max_photo_bytes: 16 << 20,
            max_photos_per_enroll: 1000,
            http_max_body_bytes: 256 << 20,
            max_inflight_bytes: 256 << 20,
            max_transfer_bytes: 64 << 20,
            max_training_jobs: 2,
            max_concurrent_uploads: 16,
            thresholds: Thresholds::default(),
            train: TrainOptions::default(),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(120),
            probe_interval: Duration::from_secs(2),
            resolve_interval: Duration::from_secs(5),
            wait_for_head_timeout: Duration::from_secs(120),
            shutdown_grace: Duration::from_secs(30),
            quotas: crate::quota::Quotas::default(),
            metrics_tenants: 0,
            tls: Default::default(),
            features_tls: features_tls_flags(),
        }
    }

    /// The largest tenant file in force: `max_transfer_bytes`, or half the in-flight budget
    /// when that is smaller (a transfer holds twice its size of it).
    pub fn transfer_limit(&self) -> usize {
        self.max_transfer_bytes.min(self.max_inflight_bytes / 2)
    }

    /// Refuses values that would fail later, at the first request, instead of at start.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |why: String| Err(crate::Error::InvalidArgument(why));
        if let Err(e) = self.tls.config() {
            return bad(e.to_string());
        }
        if let Err(e) = self.features_tls.check() {
            return bad(e.to_string());
        }
        if self.max_photo_bytes == 0 {
            return bad("--max-photo-bytes must be at least 1".into());
        }
        let rps = self.quotas.requests_per_s;
        if !rps.is_finite() || rps < 0.0 {
            return bad(format!(
                "--quota-rps must be 0 (no limit) or positive, not {rps}"
            ));
        }
        if rps > 0.0 && self.quotas.burst == 0 {
            return bad("--quota-burst must be at least 1 when --quota-rps is set".into());
        }
        if self.max_inflight_bytes < self.max_photo_bytes {
            return bad(format!(
                "--max-inflight-bytes {} is smaller than one photo (--max-photo-bytes {})",
                self.max_inflight_bytes, self.max_photo_bytes
            ));
        }
        if self.http_max_body_bytes < self.max_photo_bytes {
            return bad(format!(
                "--http-max-body-bytes {} is smaller than one photo (--max-photo-bytes {})",
                self.http_max_body_bytes, self.max_photo_bytes
            ));
        }
        if self.max_photo_bytes > u32::MAX as usize - (1 << 20) {
            return bad("--max-photo-bytes must be under 4 GiB".into());
        }
        for (name, value) in [
            ("--max-photos-per-enroll", self.max_photos_per_enroll),
            ("--max-training-jobs", self.max_training_jobs),
            ("--max-concurrent-uploads", self.max_concurrent_uploads),
            ("--max-loaded-tenants", self.max_loaded_tenants),
            ("--store-cache-bytes", self.store_cache_bytes),
            (
                "--database-max-connections",
                self.database.max_connections as usize,
            ),
        ] {
            if value == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        for (name, d) in [
            ("--connect-timeout-s", self.connect_timeout),
            ("--request-timeout-s", self.request_timeout),
            ("--probe-interval-s", self.probe_interval),
            ("--resolve-interval-s", self.resolve_interval),
            ("--database-timeout-s", self.database.timeout),
        ] {
            if d.is_zero() {
                return bad(format!("{name} must be more than 0"));
            }
        }
        Ok(())
    }
}

/// A [`taxon_ops::tls::ClientTls`] whose messages name the `--features-tls-*` flags.
fn features_tls_flags() -> taxon_ops::tls::ClientTls {
    taxon_ops::tls::ClientTls {
        flags: taxon_ops::tls::ClientTlsFlags {
            ca: "--features-tls-ca",
            cert: "--features-tls-cert",
            key: "--features-tls-key",
        },
        ..Default::default()
    }
}

/// Seconds from a flag as a duration; negative, NaN or absurd values are an error (with the
/// flag's name) rather than a panic in `Duration::from_secs_f64`.
fn seconds(flag: &str, s: f64) -> crate::Result<Duration> {
    Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| *d <= Duration::from_secs(365 * 24 * 3600))
        .ok_or_else(|| {
            crate::Error::InvalidArgument(format!(
                "{flag} {s}: expected seconds between 0 and one year"
            ))
        })
}

/// Command line of the `head-trainer` binary.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "head-trainer",
    version,
    about = "Teach an image classifier new classes from a handful of photos, in seconds."
)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "TAXON_LISTEN", default_value = "127.0.0.1:50052")]
    pub listen: String,
    /// Serve Prometheus metrics at http://ADDR/metrics (off when unset).
    #[arg(long, env = "TAXON_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Serve the HTTP/JSON API and the web page at http://ADDR/ (off when unset).
    #[arg(long, env = "TAXON_HTTP_LISTEN", value_name = "ADDR")]
    pub http_listen: Option<String>,
    /// Largest HTTP request body in bytes (one enroll upload of many photos; split larger
    /// uploads into several calls).
    #[arg(long, env = "TAXON_HTTP_MAX_BODY_BYTES", default_value_t = 256 << 20)]
    pub http_max_body_bytes: usize,
    /// Feature-server URL; repeat (or comma-separate in the env var) to balance over several.
    #[arg(
        long = "features-url",
        env = "TAXON_FEATURES_URL",
        value_delimiter = ',',
        required = true
    )]
    pub features_url: Vec<String>,
    /// Directory of the embedded store (one head-trainer); unused with --database-url.
    #[arg(long, env = "TAXON_DATA", default_value = "./data")]
    pub data: PathBuf,
    /// Page cache of the embedded store, in bytes (redb's own default, 1 GiB, would outgrow
    /// the memory budget); unused with --database-url.
    #[arg(long, env = "TAXON_STORE_CACHE_BYTES", default_value_t = crate::store::DEFAULT_CACHE_BYTES)]
    pub store_cache_bytes: usize,
    /// PostgreSQL store shared by several head-trainers, instead of --data:
    /// `postgres://user:password@host:5432/db?sslmode=require`. `sslmode` is disable, prefer
    /// (the default: TLS when the server offers it) or require; the certificate is always
    /// verified (see --database-ca-file).
    #[arg(long, env = "TAXON_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// PEM file of the CA that signs the database's certificate (a managed database's own
    /// CA); the system's trust store otherwise.
    #[arg(long, env = "TAXON_DATABASE_CA_FILE")]
    pub database_ca_file: Option<PathBuf>,
    /// Connections to the database at most (one per request in a transaction, one more per
    /// training job while it trains).
    #[arg(long, env = "TAXON_DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,
    /// Seconds to wait for a database connection before a request fails with UNAVAILABLE.
    #[arg(long, env = "TAXON_DATABASE_TIMEOUT_S", default_value_t = 5.0)]
    pub database_timeout_s: f64,
    /// PEM certificate chain: serve gRPC over TLS (clients then use https:// URLs).
    #[arg(long, env = "TAXON_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "TAXON_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA: require clients to present a certificate it signed (mutual TLS).
    #[arg(long, env = "TAXON_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// PEM CA that signs the https:// feature-servers' certificates (the system's roots
    /// otherwise).
    #[arg(long, env = "TAXON_FEATURES_TLS_CA")]
    pub features_tls_ca: Option<PathBuf>,
    /// Our PEM certificate for feature-servers that require one (mutual TLS).
    #[arg(long, env = "TAXON_FEATURES_TLS_CERT", requires = "features_tls_key")]
    pub features_tls_cert: Option<PathBuf>,
    /// PEM private key of --features-tls-cert.
    #[arg(long, env = "TAXON_FEATURES_TLS_KEY", requires = "features_tls_cert")]
    pub features_tls_key: Option<PathBuf>,
    /// File of `token tenant` lines: when given, requests need `authorization: Bearer <token>`.
    #[arg(long, env = "TAXON_TOKENS")]
    pub tokens: Option<PathBuf>,
    /// Head kind made live once trained: prototype, flat, hierarchical, combined or lda.
    #[arg(long, env = "TAXON_DEFAULT_HEAD", default_value = "lda")]
    pub default_head: String,
    /// Embeddings of classified photos kept in memory.
    #[arg(long, env = "TAXON_CLASSIFY_CACHE_ENTRIES", default_value_t = 8192)]
    pub classify_cache_entries: usize,
    /// Tenants kept in memory; idle ones beyond it are unloaded, least recently used first.
    #[arg(long, env = "TAXON_MAX_LOADED_TENANTS", default_value_t = 256)]
    pub max_loaded_tenants: usize,
    /// Share the in-memory embedding cache between tenants (faster evaluations; lets a tenant
    /// infer by timing that another sent the same photo recently).
    #[arg(long, env = "TAXON_SHARE_EMBEDDING_CACHE")]
    pub share_embedding_cache: bool,
    /// Views embedded per photo: `scales-mirrors` (four forward passes, more accurate) or
    /// `center` (one pass, torchvision's crop).
    #[arg(long, env = "TAXON_VIEWS", default_value = "scales-mirrors", value_parser = parse_views)]
    pub views: ViewSet,
    /// Largest photo accepted, in bytes.
    #[arg(long, env = "TAXON_MAX_PHOTO_BYTES", default_value_t = 16 << 20)]
    pub max_photo_bytes: usize,
    /// Open-set rejection for a tenant with no cut-off of its own yet (no class with two
    /// photos): an image whose cosine to every class mean (uncentred) is below this is
    /// UNKNOWN. A tenant with two photos of some class uses its own cut-off instead.
    #[arg(long, env = "TAXON_UNKNOWN_SIMILARITY", default_value_t = Thresholds::default().unknown_similarity)]
    pub unknown_similarity: f32,
    /// Best child more probable than this is the answer.
    #[arg(long, env = "TAXON_CHILD_MIN_PROBABILITY", default_value_t = Thresholds::default().child_min_probability)]
    pub child_min_probability: f32,
    /// Otherwise back off to a parent at least this probable.
    #[arg(long, env = "TAXON_PARENT_MIN_PROBABILITY", default_value_t = Thresholds::default().parent_min_probability)]
    pub parent_min_probability: f32,
    /// Seed of head initialisation (same examples + same seed = same head).
    #[arg(long, env = "TAXON_TRAIN_SEED", default_value_t = 0)]
    pub train_seed: u64,
    /// Most optimiser steps per training job.
    #[arg(long, env = "TAXON_TRAIN_MAX_STEPS", default_value_t = TrainOptions::default().max_steps)]
    pub train_max_steps: usize,
    /// Weight of the hierarchical head's parent-tie term (0 = off, as in the prototype).
    #[arg(long, env = "TAXON_PARENT_TIE", default_value_t = 0.0)]
    pub parent_tie: f64,
    /// Seconds to wait for a feature-server to connect and answer.
    #[arg(long, env = "TAXON_CONNECT_TIMEOUT_S", default_value_t = 2.0)]
    pub connect_timeout_s: f64,
    /// Seconds a request may take in all when its caller sets no deadline (a caller's
    /// shorter deadline is passed on to the feature-server call).
    #[arg(long, env = "TAXON_REQUEST_TIMEOUT_S", default_value_t = 120.0)]
    pub request_timeout_s: f64,
    /// Seconds between two probes of the feature-servers; readiness follows the last answer.
    #[arg(long, env = "TAXON_PROBE_INTERVAL_S", default_value_t = 2.0)]
    pub probe_interval_s: f64,
    /// Seconds between two DNS lookups of the --features-url names: a name that resolves to
    /// more (or fewer) addresses is balanced over them without a restart.
    #[arg(long, env = "TAXON_RESOLVE_INTERVAL_S", default_value_t = 5.0)]
    pub resolve_interval_s: f64,
    /// Image bytes held at once across all Enroll and Classify calls; beyond it callers wait
    /// (up to their deadline), then get RESOURCE_EXHAUSTED.
    #[arg(long, env = "TAXON_MAX_INFLIGHT_BYTES", default_value_t = 256 << 20)]
    pub max_inflight_bytes: usize,
    /// Largest tenant file (`client export`/`import`), in bytes: 64 MiB holds about 31,000
    /// ResNet18 or 12,500 MobileNetV2 examples; at most half --max-inflight-bytes applies.
    #[arg(long, env = "TAXON_MAX_TRANSFER_BYTES", default_value_t = 64 << 20)]
    pub max_transfer_bytes: usize,
    /// Per-tenant Prometheus series for the first N tenants seen (requests admitted and
    /// refused by a quota); later tenants are counted as `(other)`, so a scrape stays bounded
    /// whoever calls. 0: no tenant in any label.
    #[arg(long, env = "TAXON_METRICS_TENANTS", default_value_t = 0)]
    pub metrics_tenants: usize,
    /// Training jobs running at once across all tenants.
    #[arg(long, env = "TAXON_MAX_TRAINING_JOBS", default_value_t = 2)]
    pub max_training_jobs: usize,
    /// Enroll and ClassifyStream calls carrying images at once; more wait for a place (up to
    /// their deadline), then get RESOURCE_EXHAUSTED.
    #[arg(long, env = "TAXON_MAX_CONCURRENT_UPLOADS", default_value_t = 16)]
    pub max_concurrent_uploads: usize,
    /// Seconds that requests in flight get to finish on SIGTERM before their streams are cut,
    /// and a running training job then gets to save its head.
    #[arg(long, env = "TAXON_SHUTDOWN_GRACE_S", default_value_t = 30.0)]
    pub shutdown_grace_s: f64,
    /// Log lines as `text` (for people) or `json` (one object per line, with the request's
    /// span fields such as `trace_id`, for log collectors). RUST_LOG filters either.
    #[arg(long, env = "TAXON_LOG_FORMAT", default_value = "text")]
    pub log_format: taxon_ops::logging::LogFormat,
    /// Export every span to this OTLP/gRPC collector (`http://collector:4317`), in the
    /// callers' traces; needs a build with `--features otlp`.
    #[arg(long, env = "TAXON_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Classes (parents included) each tenant may have; 0: no limit.
    #[arg(long, env = "TAXON_QUOTA_CLASSES", default_value_t = crate::quota::Quotas::default().classes)]
    pub quota_classes: u64,
    /// Examples (distinct photos) each tenant may have; 0: no limit.
    #[arg(long, env = "TAXON_QUOTA_EXAMPLES", default_value_t = crate::quota::Quotas::default().examples)]
    pub quota_examples: u64,
    /// Bytes of embeddings each tenant may keep in the store (photos are never stored);
    /// 0: no limit.
    #[arg(long, env = "TAXON_QUOTA_STORED_BYTES", default_value_t = crate::quota::Quotas::default().stored_bytes)]
    pub quota_stored_bytes: u64,
    /// Requests per second each tenant may make, sustained (each photo of a classify stream
    /// counts as one); 0: no limit.
    #[arg(long, env = "TAXON_QUOTA_RPS", default_value_t = crate::quota::Quotas::default().requests_per_s)]
    pub quota_rps: f64,
    /// Requests a tenant may make at once above --quota-rps.
    #[arg(long, env = "TAXON_QUOTA_BURST", default_value_t = crate::quota::Quotas::default().burst)]
    pub quota_burst: u64,
    /// Enrolls each tenant may run at the same time; 0: no limit.
    #[arg(long, env = "TAXON_QUOTA_CONCURRENT_ENROLLS", default_value_t = crate::quota::Quotas::default().concurrent_enrolls)]
    pub quota_concurrent_enrolls: u64,
}

impl Args {
    /// The config these arguments describe.
    pub fn config(&self) -> crate::Result<Config> {
        let mut c = Config::new(self.features_url.clone(), self.data.clone());
        c.tokens_file = self.tokens.clone();
        c.tls = taxon_ops::tls::ServerTls {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            client_ca: self.tls_client_ca.clone(),
        };
        c.features_tls.ca = self.features_tls_ca.clone();
        c.features_tls.cert = self.features_tls_cert.clone();
        c.features_tls.key = self.features_tls_key.clone();
        c.database_url = self.database_url.clone();
        c.store_cache_bytes = self.store_cache_bytes;
        c.database = crate::store::PoolOptions {
            max_connections: self.database_max_connections,
            timeout: seconds("--database-timeout-s", self.database_timeout_s)?,
            ca_file: self.database_ca_file.clone(),
        };
        c.default_head = self.default_head.parse()?;
        c.classify_cache_entries = self.classify_cache_entries;
        c.max_loaded_tenants = self.max_loaded_tenants;
        c.share_embedding_cache = self.share_embedding_cache;
        c.views = self.views;
        c.max_photo_bytes = self.max_photo_bytes;
        c.http_max_body_bytes = self.http_max_body_bytes;
        c.thresholds = Thresholds {
            unknown_similarity: self.unknown_similarity,
            child_min_probability: self.child_min_probability,
            parent_min_probability: self.parent_min_probability,
        };
        c.train.seed = self.train_seed;
        c.train.max_steps = self.train_max_steps;
        c.train.parent_tie = self.parent_tie;
        c.connect_timeout = seconds("--connect-timeout-s", self.connect_timeout_s)?;
        c.request_timeout = seconds("--request-timeout-s", self.request_timeout_s)?;
        c.probe_interval = seconds("--probe-interval-s", self.probe_interval_s)?;
        c.resolve_interval = seconds("--resolve-interval-s", self.resolve_interval_s)?;
        c.shutdown_grace = seconds("--shutdown-grace-s", self.shutdown_grace_s)?;
        c.max_inflight_bytes = self.max_inflight_bytes;
        c.max_transfer_bytes = self.max_transfer_bytes;
        c.metrics_tenants = self.metrics_tenants;
        c.max_training_jobs = self.max_training_jobs;
        c.max_concurrent_uploads = self.max_concurrent_uploads;
        c.quotas = crate::quota::Quotas {
            classes: self.quota_classes,
            examples: self.quota_examples,
            stored_bytes: self.quota_stored_bytes,
            requests_per_s: self.quota_rps,
            burst: self.quota_burst,
            concurrent_enrolls: self.quota_concurrent_enrolls,
        };
        c.validate()?;
        Ok(c)
    }
}

fn parse_views(s: &str) -> Result<ViewSet, String> {
    match s {
        "scales-mirrors" => Ok(ViewSet::ScalesAndMirrors),
        "center" => Ok(ViewSet::Center),
        other => Err(format!(
            "unknown view set {other:?} (expected scales-mirrors or center)"
        )),
    }
}
