//! The feature-server endpoints, kept in step with DNS.
//!
//! A `--features-url` may name a service that resolves to several addresses (compose's
//! `--scale feature-server=3`, a Kubernetes headless service). Each URL is resolved now and
//! again every `interval`; an address that appears becomes an endpoint of the balanced
//! channel, one that is gone is removed, so scaling the feature-servers takes effect without
//! restarting the head-trainer. A failed lookup changes nothing (a DNS hiccup must not empty
//! the pool). The task ends with the channel.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc::Sender;
use tonic::transport::channel::Change;
use tonic::transport::{Endpoint, Uri};

use crate::{Error, Result};

/// One `--features-url`, split for resolving.
#[derive(Clone, Debug)]
pub struct Target {
    url: String,
    scheme: String,
    host: String,
    port: u16,
}

impl Target {
    pub fn parse(url: &str) -> Result<Self> {
        let bad = |why: &str| Error::InvalidArgument(format!("--features-url {url}: {why}"));
        let uri: Uri = url.parse().map_err(|e| bad(&format!("{e}")))?;
        let scheme = uri.scheme_str().unwrap_or("http").to_string();
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let port = uri
            .port_u16()
            .unwrap_or(if scheme == "https" { 443 } else { 80 });
        Ok(Self {
            url: url.to_string(),
            scheme,
            // An IPv6 literal comes bracketed; the resolver wants it bare.
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
        })
    }

    async fn addresses(&self) -> std::io::Result<BTreeSet<SocketAddr>> {
        Ok(tokio::net::lookup_host((self.host.as_str(), self.port))
            .await?
            .collect())
    }
}

/// Keeps `changes` (the balanced channel's endpoint set) equal to what `targets` resolve to,
/// with endpoints made by `endpoint` from `scheme://address` and the URL's host name (what an
/// `https://` server's certificate must name, since the endpoint itself is an address).
pub async fn follow(
    targets: Vec<Target>,
    interval: Duration,
    endpoint: impl Fn(&str, &str) -> Result<Endpoint> + Send + 'static,
    changes: Sender<Change<String, Endpoint>>,
) {
    let mut current: BTreeSet<String> = BTreeSet::new();
    loop {
        for target in &targets {
            let addresses = match target.addresses().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(url = %target.url, error = %e, "feature-server lookup failed; keeping the endpoints we have");
                    continue;
                }
            };
            let prefix = format!("{}#", target.url);
            let wanted: BTreeSet<String> =
                addresses.iter().map(|a| format!("{prefix}{a}")).collect();
            let stale: Vec<String> = current
                .iter()
                .filter(|k| k.starts_with(&prefix) && !wanted.contains(*k))
                .cloned()
                .collect();
            for key in stale {
                tracing::info!(endpoint = %key, "feature-server address gone");
                current.remove(&key);
                if changes.send(Change::Remove(key)).await.is_err() {
                    return;
                }
            }
            for address in addresses {
                let key = format!("{prefix}{address}");
                if current.contains(&key) {
                    continue;
                }
                match endpoint(&format!("{}://{address}", target.scheme), &target.host) {
                    Ok(e) => {
                        tracing::info!(endpoint = %key, "feature-server address added");
                        if changes.send(Change::Insert(key.clone(), e)).await.is_err() {
                            return;
                        }
                        current.insert(key);
                    }
                    Err(e) => tracing::warn!(endpoint = %key, error = %e, "skipping address"),
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = changes.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_scheme_host_and_port() {
        let t = Target::parse("http://feature-server:50051").unwrap();
        assert_eq!(
            (t.scheme.as_str(), t.host.as_str(), t.port),
            ("http", "feature-server", 50051)
        );
        let t = Target::parse("http://[::1]:7").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 7));
        assert_eq!(Target::parse("https://fs.example").unwrap().port, 443);
        assert!(Target::parse("not a url").is_err());
    }

    #[tokio::test]
    async fn addresses_come_and_go_as_the_name_resolves() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let targets = vec![Target::parse("http://localhost:50051").unwrap()];
        let task = tokio::spawn(follow(
            targets,
            Duration::from_secs(3600),
            |uri, _host| Ok(Endpoint::from_shared(uri.to_string()).unwrap()),
            tx,
        ));
        let Some(Change::Insert(key, endpoint)) = rx.recv().await else {
            panic!("no endpoint for localhost");
        };
        assert!(key.starts_with("http://localhost:50051#"), "{key}");
        assert_eq!(endpoint.uri().port_u16(), Some(50051));
        drop(rx); // the channel is gone: the task ends
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the resolver outlived its channel")
            .unwrap();
    }
}
