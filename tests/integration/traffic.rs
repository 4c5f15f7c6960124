//! Issue 23, part 2: each edge carries its traffic and latency, from the agents' sock_diag
//! `tcp_info` and the kernel's closed-socket notifications. Real agents on two namespace hosts,
//! a real server and clients that move known byte counts, and a netem delay so the RTT is known.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{Proc, require_root, wait_for};
use crate::topology::Lab;

/// Serves `port:N:M` triples: per connection, reads N bytes, answers M, then waits for the
/// client to close.
const SERVER: &str = "import socket,sys,threading\n\
def serve(port,n,m):\n    s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1); s.bind(('0.0.0.0',port)); s.listen(64)\n    while True:\n        c,_=s.accept(); threading.Thread(target=conn,args=(c,n,m),daemon=True).start()\n\
def conn(c,n,m):\n    got=0\n    while got<n:\n        b=c.recv(65536)\n        if not b: return\n        got+=len(b)\n    c.sendall(b'y'*m)\n    while c.recv(65536): pass\n    c.close()\n\
for a in sys.argv[1:]:\n    p,n,m=map(int,a.split(':')); threading.Thread(target=serve,args=(p,n,m),daemon=True).start()\n\
threading.Event().wait()\n";

/// Connects to `host:port`, sends N bytes, reads M; then holds the connection open (`hold`)
/// or closes it, `times` times in a row.
const CLIENT: &str = "import socket,sys,time\n\
host,port,n,m,times,hold=sys.argv[1],int(sys.argv[2]),int(sys.argv[3]),int(sys.argv[4]),int(sys.argv[5]),sys.argv[6]=='hold'\n\
for _ in range(times):\n    c=socket.create_connection((host,port)); c.sendall(b'x'*n); got=0\n    while got<m:\n        b=c.recv(65536); assert b; got+=len(b)\n    if hold:\n        time.sleep(3600)\n    c.close()\n";

/// Holds every packet of NFQUEUE queue 0 for argv[1] ms, then accepts it: a netem stand-in, for
/// kernels built without `sch_netem` (this project's VM), over raw netlink.
const DELAYER: &str = r#"# Holds every packet of NFQUEUE queue 0 for DELAY seconds, then accepts it (a netem stand-in for
# kernels built without sch_netem). Raw netlink, no bindings.
import socket, struct, sys, time, select, collections
DELAY = float(sys.argv[1]) / 1000.0
NETLINK_NETFILTER = 12
QUEUE = (3 << 8)
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind((0, 0))
seq = 0
def send(kind, family, attrs, flags=1):
    global seq
    seq += 1
    payload = struct.pack("=BBH", family, 0, socket.htons(0)) + attrs
    s.send(struct.pack("=IHHII", 16 + len(payload), QUEUE | kind, flags, seq, 0) + payload)
def attr(kind, value):
    a = struct.pack("=HH", 4 + len(value), kind) + value
    return a + b"\0" * ((4 - len(a) % 4) % 4)
send(2, socket.AF_UNSPEC, attr(1, struct.pack("!BBH", 1, 0, socket.AF_INET)))      # BIND queue 0
send(2, socket.AF_UNSPEC, attr(2, struct.pack("!IB", 0, 1)))                         # copy META
pending = collections.deque()
print("ready", flush=True)
while True:
    wait = max(0.0, pending[0][0] - time.monotonic()) if pending else 1.0
    if select.select([s], [], [], wait)[0]:
        data = s.recv(1 << 20)
        off = 0
        while off + 16 <= len(data):
            ln, kind = struct.unpack_from("=IH", data, off)
            if ln < 16: break
            if kind == QUEUE | 0:
                a = off + 20
                while a + 4 <= off + ln:
                    alen, akind = struct.unpack_from("=HH", data, a)
                    if alen < 4: break
                    if akind & 0x7fff == 1:
                        (pid,) = struct.unpack_from("!I", data, a + 4)
                        pending.append((time.monotonic() + DELAY, pid))
                    a += (alen + 3) & ~3
            off += (ln + 3) & ~3
    now = time.monotonic()
    while pending and pending[0][0] <= now:
        _, pid = pending.popleft()
        send(1, socket.AF_UNSPEC, attr(2, struct.pack("!II", 1, pid)), flags=1)
