//! The k-shot protocol: per child, k seeded-random training photos and the rest for testing;
//! each (k, seed) in a fresh tenant so runs never see each other's examples.

use std::path::PathBuf;
use std::time::Instant;

use indicatif::ProgressBar;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use taxon_proto::v1::{RemoveClassRequest, TrainRequest};

use super::metrics::Prediction;
use super::open_set::Stranger;
use crate::commands::classify::{Answer, classify_many, decision_name};
use crate::commands::enroll::enroll_class;
use crate::connect::Conn;
use crate::dataset::Dataset;
use crate::error::Result;

/// Which photos train and which test, for one (k, seed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Per dataset child (same order): its k training photos; empty for a child left out.
    pub train: Vec<Vec<PathBuf>>,
    /// (child index, photo).
    pub test: Vec<(usize, PathBuf)>,
    /// Children with k or fewer photos: nothing would be left to test them on.
    pub left_out: Vec<String>,
}

/// Shuffles each child's photos with one RNG seeded by `seed` (children in dataset order), so
/// a split depends only on the tree and the seed: the same on every machine and every run.
pub fn split(ds: &Dataset, k: usize, seed: u64) -> Split {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Split {
        train: Vec::with_capacity(ds.children.len()),
        test: Vec::new(),
        left_out: Vec::new(),
    };
    for (i, child) in ds.children.iter().enumerate() {
        let mut photos = child.images.clone();
        photos.shuffle(&mut rng);
        if photos.len() <= k {
            out.left_out.push(child.name.clone());
            out.train.push(Vec::new());
            continue;
        }
        let test = photos.split_off(k);
        out.train.push(photos);
        out.test.extend(test.into_iter().map(|p| (i, p)));
    }
    out
}

/// `eval-<pid>-<dataset>-k<k>-s<seed>`: unique per run, readable in the server's logs.
pub fn tenant_name(pid: u32, dataset: &str, k: usize, seed: u64) -> String {
    format!("eval-{pid}-{}-k{k}-s{seed}", clean_name(dataset))
}

