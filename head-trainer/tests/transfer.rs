//! Export and Import through the gRPC face: a tenant moved to another tenant and to another
//! server answers every classify exactly as before (every head kind), with no photo sent
//! again; a file of another model identity, a non-empty tenant, an oversized or broken file
//! are refused with a status that names the problem, and write nothing.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{FakeFeatures, Trainer, blobs, config};
use taxon_proto::v1::classifier_client::ClassifierClient;
use taxon_proto::v1::{
    ClassifyRequest, ClassifyResponse, EnrollRequest, EnrollStart, ExportRequest, FileChunk,
    ImportResponse, ListClassesRequest, Photo, TrainRequest, enroll_request,
};
use tonic::transport::Channel;

const SERVING: i32 = 1;
const KINDS: [&str; 6] = ["", "prototype", "flat", "hierarchical", "combined", "lda"];

fn as_tenant<T>(tenant: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert(taxon_proto::TENANT_HEADER, tenant.parse().unwrap());
    r
}

async fn start(
    features: &FakeFeatures,
    tweak: impl FnOnce(&mut head_trainer::Config),
) -> (Trainer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&features.url(), dir.path());
    tweak(&mut c);
    let trainer = Trainer::start(c).await;
    common::wait_health(trainer.addr, "taxon.v1.Classifier", SERVING).await;
    (trainer, dir)
}

/// Enrolls and, when `wait`, returns once the trained default head covering it is live (so
/// that no background job changes the heads afterwards).
async fn enroll(
    c: &mut ClassifierClient<Channel>,
    tenant: &str,
    (class, parent, wait): (&str, &str, bool),
    photos: Vec<Vec<u8>>,
) {
    let mut msgs = vec![EnrollRequest {
        item: Some(enroll_request::Item::Start(EnrollStart {
            class_name: class.into(),
            parent: parent.into(),
            wait_for_head: wait,
        })),
    }];
    msgs.extend(
        photos
            .into_iter()
            .enumerate()
            .map(|(i, image)| EnrollRequest {
                item: Some(enroll_request::Item::Photo(Photo {
                    id: format!("p{i}"),
                    image: image.into(),
                })),
            }),
    );
    c.enroll(as_tenant(tenant, futures::stream::iter(msgs)))
        .await
        .unwrap();
}

/// Every query classified by every head kind, head versions left out (they are the
/// importing tenant's own).
async fn answers(
    c: &mut ClassifierClient<Channel>,
    tenant: &str,
    queries: &[Vec<u8>],
) -> Vec<ClassifyResponse> {
    let mut out = Vec::new();
    for head in KINDS {
        for q in queries {
            let mut r = c
                .classify(as_tenant(
                    tenant,
                    ClassifyRequest {
                        image: q.clone().into(),
                        top_k: 5,
                        head: head.into(),
                    },
                ))
                .await
                .unwrap_or_else(|s| panic!("{head}: {s}"))
                .into_inner();
            r.head_version = 0;
            out.push(r);
        }
    }
    out
}

async fn export(c: &mut ClassifierClient<Channel>, tenant: &str) -> Vec<u8> {
    let mut stream = c
        .export(as_tenant(tenant, ExportRequest {}))
        .await
        .unwrap()
        .into_inner();
    let mut file = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        file.extend_from_slice(&chunk.data);
    }
    file
}

async fn import(
    c: &mut ClassifierClient<Channel>,
    tenant: &str,
    file: &[u8],
) -> Result<ImportResponse, tonic::Status> {
    // Small chunks, so that the file arrives in many messages.
    let chunks: Vec<FileChunk> = file
        .chunks(4096)
        .map(|c| FileChunk {
            data: c.to_vec().into(),
        })
        .collect();
    c.import(as_tenant(tenant, futures::stream::iter(chunks)))
        .await
        .map(|r| r.into_inner())
}

