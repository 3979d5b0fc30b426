//! The one place with `unsafe`: a non-blocking `send(2)` on a connection's
//! socket, used by the shard fan-out to write queued frames directly instead
//! of waking each connection's task (measured: see perf/RESULTS.md).

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
