//! What a connection's client says and who it is: each text message's rate
//! check, parsing and the session's decision (`protocol::session`), token
//! verification (local, or pending on the Auth Service), the replies, the
//! user's registrations with the shard and the Redis registry.
//!
//! The driver (`driver.rs`) hands it decoded text and the time; it answers
//! through the shard's outbox and tells the driver when the connection must
//! close (and why). It does no I/O of its own.

use std::borrow::Cow;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_channel::oneshot;

use super::{recover, ShardCtx};
use crate::auth::{AuthFailure, Identity, Verification};
use crate::cluster::RegistryEvent;
use crate::limits::{RateCounter, RateDecision, UserRate};
use crate::protocol::channel::ChannelName;
use crate::protocol::message::{parse_client, ChannelArgs, ClientKind, ErrorCode, Outgoing, ParseError, UserView};
use crate::protocol::session::{recovery_of, Decision, Refusal, Session, StoredSession, Verified};
use crate::protocol::CloseCode;
use crate::shard::inbox::Update;
use crate::telemetry::Received;

/// Which connection this is, for replies, registrations and log lines.
pub(super) struct Who<'a> {
    pub ctx: &'a ShardCtx,
    pub key: usize,
    pub id: u64,
    pub ip: IpAddr,
}

impl Who<'_> {
    /// The id clients see (`connectionId`): the instance and the id its log
    /// lines carry, `<instance>/<conn>`.
    pub fn public_id(&self) -> String {
        format!("{}/{}", self.ctx.global.instance_id, self.id)
    }

    fn reply(&self, msg: &Outgoing) {
        self.ctx.queue(self.key, msg);
    }

    fn registry(&self, e: RegistryEvent) {
        if let Some(cluster) = &self.ctx.global.cluster {
            cluster.event(e);
        }
    }
}

/// The connection must close: with this code, for this reason (logged).
#[derive(Debug)]
pub(super) struct Close {
    pub code: CloseCode,
    pub why: Cow<'static, str>,
}

/// A verification waiting on the Auth Service, with the request it answers.
struct PendingAuth {
    rx: oneshot::Receiver<Result<Identity, AuthFailure>>,
    request_id: Option<Box<str>>,
}

/// One connection's client: its session and message counters.
pub(super) struct Client {
    session: Session,
    /// Messages before authentication (they carry into the user's count).
    pre_auth: RateCounter,
    /// The user's shared message counter, once authenticated.
    user_rate: Option<Arc<UserRate>>,
    pending_auth: Option<Box<PendingAuth>>,
}

/// What a parked connection keeps of its client.
pub(super) struct StoredClient {
    pub session: StoredSession,
    /// The pre-authentication count; None once authenticated.
    pub pre_auth: Option<Box<RateCounter>>,
    /// The user's counter (it holds the user id).
    pub user_rate: Option<Arc<UserRate>>,
}

impl Client {
    pub fn new(session: Session) -> Self {
        Self { session, pre_auth: RateCounter::default(), user_rate: None, pending_auth: None }
    }

    /// The session's state, without what the shard's settings restore.
    pub fn store(self) -> StoredClient {
        let authenticated = self.session.is_authenticated();
        StoredClient {
            session: self.session.store(),
            pre_auth: (!authenticated).then(|| Box::new(self.pre_auth)),
            user_rate: self.user_rate,
        }
    }

    pub fn resume(stored: StoredClient, ctx: &ShardCtx) -> Self {
        let user = stored.user_rate.as_ref().map(|r| r.user());
        Self {
            session: Session::resume(stored.session, user, ctx.timers),
            pre_auth: stored.pre_auth.map(|b| *b).unwrap_or_default(),
            user_rate: stored.user_rate,
            pending_auth: None,
        }
    }

    /// The authenticated user, if any.
    pub fn user(&self) -> Option<&str> {
        self.session.identity().map(|i| &*i.user_id)
    }

    /// No verification in flight.
    pub fn is_idle(&self) -> bool {
        self.pending_auth.is_none()
    }

