//! TLS on every hop, with certificates made at test time (rcgen): the client over https://
//! to the head-trainer, the head-trainer over https:// (mutual TLS) to the feature-server, and
//! the HTTP face over HTTPS with the same certificate. And the three ways it goes wrong, each
//! with a message that says what to do: plaintext to a TLS port, a CA that did not sign the
//! server's certificate, and no client certificate where the server requires one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use feature_server::models::BackboneKind;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use taxon_client::Outcome;
use taxon_ops::tls::{ClientTls, ServerTls};
use taxon_tests::{
    Pattern, formula_weights, photos, start_feature_server_with, start_head_trainer_http, within,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CA, a server certificate for `localhost` and 127.0.0.1 signed by it, a client
/// certificate signed by it, and a second CA that signed nothing here.
struct Pki {
    ca: PathBuf,
    other_ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let pem = params.self_signed(&key).expect("self-signed CA").pem();
    (params, key, pem)
}

fn leaf(
    issuer: &Issuer<'_, &KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let key = KeyPair::generate().expect("leaf key");
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(names).expect("leaf params");
    params
        .distinguished_name
        .push(DnType::CommonName, "taxon test");
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, issuer).expect("signed leaf");
    (cert.pem(), key.serialize_pem())
}

fn pki(dir: &Path) -> Pki {
    let (ca_params, ca_key, ca_pem) = ca("Taxon test CA");
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let (server_cert, server_key) = leaf(
        &issuer,
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = leaf(&issuer, &["client"], ExtendedKeyUsagePurpose::ClientAuth);
    let (_, _, other_pem) = ca("Some other CA");
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write PEM");
        path
    };
    Pki {
        ca: write("ca.pem", &ca_pem),
        other_ca: write("other-ca.pem", &other_pem),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server.key", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client.key", &client_key),
    }
}

async fn client(args: &[&str]) -> (taxon_client::Result<Outcome>, String) {
    taxon_tests::run_client(args).await
}

/// The error a client command ended with, as the user reads it.
async fn client_error(args: &[&str]) -> String {
    let (r, out) = client(args).await;
    match r {
        Err(e) => e.to_string(),
        Ok(o) => panic!("expected an error, got {o:?}: {out}"),
    }
}

/// A feature-server serving mutual TLS (clients need a certificate from the test CA), and a
/// head-trainer reaching it over https:// with its own certificate, itself serving TLS on gRPC
/// and HTTP; `client_ca` makes the head-trainer require client certificates too.
struct Deployment {
    grpc_url: String,
    http_port: u16,
    _fs: taxon_tests::Running<feature_server::Error>,
    _ht: taxon_tests::Running<head_trainer::Error>,
}

