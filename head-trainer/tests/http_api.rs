//! `--http-listen`: the HTTP/JSON face over real HTTP/1.1, against the stand-in
//! feature-server: every route, its errors (JSON, the matching status, the limit named),
//! tenants kept apart, tokens, the OpenAPI document and the page's assets.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::http::{Reply, multipart, request};
use common::*;

const PHOTO_LIMIT: usize = 4096;
const BODY_LIMIT: usize = 64 << 10;

async fn start(dir: &std::path::Path, features: &FakeFeatures) -> (Trainer, SocketAddr) {
    let mut c = config(&features.url(), dir);
    c.max_photo_bytes = PHOTO_LIMIT;
    c.http_max_body_bytes = BODY_LIMIT;
    let (trainer, http) = Trainer::start_with_http(c).await;
    wait_health(trainer.addr, "taxon.v1.Classifier", 1).await;
    (trainer, http)
}

async fn get(http: SocketAddr, path: &str, tenant: &str) -> Reply {
    request(http, "GET", path, &[("X-Tenant", tenant)], b"").await
}

async fn upload(
    http: SocketAddr,
    path: &str,
    tenant: &str,
    parts: &[(&str, &str, &[u8])],
) -> Reply {
    let (content_type, body) = multipart(parts);
    let headers = [
        ("X-Tenant", tenant),
        ("Content-Type", content_type.as_str()),
    ];
    request(http, "POST", path, &headers, &body).await
}

async fn classify_raw(http: SocketAddr, tenant: &str, content_type: &str, image: &[u8]) -> Reply {
    let headers = [("X-Tenant", tenant), ("Content-Type", content_type)];
    request(http, "POST", "/v1/classify?top_k=3", &headers, image).await
}

