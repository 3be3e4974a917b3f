//! Where embeddings come from: the feature-server(s), behind a small trait so that service
//! tests can substitute a fake.
//!
//! The real client balances one tonic `Channel` over every address every `--features-url`
//! resolves to, re-resolved every `resolve` interval (`resolve.rs`), so a service scaled to
//! more feature-servers is used without a restart; endpoints connect lazily and reconnect on
//! their own, so a feature-server that restarts on the same address comes back by itself. Each call
//! has a deadline to get its stream going (`connect_timeout`) and an overall deadline: the
//! caller's, or `request_timeout`.
//!
//! A busy feature-server is backpressure, not failure: RESOURCE_EXHAUSTED (its queue is full,
//! for the whole call or for single items) is retried with capped exponential backoff until the
//! deadline, so sixteen concurrent enrolls of large photos all succeed, only slower. An
//! UNAVAILABLE answer is retried once, which hides a single replica dying mid-call.
//!
//! The model identity comes from `Info`, fetched in the background until a server answers
//! (with the view set appended, as every embedding carries it). After that the same task
//! keeps probing `Info` every `probe_interval`, so [`EmbeddingSource::reachable`] says whether
//! a feature-server answers *now*: readiness health follows it.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use prost::bytes::Bytes;
use taxon_ops::trace::{TRACEPARENT, TraceContext};
use taxon_proto::v1::features_client::FeaturesClient;
use taxon_proto::v1::{EmbedRequest, InfoRequest, ViewSet, embed_response};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::{Error, Result};

mod resolve;

/// One image's embedding, or why the feature-server refused it.
pub type ItemResult = Result<Vec<f32>>;

/// What the core needs to know of the model behind the embeddings: a plain struct, so that
/// neither the core nor a fake source depends on the wire's `ModelInfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Model {
    /// The embedding identity (backbone, weights digest and view set): embeddings, cache
    /// rows and heads of different identities never mix.
    pub id: String,
    /// Length of an embedding.
    pub dim: u32,
    /// The largest image the feature-server takes, in bytes (0: it states none).
    pub max_image_bytes: u64,
}

/// A source of embeddings.
pub trait EmbeddingSource: Send + Sync + 'static {
    /// The model identity and limits, once known; watch it to learn when it becomes known.
    fn info(&self) -> watch::Receiver<Option<Arc<Model>>>;

    /// Whether a feature-server answered the latest probe (readiness).
    fn reachable(&self) -> watch::Receiver<bool>;

    /// Embeds `(id, image)` pairs by `deadline`; the answer has one entry per input, in input
    /// order. An `Err` of the whole call means nothing was embedded (no server answered in
    /// time).
    /// `trace` is the caller's: the feature-server's call continues it.
    fn embed(
        &self,
        items: Vec<(String, Bytes)>,
        deadline: Instant,
        trace: TraceContext,
    ) -> BoxFuture<'_, Result<Vec<ItemResult>>>;
}

/// Deadlines of the feature-server client.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// To connect and get a stream's response headers.
    pub connect: Duration,
    /// For a whole Embed call, when the caller set no deadline of its own.
    pub request: Duration,
    /// Between two `Info` probes once the identity is known.
    pub probe: Duration,
    /// Between two DNS lookups of the feature-server names.
    pub resolve: Duration,
}

/// The gRPC client of the feature-servers.
pub struct FeatureClient {
    client: FeaturesClient<Channel>,
    /// Asked for on every Embed; part of the identity (`Model::id`) the rest of the service
    /// sees, so the cache and the heads never mix embeddings of different view sets.
    views: ViewSet,
    info: watch::Sender<Option<Arc<Model>>>,
    reachable: watch::Sender<bool>,
    timeouts: Timeouts,
}

/// Backoff between retries of a busy feature-server: 20 ms doubling to 1 s.
const BACKOFF_START: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

