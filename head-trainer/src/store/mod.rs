//! The durable state: tenants, classes, examples, cached embeddings and trained heads, in one
//! embedded redb file.
//!
//! Why redb: pure Rust (nothing to install, builds everywhere cargo does), ACID transactions
//! over copy-on-write B-trees with an fsync on commit, so a `kill -9` at any instant leaves the
//! last committed state and nothing half-written. Every method here is one transaction, and
//! callers reply to a client only after the method returned: an acknowledged write is durable.
//!
//! All methods block (they may fsync); async callers run them on the blocking pool.

pub mod schema;

use std::path::Path;

use redb::{Database, ReadTransaction, ReadableDatabase, ReadableTable, WriteTransaction};

use crate::taxonomy::{ClassEntry, Taxonomy};
use crate::{Error, Result};
use schema::*;

/// sha256 of a photo's bytes.
pub type Hash = [u8; 32];

/// The embedded database.
pub struct Store {
    db: Database,
}

/// What one Enroll writes: a class (created with its parent if new) and its examples.
pub struct EnrollWrite<'a> {
    pub class_name: &'a str,
    pub parent: Option<&'a str>,
    pub model: &'a str,
    /// Every accepted photo with its embedding (cached ones too, so the write never depends on
    /// a cache row that a concurrent remove might drop).
    pub examples: Vec<(Hash, Vec<f32>)>,
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

/// A consistent read of a tenant: taxonomy and every example's embedding under one model.
pub struct Snapshot {
    pub taxonomy: Taxonomy,
    /// (class id, embedding), ordered by class id then photo hash: deterministic.
    pub examples: Vec<(u64, Vec<f32>)>,
}

