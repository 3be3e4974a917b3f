//! The `client` command line as a library, so the workspace's integration tests drive every
//! command in-process (`execute(cli, &mut buffer)`) exactly as the binary does.

pub mod commands;
pub mod connect;
pub mod dataset;
pub mod error;
pub mod eval;
pub mod files;
pub mod output;
pub mod retry;

use std::io::Write;

use clap::{Parser, Subcommand};

use crate::connect::{Auth, Conn, DEFAULT_SERVER, Service};
pub use crate::error::{Error, Result};
use crate::retry::RetryPolicy;

/// Teach an image classifier new classes from a handful of photos.
#[derive(Debug, Parser)]
#[command(name = "client", version, about, propagate_version = true)]
pub struct Cli {
    /// The head-trainer's address.
    #[arg(long, env = "TAXON_SERVER", default_value = DEFAULT_SERVER, global = true)]
    pub server: String,
    /// Tenant to act for (sent as `x-tenant`); the server's default tenant when unset.
    #[arg(long, env = "TAXON_TENANT", global = true)]
    pub tenant: Option<String>,
    /// Bearer token, for servers started with tokens (sent as `authorization`).
    #[arg(long, env = "TAXON_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Machine-readable output: JSON on stdout, no progress bars.
    #[arg(long, global = true)]
    pub json: bool,
    /// Keep retrying a call that found no server (UNAVAILABLE: a replica restarting) for up
    /// to this many seconds, with backoff; 0 fails at once.
    #[arg(long, env = "TAXON_RETRY_S", default_value_t = 30, global = true)]
    pub retry_s: u64,
    /// Deadline of each call in seconds (sent as `grpc-timeout`; the server gives up then and
    /// answers DEADLINE_EXCEEDED); 0: none from the client (the server's own applies).
    #[arg(long, env = "TAXON_TIMEOUT_S", default_value_t = 0.0, global = true)]
    pub timeout_s: f64,
    /// PEM CA that signs an https:// server's certificate (the system's roots otherwise).
    #[arg(long, env = "TAXON_TLS_CA", global = true)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Our PEM certificate, for a server that requires one (mutual TLS).
    #[arg(long, env = "TAXON_TLS_CERT", global = true, requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "TAXON_TLS_KEY", global = true, requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// A W3C trace context to continue (a script's own trace), so that the servers' spans
    /// and log lines for this command are in it; a new trace per command otherwise.
    #[arg(long, env = "TRACEPARENT", global = true)]
    pub traceparent: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses a command line whose first item is the program name: for tests and embedders,
    /// without a dependency on clap.
    pub fn try_from_args<I, T>(args: I) -> std::result::Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Self::try_parse_from(args)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Upload photos of a class (folders, files, globs), or a whole <parent>/<child>/ tree.
    Enroll(commands::enroll::Args),
    /// Classify images: decision, label, probability and parent per image.
    Classify(commands::classify::Args),
    /// The tenant's classes as a tree, with example counts.
    Classes,
    /// Remove a class and its examples (a parent only with --recursive).
    Remove(commands::manage::RemoveArgs),
    /// Rename a class, keeping its examples and the trained head.
    Rename(commands::manage::RenameArgs),
    /// Write the tenant (taxonomy, embeddings, class means, heads; no photos) to one file.
    Export(commands::transfer::ExportArgs),
    /// Load a file from `export` into this (empty) tenant, on this server or another.
    Import(commands::transfer::ImportArgs),
    /// How well each class is learned (leave-one-out, from the cached embeddings): estimates,
    /// confused pairs, classes that need more photos, photos that look mislabelled.
    Report(commands::report::Args),
    /// The server's grpc.health.v1 status.
    Health(commands::health::Args),
    /// Head and model summary, or a feature-server's model with --features.
    Info(commands::info::Args),
    /// k-shot evaluation of every head on a <parent>/<child>/ photo tree.
    Eval(eval::Args),
    /// A shell completion script on stdout (bash, zsh, fish, elvish, powershell).
    Completions(commands::completions::Args),
}

/// How a command that ran to the end went: some commands print their results and still fail
/// (an image that could not be classified, an accuracy below the bar).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The output is printed; the process should exit non-zero, saying why.
    Failed(String),
}

/// What every command needs besides its own arguments.
pub struct Ctx<'a> {
    pub server: String,
    pub tenant: Option<String>,
    pub token: Option<String>,
    pub json: bool,
    pub retry: RetryPolicy,
    /// Each call's deadline, from `--timeout-s`.
    pub timeout: Option<std::time::Duration>,
    /// How https:// servers are trusted (`--tls-ca`), and our certificate.
    pub tls: taxon_ops::tls::ClientTls,
    /// The trace to continue (`TRACEPARENT`); a new one per command otherwise.
    pub trace: Option<taxon_ops::trace::TraceContext>,
    pub out: &'a mut dyn Write,
}

