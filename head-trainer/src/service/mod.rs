//! The `taxon.v1.Classifier` gRPC face over the [`crate::core`]: the auth interceptor puts
//! the tenant into each request's extensions, every method converts proto to domain, calls
//! the core and converts back. No method touches the store, the tenants or the heads.

pub mod auth;
mod convert;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use taxon_proto::v1::classifier_server::Classifier;
use taxon_proto::v1::*;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::core::{Caller, ClassifyInput, Core, Photo};
use crate::{Error, Result};
pub use auth::{Auth, TenantId};

/// Images of one ClassifyStream classified at the same time.
const STREAM_CONCURRENCY: usize = 8;

/// The caller's deadline (`grpc-timeout`), if it set one, a little early: a tenth of it, at
/// most 100 ms, is kept back so that the caller hears why we gave up (the limit we waited
/// on) before its own timer fires with a bare DEADLINE_EXCEEDED.
pub fn caller_deadline(md: &tonic::metadata::MetadataMap) -> Option<tokio::time::Instant> {
    let t = taxon_proto::grpc_timeout(md)?;
    let margin = (t / 10).min(std::time::Duration::from_millis(100));
    Some(tokio::time::Instant::now() + t - margin)
}

/// The caller's trace context, or a new trace; recorded on the request's span (the `grpc`
/// span of the server's `trace_fn`), so that every line it logs carries the trace id.
pub fn trace_of(md: &tonic::metadata::MetadataMap) -> taxon_ops::trace::TraceContext {
    use taxon_ops::trace::{TRACEPARENT, TraceContext};
    let trace = TraceContext::from_header(md.get(TRACEPARENT).map(|v| v.as_bytes()))
        .unwrap_or_else(TraceContext::root);
    trace.adopt(&tracing::Span::current());
    trace
}

/// Who asks (the tenant the interceptor authenticated) and by when.
fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    let tenant = req
        .extensions()
        .get::<TenantId>()
        .ok_or_else(|| Status::internal("no tenant: the auth interceptor is not installed"))?;
    Ok(Caller {
        tenant: tenant.0.clone(),
        deadline: caller_deadline(req.metadata()),
        trace: trace_of(req.metadata()),
    })
}

/// The tonic service.
#[derive(Clone)]
pub struct ClassifierService {
    core: Arc<Core>,
    /// Cancelled when shutdown's grace period is over: requests still running end with
    /// UNAVAILABLE (see `server`).
    cut: CancellationToken,
}

impl ClassifierService {
    pub fn new(core: Arc<Core>, cut: CancellationToken) -> Self {
        Self { core, cut }
    }

    /// Runs a request until it finishes or shutdown cuts it (after the grace period).
    async fn cut_off<T>(&self, request: impl Future<Output = Result<T>>) -> Result<T, Status> {
        tokio::select! {
            r = request => Ok(r?),
            () = self.cut.cancelled() => Err(Error::ShuttingDown.into()),
        }
    }
}

/// A broken client stream ends the enroll; nothing has been written yet.
fn enroll_stream_error(s: &Status) -> Error {
    Error::InvalidArgument(format!("enroll stream: {}", s.message()))
}

type ClassifyStream = Pin<Box<dyn Stream<Item = Result<ClassifyStreamResponse, Status>> + Send>>;
type FileStream = futures::stream::Iter<std::vec::IntoIter<Result<FileChunk, Status>>>;

#[tonic::async_trait]
impl Classifier for ClassifierService {
    async fn enroll(
        &self,
        req: Request<Streaming<EnrollRequest>>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let caller = caller(&req)?;
        let mut stream = req.into_inner();
        let enrolled = self.cut_off(async {
            let start = match stream.message().await {
                Err(s) => return Err(enroll_stream_error(&s)),
                Ok(None) => return Err(Error::EmptyStream),
                Ok(Some(EnrollRequest {
                    item: Some(enroll_request::Item::Start(s)),
                })) => s,
                Ok(Some(_)) => {
                    return Err(Error::InvalidArgument(
                        "the first message of Enroll must be EnrollStart".into(),
                    ));
                }
            };
            let photos = stream.map(|msg| match msg {
                Ok(EnrollRequest {
                    item: Some(enroll_request::Item::Photo(p)),
                }) => Ok(Photo {
                    id: p.id,
                    image: p.image,
                }),
                Ok(_) => Err(Error::InvalidArgument(
                    "only the first message of Enroll may be EnrollStart".into(),
                )),
                Err(s) => Err(enroll_stream_error(&s)),
            });
            self.core.enroll(&caller, start.into(), photos).await
        });
        Ok(Response::new(enrolled.await?.into()))
    }

