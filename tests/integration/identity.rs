//! Issue 19, items 5 and 9: an agent id is kept only by a host that proves it holds that id's key
//! (or that an operator approved); two processes sharing one identity are reported once; failed
//! enrollments are limited per source address, so a flood from one does not block another.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tapgraph::proto;

use crate::enrollment::Setup;
use crate::harness::{Proc, bin, ctl, ctl_json, wait_for};

fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The id the controller makes from this host's name (every agent here shares it and its
/// /etc/machine-id, like cloned VMs).
fn host() -> String {
    nix::unistd::gethostname().unwrap().into_string().unwrap()
}

/// The agent id an enrollment printed.
fn enrolled_as(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("Enrolled as agent "))
        .unwrap_or_else(|| panic!("no `Enrolled as agent` in: {out}"))
        .trim()
        .to_string()
}

/// `tapgraphctl -o json events`, subscribed before it is returned.
struct EventWatch {
    proc: Proc,
}

impl EventWatch {
    fn start(s: &Setup) -> EventWatch {
        let mut cmd = Command::new(bin("tapgraphctl"));
        cmd.arg("--config")
            .arg(&s.ctl)
            .args(["-o", "json", "events"]);
        let watch = EventWatch {
            proc: Proc::spawn("events", cmd, s.world.path()),
        };
        // Label rules set by an operator are an event: once one shows, the watcher is subscribed.
        wait_for("the event watcher", Duration::from_secs(20), || {
            let (code, _, err) = ctl(
                &s.ctl,
                &["graph", "rules", "set", "--cidr", "203.0.113.0/24 owner=x"],
            );
            assert_eq!(code, 0, "{err}");
            std::thread::sleep(Duration::from_millis(200));
            watch
                .events()
                .iter()
                .any(|e| e["kind"] == "label_rules")
                .then_some(())
        });
        watch
    }

    fn events(&self) -> Vec<Value> {
        self.proc
            .log_text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn of(&self, kind: &str, agent: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["kind"] == kind && e["agent"] == agent)
            .collect()
    }
}

#[test]
fn two_hosts_enrolling_at_once_with_one_machine_id_get_two_ids_and_stay_connected() {
    let s = Setup::new(&[]);
    let (token, fp, _) = s.token(&["--uses", "2"]);
    // Same hostname, same machine id, both started before either is waited on.
    let children: Vec<_> = ["twin-a", "twin-b"]
        .iter()
        .map(|dir| {
            s.enroll_cmd(dir, &token, &fp)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<String> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", output_text(&out));
            output_text(&out)
        })
        .collect();
    let mut ids: Vec<String> = outputs.iter().map(|o| enrolled_as(o)).collect();
    ids.sort();
    assert_eq!(ids, [host(), format!("{}-2", host())], "{outputs:?}");

    let _a = s.agent("twin-a");
    let _b = s.agent("twin-b");
    for id in &ids {
        s.controller
            .wait_agent(id, "connected", Duration::from_secs(20), |_| true);
    }
    // Both keep their first session while each sends several control records: nobody is
    // knocked off.
    for id in &ids {
        s.controller
            .wait_agent(id, "connected", Duration::from_secs(30), |a| {
                a["control_records"].as_u64() >= Some(3)
            });
    }
    for id in &ids {
        let a = s.controller.agent(id).unwrap();
        assert_eq!(a["sessions"], 1, "{id} flapped: {a}");
        assert_eq!(a["state"], "connected", "{a}");
    }
}

