//! Channels to the services, with the tenant and token attached to every call.
//!
//! One place builds endpoints so that every command gets the same message limits, the same
//! connect timeout and the same "is it running?" advice when nothing answers.

use std::time::Duration;

use taxon_ops::trace::{TRACEPARENT, TraceContext};
use taxon_proto::TENANT_HEADER;
use taxon_proto::v1::classifier_client::ClassifierClient;
use taxon_proto::v1::features_client::FeaturesClient;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, Result, chain};
use crate::retry::RetryPolicy;

/// The head-trainer's default address: every command but `info --features` talks to it.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50052";
/// The feature-server's default address, for `info --features`.
pub const DEFAULT_FEATURES: &str = "http://127.0.0.1:50051";

/// Largest request we let tonic encode: above the largest file we send (see
/// [`crate::files::DEFAULT_MAX_FILE_BYTES`]) plus framing, so the server's limit, not ours,
/// decides what is too big.
const MAX_ENCODE_BYTES: usize = 64 * 1024 * 1024;
const MAX_DECODE_BYTES: usize = 16 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Which service an address is meant to be; decides the advice when it does not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    HeadTrainer,
    FeatureServer,
}

impl Service {
    fn describe(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Service::HeadTrainer => (
                "head-trainer",
                "cargo run --release -p head-trainer -- --features-url http://127.0.0.1:50051` (with a feature-server running) or `docker compose up",
                "--server / TAXON_SERVER",
            ),
            Service::FeatureServer => (
                "feature-server",
                "cargo run --release -p feature-server` or `docker compose up",
                "--features",
            ),
        }
    }
}

/// Adds `x-tenant`, `authorization: Bearer ...`, the deadline (`grpc-timeout`, from
/// `--timeout-s`) and a W3C `traceparent` to every request: every call of one command is in
/// one trace, so an operator can find all of it in the servers' logs by one trace id.
#[derive(Debug, Clone)]
pub struct Auth {
    tenant: Option<AsciiMetadataValue>,
    token: Option<AsciiMetadataValue>,
    timeout: Option<Duration>,
    trace: TraceContext,
}

impl Default for Auth {
    fn default() -> Self {
        Self {
            tenant: None,
            token: None,
            timeout: None,
            trace: TraceContext::root(),
        }
    }
}

impl Auth {
    /// Validates both values once, so a bad character is reported before any call is made.
    pub fn new(tenant: Option<&str>, token: Option<&str>) -> Result<Self> {
        let tenant = match tenant.filter(|t| !t.is_empty()) {
            Some(t) => Some(t.parse().map_err(|_| Error::Metadata {
                what: "--tenant",
                reason: format!("{t:?} must be printable ASCII"),
            })?),
            None => None,
        };
        let token = match token.filter(|t| !t.is_empty()) {
            Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| Error::Metadata {
                what: "--token",
                reason: "must be printable ASCII".to_string(),
            })?),
            None => None,
        };
        Ok(Self {
            tenant,
            token,
            ..Self::default()
        })
    }

    /// Continues `trace` (a script's own, from `TRACEPARENT`) instead of starting one.
    pub fn with_trace(mut self, trace: TraceContext) -> Self {
        self.trace = trace;
        self
    }

    /// The trace every call of this command is in.
    pub fn trace(&self) -> &TraceContext {
        &self.trace
    }

    /// Every call gets `timeout` as its deadline (each attempt of a retried call its own):
    /// the servers stop working on it then, and pass what remains on to the feature-server.
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }
}

impl Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.tenant {
            req.metadata_mut().insert(TENANT_HEADER, t.clone());
        }
        if let Some(t) = &self.token {
            req.metadata_mut().insert("authorization", t.clone());
        }
        if let Some(t) = self.timeout {
            req.set_timeout(t);
        }
        if let Ok(v) = self.trace.child().to_string().parse() {
            req.metadata_mut().insert(TRACEPARENT, v);
        }
        Ok(req)
    }
}

pub type Classifier = ClassifierClient<InterceptedService<Channel, Auth>>;
pub type Features = FeaturesClient<InterceptedService<Channel, Auth>>;

/// A connected channel and the credentials to use on it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Conn {
    pub addr: String,
    channel: Channel,
    auth: Auth,
    retry: RetryPolicy,
}

