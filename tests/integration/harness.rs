//! The integration harness: real binaries, real certificates, optional network-namespace hosts.
//! Every process and namespace it makes is torn down on drop, also when a test fails; a failing
//! test prints the tail of every process log.

#![allow(dead_code)] // Each test file uses a different part of the harness.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// Where the workspace binaries are: `$TAPGRAPH_BIN_DIR`, else the target directory this test
/// binary was built into.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TAPGRAPH_BIN_DIR") {
        return dir.into();
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/integration-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("target directory")
        .to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} not found: build the binaries first with `cargo build --workspace --bins` (scripts/test does)",
        path.display()
    );
    path
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// True when the test may run; otherwise says loudly why it is skipped.
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    eprintln!(
        "\n*** SKIPPED {test}: needs root (network namespaces). CI runs as root; run `sudo scripts/test` here. ***\n"
    );
    false
}

/// Polls `probe` until it returns `Some` or `timeout` passes; panics naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process whose output goes to a log file. Dropping it stops it (SIGTERM, then SIGKILL).
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Proc {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let err = out.try_clone().expect("log file");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, signal: Signal) {
        let _ = kill(self.pid(), signal);
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap: the process gets no chance to clean up (a crash, a power cut).
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(3) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- last lines of {} ({}) -----\n{}\n-----",
                self.name,
                self.log.display(),
                self.tail(40)
            );
        }
    }
}

/// Runs `cmd` expecting its configuration to be refused: exit status 78. Returns its stderr.
pub fn refused_config(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run the command");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(78),
        "expected exit 78 from {cmd:?}: {err}"
    );
    err
}

/// `GET path` over HTTP/1.1; returns the status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, path, &[]).map(|r| (r.status, r.body))
}

