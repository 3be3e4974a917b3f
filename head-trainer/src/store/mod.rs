//! The durable state: tenants, classes, examples, cached embeddings and trained heads.
//!
//! [`Store`] is what the rest of the head-trainer needs of a database, so that a second
//! implementation (PostgreSQL, for several head-trainers on one database) is one file beside
//! [`RedbStore`], the embedded default, and the same test suite (`tests.rs`) holds both to
//! the same contract:
//! - every method is one transaction, and callers reply to a client only after the method
//!   returned: an acknowledged write is durable (it survives `kill -9`);
//! - every row belongs to one tenant, and no method ever reads or changes another's;
//! - a failed write changes nothing.
//!
//! All methods block (they may fsync, or wait for the network); async callers run them on
//! the blocking pool.

mod postgres;
mod redb;
mod rules;

pub use self::postgres::{
    HEADS_CHANNEL, PoolOptions, PostgresStore, describe as describe_postgres,
};
pub use self::redb::RedbStore;
pub(crate) use self::rules::check_empty;

use crate::Result;
use crate::taxonomy::Taxonomy;

/// sha256 of a photo's bytes.
pub type Hash = [u8; 32];

/// The embedded store's page cache unless configured: enough for the hot pages of many
/// tenants, a small share of the 1 GB both services must stay under (redb's own default is
/// 1 GiB).
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// A consistent read of a tenant: taxonomy and every example's embedding under one model.
pub struct Snapshot {
    pub taxonomy: Taxonomy,
    /// (class id, embedding), ordered by class id then photo hash: deterministic.
    pub examples: Vec<(u64, Vec<f32>)>,
    /// The photo hash of each of `examples`, in the same order: what an export carries so
    /// that the importing tenant still recognises a photo it is sent again.
    pub hashes: Vec<Hash>,
}

/// What one Enroll writes: a class (created with its parent if new) and its examples.
pub struct EnrollWrite<'a> {
    pub class_name: &'a str,
    pub parent: Option<&'a str>,
    pub model: &'a str,
    /// Every accepted photo with its embedding (cached ones too, so the write never depends on
    /// a cache row that a concurrent remove might drop).
    pub examples: Vec<(Hash, Vec<f32>)>,
    /// What the tenant may hold once this is written (checked in the write's transaction).
    pub quotas: crate::quota::Quotas,
}

/// What an Enroll committed.
#[derive(Debug)]
pub struct EnrollOutcome {
    pub class_id: u64,
    pub parent: Option<String>,
    /// Examples of the class after the write.
    pub examples: u32,
    pub revision: u64,
}

/// What a RemoveClass committed.
#[derive(Debug)]
pub struct RemoveOutcome {
    pub removed_classes: Vec<String>,
    pub removed_examples: u32,
    pub revision: u64,
}

/// What one Import writes into an empty tenant: its classes, parents first, each with its
/// examples, and the kinds of the trained heads that come with them.
pub struct ImportWrite<'a> {
    pub model: &'a str,
    pub classes: Vec<ImportClass>,
    /// Trained head kinds, each written with the bytes `encode` gives for it.
    pub heads: Vec<String>,
    /// What the tenant may hold (checked in the write's transaction).
    pub quotas: crate::quota::Quotas,
}

/// One class of an [`ImportWrite`].
pub struct ImportClass {
    pub name: String,
    /// Index of the parent among the write's classes; always lower than the class's own.
    pub parent: Option<usize>,
    pub examples: Vec<(Hash, Vec<f32>)>,
}

/// What an imported head must record, known only inside the import's transaction: the new
/// id of each class of the write (in its order), the tenant's revision after the import (so
/// that the head counts as trained on it) and the head's own version.
pub struct HeadStamp<'a> {
    pub ids: &'a [u64],
    pub revision: u64,
    pub version: u64,
}

/// What an Import committed.
#[derive(Debug)]
pub struct ImportOutcome {
    /// The new id of each class of the write, in its order.
    pub ids: Vec<u64>,
    pub revision: u64,
    /// (kind, version) of each head written.
    pub heads: Vec<(String, u64)>,
}

/// A tenant's counters as the store has them now: what a replica compares with what it has
/// loaded to tell whether another replica changed the tenant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Versions {
    /// Moves with every write of the tenant (the taxonomy's `seq`).
    pub seq: u64,
    /// The newest head version handed out (trained kinds and the prototype).
    pub head_seq: u64,
}

/// What a shared store reports of changes other processes made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreEvent {
    /// The tenant changed (another replica saved a head): re-read it if it is loaded.
    Changed(String),
    /// Reports may have been missed (the first connection, or a reconnect after a lost one):
    /// re-read every loaded tenant.
    Resync,
}

