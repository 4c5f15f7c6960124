//! Issue 21, as processes: controller replicas on one PostgreSQL (`scripts/pg-server`, started by
//! each test), real agents whose `controller` lists the replicas, and real `tapgraphctl`. What one
//! replica is told, every replica knows; when a replica or the database dies, the fleet goes on.
//! Figures measured on the way (failover, revocation across replicas) are printed, not asserted
//! tightly: speed is for BENCHMARKS.md.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{
    Controller, Netns, Postgres, Proc, World, bin, ctl, ctl_json, http_get, require_root, veth,
    wait_for,
};

/// Heartbeats every second: a replica notices a lost agent, and a test its liveness, quickly.
const FAST: &[(&str, &str)] = &[("TAPGRAPH_POLICY__HEARTBEAT_INTERVAL", "1s")];

fn list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The agent binary with `controller` as given (one address or the replicas' list).
fn agent_cmd(world: &World, id: &str, controller: &str) -> Command {
    let mut cmd = Command::new(bin("tapgraph-agent"));
    cmd.arg("--controller")
        .arg(controller)
        .arg("--state-dir")
        .arg(world.agent_dir(id))
        .env("TAPGRAPH_METRICS__LISTEN", "127.0.0.1:0");
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `tapgraph-controller operator issue NAME` run with replica `replica`'s own settings (its state
/// directory, the database, the CA): an operator identity for `tapgraphctl` against it.
fn operator(world: &World, cmd: Command, name: &str) -> PathBuf {
    let out_file = world.path().join(format!("ctl-{name}.toml"));
    let mut cmd = cmd;
    cmd.args(["operator", "issue", name, "--out"])
        .arg(&out_file);
    let out = cmd.output().expect("operator issue");
    assert!(out.status.success(), "operator issue: {}", text(&out));
    out_file
}

/// Replicas on loopback sharing one database and one CA, each with an operator config, and the
/// agents a test starts. Fields drop in order: agents, replicas, the database, the directory.
struct Set {
    agents: Vec<Proc>,
    replicas: Vec<Controller>,
    names: Vec<String>,
    ctl: Vec<PathBuf>,
    /// Held until the replicas have stopped.
    _pg: Postgres,
    world: World,
}

impl Set {
    /// `n` replicas r1..rn; `None` when PostgreSQL is missing (said loudly; a failure in CI).
    fn new(test: &str, n: usize) -> Option<Set> {
        let pg = Postgres::start(test)?;
        let world = World::new();
        let names: Vec<String> = (1..=n).map(|i| format!("r{i}")).collect();
        let replicas: Vec<Controller> = names
            .iter()
            .map(|name| Controller::start_replica(&world, name, &pg.url, FAST))
            .collect();
        let ctl = names
            .iter()
            .zip(&replicas)
            .map(|(name, r)| {
                let cmd = world.replica_cmd(name, &pg.url, r.grpc, r.http);
                operator(&world, cmd, &format!("ops-{name}"))
            })
            .collect();
        Some(Set {
            agents: Vec::new(),
            replicas,
            names,
            ctl,
            _pg: pg,
            world,
        })
    }

    fn grpc(&self) -> Vec<SocketAddr> {
        self.replicas.iter().map(|r| r.grpc).collect()
    }

    /// A join token made through replica `via`: (token, CA fingerprint).
    fn token(&self, via: usize, uses: u32) -> (String, String) {
        let t = ctl_json(
            &self.ctl[via],
            &["token", "create", "--uses", &uses.to_string()],
        );
        (
            t["token"].as_str().unwrap().to_string(),
            t["ca_fingerprint"].as_str().unwrap().to_string(),
        )
    }

    /// `tapgraph-agent enroll` of `id` through replica `via`.
    fn enroll(&self, id: &str, via: usize, token: &(String, String)) -> Output {
        agent_cmd(&self.world, id, &self.replicas[via].grpc.to_string())
            .args(["enroll", "--name", id, "--token", &token.0])
            .args(["--ca-fingerprint", &token.1])
            .output()
            .expect("tapgraph-agent enroll")
    }

    /// Starts agent `id` (enrolled or issued) with `controller`.
    fn run_agent(&mut self, id: &str, controller: &str) {
        let cmd = agent_cmd(&self.world, id, controller);
        self.agents
            .push(Proc::spawn(&format!("agent-{id}"), cmd, self.world.path()));
    }

    /// Agent `id` as replica `on` lists it (`tapgraphctl agent list -o json`).
    fn listed(&self, on: usize, id: &str) -> Option<Value> {
        ctl_json(&self.ctl[on], &["agent", "list"])
            .as_array()?
            .iter()
            .find(|a| a["id"] == id)
            .cloned()
    }

    /// Waits until replica `on` lists agent `id` connected, to any replica; returns the record.
    fn wait_connected(&self, on: usize, id: &str) -> Value {
        wait_for(
            &format!("agent {id} connected in {}'s agent list", self.names[on]),
            Duration::from_secs(30),
            || self.listed(on, id).filter(|a| a["state"] == "connected"),
        )
    }
}

/// The CA fingerprint controller `c` logged when it became ready.
fn fingerprint(c: &Controller) -> String {
    c.proc
        .log_text()
        .lines()
        .find(|l| l.contains("controller ready"))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("ca_fingerprint="))
        })
        .map(str::to_string)
        .expect("the CA fingerprint in the ready line")
}

/// `cmd` (a replica's) with the CA sealed in the database by `seal` instead of CA files.
fn sealed(mut cmd: Command, seal: &std::path::Path) -> Command {
    cmd.env_remove("TAPGRAPH_PKI__CA_CERT")
        .env_remove("TAPGRAPH_PKI__CA_KEY")
        .env("TAPGRAPH_PKI__CA_SEAL_KEY_FILE", seal);
    cmd
}