/// An HTTP/1.1 response: status, headers (names lowercased) and body.
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` with extra request headers.
pub fn http_request(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<HttpResponse> {
    // Generous: CI runs many controllers at once on two cores.
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let extra: String = headers
        .iter()
        .map(|(n, v)| format!("{n}: {v}\r\n"))
        .collect();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let bad = || std::io::Error::other(format!("bad HTTP response: {response:?}"));
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(bad)?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: body.to_string(),
    })
}

/// A test's world: a temporary directory with the controller's state, agents' state and logs.
pub struct World {
    pub dir: tempfile::TempDir,
}

/// Names in the controller's serving certificate: loopback, and the hub address of netns tests.
pub const SERVER_NAMES: &str = "localhost,127.0.0.1,198.18.0.1";

impl World {
    pub fn new() -> World {
        World {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path().join("controller")
    }

    pub fn agent_dir(&self, id: &str) -> PathBuf {
        self.path().join("agents").join(id)
    }

    /// A controller command with its state directory and addresses set by flags.
    pub fn controller_cmd(&self, grpc: SocketAddr, http: SocketAddr) -> Command {
        self.controller_cmd_at(&self.state_dir(), grpc, http)
    }

    /// A controller command with the state directory `state_dir` (a replica's own).
    pub fn controller_cmd_at(
        &self,
        state_dir: &Path,
        grpc: SocketAddr,
        http: SocketAddr,
    ) -> Command {
        let mut cmd = Command::new(bin("tapgraph-controller"));
        cmd.arg("--state-dir")
            .arg(state_dir)
            .arg("--listen")
            .arg(grpc.to_string())
            .arg("--http-listen")
            .arg(http.to_string())
            .arg("--server-names")
            .arg(SERVER_NAMES)
            .env("TAPGRAPH_LOG__LEVEL", "info,tapgraph_controller=debug");
        cmd
    }

    /// The controller's CA, as it created it in its state directory.
    pub fn ca(&self) -> tapgraph::pki::CertAuthority {
        let pki = self.state_dir().join("pki");
        let read = |f: &str| {
            std::fs::read_to_string(pki.join(f))
                .expect("controller CA (start the controller first)")
        };
        tapgraph::pki::CertAuthority::from_pem(&read("ca.pem"), &read("ca.key")).expect("CA")
    }

    pub fn ca_pem(&self) -> PathBuf {
        self.state_dir().join("pki").join("ca.pem")
    }

    /// The CA replicas share (`pki.ca_cert`, `pki.ca_key`), made once where [`World::ca`] reads
    /// it, as an operator would make the Secret every replica mounts. Returns (cert, key).
    pub fn shared_ca(&self) -> (PathBuf, PathBuf) {
        let pki = self.state_dir().join("pki");
        let (cert, key) = (pki.join("ca.pem"), pki.join("ca.key"));
        if !key.exists() {
            let ca = tapgraph::pki::CertAuthority::generate(
                "tapgraph test replicas CA",
                Duration::from_secs(86_400),
            )
            .expect("a CA");
            tapgraph::fsutil::private_dir(&self.state_dir()).unwrap();
            tapgraph::fsutil::private_dir(&pki).unwrap();
            tapgraph::fsutil::write_private(&key, ca.key_pem().as_bytes()).unwrap();
            tapgraph::fsutil::write_private(&cert, ca.cert_pem().as_bytes()).unwrap();
        }
        (cert, key)
    }

    /// The state directory of replica `name` (its serving certificate; the state is in the database).
    pub fn replica_dir(&self, name: &str) -> PathBuf {
        self.path().join(format!("replica-{name}"))
    }

    /// Replica `name` of a controller on the PostgreSQL database `url`, with the shared CA.
    pub fn replica_cmd(
        &self,
        name: &str,
        url: &str,
        grpc: SocketAddr,
        http: SocketAddr,
    ) -> Command {
        let (ca_cert, ca_key) = self.shared_ca();
        let mut cmd = self.controller_cmd_at(&self.replica_dir(name), grpc, http);
        cmd.env("TAPGRAPH_STORE__BACKEND", "postgres")
            .env("TAPGRAPH_STORE__POSTGRES__URL", url)
            .env("TAPGRAPH_REPLICA", name)
            .env("TAPGRAPH_PKI__CA_CERT", ca_cert)
            .env("TAPGRAPH_PKI__CA_KEY", ca_key);
        cmd
    }

    /// Issues agent `id` a certificate straight from the controller CA (no enrollment) into its
    /// state directory, as an operator with the CA key could.
    pub fn issue_agent(&self, id: &str) -> PathBuf {
        let ca = self.ca();
        let cert = ca
            .issue(
                &tapgraph::identity::Identity::agent(id).unwrap(),
                &[],
                Duration::from_secs(3600),
            )
            .expect("agent certificate");
        let dir = self.agent_dir(id);
        tapgraph::fsutil::private_dir(&dir).unwrap();
        tapgraph::fsutil::write_private(&dir.join("agent.pem"), cert.cert_pem.as_bytes()).unwrap();
        tapgraph::fsutil::write_private(&dir.join("agent.key"), cert.key_pem.as_bytes()).unwrap();
        tapgraph::fsutil::write_private(&dir.join("ca.pem"), ca.cert_pem().as_bytes()).unwrap();
        dir
    }

    /// An agent command whose state directory is `agent_dir(id)`.
    pub fn agent_cmd(&self, id: &str, controller: SocketAddr) -> Command {
        let mut cmd = Command::new(bin("tapgraph-agent"));
        cmd.arg("--controller")
            .arg(controller.to_string())
            .arg("--state-dir")
            .arg(self.agent_dir(id))
            // Many agents share a namespace in tests: each takes a free port for /metrics.
            .env("TAPGRAPH_METRICS__LISTEN", "127.0.0.1:0");
        cmd
    }

    /// A tapgraphctl config for operator `name`, made by `tapgraph-controller operator issue`.
    pub fn operator(&self, name: &str, grpc: SocketAddr) -> PathBuf {
        let out = self.path().join(format!("ctl-{name}.toml"));
        let status = Command::new(bin("tapgraph-controller"))
            .args(["operator", "issue", name, "--state-dir"])
            .arg(self.state_dir())
            .arg("--listen")
            .arg(grpc.to_string())
            .arg("--server-names")
            .arg(SERVER_NAMES)
            .arg("--out")
            .arg(&out)
            .output()
            .expect("operator issue");
        assert!(
            status.status.success(),
            "operator issue: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        out
    }
}

/// Runs tapgraphctl with `config`; returns (exit code, stdout, stderr).
pub fn ctl(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin("tapgraphctl"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run tapgraphctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs tapgraphctl with `-o json` and parses its output; panics on failure.
pub fn ctl_json(config: &Path, args: &[&str]) -> Value {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    let (code, out, err) = ctl(config, &all);
    assert_eq!(code, 0, "tapgraphctl {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("tapgraphctl {args:?}: {e}: {out}"))
}

/// A running controller on loopback with its addresses.
pub struct Controller {
    pub proc: Proc,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

impl Controller {
    /// Starts a controller on loopback ports the kernel picks (port 0), with `env` added, waits
    /// until it is ready and reads the bound addresses from its log: no port can be taken by
    /// another test between choosing and binding it.
    pub fn start(world: &World, env: &[(&str, &str)]) -> Controller {
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        let mut cmd = world.controller_cmd(any, any);
        cmd.envs(env.iter().copied());
        Self::spawn(world, "controller", cmd).ready()
    }

    /// Starts replica `name` on the database `url` (see [`World::replica_cmd`]) on loopback ports
    /// the kernel picks, with `env` added, and waits until it is ready. Its log is NAME.log.
    pub fn start_replica(world: &World, name: &str, url: &str, env: &[(&str, &str)]) -> Controller {
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        let mut cmd = world.replica_cmd(name, url, any, any);
        cmd.envs(env.iter().copied());
        Self::spawn(world, name, cmd).ready()
    }

    /// Starts the controller `cmd` logging to NAME.log in the world; [`Starting::ready`] waits
    /// for it. Several can be started before any is waited for (replicas starting at once).
    pub fn spawn(world: &World, name: &str, cmd: Command) -> Starting {
        let earlier = std::fs::metadata(world.path().join(format!("{name}.log")))
            .map_or(0, |m| m.len() as usize);
        Starting {
            proc: Proc::spawn(name, cmd, world.path()),
            earlier,
        }
    }

    /// Starts a controller on known addresses (a restart), and waits until it is ready.
    pub fn start_at(
        world: &World,
        grpc: SocketAddr,
        http: SocketAddr,
        env: &[(&str, &str)],
    ) -> Controller {
        let mut cmd = world.controller_cmd(grpc, http);
        cmd.envs(env.iter().copied());
        let proc = Proc::spawn("controller", cmd, world.path());
        let c = Controller { proc, grpc, http };
        wait_for("controller /readyz", Duration::from_secs(20), || {
            matches!(http_get(http, "/readyz"), Ok((200, _))).then_some(())
        });
        c
    }

    /// Stops this controller (SIGTERM) and starts a new one on the same addresses and state. The
    /// new process appends to the same log; `log_offset` says where its lines begin.
    pub fn restart(self, world: &World, env: &[(&str, &str)]) -> (Controller, usize) {
        let (grpc, http) = (self.grpc, self.http);
        let offset = self.proc.log_text().len();
        drop(self);
        (Self::start_at(world, grpc, http, env), offset)
    }

    pub fn agents(&self) -> Vec<Value> {
        let (status, body) = http_get(self.http, "/api/v1/agents").expect("GET /api/v1/agents");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("agents JSON")
    }

    pub fn agent(&self, id: &str) -> Option<Value> {
        self.agents().into_iter().find(|a| a["id"] == id)
    }

    /// Waits until agent `id` is in `state` and `check` accepts it; returns its record.
    pub fn wait_agent(
        &self,
        id: &str,
        state: &str,
        timeout: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        wait_for(&format!("agent {id} to be {state}"), timeout, || {
            self.agent(id).filter(|a| a["state"] == state && check(a))
        })
    }
}

/// A controller started but not yet known to be ready.
pub struct Starting {
    pub proc: Proc,
    /// Where this process's lines begin in its log (a restart appends to the same file).
    earlier: usize,
}

impl Starting {
    /// Waits for the "controller ready" line and reads the bound addresses from it.
    pub fn ready(self) -> Controller {
        let Starting { proc, earlier } = self;
        let (grpc, http) = wait_for(
            &format!("{} ready", proc.name),
            Duration::from_secs(20),
            || {
                let log = proc.log_text();
                let line = log
                    .get(earlier..)?
                    .lines()
                    .find(|l| l.contains("controller ready"))?;
                let field = |name: &str| -> Option<SocketAddr> {
                    line.split_whitespace()
                        .find_map(|w| w.strip_prefix(name))?
                        .parse()
                        .ok()
                };
                Some((field("grpc=")?, field("http=")?))
            },
        );
        Controller { proc, grpc, http }
    }
}

static NETNS_SEQ: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace made by this test, deleted on drop (with its /etc/netns files).
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Gives programs run in this namespace their own /etc/hosts (`ip netns exec` bind-mounts
    /// /etc/netns/NAME/hosts over it): name resolution for a test, without touching the machine's.
    pub fn hosts_file(&self, content: &str) {
        let dir = PathBuf::from("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir).expect("/etc/netns/NAME");
        std::fs::write(dir.join("hosts"), content).expect("hosts file");
    }
}

impl Netns {
    pub fn new(role: &str) -> Netns {
        let name = format!(
            "tgt-{}-{}-{role}",
            std::process::id(),
            NETNS_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Wraps `cmd` to run inside the namespace, keeping its arguments and environment.
    pub fn wrap(&self, cmd: Command) -> Command {
        let mut wrapped = self.command(cmd.get_program());
        wrapped.args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => wrapped.env(k, v),
                None => wrapped.env_remove(k),
            };
        }
        wrapped
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it opens live there.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&path).expect("netns handle");
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("netns thread")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&self.name));
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Links two namespaces with a veth pair: `a_if` with `a_cidr` in `a`, `b_if` with `b_cidr` in `b`.
pub fn veth(a: &Netns, a_if: &str, a_cidr: &str, b: &Netns, b_if: &str, b_cidr: &str) {
    ip(&[
        "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
        &b.name,
    ]);
    for (ns, ifname, cidr) in [(a, a_if, a_cidr), (b, b_if, b_cidr)] {
        ip(&["-n", &ns.name, "addr", "add", cidr, "dev", ifname]);
        ip(&["-n", &ns.name, "link", "set", ifname, "up"]);
    }
}

/// Runs `cmd` with `input` on its standard input; its output. `what` names it if it cannot start.
pub fn pipe(cmd: &mut Command, input: &str, what: &str) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// `scripts/check-metrics` on an exposition `body`: Ok(its family names, a line each) or Err(its
/// complaints). A missing tool (exit 2) fails the test rather than passing as a complaint.
pub fn check_metrics(body: &str) -> Result<String, String> {
    let out = pipe(
        Command::new("scripts/check-metrics").current_dir(env!("CARGO_MANIFEST_DIR")),
        body,
        "scripts/check-metrics",
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_ne!(
        out.status.code(),
        Some(2),
        "check-metrics lacks a tool (run scripts/install-deps): {stderr}"
    );
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(stderr)
    }
}

/// A private PostgreSQL server for one test (`scripts/pg-server serve`), on 127.0.0.1 of this
/// namespace or of a test's network namespace. The test holds the pipe to the script's standard
/// input: when the fixture drops, or the test process ends however it ends, the server stops and
/// its directory is removed.
pub struct Postgres {
    /// `postgres://tapgraph@127.0.0.1:PORT/tapgraph?sslmode=disable`
    pub url: String,
    /// "127.0.0.1:PORT/tapgraph", as the controller names the database in its messages.
    pub database: String,
    pub port: u16,
    dir: PathBuf,
    netns: Option<String>,
    serve: Child,
    stdin: Option<std::process::ChildStdin>,
    /// Kept open: the script must not write into a closed pipe while it cleans up.
    _stdout: std::io::BufReader<std::process::ChildStdout>,
}