"#;

const N: u64 = 1_234_567;
const M: u64 = 89_012;
const SHORT_N: u64 = 70_000;
const SHORT_M: u64 = 1_234;
const SHORT_TIMES: u64 = 5;

fn edge(lab: &Lab, from: &str, to: &str) -> Option<Value> {
    lab.ctl(&["graph"])
        .as_array()?
        .iter()
        .find(|e| e["from"] == from && e["to"] == to)
        .cloned()
}

/// `rtt:SRTT/VAR` and `minrtt:MIN` of the one socket `ss -ti` shows towards `dst`, in µs.
fn ss_rtt(lab: &Lab, host: &str, dst: &str) -> (f64, f64, f64) {
    let (ns, _, _) = lab.host(host);
    let out = ns
        .command("ss")
        .args(["-tinH", "dst", dst])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let field =
        |name: &str| -> Option<&str> { text.split_whitespace().find_map(|w| w.strip_prefix(name)) };
    let rtt = field("rtt:").unwrap_or_else(|| panic!("no rtt in `ss -ti`: {text}"));
    let (srtt, var) = rtt.split_once('/').unwrap();
    let min = field("minrtt:").unwrap_or_else(|| panic!("no minrtt in `ss -ti`: {text}"));
    let ms = |v: &str| v.parse::<f64>().unwrap() * 1000.0;
    (ms(srtt), ms(var), ms(min))
}

