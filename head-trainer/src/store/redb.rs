//! The embedded [`Store`]: every tenant in one redb file, nothing to install.
//!
//! Why redb: pure Rust (nothing to install, builds everywhere cargo does), ACID transactions
//! over copy-on-write B-trees with an fsync on commit, so a `kill -9` at any instant leaves the
//! last committed state and nothing half-written. Every method here is one transaction that
//! is on disk when it returns.

mod classes;
mod schema;

use std::path::Path;

use ::redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, WriteTransaction};

use super::{
    EnrollOutcome, EnrollWrite, Hash, HeadStamp, ImportOutcome, ImportWrite, RemoveOutcome,
    Snapshot, Store, decode_embedding,
};
use crate::taxonomy::{ClassEntry, Taxonomy};
use crate::{Error, Result};
use schema::*;

/// The embedded database.
pub struct RedbStore {
    db: Database,
    /// The database file, for its size.
    path: std::path::PathBuf,
}

impl RedbStore {
    /// Opens (or creates) `dir/taxon.redb`. redb replays nothing: after a crash the file simply
    /// holds the last committed transaction.
    ///
    /// The folder is made 0700 and the file 0600: it holds every tenant's embeddings, from
    /// which a photo's content can partly be recovered.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with_cache(dir, super::DEFAULT_CACHE_BYTES)
    }

    /// [`RedbStore::open`] with a page cache of `cache_bytes` (redb's own default, 1 GiB,
    /// would hold that much of a large file in memory).
    pub fn open_with_cache(dir: &Path, cache_bytes: usize) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Store(format!("{}: {e}", dir.display())))?;
        let path = dir.join("taxon.redb");
        owner_only(dir, 0o700)?;
        if !path.exists() {
            // Created empty with the right mode first, so the file is never world-readable.
            create_private(&path)?;
        }
        owner_only(&path, 0o600)?;
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(&path)?;
        let txn = begin_write(&db)?;
        {
            let mut settings = txn.open_table(SETTINGS)?;
            let found = settings.get("schema_version")?.map(|v| v.value());
            match found {
                None => {
                    settings.insert("schema_version", SCHEMA_VERSION)?;
                }
                Some(v) if v == SCHEMA_VERSION => {}
                Some(v) => {
                    return Err(Error::Store(format!(
                        "store schema {v}, this build reads {SCHEMA_VERSION}"
                    )));
                }
            }
            // Create every table so that read transactions never meet a missing one.
            txn.open_table(CLASSES)?;
            txn.open_table(CLASS_NAMES)?;
            txn.open_table(EXAMPLES)?;
            txn.open_table(EMBEDDINGS)?;
            txn.open_table(COUNTERS)?;
            txn.open_table(HEADS)?;
        }
        txn.commit()?;
        Ok(Self { db, path })
    }

    /// A write transaction that is on disk when `commit` returns (see [`begin_write`]).
    fn write(&self) -> Result<WriteTransaction> {
        begin_write(&self.db)
    }
}

impl Store for RedbStore {
    fn snapshot(&self, tenant: &str, model: Option<&str>) -> Result<Snapshot> {
        let txn = self.db.begin_read()?;
        let taxonomy = read_taxonomy(&txn, tenant)?;
        let (mut examples, mut hashes) = (Vec::new(), Vec::new());
        if let Some(model) = model {
            let ex = txn.open_table(EXAMPLES)?;
            let emb = txn.open_table(EMBEDDINGS)?;
            for row in ex.range((tenant, 0u64, &[][..])..)? {
                let (k, _) = row?;
                let (t, class, hash) = k.value();
                if t != tenant {
                    break;
                }
                if let Some(v) = emb.get((tenant, hash, model))? {
                    examples.push((class, decode_embedding(v.value())));
                    hashes.push(super::hash_of(hash)?);
                }
            }
        }
        Ok(Snapshot {
            taxonomy,
            examples,
            hashes,
        })
    }

    fn embedding(&self, tenant: &str, hash: &Hash, model: &str) -> Result<Option<Vec<f32>>> {
        let txn = self.db.begin_read()?;
        let emb = txn.open_table(EMBEDDINGS)?;
        Ok(emb
            .get((tenant, &hash[..], model))?
            .map(|v| decode_embedding(v.value())))
    }

    fn save_head(
        &self,
        tenant: &str,
        kind: &str,
        encode: &mut dyn FnMut(u64) -> Result<Vec<u8>>,
    ) -> Result<u64> {
        let txn = self.write()?;
        let version = bump(&txn, tenant, COUNTER_HEAD_SEQ)?;
        let bytes = encode(version)?;
        txn.open_table(HEADS)?
            .insert((tenant, kind), bytes.as_slice())?;
        bump(&txn, tenant, COUNTER_SEQ)?;
        txn.commit()?;
        Ok(version)
    }

    fn enroll(&self, tenant: &str, w: &EnrollWrite<'_>) -> Result<EnrollOutcome> {
        classes::enroll(self, tenant, w)
    }