impl FeatureClient {
    /// Builds the balanced channel and starts fetching `Info` in the background. Must be
    /// called inside a tokio runtime.
    pub fn connect(
        urls: &[String],
        timeouts: Timeouts,
        max_message_bytes: usize,
        views: ViewSet,
        tls: &taxon_ops::tls::ClientTls,
    ) -> Result<Arc<Self>> {
        if urls.is_empty() {
            return Err(Error::InvalidArgument("no --features-url given".into()));
        }
        let targets = urls
            .iter()
            .map(|u| resolve::Target::parse(u))
            .collect::<Result<Vec<_>>>()?;
        let connect = timeouts.connect;
        tls.check()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let tls = tls.clone();
        let endpoint = move |uri: &str, host: &str| -> Result<Endpoint> {
            let bad = |e: String| Error::InvalidArgument(format!("feature-server {uri}: {e}"));
            let endpoint = Endpoint::from_shared(uri.to_string())
                .map_err(|e| bad(e.to_string()))?
                .connect_timeout(connect)
                .tcp_nodelay(true);
            if !uri.starts_with("https://") {
                return Ok(endpoint);
            }
            let config = tls.config(host).map_err(|e| bad(e.to_string()))?;
            endpoint.tls_config(config).map_err(|e| bad(e.to_string()))
        };
        let (channel, changes) = Channel::balance_channel(64);
        tokio::spawn(resolve::follow(
            targets,
            timeouts.resolve,
            endpoint,
            changes,
        ));
        let client = FeaturesClient::new(channel)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        let (info, _) = watch::channel(None);
        let (reachable, _) = watch::channel(false);
        let this = Arc::new(Self {
            client,
            views,
            info,
            reachable,
            timeouts,
        });
        tokio::spawn(probe(Arc::downgrade(&this)));
        Ok(this)
    }

    /// One `Info` call: the identity with our view set appended, or why not.
    async fn ask_info(&self) -> std::result::Result<Model, String> {
        let mut client = self.client.clone();
        match tokio::time::timeout(self.timeouts.connect, client.info(InfoRequest {})).await {
            Ok(Ok(resp)) => {
                let info = resp.into_inner();
                Ok(Model {
                    id: taxon_proto::embedding_identity(&info.model, self.views),
                    dim: info.dim,
                    max_image_bytes: info.max_image_bytes,
                })
            }
            Ok(Err(status)) => Err(status.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    /// One Embed call for `items` (ids are their indices), by `deadline`.
    async fn embed_once(
        &self,
        items: &[(String, Bytes)],
        deadline: Instant,
        trace: TraceContext,
    ) -> std::result::Result<Vec<ItemResult>, tonic::Status> {
        let requests: Vec<EmbedRequest> = items
            .iter()
            .enumerate()
            .map(|(i, (_, image))| EmbedRequest {
                id: i.to_string(),
                image: image.clone(), // a reference count, not a copy of the photo
                views: self.views as i32,
            })
            .collect();
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(tonic::Status::deadline_exceeded(
                "deadline passed before the feature-server was called",
            ));
        }
        let mut request = tonic::Request::new(tokio_stream::iter(requests));
        request.set_timeout(remaining);
        // Our call is a child span of the caller's request, in the same trace.
        if let Ok(v) = trace.child().to_string().parse() {
            request.metadata_mut().insert(TRACEPARENT, v);
        }
        let mut client = self.client.clone();
        let started =
            tokio::time::timeout(self.timeouts.connect.min(remaining), client.embed(request))
                .await
                .map_err(|_| tonic::Status::unavailable("no feature-server answered in time"))??;
        let mut stream = started.into_inner();
        let mut out: Vec<Option<ItemResult>> = (0..items.len()).map(|_| None).collect();
        let collect = async {
            while let Some(resp) = stream.message().await? {
                let Some(slot) = resp.id.parse::<usize>().ok().and_then(|i| out.get_mut(i)) else {
                    continue;
                };
                *slot = Some(match resp.result {
                    Some(embed_response::Result::Embedding(e)) => {
                        let expected = self.info.borrow().as_ref().map(|i| i.id.clone());
                        match expected {
                            Some(m) if m != e.model => Err(Error::ModelMismatch {
                                expected: m,
                                got: e.model,
                            }),
                            _ => Ok(e.values),
                        }
                    }
                    Some(embed_response::Result::Error(err)) => Err(Error::Item {
                        code: err.code,
                        message: err.message,
                    }),
                    None => Err(Error::Item {
                        code: tonic::Code::Internal as i32,
                        message: "feature-server sent an empty result".into(),
                    }),
                });
            }
            Ok::<_, tonic::Status>(())
        };
        tokio::time::timeout_at(deadline, collect)
            .await
            .map_err(|_| {
                tonic::Status::deadline_exceeded("feature-server did not finish in time")
            })??;
        Ok(out
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(Error::Item {
                        code: tonic::Code::Unavailable as i32,
                        message: "feature-server closed the stream without this item".into(),
                    })
                })
            })
            .collect())
    }
}