#[test]
fn edges_carry_exact_bytes_rtt_and_closed_connections() {
    if !require_root("edges_carry_exact_bytes_rtt_and_closed_connections") {
        return;
    }
    let mut lab = Lab::new(
        &["client", "server"],
        &[
            ("TAPGRAPH_POLICY__SNAPSHOT_INTERVAL", "1s"),
            ("TAPGRAPH_POLICY__HEARTBEAT_INTERVAL", "1s"),
            ("TAPGRAPH_TOPOLOGY__TTL", "30s"),
        ],
    );
    // 5 ms each way: an RTT of about 10 ms. netem where the kernel has it, else every packet
    // the hub forwards waits 5 ms in an NFQUEUE delayer.
    let netem = ["client", "server"].iter().all(|host| {
        let (ns, _, _) = lab.host(host);
        let out = ns
            .command("tc")
            .args([
                "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "5ms",
            ])
            .output()
            .unwrap();
        out.status.success()
    });
    if !netem {
        eprintln!(
            "no sch_netem in this kernel: delaying the hub's forwarded packets by 5 ms with NFQUEUE"
        );
        let mut cmd = lab.hub.command("python3");
        cmd.args(["-c", DELAYER, "5"]);
        let delayer = Proc::spawn("delayer", cmd, lab.world.path());
        wait_for("the delayer", Duration::from_secs(10), || {
            delayer.log_text().contains("ready").then_some(())
        });
        lab.procs.push(delayer);
        let out = lab
            .hub
            .command("iptables")
            .args(["-A", "FORWARD", "-j", "NFQUEUE", "--queue-num", "0"])
            .output()
            .unwrap();
        assert!(out.status.success(), "iptables NFQUEUE: {out:?}");
    }
    let (_, server_ip, _) = lab.host("server");
    let server_ip = server_ip.to_string();
    let long = format!("9000:{N}:{M}");
    let short = format!("9001:{SHORT_N}:{SHORT_M}");
    lab.run(
        "server",
        "server",
        "python3",
        &["-c", SERVER, long.as_str(), short.as_str()],
    );
    lab.agent("client");
    lab.agent("server");
    std::thread::sleep(Duration::from_millis(500));
    let (n, m) = (N.to_string(), M.to_string());
    lab.run(
        "client",
        "client-long",
        "python3",
        &["-c", CLIENT, &server_ip, "9000", &n, &m, "1", "hold"],
    );

    // The held connection: N up, M down, exactly, counted once although both ends measure it.
    let long_edge = wait_for(
        "the long connection's bytes",
        Duration::from_secs(40),
        || {
            let e = edge(&lab, "host:client", "svc:server/tcp/9000")?;
            let t = e.get("traffic")?;
            (t["bytes_sent"] == N && t["bytes_received"] == M && t["measured_by"] == "both")
                .then_some(e)
        },
    );
    let t = &long_edge["traffic"];
    eprintln!("edge: {long_edge:#}");
    let srtt = t["srtt_us"].as_f64().unwrap();
    let min_rtt = t["min_rtt_us"].as_f64().unwrap();
    // Within what `ss -ti` shows for the same socket: the connection is idle since the
    // transfer, so its smoothed RTT has not moved; minrtt never rises.
    let (ss_srtt, ss_var, ss_min) = ss_rtt(&lab, "client", &format!("{server_ip}:9000"));
    eprintln!(
        "ss -ti: rtt {ss_srtt} µs / {ss_var} µs, minrtt {ss_min} µs; edge srtt {srtt} µs, min {min_rtt} µs"
    );
    // The lowest RTT is the path's: 10 ms and a little. The smoothed one was taken during the
    // transfer, with queueing on top: under 30 ms with netem; the user-space delayer queues
    // more on a busy machine (35 ms seen while other builds ran), so only ss bounds it then.
    assert!(
        (10_000.0..30_000.0).contains(&min_rtt),
        "min RTT {min_rtt} µs for 5 ms each way"
    );
    let srtt_max = if netem { 30_000.0 } else { 200_000.0 };
    assert!(
        (10_000.0..srtt_max).contains(&srtt),
        "srtt {srtt} µs for 5 ms each way"
    );
    assert!(
        (ss_srtt - ss_var - 1000.0..=ss_srtt + ss_var + 1000.0).contains(&srtt),
        "srtt {srtt} µs against ss {ss_srtt} ± {ss_var} µs"
    );
    assert!(
        (ss_min - 1000.0..=ss_min + 1000.0).contains(&min_rtt) && min_rtt >= 10_000.0,
        "min RTT {min_rtt} µs against ss minrtt {ss_min} µs"
    );
    assert!(t["segments_sent"].as_u64().unwrap() > 0);

    // Connections that open, move their bytes and close within one snapshot interval: counted
    // at close from the kernel's notifications.
    let (short_n, short_m, times) = (
        SHORT_N.to_string(),
        SHORT_M.to_string(),
        SHORT_TIMES.to_string(),
    );
    let (client_ns, _, _) = lab.host("client");
    let out = client_ns
        .command("python3")
        .args([
            "-c", CLIENT, &server_ip, "9001", &short_n, &short_m, &times, "close",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "short clients: {out:?}");
    let short_edge = wait_for(
        "the closed connections' bytes",
        Duration::from_secs(40),
        || {
            let e = edge(&lab, "host:client", "svc:server/tcp/9001")?;
            let t = e.get("traffic")?;
            (t["bytes_sent"] == SHORT_N * SHORT_TIMES
                && t["bytes_received"] == SHORT_M * SHORT_TIMES
                && t["closed_connections"] == SHORT_TIMES)
                .then_some(e)
        },
    );
    eprintln!("short-lived edge: {short_edge:#}");

    // The operator's table shows the columns.
    let out = lab
        .hub
        .command(crate::harness::bin("tapgraphctl"))
        .arg("--config")
        .arg(&lab.ctl)
        .args(["graph"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    eprintln!("{table}");
    assert!(
        table.contains("SENT") && table.contains("1.2 MB") && table.contains("89.0 kB"),
        "{table}"
    );
}