impl Store {
    /// Opens (or creates) `dir/taxon.redb`. redb replays nothing: after a crash the file simply
    /// holds the last committed transaction.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Store(format!("{}: {e}", dir.display())))?;
        let db = Database::create(dir.join("taxon.redb"))?;
        let txn = db.begin_write()?;
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
        Ok(Self { db })
    }

    /// The tenant's taxonomy and, when `model` is given, every example's embedding under it.
    /// Examples without an embedding under `model` (embedded by another backbone) are skipped.
    pub fn snapshot(&self, tenant: &str, model: Option<&str>) -> Result<Snapshot> {
        let txn = self.db.begin_read()?;
        let taxonomy = read_taxonomy(&txn, tenant)?;
        let mut examples = Vec::new();
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
                }
            }
        }
        Ok(Snapshot { taxonomy, examples })
    }

    /// The cached embedding of a photo, if the tenant has sent it before.
    pub fn embedding(&self, tenant: &str, hash: &Hash, model: &str) -> Result<Option<Vec<f32>>> {
        let txn = self.db.begin_read()?;
        let emb = txn.open_table(EMBEDDINGS)?;
        Ok(emb
            .get((tenant, &hash[..], model))?
            .map(|v| decode_embedding(v.value())))
    }

    /// Creates the class (and its parent) if needed and adds the examples, in one transaction.
    pub fn enroll(&self, tenant: &str, w: &EnrollWrite<'_>) -> Result<EnrollOutcome> {
        let txn = self.db.begin_write()?;
        let outcome = {
            let taxonomy = read_taxonomy_w(&txn, tenant)?;
            let parent_id = match w.parent {
                None => None,
                Some(p) => Some(match taxonomy.by_name(p) {
                    Some(c) if c.examples > 0 => {
                        return Err(Error::Precondition(format!(
                            "`{p}` has photos of its own, so it cannot be a parent"
                        )));
                    }
                    Some(c) => c.id,
                    None => create_class(&txn, tenant, p, None)?,
                }),
            };
            let class_id = match taxonomy.by_name(w.class_name) {
                Some(c) if taxonomy.is_parent(c.id) => {
                    return Err(Error::Precondition(format!(
                        "`{}` is a parent: enroll photos into one of its children",
                        c.name
                    )));
                }
                Some(c) if parent_id.is_some() && c.parent != parent_id => {
                    return Err(Error::Precondition(format!(
                        "`{}` already has parent `{}`",
                        c.name,
                        taxonomy.parent_name(c.id)
                    )));
                }
                Some(c) => c.id,
                None => create_class(&txn, tenant, w.class_name, parent_id)?,
            };
            let parent_id = parent_id.or(taxonomy.classes.get(&class_id).and_then(|c| c.parent));
            {
                let mut ex = txn.open_table(EXAMPLES)?;
                let mut emb = txn.open_table(EMBEDDINGS)?;
                let bytes_of = |v: &[f32]| encode_embedding(v);
                for (hash, v) in &w.examples {
                    ex.insert((tenant, class_id, &hash[..]), ())?;
                    emb.insert((tenant, &hash[..], w.model), bytes_of(v).as_slice())?;
                }
            }
            let examples = count_examples(&txn, tenant, class_id)?;
            let revision = bump(&txn, tenant, COUNTER_REVISION)?;
            bump(&txn, tenant, COUNTER_SEQ)?;
            let proto = bump(&txn, tenant, COUNTER_HEAD_SEQ)?;
            set_counter(&txn, tenant, COUNTER_PROTOTYPE_VERSION, proto)?;
            let parent = match parent_id {
                Some(p) => Some(read_class(&txn, tenant, p)?.name),
                None => None,
            };
            EnrollOutcome {
                class_id,
                parent,
                examples,
                revision,
            }
        };
        txn.commit()?;
        Ok(outcome)
    }

    /// Removes a class with its examples (and its children when `recursive`). Embeddings no
    /// other example of the tenant uses are dropped too: removal really forgets the photos.
    pub fn remove_class(&self, tenant: &str, name: &str, recursive: bool) -> Result<RemoveOutcome> {
        let txn = self.db.begin_write()?;
        let outcome = {
            let taxonomy = read_taxonomy_w(&txn, tenant)?;
            let root = taxonomy
                .by_name(name)
                .ok_or_else(|| Error::UnknownClass(name.to_string()))?;
            if taxonomy.is_parent(root.id) && !recursive {
                return Err(Error::Precondition(format!(
                    "`{name}` is a parent: set recursive to remove it with its children"
                )));
            }
            let mut doomed = vec![root.id];
            let mut i = 0;
            while i < doomed.len() {
                doomed.extend(taxonomy.children(doomed[i]).map(|c| c.id));
                i += 1;
            }
            let mut ex = txn.open_table(EXAMPLES)?;
            let mut hashes = Vec::new();
            for &id in &doomed {
                for row in ex.range((tenant, id, &[][..])..)? {
                    let (k, _) = row?;
                    let (t, c, h) = k.value();
                    if t != tenant || c != id {
                        break;
                    }
                    hashes.push((id, h.to_vec()));
                }
            }
            for (id, h) in &hashes {
                ex.remove((tenant, *id, h.as_slice()))?;
            }
            // Drop embeddings that no surviving example refers to.
            let survivors: Vec<u64> = taxonomy
                .classes
                .keys()
                .copied()
                .filter(|id| !doomed.contains(id))
                .collect();
            let mut emb = txn.open_table(EMBEDDINGS)?;
            for (_, h) in &hashes {
                let mut used = false;
                for &s in &survivors {
                    if ex.get((tenant, s, h.as_slice()))?.is_some() {
                        used = true;
                        break;
                    }
                }
                if !used {
                    let models: Vec<String> = emb
                        .range((tenant, h.as_slice(), "")..)?
                        .map_while(|r| {
                            let (k, _) = r.ok()?;
                            let (t, kh, m) = k.value();
                            (t == tenant && kh == h.as_slice()).then(|| m.to_string())
                        })
                        .collect();
                    for m in models {
                        emb.remove((tenant, h.as_slice(), m.as_str()))?;
                    }
                }
            }
            let mut classes = txn.open_table(CLASSES)?;
            let mut names = txn.open_table(CLASS_NAMES)?;
            let mut removed_classes = Vec::new();
            for &id in &doomed {
                let n = taxonomy.name(id).to_string();
                classes.remove((tenant, id))?;
                names.remove((tenant, n.as_str()))?;
                removed_classes.push(n);
            }
            let revision = bump(&txn, tenant, COUNTER_REVISION)?;
            bump(&txn, tenant, COUNTER_SEQ)?;
            let proto = bump(&txn, tenant, COUNTER_HEAD_SEQ)?;
            set_counter(&txn, tenant, COUNTER_PROTOTYPE_VERSION, proto)?;
            RemoveOutcome {
                removed_classes,
                removed_examples: hashes.len() as u32,
                revision,
            }
        };
        txn.commit()?;
        Ok(outcome)
    }

    /// Renames a class. Examples and heads refer to the id, so nothing else changes.
    pub fn rename_class(&self, tenant: &str, name: &str, new_name: &str) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut names = txn.open_table(CLASS_NAMES)?;
            let id = names
                .get((tenant, name))?
                .map(|v| v.value())
                .ok_or_else(|| Error::UnknownClass(name.to_string()))?;
            if name == new_name {
                return Ok(());
            }
            if names.get((tenant, new_name))?.is_some() {
                return Err(Error::AlreadyExists(new_name.to_string()));
            }
            names.remove((tenant, name))?;
            names.insert((tenant, new_name), id)?;
            let mut record = read_class(&txn, tenant, id)?;
            record.name = new_name.to_string();
            txn.open_table(CLASSES)?
                .insert((tenant, id), serde_json::to_vec(&record)?.as_slice())?;
            bump(&txn, tenant, COUNTER_SEQ)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Stores a trained head under a fresh version. `encode` receives the version, so the
    /// version inside the bytes and the one handed out are the same number.
    pub fn save_head(
        &self,
        tenant: &str,
        kind: &str,
        encode: impl FnOnce(u64) -> Result<Vec<u8>>,
    ) -> Result<u64> {
        let txn = self.db.begin_write()?;
        let version = bump(&txn, tenant, COUNTER_HEAD_SEQ)?;
        let bytes = encode(version)?;
        txn.open_table(HEADS)?
            .insert((tenant, kind), bytes.as_slice())?;
        bump(&txn, tenant, COUNTER_SEQ)?;
        txn.commit()?;
        Ok(version)
    }

    /// Every stored head of the tenant, as (kind, bytes).
    pub fn heads(&self, tenant: &str) -> Result<Vec<(String, Vec<u8>)>> {
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

fn read_class(txn: &WriteTransaction, tenant: &str, id: u64) -> Result<ClassRecord> {
    let classes = txn.open_table(CLASSES)?;
    let v = classes
        .get((tenant, id))?
        .ok_or_else(|| Error::Corrupt(format!("class id {id} of `{tenant}` has no record")))?;
    Ok(serde_json::from_slice(v.value())?)
}

fn create_class(
    txn: &WriteTransaction,
    tenant: &str,
    name: &str,
    parent: Option<u64>,
) -> Result<u64> {
    let id = bump(txn, tenant, COUNTER_NEXT_CLASS)?;
    let record = ClassRecord {
        name: name.to_string(),
        parent,
    };
    txn.open_table(CLASSES)?
        .insert((tenant, id), serde_json::to_vec(&record)?.as_slice())?;
    txn.open_table(CLASS_NAMES)?.insert((tenant, name), id)?;
    Ok(id)
}

fn count_examples(txn: &WriteTransaction, tenant: &str, class: u64) -> Result<u32> {
    let ex = txn.open_table(EXAMPLES)?;
    let mut n = 0;
    for row in ex.range((tenant, class, &[][..])..)? {
        let (k, _) = row?;
        let (t, c, _) = k.value();
        if t != tenant || c != class {
            break;
        }
        n += 1;
    }
    Ok(n)
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

#[cfg(test)]
mod tests;
