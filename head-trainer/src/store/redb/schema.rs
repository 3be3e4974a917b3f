//! The on-disk layout: every table, its key and value, and the records stored as JSON.
//!
//! Every key starts with the tenant, so one tenant's rows form a contiguous range that no
//! other tenant's scan can ever reach: isolation is a property of the key layout, not of
//! filtering code. Classes are addressed by a stable numeric id; names live in a separate
//! index, so a rename touches two small rows and never the examples or the heads.

use ::redb::TableDefinition;
use serde::{Deserialize, Serialize};

/// Bumped when the layout changes incompatibly; checked at open.
pub const SCHEMA_VERSION: u64 = 1;

/// `key` -> value, store-wide settings (the schema version).
pub const SETTINGS: TableDefinition<&str, u64> = TableDefinition::new("settings");

/// (tenant, class id) -> [`ClassRecord`] as JSON.
pub const CLASSES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("classes");

/// (tenant, class name) -> class id.
pub const CLASS_NAMES: TableDefinition<(&str, &str), u64> = TableDefinition::new("class_names");

/// (tenant, class id, sha256 of the photo) -> (). A photo may be an example of several classes.
pub const EXAMPLES: TableDefinition<(&str, u64, &[u8]), ()> = TableDefinition::new("examples");

/// (tenant, sha256 of the photo, model identity) -> embedding as little-endian f32.
///
/// Keyed by hash before model so that removing a photo can drop its embeddings under every
/// model with one range scan. Per tenant (not shared) so that `cached` in an Enroll reply never
/// tells one tenant which photos another tenant has sent.
pub const EMBEDDINGS: TableDefinition<(&str, &[u8], &str), &[u8]> =
    TableDefinition::new("embeddings");

/// (tenant, counter name) -> value; see the `COUNTER_*` names.
pub const COUNTERS: TableDefinition<(&str, &str), u64> = TableDefinition::new("counters");

/// (tenant, head kind) -> the latest head of that kind, as [`crate::heads::Head::to_bytes`].
pub const HEADS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("heads");

/// Next class id to hand out (ids are never reused, so a stale head can never point at a
/// different class that happens to reuse an id).
pub const COUNTER_NEXT_CLASS: &str = "next_class_id";
/// Bumped by every change to the examples (enroll, remove): what trained heads are built from.
pub const COUNTER_REVISION: &str = "revision";
/// Bumped by every write at all (also rename): orders in-memory snapshots.
pub const COUNTER_SEQ: &str = "seq";
/// Head versions, shared by every kind so that a version names one head of the tenant.
pub const COUNTER_HEAD_SEQ: &str = "head_seq";
/// The version given to the prototype head built from the examples at the last revision.
pub const COUNTER_PROTOTYPE_VERSION: &str = "prototype_version";

/// A class: its name and, for a child, the id of its parent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassRecord {
    pub name: String,
    pub parent: Option<u64>,
}
