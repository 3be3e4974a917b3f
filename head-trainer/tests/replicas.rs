//! Several head-trainers on one PostgreSQL database, as a scaled deployment runs them: each
//! test starts its own server (`common::postgres`), two replicas (in-process, or the real
//! binary where one must be killed) and the stand-in feature-server.
//!
//! What must hold: a class enrolled through one replica answers at once through the other
//! and its trained head follows; a rename or remove through one is seen by the next request
//! through the other; tenants stay apart; a replica killed mid-training loses nothing and
//! another trains in its place; a database restart under load costs UNAVAILABLE answers
//! while it is down and nothing acknowledged.

mod common;

use std::collections::BTreeMap;
use std::process::Child;
use std::time::{Duration, Instant};

use common::postgres::TestPostgres;
use common::{FakeFeatures, Trainer, blobs, enroll_messages, wait_health};
use taxon_proto::v1::classifier_client::ClassifierClient;
use taxon_proto::v1::{
    ClassifyRequest, EnrollRequest, ListClassesRequest, ListClassesResponse, RemoveClassRequest,
    RenameClassRequest,
};
use tonic::transport::Channel;

const READY: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;

/// A request as `tenant`.
fn as_tenant<T>(tenant: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert(taxon_proto::TENANT_HEADER, tenant.parse().unwrap());
    r
}

fn replica_config(
    features: &str,
    pg: &TestPostgres,
    dir: &std::path::Path,
) -> head_trainer::Config {
    let mut c = common::config(features, dir);
    c.database_url = Some(pg.url());
    c.database.timeout = Duration::from_secs(1);
    c.database.max_connections = 8;
    c
}

/// Two replicas on one database, ready.
async fn two_replicas(
    pg: &TestPostgres,
    features: &FakeFeatures,
    dir: &std::path::Path,
) -> (Trainer, Trainer) {
    let a = Trainer::start(replica_config(&features.url(), pg, &dir.join("a"))).await;
    let b = Trainer::start(replica_config(&features.url(), pg, &dir.join("b"))).await;
    wait_health(a.addr, "taxon.v1.Classifier", READY).await;
    wait_health(b.addr, "taxon.v1.Classifier", READY).await;
    (a, b)
}

async fn enroll(
    client: &mut ClassifierClient<Channel>,
    tenant: &str,
    msgs: Vec<EnrollRequest>,
) -> Result<taxon_proto::v1::EnrollResponse, tonic::Status> {
    let stream = tokio_stream::iter(msgs);
    client
        .enroll(as_tenant(tenant, stream))
        .await
        .map(tonic::Response::into_inner)
}

fn waiting_for_head(mut msgs: Vec<EnrollRequest>) -> Vec<EnrollRequest> {
    if let Some(taxon_proto::v1::enroll_request::Item::Start(s)) = &mut msgs[0].item {
        s.wait_for_head = true;
    }
    msgs
}

async fn classify(
    client: &mut ClassifierClient<Channel>,
    tenant: &str,
    image: &[u8],
) -> Result<taxon_proto::v1::ClassifyResponse, tonic::Status> {
    let req = ClassifyRequest {
        image: image.to_vec().into(),
        top_k: 3,
        head: String::new(),
    };
    client
        .classify(as_tenant(tenant, req))
        .await
        .map(tonic::Response::into_inner)
}

async fn list(client: &mut ClassifierClient<Channel>, tenant: &str) -> ListClassesResponse {
    client
        .list_classes(as_tenant(tenant, ListClassesRequest {}))
        .await
        .expect("ListClasses")
        .into_inner()
}

/// class -> examples, as a replica lists them.
async fn classes(client: &mut ClassifierClient<Channel>, tenant: &str) -> BTreeMap<String, u32> {
    list(client, tenant)
        .await
        .classes
        .into_iter()
        .map(|c| (c.name, c.examples))
        .collect()
}

