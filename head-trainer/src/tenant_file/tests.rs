//! The tenant file codec: a file round-trips exactly, and a hostile one is refused with
//! INVALID_ARGUMENT naming what is wrong, never a panic.

use super::*;
use crate::heads::{TrainOptions, TrainSet};

const M: &str = "test@sha256:00";
const DIM: usize = 8;

/// Classes: `dog` (parent), `beagle` and `pug` under it, `tabby` top-level; three examples
/// each, and every head kind trained on them (ids are the class indices).
fn sample() -> TenantFile {
    let classes = vec![
        FileClass {
            name: "dog".into(),
            parent: None,
            examples: 0,
        },
        FileClass {
            name: "beagle".into(),
            parent: Some(0),
            examples: 3,
        },
        FileClass {
            name: "pug".into(),
            parent: Some(0),
            examples: 3,
        },
        FileClass {
            name: "tabby".into(),
            parent: None,
            examples: 3,
        },
    ];
    let mut examples = Vec::new();
    for class in 1..4usize {
        for i in 0..3u8 {
            let embedding = (0..DIM)
                .map(|d| {
                    if d == class {
                        4.0
                    } else {
                        f32::from(i) * 0.1 + d as f32 * 0.01
                    }
                })
                .collect();
            examples.push(FileExample {
                class,
                hash: [class as u8 * 10 + i; 32],
                embedding,
            });
        }
    }
    let rows: Vec<(u64, Vec<f32>)> = examples
        .iter()
        .map(|e| (e.class as u64, e.embedding.clone()))
        .collect();
    let group = |c: u64| if c == 3 { 3 } else { 0 };
    let ts = TrainSet::new(M, &rows, group).unwrap();
    let opts = TrainOptions {
        max_steps: 5,
        ..TrainOptions::default()
    };
    let heads = HeadKind::ALL
        .into_iter()
        .map(|k| Head::train(k, &ts, None, &opts).unwrap())
        .collect();
    TenantFile {
        model: M.into(),
        dim: DIM,
        tenant: "t".into(),
        classes,
        examples,
        heads,
    }
}

fn refused(bytes: &[u8]) -> String {
    let e = TenantFile::decode(bytes).expect_err("a bad file was accepted");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    e.to_string()
}

/// `sample()` with its metadata entry `key` replaced by `value`.
fn with_meta(key: &str, value: &str) -> Vec<u8> {
    let bytes = sample().encode().unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    meta.insert(key.into(), value.into());
    let views: Vec<_> = st.tensors();
    safetensors::serialize(views, Some(meta)).unwrap()
}

#[test]
fn a_file_round_trips_exactly() {
    let file = sample();
    let back = TenantFile::decode(&file.encode().unwrap()).unwrap();
    assert_eq!(
        (back.model.as_str(), back.dim, back.tenant.as_str()),
        (M, DIM, "t")
    );
    assert_eq!(back.classes, file.classes);
    assert_eq!(back.examples, file.examples);
    assert_eq!(back.heads.len(), HeadKind::ALL.len());
    let x: Vec<f32> = (0..DIM).map(|d| d as f32 * 0.3).collect();
    for (a, b) in file.heads.iter().zip(&back.heads) {
        assert_eq!(a.meta.kind, b.meta.kind);
        assert_eq!(a.meta.classes, b.meta.classes);
        let (pa, pb) = (a.predict(M, &x).unwrap(), b.predict(M, &x).unwrap());
        assert_eq!(pa.probs, pb.probs, "{} answers differently", a.meta.kind);
    }
    assert_eq!(
        back.trained_kinds().len(),
        HeadKind::ALL.len() - 1,
        "the prototype is not a trained kind"
    );
}

#[test]
fn the_format_and_its_version_are_checked() {
    assert!(refused(&with_meta("format", "other")).contains("expected `taxon-heads`"));
    let msg = refused(&with_meta("format_version", "2"));
    assert!(
        msg.contains("version 2") && msg.contains("reads version 1"),
        "{msg}"
    );
    assert!(refused(b"not a file at all").contains("tenant file"));
    assert!(refused(&[]).contains("tenant file"));
    let no_meta =
        safetensors::serialize([("x", Tensor::new(&[1f32], &Device::Cpu).unwrap())], None).unwrap();
    assert!(refused(&no_meta).contains("no __metadata__"));
    let bytes = sample().encode().unwrap();
    refused(&bytes[..bytes.len() - 10]);
}

#[test]
fn classes_must_be_valid_unique_and_parents_first() {
    let json = |c: &[FileClass]| serde_json::to_string(c).unwrap();
    let mut c = sample().classes;
    c[1].parent = Some(2);
    assert!(refused(&with_meta("classes", &json(&c))).contains("parents come first"));
    let mut c = sample().classes;
    c[2].name = "beagle".into();
    assert!(refused(&with_meta("classes", &json(&c))).contains("`beagle` twice"));
    let mut c = sample().classes;
    c[3].name = "bad\nname".into();
    assert!(refused(&with_meta("classes", &json(&c))).contains("invalid class name"));
    let mut c = sample().classes;
    c[3].parent = Some(1);
    assert!(refused(&with_meta("classes", &json(&c))).contains("has a parent itself"));
    // Photos of a parent: `tabby` becomes one by having a child.
    let mut c = sample().classes;
    c.push(FileClass {
        name: "kitten".into(),
        parent: Some(3),
        examples: 0,
    });
    assert!(refused(&with_meta("classes", &json(&c))).contains("which is a parent"));
    // An example of a class the file does not have.
    let c = &sample().classes[..2];
    assert!(refused(&with_meta("classes", &json(c))).contains("class index"));
}

#[test]
fn a_file_without_examples_is_refused() {
    let mut file = sample();
    file.examples.clear();
    file.heads.clear();
    assert!(refused(&file.encode().unwrap()).contains("no examples"));
}

#[test]
fn heads_must_match_the_file() {
    let metas = |f: &dyn Fn(&mut HeadMeta)| {
        let mut m: Vec<HeadMeta> = sample().heads.iter().map(|h| h.meta.clone()).collect();
        f(&mut m[1]);
        serde_json::to_string(&m).unwrap()
    };
    let msg = refused(&with_meta(
        "heads",
        &metas(&|m| m.model = "other@sha256:11".into()),
    ));
    assert!(msg.contains("other@sha256:11") && msg.contains(M), "{msg}");
    assert!(refused(&with_meta("heads", &metas(&|m| m.classes[0] = 0))).contains("no examples"));
    assert!(refused(&with_meta("heads", &metas(&|m| m.groups[0] = 99))).contains("group 99"));
    // One class fewer than the head's tensors have outputs.
    let msg = refused(&with_meta(
        "heads",
        &metas(&|m| {
            m.classes.pop();
            m.class_group.pop();
        }),
    ));
    assert!(msg.contains("outputs for 2 classes"), "{msg}");
    let msg = refused(&with_meta(
        "heads",
        &metas(&|m| m.kind = "prototype".into()),
    ));
    assert!(msg.contains("two `prototype` heads"), "{msg}");
    assert!(refused(&with_meta("dim", "0")).contains("dim 0"));
    assert!(refused(&with_meta("dim", "1000000000000")).contains("expected 1 to 65536"));
    assert!(refused(&with_meta("dim", "9")).contains("expected F32"));
}