#[test]
fn knowing_an_offline_hosts_hostname_and_machine_id_does_not_give_its_id() {
    let s = Setup::new(&[]);
    let (token, fp, _) = s.token(&["--uses", "2"]);
    let watch = EventWatch::start(&s);
    let (code, out) = s.enroll("victim", &token, &fp);
    assert_eq!(code, 0, "{out}");
    assert_eq!(enrolled_as(&out), host());

    // The victim is offline; another key with its hostname and machine id gets a new id.
    let (code, out) = s.enroll("thief", &token, &fp);
    assert_eq!(code, 0, "{out}");
    let thief = format!("{}-2", host());
    assert_eq!(enrolled_as(&out), thief, "{out}");

    // The event and the log say what happened and why.
    let event = wait_for(
        "the thief's enrollment event",
        Duration::from_secs(10),
        || watch.of("enrolled", &thief).into_iter().next(),
    );
    assert_eq!(event["fields"]["decision"], "new_id_taken", "{event}");
    assert_eq!(event["fields"]["asked"], host().as_str(), "{event}");
    let message = event["message"].as_str().unwrap();
    assert!(
        message.contains("belongs to another host")
            && message.contains(&format!("token create --replaces {}", host())),
        "{message}"
    );
    let first = &watch.of("enrolled", &host())[0];
    assert_eq!(first["fields"]["decision"], "new", "{first}");
    let log = s.controller.proc.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("agent enrolled under a new id") && l.contains("new_id_taken")),
        "{log}"
    );

    // The victim still connects as itself.
    let _victim = s.agent("victim");
    s.controller
        .wait_agent(&host(), "connected", Duration::from_secs(20), |_| true);
}

#[test]
fn an_agent_enrolling_again_with_its_own_key_keeps_its_id() {
    // Renewals every few seconds: the key the agent holds is the renewed one, not the first.
    let s = Setup::new(&[("TAPGRAPH_PKI__AGENT_CERT_LIFETIME", "6s")]);
    let (token, fp, _) = s.token(&["--uses", "2"]);
    let (code, out) = s.enroll("own", &token, &fp);
    assert_eq!(code, 0, "{out}");
    let id = enrolled_as(&out);
    let first_key = std::fs::read_to_string(s.world.agent_dir("own").join("agent.key")).unwrap();
    let agent = s.agent("own");
    s.controller
        .wait_agent(&id, "connected", Duration::from_secs(20), |_| true);
    wait_for("a renewal", Duration::from_secs(30), || {
        agent
            .log_text()
            .contains("certificate renewed")
            .then_some(())
    });
    let key_path = s.world.agent_dir("own").join("agent.key");
    let renewed_key = std::fs::read_to_string(&key_path).unwrap();
    assert_ne!(renewed_key, first_key, "a renewal makes a new key");

    // Enrolling again while it is connected (same host, same state directory): the CSR is signed
    // by the key of its certificate, so the id stays.
    let (code, out) = s.enroll("own", &token, &fp);
    assert_eq!(code, 0, "{out}");
    assert_eq!(enrolled_as(&out), id, "{out}");
    let log = s.controller.proc.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("kept_key") && l.contains("proved it holds the key")),
        "{log}"
    );
    assert_eq!(s.agents().len(), 1, "{:?}", s.agents());
}

