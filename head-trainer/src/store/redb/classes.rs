//! The transactions that change a tenant's classes: enroll (create class and parent, add
//! examples), remove and rename. Each is one redb write transaction; the revision counter it
//! bumps is what tells the trainer and the tenant cache that the taxonomy moved.

use ::redb::{ReadableTable, WriteTransaction};

use super::schema::*;
use super::{RedbStore, bump, read_taxonomy_w, set_counter};
use crate::store::{
    EnrollOutcome, EnrollWrite, Hash, HeadStamp, ImportOutcome, ImportWrite, RemoveOutcome,
    encode_embedding, rules,
};
use crate::{Error, Result};

/// Creates the class (and its parent) if needed and adds the examples, in one transaction.
pub(super) fn enroll(s: &RedbStore, tenant: &str, w: &EnrollWrite<'_>) -> Result<EnrollOutcome> {
    let txn = s.write()?;
    let outcome = {
        let taxonomy = read_taxonomy_w(&txn, tenant)?;
        let (class_id, parent_id) = rules::enroll_ids(tenant, &taxonomy, w, |name, parent| {
            create_class(&txn, tenant, name, parent)
        })?;
        insert_examples(&txn, tenant, w.model, [(class_id, &w.examples[..])])?;
        let examples = count_examples(&txn, tenant, class_id)?;
        // Dropping the transaction uncommitted undoes the whole enroll.
        rules::check_examples(tenant, &taxonomy, w, class_id, u64::from(examples))?;
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

/// Writes an exported tenant into an empty one, in one transaction: the counters move as an
/// enroll's do (a new revision and prototype version), then once per head as a saved head's.
pub(super) fn import(
    s: &RedbStore,
    tenant: &str,
    w: &ImportWrite<'_>,
    encode: &mut dyn FnMut(&str, &HeadStamp<'_>) -> Result<Vec<u8>>,
) -> Result<ImportOutcome> {
    let txn = s.write()?;
    let outcome = {
        rules::check_import(tenant, &read_taxonomy_w(&txn, tenant)?, w)?;
        let mut ids: Vec<u64> = Vec::with_capacity(w.classes.len());
        for c in &w.classes {
            let parent = c.parent.and_then(|p| ids.get(p).copied());
            ids.push(create_class(&txn, tenant, &c.name, parent)?);
        }
        let rows = ids
            .iter()
            .zip(&w.classes)
            .map(|(&id, c)| (id, &c.examples[..]));
        insert_examples(&txn, tenant, w.model, rows)?;
        let revision = bump(&txn, tenant, COUNTER_REVISION)?;
        bump(&txn, tenant, COUNTER_SEQ)?;
        let proto = bump(&txn, tenant, COUNTER_HEAD_SEQ)?;
        set_counter(&txn, tenant, COUNTER_PROTOTYPE_VERSION, proto)?;
        // Heads a tenant kept after its classes were removed name classes that are gone.
        {
            let mut heads = txn.open_table(HEADS)?;
            let mut old = Vec::new();
            for row in heads.range((tenant, "")..)? {
                let (k, _) = row?;
                let (t, kind) = k.value();
                if t != tenant {
                    break;
                }
                old.push(kind.to_string());
            }
            for kind in &old {
                heads.remove((tenant, kind.as_str()))?;
            }
        }
        let mut written = Vec::with_capacity(w.heads.len());
        for kind in &w.heads {
            let version = bump(&txn, tenant, COUNTER_HEAD_SEQ)?;
            bump(&txn, tenant, COUNTER_SEQ)?;
            let stamp = HeadStamp {
                ids: &ids,
                revision,
                version,
            };
            let bytes = encode(kind, &stamp)?;
            txn.open_table(HEADS)?
                .insert((tenant, kind.as_str()), bytes.as_slice())?;
            written.push((kind.clone(), version));
        }
        ImportOutcome {
            ids,
            revision,
            heads: written,
        }
    };
    txn.commit()?;
    Ok(outcome)
}

/// Removes a class with its examples (and its children when `recursive`). Embeddings no
/// other example of the tenant uses are dropped too: removal really forgets the photos.
pub(super) fn remove_class(
    s: &RedbStore,
    tenant: &str,
    name: &str,
    recursive: bool,
) -> Result<RemoveOutcome> {
    let txn = s.write()?;
    let outcome = {
        let taxonomy = read_taxonomy_w(&txn, tenant)?;
        let doomed = rules::doomed(&taxonomy, name, recursive)?;
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
pub(super) fn rename_class(s: &RedbStore, tenant: &str, name: &str, new_name: &str) -> Result<()> {
    let txn = s.write()?;
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

/// Adds each class's examples (photo hash and embedding under `model`); a photo the class
/// already has is kept once.
fn insert_examples<'e>(
    txn: &WriteTransaction,
    tenant: &str,
    model: &str,
    classes: impl IntoIterator<Item = (u64, &'e [(Hash, Vec<f32>)])>,
) -> Result<()> {
    let mut ex = txn.open_table(EXAMPLES)?;
    let mut emb = txn.open_table(EMBEDDINGS)?;
    for (class, examples) in classes {
        for (hash, v) in examples {
            ex.insert((tenant, class, &hash[..]), ())?;
            emb.insert((tenant, &hash[..], model), encode_embedding(v).as_slice())?;
        }
    }
    Ok(())
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