/// An error reply: its status, its JSON code, and a message that contains `needle`.
fn assert_error(r: &Reply, status: u16, code: &str, needle: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let j = r.json();
    assert_eq!(j["code"], code, "{j}");
    let message = j["message"].as_str().unwrap();
    assert!(message.contains(needle), "{message:?} lacks {needle:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_classify_rename_remove_over_http() {
    let features = FakeFeatures::start(64, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let (trainer, http) = start(dir.path(), &features).await;

    let r = get(http, "/healthz", "a").await;
    assert_eq!((r.status, r.json()["status"].clone()), (200, "ok".into()));
    let r = get(http, "/readyz", "a").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"], MODEL);
    let info = get(http, "/v1/info", "a").await.json();
    assert_eq!(info["max_photo_bytes"], PHOTO_LIMIT);
    assert_eq!(info["max_body_bytes"], BODY_LIMIT);
    assert_eq!(info["tokens"], false);

    let r = get(http, "/v1/classes", "a").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["classes"], serde_json::json!([]));
    // Nothing to classify against yet: said, with the tenant.
    let r = classify_raw(http, "a", "image/png", b"anything").await;
    assert_error(&r, 409, "FAILED_PRECONDITION", "tenant `a` has no classes");

    // Four good photos, an empty file and one over the photo limit: four examples, two
    // rejections naming the file and (for the large one) its size and the limit.
    let mugs = blobs("mug", 4, 64);
    let big = vec![7u8; PHOTO_LIMIT + 1];
    let mut parts: Vec<(&str, &str, &[u8])> = mugs
        .iter()
        .enumerate()
        .map(|(i, m)| {
            (
                "photos",
                ["m0.jpg", "m1.jpg", "m2.jpg", "m3.jpg"][i],
                m.as_slice(),
            )
        })
        .collect();
    parts.push(("photos", "empty.jpg", b""));
    parts.push(("photos", "huge.jpg", &big));
    let r = upload(
        http,
        "/v1/classes/my%20mug/photos?parent=kitchenware",
        "a",
        &parts,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let e = r.json();
    assert_eq!(
        (e["class"].clone(), e["parent"].clone()),
        ("my mug".into(), "kitchenware".into())
    );
    assert_eq!(
        (e["accepted"].clone(), e["examples"].clone()),
        (4.into(), 4.into())
    );
    let rejected = e["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 2, "{e}");
    assert_eq!(rejected[0]["file"], "empty.jpg");
    assert_eq!(rejected[1]["file"], "huge.jpg");
    assert_eq!(rejected[1]["code"], "INVALID_ARGUMENT");
    let message = rejected[1]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "{} bytes, over the limit of {PHOTO_LIMIT}",
            PHOTO_LIMIT + 1
        )),
        "{message}"
    );
    assert_eq!(e["head"], "prototype");

    // The same photos again: acknowledged as cached, no new example.
    let r = upload(http, "/v1/classes/my%20mug/photos", "a", &parts[..2]).await;
    assert_eq!(
        (r.json()["cached"].clone(), r.json()["examples"].clone()),
        (2.into(), 4.into())
    );

    let bowls = blobs("bowl", 3, 64);
    let parts: Vec<(&str, &str, &[u8])> = bowls
        .iter()
        .map(|b| ("photos", "b.jpg", b.as_slice()))
        .collect();
    let r = upload(
        http,
        "/v1/classes/bowl/photos?parent=kitchenware&wait=true",
        "a",
        &parts,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Waited for: the trained head answers, and how long it took is said.
    assert_ne!(r.json()["head"], "prototype");
    assert!(r.json()["time_to_live_ms"].is_u64(), "{}", r.text());

    // Every photo over the limit: 413, the limit named.
    let r = upload(
        http,
        "/v1/classes/bowl/photos",
        "a",
        &[("photos", "huge.jpg", &big)],
    )
    .await;
    assert_error(
        &r,
        413,
        "INVALID_ARGUMENT",
        &format!("over the limit of {PHOTO_LIMIT} bytes"),
    );
    // An upload over the whole-body limit: 413 naming that limit, nothing written.
    let many = vec![1u8; PHOTO_LIMIT];
    let parts: Vec<(&str, &str, &[u8])> = (0..20)
        .map(|_| ("photos", "m.jpg", many.as_slice()))
        .collect();
    let r = upload(http, "/v1/classes/toolarge/photos", "a", &parts).await;
    assert_error(
        &r,
        413,
        "INVALID_ARGUMENT",
        &format!("over the limit of {BODY_LIMIT} bytes"),
    );
    // Not multipart at all.
    let r = request(
        http,
        "POST",
        "/v1/classes/x/photos",
        &[("Content-Type", "application/json")],
        b"{}",
    )
    .await;
    assert_error(&r, 400, "INVALID_ARGUMENT", "multipart/form-data");

    // Classify: raw body, then as a browser form sends it.
    let r = classify_raw(http, "a", "image/jpeg", &mugs[1]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let c = r.json();
    assert_eq!(
        (c["decision"].clone(), c["label"].clone()),
        ("child".into(), "my mug".into()),
        "{c}"
    );
    assert_eq!(c["children"][0]["parent"], "kitchenware");
    assert_eq!(c["parent"]["name"], "kitchenware");
    assert!(c["children"].as_array().unwrap().len() <= 3);
    let r = upload(http, "/v1/classify", "a", &[("photo", "q.jpg", &bowls[0])]).await;
    assert_eq!(r.json()["label"], "bowl", "{}", r.text());
    // Wrong type, too large, unknown head: each a clear 4xx.
    let r = classify_raw(http, "a", "text/plain", b"hello").await;
    assert_error(&r, 400, "INVALID_ARGUMENT", "image/*");
    let r = classify_raw(http, "a", "image/jpeg", &big).await;
    assert_error(
        &r,
        413,
        "INVALID_ARGUMENT",
        &format!("limit of {PHOTO_LIMIT} bytes"),
    );
    let r = request(
        http,
        "POST",
        "/v1/classify?head=giant",
        &[("Content-Type", "image/png")],
        &mugs[0],
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = request(
        http,
        "POST",
        "/v1/classify?top_k=many",
        &[("Content-Type", "image/png")],
        &mugs[0],
    )
    .await;
    assert_error(&r, 400, "INVALID_ARGUMENT", "query");

    // The quality report: every class, each under five photos.
    let r = get(http, "/v1/report?max_suspects=5", "a").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let q = r.json();
    let mug = q["classes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "my mug")
        .unwrap_or_else(|| panic!("no `my mug` in {q}"));
    assert_eq!(mug["examples"], 4);
    assert_eq!(mug["needs_more_photos"], true, "{q}");
    assert_eq!(q["model"], MODEL);
    assert!(q["method"].as_str().unwrap().contains("leave-one-out"));
    let r = get(http, "/v1/report", "b").await;
    assert_error(&r, 409, "FAILED_PRECONDITION", "tenant `b` has no classes");

    // Another tenant sees none of it.
    let r = get(http, "/v1/classes", "b").await;
    assert_eq!(r.json()["classes"], serde_json::json!([]));
    let r = request(
        http,
        "GET",
        "/v1/classes",
        &[("X-Tenant", "bad tenant!")],
        b"",
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());

    // Rename, onto a taken name, of a class that does not exist.
    let rename = |from: &'static str, to: &'static str| async move {
        let body = serde_json::json!({ "new_name": to }).to_string();
        let path = format!("/v1/classes/{from}/rename");
        request(
            http,
            "POST",
            &path,
            &[("X-Tenant", "a"), ("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .await
    };
    let r = rename("my%20mug", "mug").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_error(&rename("mug", "bowl").await, 409, "ALREADY_EXISTS", "bowl");
    assert_error(&rename("cup", "tea").await, 404, "NOT_FOUND", "cup");
    let names: Vec<String> = get(http, "/v1/classes", "a").await.json()["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["kitchenware", "bowl", "mug"]);

    // A parent with children goes only when asked to take them along.
    let r = request(
        http,
        "DELETE",
        "/v1/classes/kitchenware",
        &[("X-Tenant", "a")],
        b"",
    )
    .await;
    assert_error(&r, 409, "FAILED_PRECONDITION", "kitchenware");
    let r = request(
        http,
        "DELETE",
        "/v1/classes/kitchenware?recursive=true",
        &[("X-Tenant", "a")],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mut removed: Vec<String> = serde_json::from_value(r.json()["classes"].clone()).unwrap();
    removed.sort();
    assert_eq!(removed, ["bowl", "kitchenware", "mug"]);
    assert_eq!(r.json()["examples"], 7);

    // Not a route: JSON too.
    let r = get(http, "/v2/nothing", "a").await;
    assert_error(&r, 404, "NOT_FOUND", "/v2/nothing");

    let mut trainer = trainer;
    trainer.signal_stop();
    trainer.task.await.unwrap().unwrap();
    // Stopped: the port is closed with the server.
    assert!(tokio::net::TcpStream::connect(http).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_decide_the_tenant_over_http_too() {
    let features = FakeFeatures::start(64, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "s3cret alice\n").unwrap();
    let mut c = config(&features.url(), &dir.path().join("data"));
    c.tokens_file = Some(tokens);
    let (trainer, http) = Trainer::start_with_http(c).await;
    wait_health(trainer.addr, "taxon.v1.Classifier", 1).await;

    let r = request(http, "GET", "/v1/classes", &[("X-Tenant", "alice")], b"").await;
    assert_error(&r, 401, "UNAUTHENTICATED", "authorization");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = request(
        http,
        "GET",
        "/v1/classes",
        &[("Authorization", "Bearer wrong")],
        b"",
    )
    .await;
    assert_error(&r, 401, "UNAUTHENTICATED", "unknown token");

    let photos = blobs("cat", 2, 64);
    let (content_type, body) = multipart(&[
        ("photos", "a.jpg", &photos[0]),
        ("photos", "b.jpg", &photos[1]),
    ]);
    let auth = [
        ("Authorization", "Bearer s3cret"),
        ("Content-Type", content_type.as_str()),
        ("X-Tenant", "mallory"),
    ];
    let r = request(http, "POST", "/v1/classes/cat/photos", &auth, &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The token's tenant got it, whatever X-Tenant said: the gRPC face sees it as alice's.
    let mut client = trainer.client();
    let mut req = tonic::Request::new(taxon_proto::v1::ListClassesRequest {});
    req.metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    let listed = client.list_classes(req).await.unwrap().into_inner();
    assert_eq!(listed.classes.len(), 1);
    assert_eq!(listed.classes[0].name, "cat");
    drop(trainer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_the_openapi_document_are_served() {
    let features = FakeFeatures::start(64, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let (_trainer, http) = start(dir.path(), &features).await;

    let page = get(http, "/", "a").await;
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-type")
            .unwrap()
            .starts_with("text/html")
    );
    assert!(
        page.header("content-security-policy")
            .unwrap()
            .contains("default-src 'self'")
    );
    for id in [
        "enroll-files",
        "classify-file",
        "tree",
        "result-label",
        "error",
    ] {
        assert!(
            page.text().contains(&format!("id=\"{id}\"")),
            "the page lacks #{id}"
        );
    }
    for (path, kind) in [
        ("/app.js", "text/javascript"),
        ("/camera.js", "text/javascript"),
        ("/style.css", "text/css"),
    ] {
        let r = get(http, path, "a").await;
        assert_eq!(r.status, 200, "{path}");
        assert!(
            r.header("content-type").unwrap().starts_with(kind),
            "{path}"
        );
        assert!(r.body.len() > 1000, "{path} is {} bytes", r.body.len());
    }

    let doc = get(http, "/openapi.json", "a").await.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for (path, method) in [
        ("/v1/classes", "get"),
        ("/v1/classes/{name}/photos", "post"),
        ("/v1/classes/{name}/rename", "post"),
        ("/v1/classes/{name}", "delete"),
        ("/v1/classify", "post"),
        ("/v1/report", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing from the document"
        );
    }
    assert!(doc["components"]["schemas"]["ClassifiedJson"]["properties"]["decision"].is_object());
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
}
