//! A throwaway PostgreSQL server for tests: `initdb` into a temp dir, `pg_ctl start` on a
//! free loopback port, stopped (and deleted) on drop. PostgreSQL refuses to run as root, so
//! as root (CI) the server runs as the `postgres` user.
//!
//! Without PostgreSQL installed, [`TestPostgres::start`] returns `None` (the caller skips)
//! on a developer's machine, and panics when `CI` is set: CI installs it (`.ci/run`), so a
//! missing server there is a broken CI, never a silent pass.
//!
//! Shared by the store's unit tests (included with `#[path]`) and the integration tests.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A running server; stopped on drop.
pub struct TestPostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    as_postgres: bool,
    /// Extra `-c name=value` server settings.
    settings: Vec<String>,
}

impl TestPostgres {
    /// Starts a fresh server, or `None` when PostgreSQL is not installed (outside CI).
    pub fn start() -> Option<Self> {
        Self::start_with(|_| Vec::new())
    }

    /// [`Self::start`] with extra server settings (`name=value`), made from the server's
    /// directory once it exists (where the settings' files, such as certificates, go).
    pub fn start_with(settings: impl FnOnce(&Path) -> Vec<String>) -> Option<Self> {
        let Some(bin) = find_bin() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI is set but PostgreSQL (initdb) is not installed: .ci/run installs it"
            );
            eprintln!("PostgreSQL not installed: skipping (CI would fail here)");
            return None;
        };
        let as_postgres = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        let dir = tempfile::tempdir().unwrap();
        if as_postgres {
            let (uid, gid) = postgres_user();
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let data = dir.path().join("data");
        let mut pg = Self {
            bin,
            dir,
            port: 0,
            as_postgres,
            settings: Vec::new(),
        };
        pg.run(
            "initdb",
            &[
                OsStr::new("-D"),
                data.as_os_str(),
                OsStr::new("-U"),
                OsStr::new("postgres"),
                OsStr::new("--auth=trust"),
                OsStr::new("-E"),
                OsStr::new("UTF8"),
                OsStr::new("--no-sync"),
            ],
        );
        pg.settings = settings(pg.dir.path());
        if as_postgres {
            // The files the settings name (a private key must belong to the server's user).
            let (uid, gid) = postgres_user();
            for entry in std::fs::read_dir(pg.dir.path()).unwrap() {
                let path = entry.unwrap().path();
                if path.is_file() {
                    std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
                }
            }
        }
        // A free port can be taken by someone else between our look and the server's bind:
        // try a few.
        for _ in 0..5 {
            pg.port = free_port();
            if pg.pg_ctl("start") {
                return Some(pg);
            }
        }
        let log = std::fs::read_to_string(pg.dir.path().join("log")).unwrap_or_default();
        panic!("pg_ctl start failed five times:\n{log}");
    }

    /// The URL of the `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The server's own directory (its data, log and socket live below it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the server at once (as a crash would), or starts it again.
    pub fn pg_ctl(&self, action: &str) -> bool {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("log");
        // fsync off: these servers hold test data only, and the machine is shared.
        let mut opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        for s in &self.settings {
            opts.push_str(" -c ");
            opts.push_str(s);
        }
        let mut args: Vec<&OsStr> = vec![
            OsStr::new("-D"),
            data.as_os_str(),
            OsStr::new("-l"),
            log.as_os_str(),
            OsStr::new("-w"),
        ];
        if action == "stop" {
            args.extend([OsStr::new("-m"), OsStr::new("immediate")]);
        } else {
            args.extend([OsStr::new("-o"), OsStr::new(&opts)]);
        }
        args.push(action.as_ref());
        self.try_run("pg_ctl", &args)
    }

    fn command(&self, tool: &str) -> Command {
        let tool = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(tool);
            c
        } else {
            Command::new(tool)
        }
    }

    fn try_run(&self, tool: &str, args: &[&OsStr]) -> bool {
        let out = self.command(tool).args(args).output().unwrap();
        if !out.status.success() {
            eprintln!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out.status.success()
    }

    fn run(&self, tool: &str, args: &[&OsStr]) {
        assert!(self.try_run(tool, args), "{tool} failed");
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        self.pg_ctl("stop");
    }
}

/// The folder of `initdb` and `pg_ctl`: beside `initdb` on PATH (through its symlink), or
/// Debian's /usr/lib/postgresql/<version>/bin.
fn find_bin() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("initdb"))
            .find(|p| p.is_file())
    });
    if let Some(initdb) = on_path {
        let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
        return real.parent().map(Path::to_path_buf);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|b| b.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop()
}

/// uid and gid of the `postgres` user, from /etc/passwd.
fn postgres_user() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("running as root needs a `postgres` user (the Debian package creates it)");
    let fields: Vec<&str> = line.split(':').collect();
    (fields[2].parse().unwrap(), fields[3].parse().unwrap())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
