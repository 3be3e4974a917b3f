//! The `client` commands in-process against both real services (a MobileNetV2 feature-server
//! with formula weights and a head-trainer, on 127.0.0.1:0): what a user and a script see.
//! The client's own edge cases are tested against a scripted server in client/tests.

use std::path::Path;

use serde_json::Value;
use taxon_client::Outcome;
use taxon_tests::{Pattern, photos, shared_feature_server, start_head_trainer};

async fn client(args: &[&str]) -> (taxon_client::Result<Outcome>, String) {
    taxon_tests::run_client(args).await
}

fn json_lines(out: &str) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Writes synthetic photos into `dir` as files, as a user's folder would hold them.
fn write_photos(dir: &Path, pattern: Pattern, rgb: [u8; 3], n: usize, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    for (i, bytes) in photos(pattern, rgb, n, seed).into_iter().enumerate() {
        std::fs::write(dir.join(format!("{i}.png")), bytes).unwrap();
    }
}

fn config(data: &Path) -> head_trainer::Config {
    head_trainer::Config::new(vec![shared_feature_server()], data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_classify_classes_manage_health_info() {
    let dir = tempfile::tempdir().unwrap();
    let ht = start_head_trainer(config(&dir.path().join("data"))).await;
    let url = ht.url();
    let (r, out) = client(&["--server", &url, "health", "--wait", "120"]).await;
    assert_eq!(r.unwrap(), Outcome::Success, "{out}");

    let red = dir.path().join("red");
    write_photos(&red, Pattern::Solid, [220, 30, 30], 3, 1);
    std::fs::write(red.join("notes.txt"), "not a photo").unwrap();
    let blue = dir.path().join("blue");
    write_photos(&blue, Pattern::Stripes, [30, 30, 220], 3, 2);
    let s = |p: &Path| p.to_string_lossy().to_string();
    let base = ["--server", url.as_str(), "--tenant", "cli", "--json"];
    let run = |rest: Vec<String>| {
        let args: Vec<String> = base.iter().map(|s| s.to_string()).chain(rest).collect();
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            client(&refs).await
        }
    };
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    let (r, out) = run(args(&[
        "enroll",
        "--class",
        "red",
        "--parent",
        "colours",
        &s(&red),
    ]))
    .await;
    assert_eq!(r.unwrap(), Outcome::Success, "{out}");
    let v = &json_lines(&out)[0];
    assert_eq!(v["class"], "red");
    assert_eq!(v["parent"], "colours");
    assert_eq!(v["accepted"], 3);
    assert_eq!(v["rejected"].as_array().unwrap().len(), 0);
    assert!(v["head_version"].is_u64());
    assert!(
        v["skipped"][0]["path"]
            .as_str()
            .unwrap()
            .ends_with("notes.txt")
    );

    let (r, out) = run(args(&[
        "enroll",
        "--class",
        "blue",
        "--parent",
        "colours",
        "--wait",
        &s(&blue),
    ]))
    .await;
    assert_eq!(r.unwrap(), Outcome::Success, "{out}");
    assert_eq!(json_lines(&out)[0]["accepted"], 3);

    let fresh = dir.path().join("fresh");
    write_photos(&fresh.join("r"), Pattern::Solid, [220, 30, 30], 1, 7);
    write_photos(&fresh.join("b"), Pattern::Stripes, [30, 30, 220], 1, 8);
    let (r, out) = run(args(&["classify", "--top-k", "2", &s(&fresh)])).await;
    assert_eq!(r.unwrap(), Outcome::Success, "{out}");
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 2);
    for line in &lines {
        assert!(
            ["child", "parent", "unknown"].contains(&line["decision"].as_str().unwrap()),
            "{line}"
        );
        assert!(
            line["label"].is_string() && line["parent"].is_string(),
            "{line}"
        );
        assert!(line["probability"].is_f64(), "{line}");
    }
    assert!(
        lines[0]["image"].as_str().unwrap().ends_with("b/0.png"),
        "order as given (sorted folder)"
    );
    assert_eq!(lines[0]["top"][0]["name"], "blue", "{}", lines[0]);
    assert_eq!(lines[1]["top"][0]["name"], "red", "{}", lines[1]);

    // The tenant as a file, into another server: the same answers, no photo sent again.
    let file = dir.path().join("cli.taxon");
    let (r, out) = run(args(&["export", &s(&file)])).await;
    assert_eq!(r.unwrap(), Outcome::Success, "{out}");
    assert_eq!(
        json_lines(&out)[0]["bytes"],
        std::fs::metadata(&file).unwrap().len()
    );
    let other = start_head_trainer(config(&dir.path().join("other"))).await;
    let on_other = |rest: &[&str]| {
        let mut a = vec![
            "--server".to_string(),
            other.url(),
            "--tenant".into(),
            "cli".into(),
        ];
        a.push("--json".into());
        a.extend(rest.iter().map(|s| s.to_string()));
        async move {
            let refs: Vec<&str> = a.iter().map(String::as_str).collect();
            client(&refs).await
        }
    };
    let (r, out) = on_other(&["import", &s(&file)]).await;
    assert_eq!(r.unwrap(), Outcome::Success, "{out}");
    let imported = &json_lines(&out)[0];
    assert_eq!(
        (imported["classes"].as_u64(), imported["examples"].as_u64()),
        (Some(3), Some(6))
    );
    let (r, again) = on_other(&["classify", "--top-k", "2", &s(&fresh)]).await;
    assert_eq!(r.unwrap(), Outcome::Success, "{again}");
    let without_version = |mut v: Value| {
        v.as_object_mut().unwrap().remove("head_version");
        v
    };
    assert_eq!(
        json_lines(&again)
            .into_iter()
            .map(without_version)
            .collect::<Vec<_>>(),
        lines
            .clone()
            .into_iter()
            .map(without_version)
            .collect::<Vec<_>>(),
        "the imported tenant answers as the exported one did"
    );
    let (r, _) = on_other(&["import", &s(&file)]).await;
    assert!(
        r.unwrap_err()
            .to_string()
            .contains("import only into an empty tenant")
    );
    other.stop().await;

    let (r, out) = run(args(&["classes"])).await;
    assert_eq!(r.unwrap(), Outcome::Success);
    let classes: Value = serde_json::from_str(out.trim()).unwrap();
    let red_entry = classes
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "red")
        .unwrap();
    assert_eq!(red_entry["parent"], "colours");
    assert_eq!(red_entry["examples"], 3);

    let (r, out) = run(args(&["info"])).await;
    assert_eq!(r.unwrap(), Outcome::Success);
    assert!(
        json_lines(&out)[0]["model"]
            .as_str()
            .unwrap()
            .starts_with("mobilenet_v2@sha256:")
    );
    let features = shared_feature_server();
    let (r, out) = run(args(&["info", "--features", &features])).await;
    assert_eq!(r.unwrap(), Outcome::Success);
    assert_eq!(json_lines(&out)[0]["backbone"], "mobilenet_v2");

    let (r, _) = run(args(&["rename", "red", "crimson"])).await;
    assert_eq!(r.unwrap(), Outcome::Success);
    let (r, _) = run(args(&["remove", "colours"])).await;
    assert!(r.is_err(), "a parent needs --recursive");
    let (r, out) = run(args(&["remove", "colours", "--recursive"])).await;
    assert_eq!(r.unwrap(), Outcome::Success);
    let removed = json_lines(&out)[0]["removed_classes"].clone();
    assert!(
        removed.as_array().unwrap().iter().any(|c| c == "crimson"),
        "{removed}"
    );
    let (_, out) = run(args(&["classes"])).await;
    assert_eq!(out.trim(), "[]");
    ht.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_servers_ask_for_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "s3cret acme\n").unwrap();
    let mut c = config(&dir.path().join("data"));
    c.tokens_file = Some(tokens);
    let ht = start_head_trainer(c).await;
    let url = ht.url();
    let (r, _) = client(&["--server", &url, "health", "--wait", "120"]).await;
    assert_eq!(r.unwrap(), Outcome::Success);
    let (r, _) = client(&["--server", &url, "classes"]).await;
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("--token"), "{msg}");
    let (r, _) = client(&["--server", &url, "--token", "s3cret", "classes"]).await;
    assert_eq!(r.unwrap(), Outcome::Success);
    ht.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_compares_every_head_and_writes_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let ht = start_head_trainer(config(&dir.path().join("data"))).await;
    let url = ht.url();
    let (r, _) = client(&["--server", &url, "health", "--wait", "120"]).await;
    assert_eq!(r.unwrap(), Outcome::Success);
    let root = dir.path().join("toy");
    let set = [
        ("warm", "red", Pattern::Solid, [220, 30, 30]),
        ("warm", "orange", Pattern::Stripes, [240, 150, 20]),
        ("cool", "blue", Pattern::Solid, [30, 30, 220]),
        ("cool", "chess", Pattern::Checker, [0, 0, 0]),
    ];
    for (i, (parent, child, pattern, rgb)) in set.into_iter().enumerate() {
        write_photos(
            &root.join(parent).join(child),
            pattern,
            rgb,
            4,
            10 + i as u64,
        );
    }
    // Twice, each run writing its embeddings, splits and answers: the second must print
    // exactly what the first did (every head trained from scratch, classes in a fixed order).
    let mut answers = Vec::new();
    for run in ["a", "b"] {
        let out_dir = dir.path().join(format!("report-{run}"));
        let dump = dir.path().join(format!("dump-{run}"));
        let (r, out) = client(&[
            "--server",
            &url,
            "eval",
            &root.to_string_lossy(),
            "--shots",
            "1,2",
            "--seeds",
            "2",
            "--out",
            &out_dir.to_string_lossy(),
            "--save-embeddings",
            &dump.to_string_lossy(),
        ])
        .await;
        assert_eq!(r.unwrap(), Outcome::Success, "{out}");
        let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
        for needle in [
            "## k = 1 (12 test photos per seed)",
            "## k = 2",
            "| prototype |",
            "| flat |",
            "| hierarchical |",
            "| warm | red |",
            "| ECE |",
        ] {
            assert!(md.contains(needle), "{needle:?} missing from:\n{md}");
        }
        for png in ["confusion.png", "accuracy_vs_k.png"] {
            image::open(out_dir.join(png)).unwrap();
        }
        check_dump(&dump, &root);
        answers.push(answers_of(&dump));
    }
    assert_eq!(answers[0], answers[1], "two runs answered differently");
    ht.stop().await;
}

