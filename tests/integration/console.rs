//! The web console's HTTP side: access tokens, security headers, the read-only API it reads and
//! the event stream it follows. (The console in a real browser: `console_browser.rs`.)

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

/// A controller whose console asks for a token even on loopback, with an operator.
fn guarded() -> (World, Controller, std::path::PathBuf) {
    let world = World::new();
    let controller = Controller::start(&world, &[("TAPGRAPH_CONSOLE__AUTH", "token")]);
    let ops = world.operator("ops", controller.grpc);
    (world, controller, ops)
}

fn token(ops: &std::path::Path) -> Value {
    let v = ctl_json(
        ops,
        &["console", "token", "--ttl", "10m", "--description", "test"],
    );
    assert!(v["token"].as_str().unwrap().starts_with("tgc."), "{v}");
    v
}

#[test]
fn without_a_token_the_console_and_api_answer_401_and_reveal_nothing() {
    let (_world, controller, _ops) = guarded();
    for path in [
        "/",
        "/index.html",
        "/api/v1/graph",
        "/api/v1/agents",
        "/api/v1/policies",
        "/api/v1/events",
        "/api/v1/graph/export?format=graphml",
        "/nonexistent",
    ] {
        let r = http_request(controller.http, path, &[]).unwrap();
        assert_eq!(r.status, 401, "{path}: {}", r.body);
        assert!(
            r.body.contains("tapgraphctl console token"),
            "{path}: {}",
            r.body
        );
        assert!(
            !r.body.contains("host:"),
            "{path} leaks the map: {}",
            r.body
        );
        assert!(r.header("content-security-policy").is_some(), "{path}");
    }
    let r = http_request(
        controller.http,
        "/api/v1/graph",
        &[(
            "Authorization",
            "Bearer tgc.0123456789abcdef.0123456789abcdef0123456789abcdef",
        )],
    )
    .unwrap();
    assert_eq!(r.status, 401, "a made-up token");
    let r = http_request(controller.http, "/?token=tgj.0.0", &[]).unwrap();
    assert_eq!(r.status, 401, "a malformed token in the address");
    // Probes and Prometheus stay open.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(http_get(controller.http, path).unwrap().0, 200, "{path}");
    }
}

#[test]
fn a_token_logs_a_browser_in_with_a_cookie_until_it_is_revoked() {
    let (_world, controller, ops) = guarded();
    let created = token(&ops);
    let text = created["token"].as_str().unwrap();
    assert_eq!(created["required"], true);
    let url = created["url"].as_str().unwrap();
    assert_eq!(
        url,
        format!("http://{}/?token={text}", controller.http),
        "the address printed is the one to open"
    );

    // The address logs in: a cookie, and the token leaves the address bar.
    let r = http_request(controller.http, &format!("/?token={text}"), &[]).unwrap();
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), Some("/"));
    let cookie = r.header("set-cookie").expect("cookie").to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_string();

    let r = http_request(controller.http, "/api/v1/graph", &[("Cookie", &pair)]).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let graph: Value = serde_json::from_str(&r.body).unwrap();
    assert!(
        graph["generation"].as_u64().is_some() && graph["nodes"].is_array(),
        "{graph}"
    );
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let bearer = format!("Bearer {text}");
    let r = http_request(
        controller.http,
        "/api/v1/policies",
        &[("Authorization", &bearer)],
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);

    let listed = ctl_json(&ops, &["console", "tokens"]);
    let id = created["id"].as_str().unwrap();
    assert_eq!(listed[0]["id"], id, "{listed}");
    assert_eq!(listed[0]["created_by"], "ops");
    assert!(
        !listed.to_string().contains(text),
        "secrets are never listed"
    );
    let (code, _, err) = ctl(&ops, &["console", "revoke", id]);
    assert_eq!(code, 0, "{err}");
    let r = http_request(controller.http, "/api/v1/graph", &[("Cookie", &pair)]).unwrap();
    assert_eq!(r.status, 401, "revoked");
    let (code, _, err) = ctl(&ops, &["console", "revoke", id]);
    assert_ne!(code, 0);
    assert!(err.contains("no console token"), "{err}");
}

