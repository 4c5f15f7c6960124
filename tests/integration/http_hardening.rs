//! Issue 19: the HTTP listener beyond loopback. `/metrics` can require a bearer token; bad console
//! tokens are limited per source and logged; the console is served over HTTPS with a `Secure`
//! cookie; both `/metrics` endpoints answer the Prometheus text format that `promtool check
//! metrics` accepts, and OpenMetrics to whoever asks for it. Floods are in `http_flood.rs`.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::harness::*;

/// What Prometheus 2.x sends.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// `promtool check metrics` on `body`: every line it prints is a complaint.
fn promtool(body: &str) -> Vec<String> {
    let out = pipe(
        Command::new("promtool").args(["check", "metrics"]),
        body,
        "promtool (Debian package prometheus; scripts/install-deps installs it)",
    );
    let mut said: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    if !out.status.success() && said.is_empty() {
        said.push(format!("promtool exited with {}", out.status));
    }
    said
}

#[test]
fn both_metrics_endpoints_negotiate_and_pass_promtool() {
    let world = World::new();
    let controller = Controller::start(&world, &[]);
    world.issue_agent("m1");
    let agent = Proc::spawn(
        "agent",
        world.agent_cmd("m1", controller.grpc),
        world.path(),
    );
    controller.wait_agent("m1", "connected", Duration::from_secs(20), |_| true);
    let agent_addr: SocketAddr = wait_for("agent /metrics", Duration::from_secs(10), || {
        let log = agent.log_text();
        let line = log.lines().find(|l| l.contains("serving /metrics"))?;
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))?
            .parse()
            .ok()
    });
    for (name, addr) in [("controller", controller.http), ("agent", agent_addr)] {
        // What promtool, curl and older scrapers ask for: the 0.0.4 text format, lint-free.
        for accept in [Some("text/plain;version=0.0.4"), None] {
            let headers: Vec<(&str, &str)> = accept.map(|a| ("Accept", a)).into_iter().collect();
            let r = http_request(addr, "/metrics", &headers).unwrap();
            assert_eq!(r.status, 200, "{name}: {}", r.body);
            assert_eq!(
                r.header("content-type"),
                Some("text/plain; version=0.0.4; charset=utf-8"),
                "{name} /metrics with Accept {accept:?}"
            );
            let complaints = promtool(&r.body);
            assert!(
                complaints.is_empty(),
                "promtool check metrics on the {name}'s /metrics:\n{}\n{}",
                complaints.join("\n"),
                r.body
            );
            let names = check_metrics(&r.body).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(names.lines().count() > 5, "{name}: {names}");
        }
        // What Prometheus asks for first: OpenMetrics, which its strict parser accepts.
        let r = http_request(addr, "/metrics", &[("Accept", PROMETHEUS_ACCEPT)]).unwrap();
        assert_eq!(r.status, 200, "{name}: {}", r.body);
        assert_eq!(
            r.header("content-type"),
            Some("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            "{name}"
        );
        assert!(r.body.ends_with("# EOF\n"), "{name}");
        check_metrics(&r.body).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// A file holding `text`, readable by its owner only.
fn private_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

#[test]
fn metrics_can_require_a_bearer_token() {
    let world = World::new();
    let token = "scrape-7f3a9c21d4e8b650";
    let file = private_file(world.path(), "metrics.token", &format!("{token}\n"));
    let controller = Controller::start(
        &world,
        &[("TAPGRAPH_HTTP__METRICS_TOKEN_FILE", file.to_str().unwrap())],
    );
    let r = http_request(controller.http, "/metrics", &[]).unwrap();
    assert_eq!(r.status, 401, "no token: {}", r.body);
    assert!(
        r.header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer")),
        "{:?}",
        r.headers
    );
    assert!(!r.body.contains("tapgraph_"), "nothing leaks: {}", r.body);
    let wrong = "Bearer scrape-00000000000000000";
    let r = http_request(controller.http, "/metrics", &[("Authorization", wrong)]).unwrap();
    assert_eq!(r.status, 401, "a wrong token");
    let good = format!("Bearer {token}");
    let r = http_request(controller.http, "/metrics", &[("Authorization", &good)]).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("tapgraph_agents"), "{}", r.body);
    // The probes stay open.
    assert_eq!(http_get(controller.http, "/healthz").unwrap().0, 200);

    // A token too short to be a secret is refused at start, naming the key.
    let short = private_file(world.path(), "short.token", "abc\n");
    let mut cmd = world.controller_cmd(
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    );
    cmd.env("TAPGRAPH_HTTP__METRICS_TOKEN_FILE", &short);
    let err = refused_config(&mut cmd);
    assert!(err.contains("http.metrics_token_file"), "{err}");
}

/// A TCP connection to `to` from local address `from` (another loopback address: another source).
pub(crate) fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
    let (IpAddr::V4(from), SocketAddr::V4(to)) = (from, to) else {
        panic!("IPv4 only");
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    bind(raw, &SockaddrIn::from(std::net::SocketAddrV4::new(from, 0)))?;
    connect(raw, &SockaddrIn::from(to))?;
    Ok(TcpStream::from(fd))
}

/// `GET path` on `stream` with `headers`; the status and the whole response.
fn get_on(mut stream: TcpStream, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let extra: String = headers
        .iter()
        .map(|(n, v)| format!("{n}: {v}\r\n"))
        .collect();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, response)
}