/// A seal key file (64 hex digits, owner-only) in the world.
fn seal_key(world: &World) -> PathBuf {
    let seal = world.path().join("ca-seal.key");
    let key: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    tapgraph::fsutil::write_private(&seal, key.as_bytes()).unwrap();
    seal
}

/// The address an agent's log says it connected to last.
fn connected_to(agent: &Proc) -> Option<String> {
    agent
        .log_text()
        .lines()
        .rev()
        .find(|l| l.contains("connected to controller"))?
        .split_whitespace()
        .find_map(|w| w.strip_prefix("controller="))
        .map(str::to_string)
}

#[test]
fn a_join_tokens_uses_are_shared_and_agents_enrolled_through_either_replica_reach_both() {
    let test =
        "a_join_tokens_uses_are_shared_and_agents_enrolled_through_either_replica_reach_both";
    let Some(mut set) = Set::new(test, 2) else {
        return;
    };
    // One token with three uses, made through r1; four agents race for them, two through each
    // replica: exactly three win, whichever replica they asked.
    let token = set.token(0, 3);
    let ids = ["race-a", "race-b", "race-c", "race-d"];
    let barrier = std::sync::Barrier::new(ids.len());
    let results: Vec<(&str, Output)> = std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let (set, token, barrier) = (&set, &token, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    (*id, set.enroll(id, i % 2, token))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let winners: Vec<&str> = results
        .iter()
        .filter(|(_, out)| out.status.success())
        .map(|(id, _)| *id)
        .collect();
    for (id, out) in &results {
        eprintln!("enroll {id}: {} {}", out.status, text(out).trim());
    }
    assert_eq!(winners.len(), 3, "three uses, three enrollments");
    let (loser, out) = results
        .iter()
        .find(|(_, out)| !out.status.success())
        .unwrap();
    assert!(
        text(out).contains("no uses left"),
        "{loser} was refused for the spent token: {}",
        text(out)
    );
    assert!(!set.world.agent_dir(loser).join("agent.pem").exists());

    // Every winner runs with both replicas listed, and each replica lists every one of them
    // connected, on the replica its log names.
    let controllers = list(&set.grpc());
    for id in &winners {
        set.run_agent(id, &controllers);
    }
    for (i, id) in winners.iter().enumerate() {
        let agent = &set.agents[i];
        let on_r1 = set.wait_connected(0, id);
        let on_r2 = set.wait_connected(1, id);
        let addr = wait_for(
            "the agent's connection logged",
            Duration::from_secs(10),
            || connected_to(agent),
        );
        let replica = set
            .replicas
            .iter()
            .position(|r| r.grpc.to_string() == addr)
            .map(|i| set.names[i].clone())
            .unwrap_or_else(|| panic!("{id} connected to {addr}, not a replica"));
        assert_eq!(on_r1["controller"], replica.as_str(), "{on_r1}");
        assert_eq!(on_r2["controller"], replica.as_str(), "{on_r2}");
    }
    assert!(
        set.listed(0, loser).is_none() && set.listed(1, loser).is_none(),
        "the loser is enrolled nowhere"
    );
}

#[test]
fn revoking_through_one_replica_closes_the_agents_stream_on_the_other() {
    let test = "revoking_through_one_replica_closes_the_agents_stream_on_the_other";
    let Some(mut set) = Set::new(test, 2) else {
        return;
    };
    // Enrolled through r2 and connected to r2 only; revoked through r1.
    let token = set.token(1, 1);
    let out = set.enroll("doomed", 1, &token);
    assert!(out.status.success(), "{}", text(&out));
    // r1's event stream, from before the agent connects to r2.
    let mut watch = Command::new(bin("tapgraphctl"));
    watch
        .arg("--config")
        .arg(&set.ctl[0])
        .args(["-o", "json", "events"]);
    let events = Proc::spawn("events-r1", watch, set.world.path());
    std::thread::sleep(Duration::from_millis(500));
    let r2 = set.replicas[1].grpc.to_string();
    set.run_agent("doomed", &r2);
    let before =
        set.replicas[1].wait_agent("doomed", "connected", Duration::from_secs(30), |_| true);
    assert_eq!(before["controller"], "r2", "{before}");
    // Any replica shows the fleet's events: r1 shows the connect that happened on r2, naming r2.
    wait_for(
        "r1's events to show the agent connecting on r2",
        Duration::from_secs(15),
        || {
            events
                .log_text()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|e| e["agent"] == "doomed" && e["fields"]["replica"] == "r2")
        },
    );

    let started = Instant::now();
    let (code, out, err) = ctl(&set.ctl[0], &["agent", "revoke", "doomed"]);
    assert_eq!(code, 0, "revoke through r1: {out}{err}");
    let committed = Instant::now();
    wait_for(
        "r2 to close the revoked agent's stream",
        Duration::from_secs(15),
        || (set.replicas[1].agent("doomed")?["state"] != "connected").then_some(()),
    );
    let closed = Instant::now();
    eprintln!(
        "revocation across replicas: {:?} from `agent revoke` returning on r1 to the stream closed \
         on r2 ({:?} from the command's start; the goal is < 1 s)",
        closed - committed,
        closed - started
    );
    // r2 refuses the agent's reconnects from then on, and says why.
    let agent = &set.agents[0];
    wait_for(
        "the agent to be refused as revoked",
        Duration::from_secs(15),
        || agent.log_text().contains("was revoked").then_some(()),
    );
    // Both replicas list it as revoked (`tapgraphctl agent list`), as a single controller would.
    for i in 0..set.replicas.len() {
        // Revoked, and no live session left: r2's presence row follows its closed session
        // within a round of its writer (tens of milliseconds), not at the same instant.
        wait_for(
            &format!(
                "doomed revoked without a session in {}'s agent list",
                set.names[i]
            ),
            Duration::from_secs(15),
            || {
                set.listed(i, "doomed")
                    .filter(|a| a["state"] == "revoked" && a["controller"] != "r2")
            },
        );
    }
}

