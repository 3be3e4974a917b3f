//! The `taxon.v1.Features` gRPC service: streams of images in, per-item results out.
//!
//! Each `Embed` stream is driven by one task that reads requests while the stream has fewer
//! than `max_inflight_per_stream` items in flight (so a fast client waits on HTTP/2 flow
//! control instead of the server buffering it), runs each item through the [`Engine`], and
//! writes results as they finish, in any order. A bad item becomes an `ItemError`; only the
//! transport (a message over the size limit), the deadline or a shutdown end a stream early,
//! and even then the items already read are answered first (except past the deadline, when no
//! one is listening any more).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use taxon_ops::trace::{self, TraceContext};
use taxon_proto::v1::features_server::Features;
use taxon_proto::v1::{
    EmbedRequest, EmbedResponse, Embedding, InfoRequest, ItemError, ModelInfo, ViewSet,
    embed_response,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::config::Config;
use crate::engine::{Engine, ModelMeta, StreamGuard};
use crate::error::Error;
use crate::preprocess::{SCALES_AND_MIRRORS, View};

/// The service state shared by every call.
pub struct FeaturesService {
    engine: Engine,
    config: Config,
    shutdown: CancellationToken,
    streams: AtomicU64,
}

impl FeaturesService {
    /// `shutdown` makes open streams stop reading, answer what they have, and end.
    pub fn new(engine: Engine, config: Config, shutdown: CancellationToken) -> Self {
        Self {
            engine,
            config,
            shutdown,
            streams: AtomicU64::new(0),
        }
    }

    async fn meta(&self) -> Result<Arc<ModelMeta>, Status> {
        self.engine.ready().await.map_err(Status::from)
    }
}

type EmbedStream = Pin<Box<dyn futures::Stream<Item = Result<EmbedResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Features for FeaturesService {
    type EmbedStream = EmbedStream;

    async fn embed(
        &self,
        request: Request<Streaming<EmbedRequest>>,
    ) -> Result<Response<Self::EmbedStream>, Status> {
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown.into());
        }
        // Admission: while the queue is full, existing streams wait for a slot, new ones are
        // told to come back later rather than pile up more waiting work.
        if self.engine.is_full() {
            return Err(Error::QueueFull {
                capacity: self.engine.capacity(),
            }
            .into());
        }
        let meta = self.meta().await?;
        let stream_id = self.streams.fetch_add(1, Ordering::Relaxed);
        let timeout = grpc_timeout(request.metadata());
        // The caller's trace continues here and into the batches that serve this stream.
        let trace = TraceContext::from_header(
            request
                .metadata()
                .get(trace::TRACEPARENT)
                .map(|v| v.as_bytes()),
        );
        let span = tracing::info_span!(
            "embed",
            trace_id = trace.map(|t| t.trace_id_hex()),
            stream = stream_id,
            peer = ?request.remote_addr(),
            timeout_ms = timeout.map(|t| t.as_millis() as u64),
        );
        if let Some(t) = &trace {
            t.adopt(&span);
        }
        let inflight = self.config.max_inflight_per_stream;
        let (tx, rx) = mpsc::channel(inflight);
        let driver = StreamDriver {
            inbound: request.into_inner(),
            tx,
            engine: self.engine.clone(),
            model: meta.model.clone(),
            inflight,
            trace: trace.map(|t| t.trace_id),
            shutdown: self.shutdown.clone(),
            _open: self.engine.stream_guard(),
        };
        tokio::spawn(driver.run(timeout).instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn info(&self, _request: Request<InfoRequest>) -> Result<Response<ModelInfo>, Status> {
        let meta = self.meta().await?;
        let stats = self.engine.stats();
        Ok(Response::new(ModelInfo {
            backbone: meta.backbone.to_string(),
            dim: meta.dim as u32,
            weights_sha256: meta.weights_sha256.clone(),
            device: meta.device.clone(),
            max_batch: self.config.max_batch as u32,
            model: meta.model.clone(),
            max_wait_ms: self.config.max_wait.as_millis() as u32,
            max_image_bytes: self.config.limits.max_bytes as u64,
            max_image_pixels: self.config.limits.max_pixels,
            images_embedded: stats.images,
            batches: stats.batches,
            dtype: meta.precision.to_string(),
        }))
    }
}

/// Everything one `Embed` stream needs, owned by the task that drives it.
struct StreamDriver {
    inbound: Streaming<EmbedRequest>,
    tx: mpsc::Sender<Result<EmbedResponse, Status>>,
    engine: Engine,
    model: String,
    inflight: usize,
    /// The caller's trace id, handed to the engine with each item.
    trace: Option<u128>,
    shutdown: CancellationToken,
    /// Counted as open until the driver ends, however it ends.
    _open: StreamGuard,
}

impl StreamDriver {
    async fn run(mut self, timeout: Option<Duration>) {
        let deadline = tokio::time::sleep(timeout.unwrap_or(Duration::from_secs(u32::MAX as u64)));
        tokio::pin!(deadline);
        let mut pending = FuturesUnordered::new();
        let mut reading = true;
        let mut ending: Option<Status> = None;
        let (mut read, mut answered) = (0u64, 0u64);
        loop {
            if !reading && pending.is_empty() {
                break;
            }
            tokio::select! {
                biased;
                // The client cancelled or went away: drop everything in flight. Items already
                // with the engine are skipped there (their reply channel is closed).
                () = self.tx.closed() => {
                    tracing::info!(read, answered, "client went away; stream abandoned");
                    return;
                }
                () = &mut deadline, if timeout.is_some() => {
                    tracing::info!(read, answered, "deadline exceeded");
                    let status = Status::deadline_exceeded(format!(
                        "deadline exceeded after {read} items read, {answered} answered"
                    ));
                    let _ = self.tx.send(Err(status)).await;
                    return;
                }
                Some(response) = pending.next(), if !pending.is_empty() => {
                    answered += 1;
                    if self.tx.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
                () = self.shutdown.cancelled(), if reading => {
                    reading = false;
                    ending = Some(Error::ShuttingDown.into());
                    tracing::info!(read, "shutting down: answering items in flight, reading no more");
                }
                message = self.inbound.message(), if reading && pending.len() < self.inflight => {
                    match message {
                        Ok(Some(request)) => {
                            read += 1;
                            pending.push(embed_one(self.engine.clone(), self.model.clone(), request, self.trace));
                        }
                        Ok(None) => reading = false,
                        Err(status) => {
                            tracing::warn!(%status, "stream failed on the transport");
                            reading = false;
                            ending = Some(status);
                        }
                    }
                }
            }
        }
        if let Some(status) = ending {
            let _ = self.tx.send(Err(status)).await;
        }
        tracing::debug!(read, answered, "stream done");
    }
}

/// The view set a request asks for, and its views; an unknown number is the item's error.
pub fn views_of_request(views: i32) -> Result<(ViewSet, &'static [View]), Error> {
    let set = ViewSet::try_from(views).map_err(|_| Error::UnknownViewSet(views))?;
    let views: &'static [View] = match set {
        ViewSet::Center => &[View::CENTER],
        ViewSet::ScalesAndMirrors => &SCALES_AND_MIRRORS,
    };
    Ok((set, views))
}

/// One item through the engine, as the response the client sees.
async fn embed_one(
    engine: Engine,
    model: String,
    request: EmbedRequest,
    trace: Option<u128>,
) -> EmbedResponse {
    let EmbedRequest { id, image, views } = request;
    let (label, embedded) = match views_of_request(views) {
        Ok((set, views)) => (
            view_label(set),
            engine
                .embed_traced(image, views, trace)
                .await
                .map(|v| (v, set)),
        ),
        Err(err) => ("unknown", Err(err)),
    };
    let code = embedded.as_ref().err().map(|e| e.code());
    engine.metrics().item(label, code);
    let result = match embedded {
        Ok((values, set)) => embed_response::Result::Embedding(Embedding {
            values,
            model: taxon_proto::embedding_identity(&model, set),
        }),
        Err(err) => {
            tracing::debug!(%id, error = %err, "item failed");
            embed_response::Result::Error(ItemError {
                code: err.code() as i32,
                message: err.to_string(),
            })
        }
    };
    EmbedResponse {
        id,
        result: Some(result),
    }
}

/// The `views` label of the items metric.
fn view_label(set: ViewSet) -> &'static str {
    match set {
        ViewSet::Center => "center",
        ViewSet::ScalesAndMirrors => "scales_and_mirrors",
    }
}

/// The client's deadline from the `grpc-timeout` header. Tonic applies it to unary calls
/// itself, but for a stream only until the response headers, so `Embed` enforces it over the
/// whole stream.
pub use taxon_proto::grpc_timeout;