    /// The next wall-clock ms at which [`Client::on_deadline`] has work.
    pub fn deadline_ms(&self) -> Option<u64> {
        self.session.deadline_ms()
    }

    /// The connection is closing: no message is acted on any more.
    pub fn close(&mut self) {
        self.session.close();
        self.pending_auth = None;
    }

    /// Gives the user's message counter back (the connection is gone).
    pub fn release(&mut self, ctx: &ShardCtx) {
        if let Some(counter) = self.user_rate.take() {
            ctx.global.limits.release_user(counter);
        }
    }

    /// One text message from the client, at wall-clock `now`.
    pub fn on_text(&mut self, who: &Who<'_>, text: &str, now: u64) -> Option<Close> {
        let parsed = parse_client(text);
        let stats = &who.ctx.stats;
        let (id, kind) = match &parsed {
            Ok(m) => (
                m.id.as_deref(),
                match m.kind {
                    ClientKind::Authenticate { .. } => Received::Authenticate,
                    ClientKind::Subscribe(_) => Received::Subscribe,
                    ClientKind::Unsubscribe(_) => Received::Unsubscribe,
                    ClientKind::Ping => Received::Ping,
                },
            ),
            Err(ParseError::Invalid { id, .. }) => (id.as_deref(), Received::Invalid),
            Err(ParseError::UnknownType { id }) => (id.as_deref(), Received::Unknown),
        };
        stats.received[kind as usize].inc();
        let counter = self.user_rate.as_ref().map_or(&self.pre_auth, |c| &**c);
        match who.ctx.global.limits.check_message(counter, now) {
            RateDecision::Allowed => {}
            RateDecision::Limited { retry_after_ms } => {
                stats.rate_limited.inc();
                who.reply(&Outgoing::Error {
                    code: ErrorCode::RateLimited,
                    message: "message rate limit exceeded",
                    request_id: id,
                    retry_after_ms: Some(retry_after_ms),
                    channel: None,
                });
                return None;
            }
            RateDecision::Close => {
                stats.rate_limited.inc();
                stats.rate_limit_closes.inc();
                return Some(Close {
                    code: CloseCode::RATE_LIMITED,
                    why: "twice RATE_LIMIT_MAX_MESSAGES_PER_MINUTE in one window".into(),
                });
            }
        }
        let msg = match &parsed {
            Ok(m) => m,
            Err(e) => {
                let message = match e {
                    ParseError::Invalid { reason, .. } => *reason,
                    ParseError::UnknownType { .. } => "unknown message type",
                };
                who.reply(&Outgoing::Error {
                    code: e.code(),
                    message,
                    request_id: id,
                    retry_after_ms: None,
                    channel: None,
                });
                return None;
            }
        };
        let request_id = msg.id.as_deref();
        match self.session.on_message(&msg.kind) {
            Decision::Pong => who.reply(&Outgoing::Pong { now_ms: now, request_id }),
            Decision::Error(code, message) => {
                who.reply(&Outgoing::Error { code, message, request_id, retry_after_ms: None, channel: None })
            }
            Decision::AuthFailed(reason) => return Some(self.auth_failed(who, None, reason.into(), request_id)),
            Decision::Verify(token) => match who.ctx.global.auth.verify(token) {
                Verification::Done(result) => return self.on_verified(who, result, request_id, now),
                Verification::Pending(rx) => {
                    self.pending_auth = Some(Box::new(PendingAuth { rx, request_id: request_id.map(Into::into) }));
                }
            },
            Decision::Subscribe(args) => self.subscribe(who, args, request_id),
            Decision::Unsubscribe(args) => self.unsubscribe(who, args, request_id),
        }
        None
    }

