//! Cross-service end-to-end tests: a real feature-server (MobileNetV2 with deterministic
//! "formula" weights) and the head-trainer, both in-process on 127.0.0.1:0, talking gRPC.
//!
//! Images are synthetic (solid colours, stripes, a checkerboard), so every answer is
//! deterministic. No fixed ports, no sleeps: waits are on health watches and replies.

use std::time::{Duration, Instant};

use head_trainer::heads::HeadKind;
use taxon_proto::v1::*;
use taxon_tests::*;
use tonic::Code;
use tonic::transport::Channel;

type Client = classifier_client::ClassifierClient<Channel>;

const RED: [u8; 3] = [220, 30, 30];
const BLUE: [u8; 3] = [30, 30, 220];
const GREEN: [u8; 3] = [30, 200, 30];

/// Test config: small photo limit (so an oversized photo is cheap to send), an open-set
/// threshold placed between what these synthetic classes score (known >= 0.59, checkerboard
/// 0.29 under formula weights), and a trained default head (`lda`), so that training,
/// the atomic swap and head persistence are what these tests exercise.
fn config(data: &std::path::Path) -> head_trainer::Config {
    let mut c = head_trainer::Config::new(vec![shared_feature_server()], data);
    c.default_head = HeadKind::Lda;
    c.max_photo_bytes = 256 << 10;
    c.thresholds.unknown_similarity = 0.45;
    c
}

