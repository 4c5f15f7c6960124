//! What the agent's two netlink dump readers share (sock_diag in [`super::diag`], ctnetlink in
//! [`super::conntrack`]): a socket kept across dumps, bound to the namespace it was opened in,
//! with its receive buffer; the dump's sequence number; and the draining of a dump abandoned
//! part-way, which the kernel would otherwise answer the next one with EBUSY for.

#![forbid(unsafe_code)]

use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, recv, send, setsockopt, socket,
    sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};

// include/uapi/linux/netlink.h
pub(super) const NLMSG_HDRLEN: usize = 16;
pub(super) const NLMSG_NOOP: u16 = 1;
pub(super) const NLMSG_ERROR: u16 = 2;
pub(super) const NLMSG_DONE: u16 = 3;
pub(super) const NLM_F_REQUEST: u16 = 0x01;
/// `NLM_F_ROOT | NLM_F_MATCH`.
pub(super) const NLM_F_DUMP: u16 = 0x300;

/// Kernel dump datagrams are at most 32 KiB (`netlink_recvmsg` caps `max_recvmsg_len`), so this
/// always holds one whole.
const RECV_BUF_LEN: usize = 32 * 1024;
/// A dump is answered synchronously; a receive that waits this long means the kernel will not
/// answer, and the snapshot must not hang on it.
const RECV_TIMEOUT_SECS: i64 = 5;

/// Why the next datagram of a dump could not be had.
#[derive(Debug)]
pub(super) enum Recv {
    Failed(Errno),
    /// The datagram was longer than the buffer (it cannot be, for a kernel dump).
    Truncated {
        len: usize,
        cap: usize,
    },
}

/// A netlink socket for dumps, its buffer, and where its dump stands.
pub(super) struct DumpSocket {
    pub(super) fd: OwnedFd,
    pub(super) buf: Box<[u8]>,
    pub(super) seq: u32,
    /// A dump was abandoned part-way (bad datagram, receive error): the next one drains it.
    pub(super) unfinished: bool,
}

impl fmt::Debug for DumpSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DumpSocket")
            .field("fd", &self.fd)
            .field("seq", &self.seq)
            .field("unfinished", &self.unfinished)
            .finish_non_exhaustive()
    }
}

impl DumpSocket {
    /// A socket of `protocol` in the calling thread's network namespace.
    pub(super) fn open(protocol: SockProtocol) -> nix::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            protocol,
        )?;
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &TimeVal::seconds(RECV_TIMEOUT_SECS),
        )?;
        Ok(Self::on(fd))
    }

    /// A socket whose every dump fails at `send`: an unconnected Unix one.
    #[cfg(test)]
    pub(super) fn unconnected() -> nix::Result<Self> {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        Ok(Self::on(fd))
    }

    fn on(fd: OwnedFd) -> Self {
        Self {
            fd,
            buf: vec![0; RECV_BUF_LEN].into_boxed_slice(),
            seq: 0,
            unfinished: false,
        }
    }

    /// Sends the request `make(seq)` builds for a new dump, numbered `seq` (returned), after
    /// draining one left part-way. An error names the step: `draining an abandoned dump`, `send`.
    pub(super) fn start<R: AsRef<[u8]>>(
        &mut self,
        make: impl FnOnce(u32) -> R,
    ) -> Result<u32, (&'static str, Errno)> {
        if self.unfinished {
            self.drain()
                .map_err(|e| ("draining an abandoned dump", e))?;
        }
        self.seq = self.seq.wrapping_add(1);
        let request = make(self.seq);
        retry_eintr(|| send(self.fd.as_raw_fd(), request.as_ref(), MsgFlags::empty()))
            .map_err(|e| ("send", e))?;
        self.unfinished = true;
        Ok(self.seq)
    }

    /// The dump's next datagram.
    pub(super) fn next(&mut self) -> Result<&[u8], Recv> {
        // MSG_TRUNC: netlink then returns the datagram's full length, so truncation shows.
        let len = retry_eintr(|| recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::MSG_TRUNC))
            .map_err(Recv::Failed)?;
        let cap = self.buf.len();
        self.buf.get(..len).ok_or(Recv::Truncated { len, cap })
    }

    /// The dump ended (its last message, or the kernel's error, was read).
    pub(super) fn finished(&mut self) {
        self.unfinished = false;
    }

    /// Reads and drops what is left of an abandoned dump. The kernel builds the next datagram of
    /// a dump inside the `recv` that takes the previous one, so an empty queue means it is over.
    fn drain(&mut self) -> Result<(), Errno> {
        loop {
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC;
            match recv(self.fd.as_raw_fd(), &mut self.buf, flags) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => break,
                Err(err) => return Err(err),
            }
        }
        self.unfinished = false;
        Ok(())
    }
}

pub(super) fn retry_eintr<T>(mut f: impl FnMut() -> nix::Result<T>) -> nix::Result<T> {
    loop {
        match f() {
            Err(Errno::EINTR) => {}
            other => return other,
        }
    }
}
