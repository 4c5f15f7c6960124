//! Batched datagram sends: up to 64 messages per `sendmmsg` call, each gathered from its parts
//! without copying, and what became of each message, by index.

use std::io::IoSlice;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrLike, SockaddrStorage, sendmmsg};

/// Messages per `sendmmsg` call.
const BATCH: usize = 64;

/// Sends each of `messages` as one datagram on `fd`, in order, up to 64 per system call
/// (`sendmmsg`), and tells `outcome` what became of each, by index.
pub fn send_each<const N: usize>(
    fd: BorrowedFd<'_>,
    messages: &[[IoSlice<'_>; N]],
    outcome: impl FnMut(usize, Result<(), Errno>),
) {
    // No per-message address: the socket is bound or connected. `()` also makes reading the
    // results sound, as nothing uninitialized is read back.
    let no_address = [None::<()>; BATCH];
    let mut headers = MultiHeaders::<()>::preallocate(messages.len().min(BATCH), None);
    let send = |chunk: Range<usize>| {
        sendmmsg(
            fd.as_raw_fd(),
            &mut headers,
            &messages[chunk.clone()],
            &no_address[..chunk.len()],
            [],
            MsgFlags::empty(),
        )
        .map(Iterator::count)
    };
    send_batches(messages.len(), send, outcome);
}

/// [`send_each`] on a socket that is not connected: every message goes to `to`. nix's
/// `sendmmsg` would read back an uninitialized address per message here, so this calls libc's.
pub fn send_each_to<const N: usize>(
    fd: BorrowedFd<'_>,
    to: &SockaddrStorage,
    messages: &[[IoSlice<'_>; N]],
    outcome: impl FnMut(usize, Result<(), Errno>),
) {
    let send = |chunk: Range<usize>| {
        let mut headers: Vec<libc::mmsghdr> = messages[chunk]
            .iter()
            .map(|message| {
                // SAFETY: msghdr is plain data (pointers and integers): all zeroes is a valid
                // value, the empty message with no name and no control data.
                let mut msg_hdr: libc::msghdr = unsafe { std::mem::zeroed() };
                msg_hdr.msg_name = to.as_ptr().cast_mut().cast();
                msg_hdr.msg_namelen = to.len();
                // IoSlice is ABI-compatible with iovec (std guarantees it on Unix).
                msg_hdr.msg_iov = message.as_ptr().cast_mut().cast();
                msg_hdr.msg_iovlen = N;
                libc::mmsghdr {
                    msg_hdr,
                    msg_len: 0,
                }
            })
            .collect();
        // SAFETY: every header points at `to` and at one message's IoSlices, all borrowed for
        // this call; the kernel only reads them and writes each header's `msg_len`. The count is
        // the vector's length, at most BATCH.
        let sent = unsafe {
            libc::sendmmsg(
                fd.as_raw_fd(),
                headers.as_mut_ptr(),
                headers.len() as libc::c_uint,
                0,
            )
        };
        Errno::result(sent).map(|n| n as usize)
    };
    send_batches(messages.len(), send, outcome);
}

/// Sends `count` messages in chunks of at most [`BATCH`] with `send` (which returns how many of
/// a chunk the kernel took), telling `outcome` what became of each, by index.
fn send_batches(
    count: usize,
    mut send: impl FnMut(Range<usize>) -> Result<usize, Errno>,
    mut outcome: impl FnMut(usize, Result<(), Errno>),
) {
    let mut next = 0;
    while next < count {
        let result = send(next..count.min(next + BATCH));
        // The kernel stops at the first message it refuses, having sent those before it; that
        // one's error comes back when the next call starts with it.
        match result {
            Ok(0) => {
                outcome(next, Err(Errno::EIO));
                next += 1;
            }
            Ok(sent) => {
                (next..next + sent).for_each(|i| outcome(i, Ok(())));
                next += sent;
            }
            Err(Errno::EINTR) => {}
            Err(e) => {
                outcome(next, Err(e));
                next += 1;
            }
        }
    }
}
