//! Issue 19, the first look: `scripts/demo` against a controller on loopback (as
//! `scripts/quickstart` runs it) draws the map a newcomer should see, the console shows it (with
//! no stray "null" in an external endpoint's panel), and `scripts/demo down` leaves no
//! namespace, process or agent state behind, however often it runs. The console's screenshots go
//! to target/test-artifacts/demo/; docs/demo-map.png is one of them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::harness::{
    Controller, Proc, World, bin_dir, ctl_json, http_request, require_root, wait_for,
};

/// The partner's server, which has no agent: the demo's external endpoint.
const PARTNER: &str = "198.19.0.2";
const HOSTS: [&str; 5] = ["cache", "client", "db", "orphan", "web"];

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/demo")
}

/// One demo, torn down on drop (also when the test fails).
struct Demo {
    dir: PathBuf,
    prefix: String,
    env: Vec<(&'static str, String)>,
}

impl Demo {
    fn new(world: &World, controller: &Controller, ctl: &Path) -> Demo {
        let dir = world.path().join("demo");
        let prefix = format!("tgt-{}-demo", std::process::id());
        let env = vec![
            ("GRPC_PORT", controller.grpc.port().to_string()),
            ("HTTP_PORT", controller.http.port().to_string()),
            ("TAPGRAPHCTL_CONFIG", ctl.display().to_string()),
            ("DEMO_DIR", dir.display().to_string()),
            ("DEMO_PREFIX", prefix.clone()),
            ("TAPGRAPH_BIN_DIR", bin_dir().display().to_string()),
        ];
        Demo { dir, prefix, env }
    }

