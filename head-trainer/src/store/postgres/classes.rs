//! The transactions that change a tenant's classes, in PostgreSQL: enroll, remove, rename.
//! The same rules and counter moves as `redb/classes.rs`; the store test suite holds both to
//! them. Each runs under the tenant's row lock (`lock_tenant`), so the taxonomy it validates
//! against cannot change before it commits.

use postgres::{Client, Transaction};

use super::{id, lock_tenant, read_taxonomy};
use crate::store::{
    EnrollOutcome, EnrollWrite, Hash, HeadStamp, ImportOutcome, ImportWrite, RemoveOutcome,
    encode_embedding, rules,
};
use crate::{Error, Result};

/// A new class with the next id (ids are never reused).
fn create_class(
    tx: &mut Transaction<'_>,
    tenant: &str,
    name: &str,
    parent: Option<u64>,
) -> Result<u64> {
    let row = tx.query_one(
        "UPDATE tenants SET next_class = next_class + 1 WHERE tenant = $1 RETURNING next_class",
        &[&tenant],
    )?;
    let class: i64 = row.get(0);
    let parent = parent.map(|p| p as i64);
    tx.execute(
        "INSERT INTO classes (tenant, id, name, parent) VALUES ($1, $2, $3, $4)",
        &[&tenant, &class, &name, &parent],
    )?;
    Ok(id(class))
}

/// Adds each class's examples (photo hash and embedding under `model`); a photo the class
/// already has is kept once.
fn insert_examples<'e>(
    tx: &mut Transaction<'_>,
    tenant: &str,
    model: &str,
    classes: impl IntoIterator<Item = (u64, &'e [(Hash, Vec<f32>)])>,
) -> Result<()> {
    let example = tx.prepare(
        "INSERT INTO examples (tenant, class_id, hash) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
    )?;
    let embedding = tx.prepare(
        "INSERT INTO embeddings (tenant, hash, model, vector) VALUES ($1, $2, $3, $4)
         ON CONFLICT (tenant, hash, model) DO UPDATE SET vector = EXCLUDED.vector",
    )?;
    for (class, examples) in classes {
        let class = class as i64;
        for (hash, v) in examples {
            let hash = &hash[..];
            tx.execute(&example, &[&tenant, &class, &hash])?;
            tx.execute(&embedding, &[&tenant, &hash, &model, &encode_embedding(v)])?;
        }
    }
    Ok(())
}

/// After a change to the examples: a new revision, and a new version for the prototype.
fn examples_changed(tx: &mut Transaction<'_>, tenant: &str) -> Result<u64> {
    // SET expressions see the old row: prototype_version becomes the new head_seq.
    let row = tx.query_one(
        "UPDATE tenants SET revision = revision + 1, seq = seq + 1, head_seq = head_seq + 1,
                            prototype_version = head_seq + 1
         WHERE tenant = $1 RETURNING revision",
        &[&tenant],
    )?;
    Ok(id(row.get(0)))
}

pub(super) fn enroll(
    client: &mut Client,
    tenant: &str,
    w: &EnrollWrite<'_>,
) -> Result<EnrollOutcome> {
    let mut tx = client.transaction()?;
    lock_tenant(&mut tx, tenant)?;
    let taxonomy = read_taxonomy(&mut tx, tenant)?;
    let (class_id, parent_id) = rules::enroll_ids(tenant, &taxonomy, w, |name, parent| {
        create_class(&mut tx, tenant, name, parent)
    })?;
    insert_examples(&mut tx, tenant, w.model, [(class_id, &w.examples[..])])?;
    let class = class_id as i64;
    let examples: i64 = tx
        .query_one(
            "SELECT count(*) FROM examples WHERE tenant = $1 AND class_id = $2",
            &[&tenant, &class],
        )?
        .get(0);
    // Returning before the commit rolls the whole enroll back.
    rules::check_examples(tenant, &taxonomy, w, class_id, examples.max(0) as u64)?;
    let revision = examples_changed(&mut tx, tenant)?;
    let parent = match parent_id {
        Some(p) => Some(
            tx.query_one(
                "SELECT name FROM classes WHERE tenant = $1 AND id = $2",
                &[&tenant, &(p as i64)],
            )?
            .get(0),
        ),
        None => None,
    };
    tx.commit()?;
    Ok(EnrollOutcome {
        class_id,
        parent,
        examples: u32::try_from(examples).unwrap_or(u32::MAX),
        revision,
    })
}