#[test]
fn a_policy_set_through_one_replica_reaches_an_agent_on_the_other() {
    let test = "a_policy_set_through_one_replica_reaches_an_agent_on_the_other";
    let Some(mut set) = Set::new(test, 2) else {
        return;
    };
    let token = set.token(1, 1);
    let out = set.enroll("far", 1, &token);
    assert!(out.status.success(), "{}", text(&out));
    let r2 = set.replicas[1].grpc.to_string();
    set.run_agent("far", &r2);
    set.replicas[1].wait_agent("far", "connected", Duration::from_secs(30), |_| true);

    let set_v = ctl_json(
        &set.ctl[0],
        &[
            "policy",
            "set",
            "fleet",
            "--all",
            "--heartbeat-interval",
            "2s",
        ],
    );
    let version = set_v["version"].as_u64().expect("a version");
    // `policy status --wait` on r2 sees the agent's ack of what r1 was told.
    let (code, out, err) = ctl(
        &set.ctl[1],
        &["policy", "status", "--wait", "--timeout", "20s"],
    );
    assert_eq!(code, 0, "policy status --wait on r2: {out}{err}");
    for on in 0..2 {
        let status = ctl_json(&set.ctl[on], &["policy", "status"]);
        let far = status
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["agent"] == "far")
            .unwrap_or_else(|| panic!("no status for far on {}: {status}", set.names[on]))
            .clone();
        assert_eq!(far["policy"], "fleet", "{far}");
        assert_eq!(far["version_applied"].as_u64(), Some(version), "{far}");
    }
    let listed = set.replicas[1].agent("far").unwrap();
    assert_eq!(listed["heartbeat_ms"], 2000, "the agent runs it: {listed}");
}

#[test]
fn replicas_started_at_once_on_an_empty_database_make_one_schema_and_one_ca() {
    let test = "replicas_started_at_once_on_an_empty_database_make_one_schema_and_one_ca";
    let Some(pg) = Postgres::start(test) else {
        return;
    };
    let world = World::new();
    // No CA files: the first replica creates the CA and stores it sealed with this key; the other
    // uses it. A few rounds, each on an empty database, to give the race a chance.
    let seal = seal_key(&world);
    for round in 1..=3 {
        let db = format!("race{round}");
        pg.psql("postgres", &format!("CREATE DATABASE {db}"));
        let url = pg.url_of(&db);
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        let starting: Vec<_> = ["a", "b"]
            .iter()
            .map(|r| {
                let name = format!("{r}{round}");
                let cmd = sealed(world.replica_cmd(&name, &url, any, any), &seal);
                let starting = Controller::spawn(&world, &name, cmd);
                (name, starting)
            })
            .collect();
        let replicas: Vec<(String, Controller)> = starting
            .into_iter()
            .map(|(name, s)| (name, s.ready()))
            .collect();
        let (a, b) = (&replicas[0].1, &replicas[1].1);
        assert_eq!(fingerprint(a), fingerprint(b), "round {round}: one CA");
        // Each migration applied once, by one of them.
        let versions: usize = pg
            .psql(&db, "SELECT count(*) FROM tapgraph.schema_migrations")
            .parse()
            .unwrap();
        let applied: usize = replicas
            .iter()
            .map(|(_, c)| {
                c.proc
                    .log_text()
                    .matches("schema migration applied")
                    .count()
            })
            .sum();
        assert!(versions >= 1);
        assert_eq!(
            applied, versions,
            "round {round}: each migration applied once"
        );
        for (name, c) in &replicas {
            let log = c.proc.log_text();
            let bad: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("ERROR") || l.contains(" WARN "))
                .collect();
            assert!(bad.is_empty(), "round {round}: {name} logged: {bad:#?}");
        }
        // An operator identity issued with one replica's settings works against the other.
        let issue = sealed(
            world.replica_cmd(&replicas[0].0, &url, a.grpc, a.http),
            &seal,
        );
        let ops = operator(&world, issue, &format!("ops-{round}"));
        let out = Command::new(bin("tapgraphctl"))
            .arg("--config")
            .arg(&ops)
            .args(["--controller", &b.grpc.to_string(), "agent", "list"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "round {round}: an operator of {} on {}: {}",
            replicas[0].0,
            replicas[1].0,
            text(&out)
        );
    }
}

#[test]
fn store_migrate_moves_a_single_controller_to_replicas_without_reenrolling() {
    migrate_to_replicas(
        "store_migrate_moves_a_single_controller_to_replicas_without_reenrolling",
        false,
    );
}

#[test]
fn store_migrate_seals_the_single_controllers_ca_for_replicas_without_ca_files() {
    migrate_to_replicas(
        "store_migrate_seals_the_single_controllers_ca_for_replicas_without_ca_files",
        true,
    );
}