/// A dataset's name with anything but ASCII letters and digits as `_`, for a tenant name.
pub fn clean_name(dataset: &str) -> String {
    dataset
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// One head's answers on one split; `head` is empty for the live (default) head.
#[derive(Debug, Clone)]
pub struct HeadRun {
    pub head: String,
    pub train_ms: Option<f64>,
    /// The head kind that actually answered (for the default head: what was live).
    pub answered_by: String,
    pub preds: Vec<Prediction>,
}

#[derive(Debug, Clone)]
pub struct SeedRun {
    pub k: usize,
    pub seed: u64,
    pub heads: Vec<HeadRun>,
    /// Out-of-set photos (`--open-set`) as the live head answered them.
    pub strangers: Vec<Stranger>,
    pub rejected: u32,
    pub wall_s: f64,
}

/// Work units `run_one` reports on the bar: photos enrolled plus photos classified per head,
/// plus the strangers.
pub fn steps(split: &Split, heads: usize, strangers: usize) -> u64 {
    let train: usize = split.train.iter().map(Vec::len).sum();
    (train + split.test.len() * (heads + 1) + strangers) as u64
}

/// Enrolls the split's training photos, classifies its test photos and the `strangers` (photos
/// of nothing enrolled) with the live head, then trains and classifies with each head kind in
/// turn. `conn` speaks for a fresh tenant.
pub async fn run_one(
    conn: &Conn,
    ds: &Dataset,
    split: &Split,
    (k, seed): (usize, u64),
    heads: &[String],
    strangers: &[PathBuf],
    pb: &ProgressBar,
) -> Result<SeedRun> {
    let started = Instant::now();
    let label = format!("k={k} seed={seed}");
    pb.set_message(format!("{label}: enrolling"));
    let jobs: Vec<usize> = (0..ds.children.len())
        .filter(|&i| !split.train[i].is_empty())
        .collect();
    let Some(&last) = jobs.last() else {
        return Ok(SeedRun {
            k,
            seed,
            heads: Vec::new(),
            strangers: Vec::new(),
            rejected: 0,
            wall_s: 0.0,
        });
    };
    // One class at a time, in the dataset's order: classes then get their ids, and examples
    // their rows, in the same order on every run, which the trained heads' seeded
    // initialisation depends on. (Every photo is usually cached by then: see `dump`.)
    let mut rejected = 0;
    for &i in &jobs {
        let c = &ds.children[i];
        // The last class waits for the trained head, so that no training job of the enrolls
        // is still running when the head below is trained.
        let wait = i == last;
        let done = enroll_class(conn, &c.name, &c.parent, wait, &split.train[i], pb).await?;
        rejected += done.response.rejected.len() as u32;
    }
    // The live head, trained again from the examples alone: the heads trained while classes
    // arrived warm-start one another, and which of them ran depends on timing.
    pb.set_message(format!("{label}: training the default head"));
    let live = train(conn, "").await?;

    let photos: Vec<PathBuf> = split.test.iter().map(|(_, p)| p.clone()).collect();
    let mut runs = Vec::new();
    pb.set_message(format!("{label}: classifying (live head)"));
    let answers = classify_many(conn, &photos, 1, "", pb).await?;
    runs.push(head_run(ds, split, String::new(), Some(live), &answers));
    let strangers: Vec<Stranger> = if strangers.is_empty() {
        Vec::new()
    } else {
        pb.set_message(format!("{label}: classifying strangers"));
        classify_many(conn, strangers, 1, "", pb)
            .await?
            .iter()
            .filter_map(|a| a.as_ref().ok())
            .map(|c| Stranger {
                similarity: c.similarity,
                decision: decision_name(c.decision),
            })
            .collect()
    };
    for head in heads {
        pb.set_message(format!("{label}: training {head}"));
        let train_ms = train(conn, head).await?;
        pb.set_message(format!("{label}: classifying ({head})"));
        let answers = classify_many(conn, &photos, 1, head, pb).await?;
        runs.push(head_run(ds, split, head.clone(), Some(train_ms), &answers));
    }
    Ok(SeedRun {
        k,
        seed,
        heads: runs,
        strangers,
        rejected,
        wall_s: started.elapsed().as_secs_f64(),
    })
}

/// Trains a head of `kind` (empty: the default kind) from scratch; its training time in ms.
async fn train(conn: &Conn, kind: &str) -> Result<f64> {
    let trained = conn
        .classifier()
        .train(TrainRequest {
            head: kind.to_string(),
            from_scratch: true,
        })
        .await
        .map_err(conn.rpc_error("Train"))?
        .into_inner();
    Ok(trained.train_ms)
}

fn head_run(
    ds: &Dataset,
    split: &Split,
    head: String,
    train_ms: Option<f64>,
    answers: &[Answer],
) -> HeadRun {
    let parent_of = ds.parent_of();
    let answered_by = answers
        .iter()
        .find_map(|a| a.as_ref().ok().map(|c| c.head.clone()))
        .unwrap_or_default();
    let preds = split
        .test
        .iter()
        .zip(answers)
        .map(|((i, _), a)| {
            let truth = &ds.children[*i];
            let ok = a.as_ref().ok();
            let top = ok.and_then(|c| c.children.first());
            Prediction {
                child: truth.name.clone(),
                parent: truth.parent.clone(),
                predicted: top.map(|s| s.name.clone()),
                // The dataset's own taxonomy decides the parent of the predicted child.
                predicted_parent: top.map(|s| {
                    parent_of
                        .get(&s.name)
                        .cloned()
                        .unwrap_or_else(|| s.parent.clone())
                }),
                branch_parent: ok.and_then(|c| c.parent_branch.as_ref().map(|p| p.name.clone())),
                decision: ok.map(|c| decision_name(c.decision)),
                similarity: ok.map(|c| c.similarity),
                confidence: top.map(|s| s.probability),
            }
        })
        .collect();
    HeadRun {
        head,
        train_ms,
        answered_by,
        preds,
    }
}

/// Removes what the run enrolled: every parent recursively, and top-level classes. Best effort;
/// returns what could not be removed, for the report.
pub async fn clean_up(conn: &Conn, ds: &Dataset) -> Vec<String> {
    let mut names: Vec<(String, bool)> = ds
        .parents()
        .into_iter()
        .map(|p| (p.to_string(), true))
        .collect();
    names.extend(
        ds.children
            .iter()
            .filter(|c| c.parent.is_empty())
            .map(|c| (c.name.clone(), false)),
    );
    let mut failures = Vec::new();
    for (name, recursive) in names {
        let req = RemoveClassRequest {
            name: name.clone(),
            recursive,
        };
        if let Err(s) = conn.classifier().remove_class(req).await {
            failures.push(format!("{name}: {}", s.message()));
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::ChildClass;
    use std::collections::BTreeSet;

    fn ds() -> Dataset {
        let child = |parent: &str, name: &str, n: usize| ChildClass {
            parent: parent.into(),
            name: name.into(),
            images: (0..n)
                .map(|i| PathBuf::from(format!("{name}/{i}.jpg")))
                .collect(),
        };
        Dataset {
            root: PathBuf::from("pets"),
            name: "pets".into(),
            children: vec![
                child("cat", "sphynx", 10),
                child("dog", "pug", 10),
                child("dog", "tiny", 3),
            ],
            skipped: Vec::new(),
        }
    }

    #[test]
    fn split_is_deterministic_per_seed_and_disjoint() {
        let d = ds();
        let a = split(&d, 3, 7);
        assert_eq!(a, split(&d, 3, 7));
        assert_ne!(a, split(&d, 3, 8), "another seed picks other photos");
        assert_eq!(a.train[0].len(), 3);
        assert_eq!(a.train[1].len(), 3);
        assert!(a.train[2].is_empty(), "3 photos leave none to test at k=3");
        assert_eq!(a.left_out, vec!["tiny".to_string()]);
        assert_eq!(a.test.len(), 14);
        let train: BTreeSet<&PathBuf> = a.train.iter().flatten().collect();
        let test: BTreeSet<&PathBuf> = a.test.iter().map(|(_, p)| p).collect();
        assert!(train.is_disjoint(&test));
        assert_eq!(
            train.len() + test.len(),
            20,
            "every photo of a kept class is used once"
        );
        for (i, p) in &a.test {
            assert!(p.starts_with(&d.children[*i].name));
        }
        assert_eq!(steps(&a, 3, 5), 6 + 14 * 4 + 5);
    }

    #[test]
    fn tenant_names_are_safe_and_distinct() {
        assert_eq!(tenant_name(42, "my pets", 5, 1), "eval-42-my_pets-k5-s1");
        assert_ne!(tenant_name(42, "pets", 5, 1), tenant_name(42, "pets", 5, 2));
    }
}