async fn class_count(c: &mut ClassifierClient<Channel>, tenant: &str) -> usize {
    c.list_classes(as_tenant(tenant, ListClassesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .classes
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_tenant_answers_exactly_as_the_exported_one() {
    let features = FakeFeatures::start(64, Duration::ZERO).await;
    let (a, _da) = start(&features, |_| {}).await;
    let mut ca = a.client();
    enroll(
        &mut ca,
        "src",
        ("beagle", "dog", false),
        blobs("beagle", 6, 64),
    )
    .await;
    enroll(&mut ca, "src", ("pug", "dog", false), blobs("pug", 6, 64)).await;
    enroll(&mut ca, "src", ("tabby", "", true), blobs("tabby", 6, 64)).await;
    enroll(
        &mut ca,
        "other",
        ("secret", "", false),
        blobs("secret", 2, 64),
    )
    .await;
    for head in ["flat", "hierarchical", "combined"] {
        ca.train(as_tenant(
            "src",
            TrainRequest {
                head: head.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    }
    let queries = blobs("query", 4, 64);
    let before = answers(&mut ca, "src", &queries).await;
    let file = export(&mut ca, "src").await;
    assert!(
        !file.windows(6).any(|w| w == b"secret"),
        "another tenant's class leaked into the file"
    );

    // Another server with its own store and feature-server: nothing is embedded to import.
    let features_b = FakeFeatures::start(64, Duration::ZERO).await;
    let (b, _db) = start(&features_b, |_| {}).await;
    let mut cb = b.client();
    let r = import(&mut cb, "copy", &file).await.unwrap();
    assert_eq!((r.classes, r.examples), (4, 18));
    assert_eq!(r.heads, ["combined", "flat", "hierarchical", "lda"]);
    assert_eq!(r.head, "lda", "the trained default head is live at once");
    assert_eq!(features_b.counters.embedded.load(Ordering::SeqCst), 0);
    assert_eq!(
        answers(&mut cb, "copy", &queries).await,
        before,
        "on another server"
    );
    assert_eq!(
        features_b.counters.embedded.load(Ordering::SeqCst),
        4,
        "only the queries"
    );
    // And into another tenant of the same server.
    import(&mut ca, "twin", &file).await.unwrap();
    assert_eq!(
        answers(&mut ca, "twin", &queries).await,
        before,
        "in another tenant"
    );
    // A photo sent again is recognised by its hash: cached, not embedded.
    let embedded = features_b.counters.embedded.load(Ordering::SeqCst);
    enroll(&mut cb, "copy", ("tabby", "", false), blobs("tabby", 6, 64)).await;
    assert_eq!(
        features_b.counters.embedded.load(Ordering::SeqCst),
        embedded
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_that_cannot_be_honoured_are_refused_and_write_nothing() {
    let features = FakeFeatures::start(64, Duration::ZERO).await;
    let (a, _da) = start(&features, |c| c.max_transfer_bytes = 64 << 10).await;
    let mut ca = a.client();
    enroll(
        &mut ca,
        "src",
        ("beagle", "dog", false),
        blobs("beagle", 3, 64),
    )
    .await;
    let file = export(&mut ca, "src").await;

    let s = import(&mut ca, "src", &file).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s}");
    assert!(s.message().contains("has 2 classes"), "{s}");

    // Another view set is another embedding identity: its embeddings would mean nothing.
    let (other_model, _do) = start(&features, |c| {
        c.views = taxon_proto::v1::ViewSet::ScalesAndMirrors
    })
    .await;
    let mut co = other_model.client();
    let s = import(&mut co, "t", &file).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s}");
    let ours = taxon_proto::embedding_identity(common::MODEL, taxon_proto::v1::ViewSet::Center);
    let theirs =
        taxon_proto::embedding_identity(common::MODEL, taxon_proto::v1::ViewSet::ScalesAndMirrors);
    assert!(
        s.message().contains(&ours) && s.message().contains(&theirs),
        "{s}"
    );
    assert_eq!(class_count(&mut co, "t").await, 0);

    let s = import(&mut ca, "t", &file[..file.len() / 2])
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s}");
    assert!(s.message().contains("tenant file"), "{s}");
    let s = import(&mut ca, "t", &[]).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s}");
    let s = import(&mut ca, "t", &vec![0u8; 65 << 10])
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s}");
    assert!(s.message().contains("--max-transfer-bytes"), "{s}");
    assert_eq!(
        class_count(&mut ca, "t").await,
        0,
        "nothing written by a refused import"
    );

    // A tenant too large for the limit is refused before its file is built.
    let many = blobs("many", 1200, 64);
    enroll(&mut ca, "big", ("many", "", false), many[..600].to_vec()).await;
    enroll(&mut ca, "big", ("many", "", false), many[600..].to_vec()).await;
    let s = ca
        .export(as_tenant("big", ExportRequest {}))
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s}");
    assert!(s.message().contains("--max-transfer-bytes"), "{s}");
    let s = ca
        .export(as_tenant("nobody", ExportRequest {}))
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s}");
}
