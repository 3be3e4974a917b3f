//! The store contract, run against every implementation: transactions, tenant isolation,
//! rename/remove without photos, reopen. Each test is a function of a [`Fixture`];
//! `for_every_store!` instantiates all of them for each store, so a new store is one line
//! there and cannot skip a test.

use super::*;
use crate::Error;

/// A database for one test. `open` may be called again, once the previous handle is dropped,
/// to reopen the same database (what a restart sees).
trait Fixture {
    fn open(&self) -> Box<dyn Store>;
}

struct Redb(tempfile::TempDir);

impl Fixture for Redb {
    fn open(&self) -> Box<dyn Store> {
        Box::new(RedbStore::open(self.0.path()).unwrap())
    }
}

fn redb() -> Redb {
    Redb(tempfile::tempdir().unwrap())
}

/// A PostgreSQL server of its own per test, so that tests run in parallel and a reopen is
/// a new pool on the same database.
struct Postgres(super::postgres::testdb::TestPostgres);

impl Fixture for Postgres {
    fn open(&self) -> Box<dyn Store> {
        let options = PoolOptions {
            max_connections: 2,
            timeout: std::time::Duration::from_secs(10),
            ca_file: None,
        };
        Box::new(PostgresStore::connect(&self.0.url(), &options).unwrap())
    }
}

/// `None` (skip) without PostgreSQL, outside CI; in CI a missing PostgreSQL fails.
fn postgres() -> Option<Postgres> {
    super::postgres::testdb::TestPostgres::start().map(Postgres)
}

macro_rules! for_every_store {
    ($($test:ident),* $(,)?) => {
        mod redb {
            $( #[test] fn $test() { super::$test(&super::redb()); } )*
        }
        mod postgres {
            $( #[test] fn $test() {
                if let Some(f) = super::postgres() {
                    super::$test(&f);
                }
            } )*
        }
    };
}

for_every_store!(
    enroll_creates_class_parent_and_examples_in_one_go,
    failed_enroll_writes_nothing,
    tenants_are_isolated,
    rename_and_remove_need_no_photos_and_survive_reopen,
    head_versions_are_fresh_per_tenant_and_one_head_per_kind,
    quotas_refuse_the_whole_enroll_and_count_per_tenant,
    import_writes_a_whole_tenant_with_fresh_ids_in_order,
    import_is_refused_whole_unless_the_tenant_is_empty_and_within_quotas,
);

const M: &str = "mobilenet_v2@sha256:00";

fn h(i: u8) -> Hash {
    [i; 32]
}

fn write<'a>(class: &'a str, parent: Option<&'a str>, photos: &[u8]) -> EnrollWrite<'a> {
    EnrollWrite {
        class_name: class,
        parent,
        model: M,
        examples: photos
            .iter()
            .map(|&i| (h(i), vec![f32::from(i); 4]))
            .collect(),
        quotas: crate::quota::Quotas::unlimited(),
    }
}

/// [`write`] under `quotas`.
fn limited<'a>(
    class: &'a str,
    parent: Option<&'a str>,
    photos: &[u8],
    quotas: crate::quota::Quotas,
) -> EnrollWrite<'a> {
    EnrollWrite {
        quotas,
        ..write(class, parent, photos)
    }
}

fn quotas_refuse_the_whole_enroll_and_count_per_tenant(f: &dyn Fixture) {
    use crate::quota::Quotas;
    let s = f.open();
    let q = Quotas {
        classes: 3,
        examples: 4,
        stored_bytes: 4 * 4 * 4,
        ..Quotas::unlimited()
    };
    s.enroll("t", &limited("beagle", Some("dog"), &[1, 2], q))
        .unwrap();
    // A fourth class (a new child under a new parent would make four).
    let e = s
        .enroll("t", &limited("tabby", Some("cat"), &[3], q))
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    let msg = e.to_string();
    assert!(
        msg.contains("quota of 3 classes") && msg.contains("--quota-classes"),
        "{msg}"
    );
    // A fifth example: refused whole, the class it would have created with it too.
    s.enroll("t", &limited("pug", Some("dog"), &[3, 4], q))
        .unwrap();
    let e = s.enroll("t", &limited("pug", None, &[5], q)).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("quota of 4 examples") && msg.contains("--quota-examples"),
        "{msg}"
    );
    // Photos the class already has are not new examples.
    s.enroll("t", &limited("pug", None, &[3, 4], q)).unwrap();
    let snap = s.snapshot("t", Some(M)).unwrap();
    assert_eq!(snap.examples.len(), 4);
    assert_eq!(snap.taxonomy.classes.len(), 3);
    assert!(
        snap.taxonomy.by_name("cat").is_none(),
        "a refused enroll left its parent"
    );
    // Bytes: 4 examples of 4 floats is the limit; one dimension more is over it.
    let wide = EnrollWrite {
        examples: vec![(h(3), vec![3.0; 5])],
        ..limited("pug", None, &[], q)
    };
    let msg = s.enroll("t", &wide).unwrap_err().to_string();
    assert!(msg.contains("--quota-stored-bytes"), "{msg}");
    // Another tenant has its own quota.
    s.enroll("u", &limited("beagle", Some("dog"), &[1, 2], q))
        .unwrap();
}

