//! A private PostgreSQL server for the tests of this process (`scripts/pg-server serve`), started
//! once, with a fresh database per test. The server's standard input is a pipe this process
//! holds: when the process ends, however it ends, the server stops and its directory is removed.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use super::postgres::PostgresSettings;

struct Server {
    /// "postgres://tapgraph@127.0.0.1:PORT/" without a database.
    base: String,
    _child: Mutex<Child>,
}

static SERVER: OnceLock<Option<Server>> = OnceLock::new();
static NEXT: AtomicU32 = AtomicU32::new(0);

fn script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg-server")
}

fn start() -> Option<Server> {
    serve(&[])
}

/// A server of its own that also accepts TLS with this certificate and key (PEM files), for as
/// long as the returned guard lives. `None` (said loudly) without PostgreSQL outside CI.
pub(crate) fn tls_server(cert: &std::path::Path, key: &std::path::Path) -> Option<TlsServer> {
    let cert = cert.display().to_string();
    let key = key.display().to_string();
    let server = serve(&["--tls-cert", &cert, "--tls-key", &key])?;
    Some(TlsServer(server))
}

/// Stops its server when dropped (its standard input closes).
pub(crate) struct TlsServer(Server);

impl TlsServer {
    /// "postgres://tapgraph@127.0.0.1:PORT/" without a database.
    pub(crate) fn base(&self) -> &str {
        &self.0.base
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        if let Ok(mut child) = self.0._child.lock() {
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }
}

fn serve(args: &[&str]) -> Option<Server> {
    let bin = Command::new(script()).arg("bin").output().ok()?;
    if !bin.status.success() {
        let why = "PostgreSQL is not installed (scripts/install-deps installs it)";
        assert!(
            std::env::var_os("CI").is_none(),
            "{why}: CI must run the PostgreSQL store tests"
        );
        eprintln!("\n*** SKIPPED: {why}; the PostgreSQL store tests did not run ***\n");
        return None;
    }
    let mut child = Command::new(script())
        .arg("serve")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("scripts/pg-server serve");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("pg-server output");
    let url = line
        .trim()
        .strip_prefix("ready ")
        .unwrap_or_else(|| panic!("scripts/pg-server serve said {line:?}"));
    let base = url
        .split_once("/tapgraph?")
        .map(|(b, _)| format!("{b}/"))
        .expect("the URL names the database tapgraph");
    Some(Server {
        base,
        _child: Mutex::new(child),
    })
}

/// Settings for a new, empty database on the shared test server; `None` (said loudly) when
/// PostgreSQL is not installed outside CI.
pub(crate) async fn database() -> Option<PostgresSettings> {
    let server = SERVER.get_or_init(start).as_ref()?;
    let name = format!(
        "t_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let (client, connection) =
        tokio_postgres::connect(&format!("{}postgres", server.base), tokio_postgres::NoTls)
            .await
            .expect("connect to the test server");
    let driver = tokio::spawn(connection);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create a test database");
    drop(client);
    let _ = driver.await;
    Some(PostgresSettings {
        url: format!("{}{name}?sslmode=disable", server.base),
        password_file: None,
    })
}

/// A plain session on the test database `url` (no TLS), for a test to look at or change what the
/// store wrote; its connection is driven by a task of its own.
pub(crate) async fn client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    tokio::spawn(connection);
    client
}
