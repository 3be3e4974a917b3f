//! The client's one error type. Every variant's message says what went wrong *and what to do
//! about it*, because the person reading it is at a terminal, not in a debugger.

use std::path::PathBuf;

use tonic::Code;

/// Everything a command can fail with. `main` prints the `Display` form and exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--server` / `--features` is not a usable URL.
    #[error("invalid address {addr:?}: {reason} (expected e.g. http://127.0.0.1:50052)")]
    BadAddress { addr: String, reason: String },

    /// Nothing answered at the address (refused, timed out, DNS).
    #[error(
        "cannot reach the {service} at {addr}: {reason}\n  \
         is it running? start it with `{start}`, or point {flag} at where it listens"
    )]
    Unreachable {
        service: &'static str,
        addr: String,
        reason: String,
        start: &'static str,
        flag: &'static str,
    },

    /// The server answered a call with an error status.
    #[error("{}", describe_status(.call, .addr, .status))]
    Rpc {
        call: &'static str,
        addr: String,
        status: tonic::Status,
    },

    /// `--tenant` or `--token` cannot travel as gRPC metadata.
    #[error("invalid {what}: {reason}")]
    Metadata { what: &'static str, reason: String },

    /// The command line is valid for clap but not meaningful (e.g. no class name).
    #[error("{0}")]
    Usage(String),

    /// Every path given was skipped, so there is nothing to send.
    #[error(
        "no images to send: {skipped} path(s) skipped (see above); give image files, folders or globs"
    )]
    NoImages { skipped: usize },

    /// A glob pattern that `glob` cannot parse.
    #[error("invalid glob pattern {pattern:?}: {reason}")]
    Pattern { pattern: String, reason: String },

    /// A `<parent>/<child>/*.jpg` tree that is missing or empty.
    #[error("dataset {}: {reason}", .root.display())]
    Dataset { root: PathBuf, reason: String },

    /// Reading or writing a named file failed.
    #[error("{}: {source}", .path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Encoding a plot failed.
    #[error("cannot write {}: {source}", .path.display())]
    Image {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },

    /// Writing to stdout failed (e.g. a closed pipe).
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),

    /// The server broke the contract (e.g. a stream reply for an id never sent).
    #[error("unexpected reply from {addr}: {reason}")]
    Protocol { addr: String, reason: String },
}

/// What to try when a connection failed in a way TLS explains: a plaintext URL to a TLS
/// server (the server drops the connection at once), a certificate this client does not trust,
/// or a server that wants ours. Empty when the reason says nothing of TLS.
pub(crate) fn tls_hint(addr: &str, reason: &str) -> &'static str {
    let r = reason.to_ascii_lowercase();
    let https = addr.starts_with("https://");
    // How a peer that hung up reads, depending on when the client noticed: all seen in tests.
    let dropped = [
        "connection closed",
        "connection reset",
        "broken pipe",
        "stream closed",
        "unexpected end of file",
        "frame with invalid size",
    ]
    .iter()
    .any(|s| r.contains(s));
    if https && (r.contains("certificaterequired") || r.contains("certificate required")) {
        return "\n  the server requires a client certificate: pass --tls-cert and --tls-key (TAXON_TLS_CERT, TAXON_TLS_KEY)";
    }
    if https
        && (r.contains("certificate") || r.contains("unknownissuer") || r.contains("handshake"))
    {
        return "\n  the server's certificate is not trusted here: pass the CA that signed it with --tls-ca (TAXON_TLS_CA)";
    }
    // TLS 1.3 checks a client certificate after the client's side of the handshake is done,
    // so a refusal often reads as the server hanging up at the first call.
    if https && dropped {
        return "\n  the server closed the TLS connection: if it requires a client certificate (mutual TLS), pass --tls-cert and --tls-key (TAXON_TLS_CERT, TAXON_TLS_KEY)";
    }
    if !https && dropped {
        return "\n  if the server uses TLS, use an https:// address (and --tls-ca for a private CA)";
    }
    ""
}

