//! The rules every store applies before it writes, decided from the tenant's taxonomy as
//! read inside the write's own transaction: one copy, so that two stores cannot drift apart
//! on what an enroll or a remove may do.

use super::{EnrollWrite, ImportWrite};
use crate::quota::{Quotas, exceeded};
use crate::taxonomy::Taxonomy;
use crate::{Error, Result};

/// The class of an enroll and its parent as ids, created with `create(name, parent)` where
/// new. Everything is checked before anything is created: a parent with photos of its own,
/// photos into a parent, a class that already has another parent, or one class more than the
/// tenant's quota refuse the enroll.
pub(crate) fn enroll_ids(
    tenant: &str,
    t: &Taxonomy,
    w: &EnrollWrite<'_>,
    mut create: impl FnMut(&str, Option<u64>) -> Result<u64>,
) -> Result<(u64, Option<u64>)> {
    let new = u64::from(t.by_name(w.class_name).is_none())
        + u64::from(w.parent.is_some_and(|p| t.by_name(p).is_none()));
    let limit = w.quotas.classes;
    if new > 0 && limit > 0 && t.classes.len() as u64 + new > limit {
        return Err(exceeded(
            tenant,
            "classes",
            "classes",
            limit,
            "--quota-classes",
        ));
    }
    let parent = match w.parent {
        None => None,
        Some(p) => match t.by_name(p) {
            Some(c) if c.examples > 0 => {
                return Err(Error::Precondition(format!(
                    "`{p}` has photos of its own, so it cannot be a parent"
                )));
            }
            found => Some((p, found.map(|c| c.id))),
        },
    };
    let class = match t.by_name(w.class_name) {
        Some(c) if t.is_parent(c.id) => {
            return Err(Error::Precondition(format!(
                "`{}` is a parent: enroll photos into one of its children",
                c.name
            )));
        }
        // A new parent is never the parent an existing class already has.
        Some(c) if parent.is_some_and(|(_, id)| id.is_none() || c.parent != id) => {
            return Err(Error::Precondition(format!(
                "`{}` already has parent `{}`",
                c.name,
                t.parent_name(c.id)
            )));
        }
        found => found.map(|c| (c.id, c.parent)),
    };
    let parent_id = match parent {
        None => None,
        Some((_, Some(id))) => Some(id),
        Some((name, None)) => Some(create(name, None)?),
    };
    Ok(match class {
        Some((id, own_parent)) => (id, parent_id.or(own_parent)),
        None => (create(w.class_name, parent_id)?, parent_id),
    })
}

/// The classes a remove deletes: the class, and its children when `recursive` (a parent
/// without it is refused).
pub(crate) fn doomed(t: &Taxonomy, name: &str, recursive: bool) -> Result<Vec<u64>> {
    let root = t
        .by_name(name)
        .ok_or_else(|| Error::UnknownClass(name.to_string()))?;
    if t.is_parent(root.id) && !recursive {
        return Err(Error::Precondition(format!(
            "`{name}` is a parent: set recursive to remove it with its children"
        )));
    }
    let mut doomed = vec![root.id];
    let mut i = 0;
    while i < doomed.len() {
        doomed.extend(t.children(doomed[i]).map(|c| c.id));
        i += 1;
    }
    Ok(doomed)
}

/// Refuses an enroll after which the tenant would hold more examples, or more embedding
/// bytes, than its quotas allow; `in_class` is the enrolled class's example count after the
/// write, `t` the taxonomy as read before it (in the same transaction, so exact).
pub(crate) fn check_examples(
    tenant: &str,
    t: &Taxonomy,
    w: &EnrollWrite<'_>,
    class_id: u64,
    in_class: u64,
) -> Result<()> {
    let others: u64 = t
        .classes
        .values()
        .filter(|c| c.id != class_id)
        .map(|c| u64::from(c.examples))
        .sum();
    let dim = w.examples.first().map_or(0, |(_, v)| v.len() as u64);
    check_totals(tenant, &w.quotas, others + in_class, dim)
}

/// Refuses `examples` embeddings of `dim` floats when they are more examples, or more bytes,
/// than the tenant's quotas allow.
fn check_totals(tenant: &str, q: &Quotas, examples: u64, dim: u64) -> Result<()> {
    if q.examples > 0 && examples > q.examples {
        return Err(exceeded(
            tenant,
            "examples",
            "examples",
            q.examples,
            "--quota-examples",
        ));
    }
    let bytes = examples * dim * 4;
    if q.stored_bytes > 0 && bytes > q.stored_bytes {
        return Err(exceeded(
            tenant,
            "stored_bytes",
            "bytes of stored embeddings",
            q.stored_bytes,
            "--quota-stored-bytes",
        ));
    }
    Ok(())
}

/// Refuses an import into a tenant that has classes (an import replaces nothing: merging two
/// taxonomies is a decision for a person, not for the file), or one that brings more classes,
/// examples or embedding bytes than the tenant's quotas allow.
pub(crate) fn check_import(tenant: &str, t: &Taxonomy, w: &ImportWrite<'_>) -> Result<()> {
    check_empty(tenant, t)?;
    let q = &w.quotas;
    let classes = w.classes.len() as u64;
    if q.classes > 0 && classes > q.classes {
        return Err(exceeded(
            tenant,
            "classes",
            "classes",
            q.classes,
            "--quota-classes",
        ));
    }
    let examples: u64 = w.classes.iter().map(|c| c.examples.len() as u64).sum();
    let dim = w
        .classes
        .iter()
        .find_map(|c| c.examples.first())
        .map_or(0, |(_, v)| v.len() as u64);
    check_totals(tenant, q, examples, dim)
}

/// Refuses an import into a tenant that has classes.
pub(crate) fn check_empty(tenant: &str, t: &Taxonomy) -> Result<()> {
    if t.classes.is_empty() {
        return Ok(());
    }
    Err(Error::Precondition(format!(
        "tenant `{tenant}` has {} classes: import only into an empty tenant (remove them, or \
         import into another tenant)",
        t.classes.len()
    )))
}
