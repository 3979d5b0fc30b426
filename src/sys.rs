//! The one place with `unsafe`: non-blocking `send(2)`/`sendmsg(2)` on a
//! connection's socket, used by the shard fan-out to write queued frames
//! directly instead of waking each connection's task, and the process's
//! opt-out of transparent huge pages (both measured: see perf/RESULTS.md).

#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;

/// Sends as much of `buf` as the socket takes now, never blocking and never
/// raising SIGPIPE. `Err(WouldBlock)` when the socket buffer is full.
pub fn send_nonblocking(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live slice, valid for reads of `buf.len()` bytes,
    // and the kernel does not keep the pointer. `fd` is the socket of a
    // connection whose shard slot still exists: a slot is removed before its
    // socket is closed (see `conn::driver::Conn`'s `Drop`), and the caller
    // only passes the fd of a slot it just looked up.
    let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Like [`send_nonblocking`], for `first` followed by `second` in one
/// `sendmsg` (an outbox and the shared price log).
pub fn sendv_nonblocking(fd: RawFd, first: &[u8], second: &[u8]) -> io::Result<usize> {
    let mut iov = [
        libc::iovec { iov_base: first.as_ptr() as *mut _, iov_len: first.len() },
        libc::iovec { iov_base: second.as_ptr() as *mut _, iov_len: second.len() },
    ];
    // SAFETY: both iovecs point into live slices valid for reads of their
    // lengths for the duration of the call; the kernel only reads them
    // (`sendmsg`) and keeps no pointer. `msg` is zero-initialised apart from
    // the iovec array, which outlives the call. `fd`: as for `send_nonblocking`.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len() as _;
        libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Opts the process out of transparent huge pages (`PR_SET_THP_DISABLE`).
///
/// The allocator asks for huge pages on its arenas; each first touch then
/// zeroes 2 MiB, and a partly used huge page counts whole in RSS. Measured
/// with 10k idle connections: 2.4 KB instead of 3.0 KB of RSS per
/// connection, and ~9% less CPU per new connection. The same advice servers
/// such as Redis give for latency-sensitive processes.
pub fn disable_transparent_huge_pages() -> io::Result<()> {
    // SAFETY: PR_SET_THP_DISABLE takes plain integer arguments and touches
    // no memory of ours.
    let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
