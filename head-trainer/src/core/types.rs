//! What the core takes and gives: plain Rust types, so that every face (gRPC today, HTTP next)
//! converts its own wire format to and from the same domain and none of them leaks into it.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::Error;
use crate::heads::HeadKind;

/// Who asks, and by when: what a face learned from its transport (the authenticated tenant,
/// the caller's deadline) before it calls the core.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The tenant, already authenticated by the face.
    pub tenant: String,
    /// The caller's own deadline, if it set one; the core bounds it by `--request-timeout-s`.
    pub deadline: Option<Instant>,
    /// The caller's trace (W3C `traceparent`), or a new one: continued to the feature-server.
    pub trace: taxon_ops::trace::TraceContext,
}

/// The first part of an enroll: which class the photos are of.
#[derive(Clone, Debug, Default)]
pub struct EnrollStart {
    pub class_name: String,
    /// The parent class, created if new; `None` for a top-level class.
    pub parent: Option<String>,
    /// Reply only once the trained head covering these photos is live.
    pub wait_for_head: bool,
}

/// One photo of an enroll, as its encoded bytes.
#[derive(Clone, Debug)]
pub struct Photo {
    /// The caller's name for it, quoted back when it is rejected.
    pub id: String,
    pub image: Bytes,
}

/// A photo that did not become an example, and why (the rest of its enroll goes on).
#[derive(Debug)]
pub struct Rejected {
    pub id: String,
    pub error: Error,
}

/// A head as callers see it: its kind and version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadRef {
    pub kind: String,
    pub version: u64,
}

/// What an enroll committed.
#[derive(Debug)]
pub struct Enrolled {
    /// The class name as stored (NFC).
    pub class_name: String,
    pub parent: Option<String>,
    /// Photos that became examples, `cached` of them without a backbone pass.
    pub accepted: u32,
    pub cached: u32,
    pub rejected: Vec<Rejected>,
    /// Examples of the class after the write.
    pub examples: u32,
    /// The head answering now (the prototype at once, the trained one if waited for).
    pub head: Option<HeadRef>,
    /// From the last photo to the trained head being live, when the caller waited for it.
    pub time_to_live: Option<Duration>,
    /// The class's leave-one-out accuracy among the tenant's classes after the write (see
    /// [`crate::quality`]); `None` below two examples or with no other class.
    pub estimate: Option<f32>,
}

/// One image to classify.
#[derive(Clone, Debug)]
pub struct ClassifyInput {
    pub image: Bytes,
    /// How many children to rank (0: five).
    pub top_k: u32,
    /// The head to ask; `None` for the live one.
    pub head: Option<HeadKind>,
}

/// A class with its probability.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassScore {
    pub name: String,
    pub probability: f32,
    /// For a child, its parent's name.
    pub parent: Option<String>,
}

/// What was decided for an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Label {
    /// The best child is clear.
    Child(String),
    /// Children too close to call: the parent alone (back-off).
    Parent(String),
    /// The image matches none of the tenant's classes (open-set rejection).
    Unknown,
}

/// The answer for one image.
#[derive(Clone, Debug)]
pub struct Classification {
    /// Most probable children first, at most `top_k`.
    pub children: Vec<ClassScore>,
    /// The most probable group (a parent, or a top-level class scoring for itself).
    pub parent: ClassScore,
    pub label: Label,
    /// The label's probability (the best child's for `Unknown`).
    pub probability: f32,
    pub head: HeadRef,
    /// Cosine to the nearest class mean, what open-set rejection looks at.
    pub similarity: f32,
    /// The hierarchical head's own parent branch, when it has one.
    pub parent_branch: Option<ClassScore>,
}

/// One class of a tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassSummary {
    pub name: String,
    pub parent: Option<String>,
    /// Examples of the class, or of its children for a parent.
    pub examples: u32,
    pub is_parent: bool,
}

/// A tenant's classes and what answers for them.
#[derive(Clone, Debug, Default)]
pub struct ClassList {
    /// Ordered by (parent, name).
    pub classes: Vec<ClassSummary>,
    /// `None` before any feature-server has answered, or without examples.
    pub head: Option<HeadRef>,
    /// The embedding identity, once known.
    pub model: Option<String>,
}

/// What a remove committed.
#[derive(Clone, Debug)]
pub struct Removed {
    pub classes: Vec<String>,
    pub examples: u32,
    /// The head answering after it (masking the removed classes until retrained).
    pub head: Option<HeadRef>,
}

/// A head trained on request.
#[derive(Clone, Debug)]
pub struct Trained {
    pub kind: HeadKind,
    pub version: u64,
    pub train_ms: f64,
    pub classes: u32,
    pub examples: u32,
}

/// What an import committed.
#[derive(Clone, Debug)]
pub struct Imported {
    /// The model identity of the file (and of this server).
    pub model: String,
    pub classes: u32,
    pub examples: u32,
    /// Trained head kinds imported (the prototype is rebuilt from the examples).
    pub heads: Vec<String>,
    /// The head answering now.
    pub head: Option<HeadRef>,
}

/// How well a tenant's classes are learned, from its cached embeddings (see
/// [`crate::quality`]).
#[derive(Clone, Debug, PartialEq)]
pub struct QualityReport {
    /// Leaf classes, by (parent, name).
    pub classes: Vec<ClassReport>,
    /// Most confused pairs first.
    pub confused: Vec<Confusion>,
    /// Examples nearer another class's mean than their own, largest margin first.
    pub suspects: Vec<Suspect>,
    /// Examples checked (those of classes with two or more) and of those classified right.
    pub checked: u32,
    pub right: u32,
    /// The model identity of the embeddings.
    pub model: String,
}

impl QualityReport {
    /// The share of checked photos classified right (0 when none could be checked).
    pub fn accuracy(&self) -> f32 {
        if self.checked == 0 {
            0.0
        } else {
            self.right as f32 / self.checked as f32
        }
    }
}

/// One class in a [`QualityReport`].
#[derive(Clone, Debug, PartialEq)]
pub struct ClassReport {
    pub name: String,
    pub parent: Option<String>,
    pub examples: u32,
    /// Leave-one-out accuracy, `None` for a class of one example.
    pub accuracy: Option<f32>,
    /// The class its photos were most often taken for, and how many times.
    pub confused_with: Option<(String, u32)>,
    pub needs_more_photos: bool,
}

/// Two classes taken for each other, in a [`QualityReport`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confusion {
    pub a: String,
    pub b: String,
    pub a_as_b: u32,
    pub b_as_a: u32,
}

/// A photo that looks mislabelled: nearer another class's mean than its own class's.
#[derive(Clone, Debug, PartialEq)]
pub struct Suspect {
    pub class: String,
    /// The photo's sha256 (photos are not stored: the caller finds it by hashing its files).
    pub hash: crate::store::Hash,
    pub nearer: String,
    pub own_similarity: f32,
    pub nearer_similarity: f32,
}

impl Suspect {
    /// The photo's sha256 in lowercase hex, as a caller computes it from its file.
    pub fn sha256_hex(&self) -> String {
        self.hash.iter().map(|b| format!("{b:02x}")).collect()
    }
}
