//! Durability shown, not assumed: the real `head-trainer` binary is killed with SIGKILL at
//! random moments while a client runs a loop of enrolls, renames and removes; after each
//! restart every acknowledged change must be there, and the one change in flight at the kill
//! (if any) must be there wholly or not at all.
//!
//! The kill moments come from a seeded generator, so a failure can be replayed with the same
//! seed (`TAXON_DURABILITY_SEED`); the outcome asserted does not depend on where they land.

mod common;

use std::collections::BTreeMap;
use std::process::Child;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use taxon_proto::v1::classifier_client::ClassifierClient;
use taxon_proto::v1::{
    EnrollRequest, EnrollStart, ListClassesRequest, Photo, RemoveClassRequest, RenameClassRequest,
    enroll_request,
};
use tonic::transport::Channel;

/// A class as the client believes the server holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Class {
    parent: String,
    examples: u32,
}

type Model = BTreeMap<String, Class>;

/// One change the loop makes.
#[derive(Clone, Debug)]
enum Op {
    Enroll {
        class: String,
        parent: String,
        photos: Vec<Vec<u8>>,
    },
    Rename {
        from: String,
        to: String,
    },
    Remove {
        class: String,
    },
}

/// The model after `op` succeeded.
fn apply(model: &Model, op: &Op) -> Model {
    let mut m = model.clone();
    match op {
        Op::Enroll {
            class,
            parent,
            photos,
        } => {
            let e = m.entry(class.clone()).or_insert(Class {
                parent: parent.clone(),
                examples: 0,
            });
            e.examples += photos.len() as u32; // every photo is new (unique bytes)
            if !parent.is_empty() {
                m.entry(parent.clone()).or_insert(Class {
                    parent: String::new(),
                    examples: 0,
                });
            }
        }
        Op::Rename { from, to } => {
            if let Some(c) = m.remove(from) {
                m.insert(to.clone(), c);
            }
            for c in m.values_mut() {
                if c.parent == *from {
                    c.parent = to.clone();
                }
            }
        }
        Op::Remove { class } => {
            m.remove(class);
        }
    }
    m
}

/// What the server lists, as a model (parents' example counts are their own: zero).
async fn listed(client: &mut ClassifierClient<Channel>) -> Model {
    let resp = client
        .list_classes(ListClassesRequest {})
        .await
        .expect("ListClasses after restart")
        .into_inner();
    resp.classes
        .into_iter()
        .map(|c| {
            let examples = if c.is_parent { 0 } else { c.examples };
            (
                c.name,
                Class {
                    parent: c.parent,
                    examples,
                },
            )
        })
        .collect()
}

async fn run_op(client: &mut ClassifierClient<Channel>, op: &Op) -> Result<(), tonic::Status> {
    match op {
        Op::Enroll {
            class,
            parent,
            photos,
        } => {
            let mut msgs = vec![EnrollRequest {
                item: Some(enroll_request::Item::Start(EnrollStart {
                    class_name: class.clone(),
                    parent: parent.clone(),
                    wait_for_head: false,
                })),
            }];
            for (i, p) in photos.iter().enumerate() {
                msgs.push(EnrollRequest {
                    item: Some(enroll_request::Item::Photo(Photo {
                        id: format!("p{i}"),
                        image: p.clone().into(),
                    })),
                });
            }
            client.enroll(tokio_stream::iter(msgs)).await.map(drop)
        }
        Op::Rename { from, to } => client
            .rename_class(RenameClassRequest {
                name: from.clone(),
                new_name: to.clone(),
            })
            .await
            .map(drop),
        Op::Remove { class } => client
            .remove_class(RemoveClassRequest {
                name: class.clone(),
                recursive: false,
            })
            .await
            .map(drop),
    }
}

/// A random change that is valid on `model` (so an error can only mean the kill).
fn next_op(rng: &mut rand::rngs::StdRng, model: &Model, serial: &mut u64) -> Op {
    let leaves: Vec<&String> = model
        .iter()
        .filter(|(_, c)| c.examples > 0)
        .map(|(n, _)| n)
        .collect();
    *serial += 1;
    let roll = rng.random_range(0..10);
    if leaves.len() < 3 || roll < 6 {
        let grow = !leaves.is_empty() && rng.random_bool(0.3);
        let (class, parent) = if grow {
            let c = leaves[rng.random_range(0..leaves.len())].clone();
            let p = model[&c].parent.clone();
            (c, p)
        } else {
            let parent = ["", "animals", "tools"][rng.random_range(0..3)];
            (format!("c{serial}"), parent.to_string())
        };
        let n = rng.random_range(1..6);
        let photos = (0..n)
            .map(|i| format!("photo {serial}/{i} {}", rng.random::<u64>()).into_bytes())
            .collect();
        Op::Enroll {
            class,
            parent,
            photos,
        }
    } else if roll < 8 {
        let from = leaves[rng.random_range(0..leaves.len())].clone();
        Op::Rename {
            from,
            to: format!("r{serial}"),
        }
    } else {
        let class = leaves[rng.random_range(0..leaves.len())].clone();
        Op::Remove { class }
    }
}

