//! The commands end to end against a scripted Classifier on 127.0.0.1:0, so the client's own
//! behaviour (files, streams, ordering, JSON keys, exit outcomes, error advice) is tested
//! without the real services. The real services are exercised in tests/tests/client_cli.rs.
//!
//! Test photos are bytes `FF D8 FF` + `class=<name>`: a JPEG signature for the client's
//! checks, and a label the mock reads back, so "classification" is exact.

use std::collections::BTreeMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use clap::Parser;
use futures::Stream;
use taxon_client::{Cli, Outcome, execute};
use taxon_proto::v1::classifier_server::{Classifier, ClassifierServer};
use taxon_proto::v1::classify_stream_response::Result as Reply;
use taxon_proto::v1::enroll_request::Item;
use taxon_proto::v1::*;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

/// Per tenant: class -> (parent, examples).
type Classes = BTreeMap<String, BTreeMap<String, (String, u32)>>;

#[derive(Clone, Default)]
struct Mock {
    classes: Arc<Mutex<Classes>>,
    token: Option<String>,
}

fn tenant<T>(req: &Request<T>) -> String {
    req.metadata()
        .get("x-tenant")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("default")
        .to_string()
}

fn label(image: &[u8]) -> Option<String> {
    std::str::from_utf8(image.get(3..)?)
        .ok()?
        .strip_prefix("class=")
        .map(str::to_string)
}

