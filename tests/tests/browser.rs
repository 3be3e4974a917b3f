//! The web page in a real browser: headless Chromium driven over WebDriver against both
//! services started here on loopback, with the real MobileNetV2 weights and real photos.
//! Through the page only (file picker, buttons, the fake camera), it enrolls two breeds,
//! classifies a held-out photo of each and reads the label the page shows; then the error
//! paths a person meets (a file that is not an image, in an upload and in a classify) and
//! the camera. Screenshots go to `target/browser/` (the README shows them).
//!
//! Needs chromedriver and Chromium (Debian's `chromium-driver`), `weights/mobilenet_v2.safetensors`
//! (`feature-server fetch-weights mobilenet_v2 --out weights`) and `../shared/datasets/pets`:
//! `.ci/run` provides all three, and in CI (`CI=true`) a missing one fails the test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use feature_server::models::BackboneKind;
use taxon_tests::webdriver::{Driver, Session};
use taxon_tests::{start_feature_server, start_head_trainer_http, within};

const WAIT: Duration = Duration::from_secs(90);

/// What the test needs from the machine, or why it cannot run.
struct Inputs {
    chromedriver: String,
    chromium: String,
    weights: PathBuf,
    pets: PathBuf,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn on_path(name: &str) -> Option<String> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
}

