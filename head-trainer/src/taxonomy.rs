//! A tenant's classes in memory: names, parents, example counts, and which classes are leaves
//! that heads predict.
//!
//! Read from the store in one transaction and then shared immutably (`Arc`) by every request,
//! so classification never touches the database for names.

use std::collections::BTreeMap;

/// One class of a tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassEntry {
    pub id: u64,
    pub name: String,
    pub parent: Option<u64>,
    /// Examples of this class itself (a parent has none).
    pub examples: u32,
}

/// A tenant's taxonomy at one point of the store's history.
#[derive(Clone, Debug, Default)]
pub struct Taxonomy {
    /// Store write sequence this snapshot reflects (orders snapshots).
    pub seq: u64,
    /// Example revision this snapshot reflects.
    pub revision: u64,
    /// Version given to the prototype head built from this revision.
    pub prototype_version: u64,
    pub classes: BTreeMap<u64, ClassEntry>,
}

impl Taxonomy {
    pub fn by_name(&self, name: &str) -> Option<&ClassEntry> {
        self.classes.values().find(|c| c.name == name)
    }

    pub fn children(&self, id: u64) -> impl Iterator<Item = &ClassEntry> {
        self.classes.values().filter(move |c| c.parent == Some(id))
    }

    pub fn is_parent(&self, id: u64) -> bool {
        self.children(id).next().is_some()
    }

    /// Classes that heads predict: those with examples of their own (parents have none).
    pub fn leaves(&self) -> Vec<u64> {
        self.classes
            .values()
            .filter(|c| c.examples > 0)
            .map(|c| c.id)
            .collect()
    }

    /// The group a leaf is scored under: its parent, or itself for a top-level class.
    pub fn group_of(&self, leaf: u64) -> u64 {
        self.classes
            .get(&leaf)
            .and_then(|c| c.parent)
            .unwrap_or(leaf)
    }

    pub fn name(&self, id: u64) -> &str {
        self.classes.get(&id).map(|c| c.name.as_str()).unwrap_or("")
    }

    /// Name of the leaf's parent, empty for a top-level class (as on the wire).
    pub fn parent_name(&self, id: u64) -> &str {
        self.classes
            .get(&id)
            .and_then(|c| c.parent)
            .map(|p| self.name(p))
            .unwrap_or("")
    }

    /// Examples of a class, counting a parent's children.
    pub fn examples_under(&self, id: u64) -> u32 {
        let own = self.classes.get(&id).map(|c| c.examples).unwrap_or(0);
        own + self
            .children(id)
            .map(|c| self.examples_under(c.id))
            .sum::<u32>()
    }
}

/// Checks a class name: not empty, at most [`MAX_CLASS_NAME_BYTES`], no control characters, no
/// surrounding whitespace (which would make two classes look identical in a listing).
pub fn validate_class_name(name: &str) -> crate::Result<()> {
    let bad = |why| {
        Err(crate::Error::InvalidClassName {
            name: truncate(name, 64),
            why,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_CLASS_NAME_BYTES {
        return bad("longer than 128 bytes");
    }
    if name.chars().any(char::is_control) {
        return bad("contains control characters");
    }
    if name.trim() != name {
        return bad("leading or trailing whitespace");
    }
    Ok(())
}

/// Longest class name accepted, in UTF-8 bytes.
pub const MAX_CLASS_NAME_BYTES: usize = 128;

fn truncate(s: &str, max_chars: usize) -> String {
    let t: String = s.chars().take(max_chars).collect();
    if t.len() < s.len() { t + "…" } else { t }
}