fn enroll_creates_class_parent_and_examples_in_one_go(f: &dyn Fixture) {
    let s = f.open();
    let o = s
        .enroll("t", &write("beagle", Some("dog"), &[1, 2, 3]))
        .unwrap();
    assert_eq!(o.examples, 3);
    assert_eq!(o.parent.as_deref(), Some("dog"));
    let snap = s.snapshot("t", Some(M)).unwrap();
    let tax = &snap.taxonomy;
    let dog = tax.by_name("dog").unwrap();
    let beagle = tax.by_name("beagle").unwrap();
    assert_eq!(beagle.parent, Some(dog.id));
    assert!(tax.is_parent(dog.id));
    assert_eq!(tax.examples_under(dog.id), 3);
    assert_eq!(tax.leaves(), vec![beagle.id]);
    assert_eq!(snap.examples.len(), 3);
    assert_eq!(s.embedding("t", &h(2), M).unwrap(), Some(vec![2.0; 4]));
    assert!(s.size_bytes().unwrap() > 0, "the store's size is known");
    // The same photos again: still three examples.
    assert_eq!(
        s.enroll("t", &write("beagle", None, &[1, 2]))
            .unwrap()
            .examples,
        3
    );
}

fn failed_enroll_writes_nothing(f: &dyn Fixture) {
    let s = f.open();
    s.enroll("t", &write("beagle", Some("dog"), &[1])).unwrap();
    // A parent cannot receive photos, and a class cannot change parent: both abort whole.
    assert!(s.enroll("t", &write("dog", None, &[9])).is_err());
    assert!(s.enroll("t", &write("beagle", Some("cat"), &[8])).is_err());
    let snap = s.snapshot("t", Some(M)).unwrap();
    assert!(
        snap.taxonomy.by_name("cat").is_none(),
        "no parent created by a failed enroll"
    );
    assert_eq!(snap.examples.len(), 1);
    assert_eq!(s.embedding("t", &h(8), M).unwrap(), None);
}

fn tenants_are_isolated(f: &dyn Fixture) {
    let s = f.open();
    s.enroll("a", &write("x", None, &[1])).unwrap();
    s.enroll("ab", &write("y", None, &[2])).unwrap();
    let a = s.snapshot("a", Some(M)).unwrap();
    assert_eq!(a.taxonomy.classes.len(), 1);
    assert_eq!(a.examples.len(), 1);
    assert_eq!(s.embedding("a", &h(2), M).unwrap(), None);
    assert!(s.remove_class("a", "y", false).is_err());
    assert!(
        s.snapshot("b", Some(M))
            .unwrap()
            .taxonomy
            .classes
            .is_empty()
    );
}

