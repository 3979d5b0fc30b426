//! The HTTP phase of a connection: read the request head (bounded in size
//! and time), serve the HTTP endpoints, or apply the refusals of PROTOCOL.md
//! §1 and upgrade to WebSocket.
//!
//! Owns: client-IP resolution (trusted proxies), the origin allowlist, the IP
//! whitelist, taking a connection slot from `limits`, and bearer-token auth
//! on the upgrade request. Once upgraded, the same task runs the WebSocket
//! phase (`driver.rs`) on the socket.

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;

use futures_lite::future;
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use ipnet::IpNet;

use super::driver::{self, Start};
use super::ShardCtx;
use crate::auth::Verification;
use crate::cluster::IpVerdict;
use crate::protocol::channel::ChannelName;
use crate::protocol::handshake::{
    bearer_token, parse_head, route, write_refusal, write_switching_protocols, Parsed, Refusal, RequestHead, Route,
    MAX_HEAD_BYTES,
};
use crate::shard::StepAside;
use crate::stream::Stream;

/// Bytes read per call while the head is incomplete.
const HEAD_READ: usize = 2048;

/// A connection's task, from accept to close: the HTTP phase, then (once
/// upgraded) the WebSocket phase, `driver.rs`'s [`driver::Pump`]. The
/// HTTP phase is boxed, so its memory (the socket it was given, the
/// request head, the TLS handshake, its deadline) is freed before the
/// WebSocket phase and is not part of the task for the connection's
/// lifetime: the task holds the box's pointer, then the `Pump`. (Not an
/// `async fn`: its arguments would stay in the task's future.)
pub fn serve(tcp: TcpStream, peer: SocketAddr, ctx: Rc<ShardCtx>) -> impl std::future::Future<Output = ()> {
    let http = Box::pin(http_phase(tcp, peer, ctx));
    async move {
        if let Some(start) = http.await {
            driver::run(start).await;
        }
    }
}

/// The HTTP phase: the upgrade's [`Start`], or `None` when the connection
/// was served (an HTTP endpoint), refused or lost.
async fn http_phase(tcp: TcpStream, peer: SocketAddr, ctx: Rc<ShardCtx>) -> Option<Start> {
    // Named at accept, so a refusal's log line carries the id too.
    let id = ctx.next_conn_id();
    let mut buf = Vec::new();
    let timeout = ctx.global.config.ws_handshake_timeout_ms;
    // The TLS handshake (if any) and the request head share one deadline;
    // past it the socket is closed.
    let opened = future::or(async { Some(open(tcp, &ctx, &mut buf).await) }, async {
        glommio::timer::sleep(timeout).await;
        None
    })
    .await;
    let (mut stream, head, used) = match opened {
        Some(Ok(o)) => {
            // The head is here; what follows (auth, the 101) waits for a
            // ready fan-out (`shard::Precedence`).
            ctx.after_fanout(&mut StepAside::default()).await;
            o
        }
        Some(Err(Opening::Refused(mut stream, refusal))) => {
            return refuse(&mut stream, &ctx, Who { id, ip: peer.ip() }, refusal).await
        }
        Some(Err(Opening::Gone)) => return None, // the peer went away or failed TLS
        None => {
            ctx.stats.refused(408);
            log_refusal(&ctx, Who { id, ip: peer.ip() }, 408, "request head not complete in time: closed");
            return None;
        }
    };
    let key = match route(&head) {
        Route::Http => {
            ctx.stats.http_requests.inc();
            let mut out = Vec::new();
            let snapshots = |name: &ChannelName, max: usize| ctx.shard.borrow().snapshot(name, Some(true), max);
            crate::http::respond(&head, &ctx.global, &snapshots, &mut out);
            let _ = stream.write_all(&out).await;
            let _ = stream.close().await; // flushes TLS and sends close_notify
            return None;
        }
        Route::Refused(r) => return refuse(&mut stream, &ctx, Who { id, ip: peer.ip() }, r).await,
        Route::Upgrade { key } => key,
    };
    let cfg = &ctx.global.config;
    let ip = client_ip(peer.ip(), &head.forwarded_for, &cfg.trusted_proxies);
    let who = Who { id, ip };
    if ctx.global.is_shutting_down() {
        let refusal = Refusal::unavailable("server shutting down", ctx.reconnect_after_ms().div_ceil(1000) as u32);
        return refuse(&mut stream, &ctx, who, refusal).await;
    }
    if let (false, Some(origin)) = (cfg.allowed_origins.is_empty(), &head.origin) {
        if !cfg.allowed_origins.iter().any(|o| o.trim().eq_ignore_ascii_case(origin)) {
            return refuse(&mut stream, &ctx, who, Refusal::new(403, "origin not allowed")).await;
        }
    }
    if !cfg.ip_whitelist.is_empty() && !cfg.ip_whitelist.iter().any(|n| n.contains(&ip)) {
        return refuse(&mut stream, &ctx, who, Refusal::new(403, "client IP not allowed")).await;
    }
    let admission = match ctx.global.limits.admit(ip) {
        Ok(a) => a,
        Err(r) => return refuse(&mut stream, &ctx, who, r).await,
    };
    if let (Some(cluster), true) = (&ctx.global.cluster, cfg.rate_limit_enabled) {
        // The one Redis round trip a new connection may make (bounded wait).
        if cluster.admit_ip(ip, admission.local_count()).await == IpVerdict::OverLimit {
            drop(admission);
            return refuse(&mut stream, &ctx, who, Refusal::new(429, "too many connections from this IP")).await;
        }
    }
    let identity = match &head.authorization {
        None => None,
        Some(value) => {
            let Some(token) = bearer_token(value) else {
                let refusal = Refusal::new(401, "expected Authorization: Bearer <token>");
                return refuse(&mut stream, &ctx, who, refusal).await;
            };
            let result = match ctx.global.auth.verify(token) {
                Verification::Done(r) => r,
                Verification::Pending(rx) => rx
                    .await
                    .unwrap_or_else(|_| Err(crate::auth::AuthFailure("Authentication service unavailable".into()))),
            };
            match result {
                Ok(identity) => Some(identity),
                Err(failure) => {
                    ctx.stats.auth_failure.inc();
                    if let Some(suppressed) = ctx.conn_log.allow(std::time::Instant::now(), &ctx.stats) {
                        tracing::info!(
                            conn = id,
                            %ip,
                            instance = %ctx.global.instance_id,
                            status = 401,
                            reason = %failure.0,
                            suppressed,
                            "authentication failed: upgrade refused"
                        );
                    }
                    let mut out = Vec::new();
                    let body = serde_json::json!({ "error": failure.0 }).to_string();
                    crate::protocol::handshake::write_response(401, "application/json", &[], body.as_bytes(), &mut out);
                    ctx.stats.refused(401);
                    let _ = stream.write_all(&out).await;
                    let _ = stream.close().await; // flushes TLS and sends close_notify
                    return None;
                }
            }
        }
    };
    let mut greeting = Vec::with_capacity(256);
    write_switching_protocols(&key, &mut greeting);
    let leftover = buf[used..].to_vec();
    Some(Start { stream, ctx, id, ip, admission, identity, greeting, leftover })
}

