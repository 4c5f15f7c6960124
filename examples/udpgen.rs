//! Traffic generator and analyzer for the virtual TAP benchmark (`bench/mirror.sh`, issue 7).
//!
//! ```text
//! udpgen send --dst IP:PORT [--size 64] [--rate PPS] [--duration SECS] [--batch 64] [--run ID]
//!              [--pace spin|sleep] [--gso 1|0]
//! udpgen recv --iface IF [--port 9000] [--run ID] [--duration SECS] [--idle SECS]
//! ```
//!
//! `send` sends UDP datagrams sized so that the Ethernet frame (as libpcap sees it: headers and
//! payload, no FCS) is exactly `--size` bytes, at `--rate` packets per second (0, the default, is as
//! fast as the kernel takes them), in batches of at most `--batch`: one UDP GSO send each (the
//! sender's veth must have tx-udp-segmentation off, so that it splits them into real frames), or
//! with `--gso 0` one `sendmmsg`. Paced, packet k is due at k / rate from the start: the mean rate
//! is exact even when a wake-up comes late (the late packets then leave as one batch), and a run
//! sends rate × duration packets if it keeps up. Between batches it spins for waits under 200 µs
//! (smooth pacing; a whole core), or with `--pace sleep` always sleeps, at least 100 µs (bursts of
//! a few packets, but the core idles in between: for measuring the CPU that others use).
//! Each payload carries a magic, the run id, a sequence number from 0 and the send time
//! (CLOCK_REALTIME, ns), stamped just before the batch's send. It prints one line:
//! `sent=N secs=T pps=R size=S run=ID refused=E` (E: sends refused by a past ICMP unreachable).
//!
//! `recv` is the analyzer: it captures with libpcap on `--iface` (immediate mode, nanosecond kernel
//! timestamps, the same clock as the sender's stamps), keeps the datagrams of run `--run` to
//! `--port`, and prints `received= unique= dups= reordered= first_seq= last_seq= dropped_by_kernel=`
//! and the one-way delay (capture timestamp − send stamp) percentiles in µs. It prints `ready` on
//! stderr once capturing, and stops `--idle` seconds after the last packet, or at `--duration`.
#![forbid(unsafe_code)]

use std::io::IoSlice;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrIn, sendmmsg, sockopt};

const MAGIC: u16 = 0x7467; // "tg"
/// Ethernet (14) + IPv4 (20) + UDP (8).
const HEADERS: usize = 42;
/// magic (2) + run (2) + seq (8) + send time (8).
const STAMP: usize = 20;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_default();
    let flags = Flags::parse(args)?;
    match mode.as_str() {
        "send" => send(&flags),
        "recv" => recv(&flags),
        _ => bail!(
            "usage: udpgen send --dst IP:PORT [--size 64] [--rate PPS] [--duration SECS] [--batch 64] [--run ID] [--pace spin|sleep] [--gso 1|0]\n       udpgen recv --iface IF [--port 9000] [--run ID] [--duration SECS] [--idle SECS]"
        ),
    }
}

/// `--key value` pairs; every key is checked against the ones the mode reads.
struct Flags(Vec<(String, String)>);

impl Flags {
    fn parse(mut args: impl Iterator<Item = String>) -> anyhow::Result<Flags> {
        let mut out = Vec::new();
        while let Some(key) = args.next() {
            let name = key
                .strip_prefix("--")
                .ok_or_else(|| anyhow!("expected --flag, got {key:?}"))?;
            let value = args.next().ok_or_else(|| anyhow!("{key} needs a value"))?;
            out.push((name.to_owned(), value));
        }
        Ok(Flags(out))
    }

    fn check(&self, known: &[&str]) -> anyhow::Result<()> {
        match self.0.iter().find(|(k, _)| !known.contains(&k.as_str())) {
            Some((k, _)) => bail!("unknown flag --{k} (this mode takes {known:?})"),
            None => Ok(()),
        }
    }