fn rename_and_remove_need_no_photos_and_survive_reopen(f: &dyn Fixture) {
    {
        let s = f.open();
        s.enroll("t", &write("beagle", Some("dog"), &[1, 2]))
            .unwrap();
        s.enroll("t", &write("pug", Some("dog"), &[3, 2])).unwrap();
        s.enroll("t", &write("tabby", Some("cat"), &[4])).unwrap();
        let id = s
            .snapshot("t", None)
            .unwrap()
            .taxonomy
            .by_name("pug")
            .unwrap()
            .id;
        s.rename_class("t", "pug", "mops").unwrap();
        let tax = s.snapshot("t", None).unwrap().taxonomy;
        assert_eq!(tax.by_name("mops").unwrap().id, id, "rename keeps the id");
        assert_eq!(tax.by_name("mops").unwrap().examples, 2);
        assert!(matches!(
            s.rename_class("t", "mops", "beagle"),
            Err(Error::AlreadyExists(_))
        ));
        assert!(matches!(
            s.rename_class("t", "nope", "x"),
            Err(Error::UnknownClass(_))
        ));
        assert!(matches!(
            s.remove_class("t", "dog", false),
            Err(Error::Precondition(_))
        ));
        let r = s.remove_class("t", "dog", true).unwrap();
        assert_eq!(r.removed_classes.len(), 3);
        assert_eq!(r.removed_examples, 4);
        let version = s
            .save_head("t", "flat", &mut |v| Ok(v.to_le_bytes().to_vec()))
            .unwrap();
        assert!(version > 0);
    }
    let s = f.open();
    let snap = s.snapshot("t", Some(M)).unwrap();
    let names: Vec<_> = snap
        .taxonomy
        .classes
        .values()
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(names, vec!["cat", "tabby"]);
    assert_eq!(snap.examples.len(), 1);
    assert_eq!(
        s.embedding("t", &h(2), M).unwrap(),
        None,
        "orphaned embeddings dropped"
    );
    let heads = s.heads("t").unwrap();
    assert_eq!(heads.len(), 1);
    assert_eq!(heads[0].0, "flat");
    // Ids are never reused.
    let o = s.enroll("t", &write("new", None, &[7])).unwrap();
    assert!(o.class_id > 5);
}

fn head_versions_are_fresh_per_tenant_and_one_head_per_kind(f: &dyn Fixture) {
    let s = f.open();
    let o = s.enroll("t", &write("x", None, &[1])).unwrap();
    let before = s.snapshot("t", None).unwrap().taxonomy;
    assert_eq!(before.revision, o.revision);
    let save = |tenant: &str, kind: &str| {
        s.save_head(tenant, kind, &mut |v| Ok(format!("{kind}{v}").into_bytes()))
            .unwrap()
    };
    let v1 = save("t", "flat");
    assert!(
        v1 > before.prototype_version,
        "one version sequence for the prototype and every kind"
    );
    let v2 = save("t", "flat");
    let v3 = save("t", "hierarchical");
    assert!(v1 < v2 && v2 < v3);
    save("u", "flat");
    let mut heads = s.heads("t").unwrap();
    heads.sort();
    assert_eq!(
        heads,
        vec![
            ("flat".to_string(), format!("flat{v2}").into_bytes()),
            (
                "hierarchical".to_string(),
                format!("hierarchical{v3}").into_bytes()
            ),
        ],
        "the latest head of each kind, with the version it was handed"
    );
    let after = s.snapshot("t", None).unwrap().taxonomy;
    assert_eq!(
        after.revision, before.revision,
        "a head does not move the examples' revision"
    );
    assert!(after.seq > before.seq, "a saved head is a write");
    assert_eq!(s.heads("nobody").unwrap(), vec![]);
}

/// `dog` (parent) with `beagle` (photos 1, 2) and `pug` (3), and `tabby` (4) on its own.
fn import_write(quotas: crate::quota::Quotas) -> ImportWrite<'static> {
    let class = |name: &str, parent, photos: &[u8]| ImportClass {
        name: name.into(),
        parent,
        examples: photos
            .iter()
            .map(|&i| (h(i), vec![f32::from(i); 4]))
            .collect(),
    };
    ImportWrite {
        model: M,
        classes: vec![
            class("dog", None, &[]),
            class("beagle", Some(0), &[1, 2]),
            class("pug", Some(0), &[3]),
            class("tabby", None, &[4]),
        ],
        heads: vec!["flat".into()],
        quotas,
    }
}