impl Mock {
    fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let sent = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if sent == Some(format!("Bearer {token}").as_str()) {
            Ok(())
        } else {
            Err(Status::unauthenticated("missing or wrong bearer token"))
        }
    }

    fn answer(&self, tenant: &str, image: &[u8]) -> Result<ClassifyResponse, Status> {
        let name = label(image).ok_or_else(|| Status::invalid_argument("cannot decode image"))?;
        let classes = self.classes.lock().unwrap();
        let parent = classes
            .get(tenant)
            .and_then(|c| c.get(&name))
            .map(|c| c.0.clone())
            .unwrap_or_default();
        let score = |name: &str, parent: &str| ClassScore {
            name: name.into(),
            probability: 0.75,
            parent: parent.into(),
        };
        Ok(ClassifyResponse {
            children: vec![score(&name, &parent)],
            parent: Some(score(&parent, "")),
            decision: Decision::Child as i32,
            label: name.clone(),
            probability: 0.75,
            head_version: 3,
            head: "flat".into(),
            similarity: 0.9,
            parent_branch: None,
        })
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<ClassifyStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Classifier for Mock {
    async fn enroll(
        &self,
        req: Request<Streaming<EnrollRequest>>,
    ) -> Result<Response<EnrollResponse>, Status> {
        self.check(&req)?;
        let tenant = tenant(&req);
        let mut stream = req.into_inner();
        let Some(Item::Start(start)) = stream.message().await?.and_then(|m| m.item) else {
            return Err(Status::invalid_argument(
                "first message must be EnrollStart",
            ));
        };
        let mut resp = EnrollResponse {
            class_name: start.class_name.clone(),
            parent: start.parent.clone(),
            head_version: 2,
            head: "prototype".into(),
            ..Default::default()
        };
        while let Some(msg) = stream.message().await? {
            if let Some(Item::Photo(p)) = msg.item {
                if label(&p.image).is_some() {
                    resp.accepted += 1;
                } else {
                    resp.rejected.push(RejectedPhoto {
                        id: p.id,
                        code: 3,
                        message: "cannot decode".into(),
                    });
                }
            }
        }
        let mut classes = self.classes.lock().unwrap();
        let entry = classes.entry(tenant).or_default();
        let class = entry.entry(start.class_name).or_insert((start.parent, 0));
        class.1 += resp.accepted;
        resp.examples = class.1;
        Ok(Response::new(resp))
    }

    async fn classify(
        &self,
        req: Request<ClassifyRequest>,
    ) -> Result<Response<ClassifyResponse>, Status> {
        self.check(&req)?;
        let t = tenant(&req);
        self.answer(&t, &req.into_inner().image).map(Response::new)
    }

    type ClassifyStreamStream = ReplyStream;

    /// Replies only after the last request, in reverse order: the client must match by id.
    async fn classify_stream(
        &self,
        req: Request<Streaming<ClassifyStreamRequest>>,
    ) -> Result<Response<ReplyStream>, Status> {
        self.check(&req)?;
        let t = tenant(&req);
        let mut stream = req.into_inner();
        let mut replies = Vec::new();
        while let Some(r) = stream.message().await? {
            let result = match self.answer(&t, &r.image) {
                Ok(c) => Reply::Classification(c),
                Err(s) => Reply::Error(ItemError {
                    code: s.code() as i32,
                    message: s.message().into(),
                }),
            };
            replies.push(Ok(ClassifyStreamResponse {
                id: r.id,
                result: Some(result),
            }));
        }
        replies.reverse();
        Ok(Response::new(Box::pin(futures::stream::iter(replies))))
    }

    async fn list_classes(
        &self,
        req: Request<ListClassesRequest>,
    ) -> Result<Response<ListClassesResponse>, Status> {
        self.check(&req)?;
        let t = tenant(&req);
        let classes = self.classes.lock().unwrap();
        let mut out: Vec<ClassInfo> = Vec::new();
        for (name, (parent, n)) in classes.get(&t).into_iter().flatten() {
            out.push(ClassInfo {
                name: name.clone(),
                parent: parent.clone(),
                examples: *n,
                is_parent: false,
            });
            if !parent.is_empty() && !out.iter().any(|c| &c.name == parent) {
                out.push(ClassInfo {
                    name: parent.clone(),
                    is_parent: true,
                    ..Default::default()
                });
            }
        }
        Ok(Response::new(ListClassesResponse {
            classes: out,
            head_version: 3,
            head: "flat".into(),
            model: "mock@sha256:00".into(),
        }))
    }

    async fn remove_class(
        &self,
        req: Request<RemoveClassRequest>,
    ) -> Result<Response<RemoveClassResponse>, Status> {
        self.check(&req)?;
        let t = tenant(&req);
        let r = req.into_inner();
        let mut classes = self.classes.lock().unwrap();
        let entry = classes.entry(t).or_default();
        let doomed: Vec<String> = entry
            .iter()
            .filter(|(n, (p, _))| **n == r.name || (r.recursive && *p == r.name))
            .map(|(n, _)| n.clone())
            .collect();
        if doomed.is_empty() {
            return Err(Status::not_found(format!("no class {:?}", r.name)));
        }
        let removed_examples = doomed
            .iter()
            .filter_map(|n| entry.remove(n))
            .map(|c| c.1)
            .sum();
        Ok(Response::new(RemoveClassResponse {
            removed_classes: doomed,
            removed_examples,
            head_version: 4,
        }))
    }

    async fn rename_class(
        &self,
        req: Request<RenameClassRequest>,
    ) -> Result<Response<RenameClassResponse>, Status> {
        self.check(&req)?;
        let t = tenant(&req);
        let r = req.into_inner();
        let mut classes = self.classes.lock().unwrap();
        let entry = classes.entry(t).or_default();
        let c = entry
            .remove(&r.name)
            .ok_or_else(|| Status::not_found("no such class"))?;
        entry.insert(r.new_name, c);
        Ok(Response::new(RenameClassResponse { head_version: 5 }))
    }

    async fn train(&self, req: Request<TrainRequest>) -> Result<Response<TrainResponse>, Status> {
        self.check(&req)?;
        let head = req.into_inner().head;
        Ok(Response::new(TrainResponse {
            head,
            head_version: 6,
            train_ms: 12.5,
            classes: 0,
            examples: 0,
        }))
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

/// Serves the mock (and grpc.health.v1) on a free port; returns its URL.
async fn serve(mock: Mock) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reporter, health) = tonic_health::server::health_reporter();
    for service in ["", "taxon.v1.Classifier"] {
        reporter
            .set_service_status(service, tonic_health::ServingStatus::Serving)
            .await;
    }
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(ClassifierServer::new(mock))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

async fn client<S: AsRef<str>>(args: &[S]) -> (taxon_client::Result<Outcome>, String) {
    let cli = Cli::try_parse_from(std::iter::once("client").chain(args.iter().map(AsRef::as_ref)))
        .unwrap();
    let mut out = Vec::new();
    let r = execute(cli, &mut out).await;
    (r, String::from_utf8(out).unwrap())
}

fn photo(dir: &Path, name: &str, class: &str) -> String {
    let path = dir.join(name);
    std::fs::write(
        &path,
        [&[0xFF, 0xD8, 0xFF][..], format!("class={class}").as_bytes()].concat(),
    )
    .unwrap();
    path.to_string_lossy().to_string()
}

fn lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn enroll_classify_classes_remove_rename_with_tenant_and_token() {
    let mock = Mock {
        token: Some("s3cret".into()),
        ..Default::default()
    };
    let classes = mock.classes.clone();
    let url = serve(mock).await;
    let dir = tempfile::tempdir().unwrap();
    let pics = dir.path().join("pics");
    std::fs::create_dir(&pics).unwrap();
    photo(&pics, "a.jpg", "mymug");
    photo(&pics, "b.jpg", "mymug");
    std::fs::write(pics.join("notes.txt"), "not a photo").unwrap();
    std::fs::write(pics.join("broken.jpg"), [0xFF, 0xD8, 0xFF, b'x']).unwrap();
    let pics = pics.to_string_lossy().to_string();
    let base = [
        "--server", &url, "--tenant", "acme", "--token", "s3cret", "--json",
    ];
    let with =
        |rest: &[&str]| -> Vec<String> { base.iter().chain(rest).map(|s| s.to_string()).collect() };

    let (r, out) = client(&with(&[
        "enroll",
        "--class",
        "mymug",
        "--parent",
        "kitchenware",
        &pics,
    ]))
    .await;
    assert_eq!(r.unwrap(), Outcome::Success);
    let v = &lines(&out)[0];
    assert_eq!(
        (v["class"].as_str(), v["parent"].as_str()),
        (Some("mymug"), Some("kitchenware"))
    );
    assert_eq!(v["accepted"], 2);
    assert_eq!(v["rejected"][0]["code"], 3, "{v}");
    assert!(
        v["rejected"][0]["file"]
            .as_str()
            .unwrap()
            .ends_with("broken.jpg")
    );
    assert_eq!(v["head_version"], 2);
    assert!(
        v["skipped"][0]["path"]
            .as_str()
            .unwrap()
            .ends_with("notes.txt")
    );
    assert!(
        classes.lock().unwrap()["acme"].contains_key("mymug"),
        "sent as tenant acme"
    );

    let imgs = [
        photo(dir.path(), "q1.jpg", "mymug"),
        photo(dir.path(), "q2.jpg", "other"),
    ];
    let (r, out) = client(&with(&["classify", &imgs[0], &imgs[1]])).await;
    assert_eq!(r.unwrap(), Outcome::Success);
    let v = lines(&out);
    assert_eq!(v.len(), 2);
    assert!(
        v[0]["image"].as_str().unwrap().ends_with("q1.jpg"),
        "input order despite reversed replies"
    );
    assert_eq!(
        (v[0]["decision"].as_str(), v[0]["label"].as_str()),
        (Some("child"), Some("mymug"))
    );
    assert_eq!(v[0]["parent"], "kitchenware");
    assert!(v[0]["probability"].as_f64().is_some());
    assert_eq!(v[1]["label"], "other");

    let bad = std::fs::write(dir.path().join("bad.jpg"), [0xFF, 0xD8, 0xFF, 0]);
    bad.unwrap();
    let bad = dir.path().join("bad.jpg").to_string_lossy().to_string();
    let (r, out) = client(&with(&["classify", &imgs[0], &bad])).await;
    assert!(
        matches!(r.unwrap(), Outcome::Failed(_)),
        "an unclassifiable image fails the command"
    );
    assert!(
        lines(&out)[1]["error"]
            .as_str()
            .unwrap()
            .contains("cannot decode")
    );

    let (r, out) = client(&with(&["classes"])).await;
    assert_eq!(r.unwrap(), Outcome::Success);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let mug = v
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "mymug")
        .unwrap();
    assert_eq!(
        (mug["parent"].as_str(), mug["examples"].as_u64()),
        (Some("kitchenware"), Some(2))
    );

    let (r, _) = client(&with(&["rename", "mymug", "yourmug"])).await;
    assert_eq!(r.unwrap(), Outcome::Success);
    let (r, out) = client(&with(&["remove", "kitchenware", "--recursive"])).await;
    assert_eq!(r.unwrap(), Outcome::Success);
    assert_eq!(lines(&out)[0]["removed_classes"][0], "yourmug");
    let (r, _) = client(&with(&["remove", "nothing"])).await;
    assert!(
        r.unwrap_err().to_string().contains("client classes"),
        "NOT_FOUND says where to look"
    );

    let (r, _) = client(&["--server", &url, "classes"]).await;
    let msg = r.unwrap_err().to_string();
    assert!(
        msg.contains("--token") && msg.contains("UNAUTHENTICATED"),
        "{msg}"
    );

    let (r, out) = client(&["--server", &url, "health", "--json"]).await;
    assert_eq!(r.unwrap(), Outcome::Success);
    assert_eq!(lines(&out)[0]["status"], "SERVING");
}

#[tokio::test]
async fn nothing_listening_names_the_address_and_how_to_start_it() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let url = format!("http://{addr}");
    let (r, _) = client(&["--server", &url, "classes"]).await;
    let msg = r.unwrap_err().to_string();
    assert!(
        msg.contains(&url) && msg.contains("head-trainer") && msg.contains("cargo run"),
        "{msg}"
    );
}

