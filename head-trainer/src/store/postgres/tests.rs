//! What only the PostgreSQL store has to show (the shared contract is `store/tests.rs`):
//! versioned migrations, a head announced on commit, and a pool that heals after the
//! database restarts, with nothing acknowledged lost.

use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};

use super::testdb::TestPostgres;
use super::{HEADS_CHANNEL, PoolOptions, PostgresStore};
use crate::Error;
use crate::store::{EnrollWrite, Store, StoreEvent, Versions};

fn options(timeout: Duration) -> PoolOptions {
    PoolOptions {
        max_connections: 2,
        timeout,
        ca_file: None,
    }
}

fn connect(pg: &TestPostgres, timeout: Duration) -> PostgresStore {
    PostgresStore::connect(&pg.url(), &options(timeout)).unwrap()
}

#[test]
fn migrations_are_applied_once_and_a_newer_schema_is_refused() {
    let Some(pg) = TestPostgres::start() else {
        return;
    };
    drop(connect(&pg, Duration::from_secs(10)));
    drop(connect(&pg, Duration::from_secs(10))); // already there: nothing to do
    let mut c = Client::connect(&pg.url(), NoTls).unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM taxon_migrations", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    c.execute("INSERT INTO taxon_migrations (version) VALUES (99)", &[])
        .unwrap();
    let Err(e) = PostgresStore::connect(&pg.url(), &options(Duration::from_secs(10))) else {
        panic!("a schema newer than this build was accepted");
    };
    assert!(e.to_string().contains("99"), "{e}");
}

#[test]
fn a_saved_head_is_announced_when_it_commits() {
    let Some(pg) = TestPostgres::start() else {
        return;
    };
    let store = connect(&pg, Duration::from_secs(10));
    let mut listener = Client::connect(&pg.url(), NoTls).unwrap();
    listener
        .batch_execute(&format!("LISTEN {HEADS_CHANNEL}"))
        .unwrap();
    let version = store
        .save_head("acme", "flat", &mut |v| Ok(v.to_le_bytes().to_vec()))
        .unwrap();
    let mut notifications = listener.notifications();
    let n = notifications
        .timeout_iter(Duration::from_secs(10))
        .next()
        .unwrap()
        .expect("no notification within 10 s");
    assert_eq!(n.channel(), HEADS_CHANNEL);
    assert_eq!(n.payload(), format!("acme flat {version}"));
}

#[test]
fn the_store_recovers_by_itself_after_the_database_restarts() {
    let Some(pg) = TestPostgres::start() else {
        return;
    };
    let store = connect(&pg, Duration::from_secs(1));
    let write = EnrollWrite {
        class_name: "mug",
        parent: None,
        model: "m",
        examples: vec![([7; 32], vec![1.0; 4])],
        quotas: crate::quota::Quotas::unlimited(),
    };
    let acknowledged = store.enroll("acme", &write).unwrap();
    assert!(pg.pg_ctl("stop"), "immediate stop (as a crash)");
    match store.snapshot("acme", Some("m")) {
        Err(e @ Error::DatabaseUnavailable(_)) => {
            assert_eq!(e.code(), tonic::Code::Unavailable);
        }
        Err(e) => panic!("expected DatabaseUnavailable, got {e:?}"),
        Ok(_) => panic!("read a database that is down"),
    }
    assert!(pg.pg_ctl("start"));
    let snap = store.snapshot("acme", Some("m")).unwrap();
    assert_eq!(snap.taxonomy.revision, acknowledged.revision);
    assert_eq!(snap.examples, vec![(acknowledged.class_id, vec![1.0; 4])]);
    store.enroll("acme", &write).unwrap();
}