/// `eval --save-embeddings`: one embedding per photo, each found by the sha256 that
/// photos.tsv gives it; splits and answers for every (k, seed) and head.
fn check_dump(dump: &Path, root: &Path) {
    use sha2::{Digest, Sha256};
    let file = std::fs::read(dump.join("embeddings.safetensors")).unwrap();
    let tf = head_trainer::tenant_file::TenantFile::decode(&file).unwrap();
    let tsv = std::fs::read_to_string(dump.join("photos.tsv")).unwrap();
    let rows: Vec<Vec<&str>> = tsv
        .lines()
        .skip(1)
        .map(|l| l.split('\t').collect())
        .collect();
    assert_eq!(rows.len(), 16, "{tsv}");
    assert_eq!(tf.examples.len(), 16);
    for row in &rows {
        let bytes = std::fs::read(root.join(row[0])).unwrap();
        let hex: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(row[3], hex, "{row:?}");
        let example = tf
            .examples
            .iter()
            .find(|e| {
                e.hash
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
                    == hex
            })
            .unwrap_or_else(|| panic!("no embedding for {row:?}"));
        assert_eq!(tf.classes[example.class].name, row[2]);
        assert_eq!(example.embedding.len(), tf.dim);
    }
    let splits: Vec<Value> =
        json_lines(&std::fs::read_to_string(dump.join("splits.jsonl")).unwrap());
    assert_eq!(splits.len(), 4, "k = 1, 2 by seeds 0, 1");
    for sp in &splits {
        let k = sp["k"].as_u64().unwrap() as usize;
        assert_eq!(sp["train"].as_array().unwrap().len(), 4 * k);
        assert_eq!(sp["test"].as_array().unwrap().len(), 4 * (4 - k));
    }
    // The default head and the five kinds, for each of the four splits.
    assert_eq!(answers_of(dump).len(), 24);
}

