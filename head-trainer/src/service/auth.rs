//! Who is asking: the tenant of a request.
//!
//! Without a tokens file the tenant is the `x-tenant` metadata (default `default`): fine
//! behind a trusted gateway. With one, the bearer token alone decides the tenant and
//! `x-tenant` is ignored, so a client cannot reach another tenant by setting a header.
//! Tokens are kept as sha256 digests and looked up by digest, so the lookup's timing says
//! nothing about how much of a guessed token was right.
//!
//! It runs as a tonic interceptor ([`Auth::intercept`]), before any method: the tenant it
//! finds travels in the request's extensions as a [`TenantId`], so no method can forget to
//! authenticate and none repeats it.

use std::collections::HashMap;
use std::path::Path;

use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use crate::{Error, Result};

/// The authenticated tenant of a request, in its extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantId(pub String);

/// Token digests to tenants, when tokens are on.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    tokens: Option<HashMap<[u8; 32], String>>,
}

impl Auth {
    /// No tokens: tenants come from `x-tenant`.
    pub fn open() -> Self {
        Self::default()
    }

    /// Reads `token tenant` lines (blank lines and `#` comments skipped).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::InvalidArgument(format!("tokens file {}: {e}", path.display())))?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self> {
        let mut tokens = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(token), Some(tenant), None) => {
                    validate_tenant(tenant)?;
                    // A token listed twice would silently serve one of two tenants.
                    if tokens.insert(digest(token), tenant.to_string()).is_some() {
                        return Err(Error::InvalidArgument(format!(
                            "tokens file line {}: this token is already listed on an earlier line",
                            n + 1
                        )));
                    }
                }
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "tokens file line {}: expected `token tenant`",
                        n + 1
                    )));
                }
            }
        }
        Ok(Self {
            tokens: Some(tokens),
        })
    }

    pub fn enabled(&self) -> bool {
        self.tokens.is_some()
    }

    /// The interceptor: refuses the request, or lets it through with its [`TenantId`].
    pub fn intercept(&self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let tenant = self.tenant(req.metadata())?;
        req.extensions_mut().insert(TenantId(tenant));
        Ok(req)
    }

    /// The tenant a request belongs to.
    pub fn tenant(&self, md: &MetadataMap) -> Result<String> {
        let Some(tokens) = &self.tokens else {
            let tenant = match md.get(taxon_proto::TENANT_HEADER) {
                None => taxon_proto::DEFAULT_TENANT,
                Some(v) => v
                    .to_str()
                    .map_err(|_| Error::InvalidArgument("x-tenant is not ASCII".into()))?,
            };
            validate_tenant(tenant)?;
            return Ok(tenant.to_string());
        };
        let header = md
            .get("authorization")
            .ok_or(Error::Unauthenticated(
                "missing `authorization: Bearer <token>`",
            ))?
            .to_str()
            .map_err(|_| Error::Unauthenticated("malformed authorization header"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or(Error::Unauthenticated(
                "authorization is not a bearer token",
            ))?;
        tokens
            .get(&digest(token.trim()))
            .cloned()
            .ok_or(Error::Unauthenticated("unknown token"))
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Tenant names: 1..=64 of `[A-Za-z0-9._-]`, so they are safe in logs and keys.
pub fn validate_tenant(t: &str) -> Result<()> {
    let ok = !t.is_empty()
        && t.len() <= 64
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid tenant {}: 1 to 64 of A-Z a-z 0-9 . _ -",
            echo(t)
        )))
    }
}

/// A caller's string as an error may quote it: at most 64 characters, so that an error never
/// echoes kilobytes of a header back (into logs, or to the caller).
pub fn echo(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes)", &s[..cut], s.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_listed_twice_is_refused() {
        let err = Auth::parse("s3cret acme\nother beta\ns3cret gamma\n").unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
    }

    #[test]
    fn errors_quote_at_most_64_characters_of_a_header() {
        let huge = "x".repeat(10_000);
        let err = Auth::open()
            .tenant(&md(&[("x-tenant", huge.as_str())]))
            .unwrap_err()
            .to_string();
        assert!(err.len() < 200, "{} bytes: {err}", err.len());
        assert!(err.contains("10000 bytes"), "{err}");
    }

    fn md(pairs: &[(&'static str, &str)]) -> MetadataMap {
        let mut m = MetadataMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    #[test]
    fn header_or_default_without_tokens() {
        let a = Auth::open();
        assert_eq!(a.tenant(&md(&[])).unwrap(), "default");
        assert_eq!(a.tenant(&md(&[("x-tenant", "acme")])).unwrap(), "acme");
        assert!(a.tenant(&md(&[("x-tenant", "a b")])).is_err());
    }

    #[test]
    fn token_decides_the_tenant() {
        let a = Auth::parse("# comment\ns3cret acme\n\nother beta\n").unwrap();
        let t = a
            .tenant(&md(&[
                ("authorization", "Bearer s3cret"),
                ("x-tenant", "beta"),
            ]))
            .unwrap();
        assert_eq!(t, "acme");
        let e = a.tenant(&md(&[("x-tenant", "acme")])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = a
            .tenant(&md(&[("authorization", "Bearer nope")]))
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(Auth::parse("only-one-field\n").is_err());
    }
}
