//! `GET /metrics` over plain HTTP/1.1, on its own listener (`--metrics-listen`): Prometheus scrapes it, and keeping
//! it off the gRPC port means a scrape never competes with the gRPC server's limits (and the
//! port can be left unpublished).

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

/// The exposition format's content type, version 0.0.4 (what Prometheus asks for first).
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `render()` at `/metrics` until `shutdown` resolves. `render` is async so that a
/// gauge read from elsewhere (the size of a database across the network) is read off the
/// async workers, per scrape, rather than cached and stale.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    render: Arc<F>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let render = render.clone();
            async move { ([(CONTENT_TYPE, TEXT_FORMAT)], render().await).into_response() }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// One `GET /metrics` from `addr`: the body, after checking the status and content type.
/// For tests and checks that scrape a server the way Prometheus does.
pub async fn scrape(addr: std::net::SocketAddr) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: taxon\r\nConnection: close\r\n\r\n")
        .await?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply).await?;
    let bad = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no end of headers".into()))?;
    if !head.starts_with("HTTP/1.1 200") || !head.to_ascii_lowercase().contains(TEXT_FORMAT) {
        return Err(bad(format!("unexpected reply: {head}")));
    }
    Ok(body.to_string())
}

/// The value of one series in a scrape (its exact name and labels), 0 when absent.
pub fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
