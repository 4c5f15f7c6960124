//! Issue 19: the README's queries, run as written on the mirrored map, answer what `tapgraphctl`
//! answers on the same map, and its schema table lists everything the sink writes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tapgraph::proto::{self, agent_message::Msg};

use crate::harness::{World, ctl_json};
use crate::neo4j::{
    Bolt, answer, control, entry, listener, now_ms, rfc3339_ms, start, text, texts,
};
use crate::topology::raw_agent_as;

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

/// The README's Cypher queries, as written there (comments left out).
pub(crate) fn readme_queries() -> Vec<String> {
    let readme = readme();
    let block = readme
        .split("```cypher\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a cypher block in the README");
    block
        .split(";\n")
        .map(|q| {
            q.lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .filter(|q| !q.trim().is_empty())
        .collect()
}

/// The README's schema table: element (as written) and the properties it lists.
fn readme_schema() -> Vec<(String, BTreeSet<String>)> {
    let readme = readme();
    let table = readme
        .split("| element | properties |\n|---|---|\n")
        .nth(1)
        .and_then(|t| t.split("\n\n").next())
        .expect("the schema table in the README");
    table
        .lines()
        .map(|row| {
            let cells: Vec<&str> = row.trim_matches('|').split(" | ").collect();
            let ticked = |cell: &str| -> Vec<String> {
                cell.split('`')
                    .skip(1)
                    .step_by(2)
                    .map(String::from)
                    .collect()
            };
            let element = ticked(cells[0]).concat();
            (element, ticked(cells[1]).into_iter().collect())
        })
        .collect()
}

/// `(:Host)-[:CONNECTS_TO]->(:Service or :Address)` as (from, type, to) triples.
fn triples(element: &str) -> Vec<(String, String, String)> {
    let Some((from, rest)) = element.split_once(")-[:") else {
        return Vec::new();
    };
    let (kind, to) = rest.split_once("]->(").unwrap();
    to.trim_end_matches(')')
        .split(" or ")
        .map(|t| {
            (
                from.trim_start_matches("(:").to_string(),
                kind.to_string(),
                t.trim_start_matches(':').to_string(),
            )
        })
        .collect()
}

/// What `tapgraphctl` answers to each README query, in the comparable form of [`readme_answers`].
fn ctl_answers(ctl: &Path) -> Value {
    let all = ctl_json(
        ctl,
        &[
            "graph",
            "export",
            "--format",
            "json",
            "--include-control",
            "--include-inactive",
        ],
    );
    let nodes: BTreeMap<String, Value> = all["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (text(&n["id"]), n.clone()))
        .collect();
    let name = |id: &Value| text(&nodes[&text(id)]["name"]);
    let host_of = |id: &Value| {
        text(id)
            .strip_prefix("svc:")
            .map(|s| s.split('/').next().unwrap().to_string())
    };
    let is_host = |id: &Value| text(id).starts_with("host:");
    let owned: BTreeSet<String> = all["edges"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "HAS_ADDRESS")
        .map(|e| text(&e["to"]))
        .collect();
    let edges = ctl_json(ctl, &["graph"]);
    let edges = edges.as_array().unwrap();

    // 1. Each host and the hosts whose services it uses.
    let mut peers: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for e in edges.iter().filter(|e| is_host(&e["from"])) {
        if let Some(h) = host_of(&e["to"]) {
            peers.entry(name(&e["from"])).or_default().insert(h);
        }
    }
    // 2. What web-1 depends on, and what those depend on.
    let outbound = |host: &str| -> Vec<Value> {
        ctl_json(ctl, &["host", "show", host])["outbound"]
            .as_array()
            .unwrap()
            .clone()
    };
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for e in outbound("web-1") {
        let theirs = match host_of(&e["to"]) {
            Some(h) => outbound(&h).iter().map(|e| name(&e["to"])).collect(),
            None => BTreeSet::new(),
        };
        deps.entry(name(&e["to"])).or_default().extend(theirs);
    }
    // 3. Orphans.
    let orphans = texts(&ctl_json(ctl, &["graph", "orphans"]));
    // 4. External endpoints: ports and users.
    let mut external: BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)> = BTreeMap::new();
    for e in edges.iter().filter(|e| is_host(&e["from"])) {
        let to = text(&e["to"]);
        if to.starts_with("addr:") && !owned.contains(&to) {
            let entry = external.entry(name(&e["to"])).or_default();
            entry.0.insert(text(&e["port"]));
            entry.1.insert(text(&e["from"]));
        }
    }
    // 5. Who serves 5432: server, process, clients.
    let mut serving: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for e in ctl_json(ctl, &["graph", "--port", "5432"])
        .as_array()
        .unwrap()
    {
        if let (Some(h), true) = (host_of(&e["to"]), is_host(&e["from"])) {
            let process = text(&nodes[&text(&e["to"])]["properties"]["process"]);
            let entry = serving.entry(h).or_insert((process, BTreeSet::new()));
            entry.1.insert(text(&e["from"]));
        }
    }
    // 6. Seen in the last 5 minutes, by LAST SEEN.
    let since = now_ms() - 5 * 60 * 1000;
    let recent: BTreeSet<String> = ctl_json(ctl, &["graph", "--include-inactive"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| rfc3339_ms(e["last_seen"].as_str().unwrap()) >= since)
        .map(|e| {
            format!(
                "{} -> {} :{} active={}",
                name(&e["from"]),
                name(&e["to"]),
                e["port"],
                e["active"]
            )
        })
        .collect();
    serde_json::json!([
        serde_json::json!(peers),
        serde_json::json!(deps),
        serde_json::json!(orphans),
        serde_json::json!(
            external
                .into_iter()
                .map(|(k, (ports, users))| (k, (ports, users.len())))
                .collect::<BTreeMap<_, _>>()
        ),
        serde_json::json!(
            serving
                .into_iter()
                .map(|(k, (process, clients))| (k, (process, clients.len())))
                .collect::<BTreeMap<_, _>>()
        ),
        serde_json::json!(recent),
    ])
}

/// The README's queries, run as written, their answers in the form of [`ctl_answers`].
async fn readme_answers(bolt: &Bolt) -> Value {
    let queries = readme_queries();
    assert_eq!(queries.len(), 6, "{queries:#?}");
    let graph = bolt.graph().await;
    let mut rows = Vec::new();
    for q in &queries {
        rows.push(answer(&graph, q).await);
    }
    let peers: BTreeMap<String, BTreeSet<String>> = rows[0]
        .iter()
        .map(|r| {
            assert_eq!(r["talks_to"], r["peers"].as_array().unwrap().len(), "{r}");
            (text(&r["host"]), texts(&r["peers"]))
        })
        .collect();
    let deps: BTreeMap<String, BTreeSet<String>> = rows[1]
        .iter()
        .map(|r| (text(&r["dependency"]), texts(&r["its_dependencies"])))
        .collect();
    let orphans: BTreeSet<String> = rows[2].iter().map(|r| text(&r["orphan"])).collect();
    let external: BTreeMap<String, (BTreeSet<String>, u64)> = rows[3]
        .iter()
        .map(|r| {
            (
                text(&r["endpoint"]),
                (texts(&r["ports"]), r["users"].as_u64().unwrap()),
            )
        })
        .collect();
    // Services nobody uses are listed with 0 clients; tapgraphctl lists edges, so shows none.
    let serving: BTreeMap<String, (String, u64)> = rows[4]
        .iter()
        .filter(|r| r["clients"] != 0)
        .map(|r| {
            (
                text(&r["server"]),
                (text(&r["process"]), r["clients"].as_u64().unwrap()),
            )
        })
        .collect();
    let recent: BTreeSet<String> = rows[5]
        .iter()
        .map(|r| {
            format!(
                "{} -> {} :{} active={}",
                text(&r["client"]),
                text(&r["server"]),
                r["port"],
                r["active"]
            )
        })
        .collect();
    serde_json::json!([
        serde_json::json!(peers),
        serde_json::json!(deps),
        serde_json::json!(orphans),
        serde_json::json!(external),
        serde_json::json!(serving),
        serde_json::json!(recent),
    ])
}

/// Every relationship and node the database holds, checked against the README's schema table:
/// each (start label, type, end label) is a row of it, and each property is listed in its row.
async fn the_schema_table_lists(bolt: &Bolt) {
    let schema = readme_schema();
    let graph = bolt.graph().await;
    let listed = |element: &str, key: &str| {
        schema.iter().any(|(e, props)| {
            e == element
                && (props.contains(key)
                    || key
                        .strip_prefix("label.")
                        .is_some_and(|_| props.contains("label.KEY")))
        })
    };
    let rels = answer(
        &graph,
        "MATCH (a)-[r]->(b) RETURN DISTINCT labels(a) AS a, type(r) AS t, labels(b) AS b, keys(r) AS k",
    )
    .await;
    for r in &rels {
        let triple = (text(&r["a"][0]), text(&r["t"]), text(&r["b"][0]));
        let row = schema
            .iter()
            .find(|(e, _)| triples(e).contains(&triple))
            .unwrap_or_else(|| {
                panic!("{triple:?} is written but not in the README's schema table")
            });
        for k in texts(&r["k"]) {
            assert!(
                listed(&row.0, &k),
                "{triple:?}.{k} is written but not in the README's schema table"
            );
        }
    }
    let seen: BTreeSet<String> = rels.iter().map(|r| text(&r["t"])).collect();
    assert!(
        seen.len() == 3,
        "the map has every relationship type: {rels:#?}"
    );
    let nodes = answer(
        &graph,
        "MATCH (n) RETURN DISTINCT labels(n) AS l, keys(n) AS k",
    )
    .await;
    for n in &nodes {
        let element = format!("(:{})", text(&n["l"][0]));
        for k in texts(&n["k"]) {
            assert!(
                listed(&element, &k),
                "{element}.{k} is written but not in the README's schema table"
            );
        }
    }
}

/// Issue 19: the README's queries, run as written on the mirrored map, answer what tapgraphctl
/// answers: the agents' links to the controller left out, inactive edges counted as
/// `tapgraphctl graph` counts them, a client without an agent (an Address) counted as a
/// connection of the server's host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_queries_answer_what_tapgraphctl_answers() {
    let world = World::new();
    let bolt = Bolt::start(world.path());
    // A short TTL, so that an edge turns inactive within the test; the others stay active as
    // long as their agents report.
    let controller = start(&world, &bolt, &[("TAPGRAPH_TOPOLOGY__TTL", "5s")]);
    let ctl = world.operator("admin", controller.grpc);
    use proto::Direction::{Client, Server};
    let maps: Vec<(
        &str,
        &str,
        Vec<proto::ListeningService>,
        Vec<proto::ConnectionEntry>,
    )> = vec![
        (
            "web-1",
            "10.9.0.1",
            vec![],
            vec![
                entry(Client, "10.9.0.1", "10.9.0.2", 8080, "nginx"),
                entry(Client, "10.9.0.1", "203.0.113.9", 443, "curl"),
                control("10.9.0.1"),
            ],
        ),
        (
            "app-1",
            "10.9.0.2",
            vec![listener("0.0.0.0", 8080, "java")],
            vec![
                entry(Server, "10.9.0.2", "10.9.0.1", 8080, "java"),
                entry(Server, "10.9.0.2", "192.0.2.50", 8080, "java"),
                entry(Client, "10.9.0.2", "10.9.0.3", 5432, "java"),
                entry(Client, "10.9.0.2", "203.0.113.9", 443, "java"),
                control("10.9.0.2"),
            ],
        ),
        (
            "db-1",
            "10.9.0.3",
            vec![listener("0.0.0.0", 5432, "postgres")],
            vec![
                entry(Server, "10.9.0.3", "10.9.0.2", 5432, "postgres"),
                control("10.9.0.3"),
            ],
        ),
        // Only its link to the controller: an orphan.
        ("lonely-1", "10.9.0.4", vec![], vec![control("10.9.0.4")]),
        // Only a client without an agent: not an orphan.
        (
            "batch-1",
            "10.9.0.5",
            vec![listener("0.0.0.0", 9000, "worker")],
            vec![
                entry(Server, "10.9.0.5", "192.0.2.60", 9000, "worker"),
                control("10.9.0.5"),
            ],
        ),
        // One connection, which ends: inactive, but within the retention window.
        (
            "cron-1",
            "10.9.0.6",
            vec![],
            vec![
                entry(Client, "10.9.0.6", "198.51.100.7", 25, "mailer"),
                control("10.9.0.6"),
            ],
        ),
    ];
    let mut agents = Vec::new();
    for (id, address, listeners, entries) in maps {
        let (send, inbound) = raw_agent_as(&world, &controller, id, id).await;
        send(Msg::Snapshot(proto::ConnectionSnapshot {
            sequence: 1,
            full: true,
            addresses: vec![address.into()],
            listeners,
            entries,
            ..Default::default()
        }))
        .await;
        agents.push((id, send, inbound));
    }
    // The mail connection ends: its last row removed.
    agents[5].1(Msg::Snapshot(proto::ConnectionSnapshot {
        sequence: 2,
        full: false,
        base_sequence: 1,
        removed: vec![entry(Client, "10.9.0.6", "198.51.100.7", 25, "mailer")],
        ..Default::default()
    }))
    .await;
    let mut sequences = vec![1u64; agents.len()];
    sequences[5] = 2;

    // The agents keep reporting (so their edges stay active) until the mail edge turned
    // inactive and the database caught up; then both sides answer the same.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let (want, have) = loop {
        for ((_, send, _), sequence) in agents.iter().zip(sequences.iter_mut()) {
            *sequence += 1;
            send(Msg::Snapshot(proto::ConnectionSnapshot {
                sequence: *sequence,
                full: false,
                base_sequence: *sequence - 1,
                ..Default::default()
            }))
            .await;
        }
        let mail_inactive = ctl_json(&ctl, &["graph", "--include-inactive", "--port", "25"])
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["active"] == false);
        let want = ctl_answers(&ctl);
        let have = readme_answers(&bolt).await;
        if mail_inactive && want == have {
            break (want, have);
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "the README's queries answer otherwise than tapgraphctl (mail edge inactive: \
                 {mail_inactive})\ntapgraphctl: {want:#}\nREADME: {have:#}"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    // The answers are the map's, not empty ones that agree.
    assert!(
        want[1]["app-1:8080/tcp"]
            .as_array()
            .is_some_and(|d| d.iter().any(|x| x == "db-1:5432/tcp")),
        "{want:#}"
    );
    assert!(want[1].get("10.9.0.100").is_none(), "{want:#}");
    assert_eq!(want[2], serde_json::json!(["lonely-1"]), "{want:#}");
    assert_eq!(
        want[3],
        serde_json::json!({"203.0.113.9": [["443"], 2]}),
        "{want:#}"
    );
    assert_eq!(
        want[4],
        serde_json::json!({"db-1": ["postgres", 1]}),
        "{want:#}"
    );
    assert!(
        have[5]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "cron-1 -> 198.51.100.7 :25 active=false"),
        "{have:#}"
    );
    assert!(
        have[5]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "192.0.2.60 -> batch-1:9000/tcp :9000 active=true"),
        "{have:#}"
    );
    the_schema_table_lists(&bolt).await;
    drop(agents);
}
