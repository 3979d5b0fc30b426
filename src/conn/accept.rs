//! Taking connections off a shard's listener.
//!
//! Owns: binding the shard's `SO_REUSEPORT` listener, and the accept loop:
//! `accept4` until nothing is pending (the peer's address comes with it),
//! then a one-shot poll on a small io_uring of the shard's own waits for
//! the next (glommio's own accept is the fallback when the kernel refuses
//! the ring). Each socket gets a task of its own (`upgrade::serve`).
//! Failed accepts (typically out of descriptors: the connection waits in
//! the backlog) are counted and logged at a bounded rate, and the loop
//! backs off instead of spinning.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use glommio::spawn_local;

use super::{upgrade, ShardCtx};
use crate::shard::StepAside;

/// Connections accepted before the accept loop lets other tasks run.
const ACCEPT_BUDGET: usize = 64;

/// This shard's listening socket (`SO_REUSEPORT`, so every shard has its
/// own), non-blocking. `SO_REUSEADDR` too: connections accepted from it
/// inherit the flag, so those still closing after this process exits
/// (FIN_WAIT2, TIME_WAIT) do not fail the next instance's port check.
/// And `TCP_NODELAY`, which Linux's accepted sockets inherit as well: no
/// `setsockopt` per connection (the accept loop checks the first one).
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_port(true)?;
    sock.set_reuse_address(true)?;
    sock.set_nodelay(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// Accepts connections until the task is dropped. Each wake-up takes every
/// pending connection with one `accept4` each (the peer's address comes
/// with it); then a one-shot poll on a small io_uring of the shard's own
/// waits for the next. glommio's `accept` costs three `fcntl` calls per
/// connection (it switches the listener to non-blocking and back around
/// each call) and the address a `getpeername` more; it is the fallback
/// when the kernel refuses the ring.
pub(crate) async fn accept_loop(listener: socket2::Socket, ctx: Rc<ShardCtx>) {
    let (mut ring, signal) = match crate::sys::PollRing::new(4) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(shard = ctx.id, error = %e, "no poll ring for the listener: glommio accepts");
            return glommio_accept_loop(listener, ctx).await;
        }
    };
    let mut completions = Vec::new();
    let mut aside = StepAside::default();
    // Whether accepted sockets come with the listener's TCP_NODELAY (Linux
    // copies it); learned from the first, set on each otherwise.
    let mut inherits_nodelay = None;
    loop {
        ctx.after_fanout(&mut aside).await;
        let mut accepted = 0;
        let mut backoff = false;
        while accepted < ACCEPT_BUDGET {
            match crate::sys::accept(std::os::fd::AsFd::as_fd(&listener)) {
                Ok((sock, peer)) => {
                    accepted += 1;
                    let Some(peer) = peer.as_socket() else { continue };
                    if !*inherits_nodelay.get_or_insert_with(|| sock.nodelay().unwrap_or(false)) {
                        let _ = sock.set_nodelay(true);
                    }
                    let stream = crate::sys::tcp_stream(sock.into());
                    spawn_local(upgrade::serve(stream, peer, ctx.clone())).detach();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e)
                    if matches!(e.kind(), std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionAborted) => {}
                Err(e) => {
                    accept_failed(&ctx, &e);
                    backoff = true;
                    break;
                }
            }
        }
        if backoff {
            // Typically EMFILE: the connection stays pending, so back off
            // instead of spinning on a listener that stays readable.
            glommio::timer::sleep(Duration::from_millis(10)).await;
            continue;
        }
        if accepted == ACCEPT_BUDGET {
            glommio::yield_if_needed().await;
            continue;
        }
        // Nothing pending: wait until the listener is readable.
        let waited = match ring.poll_once(std::os::fd::AsFd::as_fd(&listener), 0) {
            Ok(()) => signal.read_at(0, 8).await.map(drop).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        ring.drain(&mut completions);
        completions.clear();
        if let Err(e) = waited {
            accept_failed(&ctx, &e);
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn accept_failed(ctx: &ShardCtx, e: &dyn std::fmt::Display) {
    ctx.stats.accept_failures.inc();
    if let Some(suppressed) = ctx.accept_log.allow() {
        tracing::warn!(shard = ctx.id, error = %e, suppressed, "accept failed");
    }
}

/// glommio's own accept, for a kernel that gave no poll ring.
async fn glommio_accept_loop(listener: socket2::Socket, ctx: Rc<ShardCtx>) {
    if let Err(e) = listener.set_nonblocking(false) {
        accept_failed(&ctx, &e);
        return;
    }
    let listener = crate::sys::glommio_listener(listener.into());
    loop {
        match listener.accept().await {
            Ok(stream) => match stream.peer_addr() {
                Ok(peer) => {
                    let _ = stream.set_nodelay(true);
                    spawn_local(upgrade::serve(stream, peer, ctx.clone())).detach();
                }
                Err(e) => accept_failed(&ctx, &e),
            },
            Err(e) => {
                accept_failed(&ctx, &e);
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
        glommio::yield_if_needed().await;
    }
}
