//! What a connection does with each client message once it is decoded:
//! the rate check, parsing, the session's decision, verification (local or
//! pending on the Auth Service) and the replies. The I/O side of the same
//! connection is `driver.rs`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_channel::oneshot;

use super::driver::{Conn, Phase};
use crate::auth::{AuthFailure, Identity, Verification};
use crate::cluster::RegistryEvent;
use crate::limits::RateDecision;
use crate::protocol::message::{parse_client, ClientKind, ErrorCode, Outgoing, ParseError, UserView};
use crate::protocol::session::{Decision, Verified};
use crate::protocol::CloseCode;

/// A verification waiting on the Auth Service, with the request it answers.
pub(super) struct PendingAuth {
    rx: oneshot::Receiver<Result<Identity, AuthFailure>>,
    request_id: Option<Box<str>>,
}

impl Conn {
    pub(super) fn on_text(&mut self, text: &[u8], now: u64) {
        let parsed = parse_client(text);
        let ctx = self.ctx.clone();
        let stats = &ctx.stats;
        let (id, received_idx) = match &parsed {
            Ok(m) => (
                m.id.as_deref(),
                match m.kind {
                    ClientKind::Authenticate { .. } => 0,
                    ClientKind::Subscribe(_) => 1,
                    ClientKind::Unsubscribe(_) => 2,
                    ClientKind::Ping => 3,
                },
            ),
            Err(ParseError::Invalid { id, .. }) => (id.as_deref(), 4),
            Err(ParseError::UnknownType { id }) => (id.as_deref(), 5),
        };
        stats.received[received_idx].inc();
        let counter = self.user_rate.as_ref().map_or(&self.pre_auth, |c| &**c);
        match self.ctx.global.limits.check_message(counter, now) {
            RateDecision::Allowed => {}
            RateDecision::Limited { retry_after_ms } => {
                stats.rate_limited.inc();
                self.reply(&Outgoing::Error {
                    code: ErrorCode::RateLimited,
                    message: "message rate limit exceeded",
                    request_id: id,
                    retry_after_ms: Some(retry_after_ms),
                });
                return;
            }
            RateDecision::Close => {
                stats.rate_limited.inc();
                stats.rate_limit_closes.inc();
                self.close_for(CloseCode::RATE_LIMITED, "twice RATE_LIMIT_MAX_MESSAGES_PER_MINUTE in one window");
                return;
            }
        }
        let msg = match &parsed {
            Ok(m) => m,
            Err(e) => {
                let message = match e {
                    ParseError::Invalid { reason, .. } => *reason,
                    ParseError::UnknownType { .. } => "unknown message type",
                };
                return self.reply(&Outgoing::Error { code: e.code(), message, request_id: id, retry_after_ms: None });
            }
        };
        let request_id = msg.id.as_deref();
        match self.session.on_message(&msg.kind) {
            Decision::Pong => self.reply(&Outgoing::Pong { now_ms: now, request_id }),
            Decision::Error(code, message) => {
                self.reply(&Outgoing::Error { code, message, request_id, retry_after_ms: None })
            }
            Decision::AuthFailed(reason) => {
                self.ctx.stats.auth_failure.inc();
                self.log_auth_failure(reason);
                self.reply(&Outgoing::AuthFailed { error: reason, request_id });
                self.close_for(CloseCode::AUTH_FAILED, reason);
            }
            Decision::Verify(token) => match self.ctx.global.auth.verify(token) {
                Verification::Done(result) => self.on_verified(result, request_id, now),
                Verification::Pending(rx) => {
                    self.pending_auth = Some(Box::new(PendingAuth { rx, request_id: request_id.map(Into::into) }));
                }
            },
            Decision::Subscribed { channel, added } => {
                if added {
                    self.ctx.shard.borrow_mut().subscribe(self.key, channel);
                    self.registry(RegistryEvent::Subscriptions { id: self.id, subs: self.session.subscriptions() });
                }
                self.reply(&Outgoing::Subscribed { channel, request_id });
            }
            Decision::Unsubscribed { channel, removed } => {
                if removed {
                    self.ctx.shard.borrow_mut().unsubscribe(self.key, channel);
                    self.registry(RegistryEvent::Subscriptions { id: self.id, subs: self.session.subscriptions() });
                }
                self.reply(&Outgoing::Unsubscribed { channel, request_id });
            }
        }
    }

    pub(super) fn poll_auth(&mut self, cx: &mut Context<'_>, now: u64) {
        let Some(pending) = self.pending_auth.as_mut() else {
            return;
        };
        let result = match Pin::new(&mut pending.rx).poll(cx) {
            Poll::Pending => return,
            Poll::Ready(Ok(r)) => r,
            Poll::Ready(Err(_)) => Err(AuthFailure("Authentication service unavailable".into())),
        };
        let pending = self.pending_auth.take().expect("checked above");
        if self.phase == Phase::Open {
            self.on_verified(result, pending.request_id.as_deref(), now);
        }
    }

    pub(super) fn on_verified(&mut self, result: Result<Identity, AuthFailure>, request_id: Option<&str>, now: u64) {
        match self.session.on_verified(result) {
            Verified::Authenticated => {
                let identity = self.session.identity().expect("just authenticated").clone();
                self.ctx.shard.borrow_mut().set_user(self.key, identity.user_id.clone());
                let counter = self.ctx.global.limits.user_counter(&identity.user_id);
                counter.hit(now, self.pre_auth.current(now));
                self.user_rate = Some(counter);
                self.registry(RegistryEvent::Auth { id: self.id, user: identity.user_id.clone() });
                self.auth_success(&identity, request_id);
                tracing::debug!(conn = self.id, user = %identity.user_id, "authenticated");
            }
            Verified::Refreshed => {
                let identity = self.session.identity().expect("refreshed").clone();
                self.auth_success(&identity, request_id);
            }
            Verified::Failed(reason) => {
                self.ctx.stats.auth_failure.inc();
                self.log_auth_failure(&reason);
                self.reply(&Outgoing::AuthFailed { error: &reason, request_id });
                self.close_for(CloseCode::AUTH_FAILED, &reason);
            }
        }
    }

    fn auth_success(&mut self, identity: &Identity, request_id: Option<&str>) {
        self.ctx.stats.auth_success.inc();
        let connection_id = self.public_id();
        self.reply(&Outgoing::AuthSuccess {
            user: UserView { id: &identity.user_id, email: identity.email.as_deref() },
            connection_id: &connection_id,
            request_id,
        });
    }

    /// Reports a registry change to Redis' sync worker (when configured).
    pub(super) fn registry(&self, e: RegistryEvent) {
        if let Some(cluster) = &self.ctx.global.cluster {
            cluster.event(e);
        }
    }

    pub(super) fn reply(&mut self, msg: &Outgoing) {
        self.ctx.queue(self.key, msg);
    }
}
