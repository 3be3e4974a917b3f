//! What only the PostgreSQL store has to show (the shared contract is `store/tests.rs`):
//! versioned migrations, a head announced on commit, and a pool that heals after the
//! database restarts, with nothing acknowledged lost.

use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};

use super::testdb::TestPostgres;
use super::{HEADS_CHANNEL, PostgresStore};
use crate::Error;
use crate::store::{EnrollWrite, Store};

fn connect(pg: &TestPostgres, timeout: Duration) -> PostgresStore {
    PostgresStore::connect(&pg.url(), 2, timeout).unwrap()
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
    let Err(e) = PostgresStore::connect(&pg.url(), 2, Duration::from_secs(10)) else {
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
fn one_training_lock_per_tenant_across_stores() {
    let Some(pg) = TestPostgres::start() else {
        return;
    };
    let (a, b) = (
        connect(&pg, Duration::from_secs(10)),
        std::sync::Arc::new(connect(&pg, Duration::from_secs(10))),
    );
    let held = a.training_lock("acme").unwrap();
    drop(b.training_lock("other").unwrap()); // another tenant is not held up
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn({
        let b = std::sync::Arc::clone(&b);
        move || {
            let lock = b.training_lock("acme").unwrap();
            tx.send(()).unwrap();
            drop(lock);
        }
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "a second replica took the tenant's training lock while it was held"
    );
    drop(held);
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the lock was not handed over once released");
    waiter.join().unwrap();
}
