//! The web console in a real browser: Debian's chromium, headless, driven through chromedriver
//! (WebDriver, with fantoccini) inside the controller's namespace, against a map of real servers
//! (redis, nginx) and real agents in network-namespace hosts. The canvas is read through the
//! console's read-only `window.tapgraph` hook; controls are clicked and typed into as a person
//! would. Screenshots go to target/test-artifacts/console/.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::harness::{Proc, require_root, wait_for};
use crate::topology::{HTTP_CLIENT, Lab, start_servers};

/// Chromium's flags on this closed network (without the background-networking ones it hangs
/// looking up Google's hosts).
const CHROMIUM_ARGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,900",
];
const DRIVER: &str = "127.0.0.1:9515";

fn artifacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts/console");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// chromedriver and chromium in the lab's hub namespace, and a runtime whose threads are there
/// too, so the WebDriver connection is. Everything is killed on drop, failure or not.
struct Browser {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: Proc,
    base: String,
}

/// The element `css` selects, once it is there (10 s at most).
async fn find(
    c: &Client,
    css: &str,
) -> Result<fantoccini::elements::Element, fantoccini::error::CmdError> {
    c.wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(css))
        .await
}

impl Browser {
    fn start(lab: &Lab) -> Browser {
        let profile = lab.world.path().join("chromium-profile");
        let mut cmd = lab.hub.command("chromedriver");
        cmd.args(["--port=9515", "--allowed-ips=127.0.0.1"]);
        // Its own process group: chromium and its helpers go with it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let driver = Proc::spawn("chromedriver", cmd, lab.world.path());
        // Threads made from a thread inside the namespace are inside it.
        let rt = lab.hub.run(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
        });
        let mut browser = Browser {
            rt,
            client: None,
            driver,
            base: format!("http://{}", crate::topology::HTTP),
        };
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let caps: serde_json::Map<String, Value> = serde_json::from_value(json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": args },
        }))
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = loop {
            let caps = caps.clone();
            let attempt = browser.run(async move {
                let connector = hyper_util::client::legacy::connect::HttpConnector::new();
                ClientBuilder::new(connector)
                    .capabilities(caps)
                    .connect(&format!("http://{DRIVER}"))
                    .await
            });
            match attempt {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("waiting for chromedriver: {e}");
                    std::thread::sleep(Duration::from_millis(300));
                }
                Err(e) => panic!("no WebDriver session: {e}\n{}", browser.driver.log_text()),
            }
        };
        browser.client = Some(client);
        browser
    }

    /// Runs `fut` on the namespace's threads.
    fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> T {
        self.rt.block_on(self.rt.spawn(fut)).expect("browser task")
    }

    fn client(&self) -> Client {
        self.client.clone().expect("session")
    }

    fn goto(&self, path: &str) {
        let (c, url) = (self.client(), format!("{}{path}", self.base));
        self.run(async move { c.goto(&url).await }).expect("goto");
    }

    /// A script's value (`return …`).
    fn eval(&self, script: &str) -> Value {
        let (c, s) = (self.client(), script.to_string());
        self.run(async move { c.execute(&s, vec![]).await })
            .unwrap_or_else(|e| panic!("script {script}: {e}"))
    }

    /// An asynchronous script's value: it calls its last argument with it.
    fn eval_async(&self, script: &str) -> Value {
        let (c, s) = (self.client(), script.to_string());
        self.run(async move { c.execute_async(&s, vec![]).await })
            .unwrap_or_else(|e| panic!("script {script}: {e}"))
    }

    /// Waits until the console's hook says `cond` (a JS expression) holds.
    fn wait_js(&self, what: &str, cond: &str, timeout: Duration) -> Value {
        let script = format!("try {{ return ({cond}) || null; }} catch (e) {{ return null; }}");
        wait_for(what, timeout, || {
            let v = self.eval(&script);
            (!v.is_null() && v != Value::Bool(false)).then_some(v)
        })
    }

    fn text(&self, css: &str) -> String {
        let (c, sel) = (self.client(), css.to_string());
        self.run(async move {
            let mut tries = 0;
            loop {
                let e = find(&c, &sel).await?;
                match e.text().await {
                    Err(err) if err.is_stale_element_reference() && tries < 5 => tries += 1,
                    done => return done,
                }
            }
        })
        .unwrap_or_else(|e| panic!("text of {css}: {e}"))
    }

    /// Clicks what `css` selects. The console re-renders a panel on every live refresh, so an
    /// element found a moment ago can be gone by the click: then it is found again.
    fn click(&self, css: &str) {
        let (c, sel) = (self.client(), css.to_string());
        self.run(async move {
            let mut tries = 0;
            loop {
                let e = find(&c, &sel).await?;
                match e.click().await {
                    Err(err) if err.is_stale_element_reference() && tries < 5 => tries += 1,
                    done => return done,
                }
            }
        })
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Replaces an input's text with `text` (a trailing "\n" presses Enter).
    fn type_into(&self, css: &str, text: &str) {
        let (c, sel, text) = (self.client(), css.to_string(), text.to_string());
        self.run(async move {
            let e = find(&c, &sel).await?;
            e.clear().await?;
            let enter = text.ends_with('\n');
            e.send_keys(text.trim_end_matches('\n')).await?;
            if enter {
                e.send_keys("\u{E007}").await?;
            }
            Ok::<_, fantoccini::error::CmdError>(())
        })
        .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    fn screenshot(&self, name: &str) {
        let c = self.client();
        let png = self
            .run(async move { c.screenshot().await })
            .expect("screenshot");
        let path = artifacts().join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = self.rt.block_on(self.rt.spawn(async move {
                tokio::time::timeout(Duration::from_secs(10), c.close()).await
            }));
        }
        // chromedriver's group: chromium and every helper it started.
        let group = nix::unistd::Pid::from_raw(-self.driver.pid().as_raw());
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
    }
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

fn edges(v: &Value) -> Vec<(String, String)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| (e[0].as_str().unwrap().into(), e[1].as_str().unwrap().into()))
        .collect()
}