/// Starts the binary on 127.0.0.1:0 and returns it with its URL.
fn spawn_head_trainer(data: &std::path::Path, features: &str) -> (Child, String) {
    let (child, addr) = common::spawn_head_trainer(
        features,
        &[std::ffi::OsStr::new("--data"), data.as_os_str()],
    );
    (child, format!("http://{addr}"))
}

async fn wait_ready(url: &str) -> ClassifierClient<Channel> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let channel = Channel::from_shared(url.to_string())
        .expect("url")
        .connect_lazy();
    let mut health = HealthClient::new(channel.clone());
    let mut watch = tokio::time::timeout(
        Duration::from_secs(60),
        health.watch(HealthCheckRequest {
            service: "taxon.v1.Classifier".into(),
        }),
    )
    .await
    .expect("health in time")
    .expect("health watch")
    .into_inner();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(m) = watch.message().await.expect("health stream") {
            if m.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
                return;
            }
        }
        panic!("health stream ended before SERVING");
    })
    .await
    .expect("SERVING in time");
    ClassifierClient::new(channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_acknowledged() {
    const KILLS: usize = 24;
    let seed: u64 = std::env::var("TAXON_DURABILITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261201);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let features = common::FakeFeatures::start(usize::MAX, Duration::ZERO).await;
    let data = tempfile::tempdir().expect("tempdir");
    let mut model = Model::new();
    let (mut serial, mut acknowledged, mut in_flight_at_kill, mut landed) = (0u64, 0, 0, 0);

    for round in 0..=KILLS {
        let (mut child, url) = spawn_head_trainer(data.path(), &features.url());
        let mut client = wait_ready(&url).await;
        let got = listed(&mut client).await;
        assert_eq!(
            got, model,
            "round {round}: the store differs from what was acknowledged"
        );
        if round == KILLS {
            child.kill().expect("kill");
            let _ = child.wait();
            break;
        }
        // Ops run one at a time until the kill; the kill lands after a random delay.
        let kill_after = Duration::from_millis(rng.random_range(5..250));
        let ops: Vec<Op> = {
            let mut m = model.clone();
            (0..2000)
                .map(|_| {
                    let op = next_op(&mut rng, &m, &mut serial);
                    m = apply(&m, &op);
                    op
                })
                .collect()
        };
        let killer = tokio::spawn(async move {
            tokio::time::sleep(kill_after).await; // the random moment of the kill, not a sync
            child.kill().expect("SIGKILL");
            let _ = child.wait();
        });
        let mut pending: Option<Op> = None;
        for op in ops {
            match run_op(&mut client, &op).await {
                Ok(()) => {
                    model = apply(&model, &op);
                    acknowledged += 1;
                }
                Err(status) => {
                    assert!(
                        matches!(
                            status.code(),
                            tonic::Code::Unavailable
                                | tonic::Code::Unknown
                                | tonic::Code::Cancelled
                        ),
                        "round {round}: {op:?} failed for another reason than the kill: {status}"
                    );
                    pending = Some(op);
                    break;
                }
            }
        }
        killer.await.expect("killer");
        // After the restart: the model, or the model with the pending op wholly applied.
        if let Some(op) = pending {
            in_flight_at_kill += 1;
            let (mut child, url) = spawn_head_trainer(data.path(), &features.url());
            let mut client = wait_ready(&url).await;
            let got = listed(&mut client).await;
            child.kill().expect("kill");
            let _ = child.wait();
            let after = apply(&model, &op);
            if got == after {
                landed += 1;
                model = after;
            } else {
                assert_eq!(
                    got, model,
                    "round {round}: {op:?} was interrupted and is half there"
                );
            }
        }
    }
    println!(
        "durability: {KILLS} SIGKILLs (seed {seed}), {acknowledged} changes acknowledged and all \
         found after restarts; {in_flight_at_kill} kills hit a change in flight ({landed} of \
         those had committed, the rest left no trace)"
    );
    assert!(
        in_flight_at_kill >= KILLS / 2,
        "only {in_flight_at_kill} of {KILLS} kills hit a change in flight: the test is not \
         testing what it claims"
    );
    features.stop().await;
}
