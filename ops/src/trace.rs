//! W3C trace context (`traceparent`), carried in gRPC metadata from the caller through the
//! head-trainer to the feature-server and into the batch that served it, so that one
//! request's lines can be found in every service's logs by its trace id.
//!
//! Spans record `trace_id` as a field; with the `otlp` feature and `--otlp-endpoint`, they
//! are also exported as OpenTelemetry spans of the caller's trace ([`crate::otlp`]).

use std::fmt;

/// The metadata key (lower case, as gRPC and HTTP/2 require).
pub const TRACEPARENT: &str = "traceparent";

/// A trace id and the id of the span that made the call (`parent`), as in
/// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    pub parent_id: u64,
    pub flags: u8,
}

impl TraceContext {
    /// Parses a `traceparent` value; `None` for anything malformed (the W3C rule: a bad
    /// header is ignored and a new trace starts), including the all-zero ids.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let parent = parts.next()?;
        let flags = parts.next()?;
        // Version 00 has exactly four fields; later versions may append more.
        if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        let hex = |s: &str, len: usize| {
            (s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
            .then_some(())
        };
        hex(version, 2)?;
        hex(trace, 32)?;
        hex(parent, 16)?;
        hex(flags, 2)?;
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let parent_id = u64::from_str_radix(parent, 16).ok()?;
        if trace_id == 0 || parent_id == 0 {
            return None;
        }
        Some(Self {
            trace_id,
            parent_id,
            flags: u8::from_str_radix(flags, 16).ok()?,
        })
    }

    /// A new trace, for a request that came without one (sampled).
    pub fn root() -> Self {
        Self {
            trace_id: random_nonzero::<u128>(),
            parent_id: random_nonzero::<u64>(),
            flags: 1,
        }
    }

    /// The context to send downstream: the same trace, with the current span as the parent
    /// (its exported span id when spans are exported, a fresh id otherwise).
    pub fn child(&self) -> Self {
        #[cfg(feature = "otlp")]
        let parent_id =
            crate::otlp::span_id(&tracing::Span::current()).unwrap_or_else(random_nonzero::<u64>);
        #[cfg(not(feature = "otlp"))]
        let parent_id = random_nonzero::<u64>();
        Self { parent_id, ..*self }
    }

    /// Puts `span` into this trace: records its `trace_id` field (declared by the span) and,
    /// when spans are exported, makes the caller's span its parent.
    pub fn adopt(&self, span: &tracing::Span) {
        span.record("trace_id", self.trace_id_hex());
        #[cfg(feature = "otlp")]
        crate::otlp::adopt(span, self);
    }

    /// From gRPC metadata, or HTTP headers (the same name and format).
    pub fn from_header(value: Option<&[u8]>) -> Option<Self> {
        Self::parse(std::str::from_utf8(value?).ok()?)
    }

    /// The trace id as it is logged: 32 lower-case hex digits.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

/// A random id that is not zero (zero means "invalid" in W3C trace context), from the
/// thread-local generator `rand` seeds from the OS: ids of concurrent requests never share
/// a seed.
fn random_nonzero<T>() -> T
where
    T: Copy + PartialEq + Default,
    rand::distr::StandardUniform: rand::distr::Distribution<T>,
{
    loop {
        let v: T = rand::random();
        if v != T::default() {
            return v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_the_w3c_example() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceContext::parse(v).unwrap();
        assert_eq!(t.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(t.parent_id, 0x00f067aa0ba902b7);
        assert_eq!(t.flags, 1);
        assert_eq!(t.to_string(), v);
        let c = t.child();
        assert_eq!(c.trace_id, t.trace_id);
        assert_ne!(c.parent_id, t.parent_id);
    }

    #[test]
    fn refuses_what_the_spec_says_to_ignore() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
        // A later version may carry more fields: its first four are read.
        assert!(
            TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x")
                .is_some()
        );
    }

    #[test]
    fn new_traces_differ() {
        let (a, b) = (TraceContext::root(), TraceContext::root());
        assert_ne!(a.trace_id, b.trace_id);
        assert!(TraceContext::parse(&a.to_string()) == Some(a));
    }
}
