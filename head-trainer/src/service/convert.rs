//! Proto <-> domain: the only place that knows both the wire messages and the core's types,
//! so the wire's conventions (empty string for "none", 0 for "no version") stop here.

use taxon_proto::v1 as pb;

use crate::Result;
use crate::core::{
    ClassList, ClassScore, Classification, EnrollStart, Enrolled, HeadRef, Imported, Label,
    QualityReport, Removed, Trained,
};
use crate::heads::HeadKind;

/// `None` for the live head (the empty string), or the kind named on the wire.
pub fn head_kind(s: &str) -> Result<Option<HeadKind>> {
    if s.is_empty() {
        Ok(None)
    } else {
        s.parse().map(Some)
    }
}

fn none_if_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl From<pb::EnrollStart> for EnrollStart {
    fn from(s: pb::EnrollStart) -> Self {
        Self {
            class_name: s.class_name,
            parent: none_if_empty(s.parent),
            wait_for_head: s.wait_for_head,
        }
    }
}

fn version(head: Option<&HeadRef>) -> u64 {
    head.map_or(0, |h| h.version)
}

impl From<Enrolled> for pb::EnrollResponse {
    fn from(e: Enrolled) -> Self {
        Self {
            head_version: version(e.head.as_ref()),
            head: e.head.map(|h| h.kind).unwrap_or_default(),
            class_name: e.class_name,
            parent: e.parent.unwrap_or_default(),
            accepted: e.accepted,
            rejected: e
                .rejected
                .into_iter()
                .map(|r| pb::RejectedPhoto {
                    id: r.id,
                    code: r.error.code() as i32,
                    message: r.error.to_string(),
                })
                .collect(),
            cached: e.cached,
            examples: e.examples,
            time_to_live_ms: e
                .time_to_live
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            estimated_accuracy: e.estimate,
        }
    }
}

impl From<ClassScore> for pb::ClassScore {
    fn from(s: ClassScore) -> Self {
        Self {
            name: s.name,
            probability: s.probability,
            parent: s.parent.unwrap_or_default(),
        }
    }
}

impl From<Classification> for pb::ClassifyResponse {
    fn from(c: Classification) -> Self {
        let (decision, label) = match c.label {
            Label::Child(name) => (pb::Decision::Child, name),
            Label::Parent(name) => (pb::Decision::Parent, name),
            Label::Unknown => (pb::Decision::Unknown, String::new()),
        };
        Self {
            children: c.children.into_iter().map(Into::into).collect(),
            parent: Some(c.parent.into()),
            decision: decision as i32,
            label,
            probability: c.probability,
            head_version: c.head.version,
            head: c.head.kind,
            similarity: c.similarity,
            parent_branch: c.parent_branch.map(Into::into),
        }
    }
}

impl From<ClassList> for pb::ListClassesResponse {
    fn from(l: ClassList) -> Self {
        Self {
            classes: l
                .classes
                .into_iter()
                .map(|c| pb::ClassInfo {
                    name: c.name,
                    parent: c.parent.unwrap_or_default(),
                    examples: c.examples,
                    is_parent: c.is_parent,
                })
                .collect(),
            head_version: version(l.head.as_ref()),
            head: l.head.map(|h| h.kind).unwrap_or_default(),
            model: l.model.unwrap_or_default(),
        }
    }
}

impl From<Removed> for pb::RemoveClassResponse {
    fn from(r: Removed) -> Self {
        Self {
            removed_classes: r.classes,
            removed_examples: r.examples,
            head_version: version(r.head.as_ref()),
        }
    }
}

/// A rename's answer: the version of the head answering after it.
pub fn renamed(head: Option<HeadRef>) -> pb::RenameClassResponse {
    pb::RenameClassResponse {
        head_version: version(head.as_ref()),
    }
}

impl From<Trained> for pb::TrainResponse {
    fn from(t: Trained) -> Self {
        Self {
            head: t.kind.to_string(),
            head_version: t.version,
            train_ms: t.train_ms,
            classes: t.classes,
            examples: t.examples,
        }
    }
}

impl From<Imported> for pb::ImportResponse {
    fn from(i: Imported) -> Self {
        Self {
            head_version: version(i.head.as_ref()),
            head: i.head.map(|h| h.kind).unwrap_or_default(),
            model: i.model,
            classes: i.classes,
            examples: i.examples,
            heads: i.heads,
        }
    }
}

impl From<QualityReport> for pb::ReportResponse {
    fn from(r: QualityReport) -> Self {
        Self {
            accuracy: r.accuracy(),
            classes: r
                .classes
                .into_iter()
                .map(|c| {
                    let (confused_with, confused_count) = c.confused_with.unwrap_or_default();
                    pb::ClassQuality {
                        name: c.name,
                        parent: c.parent.unwrap_or_default(),
                        examples: c.examples,
                        accuracy: c.accuracy,
                        confused_with,
                        confused_count,
                        needs_more_photos: c.needs_more_photos,
                    }
                })
                .collect(),
            confused: r
                .confused
                .into_iter()
                .map(|p| pb::ConfusedPair {
                    a: p.a,
                    b: p.b,
                    a_taken_for_b: p.a_as_b,
                    b_taken_for_a: p.b_as_a,
                })
                .collect(),
            suspects: r
                .suspects
                .into_iter()
                .map(|s| pb::SuspectPhoto {
                    sha256: s.sha256_hex(),
                    class_name: s.class,
                    nearer_class: s.nearer,
                    own_similarity: s.own_similarity,
                    nearer_similarity: s.nearer_similarity,
                })
                .collect(),
            checked: r.checked,
            model: r.model,
            method: crate::core::report::METHOD.to_string(),
        }
    }
}