async fn deploy(dir: &Path, pki: &Pki, mutual: bool) -> Deployment {
    let server_tls = |client_ca: Option<&PathBuf>| ServerTls {
        cert: Some(pki.server_cert.clone()),
        key: Some(pki.server_key.clone()),
        client_ca: client_ca.cloned(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let fs_port = listener.local_addr().unwrap().port();
    let fs = start_feature_server_with(
        listener,
        feature_server::Config {
            backbone: BackboneKind::MobileNetV2,
            weights: formula_weights(BackboneKind::MobileNetV2, dir),
            tls: server_tls(Some(&pki.ca)),
            ..feature_server::Config::default()
        },
    );
    let mut config = head_trainer::Config::new(
        vec![format!("https://localhost:{fs_port}")],
        dir.join("data"),
    );
    config.tls = server_tls(mutual.then_some(&pki.ca));
    config.features_tls = ClientTls {
        ca: Some(pki.ca.clone()),
        cert: Some(pki.client_cert.clone()),
        key: Some(pki.client_key.clone()),
        ..config.features_tls
    };
    let (ht, http) = start_head_trainer_http(config).await;
    Deployment {
        grpc_url: format!("https://localhost:{}", ht.addr.port()),
        http_port: http.port(),
        _fs: fs,
        _ht: ht,
    }
}

fn write_photos(dir: &Path, pattern: Pattern, rgb: [u8; 3], seed: u64) -> String {
    std::fs::create_dir_all(dir).unwrap();
    for (i, bytes) in photos(pattern, rgb, 3, seed).into_iter().enumerate() {
        std::fs::write(dir.join(format!("{i}.png")), bytes).unwrap();
    }
    dir.to_string_lossy().to_string()
}

/// `GET path` over HTTPS with `roots` trusted (and our certificate when given); the status
/// line, or the TLS or I/O error.
async fn https_get(
    port: u16,
    path: &str,
    roots: &Path,
    identity: Option<(&Path, &Path)>,
) -> std::io::Result<String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    let mut store = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(roots).expect("CA file") {
        store.add(c.expect("CA cert")).expect("add CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_root_certificates(store);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .expect("client cert"),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await?;
    let mut reply = Vec::new();
    tls.read_to_end(&mut reply).await?;
    let reply = String::from_utf8_lossy(&reply);
    Ok(reply.lines().next().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_every_hop_and_the_clear_failures() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let d = within("the deployment", deploy(dir.path(), &pki, false)).await;
    let url = d.grpc_url.as_str();
    let ca = pki.ca.to_string_lossy().to_string();

    // SERVING means the head-trainer reached the feature-server over mutual TLS.
    let (r, out) = client(&["--server", url, "--tls-ca", &ca, "health", "--wait", "120"]).await;
    assert_eq!(r.unwrap(), Outcome::Success, "{out}");

    let red = write_photos(&dir.path().join("red"), Pattern::Solid, [220, 30, 30], 1);
    let blue = write_photos(&dir.path().join("blue"), Pattern::Stripes, [30, 30, 220], 2);
    let base = [
        "--server", url, "--tls-ca", &ca, "--tenant", "tls", "--json",
    ];
    for (class, folder) in [("red", &red), ("blue", &blue)] {
        let args: Vec<&str> = base
            .iter()
            .copied()
            .chain(["enroll", "--wait", "--class", class, folder.as_str()])
            .collect();
        let (r, out) = client(&args).await;
        assert_eq!(r.unwrap(), Outcome::Success, "enroll {class}: {out}");
    }
    let photo = format!("{red}/0.png");
    let args: Vec<&str> = base
        .iter()
        .copied()
        .chain(["classify", photo.as_str()])
        .collect();
    let (r, out) = client(&args).await;
    assert_eq!(r.unwrap(), Outcome::Success, "{out}");
    let reply: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(reply["top"][0]["name"], "red", "{out}");

    // The HTTP face: HTTPS with the same certificate.
    let status = https_get(d.http_port, "/healthz", &pki.ca, None).await;
    assert_eq!(status.unwrap(), "HTTP/1.1 200 OK");

    // Plaintext to the TLS port: refused, and told to use https://.
    let plain = format!("http://localhost:{}", url.rsplit(':').next().unwrap());
    let e = client_error(&["--server", &plain, "--retry-s", "0", "classes"]).await;
    assert!(e.contains("https://"), "no advice to use https://: {e}");

    // A CA that did not sign the server's certificate: refused, naming --tls-ca.
    let other = pki.other_ca.to_string_lossy().to_string();
    let e = client_error(&["--server", url, "--tls-ca", &other, "classes"]).await;
    assert!(
        e.contains("not trusted") && e.contains("--tls-ca"),
        "unclear wrong-CA error: {e}"
    );
    // And without --tls-ca, the system's roots do not know a test CA either.
    let e = client_error(&["--server", url, "classes"]).await;
    assert!(e.contains("--tls-ca"), "unclear untrusted error: {e}");
    let status = https_get(d.http_port, "/healthz", &pki.other_ca, None).await;
    assert!(status.is_err(), "HTTPS trusted a wrong CA: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_rejects_a_client_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let d = within("the deployment", deploy(dir.path(), &pki, true)).await;
    let url = d.grpc_url.as_str();
    let ca = pki.ca.to_string_lossy().to_string();
    let cert = pki.client_cert.to_string_lossy().to_string();
    let key = pki.client_key.to_string_lossy().to_string();

    let with_cert = [
        "--server",
        url,
        "--tls-ca",
        &ca,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ];
    let args: Vec<&str> = with_cert
        .iter()
        .copied()
        .chain(["health", "--wait", "120"])
        .collect();
    let (r, out) = client(&args).await;
    assert_eq!(r.unwrap(), Outcome::Success, "{out}");
    let args: Vec<&str> = with_cert.iter().copied().chain(["classes"]).collect();
    let (r, out) = client(&args).await;
    assert_eq!(r.unwrap(), Outcome::Success, "{out}");

    let e = client_error(&[
        "--server",
        url,
        "--tls-ca",
        &ca,
        "--retry-s",
        "0",
        "classes",
    ])
    .await;
    assert!(
        e.contains("--tls-cert"),
        "a refused client is not told to present a certificate: {e}"
    );

    let id = Some((pki.client_cert.as_path(), pki.client_key.as_path()));
    let ok = https_get(d.http_port, "/healthz", &pki.ca, id).await;
    assert_eq!(ok.unwrap(), "HTTP/1.1 200 OK");
    let refused = https_get(d.http_port, "/healthz", &pki.ca, None).await;
    assert!(
        refused.is_err(),
        "HTTPS served a client without a certificate: {refused:?}"
    );
}