/// A status's message and the errors under it (a transport failure's cause is there).
fn status_chain(status: &tonic::Status) -> String {
    let mut text = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// Turns a status into a sentence with a next step, by code: the codes a user can act on get
/// the action, the rest keep the server's own message.
fn describe_status(call: &str, addr: &str, status: &tonic::Status) -> String {
    // A transport failure's message is "transport error": its cause is what to show.
    let msg = status_chain(status);
    let tls = tls_hint(addr, &msg);
    let hint = match status.code() {
        // A connection TLS refused surfaces at the first call (TLS 1.3 checks a client
        // certificate after the handshake), as a transport error.
        Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
            if !tls.is_empty() =>
        {
            tls.trim_start_matches("\n  ").to_string()
        }
        // The server answered, so it runs: say which part of it is missing.
        Code::Unavailable if msg.contains("feature-server") => format!(
            "the server at {addr} is up, but no feature-server answers it: start or fix the \
             feature-server (its --features-url), then retry"
        ),
        Code::Unavailable if msg.contains("shutting down") => {
            "the server is shutting down or restarting: retry in a moment".to_string()
        }
        Code::Unavailable => format!(
            "is the server at {addr} running and its feature-server reachable? retry when it is up"
        ),
        Code::Unauthenticated => {
            "the server requires a token: pass --token or set TAXON_TOKEN".to_string()
        }
        Code::PermissionDenied => {
            "the token is not allowed to do this (check --token / --tenant)".to_string()
        }
        Code::Unimplemented => format!(
            "{addr} does not serve this call: is it the head-trainer (default port 50052) and not the feature-server (50051)?"
        ),
        Code::NotFound => "check the name with `client classes`".to_string(),
        Code::AlreadyExists => {
            "choose another name, or remove the existing class first".to_string()
        }
        Code::FailedPrecondition if call == "RemoveClass" => {
            "to remove a parent with its children, add --recursive".to_string()
        }
        Code::ResourceExhausted if msg.contains("requests per second") => "this tenant \
            is asking faster than its quota allows: retry after the time named above, or send \
            fewer requests at once"
            .to_string(),
        Code::ResourceExhausted if msg.contains("quota") => "nothing of this request was \
            stored: remove classes or photos the tenant no longer needs, or ask the operator to \
            raise the quota named above"
            .to_string(),
        Code::ResourceExhausted if msg.contains("busy") => "the server is at the limit named \
            above and nothing of this request was stored: retry in a moment, or send fewer \
            photos at once"
            .to_string(),
        Code::ResourceExhausted => {
            "a message exceeded a size limit (named above): send smaller images".to_string()
        }
        Code::OutOfRange => "a message exceeded the server's size limit: lower --max-file-mib, or raise the server's --max-photo-bytes".to_string(),
        Code::DeadlineExceeded => "the server took too long: retry, or check its load".to_string(),
        _ => String::new(),
    };
    let code = code_name(status.code() as i32);
    if hint.is_empty() {
        format!("{call} failed at {addr}: {code}: {msg}")
    } else {
        format!("{call} failed at {addr}: {code}: {msg}\n  {hint}")
    }
}

/// `NOT_FOUND`, `FAILED_PRECONDITION`: a gRPC code as the spec and other tools spell it, for
/// item errors (which carry the code as a number) and call failures alike.
pub fn code_name(code: i32) -> &'static str {
    taxon_proto::code_name(Code::from_i32(code))
}

/// Joins an error and its sources, because tonic's transport errors say only "transport error"
/// at the top and the useful part ("connection refused") lives in the chain.
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        next = e.source();
    }
    out
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_failures_get_the_flag_that_fixes_them() {
        let https = "https://h:1";
        for dropped in [
            "transport error: connection closed",
            "connection error: stream closed because of a broken pipe",
            "connection reset by peer",
        ] {
            assert!(tls_hint(https, dropped).contains("--tls-cert"), "{dropped}");
            assert!(
                tls_hint("http://h:1", dropped).contains("https://"),
                "{dropped}"
            );
        }
        let alert = "received fatal alert: CertificateRequired";
        assert!(tls_hint(https, alert).contains("--tls-cert"));
        let untrusted = "invalid peer certificate: UnknownIssuer";
        assert!(tls_hint(https, untrusted).contains("--tls-ca"));
        assert_eq!(tls_hint(https, "connection refused"), "");
    }

    #[test]
    fn code_names_are_screaming_snake() {
        assert_eq!(
            code_name(Code::FailedPrecondition as i32),
            "FAILED_PRECONDITION"
        );
        assert_eq!(code_name(3), "INVALID_ARGUMENT");
        assert_eq!(code_name(0), "OK");
    }

    fn hint(status: tonic::Status) -> String {
        Error::Rpc {
            call: "Enroll",
            addr: "http://h:1".into(),
            status,
        }
        .to_string()
    }

    #[test]
    fn a_busy_server_is_not_called_down() {
        let s = hint(tonic::Status::resource_exhausted(
            "busy: 1000 bytes waited (--max-inflight-bytes 100); retry later",
        ));
        assert!(
            s.contains("retry in a moment") && !s.contains("running?"),
            "{s}"
        );
        let s = hint(tonic::Status::unavailable(
            "feature-server unavailable: refused",
        ));
        assert!(s.contains("is up, but no feature-server answers"), "{s}");
    }

    #[test]
    fn unauthenticated_says_to_set_a_token() {
        let e = Error::Rpc {
            call: "ListClasses",
            addr: "http://h:1".into(),
            status: tonic::Status::unauthenticated("missing bearer token"),
        };
        let s = e.to_string();
        assert!(s.contains("--token") && s.contains("TAXON_TOKEN"), "{s}");
        assert!(s.contains("missing bearer token"), "{s}");
    }
}