static PG_SEQ: AtomicU32 = AtomicU32::new(0);

impl Postgres {
    fn script() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/pg-server")
    }

    /// True when PostgreSQL is installed; otherwise says loudly that `test` is skipped, and fails
    /// in CI (`CI` set), which must run it.
    pub fn available(test: &str) -> bool {
        let found = Command::new(Self::script())
            .arg("bin")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            let why = "PostgreSQL is not installed (scripts/install-deps installs it)";
            assert!(
                std::env::var_os("CI").is_none(),
                "{test}: {why}: CI must run it"
            );
            eprintln!("\n*** SKIPPED {test}: {why} ***\n");
        }
        found
    }

    /// A server on loopback; `None` (said loudly) when PostgreSQL is not installed outside CI.
    pub fn start(test: &str) -> Option<Postgres> {
        Self::start_in(test, None)
    }

    /// A server inside network namespace `netns` (on its loopback), or in this one.
    pub fn start_in(test: &str, netns: Option<&Netns>) -> Option<Postgres> {
        use std::io::BufRead;
        if !Self::available(test) {
            return None;
        }
        // Not under the world's directory: the server runs as the user postgres, which must
        // reach its data directory.
        let dir = std::env::temp_dir().join(format!(
            "tapgraph-pg-{}-{}",
            std::process::id(),
            PG_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let mut cmd = Self::command(netns.map(|n| n.name.as_str()));
        cmd.arg("serve")
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut serve = cmd.spawn().expect("scripts/pg-server serve");
        let stdin = serve.stdin.take();
        let mut stdout = std::io::BufReader::new(serve.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("pg-server output");
        let Some(url) = line.trim().strip_prefix("ready ") else {
            let _ = serve.wait();
            panic!("scripts/pg-server serve said {line:?} (its errors are above)");
        };
        let database = url
            .strip_prefix("postgres://tapgraph@")
            .and_then(|rest| rest.split_once('?'))
            .map(|(db, _)| db.to_string())
            .unwrap_or_else(|| panic!("unexpected URL {url}"));
        let port = database
            .split_once('/')
            .and_then(|(hp, _)| hp.rsplit_once(':'))
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {url}"));
        Some(Postgres {
            url: url.to_string(),
            database,
            port,
            dir,
            netns: netns.map(|n| n.name.clone()),
            serve,
            stdin,
            _stdout: stdout,
        })
    }

    /// scripts/pg-server, inside the namespace when there is one.
    fn command(netns: Option<&str>) -> Command {
        match netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(Self::script());
                cmd
            }
            None => Command::new(Self::script()),
        }
    }

    fn run(&self, args: &[&str]) {
        let out = Self::command(self.netns.as_deref())
            .args(args)
            .arg("--dir")
            .arg(&self.dir)
            .output()
            .expect("scripts/pg-server");
        assert!(
            out.status.success(),
            "pg-server {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the server (fast shutdown: sessions are cut), keeping its data.
    pub fn stop(&self) {
        self.run(&["stop"]);
    }

    /// Starts the stopped server again on the same port and data.
    pub fn resume(&self) {
        self.run(&["start", "--port", &self.port.to_string()]);
    }

    /// The URL of database `name` on this server.
    pub fn url_of(&self, name: &str) -> String {
        self.url.replace("/tapgraph?", &format!("/{name}?"))
    }

    /// Runs `sql` with psql in database `db`; its unaligned output, one row a line.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let bin = Command::new(Self::script())
            .arg("bin")
            .output()
            .expect("pg-server bin");
        let psql = PathBuf::from(String::from_utf8_lossy(&bin.stdout).trim()).join("psql");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(psql);
                cmd
            }
            None => Command::new(psql),
        };
        let out = cmd
            .args([
                "-qAt",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &self.url_of(db),
                "-c",
                sql,
            ])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // End of input: the script stops the server and removes its directory, then exits.
        drop(self.stdin.take());
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.serve.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.serve.kill();
        let _ = self.serve.wait();
    }
}