#[test]
fn tokens_survive_a_restart_and_bad_requests_change_nothing() {
    let (world, controller, ops) = guarded();
    let created = token(&ops);
    let bearer = format!("Bearer {}", created["token"].as_str().unwrap());
    for bad in [
        &["console", "token", "--ttl", "10s"][..],
        &["console", "token", "--ttl", "31d"],
    ] {
        let (code, _, err) = ctl(&ops, bad);
        assert_ne!(code, 0);
        assert!(err.contains("out of range 1m..=30d"), "{err}");
    }
    let (code, _, err) = ctl(&ops, &["console", "token", "--ttl", "banana"]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(
        ctl_json(&ops, &["console", "tokens"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let (controller, _) = controller.restart(&world, &[("TAPGRAPH_CONSOLE__AUTH", "token")]);
    let r = http_request(
        controller.http,
        "/api/v1/agents",
        &[("Authorization", &bearer)],
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn on_loopback_no_token_is_asked_and_headers_lock_the_page_down() {
    let world = World::new();
    let controller = Controller::start(&world, &[]);
    let r = http_request(controller.http, "/", &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let csp = r.header("content-security-policy").expect("CSP");
    for part in [
        "default-src 'none'",
        "script-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(part), "{csp}");
    }
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    // Built or not, `/` is HTML: the console, or how to build it.
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert!(r.body.contains("tapgraph"), "{}", r.body);
    let r = http_request(controller.http, "/api/v1/nope", &[]).unwrap();
    assert_eq!(r.status, 404);
    assert!(r.body.contains("no such endpoint"), "{}", r.body);
    let ops = world.operator("ops", controller.grpc);
    let created = token(&ops);
    assert_eq!(
        created["required"], false,
        "loopback needs none, and says so"
    );
}

#[test]
fn a_bad_console_auth_setting_is_refused() {
    let world = World::new();
    let any = "127.0.0.1:0".parse().unwrap();
    let mut cmd = world.controller_cmd(any, any);
    cmd.env("TAPGRAPH_CONSOLE__AUTH", "open");
    let err = refused_config(&mut cmd);
    assert!(
        err.contains("console.auth") && err.contains("auto"),
        "{err}"
    );
}

#[test]
fn exports_and_policies_read_as_operators_expect() {
    let world = World::new();
    let controller = Controller::start(&world, &[]);
    let r = http_request(controller.http, "/api/v1/graph/export?format=graphml", &[]).unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.body.starts_with("<?xml") && r.body.contains("<graphml"),
        "{}",
        r.body
    );
    assert!(
        r.header("content-disposition")
            .unwrap()
            .contains("tapgraph-map.graphml"),
        "{:?}",
        r.headers
    );
    let r = http_request(controller.http, "/api/v1/graph/export?format=xls", &[]).unwrap();
    assert_eq!(r.status, 400);
    assert!(r.body.contains("json, dot or graphml"), "{}", r.body);
    let (status, body) = http_get(controller.http, "/api/v1/policies").unwrap();
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    let default = &v["policies"][0];
    assert_eq!(default["name"], "default", "{v}");
    assert_eq!(default["selector"], "all agents");
    assert!(default["spec"]["snapshot_interval"].is_string(), "{v}");
    assert!(v["rollout"].is_array());
}

/// Reads server-sent events until `want` of kind `kind` arrived; returns their data.
fn read_events(reader: &mut impl BufRead, kind: &str, want: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut event = String::new();
    let mut line = String::new();
    while out.len() < want {
        line.clear();
        assert!(
            reader.read_line(&mut line).expect("event stream") > 0,
            "stream ended"
        );
        let l = line.trim_end();
        if let Some(e) = l.strip_prefix("event: ") {
            event = e.to_string();
        } else if let Some(d) = l.strip_prefix("data: ")
            && event == kind
        {
            out.push(serde_json::from_str(d).expect("event data is JSON"));
        }
    }
    out
}

#[test]
fn the_event_stream_announces_the_map_the_fleet_and_live_events() {
    let world = World::new();
    let controller = Controller::start(&world, &[]);
    let mut stream = TcpStream::connect(controller.http).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        stream,
        "GET /api/v1/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let first = read_events(&mut reader, "graph", 1);
    assert!(first[0]["generation"].as_u64().is_some(), "{first:?}");
    read_events(&mut reader, "fleet", 1);

    // An agent connecting is a live event, and the map and fleet are announced again.
    world.issue_agent("ev-1");
    let _agent = Proc::spawn(
        "agent",
        world.agent_cmd("ev-1", controller.grpc),
        world.path(),
    );
    let events = read_events(&mut reader, "event", 1);
    assert_eq!(events[0]["agent_id"], "ev-1", "{events:?}");
    read_events(&mut reader, "graph", 1);
    // Shutdown is not held up by an open stream.
    let mut proc = controller.proc;
    proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        proc.wait_exit(Duration::from_secs(8)).is_some(),
        "the controller did not stop with an event stream open"
    );
}

#[test]
fn bound_beyond_loopback_the_console_asks_for_a_token_without_being_told() {
    if !require_root("bound_beyond_loopback_the_console_asks_for_a_token_without_being_told") {
        return;
    }
    // A namespace of the test's own, holding only its loopback: the controller listens on every
    // address there, as in a pod, and the probes reach it on 127.0.0.1.
    let ns = Netns::new("console");
    let world = World::new();
    let cmd = ns.wrap(world.controller_cmd(
        "127.0.0.1:7443".parse().unwrap(),
        "0.0.0.0:7080".parse().unwrap(),
    ));
    let _controller = Proc::spawn("controller", cmd, world.path());
    let http = "127.0.0.1:7080".parse().unwrap();
    wait_for("controller ready", Duration::from_secs(20), || {
        ns.run(|| matches!(http_get(http, "/readyz"), Ok((200, _))).then_some(()))
    });
    let page = ns.run(|| http_request(http, "/", &[])).unwrap();
    assert_eq!(page.status, 401, "{}", page.body);
    let api = ns
        .run(|| http_request(http, "/api/v1/agents", &[]))
        .unwrap();
    assert_eq!(api.status, 401, "{}", api.body);
    assert_eq!(ns.run(|| http_get(http, "/metrics")).unwrap().0, 200);
}
