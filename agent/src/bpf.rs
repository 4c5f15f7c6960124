//! The process behind every TCP connect, however briefly it lived: a BPF program on the raw
//! tracepoint `inet_sock_set_state` (`agent/bpf/connect.bpf.c`, compiled by `build.rs`).
//!
//! At SYN_SENT the kernel runs in the connecting process's context: the program remembers the
//! socket's process (tgid, comm) there, and at the socket's next transition (ESTABLISHED, or
//! CLOSE for a refused or failed connect), when the source port has been chosen, it sends the
//! whole 4-tuple with that process to user space through a ring buffer. A thread reads the ring
//! into a bounded queue that the next snapshot drains (`crate::report`). Nothing waits: a full
//! ring or a full queue drops the connect and counts it by reason.
//!
//! Where the kernel does not allow it (no CAP_BPF/CAP_SYS_ADMIN, no BTF, an old kernel) or the
//! configuration turns it off, [`Tracer::start`] says why, and the agent keeps the SYN-ACK
//! capture alone (`crate::shortlived`): Hello's capabilities carry the reason, and client rows
//! whose process is unknown carry [`NO_BPF_NOTE`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aya::Ebpf;
use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::RawTracePoint;

/// The compiled program (see `build.rs`), aligned as the ELF parser wants it.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/connect.bpf.o"));

/// The note on a client row whose process no table read could name, where no BPF program runs.
pub const NO_BPF_NOTE: &str = "process unknown: no BPF on this host";
/// The same where the program runs but missed the connect (dropped, or made before it started).
pub const MISSED_NOTE: &str = "process unknown: not seen by BPF";

/// Size of one event as the program writes it (`struct event` in connect.bpf.c).
pub const EVENT_SIZE: usize = 64;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const TCP_ESTABLISHED: u8 = 1;
const TCP_CLOSE: u8 = 7;

/// One finished connect.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Connect {
    /// The connecting process (its thread group id, the pid users know).
    pub tgid: u32,
    /// `comm` of the connecting thread, at most 15 bytes.
    pub comm: String,
    /// The socket's network namespace inode.
    pub netns: u32,
    /// IPv4-mapped IPv6 is normalised to IPv4, as in the tables.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// False: the connect failed (refused, timed out, unreachable) before establishing.
    pub established: bool,
    /// True: not a connect but a connection this host accepted (`local` is the server's end);
    /// no process (softirq context): the listener names the server.
    pub accepted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("BPF event of {0} bytes, expected {EVENT_SIZE}")]
    Size(usize),
    #[error("BPF event of address family {0}, expected AF_INET (2) or AF_INET6 (10)")]
    Family(u16),
    #[error("BPF event with TCP state {0} after SYN_SENT, expected ESTABLISHED (1) or CLOSE (7)")]
    Outcome(u8),
    #[error("BPF event of side {0}, expected 0 (connected) or 1 (accepted)")]
    Side(u8),
}

/// Reads one event as `connect.bpf.c` lays it out: host byte order for the numbers (the program
/// and the agent run on one machine), network order for the addresses.
pub fn parse(bytes: &[u8]) -> Result<Connect, ParseError> {
    let b: &[u8; EVENT_SIZE] = bytes
        .try_into()
        .map_err(|_| ParseError::Size(bytes.len()))?;
    let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
    let u32_at = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let family = u16_at(8);
    let (sport, dport, outcome) = (u16_at(10), u16_at(12), b[14]);
    let addr = |at: usize| -> IpAddr {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&b[at..at + 16]);
        if family == AF_INET {
            IpAddr::V4(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(octets)).to_canonical()
        }
    };
    if family != AF_INET && family != AF_INET6 {
        return Err(ParseError::Family(family));
    }
    let established = match outcome {
        TCP_ESTABLISHED => true,
        TCP_CLOSE => false,
        other => return Err(ParseError::Outcome(other)),
    };
    let accepted = match b[15] {
        0 => false,
        1 => true,
        other => return Err(ParseError::Side(other)),
    };
    let comm = &b[48..64];
    let end = comm.iter().position(|&c| c == 0).unwrap_or(comm.len());
    Ok(Connect {
        tgid: u32_at(0),
        netns: u32_at(4),
        comm: String::from_utf8_lossy(&comm[..end]).into_owned(),
        local: SocketAddr::new(addr(16), sport),
        remote: SocketAddr::new(addr(32), dport),
        established,
        accepted,
    })
}

