//! Issue 3: enrollment with join tokens, renewal, revocation, operator identities, and every bad
//! input refused with a clear error and nothing changed.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tapgraph::proto::{self, admin_service_client::AdminServiceClient};
use tapgraph::transport::{self, ChannelOptions};

use crate::harness::{Controller, Proc, World, bin, ctl, ctl_json, refused_config, wait_for};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A controller and an operator config (also the identity tests').
pub(crate) struct Setup {
    pub(crate) world: World,
    pub(crate) controller: Controller,
    pub(crate) ctl: PathBuf,
}

impl Setup {
    pub(crate) fn new(env: &[(&str, &str)]) -> Setup {
        let world = World::new();
        let controller = Controller::start(&world, env);
        let ctl = world.operator("admin", controller.grpc);
        Setup {
            world,
            controller,
            ctl,
        }
    }

    /// Creates a token; returns (token, fingerprint, id).
    pub(crate) fn token(&self, args: &[&str]) -> (String, String, String) {
        let mut all = vec!["token", "create"];
        all.extend_from_slice(args);
        let v = ctl_json(&self.ctl, &all);
        (
            v["token"].as_str().unwrap().to_string(),
            v["ca_fingerprint"].as_str().unwrap().to_string(),
            v["id"].as_str().unwrap().to_string(),
        )
    }

    /// `tapgraph-agent enroll` into agent dir `name`; returns (exit code, stdout + stderr).
    pub(crate) fn enroll(&self, name: &str, token: &str, fingerprint: &str) -> (i32, String) {
        let out = self.enroll_cmd(name, token, fingerprint).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    pub(crate) fn enroll_cmd(&self, name: &str, token: &str, fingerprint: &str) -> Command {
        let mut cmd = self.world.agent_cmd(name, self.controller.grpc);
        cmd.args(["enroll", "--token", token, "--ca-fingerprint", fingerprint]);
        cmd
    }

    pub(crate) fn agents(&self) -> Vec<Value> {
        ctl_json(&self.ctl, &["agent", "list"])
            .as_array()
            .unwrap()
            .clone()
    }

    pub(crate) fn token_uses_left(&self, id: &str) -> u64 {
        let tokens = ctl_json(&self.ctl, &["token", "list"]);
        tokens
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == id)
            .unwrap()["uses_left"]
            .as_u64()
            .unwrap()
    }

    /// `tapgraph-agent run` from agent dir `dir`.
    pub(crate) fn agent(&self, dir: &str) -> crate::harness::Proc {
        crate::harness::Proc::spawn(
            &format!("agent-{dir}"),
            self.world.agent_cmd(dir, self.controller.grpc),
            self.world.path(),
        )
    }
}

fn hostname() -> String {
    nix::unistd::gethostname().unwrap().into_string().unwrap()
}

#[test]
fn an_agent_enrolls_with_a_token_and_connects_with_its_certificate() {
    let s = Setup::new(&[("TAPGRAPH_REPLICA", "replica-a")]);
    let pki = s.world.state_dir().join("pki");
    for f in ["ca.pem", "ca.key", "server.pem", "server.key"] {
        assert_eq!(mode(&pki.join(f)), 0o600, "{f}");
    }
    let ca_before = std::fs::read(pki.join("ca.pem")).unwrap();
    let (token, fp, token_id) = s.token(&["--ttl", "1h", "--uses", "2", "--label", "role=web"]);
    assert_eq!(
        fp,
        tapgraph::tls::fingerprint(&tapgraph::tls::load_certs(&pki.join("ca.pem")).unwrap()[0])
    );

    let (code, out) = s.enroll("host1", &token, &fp);
    assert_eq!(code, 0, "{out}");
    let id = hostname();
    assert!(out.contains(&format!("Enrolled as agent {id}")), "{out}");
    let dir = s.world.agent_dir("host1");
    assert_eq!(mode(&dir), 0o700);
    for f in ["agent.key", "agent.pem", "ca.pem"] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    assert_eq!(s.token_uses_left(&token_id), 1);

    let _agent = Proc::spawn(
        "agent",
        s.world.agent_cmd("host1", s.controller.grpc),
        s.world.path(),
    );
    let agent = wait_for(
        "the enrolled agent connected",
        Duration::from_secs(20),
        || {
            s.agents()
                .into_iter()
                .find(|a| a["id"] == id.as_str() && a["state"] == "connected")
        },
    );
    assert_eq!(agent["labels"]["role"], "web");
    assert_ne!(agent["cert_not_after"], "-");
    assert_eq!(agent["controller"], "replica-a");

    // The CA is reused across a restart, and the agent comes back with the same identity, shown on
    // the replica it is connected to now.
    let Setup {
        world,
        controller,
        ctl: ctl_path,
    } = s;
    let (controller, _) = controller.restart(&world, &[("TAPGRAPH_REPLICA", "replica-b")]);
    assert_eq!(std::fs::read(pki.join("ca.pem")).unwrap(), ca_before);
    controller.wait_agent(&id, "connected", Duration::from_secs(15), |a| {
        a["controller"] == "replica-b"
    });
    let (code, table, _) = ctl(&ctl_path, &["agent", "list"]);
    assert_eq!(code, 0);
    assert!(
        table.starts_with("ID ") && table.contains("role=web"),
        "{table}"
    );
    let columns =
        |line: &str| -> Vec<String> { line.split_whitespace().take(4).map(String::from).collect() };
    let mut lines = table.lines();
    assert_eq!(
        columns(lines.next().unwrap_or_default()),
        ["ID", "HOSTNAME", "STATE", "CONTROLLER"],
        "{table}"
    );
    let row = lines
        .map(columns)
        .find(|row| row[0] == id)
        .unwrap_or_else(|| panic!("no row for {id}: {table}"));
    assert_eq!(row[2..], ["connected", "replica-b"], "{table}");
    let (status, metrics) = crate::harness::http_get(controller.http, "/metrics").unwrap();
    assert_eq!(status, 200, "{metrics}");
    let info = format!(
        "tapgraph_controller_info{{replica=\"replica-b\",version=\"{}\"}} 1",
        tapgraph::VERSION
    );
    assert!(metrics.lines().any(|l| l == info), "{info} in {metrics}");
}

#[test]
fn the_daemon_enrolls_by_itself_when_a_token_is_configured() {
    let s = Setup::new(&[]);
    let (token, fp, _) = s.token(&["--uses", "1"]);
    let mut cmd = s.world.agent_cmd("auto", s.controller.grpc);
    cmd.env("TAPGRAPH_ENROLL__TOKEN", &token)
        .env("TAPGRAPH_ENROLL__CA_FINGERPRINT", &fp);
    let agent = Proc::spawn("agent", cmd, s.world.path());
    s.controller
        .wait_agent(&hostname(), "connected", Duration::from_secs(20), |_| true);
    assert!(
        agent
            .log_text()
            .contains("enrolling with the configured join token")
    );
}

#[test]
fn bad_tokens_are_refused_and_nothing_is_written() {
    let s = Setup::new(&[]);
    let (_, fp, _) = s.token(&["--uses", "1"]);
    let refused = |name: &str, token: &str, expect: &str| {
        let (code, out) = s.enroll(name, token, &fp);
        assert_eq!(code, 1, "{name}: {out}");
        assert!(
            out.contains(expect),
            "{name}: expected `{expect}` in: {out}"
        );
        assert!(
            !s.world.agent_dir(name).join("agent.pem").exists(),
            "{name} wrote a certificate"
        );
        assert!(
            !s.world.agent_dir(name).join("agent.key").exists(),
            "{name} wrote a key"
        );
    };

    refused("malformed", "hello", "malformed join token");
    refused(
        "unknown",
        "tgj.0123456789abcdef.0123456789abcdef0123456789abcdef",
        "unknown join token 0123456789abcdef",
    );

    let (expiring, _, expiring_id) = s.token(&["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(1200));
    refused(
        "expired",
        &expiring,
        &format!("join token {expiring_id} expired at"),
    );

    let (once, _, once_id) = s.token(&["--uses", "1"]);
    assert_eq!(s.enroll("first", &once, &fp).0, 0);
    refused(
        "replayed",
        &once,
        &format!("join token {once_id} has no uses left"),
    );

    let (revoked, _, revoked_id) = s.token(&["--uses", "5"]);
    let (code, out, err) = ctl(&s.ctl, &["token", "revoke", &revoked_id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("revoked"), "{out}");
    refused(
        "revoked",
        &revoked,
        &format!("join token {revoked_id} was revoked"),
    );
    assert_eq!(
        s.token_uses_left(&revoked_id),
        5,
        "a refused enrollment uses nothing"
    );

    // Token creation itself refuses bad values with the reason.
    let (code, _, err) = ctl(&s.ctl, &["token", "create", "--ttl", "1 fortnight"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = ctl(&s.ctl, &["token", "create", "--uses", "0"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("InvalidArgument: uses 0 is out of range"),
        "{err}"
    );
    let (code, _, err) = ctl(&s.ctl, &["token", "create", "--label", "no value"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn a_wrong_ca_fingerprint_stops_enrollment_before_anything_is_sent() {
    let s = Setup::new(&[]);
    let (token, fp, id) = s.token(&["--uses", "1"]);
    let wrong: String = fp.chars().rev().collect();
    let (code, out) = s.enroll("pinned", &token, &wrong);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("controller CA fingerprint mismatch"), "{out}");
    assert!(!s.world.agent_dir("pinned").join("agent.key").exists());
    assert!(!s.controller.proc.log_text().contains("enrollment request"));
    assert_eq!(s.token_uses_left(&id), 1);
    let (code, out) = s.enroll("pinned", &token, "not-a-fingerprint");
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("enroll.ca_fingerprint"), "{out}");
}

async fn enroll_raw(addr: SocketAddr, fp: &str, token: &str, csr_pem: String) -> tonic::Status {
    let tls = tapgraph::tls::pinned_client_config(fp).unwrap();
    let channel = transport::connect(
        &addr.to_string(),
        "127.0.0.1",
        tls,
        &ChannelOptions::default(),
    )
    .await
    .unwrap();
    proto::enrollment_service_client::EnrollmentServiceClient::new(channel)
        .enroll(proto::EnrollRequest {
            token: token.into(),
            csr_pem,
            hostname: "raw".into(),
            machine_id: String::new(),
            requested_id: String::new(),
        })
        .await
        .expect_err("must be refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_unsupported_csrs_are_refused() {
    let s = Setup::new(&[]);
    let (token, fp, id) = s.token(&["--uses", "1"]);
    let status = enroll_raw(s.controller.grpc, &fp, &token, "garbage".into()).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with("malformed CSR"),
        "{}",
        status.message()
    );

    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("openssl")
        .args([
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=rsa", "-keyout",
        ])
        .arg(dir.path().join("k"))
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rsa = String::from_utf8(out.stdout).unwrap();
    let status = enroll_raw(s.controller.grpc, &fp, &token, rsa).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with("unsupported key type in CSR"),
        "{}",
        status.message()
    );
    assert_eq!(s.token_uses_left(&id), 1, "refused CSRs use nothing");
}

#[test]
fn enrollments_racing_for_the_last_use_have_exactly_one_winner() {
    let s = Setup::new(&[]);
    let (token, fp, id) = s.token(&["--uses", "1"]);
    let names = ["racer1", "racer2", "racer3", "racer4"];
    // Every process is started before any is waited on, so their requests overlap.
    let children: Vec<_> = names
        .iter()
        .map(|n| {
            s.enroll_cmd(n, &token, &fp)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let winners = outputs.iter().filter(|o| o.status.success()).count();
    assert_eq!(winners, 1, "{outputs:?}");
    for o in outputs.iter().filter(|o| !o.status.success()) {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("has no uses left"), "{err}");
    }
    let written = names
        .iter()
        .filter(|n| s.world.agent_dir(n).join("agent.pem").exists())
        .count();
    assert_eq!(written, 1);
    assert_eq!(s.token_uses_left(&id), 0);
}

#[test]
fn unusable_credential_files_are_refused_naming_the_key() {
    let s = Setup::new(&[]);
    let dir = s.world.issue_agent("files");
    std::fs::set_permissions(
        dir.join("agent.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let err = refused_config(&mut s.world.agent_cmd("files", s.controller.grpc));
    assert!(
        err.contains("tls.key:") && err.contains("chmod 600"),
        "{err}"
    );

    std::fs::set_permissions(
        dir.join("agent.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(
        dir.join("agent.pem"),
        "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let err = refused_config(&mut s.world.agent_cmd("files", s.controller.grpc));
    assert!(err.contains("tls.cert:"), "{err}");

    // The controller refuses an operator CA whose key others can read.
    let other = World::new();
    let ca =
        tapgraph::pki::CertAuthority::generate("operator CA", Duration::from_secs(3600)).unwrap();
    std::fs::write(other.path().join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(other.path().join("ca.key"), ca.key_pem()).unwrap();
    std::fs::set_permissions(
        other.path().join("ca.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let mut cmd = other.controller_cmd(
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
    );
    cmd.env("TAPGRAPH_PKI__CA_CERT", other.path().join("ca.pem"))
        .env("TAPGRAPH_PKI__CA_KEY", other.path().join("ca.key"));
    let err = refused_config(&mut cmd);
    assert!(err.contains("chmod 600"), "{err}");
}

#[test]
fn an_operator_supplied_ca_signs_instead_of_a_generated_one() {
    let world = World::new();
    let ca =
        tapgraph::pki::CertAuthority::generate("operator CA", Duration::from_secs(3600)).unwrap();
    tapgraph::fsutil::write_private(&world.path().join("op-ca.pem"), ca.cert_pem().as_bytes())
        .unwrap();
    tapgraph::fsutil::write_private(&world.path().join("op-ca.key"), ca.key_pem().as_bytes())
        .unwrap();
    let ca_cert = world.path().join("op-ca.pem");
    let ca_key = world.path().join("op-ca.key");
    let env = [
        ("TAPGRAPH_PKI__CA_CERT", ca_cert.to_str().unwrap()),
        ("TAPGRAPH_PKI__CA_KEY", ca_key.to_str().unwrap()),
    ];
    let controller = Controller::start(&world, &env);
    let out = world.path().join("ctl.toml");
    let issued = Command::new(bin("tapgraph-controller"))
        .args(["operator", "issue", "admin", "--state-dir"])
        .arg(world.state_dir())
        .arg("--listen")
        .arg(controller.grpc.to_string())
        .arg("--out")
        .arg(&out)
        .envs(env)
        .output()
        .unwrap();
    assert!(
        issued.status.success(),
        "{}",
        String::from_utf8_lossy(&issued.stderr)
    );
    let v = ctl_json(&out, &["token", "create"]);
    assert_eq!(v["ca_fingerprint"], ca.fingerprint());
    assert!(!world.state_dir().join("pki").join("ca.key").exists());
}

#[test]
fn renewal_replaces_the_certificate_without_dropping_the_stream() {
    let s = Setup::new(&[("TAPGRAPH_PKI__AGENT_CERT_LIFETIME", "6s")]);
    let (token, fp, _) = s.token(&[]);
    assert_eq!(s.enroll("short", &token, &fp).0, 0);
    let cert = s.world.agent_dir("short").join("agent.pem");
    let first = std::fs::read_to_string(&cert).unwrap();
    let mut agent = Proc::spawn(
        "agent",
        s.world.agent_cmd("short", s.controller.grpc),
        s.world.path(),
    );
    let id = hostname();
    s.controller
        .wait_agent(&id, "connected", Duration::from_secs(20), |_| true);
    // Due at 70% of 6 s: two renewals within about 9 s.
    wait_for("two renewals", Duration::from_secs(30), || {
        (agent.log_text().matches("certificate renewed").count() >= 2).then_some(())
    });
    let view = s.controller.agent(&id).unwrap();
    assert_eq!(view["state"], "connected");
    assert_eq!(view["sessions"], 1, "the stream survived renewal: {view}");
    assert_ne!(std::fs::read_to_string(&cert).unwrap(), first);
    assert_eq!(mode(&cert), 0o600);

    // The first certificate has expired by now (6 s); a restarted agent connects with the renewed
    // pair it installed.
    agent.kill_hard();
    let _agent = Proc::spawn(
        "agent2",
        s.world.agent_cmd("short", s.controller.grpc),
        s.world.path(),
    );
    s.controller
        .wait_agent(&id, "connected", Duration::from_secs(20), |a| {
            a["sessions"] == 2
        });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_drops_live_streams_within_a_second_and_survives_restarts() {
    let s = Setup::new(&[]);
    let (token, fp, _) = s.token(&[]);
    assert_eq!(s.enroll("doomed", &token, &fp).0, 0);
    let agent = Proc::spawn(
        "agent",
        s.world.agent_cmd("doomed", s.controller.grpc),
        s.world.path(),
    );
    let id = hostname();
    s.controller
        .wait_agent(&id, "connected", Duration::from_secs(20), |_| true);

    // A Mirror stream with the same certificate must close too.
    let dir = s.world.agent_dir("doomed");
    let tls = tapgraph::tls::client_config_files(
        &dir.join("ca.pem"),
        Some((&dir.join("agent.pem"), &dir.join("agent.key"))),
    )
    .unwrap();
    let channel = transport::connect(
        &s.controller.grpc.to_string(),
        "127.0.0.1",
        tls,
        &ChannelOptions::default(),
    )
    .await
    .unwrap();
    let (batches, rx) = tokio::sync::mpsc::channel::<proto::MirrorBatch>(1);
    let mirror = tokio::spawn(async move {
        proto::agent_service_client::AgentServiceClient::new(channel)
            .mirror(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    batches.send(proto::MirrorBatch::default()).await.unwrap();

    let started = Instant::now();
    let (code, _, err) = ctl(&s.ctl, &["agent", "revoke", &id]);
    assert_eq!(code, 0, "{err}");
    wait_for("the agent's stream to drop", Duration::from_secs(5), || {
        (s.controller.agent(&id).unwrap()["state"] == "lost").then_some(())
    });
    let elapsed = started.elapsed();
    eprintln!("revocation: ctl command to stream drop took {elapsed:?}");
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    let status = tokio::time::timeout(Duration::from_secs(2), mirror)
        .await
        .expect("mirror stream closed")
        .unwrap()
        .expect_err("mirror stream refused");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    wait_for(
        "the agent to see the refusal",
        Duration::from_secs(5),
        || agent.log_text().contains("was revoked").then_some(()),
    );
    let listed = s
        .agents()
        .into_iter()
        .find(|a| a["id"] == id.as_str())
        .unwrap();
    assert_eq!(listed["state"], "revoked");

    // After a controller restart the certificate is still refused.
    let Setup {
        world,
        controller,
        ctl: _,
    } = s;
    // The restarted controller appends to the same log: read only what it wrote.
    let (controller, earlier) = controller.restart(&world, &[]);
    wait_for("a refused reconnect", Duration::from_secs(15), || {
        let log = controller.proc.log_text();
        log[earlier..]
            .lines()
            .any(|l| l.contains("agent stream refused") && l.contains("was revoked"))
            .then_some(())
    });
    assert!(controller.agent(&id).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_takes_operator_certificates_only() {
    let s = Setup::new(&[]);
    let call = |identity: Option<PathBuf>| {
        let ca = s.world.ca_pem();
        let addr = s.controller.grpc;
        async move {
            let tls = match &identity {
                Some(dir) => tapgraph::tls::client_config_files(
                    &ca,
                    Some((&dir.join("agent.pem"), &dir.join("agent.key"))),
                ),
                None => tapgraph::tls::client_config_files(&ca, None),
            }
            .unwrap();
            let channel = transport::connect(
                &addr.to_string(),
                "127.0.0.1",
                tls,
                &ChannelOptions::default(),
            )
            .await
            .unwrap();
            AdminServiceClient::new(channel)
                .list_agents(proto::ListAgentsRequest::default())
                .await
                .expect_err("refused")
        }
    };
    let status = call(Some(s.world.issue_agent("sneaky"))).await;
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        status.message(),
        "agent sneaky may not use the admin API: an operator certificate is required"
    );
    let status = call(None).await;
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
}

#[test]
fn an_agent_offline_past_expiry_must_enroll_again() {
    let s = Setup::new(&[("TAPGRAPH_PKI__AGENT_CERT_LIFETIME", "5s")]);
    let (token, fp, _) = s.token(&[]);
    assert_eq!(s.enroll("sleeper", &token, &fp).0, 0);
    let cert = s.world.agent_dir("sleeper").join("agent.pem");
    let info = tapgraph::pki::cert_info(&std::fs::read_to_string(&cert).unwrap()).unwrap();
    wait_for("the certificate to expire", Duration::from_secs(15), || {
        (std::time::SystemTime::now() > info.not_after).then_some(())
    });

    // Without a token the agent refuses to start, and says why and what to do.
    let err = refused_config(&mut s.world.agent_cmd("sleeper", s.controller.grpc));
    assert!(
        err.contains("certificate expired at") && err.contains("enroll"),
        "{err}"
    );

    // With a token configured it enrolls again, keeping its id (same machine).
    let (again, fp, _) = s.token(&[]);
    let mut cmd = s.world.agent_cmd("sleeper", s.controller.grpc);
    cmd.env("TAPGRAPH_ENROLL__TOKEN", &again)
        .env("TAPGRAPH_ENROLL__CA_FINGERPRINT", &fp);
    let agent = Proc::spawn("agent", cmd, s.world.path());
    s.controller
        .wait_agent(&hostname(), "connected", Duration::from_secs(20), |_| true);
    assert!(agent.log_text().contains("certificate expired at"));
    assert_eq!(s.agents().len(), 1, "re-enrollment kept the id");
}

#[test]
fn a_live_clone_with_the_same_machine_id_gets_its_own_id_and_names_can_be_asked_for() {
    let s = Setup::new(&[]);
    let (token, fp, _) = s.token(&["--uses", "3"]);
    assert_eq!(s.enroll("first", &token, &fp).0, 0);
    let host = hostname();
    let _first = Proc::spawn(
        "first",
        s.world.agent_cmd("first", s.controller.grpc),
        s.world.path(),
    );
    s.controller
        .wait_agent(&host, "connected", Duration::from_secs(20), |_| true);
    // Same /etc/machine-id (this host), but the id is live: a clone must not take it over.
    let (code, out) = s.enroll("clone", &token, &fp);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("Enrolled as agent {host}-2")),
        "{out}"
    );
    let mut named = s.enroll_cmd("named", &token, &fp);
    named.args(["--name", "web-1"]);
    let out = named.output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Enrolled as agent web-1"),
        "{out:?}"
    );
}
