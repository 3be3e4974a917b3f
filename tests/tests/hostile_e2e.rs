//! The hostile-image matrix through the head-trainer: the same bytes as the feature-server's
//! own matrix (feature-server/tests/common/images.rs), sent through Enroll, ClassifyStream and
//! Classify of a head-trainer in front of a real feature-server, both in this process. Each
//! hostile photo is one rejected item (or a correct answer), the good photos around it go
//! through, no call fails as a whole, and the process's peak RSS stays under 1 GiB.
//!
//! The only test in this binary, so that VmHWM is this test's alone.

#[path = "../../feature-server/tests/common/images.rs"]
mod images;

use std::collections::BTreeMap;

use images::{Expect, hostile_cases, jpeg};
use taxon_proto::v1::{
    ClassifyRequest, ClassifyStreamRequest, EnrollRequest, EnrollStart, Photo,
    classify_stream_response, enroll_request,
};
use taxon_tests::*;

fn vm_hwm_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        / 1024
}

fn enroll_request(class: &str, photos: Vec<(String, Vec<u8>)>) -> Vec<EnrollRequest> {
    let mut msgs = vec![EnrollRequest {
        item: Some(enroll_request::Item::Start(EnrollStart {
            class_name: class.into(),
            parent: String::new(),
            wait_for_head: false,
        })),
    }];
    for (id, image) in photos {
        msgs.push(EnrollRequest {
            item: Some(enroll_request::Item::Photo(Photo {
                id,
                image: image.into(),
            })),
        });
    }
    msgs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_images_through_the_head_trainer_fail_alone() {
    let cases = hostile_cases();
    let features = shared_feature_server();
    let dir = tempfile::tempdir().unwrap();
    let mut config = head_trainer::Config::new(vec![features], dir.path().join("store"));
    config.views = taxon_proto::v1::ViewSet::Center;
    config.max_photo_bytes = 20 << 20;
    let trainer = start_head_trainer(config).await;
    wait_serving(trainer.addr, "taxon.v1.Classifier").await;
    let mut client = classifier(trainer.addr);

    // Enroll: a class of good photos, then one enroll with every hostile photo among good ones.
    let good: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| (format!("plain-{i}"), jpeg(200 + 8 * i, 150, i)))
        .collect();
    within(
        "enroll",
        client.enroll(tokio_stream::iter(enroll_request("plain", good))),
    )
    .await
    .expect("a plain class");
    let mut mixed = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        mixed.push((
            format!("good-{i}"),
            jpeg(160 + 8 * i as u32, 120, 100 + i as u32),
        ));
        mixed.push((c.name.to_string(), c.bytes.clone()));
    }
    let enrolled = within(
        "hostile enroll",
        client.enroll(tokio_stream::iter(enroll_request("mixed", mixed))),
    )
    .await
    .expect("the enroll succeeds as a whole")
    .into_inner();
    let rejected: BTreeMap<String, String> = enrolled
        .rejected
        .iter()
        .map(|r| (r.id.clone(), r.message.clone()))
        .collect();
    println!(
        "Enroll: {} accepted, {} rejected",
        enrolled.accepted,
        rejected.len()
    );
    for (i, c) in cases.iter().enumerate() {
        assert!(
            !rejected.contains_key(&format!("good-{i}")),
            "good photo {i} rejected"
        );
        match (c.expect, rejected.get(c.name)) {
            (Expect::Embedding, Some(m)) => panic!("{} rejected: {m}", c.name),
            (Expect::Error(needle), None) => panic!("{} accepted, expected `{needle}`", c.name),
            (Expect::Error(needle), Some(m)) => assert!(m.contains(needle), "{}: {m}", c.name),
            _ => {}
        }
    }

    // ClassifyStream: every hostile photo among good ones, in one stream.
    let mut items = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        items.push(ClassifyStreamRequest {
            id: format!("good-{i}"),
            image: jpeg(150, 150 + 4 * i as u32, 300 + i as u32).into(),
            top_k: 2,
            head: "prototype".into(),
        });
        items.push(ClassifyStreamRequest {
            id: c.name.to_string(),
            image: c.bytes.clone().into(),
            top_k: 2,
            head: "prototype".into(),
        });
    }
    let mut stream = client
        .classify_stream(tokio_stream::iter(items))
        .await
        .expect("stream opened")
        .into_inner();
    let mut answers = BTreeMap::new();
    while let Some(m) = within("stream answers", stream.message())
        .await
        .expect("stream stays up")
    {
        answers.insert(m.id.clone(), m.result);
    }
    assert_eq!(answers.len(), 2 * cases.len(), "every item answered once");
    for (i, c) in cases.iter().enumerate() {
        assert!(
            matches!(
                answers[&format!("good-{i}")],
                Some(classify_stream_response::Result::Classification(_))
            ),
            "good photo {i}"
        );
        match (&c.expect, &answers[c.name]) {
            (Expect::Embedding, Some(classify_stream_response::Result::Classification(_))) => {}
            (Expect::Either, Some(_)) => {}
            (Expect::Error(needle), Some(classify_stream_response::Result::Error(e))) => {
                assert_eq!(e.code, tonic::Code::InvalidArgument as i32, "{}", c.name);
                assert!(e.message.contains(needle), "{}: {}", c.name, e.message);
            }
            (_, other) => panic!("{}: {other:?}", c.name),
        }
    }

    // Classify, one call per photo: a clear INVALID_ARGUMENT or an answer, never a failure of
    // the service.
    for c in &cases {
        let r = within(
            "classify",
            client.classify(ClassifyRequest {
                image: c.bytes.clone().into(),
                top_k: 1,
                head: "prototype".into(),
            }),
        )
        .await;
        match (c.expect, r) {
            (Expect::Error(_), Ok(_)) => panic!("{} classified", c.name),
            (Expect::Embedding, Err(s)) => panic!("{}: {s}", c.name),
            (_, Err(s)) => assert_eq!(s.code(), tonic::Code::InvalidArgument, "{}: {s}", c.name),
            (_, Ok(_)) => {}
        }
    }
    let after = client
        .classify(ClassifyRequest {
            image: jpeg(200, 150, 1).into(),
            top_k: 1,
            head: "prototype".into(),
        })
        .await
        .expect("the service still answers");
    assert!(!after.into_inner().children.is_empty());

    let peak = vm_hwm_mib();
    println!(
        "{} hostile photos through Enroll, ClassifyStream and Classify: peak RSS of both \
         services and the test together {peak} MiB (bound 1024 MiB)",
        cases.len()
    );
    assert!(peak < 1024, "peak RSS {peak} MiB");
    trainer.stop().await;
}