/// Counters of the tracer, shown on `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connects read from the ring.
    pub seen: AtomicU64,
    /// Dropped in the kernel: the ring was full (`reason="ring_full"`).
    pub ring_full: AtomicU64,
    /// Dropped by the reader: more distinct connections between two snapshots than it keeps
    /// (`reason="queue_full"`, see [`QUEUE`]).
    pub queue_full: AtomicU64,
    /// Events that did not parse (`reason="malformed"`): a program and agent out of step.
    pub malformed: AtomicU64,
}

/// Whether the tracer runs, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Running,
    Off(String),
}

/// A running tracer: the reading thread owns the loaded program; dropping the tracer ends the
/// thread within a tick, which detaches the program.
pub struct Tracer {
    pending: Arc<Mutex<Pending>>,
    stop: Arc<AtomicBool>,
}

/// What a snapshot row is made of: connects that differ only by client port, pid or outcome make
/// one row, so the reader keeps one of them (a CLI run 2,000 times a minute against one server
/// is one entry here, not 2,000 queued events).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    netns: u32,
    accepted: bool,
    local: IpAddr,
    remote: IpAddr,
    server_port: u16,
    comm: String,
}

impl Key {
    fn of(c: &Connect) -> Self {
        Key {
            netns: c.netns,
            accepted: c.accepted,
            local: c.local.ip(),
            remote: c.remote.ip(),
            server_port: if c.accepted {
                c.local.port()
            } else {
                c.remote.port()
            },
            comm: c.comm.clone(),
        }
    }
}

/// The connects read since the last snapshot, one per [`Key`].
type Pending = HashMap<Key, Connect>;

impl Drop for Tracer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Distinct connections (by [`Key`]) kept between two snapshots at most; past it they are
/// counted, not kept. Repeats of a kept one never count against it.
pub const QUEUE: usize = 16_384;

impl Tracer {
    /// Loads and attaches the program, and starts the thread reading its ring. `netns`: the
    /// namespaces whose connects are wanted (`None`: every one). Fails with the reason when the
    /// kernel refuses (no privilege, no BTF, no ring buffer, …).
    pub fn start(counters: Arc<Counters>, netns: Option<u32>) -> Result<Self, String> {
        raise_memlock();
        let mut ebpf = Ebpf::load(OBJECT).map_err(|e| reason(&anyhow::Error::from(e)))?;
        let program: &mut RawTracePoint = ebpf
            .program_mut("inet_sock_set_state")
            .ok_or("the BPF object has no program inet_sock_set_state")?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| reason(&e.into()))?;
        program.load().map_err(|e| reason(&e.into()))?;
        program
            .attach("inet_sock_set_state")
            .map_err(|e| reason(&e.into()))?;
        let ring = RingBuf::try_from(ebpf.take_map("EVENTS").ok_or("no map EVENTS")?)
            .map_err(|e| reason(&e.into()))?;
        let full = PerCpuArray::<MapData, u64>::try_from(
            ebpf.take_map("RING_FULL").ok_or("no map RING_FULL")?,
        )
        .map_err(|e| reason(&e.into()))?;
        let pending = Arc::new(Mutex::new(Pending::new()));
        let tx = pending.clone();
        let c = counters;
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        std::thread::Builder::new()
            .name("bpf-connect".into())
            .spawn(move || run(ebpf, ring, full, netns, tx, &c, &thread_stop))
            .map_err(|e| format!("cannot start the BPF reader thread: {e}"))?;
        Ok(Self { pending, stop })
    }

    /// The connects since the last call, one per row they make.
    pub fn drain(&self) -> Vec<Connect> {
        let taken = std::mem::take(&mut *lock(&self.pending));
        taken.into_values().collect()
    }
}

