//! Log output for both servers: `--log-format text` (the default, for people) or `json` (one
//! JSON object per line with the event's fields and those of the spans it happened in, such
//! as a request's `trace_id`, for log collectors). `RUST_LOG` filters either.

use std::io::IsTerminal;
use std::str::FromStr;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown log format {other:?} (expected text or json)"
            )),
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Json => "json",
        })
    }
}

/// What has to live as long as the process logs: the OTLP exporter, which flushes the spans
/// still batched when dropped.
#[must_use = "dropping it stops (and flushes) the span export"]
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    _otlp: Option<crate::otlp::Exporter>,
}

/// Installs the global subscriber; `default_filter` applies when `RUST_LOG` is not set.
/// `otlp_endpoint` (`--otlp-endpoint`) also exports every span there, as `service`; a build
/// without the `otlp` feature refuses it rather than ignore it.
pub fn init(
    format: LogFormat,
    default_filter: &str,
    otlp_endpoint: Option<&str>,
    service: &'static str,
) -> Result<Telemetry, String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // Colour codes only for a terminal; docker logs and files get plain text.
    let text = (format == LogFormat::Text)
        .then(|| tracing_subscriber::fmt::layer().with_ansi(std::io::stdout().is_terminal()));
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
    });
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json);
    #[cfg(feature = "otlp")]
    {
        let exporter = otlp_endpoint
            .map(|e| crate::otlp::Exporter::start(e, service))
            .transpose()?;
        let layer = exporter.as_ref().map(|e| e.layer());
        registry.with(layer).try_init().map_err(|e| e.to_string())?;
        Ok(Telemetry { _otlp: exporter })
    }
    #[cfg(not(feature = "otlp"))]
    {
        let _ = service;
        if let Some(endpoint) = otlp_endpoint {
            return Err(format!(
                "--otlp-endpoint {endpoint}: this build has no OTLP export; build with \
                 `--features otlp` (cargo build -p head-trainer -p feature-server --features otlp)"
            ));
        }
        registry.try_init().map_err(|e| e.to_string())?;
        Ok(Telemetry {})
    }
}

#[cfg(all(test, not(feature = "otlp")))]
mod tests {
    use super::*;

    #[test]
    fn a_build_without_otlp_refuses_an_endpoint_rather_than_ignore_it() {
        let e = init(LogFormat::Text, "info", Some("http://collector:4317"), "t")
            .err()
            .expect("refused");
        assert!(
            e.contains("http://collector:4317") && e.contains("--features otlp"),
            "{e}"
        );
    }
}
