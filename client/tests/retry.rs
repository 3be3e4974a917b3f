//! The client through a server that drops calls with UNAVAILABLE, as a replica does when it
//! dies behind a load balancer: classify re-sends only what was not answered, enroll repeats
//! its call, other statuses are not retried, and a spent budget fails with the last status.

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use clap::Parser;
use futures::Stream;
use taxon_client::{Cli, Error, Outcome, execute};
use taxon_proto::v1::classifier_server::{Classifier, ClassifierServer};
use taxon_proto::v1::classify_stream_response::Result as Reply;
use taxon_proto::v1::enroll_request::Item;
use taxon_proto::v1::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Code, Request, Response, Status, Streaming};

/// A server whose first `outages` calls fail: ClassifyStream after answering `answer_first`
/// images, Enroll after reading its whole upload (before storing it).
#[derive(Clone)]
struct Flaky {
    outages: Arc<Mutex<u32>>,
    answer_first: usize,
    failure: Code,
    /// The ids each ClassifyStream call received, and the photos each Enroll call read.
    calls: Arc<Mutex<Vec<Vec<String>>>>,
    stored: Arc<Mutex<u32>>,
}

impl Flaky {
    fn new(outages: u32, failure: Code) -> Self {
        Self {
            outages: Arc::new(Mutex::new(outages)),
            answer_first: 2,
            failure,
            calls: Arc::default(),
            stored: Arc::default(),
        }
    }

    /// True when this call should fail (and counts the outage off).
    fn failing(&self) -> bool {
        let mut left = self.outages.lock().unwrap();
        let fail = *left > 0;
        *left = left.saturating_sub(1);
        fail
    }
}