async fn classify(
    c: &mut Client,
    md: &[(&'static str, &str)],
    image: Vec<u8>,
    head: &str,
) -> Result<ClassifyResponse, tonic::Status> {
    c.classify(request(
        ClassifyRequest {
            image: image.into(),
            top_k: 3,
            head: head.to_string(),
        },
        md,
    ))
    .await
    .map(tonic::Response::into_inner)
}

async fn remove(
    c: &mut Client,
    md: &[(&'static str, &str)],
    name: &str,
    recursive: bool,
) -> Result<RemoveClassResponse, tonic::Status> {
    let req = RemoveClassRequest {
        name: name.into(),
        recursive,
    };
    c.remove_class(request(req, md))
        .await
        .map(tonic::Response::into_inner)
}

async fn rename(
    c: &mut Client,
    md: &[(&'static str, &str)],
    name: &str,
    new_name: &str,
) -> Result<RenameClassResponse, tonic::Status> {
    let req = RenameClassRequest {
        name: name.into(),
        new_name: new_name.into(),
    };
    c.rename_class(request(req, md))
        .await
        .map(tonic::Response::into_inner)
}

async fn list(c: &mut Client, md: &[(&'static str, &str)]) -> ListClassesResponse {
    c.list_classes(request(ListClassesRequest {}, md))
        .await
        .unwrap()
        .into_inner()
}

/// A taxonomy used by several tests: reds/{red_a, red_b} photographed identically (too close
/// to call), cool/{blue, green}.
async fn enroll_taxonomy(c: &mut Client, md: &[(&'static str, &str)]) -> EnrollResponse {
    let reds = photos(Pattern::Solid, RED, 4, 1);
    let a = enroll(c, md, "red_a", "reds", false, reds.clone())
        .await
        .unwrap();
    assert_eq!(
        (a.accepted, a.cached, a.examples, a.head.as_str()),
        (4, 0, 4, "prototype")
    );
    let b = enroll(c, md, "red_b", "reds", false, reds).await.unwrap();
    assert_eq!(
        (b.accepted, b.cached),
        (4, 4),
        "photos seen before are not embedded again"
    );
    enroll(
        c,
        md,
        "blue",
        "cool",
        false,
        photos(Pattern::Solid, BLUE, 4, 3),
    )
    .await
    .unwrap();
    enroll(
        c,
        md,
        "green",
        "cool",
        true,
        photos(Pattern::Stripes, GREEN, 4, 4),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_hierarchy_backoff_unknown_rename_remove() {
    let dir = tempfile::tempdir().unwrap();
    let ht = start_head_trainer(config(dir.path())).await;
    wait_serving(ht.addr, "taxon.v1.Classifier").await;
    let mut c = classifier(ht.addr);
    let md: &[(&'static str, &str)] = &[("x-tenant", "e2e")];

    // Enroll: classifiable at once (prototype), trained head live with wait_for_head.
    let first = enroll(
        &mut c,
        md,
        "solo",
        "",
        false,
        photos(Pattern::Solid, BLUE, 2, 50),
    )
    .await
    .unwrap();
    assert_eq!(first.head, "prototype");
    let r = classify(&mut c, md, png(Pattern::Solid, BLUE, 51), "")
        .await
        .unwrap();
    assert_eq!(
        (r.label.as_str(), r.decision),
        ("solo", Decision::Child as i32)
    );
    let removed = remove(&mut c, md, "solo", false).await.unwrap();
    assert_eq!(
        (removed.removed_classes, removed.removed_examples),
        (vec!["solo".to_string()], 2)
    );

    let last = enroll_taxonomy(&mut c, md).await;
    assert_eq!(
        last.head, "lda",
        "wait_for_head replies with the trained head live"
    );
    assert!(last.time_to_live_ms > 0 && last.head_version > 0);
    assert_eq!(last.parent, "cool");

    // Classify: a clear child, a back-off to the parent, and an unknown.
    let r = classify(&mut c, md, png(Pattern::Solid, BLUE, 99), "")
        .await
        .unwrap();
    assert_eq!(
        (r.label.as_str(), r.decision, r.head.as_str()),
        ("blue", Decision::Child as i32, "lda")
    );
    assert_eq!(r.parent.as_ref().unwrap().name, "cool");
    assert_eq!(r.children[0].parent, "cool");
    assert!(r.similarity > 0.45);
    // red_a and red_b have the very same photos: nearest class mean splits evenly between
    // them and backs off to `reds`; any head puts all the mass on the parent.
    let r = classify(&mut c, md, png(Pattern::Solid, RED, 99), "prototype")
        .await
        .unwrap();
    assert_eq!(
        (r.label.as_str(), r.decision),
        ("reds", Decision::Parent as i32),
        "{r:?}"
    );
    assert!(r.probability > 0.9);
    let r = classify(&mut c, md, png(Pattern::Solid, RED, 99), "")
        .await
        .unwrap();
    assert_eq!(
        r.parent
            .as_ref()
            .map(|p| (p.name.as_str(), p.probability > 0.9)),
        Some(("reds", true)),
        "{r:?}"
    );
    let r = classify(&mut c, md, png(Pattern::Checker, [0; 3], 99), "")
        .await
        .unwrap();
    assert_eq!(
        (r.label.as_str(), r.decision),
        ("", Decision::Unknown as i32),
        "{r:?}"
    );

    // Train every kind, then ask each by name.
    for kind in ["prototype", "flat", "hierarchical", "combined", "lda"] {
        let t = c
            .train(request(
                TrainRequest {
                    head: kind.into(),
                    ..Default::default()
                },
                md,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((t.head.as_str(), t.classes, t.examples), (kind, 4, 16));
        let r = classify(&mut c, md, png(Pattern::Stripes, GREEN, 98), kind)
            .await
            .unwrap();
        assert_eq!((r.label.as_str(), r.head.as_str()), ("green", kind));
        assert_eq!(r.parent_branch.is_some(), kind == "hierarchical");
    }

    // ClassifyStream: results matched by id, a bad item does not harm its neighbours.
    let items = vec![
        ClassifyStreamRequest {
            id: "b".into(),
            image: png(Pattern::Solid, BLUE, 7).into(),
            top_k: 1,
            head: String::new(),
        },
        ClassifyStreamRequest {
            id: "junk".into(),
            image: b"not an image".to_vec().into(),
            top_k: 1,
            head: String::new(),
        },
        ClassifyStreamRequest {
            id: "g".into(),
            image: png(Pattern::Stripes, GREEN, 7).into(),
            top_k: 1,
            head: "flat".into(),
        },
    ];
    let mut stream = c
        .classify_stream(request(tokio_stream::iter(items), md))
        .await
        .unwrap()
        .into_inner();
    let mut answers = std::collections::HashMap::new();
    while let Some(a) = stream.message().await.unwrap() {
        answers.insert(a.id.clone(), a.result.unwrap());
    }
    use classify_stream_response::Result as R;
    assert!(
        matches!(&answers["b"], R::Classification(r) if r.label == "blue" && r.children.len() == 1)
    );
    assert!(
        matches!(&answers["g"], R::Classification(r) if r.label == "green" && r.head == "flat")
    );
    assert!(
        matches!(&answers["junk"], R::Error(e) if e.code == Code::InvalidArgument as i32),
        "{:?}",
        answers["junk"]
    );

    // ListClasses: parents count their children's examples.
    let l = list(&mut c, md).await;
    let get = |l: &ListClassesResponse, n: &str| l.classes.iter().find(|c| c.name == n).cloned();
    assert_eq!(l.classes.len(), 6);
    assert!(get(&l, "reds").unwrap().is_parent);
    assert_eq!(get(&l, "reds").unwrap().examples, 8);
    assert_eq!(get(&l, "red_a").unwrap().parent, "reds");
    assert!(l.model.starts_with("mobilenet_v2@sha256:"));
    let version = l.head_version;

    // Rename: no photos, same head.
    let rn = rename(&mut c, md, "blue", "navy").await.unwrap();
    assert_eq!(rn.head_version, version, "a rename does not retrain");
    let r = classify(&mut c, md, png(Pattern::Solid, BLUE, 97), "")
        .await
        .unwrap();
    assert_eq!((r.label.as_str(), r.head_version), ("navy", version));

    // Remove a parent with its children: gone from listings and answers at once.
    let e = remove(&mut c, md, "reds", false).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let rm = remove(&mut c, md, "reds", true).await.unwrap();
    assert_eq!(rm.removed_classes.len(), 3);
    assert_eq!(rm.removed_examples, 8);
    let l = list(&mut c, md).await;
    assert!(get(&l, "red_a").is_none() && get(&l, "reds").is_none());
    let r = classify(&mut c, md, png(Pattern::Solid, RED, 96), "")
        .await
        .unwrap();
    assert!(
        r.children.iter().all(|c| !c.name.starts_with("red")),
        "{r:?}"
    );
    ht.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_serves_the_same_classes_and_head() {
    let dir = tempfile::tempdir().unwrap();
    let md: &[(&'static str, &str)] = &[("x-tenant", "restart")];
    let (version, before) = {
        let ht = start_head_trainer(config(dir.path())).await;
        wait_serving(ht.addr, "taxon.v1.Classifier").await;
        let mut c = classifier(ht.addr);
        let last = enroll_taxonomy(&mut c, md).await;
        let r = classify(&mut c, md, png(Pattern::Solid, BLUE, 90), "")
            .await
            .unwrap();
        ht.stop().await;
        (last.head_version, r)
    };
    let ht = start_head_trainer(config(dir.path())).await;
    wait_serving(ht.addr, "taxon.v1.Classifier").await;
    let mut c = classifier(ht.addr);
    let l = list(&mut c, md).await;
    assert_eq!((l.head.as_str(), l.head_version), ("lda", version));
    assert_eq!(l.classes.len(), 6);
    let after = classify(&mut c, md, png(Pattern::Solid, BLUE, 90), "")
        .await
        .unwrap();
    assert_eq!(after, before, "same head, same answer");
    ht.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated_and_tokens_decide_the_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        "# token tenant\nalpha-secret alpha\nbeta-secret beta\n",
    )
    .unwrap();
    let mut cfg = config(&dir.path().join("data"));
    cfg.tokens_file = Some(tokens);
    let ht = start_head_trainer(cfg).await;
    wait_serving(ht.addr, "taxon.v1.Classifier").await;
    let mut c = classifier(ht.addr);
    let alpha: &[(&'static str, &str)] = &[("authorization", "Bearer alpha-secret")];
    // The header cannot pick another tenant: the token decides.
    let beta: &[(&'static str, &str)] = &[
        ("authorization", "Bearer beta-secret"),
        ("x-tenant", "alpha"),
    ];

    for md in [
        &[][..],
        &[("x-tenant", "alpha")][..],
        &[("authorization", "Bearer wrong")][..],
    ] {
        let e = list_err(&mut c, md).await;
        assert_eq!(e.code(), Code::Unauthenticated, "{md:?}");
        let e = enroll(
            &mut c,
            md,
            "x",
            "",
            false,
            photos(Pattern::Solid, RED, 1, 5),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    enroll(
        &mut c,
        alpha,
        "mug",
        "",
        false,
        photos(Pattern::Solid, RED, 3, 6),
    )
    .await
    .unwrap();
    enroll(
        &mut c,
        alpha,
        "plate",
        "",
        false,
        photos(Pattern::Solid, BLUE, 3, 7),
    )
    .await
    .unwrap();
    // beta sees nothing of alpha: no classes, and alpha's photos are new to beta.
    assert!(list(&mut c, beta).await.classes.is_empty());
    let e = classify(&mut c, beta, png(Pattern::Solid, RED, 8), "")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let r = enroll(
        &mut c,
        beta,
        "cup",
        "",
        false,
        photos(Pattern::Solid, RED, 3, 6),
    )
    .await
    .unwrap();
    assert_eq!(r.cached, 0, "another tenant's photos are not a cache hit");
    let e = remove(&mut c, beta, "mug", false).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let names: Vec<String> = list(&mut c, alpha)
        .await
        .classes
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, vec!["mug", "plate"]);
    let r = classify(&mut c, beta, png(Pattern::Solid, RED, 9), "")
        .await
        .unwrap();
    assert_eq!(r.label, "cup");
    ht.stop().await;
}

async fn list_err(c: &mut Client, md: &[(&'static str, &str)]) -> tonic::Status {
    c.list_classes(request(ListClassesRequest {}, md))
        .await
        .unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_codes_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ht = start_head_trainer(config(dir.path())).await;
    wait_serving(ht.addr, "taxon.v1.Classifier").await;
    let mut c = classifier(ht.addr);
    let md: &[(&'static str, &str)] = &[("x-tenant", "bad")];

    // A tenant with no classes yet.
    let e = classify(&mut c, md, png(Pattern::Solid, RED, 1), "")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = c
        .train(request(
            TrainRequest {
                head: "flat".into(),
                ..Default::default()
            },
            md,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    // Class names: empty, absurdly long, control characters.
    for name in [String::new(), "x".repeat(129), "a\nb".to_string()] {
        let e = enroll(
            &mut c,
            md,
            &name,
            "",
            false,
            photos(Pattern::Solid, RED, 1, 2),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name:?}");
    }
    let e = enroll(
        &mut c,
        md,
        "ok",
        &"p".repeat(200),
        false,
        photos(Pattern::Solid, RED, 1, 2),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Empty stream, start without photos, photo before start.
    let e = c
        .enroll(request(tokio_stream::iter(Vec::<EnrollRequest>::new()), md))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = enroll(&mut c, md, "ok", "", false, vec![])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut msgs = enroll_messages("ok", "", false, photos(Pattern::Solid, RED, 1, 3));
    msgs.swap(0, 1);
    let e = c
        .enroll(request(tokio_stream::iter(msgs), md))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Oversized and undecodable photos are rejected one by one; with nothing left, no class.
    let big = vec![0u8; 300 << 10];
    let e = enroll(
        &mut c,
        md,
        "big",
        "",
        false,
        vec![big.clone(), b"garbage".to_vec()],
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let r = enroll(
        &mut c,
        md,
        "mixed",
        "",
        false,
        vec![big, png(Pattern::Solid, RED, 4), b"garbage".to_vec()],
    )
    .await
    .unwrap();
    assert_eq!((r.accepted, r.examples), (1, 1));
    assert_eq!(r.rejected.len(), 2);
    assert!(
        r.rejected
            .iter()
            .all(|x| x.code == Code::InvalidArgument as i32),
        "{:?}",
        r.rejected
    );
    assert!(
        r.rejected
            .iter()
            .any(|x| x.id == "p0" && x.message.contains("limit"))
    );
    let names: Vec<String> = list(&mut c, md)
        .await
        .classes
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, vec!["mixed"], "failed enrolls created nothing");

    // Unknown classes, taken names, unknown head kinds, enrolling into a parent.
    let e = remove(&mut c, md, "nope", true).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = rename(&mut c, md, "nope", "x").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    enroll(
        &mut c,
        md,
        "child",
        "parent",
        false,
        photos(Pattern::Solid, BLUE, 1, 5),
    )
    .await
    .unwrap();
    let e = rename(&mut c, md, "mixed", "child").await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    let e = rename(&mut c, md, "mixed", "").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = enroll(
        &mut c,
        md,
        "parent",
        "",
        false,
        photos(Pattern::Solid, BLUE, 1, 6),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = classify(&mut c, md, png(Pattern::Solid, RED, 7), "fancy")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = classify(&mut c, md, vec![1u8; 300 << 10], "")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = classify(&mut c, md, b"garbage".to_vec(), "")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = list_err(&mut c, &[("x-tenant", "no spaces allowed")]).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    ht.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feature_server_down_fails_fast_and_writes_nothing() {
    let weights_dir = tempfile::tempdir().unwrap();
    let weights = formula_weights(
        feature_server::models::BackboneKind::MobileNetV2,
        weights_dir.path(),
    );
    let fs = start_feature_server(feature_server::models::BackboneKind::MobileNetV2, weights).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.features_urls = vec![fs.url()];
    let ht = start_head_trainer(cfg.clone()).await;
    wait_serving(ht.addr, "taxon.v1.Classifier").await;
    let mut c = classifier(ht.addr);
    let md: &[(&'static str, &str)] = &[("x-tenant", "down")];
    enroll(
        &mut c,
        md,
        "blue",
        "",
        false,
        photos(Pattern::Solid, BLUE, 2, 1),
    )
    .await
    .unwrap();
    fs.stop().await;

    let started = Instant::now();
    let e = enroll(
        &mut c,
        md,
        "red",
        "warm",
        false,
        photos(Pattern::Solid, RED, 3, 2),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let e2 = classify(&mut c, md, png(Pattern::Solid, RED, 3), "")
        .await
        .unwrap_err();
    assert_eq!(e2.code(), Code::Unavailable);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "failed fast: {:?}",
        started.elapsed()
    );
    // Photos already cached still classify without any feature-server.
    let r = classify(
        &mut c,
        md,
        photos(Pattern::Solid, BLUE, 2, 1)[0].clone(),
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.label, "blue");
    let names: Vec<String> = list(&mut c, md)
        .await
        .classes
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(
        names,
        vec!["blue"],
        "neither `red` nor its parent was created"
    );
    ht.stop().await;

    // A head-trainer that never reached a feature-server is not serving and fails fast on
    // what needs embeddings, while the taxonomy stays readable and editable from the store.
    let ht = start_head_trainer(cfg).await;
    let started = Instant::now();
    let mut c = classifier(ht.addr);
    let listed = list(&mut c, md).await;
    assert_eq!(listed.classes.len(), 1);
    assert_eq!(listed.classes[0].name, "blue");
    assert_eq!(listed.classes[0].examples, 2);
    assert_eq!(listed.model, "", "no identity is known yet");
    rename(&mut c, md, "blue", "navy").await.unwrap();
    let names: Vec<String> = list(&mut c, md)
        .await
        .classes
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, vec!["navy"]);
    let removed = remove(&mut c, md, "navy", false).await.unwrap();
    assert_eq!(removed.removed_examples, 2);
    assert!(list(&mut c, md).await.classes.is_empty());
    let e = enroll(
        &mut classifier(ht.addr),
        md,
        "red",
        "",
        false,
        photos(Pattern::Solid, RED, 1, 2),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(started.elapsed() < Duration::from_secs(5));
    // Not ready (no feature-server answers), but alive: an orchestrator must not restart it.
    assert_eq!(
        health(ht.addr, "taxon.v1.Classifier").await,
        tonic_health::pb::health_check_response::ServingStatus::NotServing
    );
    assert_eq!(
        health(ht.addr, "").await,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    ht.stop().await;
}

/// Child half of the crash test: when re-executed with `TAXON_CRASH_CHILD_DATA` set, runs a
/// head-trainer and prints its address, until killed. A no-op in a normal test run.
#[test]
fn crash_child() {
    let (Ok(data), Ok(features)) = (
        std::env::var("TAXON_CRASH_CHILD_DATA"),
        std::env::var("TAXON_CRASH_CHILD_FEATURES"),
    ) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("LISTENING {}", listener.local_addr().unwrap());
        let mut cfg = head_trainer::Config::new(vec![features], data);
        cfg.default_head = HeadKind::Lda;
        cfg.thresholds.unknown_similarity = 0.45;
        head_trainer::run(listener, cfg, std::future::pending())
            .await
            .unwrap();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_enroll_loses_nothing_acknowledged() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let features = shared_feature_server();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env("TAXON_CRASH_CHILD_DATA", dir.path())
        .env("TAXON_CRASH_CHILD_FEATURES", &features)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // libtest prints `test crash_child ... ` before the child's own line, hence split_once.
    // The reader keeps draining afterwards so the child never writes into a closed pipe.
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut addr_tx = Some(addr_tx);
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Some((_, a)) = line.split_once("LISTENING ")
                && let Some(tx) = addr_tx.take()
            {
                let _ = tx.send(a.trim().parse::<std::net::SocketAddr>().unwrap());
            }
        }
    });
    let addr = within("the child to listen", addr_rx).await.unwrap();
    wait_serving(addr, "taxon.v1.Classifier").await;
    let mut c = classifier(addr);
    let md: &[(&'static str, &str)] = &[("x-tenant", "crash")];
    enroll(
        &mut c,
        md,
        "blue",
        "cool",
        false,
        photos(Pattern::Solid, BLUE, 3, 1),
    )
    .await
    .unwrap();
    let acked = enroll(
        &mut c,
        md,
        "green",
        "cool",
        true,
        photos(Pattern::Stripes, GREEN, 3, 2),
    )
    .await
    .unwrap();
    assert_eq!(acked.head, "lda");

    // A third enroll is mid-stream (start and two photos sent, stream still open) when the
    // process is killed; then a fourth request never gets an answer.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    for m in enroll_messages("red", "warm", true, photos(Pattern::Solid, RED, 2, 3)) {
        tx.send(m).await.unwrap();
    }
    let mut c2 = c.clone();
    let pending = tokio::spawn(async move {
        c2.enroll(request(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            &[("x-tenant", "crash")],
        ))
        .await
    });
    tokio::task::yield_now().await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        within("the cut enroll to fail", pending)
            .await
            .unwrap()
            .is_err()
    );
    drop(tx);

    // Restart on the same data: the store opens cleanly, acknowledged state intact.
    let ht = start_head_trainer(config(dir.path())).await;
    wait_serving(ht.addr, "taxon.v1.Classifier").await;
    let mut c = classifier(ht.addr);
    let l = list(&mut c, md).await;
    let names: Vec<(String, u32)> = l
        .classes
        .iter()
        .map(|c| (c.name.clone(), c.examples))
        .collect();
    assert_eq!(
        names,
        vec![("cool".into(), 6), ("blue".into(), 3), ("green".into(), 3)]
    );
    assert_eq!(
        (l.head.as_str(), l.head_version),
        ("lda", acked.head_version)
    );
    let r = classify(&mut c, md, png(Pattern::Stripes, GREEN, 50), "")
        .await
        .unwrap();
    assert_eq!(
        (r.label.as_str(), r.head_version),
        ("green", acked.head_version)
    );
    ht.stop().await;
}
