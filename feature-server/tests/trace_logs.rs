//! `--log-format json` and trace continuation on the feature-server: a request that carries a
//! W3C `traceparent` is logged with its trace id, on its `embed` span and on the batch that
//! served it (whose line names the trace ids of every request it served), as JSON lines a log
//! collector can index. Its own test binary: it installs the process's global subscriber.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::*;

/// Log lines written into memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requests_trace_id_is_on_its_span_and_its_batch_in_json() {
    let captured = Captured::default();
    // The same layout as `taxon_ops::logging::init(LogFormat::Json, ..)`, into memory.
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(true)
        .with_env_filter("feature_server=debug")
        .with_writer(captured.clone())
        .init();

    let server = TestServer::stand_in(small_config()).await;
    let mut client = server.client().await;
    let trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let requests = vec![request("a", png(8, 8, 1)), request("b", png(8, 8, 2))];
    let mut call = tonic::Request::new(tokio_stream::iter(requests));
    call.metadata_mut()
        .insert("traceparent", trace.parse().unwrap());
    let mut stream = client.embed(call).await.expect("embed").into_inner();
    let mut answered = 0;
    while let Some(r) = stream.message().await.expect("stream") {
        assert!(
            matches!(
                r.result,
                Some(taxon_proto::v1::embed_response::Result::Embedding(_))
            ),
            "{r:?}"
        );
        answered += 1;
    }
    assert_eq!(answered, 2);

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let id = "0af7651916cd43dd8448eb211c80319c";
    let batch = lines
        .iter()
        .find(|l| {
            l["message"] == "batch done" && l["trace_ids"].as_str().unwrap_or("").contains(id)
        })
        .unwrap_or_else(|| panic!("no batch line names the trace:\n{text}"));
    assert!(batch["batch"].as_u64().unwrap() >= 1, "{batch}");
    let on_span = lines.iter().any(|l| {
        l["spans"].as_array().is_some_and(|s| {
            s.iter()
                .any(|s| s["name"] == "embed" && s["trace_id"] == id)
        })
    });
    assert!(
        on_span,
        "no line logged inside the request's embed span with its trace id:\n{text}"
    );
}
