//! Issue 23, part 3: the map sees through NAT. Real servers behind real iptables DNATs, in
//! network-namespace hosts, each with an agent:
//! - a ClusterIP as kube-proxy makes one: the client's own host translates `10.96.0.10:6379`
//!   to the redis host (a DNAT in its OUTPUT chain);
//! - a published port: the web host translates its `:8080` to nginx on its `:80` (a DNAT in
//!   its PREROUTING chain), so the client's socket names `:8080` and nginx's names `:80`.
//!
//! Either way the client's view and the backend's make one edge, on the backend's service, and
//! the edge keeps the address the client dialled as `via`.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::harness::{require_root, wait_for};
use crate::topology::{Lab, start_servers};

/// A keep-alive HTTP client of `argv[1]:argv[2]`: one connection, a request every 200 ms.
const HTTP_CLIENT: &str = "import http.client,sys,time\n\
c=http.client.HTTPConnection(sys.argv[1],int(sys.argv[2]))\n\
while True:\n    c.request('GET','/'); c.getresponse().read(); time.sleep(0.2)\n";

fn iptables(lab: &Lab, host: &str, rule: &[&str]) {
    let (ns, _, _) = lab.host(host);
    let out = ns
        .command("iptables")
        .args(["-t", "nat", "-A"])
        .args(rule)
        .output()
        .expect("iptables (scripts/install-deps installs it)");
    assert!(out.status.success(), "iptables {rule:?}: {out:?}");
}

#[test]
fn an_edge_through_nat_lands_on_its_backend_with_the_address_dialled() {
    if !require_root("an_edge_through_nat_lands_on_its_backend_with_the_address_dialled") {
        return;
    }
    let mut lab = Lab::new(
        &["client", "web", "cache"],
        &[
            ("TAPGRAPH_POLICY__SNAPSHOT_INTERVAL", "1s"),
            ("TAPGRAPH_POLICY__HEARTBEAT_INTERVAL", "1s"),
            ("TAPGRAPH_TOPOLOGY__TTL", "4s"),
        ],
    );
    start_servers(&mut lab, &["cache"], "web");
    let web_ip = lab.host("web").1.to_string();
    let cache_ip = lab.host("cache").1.to_string();
    let cache_port = format!("{cache_ip}:6379");
    iptables(
        &lab,
        "client",
        &[
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "10.96.0.10",
            "--dport",
            "6379",
            "-j",
            "DNAT",
            "--to-destination",
            &cache_port,
        ],
    );
    let web_port = format!("{web_ip}:80");
    iptables(
        &lab,
        "web",
        &[
            "PREROUTING",
            "-p",
            "tcp",
            "-d",
            &web_ip,
            "--dport",
            "8080",
            "-j",
            "DNAT",
            "--to-destination",
            &web_port,
        ],
    );
    lab.run(
        "client",
        "redis-cli",
        "redis-cli",
        &["-h", "10.96.0.10", "-r", "-1", "-i", "0.2", "ping"],
    );
    lab.run(
        "client",
        "http-client",
        "python3",
        &["-c", HTTP_CLIENT, &web_ip, "8080"],
    );
    for host in ["client", "web", "cache"] {
        lab.agent(host);
    }
    let expected: BTreeSet<String> = [
        "host:client -> svc:cache/tcp/6379 6379/tcp redis-cli via 10.96.0.10:6379".to_string(),
        format!("host:client -> svc:web/tcp/80 80/tcp python3 via {web_ip}:8080"),
    ]
    .into();
    let edges = || -> BTreeSet<String> {
        lab.ctl(&["graph"])
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                format!(
                    "{} -> {} {}/{} {} via {}",
                    e["from"].as_str().unwrap(),
                    e["to"].as_str().unwrap(),
                    e["port"],
                    e["protocol"].as_str().unwrap(),
                    e["process"].as_str().unwrap(),
                    e["via"].as_str().unwrap()
                )
            })
            .collect()
    };
    let got = wait_for(
        "one edge per connection, on its backend",
        Duration::from_secs(30),
        || {
            let got = edges();
            (got == expected).then_some(got)
        },
    );
    assert_eq!(got, expected);
    // The client's row alone names python3 and the front; the backend's alone would be an edge
    // with no process. No edge is left towards the front or the virtual address.
    // The text table names the address dialled.
    let out = lab
        .hub
        .command(crate::harness::bin("tapgraphctl"))
        .arg("--config")
        .arg(&lab.ctl)
        .arg("graph")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains("VIA") && out.contains("10.96.0.10:6379"),
        "{out}"
    );
}