fn import_writes_a_whole_tenant_with_fresh_ids_in_order(f: &dyn Fixture) {
    let s = f.open();
    // A tenant that had a class and a head, and then removed the class: empty, but its head
    // and its counters are still there.
    s.enroll("t", &write("old", None, &[9])).unwrap();
    s.save_head("t", "hierarchical", &mut |v| Ok(v.to_le_bytes().to_vec()))
        .unwrap();
    s.remove_class("t", "old", false).unwrap();
    let before = s.snapshot("t", None).unwrap().taxonomy;
    let mut stamps = Vec::new();
    let o = s
        .import(
            "t",
            &import_write(crate::quota::Quotas::unlimited()),
            &mut |kind, st| {
                stamps.push((st.ids.to_vec(), st.revision, st.version));
                Ok(format!("{kind}{}", st.version).into_bytes())
            },
        )
        .unwrap();
    assert_eq!(o.ids.len(), 4);
    assert!(
        o.ids.windows(2).all(|w| w[0] < w[1]),
        "ids in the write's order"
    );
    assert!(o.ids[0] > 1, "ids are never reused, across an import too");
    let snap = s.snapshot("t", Some(M)).unwrap();
    let tax = &snap.taxonomy;
    let names: Vec<_> = tax.classes.values().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["dog", "beagle", "pug", "tabby"]);
    assert_eq!(tax.by_name("pug").unwrap().parent, Some(o.ids[0]));
    assert_eq!(tax.by_name("tabby").unwrap().parent, None);
    assert_eq!(tax.leaves(), o.ids[1..].to_vec());
    assert_eq!(snap.hashes, vec![h(1), h(2), h(3), h(4)]);
    assert_eq!(snap.examples[2], (o.ids[2], vec![3.0; 4]));
    assert_eq!(s.embedding("t", &h(4), M).unwrap(), Some(vec![4.0; 4]));
    assert_eq!(tax.revision, o.revision);
    assert!(tax.revision > before.revision && tax.seq > before.seq);
    let (version,) = (o.heads[0].1,);
    assert_eq!(o.heads, vec![("flat".to_string(), version)]);
    assert_eq!(stamps, vec![(o.ids.clone(), o.revision, version)]);
    assert!(version > tax.prototype_version, "one version sequence");
    assert_eq!(
        s.heads("t").unwrap(),
        vec![("flat".to_string(), format!("flat{version}").into_bytes())],
        "the imported head, and the old tenant's head gone"
    );
}

fn import_is_refused_whole_unless_the_tenant_is_empty_and_within_quotas(f: &dyn Fixture) {
    use crate::quota::Quotas;
    let s = f.open();
    let mut never = |_: &str, _: &HeadStamp<'_>| -> crate::Result<Vec<u8>> {
        panic!("no head is encoded for a refused import")
    };
    s.enroll("t", &write("x", None, &[1])).unwrap();
    let e = s
        .import("t", &import_write(Quotas::unlimited()), &mut never)
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.to_string().contains("has 1 classes"), "{e}");
    let snap = s.snapshot("t", Some(M)).unwrap();
    assert_eq!((snap.taxonomy.classes.len(), snap.examples.len()), (1, 1));
    for (q, flag) in [
        (
            Quotas {
                classes: 3,
                ..Quotas::unlimited()
            },
            "--quota-classes",
        ),
        (
            Quotas {
                examples: 3,
                ..Quotas::unlimited()
            },
            "--quota-examples",
        ),
        (
            Quotas {
                stored_bytes: 3 * 4 * 4,
                ..Quotas::unlimited()
            },
            "--quota-stored-bytes",
        ),
    ] {
        let e = s.import("u", &import_write(q), &mut never).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.to_string().contains(flag), "{e}");
    }
    // A head that fails to encode aborts the whole import, classes and examples with it.
    let e = s
        .import("u", &import_write(Quotas::unlimited()), &mut |_, _| {
            Err(Error::Corrupt("no bytes".into()))
        })
        .unwrap_err();
    assert!(e.to_string().contains("no bytes"));
    let snap = s.snapshot("u", Some(M)).unwrap();
    assert!(snap.taxonomy.classes.is_empty() && snap.examples.is_empty());
    assert_eq!(s.embedding("u", &h(1), M).unwrap(), None);
    assert!(s.heads("u").unwrap().is_empty());
    // Exactly at the quotas is allowed.
    let q = Quotas {
        classes: 4,
        examples: 4,
        stored_bytes: 4 * 4 * 4,
        ..Quotas::unlimited()
    };
    s.import("u", &import_write(q), &mut |_, _| Ok(vec![1]))
        .unwrap();
}
