//! Issue 4: policies with selectors set live from tapgraphctl, rollout status, events, and the
//! ctl's own behaviour (help, exit codes, config overrides).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{
    Controller, Netns, Proc, World, bin, ctl, ctl_json, require_root, veth, wait_for,
};

/// A controller, an operator, and enrolled agents with the given names and labels.
struct Fleet {
    world: World,
    controller: Controller,
    ctl: PathBuf,
    agents: Vec<Proc>,
}

const FAST: &[(&str, &str)] = &[("TAPGRAPH_POLICY__HEARTBEAT_INTERVAL", "1s")];

impl Fleet {
    fn new(agents: &[(&str, &str)]) -> Fleet {
        let world = World::new();
        let controller = Controller::start(&world, FAST);
        let ctl = world.operator("admin", controller.grpc);
        let mut fleet = Fleet {
            world,
            controller,
            ctl,
            agents: Vec::new(),
        };
        for (name, labels) in agents {
            fleet.enroll(name, labels);
            let cmd = fleet.world.agent_cmd(name, fleet.controller.grpc);
            fleet
                .agents
                .push(Proc::spawn(name, cmd, fleet.world.path()));
        }
        for (name, _) in agents {
            fleet
                .controller
                .wait_agent(name, "connected", Duration::from_secs(20), |_| true);
        }
        fleet
    }

    /// Enrolls agent `name` with a token carrying `labels` (comma-separated k=v).
    fn enroll(&self, name: &str, labels: &str) {
        let mut args = vec!["token", "create"];
        for l in labels.split(',').filter(|l| !l.is_empty()) {
            args.extend(["--label", l]);
        }
        let t = ctl_json(&self.ctl, &args);
        let out = self
            .world
            .agent_cmd(name, self.controller.grpc)
            .args(["enroll", "--name", name, "--token"])
            .arg(t["token"].as_str().unwrap())
            .arg("--ca-fingerprint")
            .arg(t["ca_fingerprint"].as_str().unwrap())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        ctl(&self.ctl, args)
    }

    /// `policy status -o json` as agent → (policy, wanted, applied, state, error).
    fn status(&self) -> Vec<Value> {
        ctl_json(&self.ctl, &["policy", "status"])
            .as_array()
            .unwrap()
            .clone()
    }

    fn policy_of(&self, agent: &str) -> (String, u64, String) {
        let s = self
            .status()
            .into_iter()
            .find(|s| s["agent"] == agent)
            .unwrap_or_else(|| panic!("no status for {agent}"));
        (
            s["policy"].as_str().unwrap().to_string(),
            s["version_applied"].as_u64().unwrap(),
            s["state"].as_str().unwrap().to_string(),
        )
    }

    fn set(&self, args: &[&str]) -> u64 {
        let mut all = vec!["policy", "set"];
        all.extend_from_slice(args);
        let v = ctl_json(&self.ctl, &all);
        v["version"].as_u64().unwrap()
    }

    fn wait_rollout(&self) {
        let (code, out, err) = self.ctl(&["policy", "status", "--wait", "--timeout", "20s"]);
        assert_eq!(code, 0, "{out}{err}");
    }
}

