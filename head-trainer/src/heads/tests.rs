//! Head tests on synthetic, separable embeddings: each kind learns, training is
//! reproducible, warm starts keep old classes right, heads survive (de)serialisation and
//! refuse another model's embeddings.

use rand::{Rng, SeedableRng, rngs::StdRng};

use super::*;

pub(super) const M: &str = "test@sha256:00";
pub(super) const DIM: usize = 32;

/// `per` noisy points around one random centre per class; class c's group is c / 2 + 100.
pub(super) fn blobs(classes: usize, per: usize, seed: u64) -> Vec<(u64, Vec<f32>)> {
    let mut rng = StdRng::seed_from_u64(seed);
    let centres: Vec<Vec<f32>> = (0..classes)
        .map(|c| {
            let mut centre_rng = StdRng::seed_from_u64(1000 + c as u64);
            (0..DIM)
                .map(|_| centre_rng.random_range(0.0..4.0))
                .collect()
        })
        .collect();
    let mut rows = Vec::new();
    for (c, centre) in centres.iter().enumerate() {
        for _ in 0..per {
            rows.push((
                c as u64,
                centre
                    .iter()
                    .map(|x| x + rng.random_range(-0.5..0.5))
                    .collect(),
            ));
        }
    }
    rows
}

pub(super) fn group(c: u64) -> u64 {
    c / 2 + 100
}

pub(super) fn accuracy(head: &Head, rows: &[(u64, Vec<f32>)]) -> f32 {
    let right = rows
        .iter()
        .filter(|(c, x)| {
            let p = head.predict(M, x).unwrap().probs;
            let best = p
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0;
            head.meta.classes[best] == *c
        })
        .count();
    right as f32 / rows.len() as f32
}