#[tokio::test]
async fn enroll_with_nothing_sendable_fails_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.txt"), "x").unwrap();
    let d = dir.path().to_string_lossy().to_string();
    let (r, _) = client(&[
        "--server",
        "http://127.0.0.1:1",
        "enroll",
        "--class",
        "x",
        &d,
    ])
    .await;
    assert!(matches!(
        r,
        Err(taxon_client::Error::NoImages { skipped: 1 })
    ));
}

#[tokio::test]
async fn eval_writes_the_report_and_pictures_and_cleans_up() {
    let mock = Mock::default();
    let classes = mock.classes.clone();
    let url = serve(mock).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("toyset");
    for (parent, child) in [("cat", "sphynx"), ("dog", "pug"), ("dog", "beagle")] {
        let d = root.join(parent).join(child);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..4 {
            photo(&d, &format!("{i}.jpg"), child);
        }
    }
    let out_dir = dir.path().join("report");
    let args = [
        "--server",
        &url,
        "eval",
        root.to_str().unwrap(),
        "--shots",
        "1,2",
        "--seeds",
        "2",
        "--out",
        out_dir.to_str().unwrap(),
        "--min-default-child",
        "99",
    ];
    let (r, out) = client(&args).await;
    assert_eq!(r.unwrap(), Outcome::Success, "{out}");
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    assert!(md.contains("## k = 2 (6 test photos per seed)"), "{md}");
    assert!(
        // ECE 25: the mock answers every photo right at probability 0.75; the default head
        // is trained (from scratch) by the evaluation, at the mock's 12.5 ms.
        md.contains(
            "| default (live: flat) | 100.0 ± 0.0 | 100.0 ± 0.0 | — | 0.0 ± 0.0 | 25.0 ± 0.0 | 12.5 ± 0.0 |"
        ),
        "{md}"
    );
    assert!(md.contains("| hierarchical | 100.0 ± 0.0"), "{md}");
    assert!(md.contains("| dog | pug | 100 | 100 |"), "{md}");
    for png in ["confusion.png", "accuracy_vs_k.png"] {
        image::open(out_dir.join(png)).unwrap();
    }
    let left: usize = classes.lock().unwrap().values().map(BTreeMap::len).sum();
    assert_eq!(left, 0, "every eval tenant is emptied");
    let tenants: Vec<String> = classes.lock().unwrap().keys().cloned().collect();
    assert!(
        tenants
            .iter()
            .all(|t| t.starts_with("eval-") && t.contains("-toyset-k")),
        "{tenants:?}"
    );
    assert_eq!(tenants.len(), 4, "one fresh tenant per (k, seed)");

    let mut failing = args.to_vec();
    *failing.last_mut().unwrap() = "100.5";
    let (r, _) = client(&failing).await;
    assert!(matches!(r.unwrap(), Outcome::Failed(m) if m.contains("min-default-child")));
}