/// Fetches the identity until a feature-server answers (backing off up to 2 s), then keeps
/// probing so that `reachable` tells the truth; ends when the client is dropped.
async fn probe(this: std::sync::Weak<FeatureClient>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(client) = this.upgrade() else { return };
        let interval = match client.ask_info().await {
            Ok(info) => {
                let known = client.info.borrow().as_ref().map(|i| i.id.clone());
                match known {
                    None => {
                        tracing::info!(model = %info.id, dim = info.dim, "feature-server reachable");
                        client.info.send_replace(Some(Arc::new(info)));
                    }
                    Some(m) if m != info.id => tracing::error!(
                        expected = %m, got = %info.id,
                        "a feature-server serves a different model; its embeddings are refused"
                    ),
                    Some(_) => {}
                }
                if !client.reachable.send_replace(true) {
                    tracing::info!("feature-server answers");
                }
                backoff = Duration::from_millis(50);
                client.timeouts.probe
            }
            Err(why) => {
                if client.reachable.send_replace(false) {
                    tracing::warn!(%why, "no feature-server answers");
                }
                tracing::debug!(%why, "feature-server Info failed; retrying");
                let wait = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                wait
            }
        };
        drop(client);
        tokio::time::sleep(interval).await;
    }
}

impl EmbeddingSource for FeatureClient {
    fn info(&self) -> watch::Receiver<Option<Arc<Model>>> {
        self.info.subscribe()
    }

    fn reachable(&self) -> watch::Receiver<bool> {
        self.reachable.subscribe()
    }

    fn embed(
        &self,
        items: Vec<(String, Bytes)>,
        deadline: Instant,
        trace: TraceContext,
    ) -> BoxFuture<'_, Result<Vec<ItemResult>>> {
        Box::pin(async move {
            if items.is_empty() {
                return Ok(Vec::new());
            }
            let mut out: Vec<Option<ItemResult>> = (0..items.len()).map(|_| None).collect();
            // Indices (into `items`) still to embed: all at first, then those the server
            // was too busy for.
            let mut todo: Vec<usize> = (0..items.len()).collect();
            let mut backoff = BACKOFF_START;
            let mut unavailable_retried = false;
            let mut busy_retries = 0u32;
            loop {
                let batch: Vec<(String, Bytes)> = todo.iter().map(|&i| items[i].clone()).collect();
                match self.embed_once(&batch, deadline, trace).await {
                    Ok(results) => {
                        let mut again = Vec::new();
                        for (&i, r) in todo.iter().zip(results) {
                            match r {
                                Err(Error::Item { code, .. })
                                    if code == tonic::Code::ResourceExhausted as i32
                                        && Instant::now() + backoff < deadline =>
                                {
                                    again.push(i);
                                }
                                r => out[i] = Some(r),
                            }
                        }
                        if again.is_empty() {
                            break;
                        }
                        todo = again;
                    }
                    Err(s)
                        if s.code() == tonic::Code::ResourceExhausted
                            && Instant::now() + backoff < deadline => {}
                    Err(s) if s.code() == tonic::Code::Unavailable && !unavailable_retried => {
                        tracing::debug!(status = %s, "feature-server unavailable; retrying once");
                        unavailable_retried = true;
                        continue;
                    }
                    Err(s) => return Err(call_error(&s, busy_retries)),
                }
                busy_retries += 1;
                tracing::debug!(
                    items = todo.len(),
                    retry = busy_retries,
                    backoff_ms = backoff.as_millis() as u64,
                    "feature-server busy; backing off"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            Ok(out
                .into_iter()
                .map(|r| r.unwrap_or_else(|| Err(Error::Unavailable("no result".into()))))
                .collect())
        })
    }
}

/// What a failed call means to our caller: a busy server that stayed busy until the deadline
/// is RESOURCE_EXHAUSTED (retry later), a deadline is a deadline, the rest is UNAVAILABLE.
fn call_error(s: &tonic::Status, busy_retries: u32) -> Error {
    match s.code() {
        tonic::Code::ResourceExhausted => Error::Busy(format!(
            "the feature-server stayed busy through {busy_retries} retries until the deadline: {}",
            s.message()
        )),
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            Error::DeadlineExceeded(format!("feature-server: {}", s.message()))
        }
        _ => Error::Unavailable(format!("{}: {}", s.code(), s.message())),
    }
}
