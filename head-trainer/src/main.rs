//! The `head-trainer` binary: parse flags (or env), log the effective config, serve until
//! SIGTERM or ctrl-c.

use anyhow::Context;
use clap::Parser;
use head_trainer::config::Args;

fn main() -> anyhow::Result<()> {
    // Before the runtime starts its threads, so that they share the bounded arenas.
    let malloc = taxon_ops::malloc::bound();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(serve(malloc))
}

async fn serve(malloc: taxon_ops::malloc::Outcome) -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = taxon_ops::logging::init(
        args.log_format,
        "info",
        args.otlp_endpoint.as_deref(),
        "taxon-head-trainer",
    )
    .map_err(anyhow::Error::msg)?;
    tracing::info!(?malloc, "allocator limits");
    let config = args.config().context("invalid configuration")?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(listen = %listener.local_addr()?, "listening");
    let metrics = bind_optional(args.metrics_listen.as_deref(), "--metrics-listen").await?;
    if let Some(m) = &metrics {
        tracing::info!(addr = %m.local_addr()?, "metrics at /metrics");
    }
    let http = bind_optional(args.http_listen.as_deref(), "--http-listen").await?;
    if let Some(h) = &http {
        tracing::info!(addr = %h.local_addr()?, "HTTP API and web page at http://{}/", h.local_addr()?);
    }
    let listeners = head_trainer::Listeners {
        grpc: listener,
        metrics,
        http,
    };
    head_trainer::run_on(listeners, config, shutdown_signal()).await?;
    Ok(())
}

async fn bind_optional(
    addr: Option<&str>,
    flag: &str,
) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    match addr {
        Some(addr) => Ok(Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr} for {flag}"))?,
        )),
        None => Ok(None),
    }
}

/// Completes on SIGTERM (what orchestrators send) or ctrl-c.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown signal received");
}
