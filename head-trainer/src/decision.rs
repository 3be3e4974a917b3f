//! From a head's probabilities to an answer: the child, the parent alone (back-off), or
//! unknown (open-set rejection). Pure functions over numbers, so the rules are tested
//! without any model.
//!
//! The rules, in order:
//! 1. unknown: the image's highest cosine to a class mean (uncentred, see
//!    `heads::prototype::OpenSet`) is below `unknown_similarity`: the image resembles none of
//!    the tenant's classes. The caller passes the tenant's own cut-off there once it has one
//!    (the similarity 95 % of its own photos reach), the server's `--unknown-similarity`
//!    before. Skipped with a single class;
//! 2. child: the best child has more than `child_min_probability` (strictly: two children
//!    tied at 0.5 are exactly the case to back off from);
//! 3. parent: otherwise, when the best parent (its children's probabilities summed) is a real
//!    parent and has at least `parent_min_probability`: the children are too close to call,
//!    the parent is not;
//! 4. child anyway (low confidence; the probability says so).
//!
//! The defaults (`client eval --open-set` measures them, docs/evaluation.md):
//! - `unknown_similarity` 0.65, the fallback for tenants without a cut-off of their own (one
//!   photo per class), chosen on pets at k = 1 (keeps 99 % of the tenant's own photos,
//!   answers UNKNOWN for 93 % of bird photos) and checked on birds at k = 1 (keeps 100 %,
//!   rejects 88 % of pet photos: short of 90 %; no single value reaches both there);
//! - `child_min_probability` 0.5 and `parent_min_probability` 0.7: of the photos whose best
//!   child is wrong, about a third are answered with their parent (right 95-99 % of the time)
//!   or UNKNOWN instead, at the price of 3-9 % of right children withheld.

use std::collections::BTreeMap;

/// Thresholds of the rules above.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholds {
    pub unknown_similarity: f32,
    pub child_min_probability: f32,
    pub parent_min_probability: f32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            unknown_similarity: 0.65,
            child_min_probability: 0.5,
            parent_min_probability: 0.7,
        }
    }
}

/// One child's probability and the group (parent, or itself when top-level) it counts toward.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scored {
    pub class: u64,
    pub group: u64,
    pub probability: f32,
}

/// What was decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Child(u64),
    Parent(u64),
    Unknown,
}

/// The decision together with the ranked evidence it was made from.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub decision: Decision,
    /// Probability of the label (of the best child for `Unknown`).
    pub probability: f32,
    /// Children, most probable first.
    pub ranked: Vec<Scored>,
    /// The most probable group and its summed probability.
    pub best_group: (u64, f32),
}

/// Applies the rules. `is_parent(group)` tells whether a group is a real parent class (and
/// not a top-level leaf scoring for itself). `probs` must not be empty.
pub fn decide(
    probs: &[Scored],
    similarity: Option<f32>,
    is_parent: impl Fn(u64) -> bool,
    t: &Thresholds,
) -> Outcome {
    let mut ranked = probs.to_vec();
    ranked.sort_by(|a, b| {
        b.probability
            .total_cmp(&a.probability)
            .then(a.class.cmp(&b.class))
    });
    let mut groups: BTreeMap<u64, f32> = BTreeMap::new();
    for s in &ranked {
        *groups.entry(s.group).or_default() += s.probability;
    }
    let best_group = groups
        .iter()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(a.0)))
        .map(|(&g, &p)| (g, p))
        .unwrap_or((0, 0.0));
    let best = ranked.first().copied().unwrap_or(Scored {
        class: 0,
        group: 0,
        probability: 0.0,
    });
    let decision = if ranked.len() > 1 && similarity.is_some_and(|s| s < t.unknown_similarity) {
        Decision::Unknown
    } else if best.probability > t.child_min_probability {
        Decision::Child(best.class)
    } else if is_parent(best_group.0) && best_group.1 >= t.parent_min_probability {
        Decision::Parent(best_group.0)
    } else {
        Decision::Child(best.class)
    };
    let probability = match decision {
        Decision::Parent(_) => best_group.1,
        _ => best.probability,
    };
    Outcome {
        decision,
        probability,
        ranked,
        best_group,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(class: u64, group: u64, probability: f32) -> Scored {
        Scored {
            class,
            group,
            probability,
        }
    }

    const DOGS: u64 = 100;

    #[test]
    fn clear_child_wins() {
        let p = [s(1, DOGS, 0.8), s(2, DOGS, 0.1), s(3, 3, 0.1)];
        let o = decide(&p, Some(0.9), |g| g == DOGS, &Thresholds::default());
        assert_eq!(o.decision, Decision::Child(1));
        assert!((o.probability - 0.8).abs() < 1e-6);
        assert_eq!(o.best_group.0, DOGS);
        assert!((o.best_group.1 - 0.9).abs() < 1e-6);
    }

    #[test]
    fn close_children_back_off_to_parent() {
        let p = [s(1, DOGS, 0.45), s(2, DOGS, 0.44), s(3, 3, 0.11)];
        let o = decide(&p, Some(0.9), |g| g == DOGS, &Thresholds::default());
        assert_eq!(o.decision, Decision::Parent(DOGS));
        assert!((o.probability - 0.89).abs() < 1e-6);
    }

    #[test]
    fn an_even_split_backs_off() {
        let p = [s(1, DOGS, 0.5), s(2, DOGS, 0.5)];
        let o = decide(&p, Some(0.9), |g| g == DOGS, &Thresholds::default());
        assert_eq!(o.decision, Decision::Parent(DOGS));
    }

    #[test]
    fn no_back_off_to_a_top_level_leaf_or_a_weak_parent() {
        // Best group is a top-level class scoring for itself: not a parent.
        let p = [s(1, 1, 0.45), s(2, 2, 0.44), s(3, 3, 0.11)];
        let o = decide(&p, Some(0.9), |_| false, &Thresholds::default());
        assert_eq!(o.decision, Decision::Child(1));
        // A parent that is itself unsure.
        let p = [s(1, DOGS, 0.35), s(2, DOGS, 0.3), s(3, 3, 0.35)];
        let o = decide(&p, Some(0.9), |g| g == DOGS, &Thresholds::default());
        assert_eq!(o.decision, Decision::Child(1));
    }

    #[test]
    fn far_from_every_class_is_unknown() {
        let p = [s(1, DOGS, 0.9), s(2, DOGS, 0.1)];
        let o = decide(&p, Some(0.05), |g| g == DOGS, &Thresholds::default());
        assert_eq!(o.decision, Decision::Unknown);
        assert!((o.probability - 0.9).abs() < 1e-6);
        // Without a similarity (a head that has none) there is no rejection.
        let o = decide(&p, None, |g| g == DOGS, &Thresholds::default());
        assert_eq!(o.decision, Decision::Child(1));
        // A single class never rejects: centring leaves nothing to compare.
        let o = decide(&p[..1], Some(0.0), |g| g == DOGS, &Thresholds::default());
        assert_eq!(o.decision, Decision::Child(1));
    }

    #[test]
    fn ties_are_broken_deterministically() {
        let p = [s(2, 2, 0.5), s(1, 1, 0.5)];
        let o = decide(&p, None, |_| false, &Thresholds::default());
        assert_eq!(o.decision, Decision::Child(1));
    }
}
