//! The listener: one connection of its own that `LISTEN`s for saved heads and reports them as
//! [`StoreEvent`]s, for as long as someone receives them.
//!
//! PostgreSQL drops notifications sent while a session is not listening, so every (re)connect
//! reports [`StoreEvent::Resync`] first: the receiver re-reads every tenant it has loaded,
//! and what was announced while the connection was down is not missed. A connection that dies
//! quietly (no FIN, as in a network partition) is found by a check every `CHECK_IDLE`.

use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use tokio::sync::mpsc::Sender;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::HEADS_CHANNEL;
use crate::store::StoreEvent;
use crate::{Error, Result};

/// How often the thread looks whether the receiver is gone.
const TICK: Duration = Duration::from_secs(1);
/// An idle connection is checked this often.
const CHECK_IDLE: Duration = Duration::from_secs(15);
/// Longest pause between two reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Starts the listener thread.
pub fn spawn(
    config: postgres::Config,
    tls: MakeRustlsConnect,
    events: Sender<StoreEvent>,
) -> Result<()> {
    std::thread::Builder::new()
        .name("taxon-pg-listen".into())
        .spawn(move || run(&config, &tls, &events))
        .map(drop)
        .map_err(|e| Error::Store(format!("starting the database listener: {e}")))
}

fn run(config: &postgres::Config, tls: &MakeRustlsConnect, events: &Sender<StoreEvent>) {
    let mut backoff = Duration::from_millis(100);
    while !events.is_closed() {
        let mut connected = false;
        match listen(config, tls, events, &mut connected) {
            Ok(()) => return, // nobody receives any more
            Err(e) => {
                tracing::warn!(error = %e, "database listener: connection lost; reconnecting")
            }
        }
        if connected {
            backoff = Duration::from_millis(100);
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One session: `Ok` when the receiver is gone, `Err` when the connection is.
fn listen(
    config: &postgres::Config,
    tls: &MakeRustlsConnect,
    events: &Sender<StoreEvent>,
    connected: &mut bool,
) -> std::result::Result<(), postgres::Error> {
    let mut client = config.connect(tls.clone())?;
    client.batch_execute(&format!("LISTEN {HEADS_CHANNEL}"))?;
    *connected = true;
    tracing::info!("database listener: listening for heads saved by other replicas");
    if events.blocking_send(StoreEvent::Resync).is_err() {
        return Ok(());
    }
    let mut last_heard = Instant::now();
    loop {
        let next = client.notifications().timeout_iter(TICK).next()?;
        match next {
            Some(n) => {
                last_heard = Instant::now();
                let Some(tenant) = tenant_of(n.payload()) else {
                    tracing::warn!(
                        payload = n.payload(),
                        "database listener: unreadable payload"
                    );
                    continue;
                };
                if events
                    .blocking_send(StoreEvent::Changed(tenant.to_string()))
                    .is_err()
                {
                    return Ok(());
                }
            }
            None if events.is_closed() => return Ok(()),
            None if last_heard.elapsed() >= CHECK_IDLE => {
                client.simple_query("")?;
                last_heard = Instant::now();
            }
            None => {}
        }
    }
}

/// The tenant of a `tenant kind version` payload (a tenant may hold spaces; kind and version
/// do not).
fn tenant_of(payload: &str) -> Option<&str> {
    let mut parts = payload.rsplitn(3, ' ');
    let (_version, _kind) = (parts.next()?, parts.next()?);
    parts.next().filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_tenant_is_everything_before_kind_and_version() {
        assert_eq!(super::tenant_of("acme flat 7"), Some("acme"));
        assert_eq!(super::tenant_of("a b c combined 12"), Some("a b c"));
        assert_eq!(super::tenant_of("flat 7"), None);
    }
}