/// Which connection a log line is about.
#[derive(Clone, Copy)]
struct Who {
    id: u64,
    ip: IpAddr,
}

/// One line per refused upgrade, within the shard's log budget.
fn log_refusal(ctx: &ShardCtx, who: Who, status: u16, reason: &str) {
    if let Some(suppressed) = ctx.conn_log.allow(std::time::Instant::now(), &ctx.stats) {
        tracing::info!(
            conn = who.id,
            ip = %who.ip,
            instance = %ctx.global.instance_id,
            status,
            reason,
            suppressed,
            "upgrade refused"
        );
    }
}

enum Opening {
    Gone,
    Refused(Stream, Refusal),
}

/// Completes the TLS handshake when configured, then reads the request head.
async fn open(tcp: TcpStream, ctx: &ShardCtx, buf: &mut Vec<u8>) -> Result<(Stream, RequestHead, usize), Opening> {
    let mut stream = match &ctx.global.tls {
        None => Stream::Plain(tcp),
        Some(tls) => match tls.acceptor().accept(tcp).await {
            Ok(s) => Stream::Tls(Box::new(s)),
            Err(e) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                return Err(Opening::Gone);
            }
        },
    };
    match read_head(&mut stream, buf).await {
        Ok((head, used)) => Ok((stream, head, used)),
        Err(Some(r)) => Err(Opening::Refused(stream, r)),
        Err(None) => Err(Opening::Gone),
    }
}

/// Reads until a complete head; `Err(None)` when the peer left.
async fn read_head(stream: &mut Stream, buf: &mut Vec<u8>) -> Result<(RequestHead, usize), Option<Refusal>> {
    loop {
        let len = buf.len();
        buf.resize(len + HEAD_READ, 0);
        let n = match stream.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => return Err(None),
            Ok(n) => n,
        };
        buf.truncate(len + n);
        match parse_head(buf) {
            Parsed::Partial if buf.len() < MAX_HEAD_BYTES => continue,
            Parsed::Partial => return Err(Some(Refusal::new(431, "request headers too large"))),
            Parsed::Complete(head, used) => return Ok((head, used)),
            Parsed::Refused(r) => return Err(Some(r)),
        }
    }
}

/// Refuses the upgrade; `None`, as [`http_phase`] returns then.
async fn refuse(stream: &mut Stream, ctx: &ShardCtx, who: Who, refusal: Refusal) -> Option<Start> {
    ctx.stats.refused(refusal.status);
    log_refusal(ctx, who, refusal.status, refusal.message);
    let mut out = Vec::new();
    write_refusal(refusal, &mut out);
    let _ = stream.write_all(&out).await;
    let _ = stream.close().await; // flushes TLS and sends close_notify
    None
}

/// The client's address: the TCP peer, or, when the peer is a trusted
/// proxy, the right-most `X-Forwarded-For` hop that is not itself trusted.
pub fn client_ip(peer: IpAddr, forwarded_for: &[String], trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if forwarded_for.is_empty() || !is_trusted(&peer) {
        return peer;
    }
    let mut last = peer;
    for hop in forwarded_for.iter().rev() {
        let Ok(ip) = hop.parse::<IpAddr>() else {
            // A hop we cannot read: do not trust anything to its left.
            return last;
        };
        if !is_trusted(&ip) {
            return ip;
        }
        last = ip;
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn forwarded_for_is_only_honoured_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let proxy: IpAddr = "10.1.1.1".parse().unwrap();
        let outsider: IpAddr = "8.8.8.8".parse().unwrap();
        assert_eq!(client_ip(outsider, &ips(&["1.2.3.4"]), &trusted), outsider);
        assert_eq!(
            client_ip(proxy, &ips(&["6.6.6.6", "1.2.3.4", "10.2.2.2"]), &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap(),
            "right-most untrusted hop, spoofed left part ignored"
        );
        assert_eq!(client_ip(proxy, &ips(&["garbage"]), &trusted), proxy);
        assert_eq!(client_ip(proxy, &[], &trusted), proxy);
    }
}