    fn import(
        &self,
        tenant: &str,
        w: &ImportWrite<'_>,
        encode: &mut dyn FnMut(&str, &HeadStamp<'_>) -> Result<Vec<u8>>,
    ) -> Result<ImportOutcome> {
        classes::import(self, tenant, w, encode)
    }

    fn remove_class(&self, tenant: &str, name: &str, recursive: bool) -> Result<RemoveOutcome> {
        classes::remove_class(self, tenant, name, recursive)
    }

    fn rename_class(&self, tenant: &str, name: &str, new_name: &str) -> Result<()> {
        classes::rename_class(self, tenant, name, new_name)
    }

    /// The file's length: redb grows it in steps and reuses freed pages, so it is what the
    /// store costs the disk, not the sum of its rows.
    fn size_bytes(&self) -> Result<u64> {
        std::fs::metadata(&self.path)
            .map(|m| m.len())
            .map_err(|e| Error::Store(format!("{}: {e}", self.path.display())))
    }

    fn heads(&self, tenant: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let txn = self.db.begin_read()?;
        let heads = txn.open_table(HEADS)?;
        let mut out = Vec::new();
        for row in heads.range((tenant, "")..)? {
            let (k, v) = row?;
            let (t, kind) = k.value();
            if t != tenant {
                break;
            }
            out.push((kind.to_string(), v.value().to_vec()));
        }
        Ok(out)
    }
}

fn read_taxonomy(txn: &ReadTransaction, tenant: &str) -> Result<Taxonomy> {
    let classes = txn.open_table(CLASSES)?;
    let examples = txn.open_table(EXAMPLES)?;
    let counters = txn.open_table(COUNTERS)?;
    let get =
        |k: &str| -> Result<u64> { Ok(counters.get((tenant, k))?.map(|v| v.value()).unwrap_or(0)) };
    let mut t = Taxonomy {
        seq: get(COUNTER_SEQ)?,
        revision: get(COUNTER_REVISION)?,
        prototype_version: get(COUNTER_PROTOTYPE_VERSION)?,
        ..Taxonomy::default()
    };
    collect_classes(&mut t, &classes, &examples, tenant)?;
    Ok(t)
}

fn read_taxonomy_w(txn: &WriteTransaction, tenant: &str) -> Result<Taxonomy> {
    let classes = txn.open_table(CLASSES)?;
    let examples = txn.open_table(EXAMPLES)?;
    let mut t = Taxonomy::default();
    collect_classes(&mut t, &classes, &examples, tenant)?;
    Ok(t)
}

fn collect_classes(
    t: &mut Taxonomy,
    classes: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
    examples: &impl ReadableTable<(&'static str, u64, &'static [u8]), ()>,
    tenant: &str,
) -> Result<()> {
    for row in classes.range((tenant, 0u64)..)? {
        let (k, v) = row?;
        let (tn, id) = k.value();
        if tn != tenant {
            break;
        }
        let r: ClassRecord = serde_json::from_slice(v.value())?;
        t.classes.insert(
            id,
            ClassEntry {
                id,
                name: r.name,
                parent: r.parent,
                examples: 0,
            },
        );
    }
    for row in examples.range((tenant, 0u64, &[][..])..)? {
        let (k, _) = row?;
        let (tn, id, _) = k.value();
        if tn != tenant {
            break;
        }
        if let Some(c) = t.classes.get_mut(&id) {
            c.examples += 1;
        }
    }
    Ok(())
}

/// Increments a counter and returns the new value (the first value handed out is 1).
fn bump(txn: &WriteTransaction, tenant: &str, name: &str) -> Result<u64> {
    let mut counters = txn.open_table(COUNTERS)?;
    let next = counters
        .get((tenant, name))?
        .map(|v| v.value())
        .unwrap_or(0)
        + 1;
    counters.insert((tenant, name), next)?;
    Ok(next)
}

fn set_counter(txn: &WriteTransaction, tenant: &str, name: &str, value: u64) -> Result<()> {
    txn.open_table(COUNTERS)?.insert((tenant, name), value)?;
    Ok(())
}

/// Every write is `Durability::Immediate`, stated rather than left to redb's default: an
/// acknowledged write must survive `kill -9` and a power cut, so commit returns only after
/// the data and the new root are fsynced.
fn begin_write(db: &Database) -> Result<WriteTransaction> {
    let mut txn = db.begin_write()?;
    txn.set_durability(::redb::Durability::Immediate)
        .map_err(|e| Error::Store(format!("durability: {e}")))?;
    Ok(txn)
}

#[cfg(unix)]
fn owner_only(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::Store(format!("{}: {e}", path.display())))
}

#[cfg(not(unix))]
fn owner_only(_path: &Path, _mode: u32) -> Result<()> {
    Ok(())
}

#[cfg(unix)]
fn create_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(|e| Error::Store(format!("{}: {e}", path.display())))
}

#[cfg(not(unix))]
fn create_private(_path: &Path) -> Result<()> {
    Ok(())
}
