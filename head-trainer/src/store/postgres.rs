//! The shared [`Store`]: tenants, classes, examples, embeddings and heads as rows in
//! PostgreSQL, for several head-trainers on one database.
//!
//! Why the synchronous `postgres` client (tokio-postgres underneath) with an r2d2 pool: the
//! [`Store`] trait is synchronous and called from the blocking pool, as redb's is, so each
//! method is one plain transaction on a pooled connection, and r2d2 re-checks connections so
//! that the pool heals by itself after the database restarts. Not sqlx: its compile-time
//! checked queries need a database (or committed query metadata) at build time, and it brings
//! a second async runtime layer we do not need.
//!
//! Every method is one transaction; every write first locks the tenant's row, so writes of
//! one tenant are serialised exactly as redb's single writer serialises them (and the
//! counters move the same way), while other tenants write in parallel. A lost connection is
//! `DatabaseUnavailable` (UNAVAILABLE): the caller retries, and nothing unacknowledged was
//! committed. A saved head is announced with `NOTIFY taxon_heads` in its own transaction, so
//! that a listener never hears of a head it cannot read yet.

mod classes;
mod listen;
mod migrations;
#[cfg(test)]
#[path = "../../tests/common/postgres.rs"]
pub(crate) mod testdb;
#[cfg(test)]
mod tests;
mod tls;

use std::path::PathBuf;
use std::time::Duration;

use postgres::{GenericClient, IsolationLevel};
use r2d2_postgres::PostgresConnectionManager;
use r2d2_postgres::r2d2::{Pool, PooledConnection};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{
    EnrollOutcome, EnrollWrite, Hash, HeadStamp, ImportOutcome, ImportWrite, RemoveOutcome,
    Snapshot, Store, StoreEvent, TrainingLock, Versions, decode_embedding,
};
use crate::taxonomy::{ClassEntry, Taxonomy};
use crate::{Error, Result};

/// The channel a saved head is announced on; the payload is `tenant kind version`.
pub const HEADS_CHANNEL: &str = "taxon_heads";

type Manager = PostgresConnectionManager<MakeRustlsConnect>;

/// First key of the per-tenant training locks (the second is a hash of the tenant), so that
/// they never collide with another application's advisory locks on the same database.
const TRAINING_LOCKS: i32 = 0x7461_786e;

/// How the store connects, beyond the URL.
#[derive(Clone, Debug)]
pub struct PoolOptions {
    /// Connections kept at most (each request holds one for one transaction; a training job
    /// holds one more for its lock while it trains).
    pub max_connections: u32,
    /// Longest wait for a connection (a new one, or a free one from the pool); beyond it the
    /// request fails with UNAVAILABLE rather than hang while the database is down.
    pub timeout: Duration,
    /// PEM file of the CA(s) that sign the database's certificate; the system's trust store
    /// when `None`.
    pub ca_file: Option<PathBuf>,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            timeout: Duration::from_secs(5),
            ca_file: None,
        }
    }
}

/// A pool of connections to one database.
pub struct PostgresStore {
    /// `None` only while dropping (see `Drop`).
    pool: Option<Pool<Manager>>,
    /// For the listener's own connection.
    config: postgres::Config,
    tls: MakeRustlsConnect,
}

impl PostgresStore {
    /// Connects (`postgres://user:password@host:port/db?sslmode=...` or `host=... user=...`),
    /// waiting at most `options.timeout` for a connection, and applies the migrations the
    /// database lacks.
    pub fn connect(url: &str, options: &PoolOptions) -> Result<Self> {
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e| Error::InvalidArgument(format!("database url: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.timeout);
        }
        config.application_name("taxon-head-trainer");
        let tls = tls::connector(options.ca_file.as_deref())?;
        // One connection by hand first: the pool keeps only the top line of a failure, and
        // "error performing TLS handshake" without its cause (an untrusted certificate, a
        // name mismatch) helps nobody.
        drop(config.connect(tls.clone()).map_err(|e| {
            Error::DatabaseUnavailable(format!("connecting to {}: {}", describe(url), chain(&e)))
        })?);
        let pool = Pool::builder()
            .max_size(options.max_connections.max(1))
            .min_idle(Some(1))
            .connection_timeout(options.timeout)
            .test_on_check_out(true)
            .build(PostgresConnectionManager::new(config.clone(), tls.clone()))?;
        migrations::apply(&mut *pool.get()?)?;
        Ok(Self {
            pool: Some(pool),
            config,
            tls,
        })
    }

    fn client(&self) -> Result<PooledConnection<Manager>> {
        let pool = self.pool.as_ref().ok_or(Error::ShuttingDown)?;
        Ok(pool.get()?)
    }
}

/// The synchronous client closes a connection by blocking on its own little runtime, which
/// panics on a tokio worker thread, and the last handle to the store is often dropped on one
/// (when the server's core goes). So the pool is closed on a thread of its own.
impl Drop for PostgresStore {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            let closing = std::thread::Builder::new()
                .name("taxon-pg-close".into())
                .spawn(move || drop(pool));
            if let Ok(closing) = closing {
                let _ = closing.join();
            }
        }
    }
}