    /// A subscribe (PROTOCOL.md §5, §11): all or nothing, then
    /// `subscribed` and the snapshots that follow it.
    fn subscribe(&mut self, who: &Who<'_>, args: &ChannelArgs<'_>, request_id: Option<&str>) {
        let ctx = who.ctx;
        let resume = match recovery_of(args) {
            Ok(resume) => resume,
            Err(refusal) => return refuse(who, args, refusal, request_id),
        };
        if let Some((channel, (partition, _))) = resume {
            let known = ctx.global.ingest.partitions_of[channel as usize].load(Ordering::Relaxed);
            let refusal = if known > 0 && partition as u32 >= known {
                Some("since names a partition the channel's topic does not have")
            } else if ctx.shard.borrow().resume_ticket(who.key, channel).is_some() {
                Some("a resume of this channel is already in progress")
            } else {
                None
            };
            if let Some(message) = refusal {
                return refuse(who, args, Refusal { code: ErrorCode::InvalidMessage, message, index: 0 }, request_id);
            }
        }
        let plan = {
            let shard = ctx.shard.borrow();
            self.session.plan_subscribe(args, |name| shard.holds(who.key, name), shard.topics_held(who.key))
        };
        let plan = match plan {
            Ok(plan) => plan,
            Err(refusal) => return refuse(who, args, refusal, request_id),
        };
        if let (Some((channel, since)), Some(user)) = (resume, self.session.identity().map(|i| i.user_id.clone())) {
            // Answered when the replay is done (`recover.rs`).
            if plan.first().is_some_and(|(_, new)| *new) {
                who.registry(RegistryEvent::Subscriptions { id: who.id, subs: self.session.subscriptions() });
            }
            recover::begin(ctx, who.key, user, channel, since, request_id);
            return;
        }
        let max = ctx.global.config.ws_snapshot_max_markets.get();
        let mut snapshots: Vec<Arc<Update>> = Vec::new();
        let mut fixed_changed = false;
        {
            let mut shard = ctx.shard.borrow_mut();
            for (name, new) in &plan {
                if *new {
                    fixed_changed |= matches!(name, ChannelName::Fixed(_));
                    shard.subscribe_to(who.key, name.clone());
                }
                // Each market once, however many of the names cover it.
                for update in shard.snapshot(name, args.snapshot, max) {
                    if !snapshots.iter().any(|u| Arc::ptr_eq(u, &update)) {
                        snapshots.push(update);
                    }
                }
            }
        }
        if fixed_changed {
            who.registry(RegistryEvent::Subscriptions { id: who.id, subs: self.session.subscriptions() });
        }
        let any_price = plan.iter().any(|(name, _)| name.is_price());
        who.reply(&Outgoing::Subscribed {
            names: args.reply_names(),
            snapshot: any_price.then_some(snapshots.len()),
            recovery: None,
            request_id,
        });
        let mut shard = ctx.shard.borrow_mut();
        for update in &snapshots {
            if !shard.queue_snapshot(who.key, &update.frame) {
                return;
            }
            ctx.stats.snapshots_sent.inc();
        }
    }

    fn unsubscribe(&mut self, who: &Who<'_>, args: &ChannelArgs<'_>, request_id: Option<&str>) {
        let names = match self.session.plan_unsubscribe(args) {
            Ok(names) => names,
            Err(refusal) => return refuse(who, args, refusal, request_id),
        };
        for name in &names {
            if let ChannelName::Fixed(channel) = name {
                // A resume in flight is answered first (recovered:false).
                recover::cancel(who.ctx, who.key, *channel);
            }
        }
        {
            let mut shard = who.ctx.shard.borrow_mut();
            for name in &names {
                shard.unsubscribe_from(who.key, name);
            }
        }
        if names.iter().any(|n| matches!(n, ChannelName::Fixed(_))) {
            who.registry(RegistryEvent::Subscriptions { id: who.id, subs: self.session.subscriptions() });
        }
        who.reply(&Outgoing::Unsubscribed { names: args.reply_names(), request_id });
    }

    /// Takes the Auth Service's answer when it has come.
    pub fn poll_auth(&mut self, who: &Who<'_>, cx: &mut Context<'_>, now: u64) -> Option<Close> {
        let pending = self.pending_auth.as_mut()?;
        let result = match Pin::new(&mut pending.rx).poll(cx) {
            Poll::Pending => return None,
            Poll::Ready(Ok(r)) => r,
            Poll::Ready(Err(_)) => Err(AuthFailure("Authentication service unavailable".into())),
        };
        let pending = self.pending_auth.take()?;
        if self.session.is_closing() {
            return None;
        }
        self.on_verified(who, result, pending.request_id.as_deref(), now)
    }