/// A single controller's state moved into PostgreSQL, then two replicas: with its CA mounted as
/// `pki.ca_cert`/`pki.ca_key`, or (`seal`) stored in the database sealed by `pki.ca_seal_key_file`.
fn migrate_to_replicas(test: &str, seal: bool) {
    let Some(pg) = Postgres::start(test) else {
        return;
    };
    let world = World::new();
    // A single embedded controller; three agents enrolled through it (one revoked later), with a
    // label and a policy, two of them reporting to its map.
    let single = Controller::start(
        &world,
        &[
            ("TAPGRAPH_POLICY__HEARTBEAT_INTERVAL", "1s"),
            ("TAPGRAPH_POLICY__SNAPSHOT_INTERVAL", "1s"),
        ],
    );
    let ops = world.operator("ops", single.grpc);
    let t = ctl_json(
        &ops,
        &["token", "create", "--uses", "3", "--label", "team=blue"],
    );
    let (token, fp) = (
        t["token"].as_str().unwrap(),
        t["ca_fingerprint"].as_str().unwrap(),
    );
    let ids = ["old-a", "old-b"];
    for id in ["old-a", "old-b", "old-c"] {
        let out = agent_cmd(&world, id, &single.grpc.to_string())
            .args([
                "enroll",
                "--name",
                id,
                "--token",
                token,
                "--ca-fingerprint",
                fp,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    let policy = ctl_json(
        &ops,
        &[
            "policy",
            "set",
            "blue",
            "--selector",
            "team=blue",
            "--heartbeat-interval",
            "2s",
        ],
    );
    let version = policy["version"].as_u64().unwrap();
    let certs: Vec<Vec<u8>> = ids
        .iter()
        .map(|id| std::fs::read(world.agent_dir(id).join("agent.pem")).unwrap())
        .collect();
    let reporting: Vec<Proc> = ids
        .iter()
        .map(|id| {
            let cmd = agent_cmd(&world, id, &single.grpc.to_string());
            Proc::spawn(&format!("agent-{id}"), cmd, world.path())
        })
        .collect();
    for id in ids {
        wait_for(
            &format!("{id} on the single controller's map"),
            Duration::from_secs(30),
            || {
                map_of(single.http)
                    .iter()
                    .any(|e| e.contains(&format!("\"from\":\"host:{id}\"")))
                    .then_some(())
            },
        );
    }
    // The agents stop; the map, once it reads the same twice in a row, is what must move.
    drop(reporting);
    let mut last = map_of(single.http);
    let map_before = wait_for("the map to settle", Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(1500));
        let now = map_of(single.http);
        let settled = now == last;
        last = now;
        settled.then(|| last.clone())
    });
    let (code, out, err) = ctl(&ops, &["agent", "revoke", "old-c"]);
    assert_eq!(code, 0, "{out}{err}");
    let single_ca = fingerprint(&single);
    drop(single);

    // The replicas' CA settings: the single controller's CA files (what `shared_ca` finds in its
    // state dir), or only a seal key.
    let seal = seal.then(|| seal_key(&world));
    let with_ca = |cmd: Command| match &seal {
        Some(key) => sealed(cmd, key),
        None => cmd,
    };
    // Into PostgreSQL, with the settings the first replica will have.
    let any: SocketAddr = ([127, 0, 0, 1], 0).into();
    let mut migrate = with_ca(world.replica_cmd("m1", &pg.url, any, any));
    let out = migrate
        .args(["store", "migrate", "--from"])
        .arg(world.state_dir())
        .output()
        .expect("tapgraph-controller store migrate");
    assert!(out.status.success(), "store migrate: {}", text(&out));
    eprintln!("store migrate: {}", text(&out).trim());

    // Two replicas, which sign with the single controller's CA.
    let replicas: Vec<Controller> = ["m1", "m2"]
        .iter()
        .map(|name| {
            let mut cmd = with_ca(world.replica_cmd(name, &pg.url, any, any));
            cmd.envs(FAST.iter().copied());
            Controller::spawn(&world, name, cmd).ready()
        })
        .collect();
    for r in &replicas {
        assert_eq!(fingerprint(r), single_ca, "{}'s CA", r.proc.name);
    }
    let ctl_of: Vec<PathBuf> = ["m1", "m2"]
        .iter()
        .zip(&replicas)
        .map(|(name, r)| {
            operator(
                &world,
                with_ca(world.replica_cmd(name, &pg.url, r.grpc, r.http)),
                &format!("ops-{name}"),
            )
        })
        .collect();
    // Before any agent reports again, each replica shows the single controller's map, edge for
    // edge, and the revoked agent as revoked.
    for (r, ops) in replicas.iter().zip(&ctl_of) {
        assert_eq!(map_of(r.http), map_before, "the map on {}", r.proc.name);
        let old_c = ctl_json(ops, &["agent", "list"])
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == "old-c")
            .cloned()
            .unwrap_or_else(|| panic!("old-c on {}", r.proc.name));
        assert_eq!(old_c["state"], "revoked", "{old_c}");
    }
    eprintln!("the migrated map: {} edges", map_before.len());
    let both = list(&replicas.iter().map(|r| r.grpc).collect::<Vec<_>>());
    let _agents: Vec<Proc> = ids
        .iter()
        .map(|id| {
            Proc::spawn(
                &format!("agent-{id}"),
                agent_cmd(&world, id, &both),
                world.path(),
            )
        })
        .collect();
    for ops in &ctl_of {
        for id in ids {
            let a = wait_for(
                &format!("{id} connected, listed through {}", ops.display()),
                Duration::from_secs(30),
                || {
                    ctl_json(ops, &["agent", "list"])
                        .as_array()?
                        .iter()
                        .find(|a| a["id"] == id && a["state"] == "connected")
                        .cloned()
                },
            );
            assert_eq!(a["labels"]["team"], "blue", "{a}");
        }
        let (code, out, err) = ctl(ops, &["policy", "status", "--wait", "--timeout", "20s"]);
        assert_eq!(code, 0, "{out}{err}");
        let status = ctl_json(ops, &["policy", "status"]);
        for id in ids {
            let s = status
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["agent"] == id)
                .unwrap_or_else(|| panic!("{id} in {status}"));
            assert_eq!(s["policy"], "blue", "{s}");
            assert_eq!(s["version_applied"].as_u64(), Some(version), "{s}");
        }
    }
    for (id, cert) in ids.iter().zip(&certs) {
        assert_eq!(
            &std::fs::read(world.agent_dir(id).join("agent.pem")).unwrap(),
            cert,
            "{id} kept the certificate it had: no re-enrollment"
        );
    }
}