    fn run(&self, action: &str) -> Output {
        let out = Command::new(script())
            .arg(action)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run scripts/demo");
        eprintln!(
            "scripts/demo {action}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn namespaces(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&format!("{}-", self.prefix)))
            .map(str::to_string)
            .collect()
    }

    /// Every process the demo started and every process inside its namespaces.
    fn processes(&self) -> BTreeSet<i32> {
        let mut pids: BTreeSet<i32> = std::fs::read_to_string(self.dir.join("pids"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        for ns in self.namespaces() {
            let out = Command::new("ip")
                .args(["netns", "pids", &ns])
                .output()
                .expect("ip netns pids");
            pids.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|l| l.trim().parse::<i32>().ok()),
            );
        }
        pids
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if !self.namespaces().is_empty() || self.dir.exists() {
            self.run("down");
        }
    }
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// The map's connections as `from -> to port`, as `tapgraphctl graph` shows them by default.
fn edges(ctl: &Path) -> BTreeSet<String> {
    ctl_json(ctl, &["graph"])
        .as_array()
        .expect("edges")
        .iter()
        .map(|e| {
            format!(
                "{} -> {} {}",
                e["from"].as_str().unwrap(),
                e["to"].as_str().unwrap(),
                e["port"]
            )
        })
        .collect()
}

#[test]
fn the_demo_draws_a_map_of_real_servers_and_clients_and_leaves_nothing_behind() {
    if !require_root("the_demo_draws_a_map_of_real_servers_and_clients_and_leaves_nothing_behind") {
        return;
    }
    let world = World::new();
    // As scripts/quickstart starts it, on loopback, with the console asking for a token so that
    // the demo has to print one.
    let controller = Controller::start(
        &world,
        &[
            ("TAPGRAPH_POLICY__SNAPSHOT_INTERVAL", "1s"),
            ("TAPGRAPH_POLICY__HEARTBEAT_INTERVAL", "1s"),
            ("TAPGRAPH_CONSOLE__AUTH", "token"),
        ],
    );
    let ctl = world.operator("admin", controller.grpc);
    let demo = Demo::new(&world, &controller, &ctl);

    let up = demo.run("up");
    assert!(up.status.success(), "scripts/demo failed");
    let said = String::from_utf8_lossy(&up.stdout).into_owned();
    assert!(said.contains("tapgraphctl graph"), "{said}");
    assert!(said.contains("scripts/demo down"), "{said}");
    let console = said
        .split_whitespace()
        .find(|w| w.contains("/?token=tgc."))
        .unwrap_or_else(|| panic!("no console address with its token: {said}"))
        .to_string();

    // Five enrolled agents, each with its own hostname and the role its token gave it.
    let roles: Vec<(String, String, String)> = HOSTS
        .iter()
        .zip(["cache", "client", "database", "legacy", "web"])
        .map(|(h, r)| (h.to_string(), h.to_string(), r.to_string()))
        .collect();
    assert_eq!(connected(&ctl), roles);

    // Exactly who talks to whom: the client to the web server, the web server to the cache, the
    // database and the partner's server (an address no agent owns); nobody to the orphan.
    let expected: BTreeSet<String> = [
        "host:client -> svc:web/tcp/80 80".to_string(),
        "host:web -> svc:cache/tcp/6379 6379".to_string(),
        "host:web -> svc:db/tcp/6379 6379".to_string(),
        format!("host:web -> addr:{PARTNER} 80"),
    ]
    .into();
    let got = wait_for("the demo's map", Duration::from_secs(60), || {
        let got = edges(&ctl);
        (got == expected).then_some(got)
    });
    assert_eq!(got, expected);
    assert_eq!(
        ctl_json(&ctl, &["graph", "orphans"]),
        json!(["orphan"]),
        "the orphan is the only host nobody talks to"
    );

    // The address the demo printed logs a browser in; the map it shows has every host and the
    // partner, and the partner's panel no stray "null".
    let path = console
        .split_once(&controller.http.port().to_string())
        .map(|(_, p)| p.to_string())
        .expect("console address on the controller's port");
    let token = path.split_once("token=").map(|(_, t)| t).unwrap();
    let auth = format!("Bearer {token}");
    let graph = http_request(
        controller.http,
        "/api/v1/graph",
        &[("Authorization", &auth)],
    )
    .expect("GET /api/v1/graph");
    assert_eq!(graph.status, 200, "{}", graph.body);
    if chromium_here() {
        look_at_the_map(&world, &format!("http://{}{path}", controller.http));
    } else {
        eprintln!(
            "chromium or chromedriver is missing: the console is not looked at (scripts/install-deps)"
        );
    }

    // Down: nothing left. The processes are collected first, to check each one is gone.
    let processes = demo.processes();
    assert!(
        processes.len() >= 20,
        "servers, clients, relays and agents: {processes:?}"
    );
    let down = demo.run("down");
    assert!(down.status.success(), "scripts/demo down failed");
    assert_eq!(demo.namespaces(), Vec::<String>::new(), "namespaces left");
    let left: Vec<i32> = processes.into_iter().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "processes left running: {left:?}");
    assert!(!demo.dir.exists(), "{} left", demo.dir.display());
    for host in HOSTS {
        let etc = PathBuf::from("/etc/netns").join(format!("{}-{host}", demo.prefix));
        assert!(!etc.exists(), "{} left", etc.display());
    }
    // Safe to run twice.
    assert!(demo.run("down").status.success(), "a second down failed");

    // A second demo on the same controller: its hosts get their ids back (no web-2), and it
    // goes as cleanly.
    wait_for(
        "the first demo's agents gone",
        Duration::from_secs(20),
        || connected(&ctl).is_empty().then_some(()),
    );
    assert!(
        demo.run("up").status.success(),
        "the second scripts/demo failed"
    );
    assert_eq!(connected(&ctl), roles, "the second demo's agents");
    let processes = demo.processes();
    assert!(demo.run("down").status.success());
    assert_eq!(demo.namespaces(), Vec::<String>::new(), "namespaces left");
    let left: Vec<i32> = processes.into_iter().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "processes left running: {left:?}");
}

/// The connected agents as (id, hostname, role label), sorted.
fn connected(ctl: &Path) -> Vec<(String, String, String)> {
    let agents = ctl_json(ctl, &["agent", "list"]);
    let mut seen: Vec<(String, String, String)> = agents
        .as_array()
        .unwrap_or_else(|| panic!("agents: {agents}"))
        .iter()
        .filter(|a| a["state"] == "connected")
        .map(|a| {
            let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
            (
                text(&a["id"]),
                text(&a["hostname"]),
                text(&a["labels"]["role"]),
            )
        })
        .collect();
    seen.sort();
    seen
}

fn chromium_here() -> bool {
    ["/usr/bin/chromium", "/usr/bin/chromedriver"]
        .iter()
        .all(|p| Path::new(p).exists())
}

fn artifacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts/demo");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Opens the console at `url` in headless chromium (through chromedriver, on loopback), checks
/// the map and the partner's panel, and saves screenshots. Everything started here is killed on
/// return, failure or not.
fn look_at_the_map(world: &World, url: &str) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut cmd = Command::new("chromedriver");
    cmd.args([format!("--port={port}"), "--allowed-ips=127.0.0.1".into()]);
    // Its own process group: chromium and its helpers go with it.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let driver = Proc::spawn("chromedriver-demo", cmd, world.path());
    struct Group(i32);
    impl Drop for Group {
        fn drop(&mut self) {
            let group = nix::unistd::Pid::from_raw(-self.0);
            let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        }
    }
    let _group = Group(driver.pid().as_raw());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let profile = world.path().join("chromium-profile");
    let caps: serde_json::Map<String, Value> = serde_json::from_value(json!({
        "browserName": "chrome",
        "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--window-size=1400,900",
            format!("--user-data-dir={}", profile.display()),
        ]},
    }))
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let client: Client = loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let attempt = rt.block_on(
            ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&format!("http://127.0.0.1:{port}")),
        );
        match attempt {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for chromedriver: {e}");
                std::thread::sleep(Duration::from_millis(300));
            }
            Err(e) => panic!("no WebDriver session: {e}\n{}", driver.log_text()),
        }
    };
    let result = rt.block_on(async {
        let c = &client;
        c.goto(url).await?;
        let eval = |script: String| async move { c.execute(&script, vec![]).await };
        // Every host and the partner drawn, with the four connections.
        let want = json!({
            "nodes": ["addr:198.19.0.2", "host:cache", "host:client", "host:db", "host:orphan", "host:web"],
            "edges": [["host:client", "host:web"], ["host:web", "addr:198.19.0.2"], ["host:web", "host:cache"], ["host:web", "host:db"]],
        });
        let start = Instant::now();
        loop {
            let v = eval(
                "try { return window.tapgraph && window.tapgraph.ready ? window.tapgraph.visible() : null } catch (e) { return null }".into(),
            )
            .await?;
            let mut sorted = v.clone();
            if let Some(edges) = sorted.get_mut("edges").and_then(Value::as_array_mut) {
                edges.sort_by_key(|e| e.to_string());
            }
            if sorted == want {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the console's map: {v}, want {want}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Colour by role (the tokens' label) is the default choice.
        tokio::time::sleep(Duration::from_millis(800)).await; // the layout settles
        std::fs::write(artifacts().join("map.png"), c.screenshot().await?).unwrap();

        // The partner's panel: what it is and who uses it, and no stray "null".
        let search = c.find(Locator::Css("#search")).await?;
        search.send_keys(&format!("{PARTNER}\u{E007}")).await?;
        let details = c
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css("#details[data-node='addr:198.19.0.2']"))
            .await?;
        let text = details.text().await?;
        assert!(text.contains("external endpoint"), "{text}");
        assert!(text.contains("web"), "used by web: {text}");
        assert!(!text.contains("null"), "a stray null in the panel: {text}");
        std::fs::write(artifacts().join("partner-panel.png"), c.screenshot().await?).unwrap();

        // The web server's panel: what it depends on and what depends on it.
        search.clear().await?;
        search.send_keys("web\u{E007}").await?;
        c.wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css("#details[data-node='host:web']"))
            .await?;
        std::fs::write(artifacts().join("web-panel.png"), c.screenshot().await?).unwrap();
        Ok::<_, fantoccini::error::CmdError>(())
    });
    let _ =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), client.close()).await });
    result.expect("the console in chromium");
    eprintln!("screenshots: {}", artifacts().display());
}