#[test]
fn the_most_specific_policy_wins_and_changes_apply_live() {
    let f = Fleet::new(&[
        ("web1", "role=web"),
        ("web2", "role=web,env=prod"),
        ("db1", "role=db"),
        ("misc", ""),
    ]);
    // Until operators set policies, everyone runs the configured default.
    f.wait_rollout();
    assert_eq!(f.policy_of("misc").0, "default");

    let fleet_v = f.set(&["fleet", "--all", "--heartbeat-interval", "2s"]);
    let web_v = f.set(&[
        "web",
        "--selector",
        "role=web",
        "--filter",
        "tcp port 80",
        "--limit",
        "2Mbit",
    ]);
    let prod_v = f.set(&[
        "web-prod",
        "--selector",
        "role=web,env=prod",
        "--limit",
        "1Mbit",
    ]);
    let pin_v = f.set(&["db1-only", "--agent", "db1", "--filter", "tcp port 5432"]);
    f.wait_rollout();
    assert_eq!(
        f.policy_of("misc"),
        ("fleet".into(), fleet_v, "applied".into())
    );
    assert_eq!(f.policy_of("web1"), ("web".into(), web_v, "applied".into()));
    assert_eq!(
        f.policy_of("web2"),
        ("web-prod".into(), prod_v, "applied".into())
    );
    assert_eq!(
        f.policy_of("db1"),
        ("db1-only".into(), pin_v, "applied".into())
    );

    // A live change of filter and limit reaches web1 only, without a restart.
    let web_v2 = f.set(&["web", "--filter", "tcp port 8080", "--limit", "5Mbit"]);
    f.wait_rollout();
    assert_eq!(
        f.policy_of("web1"),
        ("web".into(), web_v2, "applied".into())
    );
    assert_eq!(f.policy_of("web2").1, prod_v, "web2 was not touched");
    let log = f.agents[0].log_text();
    assert!(
        log.lines().any(|l| l.contains("policy applied")
            && l.contains("filter=tcp port 8080")
            && l.contains("limit=5Mbit")),
        "{log}"
    );
    let got = ctl_json(&f.ctl, &["policy", "get", "web"]);
    assert_eq!(got["filter"], "tcp port 8080");
    assert_eq!(got["limit"], "5Mbit");
    assert_eq!(got["selector"], "role=web", "the selector was kept");

    // Labels move an agent between policies at once.
    let (code, _, err) = f.ctl(&["agent", "label", "misc", "role=web"]);
    assert_eq!(code, 0, "{err}");
    f.wait_rollout();
    assert_eq!(f.policy_of("misc").0, "web");

    // A policy that could tie with another for some agent is refused.
    let (code, _, err) = f.ctl(&["policy", "set", "prod", "--selector", "env=prod"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("would tie with policy web"), "{err}");

    // Deleting a policy falls its agents back to the next match.
    let (code, _, err) = f.ctl(&["policy", "delete", "db1-only"]);
    assert_eq!(code, 0, "{err}");
    f.wait_rollout();
    assert_eq!(f.policy_of("db1").0, "fleet");
}

#[test]
fn bad_values_are_refused_at_ctl_time_and_nothing_is_pushed() {
    let f = Fleet::new(&[("web1", "role=web")]);
    let v = f.set(&["web", "--selector", "role=web", "--filter", "tcp port 80"]);
    f.wait_rollout();
    let before = f.controller.proc.log_text().matches("policy_sent").count()
        + f.agents[0].log_text().matches("policy applied").count();

    for (args, expect) in [
        (vec!["--filter", "tcp port banana"], "unknown port 'banana'"),
        (vec!["--filter", "tcp and and"], "syntax error"),
        (vec!["--limit", "2MBps"], "byte rate"),
        (vec!["--limit", "fast"], "not a number followed by a unit"),
        (vec!["--check-interval", "10"], "has no unit"),
        (
            vec!["--target", "sflow:10.0.0.1"],
            "unknown target `sflow:10.0.0.1`",
        ),
        (
            vec!["--target", "gre:10.0.0.1:4789"],
            "GRE has no port; use gre:HOST",
        ),
        (vec!["--gre-key", "7"], "--gre-key needs a gre target"),
        (vec!["--erspan-session", "7"], "need an erspan target"),
        (
            vec!["--target", "erspan:10.0.0.1", "--erspan-session", "1024"],
            "ERSPAN session 1024 does not fit in 10 bits",
        ),
        (
            vec!["--target", "erspan:10.0.0.1", "--erspan-type", "1"],
            "not an ERSPAN type: use 2 (type II) or 3 (type III)",
        ),
        (vec!["--snaplen", "10"], "snaplen: 10 is out of range"),
        (vec!["--limit", "1bit"], "limit: 1bit is out of range"),
        (vec!["--vni", "42"], "--vni needs a vxlan target"),
        (vec!["--rotate-size", "100MB"], "need a pcap target"),
        (
            vec!["--rotate-size", "lots"],
            "not a number followed by a unit",
        ),
    ] {
        let mut all = vec!["policy", "set", "web"];
        all.extend_from_slice(&args);
        let (code, out, err) = f.ctl(&all);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(
            err.contains(expect),
            "{args:?}: expected `{expect}` in {err}"
        );
    }
    // Nothing changed and nothing was pushed.
    let got = ctl_json(&f.ctl, &["policy", "get", "web"]);
    assert_eq!(got["version"], v);
    assert_eq!(got["filter"], "tcp port 80");
    let after = f.controller.proc.log_text().matches("policy_sent").count()
        + f.agents[0].log_text().matches("policy applied").count();
    assert_eq!(before, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_validates_policies_itself() {
    // A client that skips the ctl's checks still cannot store a bad policy.
    let f = Fleet::new(&[]);
    let text = std::fs::read_to_string(&f.ctl).unwrap();
    let pem = |key: &str| -> String {
        let start = text.find(&format!("{key} = \"\"\"\n")).unwrap() + key.len() + 7;
        let end = start + text[start..].find("\"\"\"").unwrap();
        text[start..end].to_string()
    };
    let tls = tapgraph::tls::client_config(
        tapgraph::tls::roots_from_pem(pem("ca_pem").as_bytes()).unwrap(),
        Some((
            tapgraph::tls::parse_certs(pem("cert_pem").as_bytes()).unwrap(),
            tapgraph::tls::parse_key(pem("key_pem").as_bytes()).unwrap(),
        )),
    )
    .unwrap();
    let channel = tapgraph::transport::connect(
        &f.controller.grpc.to_string(),
        "127.0.0.1",
        tls,
        &Default::default(),
    )
    .await
    .unwrap();
    let mut admin = tapgraph::proto::admin_service_client::AdminServiceClient::new(channel);
    let mut spec = tapgraph::policy::PolicySpec {
        filter: "tcp port banana".into(),
        ..Default::default()
    }
    .to_proto(0, "x");
    let all = tapgraph::proto::Selector {
        kind: Some(tapgraph::proto::selector::Kind::All(true)),
    };
    let request = |spec: &tapgraph::proto::Policy| tapgraph::proto::SetPolicyRequest {
        name: "x".into(),
        selector: Some(all.clone()),
        policy: Some(spec.clone()),
    };
    let e = admin.set_policy(request(&spec)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("banana"), "{}", e.message());
    spec.capture.as_mut().unwrap().filter = String::new();
    spec.limit.as_mut().unwrap().bits_per_second = 1;
    let e = admin.set_policy(request(&spec)).await.unwrap_err();
    assert!(
        e.message().contains("limit: 1bit is out of range"),
        "{}",
        e.message()
    );
    let e = admin
        .set_policy(tapgraph::proto::SetPolicyRequest {
            name: "x".into(),
            selector: None,
            policy: Some(spec),
        })
        .await
        .unwrap_err();
    assert!(
        e.message().contains("a selector is required"),
        "{}",
        e.message()
    );
    let list = admin
        .list_policies(tapgraph::proto::ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.policies.len(), 1, "only the default");
}

#[test]
fn policies_survive_a_controller_restart() {
    let f = Fleet::new(&[("web1", "role=web")]);
    let v = f.set(&[
        "web",
        "--selector",
        "role=web",
        "--filter",
        "udp",
        "--limit",
        "3Mbit",
    ]);
    f.wait_rollout();
    let before = ctl_json(&f.ctl, &["policy", "list"]);
    let Fleet {
        world,
        controller,
        ctl: ctl_path,
        agents,
    } = f;
    let (controller, _) = controller.restart(&world, FAST);
    let after = ctl_json(&ctl_path, &["policy", "list"]);
    assert_eq!(before, after);
    controller.wait_agent("web1", "connected", Duration::from_secs(20), |a| {
        a["policy_version_applied"] == v
    });
    drop(agents);
}

#[test]
fn events_show_a_policy_rollout() {
    let f = Fleet::new(&[("web1", "role=web"), ("db1", "role=db")]);
    let mut cmd = Command::new(bin("tapgraphctl"));
    cmd.arg("--config")
        .arg(&f.ctl)
        .args(["-o", "json", "events"]);
    let events = Proc::spawn("events", cmd, f.world.path());
    // The watcher is connected once it logs; give it a moment to subscribe.
    wait_for("the event watcher", Duration::from_secs(10), || {
        f.controller
            .proc
            .log_text()
            .contains("event watcher connected")
            .then_some(())
    });
    let v = f.set(&["web", "--selector", "role=web", "--filter", "tcp"]);
    let (code, _, err) = f.ctl(&[
        "policy",
        "set",
        "pin",
        "--agent",
        "db1",
        "--interface",
        "nope0",
    ]);
    assert_eq!(code, 0, "{err}");
    let lines = wait_for("the rollout events", Duration::from_secs(10), || {
        let text = events.log_text();
        let lines: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        // Both outcomes, in whichever order the two agents answer.
        let seen = |kind: &str, agent: &str| {
            lines
                .iter()
                .any(|e| e["kind"] == kind && e["agent"] == agent)
        };
        (seen("policy_refused", "db1") && seen("policy_applied", "web1")).then_some(lines)
    });
    let kinds: Vec<(String, String)> = lines
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap().into(),
                e["agent"].as_str().unwrap().into(),
            )
        })
        .collect();
    let pos = |k: &str, a: &str| {
        kinds
            .iter()
            .position(|(kk, aa)| kk == k && aa == a)
            .unwrap_or_else(|| panic!("no {k} for {a:?} in {kinds:?}"))
    };
    assert!(pos("policy_set", "") < pos("policy_sent", "web1"));
    assert!(pos("policy_sent", "web1") < pos("policy_applied", "web1"));
    let sent_web_to_db1 = lines.iter().any(|e| {
        e["kind"] == "policy_sent"
            && e["agent"] == "db1"
            && e["message"].as_str().unwrap().contains("policy web ")
    });
    assert!(
        !sent_web_to_db1,
        "db1 is role=db: the web policy is not its business"
    );
    let refused = &lines[pos("policy_refused", "db1")];
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("nope0 does not exist"),
        "{refused}"
    );
    let applied = &lines[pos("policy_applied", "web1")];
    assert!(
        applied["message"]
            .as_str()
            .unwrap()
            .contains(&format!("v{v}"))
    );
}

