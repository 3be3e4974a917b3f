//! Where embeddings come from: the feature-server(s), behind a small trait so that service
//! tests can substitute a fake.
//!
//! The real client balances one tonic `Channel` over every `--features-url`
//! (`Channel::balance_list`: endpoints connect lazily and reconnect on their own, so a
//! feature-server that restarts comes back without any help). Each call has a deadline to get
//! its stream going (`connect_timeout`: when every server is down, Enroll and Classify fail
//! in about that long) and one for the whole call; an UNAVAILABLE answer is retried once,
//! which hides a single replica dying mid-call. The model identity comes from `Info`, fetched
//! in the background until a server answers (with the view set appended, as every embedding
//! carries it); until then there is no identity and every call
//! that needs one answers UNAVAILABLE (and health says NOT_SERVING).

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use taxon_proto::v1::features_client::FeaturesClient;
use taxon_proto::v1::{EmbedRequest, InfoRequest, ModelInfo, ViewSet, embed_response};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use crate::{Error, Result};

/// One image's embedding, or why the feature-server refused it.
pub type ItemResult = Result<Vec<f32>>;

/// A source of embeddings.
pub trait EmbeddingSource: Send + Sync + 'static {
    /// The model identity and limits, once known; watch it to learn when it becomes known.
    fn info(&self) -> watch::Receiver<Option<Arc<ModelInfo>>>;

    /// Embeds `(id, image)` pairs; the answer has one entry per input, in input order. An
    /// `Err` of the whole call means nothing was embedded (no server answered).
    fn embed(&self, items: Vec<(String, Vec<u8>)>) -> BoxFuture<'_, Result<Vec<ItemResult>>>;
}

/// Deadlines of the feature-server client.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// To connect and get a stream's response headers.
    pub connect: Duration,
    /// For a whole Embed call.
    pub request: Duration,
}

/// The gRPC client of the feature-servers.
pub struct FeatureClient {
    client: FeaturesClient<Channel>,
    /// Asked for on every Embed; part of the identity (`info.model`) the rest of the service
    /// sees, so the cache and the heads never mix embeddings of different view sets.
    views: ViewSet,
    info: watch::Sender<Option<Arc<ModelInfo>>>,
    timeouts: Timeouts,
}

impl FeatureClient {
    /// Builds the balanced channel and starts fetching `Info` in the background. Must be
    /// called inside a tokio runtime.
    pub fn connect(
        urls: &[String],
        timeouts: Timeouts,
        max_message_bytes: usize,
        views: ViewSet,
    ) -> Result<Arc<Self>> {
        if urls.is_empty() {
            return Err(Error::InvalidArgument("no --features-url given".into()));
        }
        let mut endpoints = Vec::with_capacity(urls.len());
        for url in urls {
            let e = Endpoint::from_shared(url.clone())
                .map_err(|e| Error::InvalidArgument(format!("--features-url {url}: {e}")))?
                .connect_timeout(timeouts.connect)
                .timeout(timeouts.request)
                .tcp_nodelay(true);
            endpoints.push(e);
        }
        let channel = Channel::balance_list(endpoints.into_iter());
        let client = FeaturesClient::new(channel)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        let (info, _) = watch::channel(None);
        let this = Arc::new(Self {
            client,
            views,
            info,
            timeouts,
        });
        tokio::spawn(Arc::clone(&this).fetch_info());
        Ok(this)
    }

    /// Asks `Info` until a feature-server answers, backing off up to 2 s between tries.
    async fn fetch_info(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let mut client = self.client.clone();
            match tokio::time::timeout(self.timeouts.connect, client.info(InfoRequest {})).await {
                Ok(Ok(resp)) => {
                    let mut info = resp.into_inner();
                    info.model = taxon_proto::embedding_identity(&info.model, self.views);
                    tracing::info!(model = %info.model, dim = info.dim, "feature-server reachable");
                    self.info.send_replace(Some(Arc::new(info)));
                    return;
                }
                Ok(Err(status)) => tracing::debug!(%status, "feature-server Info failed; retrying"),
                Err(_) => tracing::debug!("feature-server Info timed out; retrying"),
            }
            if Arc::strong_count(&self) == 1 {
                return; // the server is gone: nobody left to care
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn embed_once(
        &self,
        items: &[(String, Vec<u8>)],
    ) -> std::result::Result<Vec<ItemResult>, tonic::Status> {
        let requests: Vec<EmbedRequest> = items
            .iter()
            .enumerate()
            .map(|(i, (_, image))| EmbedRequest {
                id: i.to_string(),
                image: image.clone(),
                views: self.views as i32,
            })
            .collect();
        let mut client = self.client.clone();
        let started = tokio::time::timeout(
            self.timeouts.connect,
            client.embed(tokio_stream::iter(requests)),
        )
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
                        let expected = self.info.borrow().as_ref().map(|i| i.model.clone());
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
        tokio::time::timeout(self.timeouts.request, collect)
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

impl EmbeddingSource for FeatureClient {
    fn info(&self) -> watch::Receiver<Option<Arc<ModelInfo>>> {
        self.info.subscribe()
    }

    fn embed(&self, items: Vec<(String, Vec<u8>)>) -> BoxFuture<'_, Result<Vec<ItemResult>>> {
        Box::pin(async move {
            if items.is_empty() {
                return Ok(Vec::new());
            }
            let mut last = None;
            for attempt in 0..2 {
                match self.embed_once(&items).await {
                    Ok(r) => return Ok(r),
                    Err(s) if s.code() == tonic::Code::Unavailable && attempt == 0 => {
                        tracing::debug!(status = %s, "feature-server unavailable; retrying once");
                        last = Some(s);
                    }
                    Err(s) => {
                        last = Some(s);
                        break;
                    }
                }
            }
            let s = last.unwrap_or_else(|| tonic::Status::unavailable("no answer"));
            Err(Error::Unavailable(format!("{}: {}", s.code(), s.message())))
        })
    }
}
