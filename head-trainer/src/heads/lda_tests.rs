//! Tests of the `lda` head: it picks LDA where a shared anisotropic covariance hides the
//! classes from cosine, is right on easy data, solves the same system both ways, survives
//! serialisation, is deterministic, and falls back to nearest class mean (or a clear error)
//! on degenerate tenants. Plus an ignored timing test at the sizes a tenant reaches.

use rand::{Rng, SeedableRng, rngs::StdRng};

use super::lda::{self, Config, FALLBACK, Form, Lda, Model, Power};
use super::lda_cv;
use super::tests::{DIM, M, accuracy, blobs, group};
use super::*;

/// A standard normal draw (Box-Muller; no extra crate for tests).
fn normal(rng: &mut StdRng) -> f32 {
    let u: f64 = rng.random_range(f64::EPSILON..1.0);
    let v: f64 = rng.random_range(0.0..1.0);
    ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
}

/// Gaussian classes sharing one anisotropic covariance: the first `loud` (2) dimensions carry
/// noise of std 4 and no signal; the others carry the class means (std `spread`, 0.25) under
/// noise of std 0.3. (Cosine on this data is about 38 % right, LDA about 96 %.) An offset keeps every value positive, as post-ReLU embeddings are.
pub(super) fn anisotropic(
    classes: usize,
    per: usize,
    dim: usize,
    seed: u64,
) -> Vec<(u64, Vec<f32>)> {
    let (loud, loud_sd, spread) = (2, 4.0, 0.25);
    let mut centre_rng = StdRng::seed_from_u64(77);
    let centres: Vec<Vec<f32>> = (0..classes)
        .map(|_| {
            (0..dim)
                .map(|j| {
                    if j < loud {
                        0.0
                    } else {
                        spread * normal(&mut centre_rng)
                    }
                })
                .collect()
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut rows = Vec::new();
    for (c, centre) in centres.iter().enumerate() {
        for _ in 0..per {
            let x = centre
                .iter()
                .enumerate()
                .map(|(j, m)| {
                    let sd = if j < loud { loud_sd } else { 0.3 };
                    30.0 + m + sd * normal(&mut rng)
                })
                .collect();
            rows.push((c as u64, x));
        }
    }
    rows
}

fn lda_of(head: &Head) -> &Lda {
    match &head.net {
        Net::Lda(l) => l,
        _ => panic!("not an lda head"),
    }
}

fn opts() -> TrainOptions {
    TrainOptions::default()
}

#[test]
fn the_grid_is_in_the_spec_order() {
    let g = lda::grid();
    assert_eq!(g.len(), 12);
    assert_eq!(
        g[0],
        Config {
            power: Power::Sqrt,
            model: Model::Lda(1.0)
        }
    );
    assert_eq!(
        g[5],
        Config {
            power: Power::Sqrt,
            model: Model::Ncm
        }
    );
    assert_eq!(
        g[10],
        Config {
            power: Power::Identity,
            model: Model::Lda(100.0)
        }
    );
    assert_eq!(g[11].model, Model::Ncm);
}

/// (a) The covariance hides the classes from cosine; CV must find LDA, and LDA must beat the
/// prototype head (plain centred NCM) clearly on fresh photos.
#[test]
fn cross_validation_picks_lda_where_the_covariance_matters() {
    let dim = 48;
    let train = TrainSet::new(M, &anisotropic(8, 10, dim, 1), group).unwrap();
    let test = anisotropic(8, 40, dim, 2);
    let lda = Head::train(HeadKind::Lda, &train, None, &opts()).unwrap();
    let ncm = Head::train(HeadKind::Prototype, &train, None, &opts()).unwrap();
    let (a_lda, a_ncm) = (accuracy(&lda, &test), accuracy(&ncm, &test));
    let chosen = lda_of(&lda).config;
    assert!(matches!(chosen.model, Model::Lda(_)), "{chosen:?}");
    assert!(
        a_lda > a_ncm + 0.2 && a_lda > 0.9,
        "lda {a_lda} vs ncm {a_ncm} ({chosen:?})"
    );
}

/// (b) Isotropic, well-separated classes: every prediction right, confidently.
#[test]
fn well_separated_classes_are_all_right() {
    let train = TrainSet::new(M, &blobs(6, 5, 1), group).unwrap();
    let head = Head::train(HeadKind::Lda, &train, None, &opts()).unwrap();
    let test = blobs(6, 20, 2);
    assert_eq!(accuracy(&head, &test), 1.0);
    let l = lda_of(&head);
    assert!(l.temperature > 0.0 && l.temperature.is_finite());
    for (c, x) in &test {
        let p = head.predict(M, x).unwrap();
        assert!((p.probs.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        let i = head.meta.classes.iter().position(|k| k == c).unwrap();
        assert!(p.probs[i] > 0.5, "{:?}", p.probs);
        // Confident, but no class rounded to nothing (see `lda::MAX_RUNNER_UP_NATS`).
        assert!(p.probs.iter().all(|&v| v > 0.0), "{:?}", p.probs);
        assert!(p.similarity.is_some());
    }
}

/// (c) Woodbury on the n x n Gram and the d x d covariance give the same P and b, with n
/// below d and above it, and with uneven class counts (b's correction for them is computed
/// from a different trace in each form).
#[test]
fn dual_and_primal_solves_agree() {
    for (classes, per, uneven) in [(5, 6, false), (10, 12, false), (5, 6, true), (10, 12, true)] {
        let mut rows = anisotropic(classes, per, DIM, 3);
        if uneven {
            // Class 0 keeps one photo, class 1 three.
            let mut kept = [0usize; 2];
            rows.retain(|(c, _)| match *c as usize {
                c @ 0..=1 => {
                    kept[c] += 1;
                    kept[c] <= [1, 3][c]
                }
                _ => true,
            });
        }
        let ts = TrainSet::new(M, &rows, group).unwrap();
        let (_, a) = lda::prepare(&ts.x_tensor().unwrap(), Power::Sqrt).unwrap();
        let gammas = [1.0, 10.0, 100.0];
        let dual = lda::lda_fit(&a, &ts.y, classes, &gammas, Form::Dual).unwrap();
        let primal = lda::lda_fit(&a, &ts.y, classes, &gammas, Form::Primal).unwrap();
        for ((d, p), g) in dual.iter().zip(&primal).zip(gammas) {
            let (d, p) = (d.as_ref().unwrap(), p.as_ref().unwrap());
            let max_abs = |t: &Tensor| {
                t.abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            for (x, y) in [(&d.p, &p.p), (&d.b, &p.b)] {
                let (scale, diff) = (max_abs(y), max_abs(&(x - y).unwrap()));
                assert!(
                    diff <= 1e-4 * scale,
                    "n = {}, uneven {uneven}, gamma {g}: {diff} of {scale}",
                    ts.len()
                );
            }
        }
    }
}

/// (d) Bytes and back: the same logits, bit for bit, and the same choice.
#[test]
fn serialisation_round_trip_keeps_the_logits() {
    let train = TrainSet::new(M, &anisotropic(5, 6, DIM, 4), group).unwrap();
    let head = Head::train(HeadKind::Lda, &train, None, &opts()).unwrap();
    let back = Head::from_bytes(&head.to_bytes().unwrap()).unwrap();
    back.check().unwrap();
    let (a, b) = (lda_of(&head), lda_of(&back));
    assert_eq!(a.config, b.config);
    assert_eq!(a.temperature, b.temperature);
    for (_, x) in anisotropic(5, 3, DIM, 5) {
        let x = Tensor::from_slice(&x, (1, DIM), &Device::Cpu).unwrap();
        let (la, sa) = a.logits(&x).unwrap();
        let (lb, sb) = b.logits(&x).unwrap();
        assert_eq!(la.to_vec2::<f32>().unwrap(), lb.to_vec2::<f32>().unwrap());
        assert_eq!(sa, sb);
    }
}

/// (e) The same photos and seed give the same head, tensor for tensor.
#[test]
fn two_fits_are_identical() {
    let train = TrainSet::new(M, &anisotropic(6, 7, DIM, 6), group).unwrap();
    let a = Head::train(HeadKind::Lda, &train, None, &opts()).unwrap();
    let b = Head::train(HeadKind::Lda, &train, None, &opts()).unwrap();
    let (ta, tb) = (a.tensors().unwrap(), b.tensors().unwrap());
    assert_eq!(ta.len(), tb.len());
    for (name, t) in &ta {
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(t), flat(&tb[name]), "{name}");
    }
    // Folds are stratified: each class's rows spread evenly over the folds.
    let folds = lda_cv::folds_of(&train.y, 6, 4, 0);
    for c in 0..6u32 {
        let mut per = [0usize; 4];
        for (i, &y) in train.y.iter().enumerate() {
            if y == c {
                per[folds[i]] += 1;
            }
        }
        assert_eq!(per, [2, 2, 2, 1], "class {c}");
    }
    // A class's only row is never held out.
    let y = [0, 0, 1, 2, 2, 2];
    assert_eq!(lda_cv::folds_of(&y, 3, 2, 0)[2], 2);
}

/// (f) A new class with a single photo beside classes with many: the tenant keeps its
/// cross-validated head (LDA on this data, far ahead of cosine), its temperature comes from
/// the other classes' photos left out, and the new class is recognised.
#[test]
fn one_photo_in_a_class_keeps_the_cross_validated_head() {
    let dim = 48;
    let mut rows = anisotropic(9, 10, dim, 1);
    let mut seen_new = 0;
    rows.retain(|(c, _)| {
        seen_new += usize::from(*c == 8);
        *c != 8 || seen_new == 1
    });
    let train = TrainSet::new(M, &rows, group).unwrap();
    let test = anisotropic(9, 40, dim, 2);
    let lda = Head::train(HeadKind::Lda, &train, None, &opts()).unwrap();
    let ncm = Head::train(HeadKind::Prototype, &train, None, &opts()).unwrap();
    let l = lda_of(&lda);
    assert!(matches!(l.config.model, Model::Lda(_)), "{:?}", l.config);
    assert!(l.temperature.is_finite() && l.temperature > 0.0);
    let (a_lda, a_ncm) = (accuracy(&lda, &test), accuracy(&ncm, &test));
    assert!(
        a_lda > a_ncm + 0.2 && a_lda > 0.85,
        "lda {a_lda} vs ncm {a_ncm}"
    );
    let new_class: Vec<_> = test.iter().filter(|(c, _)| *c == 8).cloned().collect();
    let (n_lda, n_ncm) = (accuracy(&lda, &new_class), accuracy(&ncm, &new_class));
    // Its one photo is a noisy mean; LDA without the few-photo correction of its bias (see
    // `lda::lda_fit`) got 0.25 of these 40 photos right, the prototype head 0.35, now 0.75.
    assert!(
        n_lda > 0.6 && n_lda > n_ncm,
        "the one-photo class: lda {n_lda} vs ncm {n_ncm}"
    );
}

/// (f') Fewer than two classes with a second photo: nothing to cross-validate, cosine NCM on
/// square-rooted rows at the fixed one-photo scale (no photo to leave out for a temperature
/// of its own), and still right on easy data.
#[test]
fn one_photo_a_class_falls_back_to_nearest_class_mean() {
    let all_single = blobs(4, 1, 31);
    let mut one_multi = blobs(4, 1, 31);
    one_multi.extend(blobs(4, 3, 30).into_iter().filter(|(c, _)| *c == 0));
    for rows in [all_single, one_multi] {
        let train = TrainSet::new(M, &rows, group).unwrap();
        let head = Head::train(HeadKind::Lda, &train, None, &opts()).unwrap();
        let l = lda_of(&head);
        assert_eq!(l.config, FALLBACK);
        let scale = lda::NCM_SCALE / f64::from(l.temperature);
        assert!(
            (scale - lda::ONE_PHOTO_SCALE).abs() < 1e-4,
            "cosines times {scale}"
        );
        assert!(accuracy(&head, &blobs(4, 10, 32)) > 0.95);
    }
}

/// Degenerate tenants: one class, one photo, all-zero rows give a head (no panic); a NaN
/// gives a clear error.
#[test]
fn degenerate_tenants_give_a_head_or_a_clear_error() {
    let one_class = TrainSet::new(M, &blobs(1, 4, 40), group).unwrap();
    let head = Head::train(HeadKind::Lda, &one_class, None, &opts()).unwrap();
    assert_eq!(head.predict(M, &blobs(1, 1, 41)[0].1).unwrap().probs, [1.0]);

    let one_photo = TrainSet::new(M, &blobs(1, 1, 42), group).unwrap();
    Head::train(HeadKind::Lda, &one_photo, None, &opts()).unwrap();

    let zeros: Vec<(u64, Vec<f32>)> = (0..6).map(|i| (i % 2, vec![0.0; DIM])).collect();
    let zero = TrainSet::new(M, &zeros, group).unwrap();
    let head = Head::train(HeadKind::Lda, &zero, None, &opts()).unwrap();
    let p = head.predict(M, &[0.0; DIM]).unwrap().probs;
    assert!(p.iter().all(|v| v.is_finite()), "{p:?}");

    // Every photo of a class the same: no residuals to shrink, nearest class mean instead.
    let twins: Vec<(u64, Vec<f32>)> = blobs(3, 1, 43)
        .into_iter()
        .flat_map(|r| [r.clone(), r.clone(), r])
        .collect();
    let twin = TrainSet::new(M, &twins, group).unwrap();
    let head = Head::train(HeadKind::Lda, &twin, None, &opts()).unwrap();
    assert_eq!(lda_of(&head).config.model, Model::Ncm);
    assert_eq!(accuracy(&head, &twins), 1.0);

    let mut bad = blobs(2, 3, 44);
    bad[3].1[5] = f32::NAN;
    let bad = TrainSet::new(M, &bad, group).unwrap();
    let e = Head::train(HeadKind::Lda, &bad, None, &opts()).unwrap_err();
    assert!(e.to_string().contains("non-finite"), "{e}");
}

/// Fit time at a tenant's sizes, d = 1280, also with one class of a single photo (uneven
/// counts cost a trace of an inverse per shrinkage and fold):
/// `cargo test -p head-trainer --release --lib lda_fit_time -- --ignored --nocapture`.
#[test]
#[ignore = "timing, run in release"]
fn lda_fit_time() {
    let dim = 1280;
    let sizes = [
        (100, 8, false),
        (100, 8, true),
        (100, 60, false),
        (100, 60, true),
        (1000, 6, false),
    ];
    for (classes, per, one_new) in sizes {
        let mut rng = StdRng::seed_from_u64(9);
        let centres: Vec<Vec<f32>> = (0..classes)
            .map(|_| (0..dim).map(|_| rng.random_range(0.0..1.0)).collect())
            .collect();
        let rows: Vec<(u64, Vec<f32>)> = (0..classes * per)
            .map(|i| {
                let c = i / per;
                let x = centres[c]
                    .iter()
                    .map(|m| (m + 2.5 * normal(&mut rng)).max(0.0))
                    .collect();
                (c as u64, x)
            })
            .filter(|(c, _)| !one_new || *c as usize != classes - 1)
            .collect();
        let mut rows = rows;
        if one_new {
            let photo = centres[classes - 1].iter().map(|m| m.max(0.0)).collect();
            rows.push(((classes - 1) as u64, photo));
        }
        let ts = TrainSet::new(M, &rows, group).unwrap();
        let started = std::time::Instant::now();
        let head = Head::train(HeadKind::Lda, &ts, None, &opts()).unwrap();
        println!(
            "lda fit: {classes} classes x {per} photos{} (n = {}), d = {dim}: {:.2} s, chose {:?}, T = {}",
            if one_new { ", the last of 1" } else { "" },
            ts.len(),
            started.elapsed().as_secs_f64(),
            lda_of(&head).config,
            lda_of(&head).temperature
        );
    }
}
