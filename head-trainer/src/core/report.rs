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
/// What every Enroll reply carries, so it streams over the snapshot's rows with no copy of
/// them: the same arithmetic as [`quality::leave_one_out`] (tested equal below), holding
/// only the class sums.
pub fn class_estimate(snap: &Snapshot, class: &str) -> Result<Option<f32>> {
    let Some(id) = snap.taxonomy.by_name(class).map(|c| c.id) else {
        return Ok(None);
    };
    let Some(dim) = snap.examples.first().map(|e| e.1.len()) else {
        return Ok(None);
    };
    if snap.examples.iter().any(|e| e.1.len() != dim) {
        return Err(Error::Corrupt("embeddings of different lengths".into()));
    }
    let mut mean = vec![0f64; dim];
    for (_, v) in &snap.examples {
        for (m, &x) in mean.iter_mut().zip(v) {
            *m += f64::from(x);
        }
    }
    let n = snap.examples.len() as f64;
    let mean: Vec<f32> = mean.iter().map(|m| (m / n) as f32).collect();
    // The unit-length centred row, in `out`.
    let unit = |v: &[f32], out: &mut Vec<f32>| {
        out.clear();
        out.extend(v.iter().zip(&mean).map(|(x, m)| x - m));
        let norm = out.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        out.iter_mut().for_each(|x| *x /= norm);
    };
    let mut sums: std::collections::BTreeMap<u64, (u32, Vec<f32>)> = Default::default();
    let mut row = Vec::with_capacity(dim);
    for (c, v) in &snap.examples {
        unit(v, &mut row);
        let (count, sum) = sums.entry(*c).or_insert_with(|| (0, vec![0.0; dim]));
        *count += 1;
        sum.iter_mut().zip(&row).for_each(|(s, x)| *s += x);
    }
    let own_count = sums.get(&id).map_or(0, |(count, _)| *count);
    if own_count < 2 || sums.len() < 2 {
        return Ok(None);
    }
    let norms: Vec<(u64, f32, &Vec<f32>)> = sums
        .iter()
        .map(|(&c, (_, s))| (c, s.iter().map(|x| x * x).sum::<f32>().sqrt(), s))
        .collect();
    let (mut right, mut checked) = (0u32, 0u32);
    for (c, v) in snap.examples.iter().filter(|e| e.0 == id) {
        unit(v, &mut row);
        let dot = |s: &[f32]| s.iter().zip(&row).map(|(a, b)| a * b).sum::<f32>();
        let mut own_sim = 0.0;
        let mut best_other = f32::NEG_INFINITY;
        for &(k, norm, sum) in &norms {
            let d = dot(sum);
            if k == *c {
                let own_norm = (norm * norm - 2.0 * d + 1.0).max(0.0).sqrt();
                own_sim = if own_norm > 1e-6 {
                    (d - 1.0) / own_norm
                } else {
                    0.0
                };
            } else if norm > 1e-6 {
                best_other = best_other.max(d / norm);
            }
        }
        checked += 1;
        right += u32::from(best_other <= own_sim);
    }
    Ok((checked > 0).then(|| right as f32 / checked as f32))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::taxonomy::{ClassEntry, Taxonomy};

    /// The streamed estimate equals the report's leave-one-out for the same class.
    #[test]
    fn the_enroll_estimate_is_the_report_s_number() {
        let mut taxonomy = Taxonomy::default();
        for (id, name) in [(1u64, "a"), (2, "b"), (3, "c")] {
            taxonomy.classes.insert(
                id,
                ClassEntry {
                    id,
                    name: name.into(),
                    parent: None,
                    examples: 0,
                },
            );
        }
        // a: three along x, one stray along y (b's direction); b: three along y; c: one.
        let rows: Vec<(u64, Vec<f32>)> = vec![
            (1, vec![1.0, 0.1, 0.0]),
            (1, vec![0.9, 0.0, 0.2]),
            (1, vec![1.0, 0.2, 0.1]),
            (1, vec![0.1, 1.0, 0.0]),
            (2, vec![0.0, 1.0, 0.1]),
            (2, vec![0.2, 0.9, 0.0]),
            (2, vec![0.1, 1.0, 0.2]),
            (3, vec![0.0, 0.1, 1.0]),
        ];
        let snap = Snapshot {
            taxonomy,
            hashes: vec![[0; 32]; rows.len()],
            examples: rows,
        };
        let report = report(&snap, "m", 10).unwrap();
        let a = report.classes.iter().find(|c| c.name == "a").unwrap();
        assert_eq!(a.accuracy, Some(0.75));
        assert_eq!(class_estimate(&snap, "a").unwrap(), Some(0.75));
        assert_eq!(class_estimate(&snap, "b").unwrap(), Some(1.0));
        assert_eq!(class_estimate(&snap, "c").unwrap(), None, "one example");
        assert_eq!(class_estimate(&snap, "nope").unwrap(), None);
    }
}