impl Ctx<'_> {
    pub fn auth(&self) -> Result<Auth> {
        let auth =
            Auth::new(self.tenant.as_deref(), self.token.as_deref())?.with_timeout(self.timeout);
        Ok(match self.trace {
            Some(t) => auth.with_trace(t),
            None => auth,
        })
    }

    /// Connects to the head-trainer at `--server`.
    pub async fn connect(&self) -> Result<Conn> {
        Ok(
            Conn::connect(&self.server, Service::HeadTrainer, self.auth()?, &self.tls)
                .await?
                .with_retry(self.retry.clone()),
        )
    }
}

/// Runs one parsed command line, writing results to `out` (progress goes to stderr).
pub async fn execute(cli: Cli, out: &mut dyn Write) -> Result<Outcome> {
    let mut ctx = Ctx {
        server: cli.server,
        tenant: cli.tenant,
        token: cli.token,
        json: cli.json,
        retry: RetryPolicy::new(std::time::Duration::from_secs(cli.retry_s)),
        timeout: timeout(cli.timeout_s)?,
        tls: taxon_ops::tls::ClientTls {
            ca: cli.tls_ca,
            cert: cli.tls_cert,
            key: cli.tls_key,
            flags: Default::default(),
        },
        trace: cli
            .traceparent
            .as_deref()
            .and_then(taxon_ops::trace::TraceContext::parse),
        out,
    };
    let outcome = match cli.command {
        Command::Enroll(args) => commands::enroll::run(&mut ctx, args).await?,
        Command::Classify(args) => commands::classify::run(&mut ctx, args).await?,
        Command::Classes => commands::classes::run(&mut ctx).await?,
        Command::Remove(args) => commands::manage::remove(&mut ctx, args).await?,
        Command::Rename(args) => commands::manage::rename(&mut ctx, args).await?,
        Command::Export(args) => commands::transfer::export(&mut ctx, args).await?,
        Command::Import(args) => commands::transfer::import(&mut ctx, args).await?,
        Command::Report(args) => commands::report::run(&mut ctx, args).await?,
        Command::Health(args) => commands::health::run(&mut ctx, args).await?,
        Command::Info(args) => commands::info::run(&mut ctx, args).await?,
        Command::Eval(args) => eval::run(&mut ctx, args).await?,
        Command::Completions(args) => commands::completions::run(&mut ctx, args)?,
    };
    ctx.out.flush()?;
    Ok(outcome)
}

/// `--timeout-s` as a deadline: none for 0, an error for a value no deadline can be.
fn timeout(seconds: f64) -> Result<Option<std::time::Duration>> {
    if seconds == 0.0 {
        return Ok(None);
    }
    std::time::Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| !d.is_zero())
        .map(Some)
        .ok_or_else(|| {
            Error::Usage(format!(
                "--timeout-s {seconds}: give a positive number of seconds, or 0 for none"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn enroll_parses_exactly_as_documented() {
        let cli = Cli::try_parse_from([
            "client",
            "enroll",
            "--class",
            "mymug",
            "--parent",
            "kitchenware",
            "./pics",
        ])
        .unwrap();
        let Command::Enroll(args) = cli.command else {
            panic!("not enroll")
        };
        assert_eq!(args.class.as_deref(), Some("mymug"));
        assert_eq!(args.parent, "kitchenware");
        assert_eq!(args.paths, vec!["./pics".to_string()]);
    }

    #[test]
    fn timeouts_are_positive_seconds_or_none() {
        assert_eq!(timeout(0.0).unwrap(), None);
        assert_eq!(
            timeout(2.5).unwrap(),
            Some(std::time::Duration::from_millis(2500))
        );
        assert!(timeout(-1.0).is_err());
        assert!(timeout(f64::NAN).is_err());
        assert!(timeout(1e-12).is_err(), "rounds to zero");
    }

    #[tokio::test]
    async fn completions_cover_every_command_and_flag() {
        for shell in ["bash", "zsh", "fish"] {
            let cli = Cli::try_parse_from(["client", "completions", shell]).unwrap();
            let mut out = Vec::new();
            assert_eq!(execute(cli, &mut out).await.unwrap(), Outcome::Success);
            let script = String::from_utf8(out).unwrap();
            for word in ["enroll", "classify", "retry-s", "max-file-mib", "dataset"] {
                assert!(script.contains(word), "{shell} completions lack {word}");
            }
        }
        assert!(Cli::try_parse_from(["client", "completions", "cmd.exe"]).is_err());
    }

    #[test]
    fn enroll_takes_either_a_class_and_photos_or_a_dataset() {
        let parse =
            |a: &[&str]| Cli::try_parse_from(std::iter::once("client").chain(a.iter().copied()));
        assert!(parse(&["enroll", "--dataset", "pets"]).is_ok());
        assert!(parse(&["enroll", "--dataset", "pets", "./pics"]).is_err());
        assert!(parse(&["enroll", "--class", "x", "--dataset", "pets"]).is_err());
        assert!(parse(&["enroll", "./pics"]).is_err(), "photos need a class");
        assert!(
            parse(&["enroll", "--class", "x"]).is_err(),
            "a class needs photos"
        );
    }
}