fn inputs() -> Result<Inputs, String> {
    let chromedriver = std::env::var("TAXON_CHROMEDRIVER")
        .ok()
        .or_else(|| on_path("chromedriver"))
        .ok_or("chromedriver not found (apt-get install chromium-driver, or TAXON_CHROMEDRIVER)")?;
    let chromium = std::env::var("TAXON_CHROMIUM")
        .ok()
        .or_else(|| on_path("chromium"))
        .ok_or("chromium not found (apt-get install chromium, or TAXON_CHROMIUM)")?;
    let weights = std::env::var_os("TAXON_MOBILENET_WEIGHTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("weights/mobilenet_v2.safetensors"));
    if !weights.is_file() {
        return Err(format!(
            "{} not found (feature-server fetch-weights mobilenet_v2 --out weights)",
            weights.display()
        ));
    }
    let datasets = std::env::var_os("TAXON_DATASETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("../shared/datasets"));
    let pets = datasets.join("pets");
    if !pets.is_dir() {
        return Err(format!("{} not found (the photo sets)", pets.display()));
    }
    Ok(Inputs {
        chromedriver,
        chromium,
        weights,
        pets,
    })
}

/// The breed's photos in name order: the first `n` to enroll, the next one held out.
fn photos(pets: &Path, breed: &str, n: usize) -> (Vec<PathBuf>, PathBuf) {
    let mut all: Vec<PathBuf> = std::fs::read_dir(pets.join(breed))
        .unwrap_or_else(|e| panic!("{breed}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "jpg" || x == "jpeg"))
        .collect();
    all.sort();
    assert!(all.len() > n, "{breed} has only {} photos", all.len());
    let held_out = all.remove(n);
    all.truncate(n);
    (all, held_out)
}

#[test]
fn a_person_teaches_and_asks_through_the_page() {
    let inputs = match inputs() {
        Ok(i) => i,
        Err(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("the browser test cannot run in CI: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED (not CI): {why}");
            return;
        }
    };
    let shots = workspace().join("target/browser");
    std::fs::create_dir_all(&shots).unwrap();

    // Both services on a runtime of their own; the browser is driven from this thread.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let data = tempfile::tempdir().unwrap();
    let (features, trainer, http) = rt.block_on(async {
        let features =
            start_feature_server(BackboneKind::MobileNetV2, inputs.weights.clone()).await;
        let config = head_trainer::Config::new(vec![features.url()], data.path());
        let (trainer, http) = start_head_trainer_http(config).await;
        taxon_tests::wait_serving(trainer.addr, "taxon.v1.Classifier").await;
        (features, trainer, http)
    });
    let url = format!("http://{http}/");

    let driver = Driver::start(&inputs.chromedriver).expect("chromedriver");
    let page = driver
        .session(&inputs.chromium, 1280, 1000)
        .expect("browser session");
    page.goto(&url).unwrap();
    wait_text(&page, "#ready", "Ready");

    let (pugs, pug_held_out) = photos(&inputs.pets, "dog/pug", 5);
    let (siamese, siamese_held_out) = photos(&inputs.pets, "cat/Siamese", 5);
    enroll(&page, "pug", "dog", &pugs, None);
    // The second upload carries a file that is not an image: it is listed as rejected with
    // the server's reason, and the five photos beside it are still learned.
    let notes = data.path().join("notes.txt");
    std::fs::write(&notes, "not a photo").unwrap();
    let mut with_notes = siamese.clone();
    with_notes.push(notes.clone());
    enroll(&page, "Siamese", "cat", &with_notes, Some("notes.txt"));
    page.screenshot(&shots.join("enrolled.png")).unwrap();

    // The taxonomy as a tree, with counts.
    let tree = page.text(&page.find("#tree").unwrap()).unwrap();
    for name in ["dog", "pug", "cat", "Siamese"] {
        assert!(
            tree.contains(name),
            "{name} missing from the tree: {tree:?}"
        );
    }

    // Held-out photos, never sent before: the page shows the right breed.
    assert_eq!(
        classify(&page, &pug_held_out),
        ("child".to_string(), "pug".to_string())
    );
    assert_eq!(
        classify(&page, &siamese_held_out),
        ("child".to_string(), "Siamese".to_string())
    );
    let bars = page.find_all("#result-children .bar").unwrap();
    assert!(bars.len() == 2, "{} bars for two classes", bars.len());
    page.screenshot(&shots.join("classified.png")).unwrap();

    // A file that is not an image: the page says what went wrong, in the server's words.
    let error = classify_error(&page, &notes);
    assert!(error.starts_with("INVALID_ARGUMENT:"), "{error:?}");
    page.screenshot(&shots.join("error.png")).unwrap();

    // The camera (Chromium's fake device): a frame is taken and classified.
    page.click(&page.find("#classify-webcam").unwrap()).unwrap();
    let take = page.find("#classify-camera .take").unwrap();
    page.wait_for("the camera to start", WAIT, |p| {
        Ok(p.execute("const v = document.querySelector('#classify-camera video'); return !!v && v.readyState >= 2")?
            .as_bool()
            .filter(|ready| *ready))
    })
    .unwrap();
    mark_result(&page);
    page.click(&take).unwrap();
    let decision = wait_result(&page);
    assert!(
        ["child", "parent", "unknown"].contains(&decision.as_str()),
        "{decision:?}"
    );
    page.click(&page.find("#classify-camera .stop").unwrap())
        .unwrap();

    // A phone-sized screen: the same page, a held-out photo classified again.
    page.resize(390, 844).unwrap();
    assert_eq!(classify(&page, &pug_held_out).1, "pug");
    let overflow = page
        .execute(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth",
        )
        .unwrap();
    // What overflows, named, should it fail.
    let wide = page
        .execute("return [...document.querySelectorAll('body *')].filter(e => e.scrollWidth > e.clientWidth + 1 && e.clientWidth > 1).map(e => `${e.tagName}#${e.id}.${e.className} ${e.scrollWidth}/${e.clientWidth}`).join(', ')")
        .unwrap();
    assert_eq!(
        overflow.as_i64(),
        Some(0),
        "the page scrolls sideways on a phone: {wide}"
    );
    page.execute("document.querySelector('#result').scrollIntoView({block: 'center'})")
        .unwrap();
    page.screenshot(&shots.join("phone.png")).unwrap();

    drop(page);
    drop(driver);
    rt.block_on(async {
        within("the services to stop", async {
            trainer.stop().await;
            features.stop().await;
        })
        .await
    });
    println!("screenshots in {}", shots.display());
}

/// Waits until `css`'s text contains `needle`; returns the text.
fn wait_text(page: &Session<'_>, css: &str, needle: &str) -> String {
    let e = page.find(css).unwrap();
    page.wait_for(&format!("{css} to say {needle:?}"), WAIT, |p| {
        let t = p.text(&e)?;
        Ok(t.contains(needle).then_some(t))
    })
    .unwrap_or_else(|e| panic!("{e}; #error says {:?}", error_text(page)))
}

fn error_text(page: &Session<'_>) -> String {
    page.find("#error")
        .and_then(|e| page.text(&e))
        .unwrap_or_default()
}

/// Fills in the class, chooses the files and uploads them; waits for the page's answer.
fn enroll(
    page: &Session<'_>,
    class: &str,
    parent: &str,
    files: &[PathBuf],
    rejected: Option<&str>,
) {
    let field = |css: &str, text: &str| {
        let e = page.find(css).unwrap();
        page.execute(&format!("document.querySelector('{css}').value = ''"))
            .unwrap();
        page.send_keys(&e, text).unwrap();
    };
    field("#class-name", class);
    field("#class-parent", parent);
    let files: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    page.choose_files(&page.find("#enroll-files").unwrap(), &files)
        .unwrap();
    let queued = page.find_all("#enroll-queue .queued").unwrap().len();
    assert_eq!(queued, files.len(), "queued photos");
    page.click(&page.find("#enroll-button").unwrap()).unwrap();
    let status = wait_text(page, "#enroll-status", "examples");
    assert!(status.contains(class), "{status:?}");
    let listed = page.text(&page.find("#enroll-rejected").unwrap()).unwrap();
    match rejected {
        None => assert!(
            listed.trim().is_empty(),
            "unexpected rejections: {listed:?}"
        ),
        Some(file) => assert!(
            listed.contains(file),
            "{file} not listed as rejected: {listed:?}"
        ),
    }
}

/// Marks the current result so that the next one can be told apart from it.
fn mark_result(page: &Session<'_>) {
    page.execute("const r = document.querySelector('#result-decision'); r.dataset.decision = ''; r.textContent = ''; document.querySelector('#error').textContent = ''")
        .unwrap();
}

/// Waits for a decision to be shown (the request done); returns it.
fn wait_result(page: &Session<'_>) -> String {
    let decision = page.find("#result-decision").unwrap();
    let result = page.find("#result").unwrap();
    page.wait_for("a classification", WAIT, |p| {
        if p.attribute(&result, "aria-busy")?.as_deref() == Some("true") {
            return Ok(None);
        }
        let d = p.attribute(&decision, "data-decision")?.unwrap_or_default();
        if !d.is_empty() {
            return Ok(Some(d));
        }
        let e = error_text(p);
        if !e.is_empty() {
            panic!("classify failed on the page: {e}");
        }
        Ok(None)
    })
    .unwrap()
}

/// Chooses `photo` in the classify picker; the decision and the label the page shows.
fn classify(page: &Session<'_>, photo: &Path) -> (String, String) {
    mark_result(page);
    page.choose_files(&page.find("#classify-file").unwrap(), &[photo])
        .unwrap();
    let decision = wait_result(page);
    let label = page.text(&page.find("#result-label").unwrap()).unwrap();
    (decision, label.trim().to_string())
}

/// Chooses a file that must fail to classify; the error the page shows.
fn classify_error(page: &Session<'_>, file: &Path) -> String {
    mark_result(page);
    page.choose_files(&page.find("#classify-file").unwrap(), &[file])
        .unwrap();
    let result = page.find("#result").unwrap();
    page.wait_for("an error on the page", WAIT, |p| {
        let busy = p.attribute(&result, "aria-busy")?.as_deref() == Some("true");
        let e = error_text(p);
        Ok((!busy && !e.is_empty()).then_some(e))
    })
    .unwrap()
}