/// An error with its causes, `a: b: c`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Where the store is, without the password: for logs.
pub fn describe(url: &str) -> String {
    match url.parse::<postgres::Config>() {
        Ok(c) => {
            let hosts: Vec<String> = c
                .get_hosts()
                .iter()
                .map(|h| match h {
                    postgres::config::Host::Tcp(name) => name.clone(),
                    postgres::config::Host::Unix(path) => path.display().to_string(),
                })
                .collect();
            let ports: Vec<String> = c.get_ports().iter().map(u16::to_string).collect();
            format!(
                "postgres://{}@{}:{}/{}",
                c.get_user().unwrap_or("?"),
                hosts.join(","),
                ports.join(","),
                c.get_dbname().unwrap_or("?")
            )
        }
        Err(_) => "postgres (unparsable url)".into(),
    }
}

/// A tenant's counters, read with its row locked for the rest of the transaction.
struct Counters {
    head_seq: i64,
}

/// Creates the tenant's row if needed and locks it until the transaction ends: the one lock
/// every write of the tenant takes first.
fn lock_tenant(tx: &mut impl GenericClient, tenant: &str) -> Result<Counters> {
    tx.execute(
        "INSERT INTO tenants (tenant) VALUES ($1) ON CONFLICT (tenant) DO NOTHING",
        &[&tenant],
    )?;
    let row = tx.query_one(
        "SELECT head_seq FROM tenants WHERE tenant = $1 FOR UPDATE",
        &[&tenant],
    )?;
    Ok(Counters {
        head_seq: row.get(0),
    })
}

fn id(v: i64) -> u64 {
    u64::try_from(v).unwrap_or_default()
}

/// The tenant's classes with their example counts, and its counters.
fn read_taxonomy(c: &mut impl GenericClient, tenant: &str) -> Result<Taxonomy> {
    let mut t = Taxonomy::default();
    if let Some(row) = c.query_opt(
        "SELECT seq, revision, prototype_version FROM tenants WHERE tenant = $1",
        &[&tenant],
    )? {
        t.seq = id(row.get(0));
        t.revision = id(row.get(1));
        t.prototype_version = id(row.get(2));
    }
    let rows = c.query(
        "SELECT c.id, c.name, c.parent,
                (SELECT count(*) FROM examples e WHERE e.tenant = c.tenant AND e.class_id = c.id)
         FROM classes c WHERE c.tenant = $1",
        &[&tenant],
    )?;
    for row in rows {
        let class = id(row.get(0));
        let examples: i64 = row.get(3);
        t.classes.insert(
            class,
            ClassEntry {
                id: class,
                name: row.get(1),
                parent: row.get::<_, Option<i64>>(2).map(id),
                examples: u32::try_from(examples).unwrap_or(u32::MAX),
            },
        );
    }
    Ok(t)
}

impl Store for PostgresStore {
    fn snapshot(&self, tenant: &str, model: Option<&str>) -> Result<Snapshot> {
        let mut client = self.client()?;
        // One snapshot of the database for the taxonomy and the examples.
        let mut tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()?;
        let taxonomy = read_taxonomy(&mut tx, tenant)?;
        let (mut examples, mut hashes) = (Vec::new(), Vec::new());
        if let Some(model) = model {
            let rows = tx.query(
                "SELECT e.class_id, m.vector, e.hash FROM examples e
                 JOIN embeddings m ON m.tenant = e.tenant AND m.hash = e.hash AND m.model = $2
                 WHERE e.tenant = $1 ORDER BY e.class_id, e.hash",
                &[&tenant, &model],
            )?;
            for row in rows {
                let v: &[u8] = row.get(1);
                examples.push((id(row.get(0)), decode_embedding(v)));
                hashes.push(super::hash_of(row.get(2))?);
            }
        }
        tx.commit()?;
        Ok(Snapshot {
            taxonomy,
            examples,
            hashes,
        })
    }

