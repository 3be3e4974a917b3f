//! A tower layer that reports every gRPC call once, when it ends: its method, the status the
//! client saw and how long it took (for a stream, from open to the end of the response body).
//!
//! The status of a successful call travels in the body's trailers, an early error's in the
//! response headers (a trailers-only response), so the layer watches the body to its end; a
//! body dropped before it ended is a call the client abandoned, reported as CANCELLED. It
//! sits outside every service and interceptor, so refusals by authentication, decoding limits
//! or shutdown are counted as the client saw them. The method label comes from a fixed list:
//! a path a caller made up is reported as `other`, so callers cannot grow the series.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body::{Body, Frame};
use tonic::Code;
use tower::{Layer, Service};

/// Called once per call with its method (one of the known ones, or `other`), its status and
/// its duration.
pub type Recorder = Arc<dyn Fn(&'static str, Code, Duration) + Send + Sync>;

/// See the module docs.
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    known: Arc<[&'static str]>,
    record: Recorder,
}

impl GrpcMetricsLayer {
    /// `known`: the methods this server serves, as `package.Service/Method`.
    pub fn new(known: &[&'static str], record: Recorder) -> Self {
        Self {
            known: known.into(),
            record,
        }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            known: self.known.clone(),
            record: self.record.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    known: Arc<[&'static str]>,
    record: Recorder,
}

impl<S, B, RB> Service<http::Request<B>> for GrpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<MetricsBody<RB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().trim_start_matches('/');
        let rpc = self
            .known
            .iter()
            .copied()
            .find(|k| *k == path)
            .unwrap_or("other");
        let call = Call {
            rpc,
            started: Instant::now(),
            record: self.record.clone(),
        };
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            let early = status_in(response.headers());
            Ok(response.map(|inner| MetricsBody {
                inner,
                call: Some(call),
                early,
            }))
        })
    }
}

/// A call not yet reported.
struct Call {
    rpc: &'static str,
    started: Instant,
    record: Recorder,
}

impl Call {
    fn report(self, code: Code) {
        (self.record)(self.rpc, code, self.started.elapsed());
    }
}

fn status_in(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(Code::from_i32(value.parse().ok()?))
}

pin_project_lite::pin_project! {
    /// The response body, reporting its call when it ends (or is dropped).
    pub struct MetricsBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
        early: Option<Code>,
    }

    impl<B> PinnedDrop for MetricsBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(call) = this.call.take() {
                call.report(this.early.unwrap_or(Code::Cancelled));
            }
        }
    }
}

impl<B: Body> Body for MetricsBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(status_in)
                    && let Some(call) = this.call.take()
                {
                    call.report(code);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(call) = this.call.take() {
                    call.report(Code::Unknown);
                }
            }
            Poll::Ready(None) => {
                if let Some(call) = this.call.take() {
                    call.report(this.early.unwrap_or(Code::Unknown));
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Mutex;

    use http_body_util::{BodyExt, StreamBody};
    use tower::ServiceExt;

    use super::*;

    type Frames = StreamBody<
        futures::stream::Iter<std::vec::IntoIter<Result<Frame<&'static [u8]>, Infallible>>>,
    >;

    /// A server answering every call with `status` in the headers (trailers-only) or, when
    /// `None`, a message then OK in the trailers.
    fn server(
        status: Option<i32>,
    ) -> impl Service<
        http::Request<()>,
        Response = http::Response<Frames>,
        Error = Infallible,
        Future: Send,
    > + Clone {
        tower::service_fn(move |_req: http::Request<()>| async move {
            let mut frames = Vec::new();
            let mut response = http::Response::builder();
            match status {
                Some(code) => response = response.header("grpc-status", code.to_string()),
                None => {
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().unwrap());
                    frames.push(Ok(Frame::data(&b"message"[..])));
                    frames.push(Ok(Frame::trailers(trailers)));
                }
            }
            let body = StreamBody::new(futures::stream::iter(frames));
            Ok::<_, Infallible>(response.body(body).unwrap())
        })
    }

    /// What a recorder was told, in order.
    type Seen = Arc<Mutex<Vec<(&'static str, Code)>>>;

    fn recording() -> (Recorder, Seen) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let record: Recorder =
            Arc::new(move |rpc, code, _took| sink.lock().unwrap().push((rpc, code)));
        (record, seen)
    }

    fn request(path: &str) -> http::Request<()> {
        http::Request::builder().uri(path).body(()).unwrap()
    }

    #[tokio::test]
    async fn reports_the_status_from_trailers_or_headers_once_the_body_ends() {
        let (record, seen) = recording();
        let layer = GrpcMetricsLayer::new(&["x.Svc/Get"], record);
        let ok = layer
            .layer(server(None))
            .oneshot(request("/x.Svc/Get"))
            .await
            .unwrap();
        assert!(seen.lock().unwrap().is_empty(), "not before the body ends");
        ok.into_body().collect().await.unwrap();
        let refused = layer
            .layer(server(Some(5)))
            .oneshot(request("/x.Svc/Get"))
            .await
            .unwrap();
        refused.into_body().collect().await.unwrap();
        let made_up = layer
            .layer(server(Some(12)))
            .oneshot(request("/x.Svc/Anything"))
            .await
            .unwrap();
        made_up.into_body().collect().await.unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            [
                ("x.Svc/Get", Code::Ok),
                ("x.Svc/Get", Code::NotFound),
                ("other", Code::Unimplemented)
            ]
        );
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_is_a_cancelled_call() {
        let (record, seen) = recording();
        let layer = GrpcMetricsLayer::new(&["x.Svc/Stream"], record);
        let response = layer
            .layer(server(None))
            .oneshot(request("/x.Svc/Stream"))
            .await
            .unwrap();
        drop(response);
        assert_eq!(*seen.lock().unwrap(), [("x.Svc/Stream", Code::Cancelled)]);
    }
}