#[test]
fn every_kind_learns_a_separable_problem() {
    let train = TrainSet::new(M, &blobs(6, 5, 1), group).unwrap();
    let test = blobs(6, 20, 2);
    for kind in HeadKind::ALL {
        let head = Head::train(kind, &train, None, &TrainOptions::default()).unwrap();
        let acc = accuracy(&head, &test);
        assert!(acc > 0.95, "{kind}: accuracy {acc}");
        let p = head.predict(M, &test[0].1).unwrap();
        assert!((p.probs.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        if kind == HeadKind::Hierarchical {
            let pb = p.parent_branch.unwrap();
            assert_eq!(pb.len(), 3);
            let best = pb
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0;
            assert_eq!(head.meta.groups[best], group(test[0].0));
        }
    }
}

#[test]
fn training_is_reproducible() {
    let train = TrainSet::new(M, &blobs(4, 3, 3), group).unwrap();
    for kind in [
        HeadKind::Flat,
        HeadKind::Hierarchical,
        HeadKind::Combined,
        HeadKind::Lda,
    ] {
        let opts = TrainOptions {
            seed: 7,
            ..TrainOptions::default()
        };
        let a = Head::train(kind, &train, None, &opts).unwrap();
        let b = Head::train(kind, &train, None, &opts).unwrap();
        let x = &blobs(4, 1, 9)[0].1;
        assert_eq!(
            a.predict(M, x).unwrap().probs,
            b.predict(M, x).unwrap().probs,
            "{kind}"
        );
    }
}

#[test]
fn warm_start_keeps_old_classes_right() {
    let old_rows = blobs(4, 5, 4);
    let old = TrainSet::new(M, &old_rows, group).unwrap();
    let mut all = old_rows.clone();
    all.extend(blobs(6, 5, 5).into_iter().filter(|(c, _)| *c >= 4));
    let new = TrainSet::new(M, &all, group).unwrap();
    let test = blobs(6, 10, 6);
    for kind in [HeadKind::Flat, HeadKind::Hierarchical, HeadKind::Combined] {
        let first = Head::train(kind, &old, None, &TrainOptions::default()).unwrap();
        let opts = TrainOptions {
            max_steps: 30,
            ..TrainOptions::default()
        };
        let warm = Head::train(kind, &new, Some(&first), &opts).unwrap();
        assert_eq!(warm.meta.classes.len(), 6);
        let old_test: Vec<_> = test.iter().filter(|(c, _)| *c < 4).cloned().collect();
        assert!(
            accuracy(&warm, &old_test) > 0.95,
            "{kind}: old classes forgotten"
        );
        assert!(
            accuracy(&warm, &test) > 0.9,
            "{kind}: new classes not learnt"
        );
    }
}

#[test]
fn heads_round_trip_and_refuse_other_models() {
    let train = TrainSet::new(M, &blobs(3, 4, 8), group).unwrap();
    let x = &blobs(3, 1, 11)[2].1;
    for kind in HeadKind::ALL {
        let mut head = Head::train(kind, &train, None, &TrainOptions::default()).unwrap();
        head.meta.version = 42;
        let back = Head::from_bytes(&head.to_bytes().unwrap()).unwrap();
        assert_eq!(back.meta.version, 42);
        assert_eq!(back.kind(), kind);
        assert_eq!(
            back.predict(M, x).unwrap().probs,
            head.predict(M, x).unwrap().probs
        );
        let e = head.predict("resnet18@sha256:ff", x).unwrap_err();
        assert!(matches!(e, Error::ModelMismatch { .. }), "{kind}: {e}");
    }
}

#[test]
fn prototype_similarity_separates_known_from_unknown() {
    let train = TrainSet::new(M, &blobs(4, 5, 12), group).unwrap();
    let head = Head::train(HeadKind::Prototype, &train, None, &TrainOptions::default()).unwrap();
    let known = head
        .predict(M, &blobs(4, 1, 13)[0].1)
        .unwrap()
        .similarity
        .unwrap();
    // A point pointing away from every class once centred.
    let mean: Vec<f32> = (0..DIM)
        .map(|i| train.x.iter().skip(i).step_by(DIM).sum::<f32>() / train.len() as f32)
        .collect();
    let far: Vec<f32> = mean
        .iter()
        .enumerate()
        .map(|(i, m)| m + if i % 2 == 0 { 3.0 } else { -3.0 })
        .collect();
    let unknown = head.predict(M, &far).unwrap().similarity.unwrap();
    assert!(known > 0.8, "known {known}");
    assert!(unknown < known - 0.3, "unknown {unknown} vs known {known}");
}

/// Two classes with the very same examples: nearest class mean cannot tell them apart and
/// says so (an even split), which is what lets the decision back off to their parent.
/// (Trained heads are not asserted: Adam normalises a gradient that is zero up to f32
/// cancellation into a full step, so they pick a side; see the README's open items.)
#[test]
fn identical_examples_in_two_classes_split_evenly_under_the_prototype() {
    let mut rows = blobs(4, 4, 20);
    let twins: Vec<_> = rows
        .iter()
        .filter(|(c, _)| *c == 0)
        .map(|(_, x)| (9u64, x.clone()))
        .collect();
    rows.extend(twins);
    let train = TrainSet::new(M, &rows, group).unwrap();
    let probe = &blobs(4, 1, 21)[0].1;
    let head = Head::train(HeadKind::Prototype, &train, None, &TrainOptions::default()).unwrap();
    let p = head.predict(M, probe).unwrap().probs;
    let a = p[head.meta.classes.iter().position(|&c| c == 0).unwrap()];
    let b = p[head.meta.classes.iter().position(|&c| c == 9).unwrap()];
    assert!((a - b).abs() < 1e-5 && a > 0.4, "{a} vs {b}");
}

#[test]
fn a_carried_layer_computes_the_same_function_under_the_new_standardizer() {
    let rows = blobs(6, 4, 3);
    let flat: Vec<f32> = rows.iter().flat_map(|(_, x)| x.clone()).collect();
    let x = Tensor::from_vec(flat, (rows.len(), DIM), &Device::Cpu).unwrap();
    // The first job saw one class only (degenerate mean and scale); the next one sees all.
    let old = Standardizer::fit(&x.narrow(0, 0, 4).unwrap()).unwrap();
    let new = Standardizer::fit(&x).unwrap();
    assert!(
        new.scale > 2.0 * old.scale,
        "the two standardizers should differ"
    );
    let mut rng = StdRng::seed_from_u64(9);
    let w: Vec<f32> = (0..5 * DIM).map(|_| rng.random_range(-1.0..1.0)).collect();
    let w = Tensor::from_vec(w, (5, DIM), &Device::Cpu).unwrap();
    let b = Tensor::new(&[0.5f32, -1.0, 0.0, 2.0, 1.5], &Device::Cpu).unwrap();
    let before = train::linear(&old.apply(&x).unwrap(), &w, &b).unwrap();
    let (w2, b2) = old.carry_layer(&new, &w, &b).unwrap();
    let after = train::linear(&new.apply(&x).unwrap(), &w2, &b2).unwrap();
    let max_abs = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let worst = max_abs(&(before - &after).unwrap());
    let size = max_abs(&after);
    assert!(
        worst <= 1e-4 * size.max(1.0),
        "worst difference {worst} (size {size})"
    );
}