    fn embedding(&self, tenant: &str, hash: &Hash, model: &str) -> Result<Option<Vec<f32>>> {
        let row = self.client()?.query_opt(
            "SELECT vector FROM embeddings WHERE tenant = $1 AND hash = $2 AND model = $3",
            &[&tenant, &&hash[..], &model],
        )?;
        Ok(row.map(|r| decode_embedding(r.get::<_, &[u8]>(0))))
    }

    fn enroll(&self, tenant: &str, w: &EnrollWrite<'_>) -> Result<EnrollOutcome> {
        classes::enroll(&mut *self.client()?, tenant, w)
    }

    fn import(
        &self,
        tenant: &str,
        w: &ImportWrite<'_>,
        encode: &mut dyn FnMut(&str, &HeadStamp<'_>) -> Result<Vec<u8>>,
    ) -> Result<ImportOutcome> {
        classes::import(&mut *self.client()?, tenant, w, encode)
    }

    fn remove_class(&self, tenant: &str, name: &str, recursive: bool) -> Result<RemoveOutcome> {
        classes::remove_class(&mut *self.client()?, tenant, name, recursive)
    }

    fn rename_class(&self, tenant: &str, name: &str, new_name: &str) -> Result<()> {
        classes::rename_class(&mut *self.client()?, tenant, name, new_name)
    }

    fn save_head(
        &self,
        tenant: &str,
        kind: &str,
        encode: &mut dyn FnMut(u64) -> Result<Vec<u8>>,
    ) -> Result<u64> {
        let mut client = self.client()?;
        let mut tx = client.transaction()?;
        let counters = lock_tenant(&mut tx, tenant)?;
        let version = counters.head_seq + 1;
        tx.execute(
            "UPDATE tenants SET head_seq = $2, seq = seq + 1 WHERE tenant = $1",
            &[&tenant, &version],
        )?;
        let bytes = encode(id(version))?;
        tx.execute(
            "INSERT INTO heads (tenant, kind, version, bytes) VALUES ($1, $2, $3, $4)
             ON CONFLICT (tenant, kind) DO UPDATE SET version = $3, bytes = $4",
            &[&tenant, &kind, &version, &bytes],
        )?;
        let payload = format!("{tenant} {kind} {version}");
        tx.execute("SELECT pg_notify($1, $2)", &[&HEADS_CHANNEL, &payload])?;
        tx.commit()?;
        Ok(id(version))
    }

    /// A session advisory lock on a connection of its own: PostgreSQL releases it when the
    /// connection ends, so a head-trainer killed mid-training frees its tenants at once.
    /// Tried, not waited for, so that a replica waiting for another's job holds no connection.
    fn try_training_lock(&self, tenant: &str) -> Result<Option<TrainingLock>> {
        let mut client = self.client()?;
        let got: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock($1, hashtext($2))",
                &[&TRAINING_LOCKS, &tenant],
            )?
            .get(0);
        if !got {
            return Ok(None);
        }
        let tenant = tenant.to_string();
        Ok(Some(TrainingLock::releasing(move || {
            let unlocked = client.execute(
                "SELECT pg_advisory_unlock($1, hashtext($2))",
                &[&TRAINING_LOCKS, &tenant],
            );
            if let Err(e) = unlocked {
                // The connection is gone, and the lock with it.
                tracing::debug!(tenant, error = %e, "training lock released with its connection");
            }
        })))
    }

    fn shared(&self) -> bool {
        true
    }

    /// Our tables with their indexes and TOAST (embeddings and heads are stored out of line):
    /// what the database holds for Taxon, not the whole cluster's size.
    fn size_bytes(&self) -> Result<u64> {
        let row = self.client()?.query_one(
            "SELECT COALESCE(sum(pg_total_relation_size(t::regclass)), 0)::bigint
             FROM unnest(ARRAY['tenants', 'classes', 'examples', 'embeddings', 'heads']) AS t",
            &[],
        )?;
        Ok(id(row.get(0)))
    }

    fn versions(&self, tenant: &str) -> Result<Option<Versions>> {
        let row = self.client()?.query_opt(
            "SELECT seq, head_seq FROM tenants WHERE tenant = $1",
            &[&tenant],
        )?;
        Ok(Some(row.map_or_else(Versions::default, |r| Versions {
            seq: id(r.get(0)),
            head_seq: id(r.get(1)),
        })))
    }

    fn watch(&self, events: tokio::sync::mpsc::Sender<StoreEvent>) -> Result<()> {
        listen::spawn(self.config.clone(), self.tls.clone(), events)
    }

    fn heads(&self, tenant: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let rows = self.client()?.query(
            "SELECT kind, bytes FROM heads WHERE tenant = $1 ORDER BY kind",
            &[&tenant],
        )?;
        Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
    }
}
