//! `struct tcp_info` (include/uapi/linux/tcp.h), as sock_diag returns it in the `INET_DIAG_INFO`
//! attribute of a dump or of a destroy notification: the few cumulative counters and RTTs an
//! edge carries.
//!
//! The struct grows with kernel versions and the kernel sends as much of it as it has: a field
//! is read only when the attribute's length covers it, and is zero otherwise (`bytes_acked` and
//! `bytes_received` came in 4.1, `segs_out`/`segs_in` 4.2, `min_rtt` 4.6). Fields are in host
//! byte order.

#![forbid(unsafe_code)]

// Offsets in `struct tcp_info`, checked against the 6.18 header with offsetof.
const RTT: usize = 68;
const TOTAL_RETRANS: usize = 100;
const BYTES_ACKED: usize = 120;
const BYTES_RECEIVED: usize = 128;
const SEGS_OUT: usize = 136;
const SEGS_IN: usize = 140;
const MIN_RTT: usize = 148;
const BYTES_SENT: usize = 200;
const BYTES_RETRANS: usize = 208;
/// The shortest `tcp_info` any kernel with sock_diag sends (3.x: up to `tcpi_total_retrans`).
pub const MIN_LEN: usize = TOTAL_RETRANS + 4;

/// One TCP socket's counters since it was created, and its current RTTs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TcpInfo {
    /// The socket's `idiag_cookie`: the same in a dump and in the socket's destroy notification,
    /// never reused while the kernel runs.
    pub cookie: u64,
    /// Payload bytes sent, each once: `tcpi_bytes_sent - tcpi_bytes_retrans` (4.19+). Older
    /// kernels: `tcpi_bytes_acked`, which also counts the client's SYN and an acked FIN as a
    /// byte each, and leaves out what is still in flight.
    pub bytes_sent: u64,
    /// Payload bytes received in order (`tcpi_bytes_received`).
    pub bytes_received: u64,
    pub segs_out: u64,
    pub segs_in: u64,
    /// Segments retransmitted (`tcpi_total_retrans`).
    pub retransmits: u64,
    /// Smoothed RTT, µs; 0 before the first sample.
    pub srtt_us: u32,
    /// The lowest RTT seen (windowed), µs; 0 when unknown (no sample, or a kernel before 4.6).
    pub min_rtt_us: u32,
    /// The peer's FIN is known to have come (the socket's state says so) and `bytes_received`
    /// was corrected for it: the kernel counts a FIN as a byte received.
    pub peer_fin: bool,
}

/// Why an `INET_DIAG_INFO` attribute was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("tcp_info of {len} bytes is shorter than the {MIN_LEN} every kernel sends")]
pub struct TooShort {
    pub len: usize,
}

/// Reads the counters of a `tcp_info` of any kernel's length; `cookie` is the socket's.
pub fn parse(info: &[u8], cookie: u64) -> Result<TcpInfo, TooShort> {
    if info.len() < MIN_LEN {
        return Err(TooShort { len: info.len() });
    }
    let u32_at = |at: usize| {
        info.get(at..at + 4)
            .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |at: usize| {
        info.get(at..at + 8).map_or(0, |b| {
            u64::from_ne_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
        })
    };
    Ok(TcpInfo {
        cookie,
        bytes_sent: if info.len() >= BYTES_RETRANS + 8 {
            u64_at(BYTES_SENT).saturating_sub(u64_at(BYTES_RETRANS))
        } else {
            u64_at(BYTES_ACKED)
        },
        bytes_received: u64_at(BYTES_RECEIVED),
        segs_out: u64::from(u32_at(SEGS_OUT)),
        segs_in: u64::from(u32_at(SEGS_IN)),
        retransmits: u64::from(u32_at(TOTAL_RETRANS)),
        srtt_us: u32_at(RTT),
        // `~0U` until the first sample.
        min_rtt_us: match u32_at(MIN_RTT) {
            u32::MAX => 0,
            rtt => rtt,
        },
        peer_fin: false,
    })
}
