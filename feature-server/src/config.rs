//! The feature-server's configuration.
//!
//! [`Config`] is a plain struct with public fields and a [`Default`], so tests and benches build
//! one in code without clap reading the environment. [`Args`] is its command-line face (clap
//! derive, every flag also read from a `TAXON_*` variable); `main` turns one into the other.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::models::{BackboneKind, Precision};
use crate::preprocess::Limits;

/// Everything the server needs besides its listener.
#[derive(Clone, Debug)]
pub struct Config {
    pub backbone: BackboneKind,
    /// A .safetensors, .pth or legacy .pt file with torchvision parameter names.
    pub weights: PathBuf,
    pub device: DeviceChoice,
    /// What the backbone computes in; embeddings are f32 on the wire whatever it is.
    pub precision: Precision,
    /// Most items in one forward pass.
    pub max_batch: usize,
    /// How long the first item of a batch waits for company before the batch runs anyway.
    /// Zero (the default) dispatches at once when the model is idle and batches only what
    /// queued while it was busy: a lone request never waits for company that is not coming,
    /// and under load the batches fill by themselves.
    pub max_wait: Duration,
    /// Images admitted but not yet taken by the engine (being decoded or waiting in the queue),
    /// over all streams; an item embedded from four views counts four. When it is full, new
    /// streams get RESOURCE_EXHAUSTED and existing streams wait. At least 4.
    pub queue_capacity: usize,
    /// Items one stream may have in flight; past it the server stops reading that stream, and
    /// HTTP/2 flow control makes the client wait.
    pub max_inflight_per_stream: usize,
    /// Per-image limits, checked before decoding.
    pub limits: Limits,
    /// Largest gRPC message accepted or sent.
    pub max_message_bytes: usize,
    /// Images decoded and preprocessed at once (on tokio's blocking pool).
    pub decode_threads: usize,
    /// Bytes of decoded pixels (and decoder working memory) held at once over every decode
    /// thread: each image reserves what its header says decoding will take before a pixel is
    /// allocated, and waits while others hold the budget; one that alone needs more fails.
    pub decode_budget_bytes: u64,
    /// TLS (and mutual TLS) on the listener; plaintext when no certificate is given.
    pub tls: taxon_ops::tls::ServerTls,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            backbone: BackboneKind::Resnet18,
            weights: PathBuf::from("weights/resnet18.safetensors"),
            device: DeviceChoice::Cpu,
            precision: Precision::F32,
            max_batch: 32,
            max_wait: Duration::ZERO,
            queue_capacity: 128,
            max_inflight_per_stream: 64,
            limits: Limits::default(),
            max_message_bytes: default_max_message_bytes(),
            decode_threads: default_decode_threads(),
            decode_budget_bytes: DEFAULT_DECODE_BUDGET_BYTES,
            tls: Default::default(),
        }
    }
}

/// 256 MiB of decoded images at once: a 40-megapixel RGB photo (120 MB) fits beside others;
/// with a backbone's weights and batches, the process stays well under 1 GiB.
pub const DEFAULT_DECODE_BUDGET_BYTES: u64 = 256 * 1024 * 1024;

/// The longest `--max-wait-ms` accepted: a batch waiting longer than this is a mistake, and
/// far larger values would overflow the clock arithmetic.
pub const MAX_WAIT_LIMIT: Duration = Duration::from_secs(60);