/// Asks until `done` holds (each ask is a request, which is what the replicas promise to be
/// current on), failing after `limit`; returns how long it took.
async fn until<F, Fut>(limit: Duration, what: &str, mut done: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !done().await {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_through_one_replica_classified_through_the_other() {
    let Some(pg) = TestPostgres::start() else {
        return;
    };
    let features = FakeFeatures::start(64, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_replicas(&pg, &features, dir.path()).await;
    let (mut ca, mut cb) = (a.client(), b.client());
    let mug = blobs("mug", 3, 2000);
    let cup = blobs("cup", 3, 2000);

    // B has the tenant loaded (and empty) before A writes: it must not serve that copy.
    let none = classify(&mut cb, "acme", b"not a class").await.unwrap_err();
    assert_eq!(none.code(), tonic::Code::FailedPrecondition, "{none:?}");

    enroll(&mut ca, "acme", enroll_messages("mug", mug.clone()))
        .await
        .unwrap();
    let trained = enroll(
        &mut ca,
        "acme",
        waiting_for_head(enroll_messages("cup", cup.clone())),
    )
    .await
    .unwrap();
    assert_eq!(trained.head, "lda", "A waited for its trained head");
    let embedded = || {
        features
            .counters
            .embedded
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let embedded_by_a = embedded();

    // The next request through B sees both classes, whichever head answers.
    let answer = classify(&mut cb, "acme", &mug[1]).await.unwrap();
    assert_eq!(answer.label, "mug", "{answer:?}");
    let answer = classify(&mut cb, "acme", &cup[2]).await.unwrap();
    assert_eq!(answer.label, "cup", "{answer:?}");
    // And B serves the head A trained (announced with NOTIFY) within a second.
    let took = until(Duration::from_secs(1), "B serving A's head", || {
        let mut cb = cb.clone();
        let version = trained.head_version;
        let photo = cup[0].clone();
        async move {
            let r = classify(&mut cb, "acme", &photo).await.unwrap();
            r.head == "lda" && r.head_version >= version
        }
    })
    .await;
    println!("B served A's trained head {took:?} after A acknowledged it");

    // The photos B classified were embedded once: by A, when enrolled (the shared cache).
    assert_eq!(
        embedded(),
        embedded_by_a,
        "B embedded photos A had embedded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_and_remove_through_one_replica_are_seen_by_the_next_request_on_the_other() {
    let Some(pg) = TestPostgres::start() else {
        return;
    };
    let features = FakeFeatures::start(64, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_replicas(&pg, &features, dir.path()).await;
    let (mut ca, mut cb) = (a.client(), b.client());
    let (mug, cup, own) = (
        blobs("mug", 3, 1000),
        blobs("cup", 3, 1000),
        blobs("own", 2, 1000),
    );
    enroll(
        &mut ca,
        "acme",
        waiting_for_head(enroll_messages("mug", mug.clone())),
    )
    .await
    .unwrap();
    enroll(
        &mut ca,
        "acme",
        waiting_for_head(enroll_messages("cup", cup.clone())),
    )
    .await
    .unwrap();
    enroll(&mut ca, "beta", enroll_messages("mug", own.clone()))
        .await
        .unwrap();
    // A has both tenants loaded now, with trained heads.
    assert_eq!(
        classify(&mut ca, "acme", &mug[0]).await.unwrap().label,
        "mug"
    );
    assert_eq!(
        classify(&mut ca, "beta", &own[0]).await.unwrap().label,
        "mug"
    );

    cb.rename_class(as_tenant(
        "acme",
        RenameClassRequest {
            name: "mug".into(),
            new_name: "tumbler".into(),
        },
    ))
    .await
    .unwrap();
    let answer = classify(&mut ca, "acme", &mug[1]).await.unwrap();
    assert_eq!(
        answer.label, "tumbler",
        "A's next request after B's rename: {answer:?}"
    );

    let removed = cb
        .remove_class(as_tenant(
            "acme",
            RemoveClassRequest {
                name: "cup".into(),
                recursive: false,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.removed_classes, ["cup"]);
    let answer = classify(&mut ca, "acme", &cup[0]).await.unwrap();
    assert_ne!(
        answer.label, "cup",
        "A served a class B removed: {answer:?}"
    );
    assert!(
        answer.children.iter().all(|c| c.name != "cup"),
        "{answer:?}"
    );
    assert_eq!(
        classes(&mut ca, "acme").await,
        BTreeMap::from([("tumbler".to_string(), 3)])
    );

    // Tenants apart, across replicas: beta's `mug` is untouched, and neither sees the other.
    for client in [&mut ca, &mut cb] {
        assert_eq!(
            classes(client, "beta").await,
            BTreeMap::from([("mug".to_string(), 2)])
        );
        assert_eq!(
            classify(client, "beta", &own[1]).await.unwrap().label,
            "mug"
        );
    }
    let rename_other = cb
        .rename_class(as_tenant(
            "beta",
            RenameClassRequest {
                name: "tumbler".into(),
                new_name: "x".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        rename_other.code(),
        tonic::Code::NotFound,
        "acme's class seen from beta"
    );
}

/// The real binary on the database, for a test that must SIGKILL it.
fn spawn_replica(pg: &TestPostgres, features: &str) -> (Child, String) {
    let url = pg.url();
    let store = ["--database-url", &url, "--database-timeout-s", "1"].map(std::ffi::OsStr::new);
    common::spawn_head_trainer(features, &store)
}

/// Sessions of the database waiting for an advisory lock.
async fn waiting_on_advisory_locks(db: &tokio_postgres::Client) -> i64 {
    db.query_one(
        "SELECT count(*) FROM pg_stat_activity
         WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_training_loses_nothing_and_another_trains_in_its_place() {
    let Some(pg) = TestPostgres::start() else {
        return;
    };
    let features = FakeFeatures::start(64, Duration::ZERO).await;
    let (mut a, a_addr) = spawn_replica(&pg, &features.url());
    let a_addr = a_addr.parse().unwrap();
    wait_health(a_addr, "taxon.v1.Classifier", READY).await;
    let mut ca = ClassifierClient::new(common::channel(a_addr));

    // A gate on saving a head of three classes, held by the test: A's job on all three
    // trains, then blocks inside its save transaction, holding the tenant's training lock:
    // A is caught mid-training, after every enroll was acknowledged.
    let (db, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    db.batch_execute(
        "CREATE FUNCTION test_gate() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
             IF (SELECT count(*) FROM classes WHERE tenant = NEW.tenant) >= 3 THEN
               PERFORM pg_advisory_xact_lock(4242);
             END IF;
             RETURN NEW;
           END $$;
         CREATE TRIGGER test_gate BEFORE INSERT OR UPDATE ON heads
           FOR EACH ROW EXECUTE FUNCTION test_gate();
         SELECT pg_advisory_lock(4242);",
    )
    .await
    .unwrap();
    let mut acknowledged = BTreeMap::new();
    for class in ["mug", "cup", "bowl"] {
        let r = enroll(
            &mut ca,
            "acme",
            enroll_messages(class, blobs(class, 3, 1000)),
        )
        .await
        .unwrap();
        acknowledged.insert(class.to_string(), r.examples);
    }
    until(Duration::from_secs(30), "A blocked in its save", || async {
        waiting_on_advisory_locks(&db).await == 1
    })
    .await;
    a.kill().unwrap(); // SIGKILL
    a.wait().unwrap();
    db.execute("SELECT pg_advisory_unlock(4242)", &[])
        .await
        .unwrap();

    // B starts after the kill and serves the tenant at once (prototype), then trains it:
    // A's training lock died with A's connections.
    let dir = tempfile::tempdir().unwrap();
    let b = Trainer::start(replica_config(&features.url(), &pg, dir.path())).await;
    wait_health(b.addr, "taxon.v1.Classifier", READY).await;
    let mut cb = b.client();
    let mug = blobs("mug", 3, 1000);
    assert_eq!(
        classify(&mut cb, "acme", &mug[0]).await.unwrap().label,
        "mug"
    );
    until(Duration::from_secs(30), "B training the tenant", || {
        let mut cb = cb.clone();
        async move { list(&mut cb, "acme").await.head == "lda" }
    })
    .await;
    assert_eq!(
        classes(&mut cb, "acme").await,
        acknowledged,
        "acknowledged enrolls"
    );
    // B's head (it covers all three classes, or B would not serve it) is the stored one:
    // A's, never committed, is not there.
    let b_head = list(&mut cb, "acme").await.head_version;
    let stored: i64 = db
        .query_one(
            "SELECT version FROM heads WHERE tenant = 'acme' AND kind = 'lda'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored as u64, b_head);

    // A comes back and catches up: B's head, B's view of the classes.
    let (mut a, a_addr) = spawn_replica(&pg, &features.url());
    let a_addr = a_addr.parse().unwrap();
    wait_health(a_addr, "taxon.v1.Classifier", READY).await;
    let mut ca = ClassifierClient::new(common::channel(a_addr));
    let listed = list(&mut ca, "acme").await;
    assert_eq!((listed.head.as_str(), listed.head_version), ("lda", b_head));
    assert_eq!(classes(&mut ca, "acme").await, acknowledged);
    a.kill().unwrap();
    a.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_under_load_is_unavailable_then_heals_losing_nothing() {
    let Some(pg) = TestPostgres::start() else {
        return;
    };
    let features = FakeFeatures::start(64, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_replicas(&pg, &features, dir.path()).await;
    let (mut ca, mut cb) = (a.client(), b.client());
    let seed = blobs("seed", 2, 500);
    enroll(&mut ca, "acme", enroll_messages("seed", seed.clone()))
        .await
        .unwrap();

    // The load: enrolls of a new class each through A, classifies through B, one after the
    // other, reporting each outcome.
    let (tx, mut outcomes) = tokio::sync::mpsc::unbounded_channel();
    let stop = tokio_util::sync::CancellationToken::new();
    let load = tokio::spawn({
        let stop = stop.clone();
        let (mut ca, mut cb, seed) = (ca.clone(), cb.clone(), seed.clone());
        async move {
            let mut acknowledged = Vec::new();
            for i in 0.. {
                if stop.is_cancelled() {
                    break;
                }
                let class = format!("c{i}");
                let enrolled = enroll(
                    &mut ca,
                    "acme",
                    enroll_messages(&class, blobs(&class, 2, 500)),
                )
                .await;
                if enrolled.is_ok() {
                    acknowledged.push(class);
                }
                let classified = classify(&mut cb, "acme", &seed[0]).await;
                let codes = [
                    enrolled.err().map(|e| e.code()),
                    classified.err().map(|e| e.code()),
                ];
                if tx.send(codes).is_err() {
                    break;
                }
            }
            acknowledged
        }
    });
    // Both replicas answer under load, then the database goes down (as in a crash).
    let mut up = 0;
    while up < 5 {
        if let Some(o) = tokio::time::timeout(Duration::from_secs(30), outcomes.recv())
            .await
            .expect("load stalled")
        {
            assert_eq!(o, [None, None], "before the restart");
            up += 1;
        }
    }
    assert!(pg.pg_ctl("stop"));
    let down_at = Instant::now();
    let mut down_errors = 0;
    loop {
        let o = tokio::time::timeout(Duration::from_secs(30), outcomes.recv())
            .await
            .expect("a request hung while the database was down")
            .unwrap();
        for code in o.into_iter().flatten() {
            assert_eq!(code, tonic::Code::Unavailable, "while the database is down");
            down_errors += 1;
        }
        if o == [Some(tonic::Code::Unavailable); 2] {
            break; // both replicas report the outage
        }
    }
    println!(
        "both replicas UNAVAILABLE {:?} after the stop ({down_errors} errors)",
        down_at.elapsed()
    );
    assert!(pg.pg_ctl("start"));
    let started = Instant::now();
    loop {
        let o = tokio::time::timeout(Duration::from_secs(30), outcomes.recv())
            .await
            .expect("a request hung while the database restarted")
            .unwrap();
        if o == [None, None] {
            break;
        }
        for code in o.into_iter().flatten() {
            assert_eq!(
                code,
                tonic::Code::Unavailable,
                "while the database restarts"
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not healed in 30 s"
        );
    }
    println!(
        "both replicas answering {:?} after the restart",
        started.elapsed()
    );
    stop.cancel();
    drop(outcomes);
    let acknowledged = load.await.unwrap();
    assert!(acknowledged.len() >= 5);
    for client in [&mut ca, &mut cb] {
        let listed = classes(client, "acme").await;
        for class in &acknowledged {
            assert_eq!(
                listed.get(class),
                Some(&2),
                "acknowledged enroll of {class} lost"
            );
        }
    }
}