    fn get<T: std::str::FromStr>(&self, key: &str, default: Option<T>) -> anyhow::Result<T>
    where
        T::Err: std::fmt::Display,
    {
        match self.0.iter().rev().find(|(k, _)| k == key) {
            Some((_, v)) => v.parse().map_err(|e| anyhow!("--{key} {v:?}: {e}")),
            None => default.ok_or_else(|| anyhow!("--{key} is required")),
        }
    }
}

fn now_ns() -> u64 {
    // Before 1970 or after 2554 is not a clock this benchmark runs on.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn send(flags: &Flags) -> anyhow::Result<()> {
    flags.check(&[
        "dst", "size", "rate", "duration", "batch", "run", "gso", "pace",
    ])?;
    let dst: SocketAddr = flags.get("dst", None)?;
    let SocketAddr::V4(dst) = dst else {
        bail!("--dst must be IPv4 (frame sizes assume a 20-byte IP header)")
    };
    let size: usize = flags.get("size", Some(64))?;
    let rate: f64 = flags.get("rate", Some(0.0))?;
    let duration: f64 = flags.get("duration", Some(5.0))?;
    let batch: usize = flags.get("batch", Some(64))?;
    let run: u16 = flags.get("run", Some(0))?;
    let gso = match flags.get::<u8>("gso", Some(1))? {
        0 => false,
        1 => true,
        n => bail!("--gso {n}: 1 or 0"),
    };
    let spin = match flags
        .get::<String>("pace", Some("spin".to_owned()))?
        .as_str()
    {
        "spin" => true,
        "sleep" => false,
        p => bail!("--pace {p:?}: spin or sleep"),
    };
    if !(HEADERS + STAMP..=1514).contains(&size) {
        bail!(
            "--size {size}: the frame must be {} to 1514 bytes",
            HEADERS + STAMP
        );
    }
    if !(1..=1024).contains(&batch) || rate < 0.0 || !duration.is_finite() || duration <= 0.0 {
        bail!("--batch must be 1..=1024, --rate ≥ 0, --duration > 0");
    }
    // Sleeps shorter than the default 50 µs timer slack would overshoot at 10 kpps.
    let _ = nix::sys::prctl::set_timerslack(1_000);

    let sock = UdpSocket::bind("0.0.0.0:0").context("bind")?;
    // Connected: one route lookup, no address per message. The receiver has no socket on the port,
    // so its (rate-limited) ICMP port-unreachables come back as ECONNREFUSED: retried, counted.
    sock.connect(dst)
        .with_context(|| format!("connect {dst}"))?;
    let mut tx = Batch::new(sock, size - HEADERS, batch, run, gso)?;

    let start = Instant::now();
    let end = start + Duration::from_secs_f64(duration);
    // Paced, packet k is due at k / rate: a run sends rate × duration packets, if it keeps up.
    let total = (rate * duration).round() as u64;
    let (mut sent, mut refused) = (0u64, 0u64);
    loop {
        let now = Instant::now();
        if now >= end || (rate > 0.0 && sent >= total) {
            break;
        }
        let n = if rate == 0.0 {
            tx.capacity()
        } else {
            let due = ((now - start).as_secs_f64() * rate) as u64 + 1;
            let due = due.min(total);
            let n = due.saturating_sub(sent).min(tx.capacity() as u64) as usize;
            if n == 0 {
                let next = start + Duration::from_secs_f64(sent as f64 / rate);
                let wait = next.saturating_duration_since(now);
                if !spin {
                    // At least 100 µs: each wake-up costs the machine more than a packet does.
                    std::thread::sleep(wait.max(Duration::from_micros(100)));
                } else if wait > Duration::from_micros(200) {
                    std::thread::sleep(wait - Duration::from_micros(100));
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            n
        };
        match tx.send(n, sent, now_ns()) {
            Ok(k) => sent += k as u64,
            Err(Errno::ECONNREFUSED) => refused += 1,
            Err(Errno::ENOBUFS | Errno::EAGAIN | Errno::EINTR) => std::hint::spin_loop(),
            Err(e) => return Err(e).context("send"),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "sent={sent} secs={secs:.3} pps={:.0} size={size} run={run} refused={refused}",
        sent as f64 / secs
    );
    Ok(())
}

/// A batch of datagrams and the way it leaves: one UDP GSO send (the kernel splits it into
/// datagrams of `payload` bytes), or one `sendmmsg` of separate buffers.
struct Batch {
    sock: UdpSocket,
    payload: usize,
    /// The datagrams back to back; with `mmsg`, each is its own message.
    buf: Vec<u8>,
    mmsg: Option<MultiHeaders<SockaddrIn>>,
}

impl Batch {
    fn new(
        sock: UdpSocket,
        payload: usize,
        max: usize,
        run: u16,
        gso: bool,
    ) -> anyhow::Result<Batch> {
        let (max, mmsg) = if gso {
            let segment = u16::try_from(payload).context("payload")?;
            nix::sys::socket::setsockopt(&sock, sockopt::UdpGsoSegment, &segment.into())
                .context("UDP_SEGMENT")?;
            // 64 segments is the kernel's limit before 6.x; 64 KiB the limit of one send.
            (max.min(64).min(65_507 / payload), None)
        } else {
            (max, Some(MultiHeaders::preallocate(max, None)))
        };
        let mut buf = vec![0u8; payload * max];
        for d in buf.chunks_mut(payload) {
            d[0..2].copy_from_slice(&MAGIC.to_be_bytes());
            d[2..4].copy_from_slice(&run.to_be_bytes());
        }
        Ok(Batch {
            sock,
            payload,
            buf,
            mmsg,
        })
    }

    fn capacity(&self) -> usize {
        self.buf.len() / self.payload
    }

    /// Stamps the first `n` datagrams with sequence numbers from `seq` and the send time `ns`,
    /// sends them, and returns how many the kernel took.
    fn send(&mut self, n: usize, seq: u64, ns: u64) -> Result<usize, Errno> {
        let bytes = &mut self.buf[..n * self.payload];
        for (i, d) in bytes.chunks_mut(self.payload).enumerate() {
            d[4..12].copy_from_slice(&(seq + i as u64).to_be_bytes());
            d[12..20].copy_from_slice(&ns.to_be_bytes());
        }
        let Some(headers) = &mut self.mmsg else {
            return match self.sock.send(bytes) {
                Ok(_) => Ok(n),
                Err(e) => Err(Errno::from_raw(e.raw_os_error().unwrap_or(0))),
            };
        };
        let slices: Vec<[IoSlice; 1]> = bytes
            .chunks(self.payload)
            .map(|d| [IoSlice::new(d)])
            .collect();
        let addrs = vec![None; n];
        let fd = self.sock.as_raw_fd();
        sendmmsg(fd, headers, &slices, &addrs, [], MsgFlags::empty()).map(|r| r.count())
    }
}

fn recv(flags: &Flags) -> anyhow::Result<()> {
    flags.check(&["iface", "port", "run", "duration", "idle"])?;
    let iface: String = flags.get("iface", None)?;
    let port: u16 = flags.get("port", Some(9000))?;
    let run: u16 = flags.get("run", Some(0))?;
    let duration = Duration::from_secs_f64(flags.get("duration", Some(60.0))?);
    let idle = Duration::from_secs_f64(flags.get("idle", Some(2.0))?);

    let mut cap = pcap::Capture::from_device(iface.as_str())
        .and_then(|c| {
            c.immediate_mode(true)
                .precision(pcap::Precision::Nano)
                .snaplen(128)
                .buffer_size(16 << 20)
                .open()
        })
        // Non-blocking: with TPACKET_V3 a blocking read waits for a packet however long it takes,
        // and the analyzer must notice the silence that ends its run.
        .and_then(|c| c.setnonblock())
        .with_context(|| format!("open {iface}"))?;
    cap.filter(&format!("udp dst port {port}"), true)
        .context("filter")?;
    eprintln!("ready");

    let start = Instant::now();
    let mut last = None::<Instant>;
    let mut delays: Vec<i64> = Vec::new();
    let mut seen = SeqSet::default();
    let (mut dups, mut reordered, mut max_seq) = (0u64, 0u64, None::<u64>);
    let mut first_seq = None::<u64>;
    while start.elapsed() < duration && last.is_none_or(|t| t.elapsed() < idle) {
        let pkt = match cap.next_packet() {
            Ok(p) => p,
            Err(pcap::Error::TimeoutExpired) => {
                // The timestamps are the kernel's: polling late delays nothing that is measured.
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            Err(e) => return Err(e).context("capture"),
        };
        let Some((seq, sent_ns)) = parse(pkt.data, port, run) else {
            continue;
        };
        last = Some(Instant::now());
        // With nanosecond precision libpcap puts nanoseconds in tv_usec.
        let at_ns = pkt.header.ts.tv_sec as i64 * 1_000_000_000 + pkt.header.ts.tv_usec as i64;
        delays.push(at_ns - sent_ns as i64);
        if !seen.insert(seq) {
            dups += 1;
        }
        if max_seq.is_some_and(|m| seq < m) {
            reordered += 1;
        }
        max_seq = max_seq.max(Some(seq));
        first_seq.get_or_insert(seq);
    }
    let dropped = cap.stats().map(|s| s.dropped + s.if_dropped).unwrap_or(0);
    delays.sort_unstable();
    let pct = |p: f64| -> String {
        if delays.is_empty() {
            return "-".into();
        }
        let i = ((delays.len() as f64 * p).ceil() as usize).clamp(1, delays.len()) - 1;
        format!("{:.1}", delays[i] as f64 / 1000.0)
    };
    println!(
        "received={} unique={} dups={dups} reordered={reordered} first_seq={} last_seq={} dropped_by_kernel={dropped} min_us={} p50_us={} p99_us={} p999_us={} max_us={}",
        delays.len(),
        seen.len,
        first_seq.map_or("-".into(), |s| s.to_string()),
        max_seq.map_or("-".into(), |s| s.to_string()),
        pct(0.0),
        pct(0.50),
        pct(0.99),
        pct(0.999),
        pct(1.0),
    );
    Ok(())
}

/// Returns (seq, send time ns) of one of our datagrams: IPv4, UDP to `port`, our magic and run.
fn parse(frame: &[u8], port: u16, run: u16) -> Option<(u64, u64)> {
    let be16 = |b: &[u8], at: usize| Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?));
    let be64 = |b: &[u8], at: usize| Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?));
    if be16(frame, 12)? != 0x0800 {
        return None;
    }
    let ip = frame.get(14..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    if ip.get(9) != Some(&17) {
        return None;
    }
    let udp = ip.get(ihl..)?;
    if be16(udp, 2)? != port {
        return None;
    }
    let p = udp.get(8..)?;
    if be16(p, 0)? != MAGIC || be16(p, 2)? != run {
        return None;
    }
    Some((be64(p, 4)?, be64(p, 12)?))
}

/// Sequence numbers seen, as a growable bitmap.
#[derive(Default)]
struct SeqSet {
    bits: Vec<u64>,
    len: u64,
}

impl SeqSet {
    /// Adds `seq`; false if it was already there.
    fn insert(&mut self, seq: u64) -> bool {
        // Our sequence numbers stay far below 2^32 (hours at line rate); a wild one is not ours.
        let (word, bit) = (((seq & 0xffff_ffff) / 64) as usize, seq % 64);
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        let fresh = self.bits[word] & (1 << bit) == 0;
        self.bits[word] |= 1 << bit;
        self.len += u64::from(fresh);
        fresh
    }
}