#[test]
fn a_missing_interface_is_reported_for_that_agent_only() {
    if !require_root("a_missing_interface_is_reported_for_that_agent_only") {
        return;
    }
    let world = World::new();
    let hub = Netns::new("hub");
    let tapped = Netns::new("tapped");
    let plain = Netns::new("plain");
    veth(
        &hub,
        "to-tapped",
        "198.18.0.1/30",
        &tapped,
        "up0",
        "198.18.0.2/30",
    );
    veth(
        &hub,
        "to-plain",
        "198.18.0.5/30",
        &plain,
        "up0",
        "198.18.0.6/30",
    );
    // Only the tapped host has a span0 interface.
    veth(
        &tapped,
        "span0",
        "198.18.1.1/30",
        &tapped,
        "span1",
        "198.18.1.2/30",
    );

    let grpc: SocketAddr = "198.18.0.1:7443".parse().unwrap();
    let http: SocketAddr = "127.0.0.1:7080".parse().unwrap();
    // Listening on every address of the hub: each agent reaches it over its own link.
    let mut cmd = hub.wrap(world.controller_cmd("0.0.0.0:7443".parse().unwrap(), http));
    cmd.envs(FAST.iter().copied());
    let _controller = Proc::spawn("controller", cmd, world.path());
    wait_for("controller ready", Duration::from_secs(20), || {
        hub.run(|| matches!(crate::harness::http_get(http, "/readyz"), Ok((200, _))).then_some(()))
    });
    let ctl_path = world.operator("admin", grpc);
    // tapgraphctl runs inside the hub namespace, where the controller is.
    let hub_ctl = |args: &[&str]| -> (i32, String, String) {
        let out = hub
            .command(bin("tapgraphctl"))
            .arg("--config")
            .arg(&ctl_path)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        )
    };
    world.issue_agent("tapped");
    world.issue_agent("plain");
    let to_hub = |port: &str| -> SocketAddr { format!("{port}:7443").parse().unwrap() };
    let _a = Proc::spawn(
        "tapped",
        tapped.wrap(world.agent_cmd("tapped", to_hub("198.18.0.1"))),
        world.path(),
    );
    // The plain host dials the hub's other address; the certificate names 198.18.0.1.
    let mut plain_cmd = world.agent_cmd("plain", to_hub("198.18.0.5"));
    plain_cmd.args(["--server-name", "198.18.0.1"]);
    let _b = Proc::spawn("plain", plain.wrap(plain_cmd), world.path());
    wait_for("both agents connected", Duration::from_secs(20), || {
        let (code, out, _) = hub_ctl(&["-o", "json", "agent", "list"]);
        let v: Value = serde_json::from_str(&out).ok()?;
        (code == 0
            && v.as_array()?
                .iter()
                .filter(|a| a["state"] == "connected")
                .count()
                == 2)
            .then_some(())
    });
    let (code, _, err) = hub_ctl(&["policy", "set", "span", "--all", "--interface", "span0"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = hub_ctl(&["policy", "status", "span", "--wait", "--timeout", "20s"]);
    assert_eq!(code, 4, "{out}{err}");
    assert!(err.contains("agent plain refused policy span"), "{err}");
    let rows: Vec<&str> = out.lines().collect();
    let row = |agent: &str| {
        rows.iter()
            .find(|r| r.starts_with(agent))
            .unwrap()
            .to_string()
    };
    assert!(row("plain ").contains("failed"), "{out}");
    // --wait returns at the first refusal; the tapped host may still have been applying then.
    wait_for(
        "the tapped host to apply span",
        Duration::from_secs(20),
        || {
            let (_, now, _) = hub_ctl(&["policy", "status", "span"]);
            now.lines()
                .any(|r| r.starts_with("tapped ") && r.contains("applied"))
                .then_some(())
        },
    );
    assert!(
        row("plain ").contains("interface: span0 does not exist on this host (it has lo, up0)"),
        "{out}"
    );
}

#[test]
fn ctl_help_exit_codes_completions_and_config_overrides() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(bin("tapgraphctl"))
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, help, _) = run(&["--help"], &[]);
    assert_eq!(code, 0);
    for needle in [
        "token",
        "agent",
        "policy",
        "events",
        "completion",
        "Exit status:",
        "4  policy status --wait",
        "TAPGRAPHCTL_CONFIG",
    ] {
        assert!(
            help.contains(needle),
            "`{needle}` missing from --help:\n{help}"
        );
    }
    let (_, help, _) = run(&["policy", "set", "--help"], &[]);
    for needle in [
        "--selector",
        "--filter",
        "--limit",
        "--breach-intervals",
        "Examples:",
        "most specific",
        "Units:",
    ] {
        assert!(
            help.contains(needle),
            "`{needle}` missing from policy set --help:\n{help}"
        );
    }
    let (code, script, _) = run(&["completion", "bash"], &[]);
    assert_eq!(code, 0);
    assert!(
        script.contains("tapgraphctl") && script.contains("complete"),
        "{script}"
    );
    let (code, _, err) = run(&["policy", "frobnicate"], &[]);
    assert_eq!(code, 2, "{err}");

    // Without a config file: exit 3 and how to get one.
    let (code, _, err) = run(&["agent", "list", "--config", "/nonexistent/ctl.toml"], &[]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("tapgraph-controller operator issue"), "{err}");

    // The file's address can be overridden by the environment, and that by the flag.
    let world = World::new();
    let controller = Controller::start(&world, &[]);
    let good = world.operator("admin", controller.grpc);
    let text = std::fs::read_to_string(&good).unwrap();
    let wrong = world.path().join("wrong.toml");
    tapgraph::fsutil::write_private(
        &wrong,
        text.replace(&controller.grpc.to_string(), "127.0.0.1:1")
            .as_bytes(),
    )
    .unwrap();
    let wrong_s = wrong.to_str().unwrap();
    let (code, _, err) = run(&["agent", "list", "--config", wrong_s], &[]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("cannot reach the controller at 127.0.0.1:1"),
        "{err}"
    );
    let right = controller.grpc.to_string();
    let (code, out, err) = run(
        &["agent", "list", "--config", wrong_s],
        &[("TAPGRAPHCTL_CONTROLLER", right.as_str())],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ID "), "{out}");
    let (code, _, _) = run(
        &[
            "agent",
            "list",
            "--config",
            wrong_s,
            "--controller",
            "127.0.0.1:1",
        ],
        &[("TAPGRAPHCTL_CONTROLLER", right.as_str())],
    );
    assert_eq!(code, 3, "the flag beats the environment");
    // A config file others can read is refused: it holds the operator's key.
    std::fs::set_permissions(&wrong, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let (code, _, err) = run(&["agent", "list", "--config", wrong_s], &[]);
    assert_eq!(code, 3);
    assert!(err.contains("chmod 600"), "{err}");
}