    async fn classify(
        &self,
        req: Request<ClassifyRequest>,
    ) -> Result<Response<ClassifyResponse>, Status> {
        let caller = caller(&req)?;
        let r = req.into_inner();
        let classified = self.cut_off(async {
            let input = ClassifyInput {
                image: r.image,
                top_k: r.top_k,
                head: convert::head_kind(&r.head)?,
            };
            self.core.classify(&caller, input).await
        });
        Ok(Response::new(classified.await?.into()))
    }

    type ClassifyStreamStream = ClassifyStream;

    async fn classify_stream(
        &self,
        req: Request<Streaming<ClassifyStreamRequest>>,
    ) -> Result<Response<Self::ClassifyStreamStream>, Status> {
        let caller = caller(&req)?;
        let session = Arc::new(self.core.session(&caller).await?);
        let core = Arc::clone(&self.core);
        let stream = req
            .into_inner()
            .map(move |item| {
                let (core, session) = (Arc::clone(&core), Arc::clone(&session));
                async move {
                    let item = item?;
                    let result = match convert::head_kind(&item.head) {
                        Ok(head) => {
                            let input = ClassifyInput {
                                image: item.image,
                                top_k: item.top_k,
                                head,
                            };
                            core.classify_in(&session, input).await
                        }
                        Err(e) => Err(e),
                    };
                    let result = match result {
                        Ok(c) => classify_stream_response::Result::Classification(c.into()),
                        Err(e) => classify_stream_response::Result::Error(ItemError {
                            code: e.code() as i32,
                            message: e.to_string(),
                        }),
                    };
                    Ok(ClassifyStreamResponse {
                        id: item.id,
                        result: Some(result),
                    })
                }
            })
            .buffer_unordered(STREAM_CONCURRENCY);
        // Shutdown's cut ends the stream (its client sees UNAVAILABLE) instead of waiting for
        // a client that may never close it.
        let cut = self.cut.clone();
        let was_cut = cut.clone();
        let ended = futures::stream::once(async move { was_cut.is_cancelled() })
            .filter_map(|cut| async move { cut.then(|| Err(Status::from(Error::ShuttingDown))) });
        Ok(Response::new(Box::pin(
            stream.take_until(cut.cancelled_owned()).chain(ended),
        )))
    }

    async fn list_classes(
        &self,
        req: Request<ListClassesRequest>,
    ) -> Result<Response<ListClassesResponse>, Status> {
        let caller = caller(&req)?;
        let list = self.cut_off(self.core.list(&caller)).await?;
        Ok(Response::new(list.into()))
    }

    async fn remove_class(
        &self,
        req: Request<RemoveClassRequest>,
    ) -> Result<Response<RemoveClassResponse>, Status> {
        let caller = caller(&req)?;
        let r = req.into_inner();
        let removed = self.cut_off(self.core.remove(&caller, &r.name, r.recursive));
        Ok(Response::new(removed.await?.into()))
    }

    async fn rename_class(
        &self,
        req: Request<RenameClassRequest>,
    ) -> Result<Response<RenameClassResponse>, Status> {
        let caller = caller(&req)?;
        let r = req.into_inner();
        let head = self.cut_off(self.core.rename(&caller, &r.name, &r.new_name));
        Ok(Response::new(convert::renamed(head.await?)))
    }

    async fn train(&self, req: Request<TrainRequest>) -> Result<Response<TrainResponse>, Status> {
        let caller = caller(&req)?;
        let trained = self.cut_off(async {
            let r = req.get_ref();
            let kind = convert::head_kind(&r.head)?;
            self.core.train(&caller, kind, r.from_scratch).await
        });
        Ok(Response::new(trained.await?.into()))
    }

    async fn report(
        &self,
        req: Request<ReportRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        let caller = caller(&req)?;
        let max = req.get_ref().max_suspects as usize;
        let report = self.cut_off(self.core.report(&caller, max));
        Ok(Response::new(report.await?.into()))
    }

    type ExportStream = FileStream;

    async fn export(
        &self,
        req: Request<ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let caller = caller(&req)?;
        let file = self.cut_off(self.core.export(&caller)).await?;
        let chunks: Vec<_> = taxon_proto::file_chunks(file.into())
            .into_iter()
            .map(Ok)
            .collect();
        Ok(Response::new(futures::stream::iter(chunks)))
    }

    async fn import(
        &self,
        req: Request<Streaming<FileChunk>>,
    ) -> Result<Response<ImportResponse>, Status> {
        let caller = caller(&req)?;
        let chunks = req.into_inner().map(|chunk| match chunk {
            Ok(c) => Ok(c.data),
            Err(s) => Err(Error::InvalidArgument(format!(
                "import stream: {}",
                s.message()
            ))),
        });
        let imported = self.cut_off(self.core.import(&caller, chunks));
        Ok(Response::new(imported.await?.into()))
    }
}
