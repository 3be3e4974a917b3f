//! Report: how well a tenant's classes are learned, from its cached embeddings alone (the
//! arithmetic is [`crate::quality`]); and the one-class estimate an Enroll reply carries.

use super::{Caller, ClassReport, Confusion, Core, QualityReport, Suspect};
use crate::quality::{self, Checked};
use crate::store::Snapshot;
use crate::{Error, Result};

/// How the report's numbers are made, for people reading it (every face says the same).
pub const METHOD: &str = "leave-one-out nearest class mean on the cached embeddings (centred \
    by the tenant's mean, unit length): each photo classified by the class means computed \
    without it";

/// Suspect photos listed when the caller asks for no particular number.
pub const DEFAULT_SUSPECTS: usize = 20;
/// Confused pairs listed at most.
const MAX_PAIRS: usize = 20;

/// A snapshot's examples as indices: leaf class ids in order, and each row's index into them.
struct Indexed {
    ids: Vec<u64>,
    y: Vec<u32>,
    x: Vec<f32>,
    dim: usize,
}

fn indexed(snap: &Snapshot) -> Indexed {
    let mut ids: Vec<u64> = snap.examples.iter().map(|e| e.0).collect();
    ids.sort_unstable();
    ids.dedup();
    let dim = snap.examples.first().map_or(0, |e| e.1.len());
    let mut x = Vec::with_capacity(snap.examples.len() * dim);
    let mut y = Vec::with_capacity(snap.examples.len());
    for (id, v) in &snap.examples {
        y.push(ids.binary_search(id).unwrap_or(0) as u32);
        x.extend_from_slice(v);
    }
    Indexed { ids, y, x, dim }
}

/// The report over every example of `snap`, at most `max_suspects` suspects listed.
pub fn report(snap: &Snapshot, model: &str, max_suspects: usize) -> Result<QualityReport> {
    if snap
        .examples
        .iter()
        .any(|e| e.1.len() != snap.examples[0].1.len())
    {
        return Err(Error::Corrupt("embeddings of different lengths".into()));
    }
    let ix = indexed(snap);
    let checks = quality::leave_one_out(&ix.x, ix.dim, &ix.y, ix.ids.len())?;
    let q = quality::summarize(&checks, &ix.y, ix.ids.len());
    let tax = &snap.taxonomy;
    let name = |i: u32| tax.name(ix.ids[i as usize]).to_string();
    let mut classes: Vec<ClassReport> = q
        .classes
        .iter()
        .map(|c| ClassReport {
            name: name(c.class),
            parent: tax.parent_of(ix.ids[c.class as usize]).map(str::to_string),
            examples: c.examples,
            accuracy: c.accuracy(),
            confused_with: c.confused_with.map(|(k, n)| (name(k), n)),
            needs_more_photos: c.needs_more_photos(),
        })
        .collect();
    classes.sort_by(|a, b| (&a.parent, &a.name).cmp(&(&b.parent, &b.name)));
    let confused = q
        .pairs
        .iter()
        .take(MAX_PAIRS)
        .map(|p| Confusion {
            a: name(p.a),
            b: name(p.b),
            a_as_b: p.a_as_b,
            b_as_a: p.b_as_a,
        })
        .collect();
    let suspects = q
        .suspects
        .iter()
        .take(max_suspects)
        .filter_map(|c: &Checked| {
            let (nearer, sim) = c.nearest_other?;
            Some(Suspect {
                class: name(c.class),
                hash: snap.hashes.get(c.row).copied()?,
                nearer: name(nearer),
                own_similarity: c.own,
                nearer_similarity: sim,
            })
        })
        .collect();
    Ok(QualityReport {
        classes,
        confused,
        suspects,
        checked: q.checked,
        right: q.right,
        model: model.to_string(),
    })
}

/// Leave-one-out accuracy of the class named `class` among all of `snap`'s classes: `None`
/// while it has fewer than two examples (or the tenant one class: nothing to confuse it with).
pub fn class_estimate(snap: &Snapshot, class: &str) -> Result<Option<f32>> {
    let Some(id) = snap.taxonomy.by_name(class).map(|c| c.id) else {
        return Ok(None);
    };
    let ix = indexed(snap);
    let Ok(index) = ix.ids.binary_search(&id) else {
        return Ok(None);
    };
    if ix.ids.len() < 2 {
        return Ok(None);
    }
    let checks = quality::leave_one_out_of(&ix.x, ix.dim, &ix.y, ix.ids.len(), index as u32)?;
    if checks.is_empty() {
        return Ok(None);
    }
    let right = checks.iter().filter(|c| c.right()).count();
    Ok(Some(right as f32 / checks.len() as f32))
}

impl Core {
    /// The tenant's quality report (see [`crate::quality`]); `max_suspects` 0 lists
    /// [`DEFAULT_SUSPECTS`].
    pub async fn report(&self, caller: &Caller, max_suspects: usize) -> Result<QualityReport> {
        self.admit(caller)?;
        let model = self.model()?;
        let max = if max_suspects == 0 {
            DEFAULT_SUSPECTS
        } else {
            max_suspects
        };
        let _one_at_a_time = self
            .reports
            .acquire()
            .await
            .map_err(|_| Error::ShuttingDown)?;
        let (t, m) = (caller.tenant.clone(), model.id.clone());
        self.blocking("report", move |store| {
            let snap = store.snapshot(&t, Some(&m))?;
            if snap.examples.is_empty() {
                return Err(Error::NoClasses(t));
            }
            report(&snap, &m, max)
        })
        .await
    }
}
