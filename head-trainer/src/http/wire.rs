//! JSON <-> domain: the HTTP face's only types, each described for the OpenAPI document.
//! "None" is `null` here (the proto's empty strings and zero versions stop at its face).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::core::{ClassList, ClassScore, Classification, Enrolled, HeadRef, Label, Removed};

/// Every error: the gRPC code's name and a message naming the problem (and the limit).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorJson {
    /// e.g. `INVALID_ARGUMENT`, `NOT_FOUND`, `RESOURCE_EXHAUSTED`, `UNAVAILABLE`.
    pub code: String,
    pub message: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClassJson {
    pub name: String,
    pub parent: Option<String>,
    /// Examples of the class, or of its children for a parent.
    pub examples: u32,
    pub is_parent: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClassesJson {
    /// Ordered by (parent, name).
    pub classes: Vec<ClassJson>,
    /// The kind of the head answering classifies (`prototype` until a trained one is live).
    pub head: Option<String>,
    pub head_version: Option<u64>,
    /// The embedding model the tenant's examples belong to, once a feature-server answered.
    pub model: Option<String>,
}

fn head_fields(head: Option<HeadRef>) -> (Option<String>, Option<u64>) {
    head.map_or((None, None), |h| (Some(h.kind), Some(h.version)))
}

impl From<ClassList> for ClassesJson {
    fn from(l: ClassList) -> Self {
        let (head, head_version) = head_fields(l.head);
        Self {
            classes: l
                .classes
                .into_iter()
                .map(|c| ClassJson {
                    name: c.name,
                    parent: c.parent,
                    examples: c.examples,
                    is_parent: c.is_parent,
                })
                .collect(),
            head,
            head_version,
            model: l.model,
        }
    }
}

/// A photo that did not become an example; the rest of its upload went on.
#[derive(Debug, Serialize, ToSchema)]
pub struct RejectedJson {
    /// The part's file name (or field name).
    pub file: String,
    pub code: String,
    pub message: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EnrolledJson {
    /// The class name as stored (Unicode NFC).
    pub class: String,
    pub parent: Option<String>,
    pub accepted: u32,
    /// Accepted photos whose embedding was already stored (no backbone pass).
    pub cached: u32,
    pub rejected: Vec<RejectedJson>,
    /// Examples of the class after this upload.
    pub examples: u32,
    pub head: Option<String>,
    pub head_version: Option<u64>,
    /// With `wait=true`: milliseconds from the last photo to the trained head being live.
    pub time_to_live_ms: Option<u64>,
    /// The class's leave-one-out accuracy (0..1) among the tenant's classes (see
    /// `/v1/report`); null below two photos or with no other class.
    pub estimated_accuracy: Option<f32>,
}

impl From<Enrolled> for EnrolledJson {
    fn from(e: Enrolled) -> Self {
        let (head, head_version) = head_fields(e.head);
        Self {
            class: e.class_name,
            parent: e.parent,
            accepted: e.accepted,
            cached: e.cached,
            rejected: e
                .rejected
                .into_iter()
                .map(|r| RejectedJson {
                    file: r.id,
                    code: taxon_proto::code_name(r.error.code()).to_string(),
                    message: r.error.to_string(),
                })
                .collect(),
            examples: e.examples,
            head,
            head_version,
            time_to_live_ms: e
                .time_to_live
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            estimated_accuracy: e.estimate,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChildJson {
    pub name: String,
    /// The head's probability for this child among the tenant's children.
    pub probability: f32,
    pub parent: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ParentJson {
    pub name: String,
    pub probability: f32,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClassifiedJson {
    /// `child`: the best child is clear; `parent`: children too close to call, the parent
    /// alone; `unknown`: the photo matches none of the tenant's classes.
    pub decision: String,
    /// The child's or the parent's name; `null` for `unknown`.
    pub label: Option<String>,
    /// The label's probability (the best child's for `unknown`).
    pub probability: f32,
    /// Most probable first, at most `top_k`.
    pub children: Vec<ChildJson>,
    /// The most probable group (a parent, or a top-level class scoring for itself).
    pub parent: ParentJson,
    /// Highest uncentred cosine to a class mean, what the unknown decision compares with the
    /// tenant's own cut-off.
    pub similarity: f32,
    pub head: String,
    pub head_version: u64,
}

impl From<ClassScore> for ChildJson {
    fn from(s: ClassScore) -> Self {
        Self {
            name: s.name,
            probability: s.probability,
            parent: s.parent,
        }
    }
}

impl From<Classification> for ClassifiedJson {
    fn from(c: Classification) -> Self {
        let (decision, label) = match c.label {
            Label::Child(name) => ("child", Some(name)),
            Label::Parent(name) => ("parent", Some(name)),
            Label::Unknown => ("unknown", None),
        };
        Self {
            decision: decision.to_string(),
            label,
            probability: c.probability,
            children: c.children.into_iter().map(Into::into).collect(),
            parent: ParentJson {
                name: c.parent.name,
                probability: c.parent.probability,
            },
            similarity: c.similarity,
            head: c.head.kind,
            head_version: c.head.version,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct RenameJson {
    pub new_name: String,
}

/// The head answering after a rename or remove.
#[derive(Debug, Serialize, ToSchema)]
pub struct HeadJson {
    pub head: Option<String>,
    pub head_version: Option<u64>,
}

impl From<Option<HeadRef>> for HeadJson {
    fn from(h: Option<HeadRef>) -> Self {
        let (head, head_version) = head_fields(h);
        Self { head, head_version }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RemovedJson {
    /// The classes removed (a parent's children too, when recursive).
    pub classes: Vec<String>,
    pub examples: u32,
    pub head: Option<String>,
    pub head_version: Option<u64>,
}

impl From<Removed> for RemovedJson {
    fn from(r: Removed) -> Self {
        let (head, head_version) = head_fields(r.head);
        Self {
            classes: r.classes,
            examples: r.examples,
            head,
            head_version,
        }
    }
}

/// What a client (the page) needs to know before it sends anything.
#[derive(Debug, Serialize, ToSchema)]
pub struct InfoJson {
    pub model: Option<String>,
    /// The largest photo accepted (ours or the feature-server's, the lower).
    pub max_photo_bytes: usize,
    pub max_photos_per_enroll: usize,
    /// The largest request body (one upload of many photos).
    pub max_body_bytes: usize,
    /// The head kind made live once trained.
    pub default_head: String,
    /// Whether requests need `Authorization: Bearer <token>` (otherwise `X-Tenant` decides).
    pub tokens: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProbeJson {
    /// `ok` (alive) or `ready` (a feature-server answers).
    pub status: String,
    pub model: Option<String>,
}