fn clusters(v: &Value) -> Vec<Vec<String>> {
    v.as_array().unwrap().iter().map(ids).collect()
}

#[test]
fn the_console_shows_the_map_its_clusters_live_changes_and_the_fleet() {
    if !require_root("the_console_shows_the_map_its_clusters_live_changes_and_the_fleet") {
        return;
    }
    // Two groups that talk among themselves, a shared service everyone uses (the hub that hides
    // the clusters), and a partner's server without an agent (an external endpoint).
    let hosts = ["db", "app1", "app2", "front", "web1", "shared", "ext"];
    let mut lab = Lab::new(
        &hosts,
        &[
            ("TAPGRAPH_POLICY__SNAPSHOT_INTERVAL", "1s"),
            ("TAPGRAPH_POLICY__HEARTBEAT_INTERVAL", "1s"),
            ("TAPGRAPH_TOPOLOGY__TTL", "30s"),
            ("TAPGRAPH_CONSOLE__AUTH", "token"),
        ],
    );
    start_servers(&mut lab, &["db", "shared", "ext"], "front");
    let ip = |lab: &Lab, h: &str| lab.host(h).1.to_string();
    let (db, shared, ext, front) = (
        ip(&lab, "db"),
        ip(&lab, "shared"),
        ip(&lab, "ext"),
        ip(&lab, "front"),
    );
    let ping = |to: &str| {
        vec![
            "-h".to_string(),
            to.to_string(),
            "-r".into(),
            "-1".into(),
            "-i".into(),
            "0.2".into(),
            "ping".into(),
        ]
    };
    let client = |lab: &mut Lab, from: &str, to: &str, label: &str| {
        let args = ping(to);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lab.run(from, label, "redis-cli", &args);
    };
    client(&mut lab, "app1", &db, "cli-app1-db");
    client(&mut lab, "app2", &db, "cli-app2-db");
    client(&mut lab, "app1", &ext, "cli-app1-ext");
    for from in ["app1", "app2", "front", "web1"] {
        client(&mut lab, from, &shared, &format!("cli-{from}-shared"));
    }
    lab.run(
        "web1",
        "http-web1-front",
        "python3",
        &["-c", HTTP_CLIENT, front.as_str()],
    );
    for host in ["db", "app1", "app2", "front", "web1", "shared"] {
        lab.agent(host);
    }
    let external = format!("addr:{ext}");
    let mut expected_nodes: Vec<String> = [
        "host:app1",
        "host:app2",
        "host:db",
        "host:front",
        "host:shared",
        "host:web1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    expected_nodes.push(external.clone());
    expected_nodes.sort();
    let mut expected_edges: Vec<(String, String)> = [
        ("host:app1", "host:db"),
        ("host:app2", "host:db"),
        ("host:app1", external.as_str()),
        ("host:app1", "host:shared"),
        ("host:app2", "host:shared"),
        ("host:front", "host:shared"),
        ("host:web1", "host:shared"),
        ("host:web1", "host:front"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    expected_edges.sort();
    // Operators' labels, to colour the map by.
    for (host, role) in [
        ("db", "db"),
        ("app1", "app"),
        ("app2", "app"),
        ("front", "web"),
        ("web1", "web"),
        ("shared", "infra"),
    ] {
        wait_for("the agent enrolled", Duration::from_secs(20), || {
            let out = lab
                .hub
                .command(crate::harness::bin("tapgraphctl"))
                .arg("--config")
                .arg(&lab.ctl)
                .args(["agent", "label", host, &format!("role={role}")])
                .output()
                .unwrap();
            out.status.success().then_some(())
        });
    }
    // The map is complete on the controller before the browser looks.
    wait_for("every edge on the map", Duration::from_secs(40), || {
        (lab.edges(&[]).len() >= expected_edges.len()).then_some(())
    });

    let browser = Browser::start(&lab);

    // Without a token: 401, and the page says how to get one, nothing else.
    browser.goto("/");
    let body = browser.text("body");
    assert!(body.contains("tapgraphctl console token"), "{body}");
    assert!(!body.contains("app1"), "the 401 page leaks the map: {body}");
    browser.screenshot("01-token-required");

    // The operator's token logs the browser in.
    let token = lab.ctl(&["console", "token", "--ttl", "10m"]);
    let url = token["url"].as_str().unwrap().to_string();
    let path = url
        .split_once("7080")
        .map(|(_, p)| p.to_string())
        .expect("console URL");
    browser.goto(&path);
    browser.wait_js(
        "the map drawn",
        "window.tapgraph && window.tapgraph.ready",
        Duration::from_secs(30),
    );

    // Exactly the expected hosts, external endpoint and connections; the controller hidden.
    let visible = browser.wait_js(
        "the expected map",
        &format!(
            "(() => {{ const v = window.tapgraph.visible(); return v.edges.length === {} ? v : null; }})()",
            expected_edges.len()
        ),
        Duration::from_secs(30),
    );
    assert_eq!(ids(&visible["nodes"]), expected_nodes, "{visible}");
    assert_eq!(edges(&visible["edges"]), expected_edges, "{visible}");
    browser.wait_js(
        "nodes coloured by role",
        "document.querySelector('#color-by').value === 'role'",
        Duration::from_secs(10),
    );
    let all = browser.eval("return window.tapgraph.clusters()");
    assert_eq!(
        clusters(&all).len(),
        1,
        "the shared service joins everything: {all}"
    );
    browser.screenshot("02-map");

    // Exports: the view as PNG and SVG (made in the page), the graph as JSON and GraphML (links).
    browser.eval(
        "window.__blobs = []; const make = URL.createObjectURL; \
         URL.createObjectURL = (b) => { window.__blobs.push(b); return make(b); }; return 1",
    );
    browser.click("#export-png");
    browser.click("#export-svg");
    let exported = browser.eval_async(
        "const done = arguments[arguments.length - 1]; const [png, svg] = window.__blobs; \
         Promise.all([svg.text(), fetch(document.querySelector('#export-graphml').href).then(r => r.text())]) \
           .then(([s, g]) => done({ png: png.type, pngBytes: png.size, svg: s, graphml: g }));",
    );
    assert_eq!(exported["png"], "image/png");
    assert!(
        exported["pngBytes"].as_u64().unwrap() > 5_000,
        "{}",
        exported["pngBytes"]
    );
    let svg = exported["svg"].as_str().unwrap();
    assert!(
        svg.contains("<svg") && svg.contains("app1"),
        "{}",
        &svg[..svg.len().min(300)]
    );
    let graphml = exported["graphml"].as_str().unwrap();
    assert!(
        graphml.contains("<graphml") && graphml.contains("host:app1"),
        "{graphml}"
    );

    // Hide the hubs (degree ≥ 4: only `shared`): the two groups appear.
    browser.type_into("#hub-degree", "4\n");
    let split = browser.wait_js(
        "two clusters",
        "(() => { const c = window.tapgraph.clusters(); return c.length === 2 ? c : null; })()",
        Duration::from_secs(10),
    );
    let mut group_a = vec![
        "host:app1".to_string(),
        "host:app2".into(),
        "host:db".into(),
        external.clone(),
    ];
    group_a.sort();
    assert_eq!(
        clusters(&split),
        vec![group_a, vec!["host:front".to_string(), "host:web1".into()]]
    );
    browser.screenshot("03-hub-hidden");
    browser.type_into("#hub-degree", "");

    // The same by hand: search the hub, hide it from its details panel.
    browser.type_into("#search", "shared\n");
    assert!(
        browser.text("#details").contains("shared"),
        "details of the searched host"
    );
    browser.click("#hide-node");
    browser.wait_js(
        "two clusters after hiding shared",
        "window.tapgraph.clusters().length === 2",
        Duration::from_secs(10),
    );

    // A new connection appears live: no reload, and the nodes already drawn stay where they are.
    browser.eval("window.__no_reload = 1; return 1");
    let before: BTreeMap<String, Value> =
        serde_json::from_value(browser.eval("return window.tapgraph.positions()")).unwrap();
    let generation = browser
        .eval("return window.tapgraph.generation")
        .as_u64()
        .unwrap();
    client(&mut lab, "web1", &db, "cli-web1-db");
    browser.wait_js(
        "web1 -> db drawn live",
        "window.tapgraph.visible().edges.some(e => e[0] === 'host:web1' && e[1] === 'host:db')",
        Duration::from_secs(30),
    );
    assert_eq!(
        browser.eval("return window.__no_reload || 0"),
        json!(1),
        "the page reloaded"
    );
    assert!(
        browser
            .eval("return window.tapgraph.generation")
            .as_u64()
            .unwrap()
            > generation
    );
    let after: BTreeMap<String, Value> =
        serde_json::from_value(browser.eval("return window.tapgraph.positions()")).unwrap();
    for (id, p) in &before {
        let q = &after[id];
        let moved = (p["x"].as_f64().unwrap() - q["x"].as_f64().unwrap()).abs()
            + (p["y"].as_f64().unwrap() - q["y"].as_f64().unwrap()).abs();
        assert!(
            moved < 1.0,
            "{id} moved from {p} to {q}: the layout was lost"
        );
    }
    browser.screenshot("04-live-edge");

    // The time slider: at its left end (the history's horizon) the map had no connection yet;
    // the changes view lists web1 -> db as new; back to now, it is drawn again.
    browser.eval(
        "const s = document.querySelector('#time-slider'); s.value = '0'; s.dispatchEvent(new Event('input')); return 1",
    );
    browser.wait_js(
        "the map at the horizon, without connections",
        "window.tapgraph.visible().edges.length === 0 && document.querySelector('#time-label').textContent !== 'now (live)'",
        Duration::from_secs(10),
    );
    browser.click("#changes-toggle");
    browser.wait_js(
        "web1 -> db listed as new in the changes view",
        "document.querySelector('#changes').textContent.includes('host:web1 → svc:db')",
        Duration::from_secs(20),
    );
    browser.screenshot("04b-history");
    browser.click("#changes-toggle");
    browser.click("#time-now");
    browser.wait_js(
        "back to the live map",
        "window.tapgraph.visible().edges.some(e => e[0] === 'host:web1' && e[1] === 'host:db')",
        Duration::from_secs(10),
    );

    // The fleet: an agent that stops answering is shown lost.
    let web1 = lab
        .procs
        .iter()
        .find(|p| p.name == "agent-web1")
        .expect("web1's agent");
    web1.signal(nix::sys::signal::Signal::SIGSTOP);
    browser.goto("/#/fleet");
    let state = browser.wait_js(
        "web1 shown lost",
        "(() => { const r = document.querySelector('#fleet-table tr[data-agent=\"web1\"]'); return r && r.dataset.state === 'lost' ? r.textContent : null; })()",
        Duration::from_secs(30),
    );
    assert!(state.as_str().unwrap().contains("lost"), "{state}");
    let connected = browser.eval(
        "return document.querySelectorAll('#fleet-table tr[data-state=\"connected\"]').length",
    );
    assert_eq!(connected, json!(5), "the other five agents stay connected");
    browser.screenshot("05-fleet");
    web1.signal(nix::sys::signal::Signal::SIGCONT);

    browser.goto("/#/policies");
    let policies = browser.text("#policies-table");
    assert!(policies.contains("default"), "{policies}");
    browser.wait_js(
        "rollout rows",
        "document.querySelectorAll('#rollout-table tr[data-agent]').length >= 6",
        Duration::from_secs(10),
    );
    browser.screenshot("06-policies");
}