#[test]
fn one_training_lock_per_tenant_across_stores_released_with_its_connection() {
    let Some(pg) = TestPostgres::start() else {
        return;
    };
    let (a, b) = (
        connect(&pg, Duration::from_secs(10)),
        connect(&pg, Duration::from_secs(10)),
    );
    let held = a.try_training_lock("acme").unwrap().expect("free at first");
    assert!(
        b.try_training_lock("acme").unwrap().is_none(),
        "a second replica took the tenant's training lock while it was held"
    );
    drop(
        b.try_training_lock("other")
            .unwrap()
            .expect("another tenant is not held up"),
    );
    drop(held);
    let again = b
        .try_training_lock("acme")
        .unwrap()
        .expect("released on drop");
    // A replica that dies mid-training: its connection ends, and the lock with it. The
    // timeout makes pg_terminate_backend wait until the backend has exited.
    let mut killer = Client::connect(&pg.url(), NoTls).unwrap();
    let killed: bool = killer
        .query_one(
            "SELECT bool_and(pg_terminate_backend(pid, 10000)) FROM pg_locks
             WHERE locktype = 'advisory' AND granted",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(killed);
    drop(again); // its connection is dead: releasing fails quietly
    assert!(
        a.try_training_lock("acme").unwrap().is_some(),
        "the lock outlived its connection"
    );
}

#[test]
fn versions_move_with_every_write_of_the_tenant_only() {
    let Some(pg) = TestPostgres::start() else {
        return;
    };
    let store = connect(&pg, Duration::from_secs(10));
    assert_eq!(store.versions("acme").unwrap(), Some(Versions::default()));
    let write = EnrollWrite {
        class_name: "mug",
        parent: None,
        model: "m",
        examples: vec![([7; 32], vec![1.0; 4])],
        quotas: crate::quota::Quotas::unlimited(),
    };
    store.enroll("acme", &write).unwrap();
    let v1 = store.versions("acme").unwrap().unwrap();
    store.rename_class("acme", "mug", "cup").unwrap();
    let v2 = store.versions("acme").unwrap().unwrap();
    assert!(
        v2.seq > v1.seq && v2.head_seq == v1.head_seq,
        "{v1:?} -> {v2:?}"
    );
    let version = store
        .save_head("acme", "flat", &mut |v| Ok(v.to_le_bytes().to_vec()))
        .unwrap();
    let v3 = store.versions("acme").unwrap().unwrap();
    assert!(
        v3.seq > v2.seq && v3.head_seq == version,
        "{v2:?} -> {v3:?}"
    );
    store.enroll("other", &write).unwrap();
    assert_eq!(
        store.versions("acme").unwrap(),
        Some(v3),
        "another tenant's write"
    );
}

/// The next event within 30 s (the listener is a thread of its own; only the receiving end
/// is async).
fn next_event(rx: &mut tokio::sync::mpsc::Receiver<StoreEvent>) -> Option<StoreEvent> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(30), rx.recv()).await })
        .expect("no event within 30 s")
}

#[test]
fn the_listener_reports_saved_heads_and_resyncs_after_a_reconnect() {
    let Some(pg) = TestPostgres::start() else {
        return;
    };
    let store = connect(&pg, Duration::from_secs(2));
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    store.watch(tx).unwrap();
    assert_eq!(
        next_event(&mut rx),
        Some(StoreEvent::Resync),
        "first connection"
    );
    store
        .save_head("a tenant", "flat", &mut |v| Ok(v.to_le_bytes().to_vec()))
        .unwrap();
    assert_eq!(
        next_event(&mut rx),
        Some(StoreEvent::Changed("a tenant".into()))
    );
    assert!(pg.pg_ctl("stop"));
    assert!(pg.pg_ctl("start"));
    assert_eq!(
        next_event(&mut rx),
        Some(StoreEvent::Resync),
        "after the reconnect"
    );
}

/// A CA, and a certificate it signed for 127.0.0.1, made with the openssl tool.
fn certificates(dir: &std::path::Path) {
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the openssl tool (Debian's openssl, a dependency of postgresql)");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca = [
        "-subj",
        "/CN=taxon-test-ca",
        "-days",
        "2",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ];
    openssl(&[&["req", "-x509"][..], &ec, &ca].concat());
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
            ],
        ]
        .concat(),
    );
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    ]);
    std::fs::set_permissions(
        dir.join("server.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
}

#[test]
fn tls_to_the_database_is_verified_against_the_ca_given() {
    let Some(pg) = TestPostgres::start_with(|dir| {
        certificates(dir);
        // TLS connections only: a plain one is refused by the server itself.
        std::fs::write(dir.join("hba.conf"), "hostssl all all 127.0.0.1/32 trust\n").unwrap();
        let at = |f: &str| dir.join(f).display().to_string();
        vec![
            "ssl=on".into(),
            format!("ssl_cert_file={}", at("server.crt")),
            format!("ssl_key_file={}", at("server.key")),
            format!("hba_file={}", at("hba.conf")),
        ]
    }) else {
        return;
    };
    let with_ca = PoolOptions {
        ca_file: Some(pg.dir().join("ca.crt")),
        ..options(Duration::from_secs(5))
    };
    let url = |mode: &str| format!("{}?sslmode={mode}", pg.url());
    let store = PostgresStore::connect(&url("require"), &with_ca).unwrap();
    assert_eq!(store.versions("acme").unwrap(), Some(Versions::default()));
    // The listener's connection goes through the same TLS.
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    store.watch(tx).unwrap();
    assert_eq!(next_event(&mut rx), Some(StoreEvent::Resync));

    let Err(plain) = PostgresStore::connect(&url("disable"), &with_ca) else {
        panic!("a plain connection was accepted by a TLS-only server");
    };
    assert_eq!(plain.code(), tonic::Code::Unavailable, "{plain}");
    // Without the CA the certificate is not trusted: refused, not accepted unverified.
    let Err(untrusted) = PostgresStore::connect(&url("require"), &options(Duration::from_secs(5)))
    else {
        panic!("a certificate from an unknown CA was accepted");
    };
    assert!(
        untrusted.to_string().contains("UnknownIssuer"),
        "{untrusted}"
    );
    let Err(missing) = PostgresStore::connect(
        &url("require"),
        &PoolOptions {
            ca_file: Some(pg.dir().join("none.crt")),
            ..options(Duration::from_secs(5))
        },
    ) else {
        panic!("a missing CA file was accepted");
    };
    assert!(
        missing.to_string().contains("--database-ca-file"),
        "{missing}"
    );
}
