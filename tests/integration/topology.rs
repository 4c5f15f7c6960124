//! Issue 5: the dependency map from real servers and clients in network-namespace hosts, with
//! agents on some hosts and not on others. Agents the test plays itself over gRPC, and the map
//! they make, are in `topology_snapshots.rs`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{Netns, Proc, World, bin, http_get, require_root, veth, wait_for};
// Many test files reach the raw agents by this path.
pub(crate) use crate::topology_snapshots::{Sender, raw_agent_as, raw_channel};

/// A router namespace `hub` (the controller) with one /30 link per host; hosts route through it.
/// Fields drop in order: processes first (their logs are printed on failure), then the hosts and the
/// hub, then the directory holding the logs.
pub(crate) struct Lab {
    pub(crate) procs: Vec<Proc>,
    pub(crate) hosts: Vec<(String, Netns, String)>,
    pub(crate) hub: Netns,
    pub(crate) ctl: std::path::PathBuf,
    pub(crate) world: World,
}

pub(crate) const HTTP: &str = "127.0.0.1:7080";

impl Lab {
    pub(crate) fn new(names: &[&str], env: &[(&str, &str)]) -> Lab {
        let world = World::new();
        let hub = Netns::new("hub");
        let out = hub
            .command("sysctl")
            .args(["-qw", "net.ipv4.ip_forward=1"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let mut hosts = Vec::new();
        for (i, name) in names.iter().enumerate() {
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
            hosts.push((name.to_string(), ns, format!("198.18.{net}.2")));
        }
        // The controller's namespace knows the agentless host by name, for reverse DNS.
        hub.hosts_file("127.0.0.1 localhost\n198.18.5.2 partner-redis.example\n");
        let mut cmd =
            hub.wrap(world.controller_cmd("0.0.0.0:7443".parse().unwrap(), HTTP.parse().unwrap()));
        cmd.envs(env.iter().copied());
        let controller = Proc::spawn("controller", cmd, world.path());
        let mut lab = Lab {
            world,
            hub,
            hosts,
            procs: vec![controller],
            ctl: Default::default(),
        };
        lab.wait_ready();
        lab.ctl = lab
            .world
            .operator("admin", "127.0.0.1:7443".parse().unwrap());
        lab
    }

    pub(crate) fn wait_ready(&self) {
        let http: SocketAddr = HTTP.parse().unwrap();
        wait_for("controller ready", Duration::from_secs(20), || {
            self.hub
                .run(|| matches!(http_get(http, "/readyz"), Ok((200, _))).then_some(()))
        });
    }

    pub(crate) fn host(&self, name: &str) -> (&Netns, &str, usize) {
        let i = self.hosts.iter().position(|(n, _, _)| n == name).unwrap();
        (&self.hosts[i].1, &self.hosts[i].2, i + 1)
    }

    /// Runs `program args` inside host `name`, kept running until the lab is dropped.
    pub(crate) fn run(
        &mut self,
        name: &str,
        label: &str,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
    ) {
        let (ns, _, _) = self.host(name);
        let mut cmd = ns.command(program);
        cmd.args(args);
        let p = Proc::spawn(label, cmd, self.world.path());
        self.procs.push(p);
    }

    pub(crate) fn agent(&mut self, name: &str) {
        self.agent_with(name, &[]);
    }

    pub(crate) fn agent_with(&mut self, name: &str, args: &[&str]) {
        self.world.issue_agent(name);
        let (ns, _, net) = self.host(name);
        let mut cmd = self
            .world
            .agent_cmd(name, format!("198.18.{net}.1:7443").parse().unwrap());
        cmd.args(["--server-name", "localhost"]).args(args);
        let cmd = ns.wrap(cmd);
        let p = Proc::spawn(&format!("agent-{name}"), cmd, self.world.path());
        self.procs.push(p);
    }

    /// tapgraphctl inside the hub, `-o json`.
    pub(crate) fn ctl(&self, args: &[&str]) -> Value {
        let out = self
            .hub
            .command(bin("tapgraphctl"))
            .arg("--config")
            .arg(&self.ctl)
            .args(["-o", "json"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tapgraphctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The map's CONNECTS_TO edges as `from -> to port/proto process`.
    pub(crate) fn edges(&self, extra: &[&str]) -> BTreeSet<String> {
        let mut args = vec!["graph"];
        args.extend_from_slice(extra);
        self.ctl(&args)
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
}

fn nginx_conf(dir: &Path) -> std::path::PathBuf {
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log off; keepalive_timeout 300s; keepalive_requests 100000;\n\
               client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
               server {{ listen 80; location / {{ return 200 \"ok\\n\"; }} }} }}\n",
            d = dir.display()
        ),
    )
    .unwrap();
    conf
}

/// redis on each of `redis_hosts` (port 6379, no persistence) and nginx on `nginx_host` (port 80),
/// given half a second to listen.
pub(crate) fn start_servers(lab: &mut Lab, redis_hosts: &[&str], nginx_host: &str) {
    let redis = [
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
    ];
    for host in redis_hosts {
        lab.run(host, &format!("redis-{host}"), "redis-server", &redis);
    }
    let conf = nginx_conf(lab.world.path());
    let nginx_log = lab.world.path().join("nginx-startup.log");
    lab.run(
        nginx_host,
        "nginx",
        "nginx",
        &[
            "-c",
            conf.to_str().unwrap(),
            "-e",
            nginx_log.to_str().unwrap(),
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
}

/// A keep-alive HTTP client: one connection, a request every 200 ms.
pub(crate) const HTTP_CLIENT: &str = "import http.client,sys,time\n\
c=http.client.HTTPConnection(sys.argv[1],80)\n\
while True:\n    c.request('GET','/'); c.getresponse().read(); time.sleep(0.2)\n";

#[test]
fn the_map_shows_exactly_who_connects_to_whom() {
    if !require_root("the_map_shows_exactly_who_connects_to_whom") {
        return;
    }
    let mut lab = Lab::new(
        &["db", "front", "app1", "app2", "ext"],
        &[
            ("TAPGRAPH_POLICY__SNAPSHOT_INTERVAL", "1s"),
            ("TAPGRAPH_POLICY__HEARTBEAT_INTERVAL", "1s"),
            ("TAPGRAPH_TOPOLOGY__TTL", "4s"),
            // The agentless host's network is a partner's: name it.
            (
                "TAPGRAPH_TOPOLOGY__CIDR_LABELS",
                "198.18.5.0/30 owner=partner,zone=dmz",
            ),
            ("TAPGRAPH_TOPOLOGY__REVERSE_DNS", "true"),
        ],
    );
    start_servers(&mut lab, &["db", "ext"], "front");
    // Real clients holding connections: redis-cli repeating PING on one connection, a keep-alive
    // HTTP client.
    let ping = ["-r", "-1", "-i", "0.2", "ping"];
    let (_, db_ip, _) = lab.host("db");
    let (_, front_ip, _) = lab.host("front");
    let (_, ext_ip, _) = lab.host("ext");
    let (db_ip, front_ip, ext_ip) = (db_ip.to_string(), front_ip.to_string(), ext_ip.to_string());
    for app in ["app1", "app2"] {
        let mut args = vec!["-h", db_ip.as_str()];
        args.extend_from_slice(&ping);
        lab.run(app, &format!("redis-cli-{app}"), "redis-cli", &args);
    }
    lab.run(
        "app1",
        "http-client",
        "python3",
        &["-c", HTTP_CLIENT, front_ip.as_str()],
    );
    let mut args = vec!["-h", ext_ip.as_str()];
    args.extend_from_slice(&ping);
    lab.run("app1", "redis-cli-ext", "redis-cli", &args);
    // Agents on db, front, app1 and app2; none on ext.
    for host in ["db", "front", "app1", "app2"] {
        lab.agent(host);
    }
    let expected: BTreeSet<String> = [
        "host:app1 -> svc:db/tcp/6379 6379/tcp redis-cli".to_string(),
        "host:app2 -> svc:db/tcp/6379 6379/tcp redis-cli".to_string(),
        "host:app1 -> svc:front/tcp/80 80/tcp python3".to_string(),
        format!("host:app1 -> addr:{ext_ip} 6379/tcp redis-cli"),
    ]
    .into();
    let got = wait_for("the expected edge set", Duration::from_secs(30), || {
        let got = lab.edges(&[]);
        (got == expected).then_some(got)
    });
    assert_eq!(got, expected);

    // A connection opened and closed between two snapshots (one curl, well under the 1 s
    // interval) is still on the map: the agents' SYN-ACK capture caught it.
    let (app2, _, _) = lab.host("app2");
    let out = app2
        .command("curl")
        .args(["-fsS", "--max-time", "5", &format!("http://{front_ip}/")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let short = wait_for("the short-lived edge", Duration::from_secs(15), || {
        lab.edges(&[])
            .into_iter()
            .find(|e| e.starts_with("host:app2 -> svc:front/tcp/80 80/tcp"))
    });
    eprintln!("short-lived connection on the map: {short}");
    let agents: Value = {
        let http: SocketAddr = HTTP.parse().unwrap();
        let (_, body) = lab.hub.run(|| http_get(http, "/api/v1/agents")).unwrap();
        serde_json::from_str(&body).unwrap()
    };
    let connected = agents
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "connected")
        .count();
    assert_eq!(
        connected, 4,
        "agents on db, front, app1 and app2; none on ext"
    );

    // Both ends reported make one edge; the server side names its process on the service node.
    let export = lab.ctl(&["graph", "export", "--format", "json"]);
    let node = |id: &str| {
        export["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no node {id}"))
    };
    assert_eq!(
        node("svc:db/tcp/6379")["properties"]["process"],
        "redis-server"
    );
    assert_eq!(node("svc:front/tcp/80")["properties"]["process"], "nginx");
    let partner = node(&format!("addr:{ext_ip}"));
    assert_eq!(partner["kind"], "address");
    assert_eq!(
        partner["properties"]["dns"], "partner-redis.example",
        "named by reverse DNS"
    );
    assert_eq!(
        partner["properties"]["label.owner"], "partner",
        "and by a CIDR rule"
    );
    let edges: Vec<&Value> = export["edges"].as_array().unwrap().iter().collect();
    assert!(edges.iter().any(|e| e["kind"] == "HAS_ADDRESS"
        && e["from"] == "host:db"
        && e["to"] == format!("addr:{db_ip}")));
    assert!(edges.iter().any(|e| e["kind"] == "LISTENS"
        && e["from"] == "host:front"
        && e["to"] == "svc:front/tcp/80"));

    // The controller is a hub of control-plane edges, hidden unless asked for.
    let with_control = lab.edges(&["--include-control"]);
    assert!(
        with_control.len() >= expected.len() + 4,
        "{with_control:#?}"
    );

    // Queries.
    let shown = lab.ctl(&["host", "show", "db"]);
    assert_eq!(shown["inbound"].as_array().unwrap().len(), 2, "{shown}");
    let orphans = lab.ctl(&["graph", "orphans"]);
    assert_eq!(
        orphans,
        serde_json::json!([]),
        "every agent host talks to someone"
    );
    let clusters = lab.ctl(&["graph", "clusters"]);
    assert_eq!(
        clusters,
        serde_json::json!([["app1", "app2", "db", "front"]])
    );
    let port_filtered = lab.edges(&["--port", "6379"]);
    assert_eq!(port_filtered.len(), 3, "{port_filtered:#?}");
    // CIDR label rules name external endpoints, and queries can use them.
    let partner = lab.edges(&["--label", "owner=partner"]);
    assert_eq!(
        partner,
        BTreeSet::from([format!("host:app1 -> addr:{ext_ip} 6379/tcp redis-cli")])
    );

    // A closed connection's edge turns inactive after the TTL.
    let app2_cli = lab
        .procs
        .iter()
        .position(|p| p.name == "redis-cli-app2")
        .unwrap();
    lab.procs.remove(app2_cli);
    let gone = "host:app2 -> svc:db/tcp/6379 6379/tcp redis-cli".to_string();
    wait_for(
        "app2's edge to turn inactive",
        Duration::from_secs(30),
        || (!lab.edges(&[]).contains(&gone)).then_some(()),
    );
    assert!(
        lab.edges(&["--include-inactive"]).contains(&gone),
        "kept until the retention passes"
    );
    let orphans = lab.ctl(&["graph", "orphans"]);
    assert_eq!(
        orphans,
        serde_json::json!([]),
        "app2 still connected within the retention window"
    );

    // The map survives a controller restart: before any agent reports again, it is all there,
    // each edge seen last when it was. (A refreshed last_seen is not written while an agent
    // still reports the edge: it comes back from that agent's stored table.)
    let history = |lab: &Lab| -> BTreeSet<String> {
        lab.ctl(&["graph", "--include-inactive"])
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                format!(
                    "{} -> {} {} sockets {} first {} last {}",
                    e["from"], e["to"], e["port"], e["sockets"], e["first_seen"], e["last_seen"]
                )
            })
            .collect()
    };
    // Agents are frozen first so that nothing reports again: what the new controller shows, it
    // loaded. A snapshot already sent may still be applied: the map is read once it reads the
    // same twice in a row (the controller syncs the map to disk as it stops).
    for p in lab.procs.iter().filter(|p| p.name.starts_with("agent-")) {
        p.signal(nix::sys::signal::Signal::SIGSTOP);
    }
    let mut last = history(&lab);
    let seen_before = wait_for("the map to settle", Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(500));
        let now = history(&lab);
        let settled = now == last;
        last = now;
        settled.then(|| last.clone())
    });
    let before = lab.edges(&["--include-inactive"]);
    let controller = lab.procs.remove(0);
    drop(controller);
    let mut cmd = lab.hub.wrap(
        lab.world
            .controller_cmd("0.0.0.0:7443".parse().unwrap(), HTTP.parse().unwrap()),
    );
    cmd.env("TAPGRAPH_TOPOLOGY__TTL", "1h");
    lab.procs
        .insert(0, Proc::spawn("controller-2", cmd, lab.world.path()));
    lab.wait_ready();
    assert_eq!(lab.edges(&["--include-inactive"]), before);
    assert_eq!(history(&lab), seen_before);
    for p in lab.procs.iter().filter(|p| p.name.starts_with("agent-")) {
        p.signal(nix::sys::signal::Signal::SIGCONT);
    }
}

/// Snapshot scope: an agent with `--scope all` reports the sockets of every network namespace on
/// its host, tagged with the namespace; one with the default scope `own` never does, though it
/// sees the same processes.
#[test]
fn scope_all_covers_every_namespace_and_scope_own_only_its_own() {
    if !require_root("scope_all_covers_every_namespace_and_scope_own_only_its_own") {
        return;
    }
    let mut lab = Lab::new(
        &["node", "vm"],
        &[
            ("TAPGRAPH_POLICY__SNAPSHOT_INTERVAL", "1s"),
            ("TAPGRAPH_POLICY__HEARTBEAT_INTERVAL", "1s"),
        ],
    );
    // A "pod": a namespace of its own with a redis server and client on its loopback.
    let pod = Netns::new("pod");
    let mut server = pod.command("redis-server");
    server.args([
        "--port",
        "6380",
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]);
    lab.procs
        .push(Proc::spawn("redis-pod", server, lab.world.path()));
    std::thread::sleep(Duration::from_millis(300));
    let mut client = pod.command("redis-cli");
    client.args(["-p", "6380", "-r", "-1", "-i", "0.2", "ping"]);
    lab.procs
        .push(Proc::spawn("redis-cli-pod", client, lab.world.path()));
    lab.agent_with("node", &["--scope", "all"]);
    lab.agent("vm");

    // Through the real pipeline: the pod's loopback connection is the node host's own edge.
    // (The process may carry a container tag, should the test itself run in a container.)
    let pod_edge = "host:node -> svc:node/tcp/6380 6380/tcp redis-cli";
    wait_for(
        "the pod's edge on the node",
        Duration::from_secs(30),
        || {
            lab.edges(&[])
                .iter()
                .any(|e| e.starts_with(pod_edge))
                .then_some(())
        },
    );
    // The vm agent, in scope own, reported nothing of it, and never will: once it has reported
    // (its link to the controller), nothing of the pod's follows.
    wait_for("the vm agent's report", Duration::from_secs(30), || {
        lab.edges(&["--include-control"])
            .iter()
            .any(|e| e.starts_with("host:vm "))
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let vm: Vec<String> = lab
        .edges(&["--include-control", "--include-inactive"])
        .into_iter()
        .filter(|e| e.starts_with("host:vm ") && e.contains("6380"))
        .collect();
    assert!(vm.is_empty(), "scope own leaked another namespace: {vm:?}");

    // The rows carry the namespace: the agent's own table, read in the vm host both ways.
    let (vm_ns, _, _) = lab.host("vm");
    let snapshot = |scope: &str| -> Vec<Value> {
        let out = vm_ns
            .command(bin("tapgraph-agent"))
            .args(["snapshot", "--json", "--scope", scope])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|row: &Value| row["port"] == 6380)
            .collect()
    };
    assert_eq!(snapshot("own"), Vec::<Value>::new());
    let rows = snapshot("all");
    let kinds: BTreeSet<String> = rows
        .iter()
        .map(|r| {
            assert_eq!(r["netns"], pod.name.as_str(), "{r}");
            match r["direction"].as_str() {
                Some(d) => format!("{d} {}", r["process"].as_str().unwrap()),
                None => format!("Listen {}", r["process"].as_str().unwrap()),
            }
        })
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "Listen redis-server".to_string(),
            "Client redis-cli".to_string(),
            "Server redis-server".to_string(),
        ])
    );
}