impl Config {
    /// Rejects settings that would make the server useless (a zero-sized batch or queue).
    pub fn validate(&self) -> Result<()> {
        self.tls
            .config()
            .map_err(|e| Error::Config(e.to_string()))?;
        let positive = [
            ("--max-batch", self.max_batch),
            ("--queue-capacity", self.queue_capacity),
            ("--max-inflight-per-stream", self.max_inflight_per_stream),
            ("--decode-threads", self.decode_threads),
            ("--max-message-bytes", self.max_message_bytes),
            ("--max-image-bytes", self.limits.max_bytes),
        ];
        for (flag, value) in positive {
            if value == 0 {
                return Err(Error::Config(format!("{flag} must be at least 1")));
            }
        }
        if self.queue_capacity < crate::engine::MAX_VIEWS {
            return Err(Error::Config(format!(
                "--queue-capacity must be at least {} (the views of one item wait together)",
                crate::engine::MAX_VIEWS
            )));
        }
        if self.max_wait > MAX_WAIT_LIMIT {
            return Err(Error::Config(format!(
                "--max-wait-ms must be at most {} (got {})",
                MAX_WAIT_LIMIT.as_millis(),
                self.max_wait.as_millis()
            )));
        }
        // Reserved in KiB through a semaphore of u32 permits; and a budget smaller than what
        // reading any header may take would refuse every image.
        let budget_floor = 2 * crate::preprocess::METADATA_ALLOWANCE;
        let budget_ceiling = u64::from(u32::MAX) * 1024;
        if !(budget_floor..=budget_ceiling).contains(&self.decode_budget_bytes) {
            return Err(Error::Config(format!(
                "--decode-budget-bytes must be between {budget_floor} and {budget_ceiling} \
                 (got {})",
                self.decode_budget_bytes
            )));
        }
        if self.limits.max_pixels == 0 {
            return Err(Error::Config(
                "--max-image-pixels must be at least 1".into(),
            ));
        }
        if self.precision == Precision::Bf16 && self.device == DeviceChoice::Cpu {
            return Err(Error::Config(
                "--dtype bf16 needs --device cuda: candle has no bf16 matrix product on a CPU \
                 (f16 runs there, slowly; f32 is the CPU's fast path)"
                    .into(),
            ));
        }
        #[cfg(not(feature = "cuda"))]
        if let DeviceChoice::Cuda(_) = self.device {
            return Err(Error::Device(
                self.device.to_string(),
                crate::engine::NO_CUDA.into(),
            ));
        }
        Ok(())
    }
}

/// 32 MiB: room for the default 20 MiB image limit plus the message framing, so an oversized
/// image is a clear per-item error rather than a whole-stream transport error.
fn default_max_message_bytes() -> usize {
    32 * 1024 * 1024
}

/// One decoder per core: decoding is CPU-bound, more threads only add memory.
fn default_decode_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Cpu,
    /// A CUDA ordinal; needs the `cuda` cargo feature.
    Cuda(usize),
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("unknown device {other:?} (expected cpu, cuda or cuda:N)")),
        }
    }
}

/// The serve flags, as clap sees them. `weights` is optional here only so that the
/// `fetch-weights` subcommand parses without it; [`Args::into_config`] requires it.
#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Address to listen on. Loopback by default, so that nothing outside this machine can
    /// reach an unauthenticated server by accident; to serve other machines (or other
    /// containers, as in docker compose), pass `--listen 0.0.0.0:50051`.
    #[arg(long, env = "TAXON_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Serve Prometheus metrics at http://ADDR/metrics (off when unset).
    #[arg(long, env = "TAXON_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// The backbone architecture of the weights file.
    #[arg(long, env = "TAXON_BACKBONE", default_value = "resnet18",
          value_parser = ["resnet18", "mobilenet_v2"])]
    pub backbone: String,
    /// Weights file (.safetensors, .pth or legacy .pt) with torchvision parameter names.
    #[arg(long, env = "TAXON_WEIGHTS", required = true)]
    pub weights: Option<PathBuf>,
    /// cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, env = "TAXON_DEVICE", default_value = "cpu")]
    pub device: DeviceChoice,
    /// What the backbone computes in: f32, or f16/bf16 for a GPU's tensor cores (on a CPU they
    /// run candle's slower generic ops). Embeddings stay f32 on the wire; the model identity
    /// names the precision, so the head-trainer never mixes embeddings of two precisions.
    #[arg(long, env = "TAXON_DTYPE", default_value = "f32")]
    pub dtype: Precision,
    /// Most images (views) in one forward pass.
    #[arg(long, env = "TAXON_MAX_BATCH", default_value_t = 32)]
    pub max_batch: usize,
    /// Milliseconds the first item of a batch waits for more; 0 runs it at once with whatever
    /// queued while the model was busy (a lone request never waits).
    #[arg(long, env = "TAXON_MAX_WAIT_MS", default_value_t = 0)]
    pub max_wait_ms: u64,
    /// Images admitted but not yet batched, over all streams (an item of four views counts
    /// four; at least 4); when full, new streams get RESOURCE_EXHAUSTED and existing streams
    /// wait.
    #[arg(long, env = "TAXON_QUEUE_CAPACITY", default_value_t = 128)]
    pub queue_capacity: usize,
    /// Items one stream may have in flight before the server stops reading it.
    #[arg(long, env = "TAXON_MAX_INFLIGHT_PER_STREAM", default_value_t = 64)]
    pub max_inflight_per_stream: usize,
    /// Largest encoded image, in bytes.
    #[arg(long, env = "TAXON_MAX_IMAGE_BYTES", default_value_t = Limits::default().max_bytes)]
    pub max_image_bytes: usize,
    /// Largest image in pixels (width x height from the header), checked before decoding.
    #[arg(long, env = "TAXON_MAX_IMAGE_PIXELS", default_value_t = Limits::default().max_pixels)]
    pub max_image_pixels: u64,
    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "TAXON_MAX_MESSAGE_BYTES", default_value_t = default_max_message_bytes())]
    pub max_message_bytes: usize,
    /// Images decoded at once.
    #[arg(long, env = "TAXON_DECODE_THREADS", default_value_t = default_decode_threads())]
    pub decode_threads: usize,
    /// Bytes of decoded images held at once over all decode threads; an image whose header
    /// says it alone needs more is refused with a per-item error.
    #[arg(long, env = "TAXON_DECODE_BUDGET_BYTES", default_value_t = DEFAULT_DECODE_BUDGET_BYTES)]
    pub decode_budget_bytes: u64,
    /// PEM certificate chain: serve TLS (clients then use https:// URLs).
    #[arg(long, env = "TAXON_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "TAXON_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA: require clients to present a certificate it signed (mutual TLS).
    #[arg(long, env = "TAXON_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