/// Writes an exported tenant into an empty one, under the tenant's lock: the counters move
/// as redb's do, and the saved heads are announced as `save_head` announces them.
pub(super) fn import(
    client: &mut Client,
    tenant: &str,
    w: &ImportWrite<'_>,
    encode: &mut dyn FnMut(&str, &HeadStamp<'_>) -> Result<Vec<u8>>,
) -> Result<ImportOutcome> {
    let mut tx = client.transaction()?;
    lock_tenant(&mut tx, tenant)?;
    rules::check_import(tenant, &read_taxonomy(&mut tx, tenant)?, w)?;
    let mut ids: Vec<u64> = Vec::with_capacity(w.classes.len());
    for c in &w.classes {
        let parent = c.parent.and_then(|p| ids.get(p).copied());
        ids.push(create_class(&mut tx, tenant, &c.name, parent)?);
    }
    let rows = ids
        .iter()
        .zip(&w.classes)
        .map(|(&id, c)| (id, &c.examples[..]));
    insert_examples(&mut tx, tenant, w.model, rows)?;
    let revision = examples_changed(&mut tx, tenant)?;
    // Heads a tenant kept after its classes were removed name classes that are gone.
    tx.execute("DELETE FROM heads WHERE tenant = $1", &[&tenant])?;
    let mut written = Vec::with_capacity(w.heads.len());
    for kind in &w.heads {
        let version: i64 = tx
            .query_one(
                "UPDATE tenants SET head_seq = head_seq + 1, seq = seq + 1 WHERE tenant = $1
                 RETURNING head_seq",
                &[&tenant],
            )?
            .get(0);
        let stamp = HeadStamp {
            ids: &ids,
            revision,
            version: id(version),
        };
        let bytes = encode(kind, &stamp)?;
        tx.execute(
            "INSERT INTO heads (tenant, kind, version, bytes) VALUES ($1, $2, $3, $4)",
            &[&tenant, kind, &version, &bytes],
        )?;
        let payload = format!("{tenant} {kind} {version}");
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&super::HEADS_CHANNEL, &payload],
        )?;
        written.push((kind.clone(), id(version)));
    }
    tx.commit()?;
    Ok(ImportOutcome {
        ids,
        revision,
        heads: written,
    })
}

pub(super) fn remove_class(
    client: &mut Client,
    tenant: &str,
    name: &str,
    recursive: bool,
) -> Result<RemoveOutcome> {
    let mut tx = client.transaction()?;
    lock_tenant(&mut tx, tenant)?;
    let taxonomy = read_taxonomy(&mut tx, tenant)?;
    let doomed = rules::doomed(&taxonomy, name, recursive)?;
    let mut hashes: Vec<Vec<u8>> = Vec::new();
    for &class in &doomed {
        let rows = tx.query(
            "DELETE FROM examples WHERE tenant = $1 AND class_id = $2 RETURNING hash",
            &[&tenant, &(class as i64)],
        )?;
        hashes.extend(rows.into_iter().map(|r| r.get::<_, Vec<u8>>(0)));
    }
    let removed_examples = u32::try_from(hashes.len()).unwrap_or(u32::MAX);
    // Drop embeddings that no surviving example refers to (the doomed ones are gone already).
    hashes.sort_unstable();
    hashes.dedup();
    let orphan = tx.prepare(
        "DELETE FROM embeddings WHERE tenant = $1 AND hash = $2
         AND NOT EXISTS (SELECT 1 FROM examples WHERE tenant = $1 AND hash = $2)",
    )?;
    for hash in &hashes {
        tx.execute(&orphan, &[&tenant, hash])?;
    }
    let mut removed_classes = Vec::new();
    for &class in doomed.iter().rev() {
        tx.execute(
            "DELETE FROM classes WHERE tenant = $1 AND id = $2",
            &[&tenant, &(class as i64)],
        )?;
        removed_classes.push(taxonomy.name(class).to_string());
    }
    removed_classes.reverse();
    let revision = examples_changed(&mut tx, tenant)?;
    tx.commit()?;
    Ok(RemoveOutcome {
        removed_classes,
        removed_examples,
        revision,
    })
}

pub(super) fn rename_class(
    client: &mut Client,
    tenant: &str,
    name: &str,
    new_name: &str,
) -> Result<()> {
    let mut tx = client.transaction()?;
    lock_tenant(&mut tx, tenant)?;
    let class: i64 = tx
        .query_opt(
            "SELECT id FROM classes WHERE tenant = $1 AND name = $2",
            &[&tenant, &name],
        )?
        .ok_or_else(|| Error::UnknownClass(name.to_string()))?
        .get(0);
    if name == new_name {
        return Ok(());
    }
    let taken = tx.query_opt(
        "SELECT 1 FROM classes WHERE tenant = $1 AND name = $2",
        &[&tenant, &new_name],
    )?;
    if taken.is_some() {
        return Err(Error::AlreadyExists(new_name.to_string()));
    }
    tx.execute(
        "UPDATE classes SET name = $3 WHERE tenant = $1 AND id = $2",
        &[&tenant, &class, &new_name],
    )?;
    tx.execute(
        "UPDATE tenants SET seq = seq + 1 WHERE tenant = $1",
        &[&tenant],
    )?;
    tx.commit()?;
    Ok(())
}