    /// Applies a verification's result (on the upgrade, or of a message).
    pub fn on_verified(
        &mut self,
        who: &Who<'_>,
        result: Result<Identity, AuthFailure>,
        request_id: Option<&str>,
        now: u64,
    ) -> Option<Close> {
        let user = self.user().map(str::to_owned);
        match self.session.on_verified(result) {
            Verified::Authenticated => {
                let identity = self.session.identity()?.clone();
                who.ctx.shard.borrow_mut().set_user(who.key, identity.user_id.clone());
                let counter = who.ctx.global.limits.user_counter(&identity.user_id);
                counter.hit(now, self.pre_auth.current(now));
                self.user_rate = Some(counter);
                who.registry(RegistryEvent::Auth { id: who.id, user: identity.user_id.clone() });
                self.auth_success(who, &identity, request_id);
                tracing::debug!(conn = who.id, user = %identity.user_id, "authenticated");
                None
            }
            Verified::Refreshed => {
                let identity = self.session.identity()?.clone();
                self.auth_success(who, &identity, request_id);
                None
            }
            Verified::Failed(reason) => Some(self.auth_failed(who, user.as_deref(), reason.into(), request_id)),
        }
    }

    /// The session's deadline at wall-clock `now`: authentication timeout
    /// (4002) or an expired token (4001).
    pub fn on_deadline(&mut self, who: &Who<'_>, now: u64) -> Option<Close> {
        if !self.session.deadline_due(now) {
            return None; // checked at every poll: nothing to copy then
        }
        let user = self.user().map(str::to_owned);
        let (reason, code) = self.session.on_deadline(now)?;
        if code == CloseCode::AUTH_FAILED {
            who.ctx.stats.auth_failure.inc();
        }
        log_auth_failure(who, user.as_deref(), reason);
        who.reply(&Outgoing::AuthFailed { error: reason, request_id: None });
        Some(Close { code, why: reason.into() })
    }

    /// `auth_failed`, logged with the user when it was known.
    fn auth_failed(
        &mut self,
        who: &Who<'_>,
        user: Option<&str>,
        reason: Cow<'static, str>,
        request_id: Option<&str>,
    ) -> Close {
        who.ctx.stats.auth_failure.inc();
        log_auth_failure(who, user, &reason);
        who.reply(&Outgoing::AuthFailed { error: &reason, request_id });
        Close { code: CloseCode::AUTH_FAILED, why: reason }
    }

    fn auth_success(&self, who: &Who<'_>, identity: &Identity, request_id: Option<&str>) {
        who.ctx.stats.auth_success.inc();
        let connection_id = who.public_id();
        who.reply(&Outgoing::AuthSuccess {
            user: UserView { id: &identity.user_id, email: identity.email.as_deref() },
            connection_id: &connection_id,
            request_id,
        });
    }
}

/// The `error` of a refused subscribe or unsubscribe, naming the first
/// bad channel.
fn refuse(who: &Who<'_>, args: &ChannelArgs<'_>, refusal: Refusal, request_id: Option<&str>) {
    who.reply(&Outgoing::Error {
        code: refusal.code,
        message: refusal.message,
        request_id,
        retry_after_ms: None,
        channel: args.names.get(refusal.index).map(|n| &**n),
    });
}

/// The log line of a refused token (the user when the session knew it).
fn log_auth_failure(who: &Who<'_>, user: Option<&str>, reason: &str) {
    if let Some(suppressed) = who.ctx.conn_log.allow(std::time::Instant::now(), &who.ctx.stats) {
        tracing::info!(
            conn = who.id,
            ip = %who.ip,
            instance = %who.ctx.global.instance_id,
            user,
            reason,
            suppressed,
            "authentication failed"
        );
    }
}