impl Args {
    /// The listen address and the [`Config`], or an error naming the missing or bad flag.
    pub fn into_config(self) -> Result<(SocketAddr, Config)> {
        let backbone = self
            .backbone
            .parse::<BackboneKind>()
            .map_err(Error::Config)?;
        let weights = self
            .weights
            .ok_or_else(|| Error::Config("--weights (or TAXON_WEIGHTS) is required".into()))?;
        let config = Config {
            backbone,
            weights,
            device: self.device,
            precision: self.dtype,
            max_batch: self.max_batch,
            max_wait: Duration::from_millis(self.max_wait_ms),
            queue_capacity: self.queue_capacity,
            max_inflight_per_stream: self.max_inflight_per_stream,
            limits: Limits {
                max_bytes: self.max_image_bytes,
                max_pixels: self.max_image_pixels,
            },
            max_message_bytes: self.max_message_bytes,
            decode_threads: self.decode_threads,
            decode_budget_bytes: self.decode_budget_bytes,
            tls: taxon_ops::tls::ServerTls {
                cert: self.tls_cert,
                key: self.tls_key,
                client_ca: self.tls_client_ca,
            },
        };
        config.validate()?;
        Ok((self.listen, config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_parses() {
        assert_eq!("cpu".parse::<DeviceChoice>(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("CUDA:1".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(1)));
        assert!("tpu".parse::<DeviceChoice>().is_err());
        assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn default_is_valid_and_zero_is_not() {
        assert!(Config::default().validate().is_ok());
        let bad = Config {
            max_batch: 0,
            ..Config::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("--max-batch")
        );
    }

    #[test]
    fn settings_that_would_fail_later_are_refused_at_start() {
        let long_wait = Config {
            max_wait: Duration::from_millis(u64::MAX),
            ..Config::default()
        };
        let message = long_wait.validate().unwrap_err().to_string();
        assert!(
            message.contains("--max-wait-ms must be at most"),
            "{message}"
        );
        for budget in [0, 1024, u64::MAX] {
            let config = Config {
                decode_budget_bytes: budget,
                ..Config::default()
            };
            let message = config.validate().unwrap_err().to_string();
            assert!(message.contains("--decode-budget-bytes"), "{message}");
        }
    }

    #[test]
    fn listens_on_loopback_unless_told_otherwise() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let cli = <Cli as clap::Parser>::try_parse_from(["feature-server", "--weights", "w"])
            .expect("parses");
        assert!(cli.args.listen.ip().is_loopback(), "{}", cli.args.listen);
    }

    #[test]
    fn dtype_is_a_flag_and_bf16_needs_a_gpu() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let parse = |dtype: &str| {
            <Cli as clap::Parser>::try_parse_from(["fs", "--weights", "w", "--dtype", dtype])
                .map(|cli| cli.args.into_config())
        };
        let f16 = parse("f16").expect("parses").expect("valid").1;
        assert_eq!(f16.precision, Precision::F16);
        assert!(parse("f8").is_err());
        let message = parse("bf16").expect("parses").unwrap_err().to_string();
        assert!(
            message.contains("--dtype bf16 needs --device cuda"),
            "{message}"
        );
    }

    #[test]
    fn queue_holds_one_item_of_every_view_set() {
        let small = Config {
            queue_capacity: crate::engine::MAX_VIEWS - 1,
            ..Config::default()
        };
        let message = small.validate().unwrap_err().to_string();
        assert!(
            message.contains("--queue-capacity must be at least 4"),
            "{message}"
        );
    }
}
