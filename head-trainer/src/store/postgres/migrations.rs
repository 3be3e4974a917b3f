//! The PostgreSQL schema as numbered migrations, applied in order at start.
//!
//! A migration is never edited once released: a change is a new entry at the end. Every
//! replica applies what is missing under one advisory lock, so replicas starting together
//! do not race, and a database newer than this build is refused rather than misread.
//!
//! The layout mirrors the redb tables: every key starts with the tenant, classes are
//! addressed by ids that are never reused (a stale head can never point at another class),
//! and the per-tenant counters live in the tenant's row, which every write locks first
//! (`SELECT ... FOR UPDATE`): one writer per tenant at a time, as in redb, while different
//! tenants write in parallel.

use postgres::GenericClient;

use crate::{Error, Result};

/// Key of the advisory lock held while migrating (an arbitrary constant: "taxon" in ASCII).
const MIGRATION_LOCK: i64 = 0x0074_6178_6f6e;

/// (version, SQL), in order.
const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    r#"
CREATE TABLE tenants (
    tenant            text   PRIMARY KEY,
    -- every write at all (also rename, a saved head): orders in-memory snapshots
    seq               bigint NOT NULL DEFAULT 0,
    -- every change to the examples (enroll, remove): what trained heads are built from
    revision          bigint NOT NULL DEFAULT 0,
    -- head versions, shared by every kind and the prototype
    head_seq          bigint NOT NULL DEFAULT 0,
    prototype_version bigint NOT NULL DEFAULT 0,
    next_class        bigint NOT NULL DEFAULT 0
);
CREATE TABLE classes (
    tenant text   NOT NULL REFERENCES tenants ON DELETE CASCADE,
    id     bigint NOT NULL,
    name   text   NOT NULL,
    parent bigint,
    PRIMARY KEY (tenant, id),
    UNIQUE (tenant, name)
);
-- a photo (sha256 of its bytes) may be an example of several classes
CREATE TABLE examples (
    tenant   text   NOT NULL,
    class_id bigint NOT NULL,
    hash     bytea  NOT NULL,
    PRIMARY KEY (tenant, class_id, hash),
    FOREIGN KEY (tenant, class_id) REFERENCES classes ON DELETE CASCADE
);
CREATE INDEX examples_by_hash ON examples (tenant, hash);
-- per tenant, so that `cached` never tells one tenant which photos another has sent;
-- shared by every replica, so a photo is embedded once whichever replica received it
CREATE TABLE embeddings (
    tenant text  NOT NULL REFERENCES tenants ON DELETE CASCADE,
    hash   bytea NOT NULL,
    model  text  NOT NULL,
    vector bytea NOT NULL,
    PRIMARY KEY (tenant, hash, model)
);
-- the latest head of each kind
CREATE TABLE heads (
    tenant  text   NOT NULL REFERENCES tenants ON DELETE CASCADE,
    kind    text   NOT NULL,
    version bigint NOT NULL,
    bytes   bytea  NOT NULL,
    PRIMARY KEY (tenant, kind)
);
"#,
)];

/// Applies the migrations this database lacks, in one transaction.
pub fn apply(client: &mut postgres::Client) -> Result<()> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS taxon_migrations (
             version    integer     PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )?;
    let current = current_version(&mut tx)?;
    let latest = MIGRATIONS.last().map_or(0, |m| m.0);
    if current > latest {
        return Err(Error::Store(format!(
            "database schema version {current}, this build knows up to {latest}"
        )));
    }
    for &(version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        tx.batch_execute(sql)?;
        tx.execute(
            "INSERT INTO taxon_migrations (version) VALUES ($1)",
            &[&version],
        )?;
        tracing::info!(version, "database migrated");
    }
    tx.commit()?;
    Ok(())
}

/// The newest migration applied (0 for none).
pub fn current_version(c: &mut impl GenericClient) -> Result<i32> {
    let v: Option<i32> = c
        .query_one("SELECT max(version) FROM taxon_migrations", &[])?
        .get(0);
    Ok(v.unwrap_or(0))
}