/// A tenant's durable state, one transaction per method.
///
/// Counters (see the taxonomy's `seq`, `revision`, `prototype_version`): `revision` moves with
/// every change to the examples (enroll, remove), `seq` with every write at all (also rename
/// and a saved head), and head versions come from one sequence per tenant shared by every
/// kind and the prototype, so that a version names one head of the tenant.
pub trait Store: Send + Sync + 'static {
    /// The tenant's taxonomy and, when `model` is given, every example's embedding under it.
    /// Examples without an embedding under `model` (embedded by another backbone) are skipped.
    fn snapshot(&self, tenant: &str, model: Option<&str>) -> Result<Snapshot>;

    /// The cached embedding of a photo, if the tenant has sent it before.
    fn embedding(&self, tenant: &str, hash: &Hash, model: &str) -> Result<Option<Vec<f32>>>;

    /// Creates the class (and its parent) if needed and adds the examples. Refused whole
    /// (`Precondition`) when the parent has photos of its own, when the class is a parent, or
    /// when it already has another parent.
    fn enroll(&self, tenant: &str, w: &EnrollWrite<'_>) -> Result<EnrollOutcome>;

    /// Removes a class with its examples (and its children when `recursive`; a parent without
    /// it is `Precondition`). Embeddings no other example of the tenant uses are dropped too:
    /// removal really forgets the photos. Class ids are never reused.
    fn remove_class(&self, tenant: &str, name: &str, recursive: bool) -> Result<RemoveOutcome>;

    /// Renames a class (`UnknownClass`, `AlreadyExists`). Examples and heads refer to the id,
    /// so nothing else changes.
    fn rename_class(&self, tenant: &str, name: &str, new_name: &str) -> Result<()>;

    /// Writes a whole tenant (from an exported file) into one that has no class, in one
    /// transaction: its classes with fresh ids in the write's order (so that they sort as in
    /// the source), their examples and embeddings, and its trained heads, replacing any the
    /// tenant still held. `Precondition` when the tenant has classes; a quota exceeded
    /// refuses it whole. `encode` gives each head's bytes from its [`HeadStamp`].
    fn import(
        &self,
        tenant: &str,
        w: &ImportWrite<'_>,
        encode: &mut dyn FnMut(&str, &HeadStamp<'_>) -> Result<Vec<u8>>,
    ) -> Result<ImportOutcome>;

    /// Stores a trained head under a fresh version, replacing the tenant's previous head of
    /// that kind. `encode` receives the version, so the version inside the bytes and the one
    /// handed out are the same number.
    fn save_head(
        &self,
        tenant: &str,
        kind: &str,
        encode: &mut dyn FnMut(u64) -> Result<Vec<u8>>,
    ) -> Result<u64>;

    /// Every stored head of the tenant, as (kind, bytes).
    fn heads(&self, tenant: &str) -> Result<Vec<(String, Vec<u8>)>>;

    /// Bytes the store takes on disk (every tenant's): for the `store_bytes` gauge.
    fn size_bytes(&self) -> Result<u64>;

    /// The lock that makes a training job the only one of the tenant across every
    /// head-trainer on this store, held until dropped; `None` while another process holds it
    /// (the trainer waits and asks again). A store that only one process can open needs none
    /// (the trainer serialises jobs in-process).
    fn try_training_lock(&self, tenant: &str) -> Result<Option<TrainingLock>> {
        let _ = tenant;
        Ok(Some(TrainingLock::none()))
    }

    /// Whether other processes write this store too (then what is loaded may be stale, and
    /// [`Store::versions`] tells). False for a store only this process can open.
    fn shared(&self) -> bool {
        false
    }

    /// The tenant's counters, for a store that other processes write too; `None` for one that
    /// only this process can open, where what is loaded is always current.
    fn versions(&self, tenant: &str) -> Result<Option<Versions>> {
        let _ = tenant;
        Ok(None)
    }

    /// Starts reporting other processes' changes on `events`, until the receiver is dropped.
    /// A store only this process writes has nothing to report.
    fn watch(&self, events: tokio::sync::mpsc::Sender<StoreEvent>) -> Result<()> {
        drop(events);
        Ok(())
    }
}

/// A held [`Store::training_lock`], released on drop (or when its process dies).
pub struct TrainingLock(Option<Box<dyn FnOnce() + Send>>);

impl TrainingLock {
    /// Nothing to release.
    pub fn none() -> Self {
        Self(None)
    }

    /// Runs `release` when dropped.
    pub fn releasing(release: impl FnOnce() + Send + 'static) -> Self {
        Self(Some(Box::new(release)))
    }
}

impl Drop for TrainingLock {
    fn drop(&mut self) {
        if let Some(release) = self.0.take() {
            release();
        }
    }
}

/// Embeddings are stored as raw little-endian f32: compact, and decoding is a plain copy.
pub fn encode_embedding(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A stored photo hash as a [`Hash`]; any other length is a corrupt row.
fn hash_of(b: &[u8]) -> Result<Hash> {
    b.try_into()
        .map_err(|_| crate::Error::Corrupt(format!("photo hash of {} bytes", b.len())))
}

/// Inverse of [`encode_embedding`].
pub fn decode_embedding(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[cfg(test)]
mod tests;