/// Replicas in a router namespace `hub` with PostgreSQL beside them, and hosts linked to it, as
/// `topology.rs` builds its lab. Replica i listens on 0.0.0.0:7443+i (gRPC) and 127.0.0.1:7080+i
/// (HTTP, reached inside the hub). Fields drop in order: processes, replicas, the database, the
/// namespaces, the directory with the logs.
struct NetLab {
    procs: Vec<Proc>,
    replicas: Vec<Option<Controller>>,
    ctl: Vec<PathBuf>,
    pg: Postgres,
    hosts: Vec<(String, Netns, String)>,
    hub: Netns,
    world: World,
}

const NET_ENV: &[(&str, &str)] = &[
    ("TAPGRAPH_POLICY__SNAPSHOT_INTERVAL", "1s"),
    ("TAPGRAPH_POLICY__HEARTBEAT_INTERVAL", "1s"),
];

impl NetLab {
    fn new(test: &str, hosts: &[&str], replicas: usize) -> Option<NetLab> {
        let world = World::new();
        let hub = Netns::new("hub");
        let pg = Postgres::start_in(test, Some(&hub))?;
        let out = hub
            .command("sysctl")
            .args(["-qw", "net.ipv4.ip_forward=1"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let mut linked = Vec::new();
        for (i, name) in hosts.iter().enumerate() {
            let ns = Netns::new(name);
            let net = i + 1;
            veth(
                &hub,
                &format!("to-{name}"),
                &format!("198.18.{net}.1/30"),
                &ns,
                "eth0",
                &format!("198.18.{net}.2/30"),
            );
            let route = ns
                .command("ip")
                .args(["route", "add", "default", "via", &format!("198.18.{net}.1")])
                .output()
                .unwrap();
            assert!(route.status.success(), "{route:?}");
            linked.push((name.to_string(), ns, format!("198.18.{net}.2")));
        }
        let mut lab = NetLab {
            procs: Vec::new(),
            replicas: Vec::new(),
            ctl: Vec::new(),
            pg,
            hosts: linked,
            hub,
            world,
        };
        let starting: Vec<_> = (0..replicas)
            .map(|i| {
                let name = lab.name(i);
                let (grpc, http) = lab.addrs(i);
                let mut cmd = lab.world.replica_cmd(&name, &lab.pg.url, grpc, http);
                cmd.envs(NET_ENV.iter().copied());
                Controller::spawn(&lab.world, &name, lab.hub.wrap(cmd))
            })
            .collect();
        lab.replicas = starting.into_iter().map(|s| Some(s.ready())).collect();
        for i in 0..replicas {
            let (grpc, http) = lab.addrs(i);
            let cmd = lab.world.replica_cmd(&lab.name(i), &lab.pg.url, grpc, http);
            let ops = operator(
                &lab.world,
                lab.hub.wrap(cmd),
                &format!("ops-{}", lab.name(i)),
            );
            lab.ctl.push(ops);
        }
        Some(lab)
    }

    fn name(&self, i: usize) -> String {
        format!("r{}", i + 1)
    }

    fn addrs(&self, i: usize) -> (SocketAddr, SocketAddr) {
        (
            ([0, 0, 0, 0], 7443 + i as u16).into(),
            ([127, 0, 0, 1], 7080 + i as u16).into(),
        )
    }

    fn host(&self, name: &str) -> (&Netns, &str, usize) {
        let i = self.hosts.iter().position(|(n, _, _)| n == name).unwrap();
        (&self.hosts[i].1, &self.hosts[i].2, i + 1)
    }

    fn run(&mut self, host: &str, label: &str, program: &str, args: &[&str]) {
        let (ns, _, _) = self.host(host);
        let mut cmd = ns.command(program);
        cmd.args(args);
        let p = Proc::spawn(label, cmd, self.world.path());
        self.procs.push(p);
    }

    /// An agent on host `name` whose controller lists every replica (by the hub's address on
    /// the host's link).
    fn agent(&mut self, name: &str) {
        self.world.issue_agent(name);
        let (ns, _, net) = self.host(name);
        let controllers: Vec<String> = (0..self.replicas.len())
            .map(|i| format!("198.18.{net}.1:{}", 7443 + i))
            .collect();
        let mut cmd = agent_cmd(&self.world, name, &controllers.join(","));
        cmd.args(["--server-name", "localhost"]);
        let p = Proc::spawn(&format!("agent-{name}"), ns.wrap(cmd), self.world.path());
        self.procs.push(p);
    }

    fn agent_proc(&self, name: &str) -> &Proc {
        let label = format!("agent-{name}");
        self.procs.iter().find(|p| p.name == label).unwrap()
    }

    /// `GET path` on replica `i`'s HTTP API, from inside the hub.
    fn get(&self, i: usize, path: &str) -> std::io::Result<(u16, String)> {
        let (_, http) = self.addrs(i);
        self.hub.run(|| http_get(http, path))
    }

    fn get_json(&self, i: usize, path: &str) -> Value {
        let (status, body) = self.get(i, path).expect("GET");
        assert_eq!(status, 200, "{path} on {}: {body}", self.name(i));
        serde_json::from_str(&body).unwrap()
    }

    fn agents(&self, i: usize) -> Vec<Value> {
        self.get_json(i, "/api/v1/agents")
            .as_array()
            .unwrap()
            .clone()
    }

    /// The replica agent `id` is connected to, as replica `i` lists it.
    fn connected_on(&self, i: usize, id: &str) -> Option<String> {
        self.agents(i)
            .into_iter()
            .find(|a| a["id"] == id && a["state"] == "connected")
            .and_then(|a| a["controller"].as_str().map(str::to_string))
            .filter(|c| !c.is_empty())
    }

    /// The replica agent `id` is connected to: the one its log names, once that one lists it.
    fn holder(&self, id: &str) -> Option<usize> {
        let addr = connected_to(self.agent_proc(id))?;
        let port: u16 = addr.rsplit_once(':')?.1.parse().ok()?;
        let i = usize::from(port.checked_sub(7443)?);
        (self.connected_on(i, id)? == self.name(i)).then_some(i)
    }

    /// The agents replica `i` holds, connected: (id, sessions so far), last seen.
    fn sessions(&self, i: usize) -> Vec<((String, Value), u64)> {
        let mut s: Vec<_> = self
            .agents(i)
            .into_iter()
            .filter(|a| a["state"] == "connected" && a["controller"] == self.name(i).as_str())
            .map(|a| {
                (
                    (a["id"].as_str().unwrap().to_string(), a["sessions"].clone()),
                    a["last_seen_unix_ms"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        s.sort_by(|a, b| a.0.0.cmp(&b.0.0));
        s
    }

    /// tapgraphctl against replica `i`, inside the hub.
    fn ctl(&self, i: usize, args: &[&str]) -> Output {
        self.hub
            .command(bin("tapgraphctl"))
            .arg("--config")
            .arg(&self.ctl[i])
            .args(args)
            .output()
            .unwrap()
    }

    /// The map's CONNECTS_TO edges as `from -> to port/proto process`, as replica `i` shows it.
    fn edges(&self, i: usize) -> BTreeSet<String> {
        let out = self.ctl(i, &["-o", "json", "graph"]);
        assert!(
            out.status.success(),
            "graph on {}: {}",
            self.name(i),
            text(&out)
        );
        let edges: Value = serde_json::from_slice(&out.stdout).unwrap();
        edges
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                format!(
                    "{} -> {} {}/{} {}",
                    e["from"].as_str().unwrap(),
                    e["to"].as_str().unwrap(),
                    e["port"],
                    e["protocol"].as_str().unwrap(),
                    e["process"].as_str().unwrap()
                )
            })
            .collect()
    }

    /// Every edge of replica `i`'s map with all it says but when it was last seen, inactive
    /// edges included and the agents' own connections to the controllers left out (they move
    /// with a failover, by design).
    fn full_map(&self, i: usize) -> BTreeSet<String> {
        let export = self.get_json(i, "/api/v1/graph/export?format=json&inactive=true");
        export["edges"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["control_plane"] != true)
            .map(|e| {
                let mut e = e.as_object().unwrap().clone();
                // Traffic counters move as long as the connection lives, like last_seen.
                e.retain(|k, _| !k.starts_with("last_seen") && k != "traffic");
                serde_json::to_string(&e).unwrap()
            })
            .collect()
    }
}

/// The redis edge the network labs make: app's redis-cli to db's redis-server.
const REDIS_EDGE: &str = "host:app -> svc:db/tcp/6379 6379/tcp redis-cli";

fn redis_server(lab: &mut NetLab) {
    lab.run(
        "db",
        "redis-db",
        "redis-server",
        &[
            "--port",
            "6379",
            "--bind",
            "0.0.0.0",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
}

fn redis_client(lab: &mut NetLab) {
    let (_, db_ip, _) = lab.host("db");
    let db_ip = db_ip.to_string();
    lab.run(
        "app",
        "redis-cli-app",
        "redis-cli",
        &["-h", &db_ip, "-r", "-1", "-i", "0.2", "ping"],
    );
}

#[test]
fn kill_9_of_a_replica_moves_its_agents_to_the_other_and_the_map_stays_edge_for_edge() {
    let test = "kill_9_of_a_replica_moves_its_agents_to_the_other_and_the_map_stays_edge_for_edge";
    if !require_root(test) {
        return;
    }
    let Some(mut lab) = NetLab::new(test, &["db", "app"], 2) else {
        return;
    };
    redis_server(&mut lab);
    redis_client(&mut lab);
    lab.agent("db");
    lab.agent("app");
    let expected = BTreeSet::from([REDIS_EDGE.to_string()]);
    for i in 0..2 {
        wait_for(
            &format!("the redis edge on {}'s map", lab.name(i)),
            Duration::from_secs(30),
            || (lab.edges(i) == expected).then_some(()),
        );
    }
    // Both agents connected, each to one replica (its log says which, and that replica lists
    // it); the one app's agent is on dies.
    let victim = wait_for(
        "app's agent listed by its replica",
        Duration::from_secs(30),
        || lab.holder("app"),
    );
    let db_on = wait_for(
        "db's agent listed by its replica",
        Duration::from_secs(30),
        || lab.holder("db"),
    );
    let (victim_name, survivor) = (lab.name(victim), 1 - victim);
    let moving: Vec<&str> = if db_on == victim {
        vec!["db", "app"]
    } else {
        vec!["app"]
    };
    eprintln!("killing {victim_name}, which holds {moving:?}");

    // The map, once it reads the same twice in a row, on both replicas alike.
    let mut last = lab.full_map(victim);
    let before = wait_for("the map to settle", Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(1500));
        let now = lab.full_map(victim);
        let settled = now == last && now == lab.full_map(survivor);
        last = now;
        settled.then(|| last.clone())
    });
    assert!(!before.is_empty());
    eprintln!("the map before, {} edges: {before:#?}", before.len());

    let killed = Instant::now();
    lab.replicas[victim].as_mut().unwrap().proc.kill_hard();
    let survivor_name = lab.name(survivor);
    wait_for(
        &format!("{moving:?} connected to {survivor_name}"),
        Duration::from_secs(30),
        || {
            moving
                .iter()
                .all(|id| lab.connected_on(survivor, id).as_deref() == Some(survivor_name.as_str()))
                .then_some(())
        },
    );
    let moved = killed.elapsed();
    eprintln!(
        "failover: {moving:?} connected to {survivor_name} {moved:?} after kill -9 of \
         {victim_name} (default backoff: 200 ms to 5 s)"
    );
    // `tapgraphctl agent list` on the survivor says so in its CONTROLLER column.
    let out = lab.ctl(survivor, &["agent", "list"]);
    let table = text(&out);
    assert!(out.status.success(), "{table}");
    assert!(table.contains("CONTROLLER"), "{table}");
    for id in &moving {
        let row = table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .unwrap_or_else(|| panic!("no row for {id}:\n{table}"));
        assert!(
            row.contains("connected") && row.contains(&survivor_name),
            "{row}"
        );
        let addr = connected_to(lab.agent_proc(id)).unwrap();
        assert!(
            addr.ends_with(&format!(":{}", 7443 + survivor)),
            "{id}: {addr}"
        );
    }

    // The map after the failover equals the one before, edge by edge.
    let after = wait_for("the map as before", Duration::from_secs(30), || {
        let now = lab.full_map(survivor);
        (now == before).then_some(now)
    });
    eprintln!("map complete again {:?} after the kill", killed.elapsed());
    assert_eq!(after, before);
}

#[test]
fn with_postgresql_stopped_sessions_go_on_writes_are_refused_and_everything_recovers() {
    let test = "with_postgresql_stopped_sessions_go_on_writes_are_refused_and_everything_recovers";
    if !require_root(test) {
        return;
    }
    let Some(mut lab) = NetLab::new(test, &["db", "app"], 2) else {
        return;
    };
    redis_server(&mut lab);
    lab.agent("db");
    lab.agent("app");
    for id in ["db", "app"] {
        wait_for(&format!("{id} connected"), Duration::from_secs(30), || {
            lab.holder(id)
        });
    }
    // A token made before the outage, for an enrollment during it.
    let out = lab.ctl(0, &["-o", "json", "token", "create", "--uses", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    let token: Value = serde_json::from_slice(&out.stdout).unwrap();
    let live_before: Vec<_> = (0..2).map(|i| lab.sessions(i)).collect();
    let held: BTreeSet<&str> = live_before
        .iter()
        .flatten()
        .map(|((id, _), _)| id.as_str())
        .collect();
    assert_eq!(held, BTreeSet::from(["app", "db"]), "{live_before:?}");
    // Every replica answers for the whole fleet before the outage (presence rows are written
    // within a fraction of a second of a change, and read on each query).
    let fleet: BTreeSet<(String, String)> = live_before
        .iter()
        .enumerate()
        .flat_map(|(i, held)| {
            let name = lab.name(i);
            held.iter()
                .map(move |((id, _), _)| (id.clone(), name.clone()))
        })
        .collect();
    let connected = |lab: &NetLab, i: usize| -> BTreeSet<(String, String)> {
        lab.agents(i)
            .into_iter()
            .filter(|a| a["state"] == "connected")
            .map(|a| {
                (
                    a["id"].as_str().unwrap().to_string(),
                    a["controller"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    for i in 0..2 {
        wait_for(
            &format!("{} to list the whole fleet", lab.name(i)),
            Duration::from_secs(15),
            || (connected(&lab, i) == fleet).then_some(()),
        );
    }

    lab.pg.stop();
    let stopped = Instant::now();
    for i in 0..2 {
        let body = wait_for(
            &format!("{}'s /readyz to say the database is down", lab.name(i)),
            Duration::from_secs(15),
            || match lab.get(i, "/readyz") {
                Ok((503, body)) => Some(body),
                _ => None,
            },
        );
        assert!(
            body.contains(&lab.pg.database) && body.contains("is unavailable"),
            "/readyz names the database and says it is down: {body}"
        );
    }
    // Writes are refused, naming the database: a token, a policy, a revocation, an enrollment.
    for args in [
        &["token", "create", "--uses", "1"][..],
        &[
            "policy",
            "set",
            "outage",
            "--all",
            "--heartbeat-interval",
            "3s",
        ][..],
        &["agent", "revoke", "db"][..],
    ] {
        let out = lab.ctl(0, args);
        let said = text(&out);
        assert!(!out.status.success(), "{args:?} during the outage: {said}");
        assert!(said.contains("Unavailable"), "{args:?}: {said}");
        assert!(
            said.contains(&lab.pg.database),
            "{args:?} names the database: {said}"
        );
    }
    let (app_ns, _, net) = lab.host("app");
    let enroll = app_ns
        .wrap({
            let mut cmd = agent_cmd(&lab.world, "late", &format!("198.18.{net}.1:7443"));
            cmd.args([
                "--server-name",
                "localhost",
                "enroll",
                "--name",
                "late",
                "--token",
            ])
            .arg(token["token"].as_str().unwrap())
            .arg("--ca-fingerprint")
            .arg(token["ca_fingerprint"].as_str().unwrap());
            cmd
        })
        .output()
        .unwrap();
    let said = text(&enroll);
    assert!(
        !enroll.status.success(),
        "enrollment during the outage: {said}"
    );
    assert!(
        said.contains(&lab.pg.database),
        "the refusal names the database: {said}"
    );

    // Sessions and heartbeats go on; and a connection opened meanwhile is snapshotted.
    redis_client(&mut lab);
    std::thread::sleep(Duration::from_secs(4));
    // Each replica still holds the sessions it held, and hears their heartbeats. (What the
    // others hold it learns through the database, which is down.)
    for (i, before) in live_before.iter().enumerate() {
        let now = lab.sessions(i);
        let held = |s: &[((String, Value), u64)]| -> Vec<(String, Value)> {
            s.iter().map(|(held, _)| held.clone()).collect()
        };
        assert_eq!(
            held(&now),
            held(before),
            "{}: every agent still connected, on the session it had",
            lab.name(i)
        );
        for (((id, _), seen), (_, seen_before)) in now.iter().zip(before) {
            assert!(
                seen > seen_before,
                "{id}'s heartbeats go on on {}",
                lab.name(i)
            );
        }
    }
    // And every replica still answers for the whole fleet, as it last read it.
    for i in 0..2 {
        assert_eq!(
            connected(&lab, i),
            fleet,
            "{} during the outage",
            lab.name(i)
        );
    }
    let down_for = stopped.elapsed();

    lab.pg.resume();
    let resumed = Instant::now();
    for i in 0..2 {
        wait_for(
            &format!("{}'s /readyz back to 200", lab.name(i)),
            Duration::from_secs(30),
            || matches!(lab.get(i, "/readyz"), Ok((200, _))).then_some(()),
        );
    }
    eprintln!(
        "database down for {down_for:?}; replicas ready again {:?} after it came back",
        resumed.elapsed()
    );
    // Ready means writes work again, at once.
    let out = lab.ctl(1, &["-o", "json", "token", "create", "--uses", "1"]);
    assert!(
        out.status.success(),
        "a token after the outage: {}",
        text(&out)
    );
    // The snapshot taken during the outage reaches the map, on both replicas.
    let expected = BTreeSet::from([REDIS_EDGE.to_string()]);
    for i in 0..2 {
        wait_for(
            &format!("the edge opened during the outage on {}'s map", lab.name(i)),
            Duration::from_secs(30),
            || (lab.edges(i) == expected).then_some(()),
        );
    }
    eprintln!(
        "the outage's edge on both maps {:?} after the database came back",
        resumed.elapsed()
    );
    // The problem was logged once per replica, not per write.
    for r in lab.replicas.iter().flatten() {
        let log = r.proc.log_text();
        let n = log.matches("the database is unavailable").count();
        assert!(n <= 2, "{} logged the outage {n} times", r.proc.name);
        let warnings = log
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains("ERROR"))
            .count();
        eprintln!("{}: {warnings} WARN and ERROR lines in all", r.proc.name);
    }
}

/// `scripts/replicas`, run by the test on ports it chose, stopped on drop (also on failure).
struct ScriptSet {
    env: Vec<(&'static str, String)>,
}

impl ScriptSet {
    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/replicas"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run scripts/replicas");
        eprintln!("scripts/replicas {args:?}: {}\n{}", out.status, text(&out));
        out
    }
}

impl Drop for ScriptSet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.run(&["stop"]);
        }
    }
}

#[test]
fn scripts_replicas_starts_three_replicas_with_agents_and_stop_leaves_nothing() {
    let test = "scripts_replicas_starts_three_replicas_with_agents_and_stop_leaves_nothing";
    if !Postgres::available(test) {
        return;
    }
    let world = World::new();
    let dir = world.path().join("set");
    let listeners: Vec<_> = (0..6)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect();
    drop(listeners);
    let joined = |p: &[u16]| p.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
    let set = ScriptSet {
        env: vec![
            ("REPLICAS_DIR", dir.display().to_string()),
            ("REPLICAS_GRPC_PORTS", joined(&ports[..3])),
            ("REPLICAS_HTTP_PORTS", joined(&ports[3..])),
            (
                "TAPGRAPH_BIN_DIR",
                crate::harness::bin_dir().display().to_string(),
            ),
        ],
    };
    let out = set.run(&["start", "--agents", "2"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    for hint in [
        "tapgraphctl agent list",
        "scripts/replicas kill",
        "scripts/replicas stop",
    ] {
        assert!(
            said.contains(hint),
            "start tells how to watch and stop: {hint}"
        );
    }
    let pids: Vec<i32> = std::fs::read_dir(dir.join("pids"))
        .unwrap()
        .map(|f| {
            std::fs::read_to_string(f.unwrap().path())
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(pids.len(), 5, "three replicas and two agents");
    let pg_dir = PathBuf::from(std::fs::read_to_string(dir.join("pg.dir")).unwrap().trim());
    // Every replica answers for the whole set: both agents, connected, each on a replica.
    for port in &ports[3..] {
        let http: SocketAddr = ([127, 0, 0, 1], *port).into();
        wait_for(
            &format!("both agents connected, listed by the replica at {http}"),
            Duration::from_secs(30),
            || {
                let (status, body) = http_get(http, "/api/v1/agents").ok()?;
                let agents: Value = serde_json::from_str(&body).ok()?;
                let on: Vec<&str> = agents
                    .as_array()?
                    .iter()
                    .filter(|a| a["state"] == "connected")
                    .filter_map(|a| a["controller"].as_str())
                    .filter(|c| ["r1", "r2", "r3"].contains(c))
                    .collect();
                (status == 200 && on.len() == 2).then_some(())
            },
        );
    }
    let out = set.run(&["stop"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!dir.exists(), "stop removes the set's directory");
    assert!(!pg_dir.exists(), "and the database's");
    for pid in pids {
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        assert!(!alive, "process {pid} still runs after stop");
    }
}

/// Every edge of the map at `http` (inactive and control-plane edges too), with all it says but
/// whether it is active now, which depends on when it is read.
fn map_of(http: SocketAddr) -> BTreeSet<String> {
    let (status, body) = http_get(
        http,
        "/api/v1/graph/export?format=json&inactive=true&control=true",
    )
    .expect("GET /api/v1/graph/export");
    assert_eq!(status, 200, "{body}");
    let export: Value = serde_json::from_str(&body).unwrap();
    export["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let mut e = e.as_object().unwrap().clone();
            e.remove("active");
            serde_json::to_string(&e).unwrap()
        })
        .collect()
}