/// Accepts `host:port` as well as a URL, since that is what people type.
pub fn normalize(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

impl Conn {
    /// Connects eagerly, so "nothing is listening" is reported once, with advice, instead of
    /// as the first call's failure.
    pub async fn connect(
        addr: &str,
        service: Service,
        auth: Auth,
        tls: &taxon_ops::tls::ClientTls,
    ) -> Result<Self> {
        let addr = normalize(addr);
        let bad = |reason: String| Error::BadAddress {
            addr: addr.clone(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(addr.clone())
            .map_err(|e| bad(chain(&e)))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        if addr.starts_with("https://") {
            let host = endpoint.uri().host().unwrap_or("localhost").to_string();
            let config = tls
                .config(host.trim_start_matches('[').trim_end_matches(']'))
                .map_err(|e| Error::Usage(e.to_string()))?;
            endpoint = endpoint.tls_config(config).map_err(|e| bad(chain(&e)))?;
        }
        let channel = endpoint.connect().await.map_err(|e| {
            let (name, start, flag) = service.describe();
            let reason = chain(&e);
            Error::Unreachable {
                service: name,
                reason: format!("{reason}{}", crate::error::tls_hint(&addr, &reason)),
                addr: addr.clone(),
                start,
                flag,
            }
        })?;
        Ok(Self {
            addr,
            channel,
            auth,
            retry: RetryPolicy::default(),
        })
    }

    /// The same connection retrying `UNAVAILABLE` under `policy` (see [`crate::retry`]).
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    pub fn retry(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The same channel speaking for another tenant (the evaluation's fresh tenant per seed).
    pub fn with_auth(&self, auth: Auth) -> Self {
        Self {
            addr: self.addr.clone(),
            channel: self.channel.clone(),
            auth,
            retry: self.retry.clone(),
        }
    }

    pub fn classifier(&self) -> Classifier {
        ClassifierClient::with_interceptor(self.channel.clone(), self.auth.clone())
            .max_encoding_message_size(MAX_ENCODE_BYTES)
            .max_decoding_message_size(MAX_DECODE_BYTES)
    }

    pub fn features(&self) -> Features {
        FeaturesClient::with_interceptor(self.channel.clone(), self.auth.clone())
            .max_encoding_message_size(MAX_ENCODE_BYTES)
            .max_decoding_message_size(MAX_DECODE_BYTES)
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Wraps a failed call's status with the call's name and this address.
    pub fn rpc_error(&self, call: &'static str) -> impl FnOnce(tonic::Status) -> Error + '_ {
        move |status| Error::Rpc {
            call,
            addr: self.addr.clone(),
            status: self.own_deadline(status),
        }
    }

    /// tonic's own timer, when our deadline fires before the server's answer, reports
    /// CANCELLED "Timeout expired"; the person asked for a deadline and should read that.
    fn own_deadline(&self, status: tonic::Status) -> tonic::Status {
        match self.auth.timeout {
            Some(t)
                if status.code() == tonic::Code::Cancelled
                    && status.message() == "Timeout expired" =>
            {
                tonic::Status::deadline_exceeded(format!(
                    "no answer within --timeout-s {}",
                    t.as_secs_f64()
                ))
            }
            _ => status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interceptor_sets_tenant_and_bearer_token() {
        let mut auth = Auth::new(Some("acme"), Some("s3cret")).unwrap();
        let req = auth.call(tonic::Request::new(())).unwrap();
        assert_eq!(req.metadata().get(TENANT_HEADER).unwrap(), "acme");
        assert_eq!(
            req.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );
    }

    #[test]
    fn every_call_of_a_command_is_in_one_trace() {
        let sent = |auth: &mut Auth| {
            let req = auth.call(tonic::Request::new(())).unwrap();
            let v = req.metadata().get(TRACEPARENT).expect("traceparent");
            TraceContext::from_header(Some(v.as_bytes())).expect("a valid traceparent")
        };
        let mut auth = Auth::new(None, None).unwrap();
        let (a, b) = (sent(&mut auth), sent(&mut auth));
        assert_eq!(a.trace_id, auth.trace().trace_id);
        assert_eq!(b.trace_id, a.trace_id, "one trace");
        assert_ne!(b.parent_id, a.parent_id, "a span per call");
        let script = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let mut continued = Auth::new(None, None).unwrap().with_trace(script.unwrap());
        assert_eq!(sent(&mut continued).trace_id, script.unwrap().trace_id);
    }

    #[test]
    fn a_timeout_travels_as_grpc_timeout() {
        let mut auth = Auth::new(None, None)
            .unwrap()
            .with_timeout(Some(Duration::from_secs(5)));
        let req = auth.call(tonic::Request::new(())).unwrap();
        let sent = taxon_proto::grpc_timeout(req.metadata()).expect("grpc-timeout");
        assert_eq!(sent, Duration::from_secs(5));
        let mut none = Auth::new(None, None).unwrap();
        let req = none.call(tonic::Request::new(())).unwrap();
        assert!(req.metadata().get("grpc-timeout").is_none());
    }

    #[test]
    fn empty_values_send_nothing_and_bad_ones_are_refused() {
        let mut auth = Auth::new(Some(""), None).unwrap();
        let req = auth.call(tonic::Request::new(())).unwrap();
        assert!(req.metadata().get(TENANT_HEADER).is_none());
        assert!(Auth::new(Some("bad\nname"), None).is_err());
    }

    #[test]
    fn bare_host_port_becomes_a_url() {
        assert_eq!(normalize("127.0.0.1:1"), "http://127.0.0.1:1");
        assert_eq!(normalize("https://x:1"), "https://x:1");
    }
}