#[test]
fn an_operator_token_lets_a_reinstalled_host_take_its_id_back() {
    let s = Setup::new(&[]);
    let id = host();
    let (plain, fp, _) = s.token(&["--uses", "5"]);
    let (code, out) = s.enroll("old", &plain, &fp);
    assert_eq!(code, 0, "{out}");
    assert_eq!(enrolled_as(&out), id);
    // What the replaced host still holds after the replacement: its certificate and key.
    copy_dir(&s.world.agent_dir("old"), &s.world.agent_dir("stale"));

    // Bad requests are refused naming what is wrong.
    let (code, _, err) = ctl(
        &s.ctl,
        &["token", "create", "--replaces", &id, "--uses", "2"],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("exactly one use"), "{err}");
    let (code, _, err) = ctl(&s.ctl, &["token", "create", "--replaces", "nosuch"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no agent or token named nosuch"), "{err}");

    // The host was reinstalled: new key, same name. The operator's token gives it its id.
    let (replacing, _, replacing_id) = s.token(&["--replaces", &id]);
    let listed = ctl_json(&s.ctl, &["token", "list"]);
    let listed = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == replacing_id.as_str())
        .unwrap();
    assert_eq!(listed["replaces"], id.as_str(), "{listed}");
    let (code, out) = s.enroll("reinstalled", &replacing, &fp);
    assert_eq!(code, 0, "{out}");
    assert_eq!(enrolled_as(&out), id, "{out}");
    assert!(
        s.controller
            .proc
            .log_text()
            .contains(&format!("was created to replace agent {id}")),
    );

    // The replaced host's certificate, still valid, no longer acts as the id: its streams (and
    // renewals) are refused, so the two hosts cannot knock each other off.
    {
        let _stale = s.agent("stale");
        wait_for(
            "the replaced certificate's stream refused",
            Duration::from_secs(30),
            || {
                s.controller
                    .proc
                    .log_text()
                    .contains(&format!("no longer holds agent id {id}"))
                    .then_some(())
            },
        );
        assert!(
            s.agents()
                .iter()
                .all(|a| a["id"] != id.as_str() || a["state"] != "connected"),
            "the replaced certificate must not connect"
        );
    }

    // The replaced key no longer claims the id.
    let (code, out) = s.enroll("old", &plain, &fp);
    assert_eq!(code, 0, "{out}");
    assert_eq!(enrolled_as(&out), format!("{id}-2"), "{out}");

    // A replacing token cannot take over an id that is connected now; its use is kept.
    let _agent = s.agent("reinstalled");
    s.controller
        .wait_agent(&id, "connected", Duration::from_secs(20), |_| true);
    let (again, _, again_id) = s.token(&["--replaces", &id]);
    let (code, out) = s.enroll("third", &again, &fp);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("which is connected now"), "{out}");
    let tokens = ctl_json(&s.ctl, &["token", "list"]);
    let left = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == again_id.as_str())
        .unwrap()["uses_left"]
        .clone();
    assert_eq!(left, 1);
}