/// Every head's answers in predictions.jsonl, without the training times.
fn answers_of(dump: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(dump.join("predictions.jsonl")).unwrap();
    json_lines(&text)
        .into_iter()
        .map(|mut v| {
            v.as_object_mut().unwrap().remove("train_ms");
            v
        })
        .collect()
}

/// `client report`: a checkerboard photo enrolled as `red` is the suspect, named by its file,
/// nearer `chess` than `red`; `red`'s estimate drops below the clean classes'; the Enroll
/// reply already carried that estimate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_names_the_mislabelled_photo() {
    let dir = tempfile::tempdir().unwrap();
    let ht = start_head_trainer(config(&dir.path().join("data"))).await;
    let url = ht.url();
    let (r, _) = client(&["--server", &url, "health", "--wait", "120"]).await;
    assert_eq!(r.unwrap(), Outcome::Success);
    let red = dir.path().join("red");
    write_photos(&red, Pattern::Solid, [220, 30, 30], 4, 1);
    let chess = dir.path().join("chess");
    write_photos(&chess, Pattern::Checker, [0, 0, 0], 4, 2);
    let blue = dir.path().join("blue");
    write_photos(&blue, Pattern::Stripes, [30, 30, 220], 4, 3);
    // The mislabelled one: a checkerboard among the red photos.
    let stray = red.join("stray.png");
    std::fs::write(&stray, photos(Pattern::Checker, [0, 0, 0], 1, 9).remove(0)).unwrap();
    let s = |p: &Path| p.to_string_lossy().to_string();
    let base = ["--server", url.as_str(), "--tenant", "report", "--json"];
    let mut estimates = Vec::new();
    for (class, path) in [("chess", &chess), ("blue", &blue), ("red", &red)] {
        let mut args: Vec<String> = base.iter().map(|a| a.to_string()).collect();
        args.extend(["enroll", "--class", class, &s(path)].map(String::from));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (r, out) = client(&refs).await;
        assert_eq!(r.unwrap(), Outcome::Success, "{out}");
        estimates.push(json_lines(&out)[0]["estimated_accuracy"].clone());
    }
    assert!(
        estimates[0].is_null(),
        "one class: nothing to confuse it with"
    );
    assert_eq!(estimates[1].as_f64(), Some(1.0), "{estimates:?}");
    let red_estimate = estimates[2].as_f64().unwrap();
    assert!(red_estimate < 1.0, "{estimates:?}");

    let mut args: Vec<String> = base.iter().map(|a| a.to_string()).collect();
    args.extend(["report".to_string(), s(dir.path())]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (r, out) = client(&refs).await;
    assert_eq!(r.unwrap(), Outcome::Success, "{out}");
    let v = &json_lines(&out)[0];
    let suspects = v["suspects"].as_array().unwrap();
    assert_eq!(suspects.len(), 1, "{v}");
    assert_eq!(suspects[0]["class"], "red");
    assert_eq!(suspects[0]["nearer_class"], "chess");
    assert_eq!(suspects[0]["file"].as_str(), Some(s(&stray).as_str()));
    let class = |name: &str| {
        v["classes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing from {v}"))
            .clone()
    };
    let red_accuracy = class("red")["accuracy"].as_f64().unwrap();
    assert!(
        (red_accuracy - red_estimate).abs() < 1e-6,
        "{red_accuracy} vs {red_estimate}"
    );
    assert_eq!(class("red")["confused_with"], "chess");
    assert_eq!(class("red")["examples"], 5);
    assert_eq!(class("blue")["accuracy"].as_f64(), Some(1.0));
    assert_eq!(class("blue")["needs_more_photos"], true, "four photos");
    assert_eq!(v["checked"], 13);
    assert_eq!(v["confused"][0]["a"], "chess");
    assert_eq!(v["confused"][0]["b"], "red");
    assert_eq!(v["confused"][0]["b_taken_for_a"], 1);

    // The same report as a person reads it.
    let (r, out) = client(&[
        "--server",
        &url,
        "--tenant",
        "report",
        "report",
        &s(dir.path()),
    ])
    .await;
    assert_eq!(r.unwrap(), Outcome::Success, "{out}");
    assert!(out.contains("stray.png (red): nearer chess"), "{out}");
    assert!(out.contains("needs more photos"), "{out}");
    ht.stop().await;
}