fn classified(id: String) -> ClassifyStreamResponse {
    ClassifyStreamResponse {
        id,
        result: Some(Reply::Classification(ClassifyResponse {
            label: "mug".into(),
            decision: Decision::Child as i32,
            probability: 0.9,
            ..Default::default()
        })),
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<ClassifyStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Classifier for Flaky {
    async fn enroll(
        &self,
        req: Request<Streaming<EnrollRequest>>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let mut stream = req.into_inner();
        let mut photos = Vec::new();
        while let Some(msg) = stream.message().await? {
            if let Some(Item::Photo(p)) = msg.item {
                photos.push(p.id);
            }
        }
        let n = photos.len() as u32;
        self.calls.lock().unwrap().push(photos);
        if self.failing() {
            return Err(Status::new(self.failure, "replica went away"));
        }
        *self.stored.lock().unwrap() += n;
        Ok(Response::new(EnrollResponse {
            class_name: "mug".into(),
            accepted: n,
            examples: n,
            head: "prototype".into(),
            head_version: 1,
            ..Default::default()
        }))
    }

    async fn classify(
        &self,
        _: Request<ClassifyRequest>,
    ) -> Result<Response<ClassifyResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    type ClassifyStreamStream = ReplyStream;

    async fn classify_stream(
        &self,
        req: Request<Streaming<ClassifyStreamRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        let fail = self.failing();
        let (answer_first, failure, calls) = (self.answer_first, self.failure, self.calls.clone());
        // Recorded in call order, each id before it is answered.
        let call = {
            let mut calls = calls.lock().unwrap();
            calls.push(Vec::new());
            calls.len() - 1
        };
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut seen = 0;
            while let Ok(Some(r)) = inbound.message().await {
                calls.lock().unwrap()[call].push(r.id.clone());
                seen += 1;
                if fail && seen > answer_first {
                    let _ = tx
                        .send(Err(Status::new(failure, "replica went away")))
                        .await;
                    break;
                }
                if tx.send(Ok(classified(r.id))).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    /// Never answers: only a deadline ends it.
    async fn list_classes(
        &self,
        req: Request<ListClassesRequest>,
    ) -> Result<Response<ListClassesResponse>, Status> {
        let timeout = taxon_proto::grpc_timeout(req.metadata());
        self.calls
            .lock()
            .unwrap()
            .push(vec![format!("{timeout:?}")]);
        std::future::pending().await
    }

    async fn remove_class(
        &self,
        _: Request<RemoveClassRequest>,
    ) -> Result<Response<RemoveClassResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn rename_class(
        &self,
        _: Request<RenameClassRequest>,
    ) -> Result<Response<RenameClassResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn train(&self, _: Request<TrainRequest>) -> Result<Response<TrainResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    type ExportStream = futures::stream::Empty<Result<FileChunk, Status>>;

    async fn export(
        &self,
        _: Request<ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn import(
        &self,
        _: Request<tonic::Streaming<FileChunk>>,
    ) -> Result<Response<ImportResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn report(&self, _: Request<ReportRequest>) -> Result<Response<ReportResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

async fn serve(flaky: Flaky) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ClassifierServer::new(flaky))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

/// Five JPEG-signed files in a temp dir, named 0.jpg .. 4.jpg.
fn photos() -> (tempfile::TempDir, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let paths = (0..5)
        .map(|i| {
            let p = dir.path().join(format!("{i}.jpg"));
            std::fs::write(&p, [0xFF, 0xD8, 0xFF, i as u8]).unwrap();
            p.to_string_lossy().to_string()
        })
        .collect();
    (dir, paths)
}

async fn run(
    server: &str,
    retry_s: &str,
    args: &[String],
) -> (taxon_client::Result<Outcome>, String) {
    let head = ["client", "--server", server, "--retry-s", retry_s, "--json"];
    let cli = Cli::try_parse_from(
        head.iter()
            .map(|s| s.to_string())
            .chain(args.iter().cloned()),
    )
    .unwrap();
    let mut out = Vec::new();
    let r = execute(cli, &mut out).await;
    (r, String::from_utf8(out).unwrap())
}

fn classify_args(paths: &[String]) -> Vec<String> {
    std::iter::once("classify".to_string())
        .chain(paths.iter().cloned())
        .collect()
}

#[tokio::test]
async fn classify_resends_only_the_unanswered_images_after_unavailable() {
    let flaky = Flaky::new(2, Code::Unavailable);
    let server = serve(flaky.clone()).await;
    let (_dir, paths) = photos();
    let (r, out) = run(&server, "30", &classify_args(&paths)).await;
    assert_eq!(r.unwrap(), Outcome::Success, "{out}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5, "{out}");
    for (line, path) in lines.iter().zip(&paths) {
        assert_eq!(line["image"], path.as_str(), "in the order given");
        assert_eq!(line["label"], "mug", "{line}");
    }
    // Each failed call answered two images; the next sent only those still unanswered.
    let calls = flaky.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert_eq!(calls[0], ["0", "1", "2"]);
    assert_eq!(calls[1], ["2", "3", "4"]);
    assert_eq!(calls[2], ["4"]);
}

#[tokio::test]
async fn enroll_repeats_a_call_that_found_no_server() {
    let flaky = Flaky::new(1, Code::Unavailable);
    let server = serve(flaky.clone()).await;
    let (_dir, paths) = photos();
    let args: Vec<String> = ["enroll", "--class", "mug"]
        .iter()
        .map(|s| s.to_string())
        .chain(paths.iter().cloned())
        .collect();
    let (r, out) = run(&server, "30", &args).await;
    assert_eq!(r.unwrap(), Outcome::Success, "{out}");
    let summary: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(summary["accepted"], 5, "{summary}");
    let calls = flaky.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "one failed call, one repeat: {calls:?}");
    assert_eq!(calls[0], calls[1], "the repeat sends the same photos");
    assert_eq!(*flaky.stored.lock().unwrap(), 5);
}

#[tokio::test]
async fn other_statuses_fail_at_once_and_a_spent_budget_fails_with_the_last_status() {
    let (_dir, paths) = photos();

    let refused = Flaky::new(1, Code::ResourceExhausted);
    let server = serve(refused.clone()).await;
    let (r, _) = run(&server, "30", &classify_args(&paths)).await;
    let Err(Error::Rpc { status, .. }) = r else {
        panic!("expected the status, got {r:?}");
    };
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(refused.calls.lock().unwrap().len(), 1, "not retried");

    let down = Flaky::new(u32::MAX, Code::Unavailable);
    let server = serve(down.clone()).await;
    let (r, _) = run(&server, "0", &classify_args(&paths)).await;
    let Err(Error::Rpc { status, .. }) = r else {
        panic!("expected the status, got {r:?}");
    };
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        down.calls.lock().unwrap().len(),
        1,
        "--retry-s 0: one attempt"
    );
}

#[tokio::test]
async fn timeout_s_is_each_calls_deadline() {
    let stuck = Flaky::new(0, Code::Ok);
    let server = serve(stuck.clone()).await;
    let args = ["--timeout-s", "0.2", "classes"].map(String::from);
    let (r, _) = run(&server, "30", &args).await;
    let Err(Error::Rpc { status, .. }) = r else {
        panic!("expected the deadline, got {r:?}");
    };
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("--timeout-s 0.2"), "{status:?}");
    let calls = stuck.calls.lock().unwrap().clone();
    assert_eq!(
        calls,
        [["Some(200ms)"]],
        "sent as grpc-timeout, not retried"
    );
}