#[test]
fn bad_console_tokens_are_limited_per_source_and_logged_without_the_token() {
    let world = World::new();
    let controller = Controller::start(
        &world,
        &[
            ("TAPGRAPH_CONSOLE__AUTH", "token"),
            ("TAPGRAPH_HTTP__AUTH_FAILURES_PER_MINUTE", "5"),
        ],
    );
    let ops = world.operator("ops", controller.grpc);
    let secret = "5ec7e75ec7e75ec7e75ec7e75ec7e7aa";
    let guess = format!("Bearer tgc.0123456789abcdef.{secret}");
    let from = |a: [u8; 4]| IpAddr::from(a);
    let attacker = from([127, 0, 0, 7]);
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let stream = connect_from(attacker, controller.http).unwrap();
        statuses.push(get_on(stream, "/api/v1/graph", &[("Authorization", &guess)]).0);
    }
    assert_eq!(statuses[..5], [401; 5], "{statuses:?}");
    assert_eq!(
        statuses[5..],
        [429; 3],
        "past 5 bad tokens a minute: {statuses:?}"
    );
    let (_, response) = get_on(
        connect_from(attacker, controller.http).unwrap(),
        "/?token=tgc.0123456789abcdef.0123",
        &[],
    );
    assert!(
        response.to_ascii_lowercase().contains("retry-after:"),
        "{response}"
    );

    // Another source is not held up, and a real token from it still works.
    let created = ctl_json(&ops, &["console", "token", "--ttl", "10m"]);
    let good = format!("Bearer {}", created["token"].as_str().unwrap());
    let other = from([127, 0, 0, 8]);
    let (status, _) = get_on(
        connect_from(other, controller.http).unwrap(),
        "/api/v1/graph",
        &[("Authorization", &good)],
    );
    assert_eq!(status, 200);

    // Logged with the source, never the token; the limit shows in /metrics.
    let log = controller.proc.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("bad access token refused"))
        .collect();
    assert_eq!(
        lines.len(),
        5,
        "one line per bad token until limited: {lines:?}"
    );
    assert!(
        lines.iter().all(|l| l.contains("source=127.0.0.7")),
        "{lines:?}"
    );
    assert!(
        !log.contains(secret),
        "the guessed token must not be logged"
    );
    let (_, metrics) = http_get(controller.http, "/metrics").unwrap();
    assert!(
        metrics.contains("tapgraph_http_auth_failures_total 5\n")
            && metrics.contains("tapgraph_http_auth_limited_requests_total 4\n"),
        "{metrics}"
    );
}

#[test]
fn the_console_is_served_over_https_with_a_secure_cookie() {
    let world = World::new();
    let dir = world.path();
    let (cert, key) = (dir.join("console.pem"), dir.join("console.key"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let controller = Controller::start(
        &world,
        &[
            ("TAPGRAPH_CONSOLE__AUTH", "token"),
            ("TAPGRAPH_HTTP__TLS_CERT", cert.to_str().unwrap()),
            ("TAPGRAPH_HTTP__TLS_KEY", key.to_str().unwrap()),
        ],
    );
    let ops = world.operator("ops", controller.grpc);
    let created = ctl_json(&ops, &["console", "token", "--ttl", "10m"]);
    let text = created["token"].as_str().unwrap();
    let url = created["url"].as_str().unwrap();
    assert!(url.starts_with("https://"), "{url}");

    let curl = |path: &str| {
        let out = Command::new("curl")
            .args(["-sS", "-i", "--max-time", "20", "--cacert"])
            .arg(&cert)
            .arg(format!(
                "https://127.0.0.1:{}{path}",
                controller.http.port()
            ))
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "curl {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(curl("/healthz").starts_with("HTTP/1.1 200"));
    let login = curl(&format!("/?token={text}"));
    assert!(login.starts_with("HTTP/1.1 303"), "{login}");
    let cookie = login
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("no cookie: {login}"));
    assert!(
        cookie.contains("; Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    // Plain HTTP on the HTTPS port gets no page.
    let plain = http_get(controller.http, "/healthz");
    assert!(
        !matches!(plain, Ok((200, _))),
        "plain HTTP answered: {plain:?}"
    );
}