/// An error and its causes on one line: aya's top-level messages alone ("error loading program")
/// would not tell an operator what the kernel said.
fn reason(e: &anyhow::Error) -> String {
    // aya's messages often repeat their source's: say each part once.
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    let text = parts.join(": ");
    if text.contains("Operation not permitted") || text.contains("EPERM") {
        format!("{text} (needs CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN)")
    } else {
        text
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones to the cgroup. Best effort.
fn raise_memlock() {
    use nix::sys::resource::{Resource, setrlimit};
    let _ = setrlimit(
        Resource::RLIMIT_MEMLOCK,
        nix::sys::resource::RLIM_INFINITY,
        nix::sys::resource::RLIM_INFINITY,
    );
}

/// A poisoned lock only means a panic elsewhere mid-update of a map of plain values: keep going.
fn lock(pending: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    pending.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts `connect` and keeps it for the next snapshot unless one of its row is kept already;
/// a new row past [`QUEUE`] is dropped and counted.
fn hand_over(connect: Connect, pending: &mut Pending, counters: &Counters) {
    counters.seen.fetch_add(1, Ordering::Relaxed);
    let key = Key::of(&connect);
    if let Some(kept) = pending.get_mut(&key) {
        kept.tgid = kept.tgid.min(connect.tgid);
    } else if pending.len() >= QUEUE {
        counters.queue_full.fetch_add(1, Ordering::Relaxed);
    } else {
        pending.insert(key, connect);
    }
}

/// How often the thread reads the ring: the program wakes it only when the ring is half full (a
/// wake-up per connection would cost more than the rest), so this is what bounds the delay, well
/// under any snapshot interval. Also when it notices the reporter has gone, and reads the
/// kernel's drop counter.
const TICK: Duration = Duration::from_millis(250);

fn run(
    // Held for as long as the thread reads: dropping it detaches the program.
    _program: Ebpf,
    mut ring: RingBuf<MapData>,
    full: PerCpuArray<MapData, u64>,
    netns: Option<u32>,
    pending: Arc<Mutex<Pending>>,
    counters: &Counters,
    stop: &AtomicBool,
) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut last_tick = Instant::now();
    loop {
        // Everything the ring holds, then wait for more.
        let mut kept = lock(&pending);
        while let Some(item) = ring.next() {
            match parse(&item) {
                Ok(connect) => {
                    if netns.is_some_and(|n| n != connect.netns) {
                        continue;
                    }
                    hand_over(connect, &mut kept, counters);
                }
                Err(error) => {
                    if counters.malformed.fetch_add(1, Ordering::Relaxed) == 0 {
                        tracing::warn!(%error, "BPF connect event skipped");
                    }
                }
            }
        }
        drop(kept);
        if last_tick.elapsed() >= TICK {
            last_tick = Instant::now();
            if let Ok(per_cpu) = full.get(&0, 0) {
                counters
                    .ring_full
                    .store(per_cpu.iter().sum(), Ordering::Relaxed);
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
        }
        let mut fds = [PollFd::new(ring.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(TICK.as_millis() as u16));
    }
}

/// The network namespace inode of this process (`/proc/self/ns/net`).
pub fn own_netns() -> Option<u32> {
    crate::snapshot::netns::inode_of(std::path::Path::new("/proc/self/ns/net"))
        .ok()
        .and_then(|i| u32::try_from(i).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event laid out as connect.bpf.c writes it.
    fn event(
        family: u16,
        local: ([u8; 16], u16),
        remote: ([u8; 16], u16),
        outcome: u8,
        comm: &[u8],
    ) -> Vec<u8> {
        let mut b = vec![0u8; EVENT_SIZE];
        b[0..4].copy_from_slice(&4242u32.to_ne_bytes());
        b[4..8].copy_from_slice(&4026531840u32.to_ne_bytes());
        b[8..10].copy_from_slice(&family.to_ne_bytes());
        b[10..12].copy_from_slice(&local.1.to_ne_bytes());
        b[12..14].copy_from_slice(&remote.1.to_ne_bytes());
        b[14] = outcome;
        b[16..32].copy_from_slice(&local.0);
        b[32..48].copy_from_slice(&remote.0);
        b[48..48 + comm.len()].copy_from_slice(comm);
        b
    }

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut o = [0u8; 16];
        o[..4].copy_from_slice(&a);
        o
    }

    #[test]
    fn an_ipv4_connect_names_its_process_and_both_ends() {
        let e = event(
            AF_INET,
            (v4([10, 0, 0, 1]), 40000),
            (v4([10, 0, 0, 2]), 6379),
            TCP_ESTABLISHED,
            b"redis-cli",
        );
        let c = parse(&e).unwrap();
        assert_eq!(c.tgid, 4242);
        assert_eq!(c.netns, 4026531840);
        assert_eq!(c.comm, "redis-cli");
        assert_eq!(c.local, "10.0.0.1:40000".parse().unwrap());
        assert_eq!(c.remote, "10.0.0.2:6379".parse().unwrap());
        assert!(c.established);
        assert!(!c.accepted);
        let mut accepted = e.clone();
        accepted[15] = 1;
        let a = parse(&accepted).unwrap();
        assert!(
            a.accepted,
            "this host accepted it: the server's end is local"
        );
        assert_eq!(a.local, c.local);
    }

    #[test]
    fn ipv6_and_mapped_addresses_read_as_the_tables_do() {
        let six: Ipv6Addr = "fd00::1".parse().unwrap();
        let mapped: Ipv6Addr = "::ffff:10.0.0.2".parse().unwrap();
        let e = event(
            AF_INET6,
            (six.octets(), 50000),
            (mapped.octets(), 80),
            TCP_CLOSE,
            b"curl",
        );
        let c = parse(&e).unwrap();
        assert_eq!(c.local, "[fd00::1]:50000".parse().unwrap());
        assert_eq!(c.remote, "10.0.0.2:80".parse().unwrap(), "mapped → IPv4");
        assert!(!c.established, "closed from SYN_SENT: refused");
    }

    #[test]
    fn a_comm_of_the_full_16_bytes_and_one_not_utf8_are_kept() {
        let e = event(
            AF_INET,
            (v4([1, 1, 1, 1]), 1),
            (v4([2, 2, 2, 2]), 2),
            1,
            b"0123456789abcdef",
        );
        assert_eq!(parse(&e).unwrap().comm, "0123456789abcdef");
        let e = event(
            AF_INET,
            (v4([1, 1, 1, 1]), 1),
            (v4([2, 2, 2, 2]), 2),
            1,
            b"a\xffb",
        );
        assert_eq!(parse(&e).unwrap().comm, "a\u{fffd}b");
    }

    #[test]
    fn bad_events_are_refused_naming_what_is_wrong() {
        let good = event(
            AF_INET,
            (v4([1, 1, 1, 1]), 1),
            (v4([2, 2, 2, 2]), 2),
            1,
            b"x",
        );
        assert_eq!(parse(&good[..63]), Err(ParseError::Size(63)));
        assert_eq!(
            parse(&[good.clone(), vec![0]].concat()),
            Err(ParseError::Size(65))
        );
        let mut unix = good.clone();
        unix[8..10].copy_from_slice(&1u16.to_ne_bytes());
        assert_eq!(parse(&unix), Err(ParseError::Family(1)));
        let mut side = good.clone();
        side[15] = 2;
        assert_eq!(parse(&side), Err(ParseError::Side(2)));
        let mut listen = good;
        listen[14] = 10;
        let error = parse(&listen).unwrap_err();
        assert_eq!(error, ParseError::Outcome(10));
        assert!(error.to_string().contains("state 10"), "{error}");
        // Any 64 bytes parse or are refused, never panic.
        for seed in 0u8..=255 {
            let bytes: Vec<u8> = (0..64u8)
                .map(|i| i.wrapping_mul(seed).wrapping_add(seed))
                .collect();
            let _ = parse(&bytes);
        }
    }

    #[test]
    fn repeats_make_one_row_and_new_rows_past_the_bound_are_dropped_and_counted() {
        let counters = Counters::default();
        let mut pending = Pending::new();
        let e = event(
            AF_INET,
            (v4([1, 1, 1, 1]), 1),
            (v4([2, 2, 2, 2]), 80),
            1,
            b"curl",
        );
        let c = parse(&e).unwrap();
        // The same client run again and again: other pids, other source ports, one row.
        for i in 0..1000u16 {
            let mut again = c.clone();
            again.tgid = 5000 - u32::from(i);
            again.local.set_port(30_000 + i);
            hand_over(again, &mut pending, &counters);
        }
        assert_eq!(pending.len(), 1);
        assert_eq!(
            pending.values().next().unwrap().tgid,
            4001,
            "the lowest pid"
        );
        // Its server side is another row; then rows to other ports until the bound.
        let mut accepted = c.clone();
        accepted.accepted = true;
        hand_over(accepted, &mut pending, &counters);
        for port in 0..(QUEUE as u16) {
            let mut other = c.clone();
            other.remote.set_port(1000 + port);
            hand_over(other, &mut pending, &counters);
        }
        assert_eq!(pending.len(), QUEUE);
        assert_eq!(
            counters.queue_full.load(Ordering::Relaxed),
            2,
            "the two rows past the bound"
        );
        assert_eq!(
            counters.seen.load(Ordering::Relaxed),
            1000 + 1 + QUEUE as u64
        );
        // A repeat of a kept row still fits.
        hand_over(c, &mut pending, &counters);
        assert_eq!(counters.queue_full.load(Ordering::Relaxed), 2);
    }

    /// Needs root (CAP_BPF): loads the real program and sees this process connect over
    /// loopback, with its own name and both ports. Skipped, loudly, without the privilege.
    #[test]
    fn the_program_names_this_process_on_a_real_connect() {
        let counters = Arc::new(Counters::default());
        let tracer = match Tracer::start(counters.clone(), own_netns()) {
            Ok(t) => t,
            Err(why)
                if !nix::unistd::Uid::effective().is_root() || why.contains("not permitted") =>
            {
                eprintln!("SKIPPED: BPF is not permitted to this test: {why}");
                return;
            }
            Err(why) => panic!("BPF did not load as root: {why}"),
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(server).unwrap();
        let local = client.local_addr().unwrap();
        // A refused connect: a port nobody listens on (bound, never listening).
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let _ = std::net::TcpStream::connect(closed_addr);
        let pid = std::process::id();
        let mut seen = Vec::new();
        for _ in 0..200 {
            seen.extend(
                tracer
                    .drain()
                    .into_iter()
                    .filter(|c| c.tgid == pid || c.accepted),
            );
            if seen.iter().any(|c| c.local == local)
                && seen.iter().any(|c| !c.established)
                && seen.iter().any(|c| c.accepted && c.remote == local)
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let ok = seen
            .iter()
            .find(|c| c.local == local && !c.accepted)
            .expect("the connect");
        assert_eq!(ok.remote, server);
        assert!(ok.established);
        let name = std::fs::read_to_string("/proc/thread-self/comm").unwrap();
        assert_eq!(ok.comm, name.trim_end());
        let accept = seen
            .iter()
            .find(|c| c.accepted && c.remote == local)
            .expect("the accept");
        assert_eq!(accept.local, server, "the server's end, with its port");
        assert_eq!((accept.tgid, accept.comm.as_str()), (0, ""), "no process");
        let refused = seen.iter().find(|c| !c.established).expect("the refusal");
        assert_eq!(refused.remote, closed_addr);
        assert_ne!(refused.local.port(), 0, "the source port is known at CLOSE");
    }
}