fn copy_dir(from: &Path, to: &Path) {
    tapgraph::fsutil::private_dir(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            let target = to.join(entry.file_name());
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn two_processes_sharing_one_identity_are_reported_once_not_as_a_flap_loop() {
    let s = Setup::new(&[]);
    let (token, fp, _) = s.token(&[]);
    let (code, out) = s.enroll("one", &token, &fp);
    assert_eq!(code, 0, "{out}");
    let id = enrolled_as(&out);
    // A copied state directory: two processes with one certificate and key.
    copy_dir(&s.world.agent_dir("one"), &s.world.agent_dir("two"));
    let watch = EventWatch::start(&s);
    let _one = s.agent("one");
    let _two = s.agent("two");

    let shared = wait_for(
        "the shared identity to be reported",
        Duration::from_secs(60),
        || watch.of("identity_shared", &id).into_iter().next(),
    );
    let message = shared["message"].as_str().unwrap();
    assert!(
        message.contains("two processes share this identity")
            && message.contains("session replaced"),
        "{message}"
    );
    // They keep knocking each other off; that is not reported again, nor as connects.
    let sessions = |a: &Value| a["sessions"].as_u64().unwrap_or(0);
    let at_report = sessions(&s.controller.agent(&id).unwrap());
    wait_for("ten more replacements", Duration::from_secs(120), || {
        (sessions(&s.controller.agent(&id)?) >= at_report + 10).then_some(())
    });
    let later = sessions(&s.controller.agent(&id).unwrap());
    let connects = watch.of("connected", &id).len();
    assert_eq!(watch.of("identity_shared", &id).len(), 1, "reported once");
    assert!(
        connects < 5,
        "{connects} connect events for {later} sessions: a flap loop"
    );
    assert!(
        watch.of("disconnected", &id).len() < 5,
        "{:?}",
        watch.of("disconnected", &id)
    );
}

/// A channel to `server` whose TCP connection comes from `local` (a second loopback address is
/// a second source), trusting the controller CA pinned by `fp`.
async fn channel_from(local: IpAddr, server: SocketAddr, fp: &str) -> tonic::transport::Channel {
    let tls = tapgraph::tls::pinned_client_config(fp).unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls);
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1".to_string()).unwrap();
    tonic::transport::Endpoint::from_shared(format!("http://{server}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let connector = connector.clone();
            let name = name.clone();
            async move {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(SocketAddr::new(local, 0))?;
                let tcp = socket.connect(server).await?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_flood_from_one_source_does_not_block_enrollment_from_another() {
    // A shared bucket that a flood would empty: 30 attempts, then one per 20 s.
    let s = Setup::new(&[
        ("TAPGRAPH_ENROLLMENT__RATE", "0.05"),
        ("TAPGRAPH_ENROLLMENT__BURST", "30"),
    ]);
    let (token, fp, _) = s.token(&[]);
    let (_, csr) = tapgraph::pki::new_key_and_csr("flood").unwrap();

    // 200 bad tokens at once from 127.0.0.2.
    let flooder = IpAddr::from([127, 0, 0, 2]);
    let channel = channel_from(flooder, s.controller.grpc, &fp).await;
    let attempts = (0..200).map(|n| {
        let mut client =
            proto::enrollment_service_client::EnrollmentServiceClient::new(channel.clone());
        let csr = csr.clone();
        async move {
            client
                .enroll(proto::EnrollRequest {
                    token: format!("tgj.{n:016x}.0123456789abcdef0123456789abcdef"),
                    csr_pem: csr,
                    hostname: "flood".into(),
                    machine_id: String::new(),
                    requested_id: String::new(),
                })
                .await
                .expect_err("a bad token is refused")
        }
    });
    let refusals = futures::future::join_all(attempts).await;
    let per_source = refusals
        .iter()
        .filter(|st| {
            st.code() == tonic::Code::ResourceExhausted
                && st
                    .message()
                    .contains("too many failed enrollments from 127.0.0.2")
        })
        .count();
    let checked = refusals
        .iter()
        .filter(|st| st.message().contains("unknown join token"))
        .count();
    eprintln!("flood of 200: {checked} reached the token check, {per_source} refused per source");
    assert!(per_source > 0, "{:?}", &refusals[..3]);
    // Each refusal is counted on /metrics by the limit that made it.
    let (_, metrics) = crate::harness::http_get(s.controller.http, "/metrics").unwrap();
    assert!(
        metrics.contains(&format!(
            "tapgraph_enrollments_refused_total{{reason=\"per_source\"}} {per_source}"
        )),
        "{metrics}"
    );
    // The flood took from the shared bucket only the few attempts its source was allowed.
    assert!(checked < 30, "{checked} bad tokens were checked");

    // A real agent from 127.0.0.1 enrolls at once (one attempt).
    let (code, out) = s.enroll("good", &token, &fp);
    assert_eq!(code, 0, "{out}");
    assert_eq!(enrolled_as(&out), host());

    // Successes do not count against their source: 15 hosts behind one address (a NAT) enrolling
    // at once, more than a source's failure allowance, all get in.
    let (fleet_token, _, _) = s.token(&["--uses", "15"]);
    let nat = channel_from(IpAddr::from([127, 0, 0, 3]), s.controller.grpc, &fp).await;
    let fleet = (0..15).map(|_| {
        let mut client =
            proto::enrollment_service_client::EnrollmentServiceClient::new(nat.clone());
        let (_, csr_pem) = tapgraph::pki::new_key_and_csr("fleet").unwrap();
        let token = fleet_token.clone();
        async move {
            client
                .enroll(proto::EnrollRequest {
                    token,
                    csr_pem,
                    hostname: "fleet".into(),
                    machine_id: String::new(),
                    requested_id: String::new(),
                })
                .await
                .map(|r| r.into_inner().agent_id)
        }
    });
    let mut ids: Vec<String> = futures::future::join_all(fleet)
        .await
        .into_iter()
        .map(|r| r.unwrap_or_else(|st| panic!("a fleet enrollment was refused: {st:?}")))
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 15, "{ids:?}");
    assert!(
        s.controller
            .proc
            .log_text()
            .contains("enrollment source used up its failed attempts"),
    );
}
