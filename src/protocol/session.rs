//! A connection's lifecycle after the upgrade (PROTOCOL.md §4, §5), sans-IO.
//!
//! Owns: the stage (awaiting auth -> authenticated -> closing), the
//! subscription set, and every decision about a parsed client message
//! (`not_authenticated`, channel rules, refresh rules, deadlines). It never
//! verifies a token itself: it asks the driver to ([`Decision::Verify`]) and
//! is told the result. Time is a parameter (`now_ms`), never read here.

use std::sync::Arc;

use super::channel::ChannelName;
use super::message::{Channel, ChannelArgs, ClientKind, ErrorCode, Pos, Since};
use super::CloseCode;

/// Who a verified token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: Arc<str>,
    pub email: Option<Arc<str>>,
    /// The token's `exp`, in ms since the epoch, if it has one.
    pub expires_at_ms: Option<u64>,
}

/// Why a token was refused; the text goes into `auth_failed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthFailure(pub String);

#[derive(Debug)]
enum Stage {
    AwaitingAuth { deadline_ms: u64 },
    Authenticated { identity: Identity },
    Closing,
}

/// What the driver must do about one client message.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision<'m> {
    Pong,
    Error(ErrorCode, &'static str),
    /// Verify this token, then call [`Session::on_verified`].
    Verify(&'m str),
    /// Refuse authentication outright: `auth_failed`, then close 4001.
    AuthFailed(&'static str),
    /// Check with [`Session::plan_subscribe`], then apply and reply
    /// `subscribed`.
    Subscribe(&'m ChannelArgs<'m>),
    /// Check with [`Session::plan_unsubscribe`], then apply and reply
    /// `unsubscribed`.
    Unsubscribe(&'m ChannelArgs<'m>),
}

/// A subscribe or unsubscribe refused as a whole: the error, and the index
/// of the first bad channel among the names.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: &'static str,
    pub index: usize,
}

/// Parses every name, or refuses with the first that does not fit.
fn parse_names(args: &ChannelArgs<'_>) -> Result<Vec<ChannelName>, Refusal> {
    args.names
        .iter()
        .enumerate()
        .map(|(index, name)| {
            ChannelName::parse(name).ok_or(Refusal {
                code: ErrorCode::UnknownChannel,
                message: "unknown channel: expected prices, prices:<chainId>, prices:<chainId>:<token>, orders, \
                          portfolio or trades",
                index,
            })
        })
        .collect()
}

/// The replay a subscribe asks for (PROTOCOL.md §12): its private channel
/// and the position after which to replay. `since` on a public channel
/// is ignored, whatever its form; on a private one it must be a position.
/// An unknown channel is not judged here (the subscribe refuses it).
pub fn recovery_of(args: &ChannelArgs<'_>) -> Result<Option<(Channel, Pos)>, Refusal> {
    let (Some(since), false) = (args.since, args.many) else {
        return Ok(None);
    };
    let Some(ChannelName::Fixed(channel)) = ChannelName::parse(&args.names[0]) else {
        return Ok(None);
    };
    if !channel.is_private() {
        return Ok(None);
    }
    match since {
        Since::Pos(pos) => Ok(Some((channel, pos))),
        Since::Malformed => Err(Refusal {
            code: ErrorCode::InvalidMessage,
            message: "since must be \"<partition>:<offset>\", the pos of an update (non-negative integers)",
            index: 0,
        }),
    }
}

/// The result of applying a verification.
#[derive(Debug, PartialEq, Eq)]
pub enum Verified {
    /// First success on this connection: register the user.
    Authenticated,
    /// A refresh for the same user: the session was extended.
    Refreshed,
    /// `auth_failed` with this text, then close 4001.
    Failed(String),
}

/// Timers the session owns.
#[derive(Debug, Clone, Copy)]
pub struct SessionTimers {
    pub auth_timeout_ms: u64,
    /// Clock skew allowed past a token's `exp`.
    pub leeway_ms: u64,
    pub max_subscriptions: u32,
}

#[derive(Debug)]
pub struct Session {
    stage: Stage,
    subs: u8,
    timers: SessionTimers,
}

/// A session without its timers (which are the shard's), its user id (the
/// parked connection's rate counter holds it) or its email (only the
/// `auth_success` reply shows it), for keeping an idle connection
/// compactly: 16 bytes instead of 72. [`Session::resume`] restores it.
#[derive(Debug)]
pub enum StoredSession {
    AwaitingAuth {
        deadline_ms: u64,
    },
    /// `expires_at_ms`: `u64::MAX` when the token has no `exp`.
    Authenticated {
        expires_at_ms: u64,
        subs: u8,
    },
    Closing {
        subs: u8,
    },
}

impl Session {
    pub fn new(now_ms: u64, timers: SessionTimers) -> Self {
        Self { stage: Stage::AwaitingAuth { deadline_ms: now_ms + timers.auth_timeout_ms }, subs: 0, timers }
    }

    /// The session's state, without the timers, the user id or the email.
    /// (No subscription is accepted before authentication, so awaiting it
    /// there are none to keep.)
    pub fn store(self) -> StoredSession {
        match self.stage {
            Stage::AwaitingAuth { deadline_ms } => StoredSession::AwaitingAuth { deadline_ms },
            Stage::Authenticated { identity } => StoredSession::Authenticated {
                expires_at_ms: identity.expires_at_ms.unwrap_or(u64::MAX),
                subs: self.subs,
            },
            Stage::Closing => StoredSession::Closing { subs: self.subs },
        }
    }

    /// A stored session, with the shard's timers and, when it was
    /// authenticated, its user's id (none then is a bug: the session comes
    /// back closing rather than as someone else's).
    pub fn resume(stored: StoredSession, user_id: Option<&Arc<str>>, timers: SessionTimers) -> Self {
        let (stage, subs) = match (stored, user_id) {
            (StoredSession::AwaitingAuth { deadline_ms }, _) => (Stage::AwaitingAuth { deadline_ms }, 0),
            (StoredSession::Authenticated { expires_at_ms, subs }, Some(user_id)) => {
                let expires_at_ms = (expires_at_ms != u64::MAX).then_some(expires_at_ms);
                (
                    Stage::Authenticated {
                        identity: Identity { user_id: user_id.clone(), email: None, expires_at_ms },
                    },
                    subs,
                )
            }
            (StoredSession::Authenticated { subs, .. }, None) => {
                debug_assert!(false, "an authenticated session stored without its user");
                (Stage::Closing, subs)
            }
            (StoredSession::Closing { subs }, _) => (Stage::Closing, subs),
        };
        Self { stage, subs, timers }
    }

    /// Whether a token was accepted (and the session not closed since).
    pub fn is_authenticated(&self) -> bool {
        matches!(self.stage, Stage::Authenticated { .. })
    }

    pub fn identity(&self) -> Option<&Identity> {
        match &self.stage {
            Stage::Authenticated { identity } => Some(identity),
            _ => None,
        }
    }

    pub fn subscriptions(&self) -> u8 {
        self.subs
    }

    pub fn is_closing(&self) -> bool {
        matches!(self.stage, Stage::Closing)
    }

    /// Marks the session closed: no further message is acted on.
    pub fn close(&mut self) {
        self.stage = Stage::Closing;
    }

    /// Decides what a parsed, rate-checked message leads to.
    pub fn on_message<'m>(&mut self, kind: &'m ClientKind<'m>) -> Decision<'m> {
        match kind {
            ClientKind::Ping => return Decision::Pong,
            ClientKind::Authenticate { token } => {
                return match token.as_deref() {
                    Some(t) if !t.is_empty() => Decision::Verify(t),
                    _ => Decision::AuthFailed("Token required"),
                }
            }
            _ => {}
        }
        if self.identity().is_none() {
            return Decision::Error(ErrorCode::NotAuthenticated, "authenticate first");
        }
        match kind {
            ClientKind::Subscribe(args) => Decision::Subscribe(args),
            ClientKind::Unsubscribe(args) => Decision::Unsubscribe(args),
            ClientKind::Ping | ClientKind::Authenticate { .. } => unreachable!("handled above"),
        }
    }

    /// Decides a subscribe, all or nothing: every name must fit the
    /// grammar and the new ones must fit under `WS_MAX_SUBSCRIPTIONS`.
    /// `held` tells whether the connection already holds a market or chain
    /// channel, `topics` how many it holds. Returns every name parsed, in
    /// order, each with whether it is new (a repeat is not); the private
    /// and `prices` bits are set here.
    pub fn plan_subscribe(
        &mut self,
        args: &ChannelArgs<'_>,
        held: impl Fn(&ChannelName) -> bool,
        topics: usize,
    ) -> Result<Vec<(ChannelName, bool)>, Refusal> {
        let names = parse_names(args)?;
        let mut count = self.subs.count_ones() as usize + topics;
        let mut plan: Vec<(ChannelName, bool)> = Vec::with_capacity(names.len());
        let mut bits = self.subs;
        for (index, name) in names.into_iter().enumerate() {
            let is_held = match &name {
                ChannelName::Fixed(c) => bits & c.bit() != 0,
                other => held(other) || plan.iter().any(|(n, _)| n == other),
            };
            if !is_held {
                if count >= self.timers.max_subscriptions as usize {
                    return Err(Refusal {
                        code: ErrorCode::TooManySubscriptions,
                        message: "subscription limit (WS_MAX_SUBSCRIPTIONS) reached",
                        index,
                    });
                }
                count += 1;
                if let ChannelName::Fixed(c) = &name {
                    bits |= c.bit();
                }
            }
            plan.push((name, !is_held));
        }
        self.subs = bits;
        Ok(plan)
    }

    /// Decides an unsubscribe, all or nothing: every name must fit the
    /// grammar. Returns the names (each once); the private and `prices`
    /// bits are cleared here.
    pub fn plan_unsubscribe(&mut self, args: &ChannelArgs<'_>) -> Result<Vec<ChannelName>, Refusal> {
        let mut names = parse_names(args)?;
        names.dedup();
        for name in &names {
            if let ChannelName::Fixed(c) = name {
                self.subs &= !c.bit();
            }
        }
        Ok(names)
    }

    /// Applies the outcome of a token verification (first login or refresh).
    pub fn on_verified(&mut self, result: Result<Identity, AuthFailure>) -> Verified {
        match (&mut self.stage, result) {
            (Stage::Closing, _) => Verified::Failed("Connection closing".into()),
            (_, Err(AuthFailure(reason))) => {
                self.stage = Stage::Closing;
                Verified::Failed(reason)
            }
            (Stage::AwaitingAuth { .. }, Ok(identity)) => {
                self.stage = Stage::Authenticated { identity };
                Verified::Authenticated
            }
            (Stage::Authenticated { identity }, Ok(fresh)) => {
                if fresh.user_id != identity.user_id {
                    self.stage = Stage::Closing;
                    return Verified::Failed("Token belongs to another user".into());
                }
                *identity = fresh;
                Verified::Refreshed
            }
        }
    }

    /// The next instant (ms) at which [`Session::on_deadline`] has work.
    pub fn deadline_ms(&self) -> Option<u64> {
        match &self.stage {
            Stage::AwaitingAuth { deadline_ms } => Some(*deadline_ms),
            Stage::Authenticated { identity } => {
                identity.expires_at_ms.map(|exp| exp.saturating_add(self.timers.leeway_ms))
            }
            Stage::Closing => None,
        }
    }

    /// Whether [`Session::on_deadline`] has work at `now_ms`.
    pub fn deadline_due(&self, now_ms: u64) -> bool {
        self.deadline_ms().is_some_and(|d| now_ms >= d)
    }

    /// Called when `deadline_ms` has passed: the `auth_failed` text and the
    /// close code to end the connection with, if it must end.
    pub fn on_deadline(&mut self, now_ms: u64) -> Option<(&'static str, CloseCode)> {
        if !self.deadline_due(now_ms) {
            return None;
        }
        let verdict = match self.stage {
            Stage::AwaitingAuth { .. } => ("Authentication timeout", CloseCode::AUTH_TIMEOUT),
            _ => ("Token expired", CloseCode::AUTH_FAILED),
        };
        self.stage = Stage::Closing;
        Some(verdict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::message::parse_client;

    const TIMERS: SessionTimers = SessionTimers { auth_timeout_ms: 10_000, leeway_ms: 30_000, max_subscriptions: 2 };

    fn ident(user: &str, exp: Option<u64>) -> Identity {
        Identity { user_id: user.into(), email: None, expires_at_ms: exp }
    }

    #[test]
    fn a_stored_session_comes_back_with_its_stage_deadlines_and_subscriptions() {
        let user: Arc<str> = "u1".into();
        let awaiting = Session::new(5, TIMERS);
        let deadline = awaiting.deadline_ms();
        let back = Session::resume(awaiting.store(), None, TIMERS);
        assert_eq!((back.deadline_ms(), back.identity(), back.subscriptions()), (deadline, None, 0));

        for exp in [Some(1_000_000), None] {
            let mut s = Session::new(0, TIMERS);
            let mut id = ident("u1", exp);
            id.email = Some("u1@example.com".into());
            s.on_verified(Ok(id));
            s.plan_subscribe(&ChannelArgs::one("orders"), |_| false, 0).unwrap();
            let back = Session::resume(s.store(), Some(&user), TIMERS);
            assert_eq!(back.identity(), Some(&ident("u1", exp)), "the email is not kept");
            assert_eq!(back.deadline_ms(), exp.map(|e| e + TIMERS.leeway_ms));
            assert_eq!(back.subscriptions(), Channel::Orders.bit());
            assert!(!back.is_closing());
        }

        let mut closing = Session::new(0, TIMERS);
        closing.on_verified(Ok(ident("u1", None)));
        closing.close();
        assert!(Session::resume(closing.store(), Some(&user), TIMERS).is_closing());
        assert_eq!(std::mem::size_of::<StoredSession>(), 16);
    }

    #[test]
    fn requires_auth_before_subscribing() {
        let mut s = Session::new(0, TIMERS);
        let sub = ClientKind::Subscribe(ChannelArgs::one("prices"));
        assert!(matches!(s.on_message(&sub), Decision::Error(ErrorCode::NotAuthenticated, _)));
        assert_eq!(s.on_message(&ClientKind::Ping), Decision::Pong);
        let auth = ClientKind::Authenticate { token: Some("tok".into()) };
        assert_eq!(s.on_message(&auth), Decision::Verify("tok"));
        assert_eq!(s.on_verified(Ok(ident("u1", None))), Verified::Authenticated);
        assert!(matches!(s.on_message(&sub), Decision::Subscribe(_)));
        let args = ChannelArgs::one("prices");
        assert_eq!(s.plan_subscribe(&args, |_| false, 0), Ok(vec![(ChannelName::Fixed(Channel::Prices), true)]));
        assert_eq!(
            s.plan_subscribe(&args, |_| false, 0),
            Ok(vec![(ChannelName::Fixed(Channel::Prices), false)]),
            "a repeat adds nothing"
        );
    }

    #[test]
    fn since_asks_for_a_replay_only_on_a_private_channel() {
        let recovery = |text: &str| match parse_client(text).map(|m| m.kind) {
            Ok(ClientKind::Subscribe(args)) => recovery_of(&args).map_err(|r| r.code),
            other => panic!("not a subscribe: {other:?}"),
        };
        let sub = |channel: &str, since: &str| {
            format!(r#"{{"type":"subscribe","data":{{"channel":"{channel}","since":{since}}}}}"#)
        };
        assert_eq!(recovery(&sub("orders", r#""3:1042""#)), Ok(Some((Channel::Orders, (3, 1042)))));
        assert_eq!(recovery(&sub("trades", r#""0:0""#)), Ok(Some((Channel::Trades, (0, 0)))));
        for bad in
            [r#""3""#, r#""-1:5""#, r#""3:-5""#, r#""a:1""#, r#"" 3:1""#, r#""3:1:2""#, "31", r#""99999999999:1""#]
        {
            assert_eq!(recovery(&sub("portfolio", bad)), Err(ErrorCode::InvalidMessage), "{bad}");
            // Public channels ignore it, whatever its form.
            assert_eq!(recovery(&sub("prices", bad)), Ok(None), "{bad}");
            assert_eq!(recovery(&sub("prices:1:ETH", bad)), Ok(None), "{bad}");
        }
        // Unknown channels are refused by the subscribe, not here.
        assert_eq!(recovery(&sub("nope", r#""x""#)), Ok(None));
        assert_eq!(recovery(r#"{"type":"subscribe","data":{"channel":"orders"}}"#), Ok(None));
        // Only with a single channel.
        let many = parse_client(r#"{"type":"subscribe","data":{"channels":["orders"],"since":"1:2"}}"#);
        assert_eq!(many.map(|m| m.kind).map_err(|e| e.code()), Err(ErrorCode::InvalidMessage));
    }

    #[test]
    fn subscription_cap_and_unknown_channels() {
        let mut s = Session::new(0, TIMERS);
        s.on_verified(Ok(ident("u1", None)));
        let many = |names: &[&'static str]| ChannelArgs {
            names: names.iter().map(|&n| n.into()).collect(),
            many: true,
            snapshot: None,
            since: None,
        };
        // All or nothing: the third name passes the limit of 2, so the
        // first two are not added either.
        let refused = s.plan_subscribe(&many(&["prices", "orders", "trades"]), |_| false, 0).unwrap_err();
        assert_eq!((refused.code, refused.index), (ErrorCode::TooManySubscriptions, 2));
        assert_eq!(s.subscriptions(), 0);
        // Repeats within one message count once.
        let plan = s.plan_subscribe(&many(&["prices:1:ETH", "prices:1:ETH", "orders"]), |_| false, 0).unwrap();
        assert_eq!(plan.iter().map(|(_, new)| *new).collect::<Vec<_>>(), [true, false, true]);
        assert_eq!(s.subscriptions(), Channel::Orders.bit());
        // Market channels the shard holds count against the limit.
        let refused = s.plan_subscribe(&many(&["prices"]), |_| false, 1).unwrap_err();
        assert_eq!(refused.code, ErrorCode::TooManySubscriptions);
        let plan = s.plan_subscribe(&many(&["prices:1:ETH"]), |_| true, 1).unwrap();
        assert!(!plan[0].1, "held: idempotent");
        let refused = s.plan_subscribe(&many(&["orders", "prices:01"]), |_| false, 0).unwrap_err();
        assert_eq!((refused.code, refused.index), (ErrorCode::UnknownChannel, 1));
        let refused = s.plan_unsubscribe(&many(&["orders", "nope"])).unwrap_err();
        assert_eq!((refused.code, refused.index), (ErrorCode::UnknownChannel, 1));
        assert_eq!(s.subscriptions(), Channel::Orders.bit(), "a refused unsubscribe changes nothing");
        assert_eq!(s.plan_unsubscribe(&many(&["orders"])), Ok(vec![ChannelName::Fixed(Channel::Orders)]));
        assert_eq!(s.subscriptions(), 0);
    }

    #[test]
    fn refresh_rules() {
        let mut s = Session::new(0, TIMERS);
        s.on_verified(Ok(ident("u1", Some(1_000))));
        assert_eq!(s.deadline_ms(), Some(31_000));
        assert_eq!(s.on_verified(Ok(ident("u1", Some(90_000)))), Verified::Refreshed);
        assert_eq!(s.deadline_ms(), Some(120_000));
        assert!(matches!(s.on_verified(Ok(ident("u2", None))), Verified::Failed(_)));
        assert!(s.is_closing());
    }

    #[test]
    fn deadlines() {
        let mut s = Session::new(100, TIMERS);
        assert_eq!(s.on_deadline(10_099), None);
        assert_eq!(s.on_deadline(10_100), Some(("Authentication timeout", CloseCode::AUTH_TIMEOUT)));
        let mut s = Session::new(0, TIMERS);
        s.on_verified(Ok(ident("u1", Some(5_000))));
        assert_eq!(s.on_deadline(34_999), None);
        assert_eq!(s.on_deadline(35_000), Some(("Token expired", CloseCode::AUTH_FAILED)));
        assert_eq!(s.on_deadline(99_999), None);
    }

    #[test]
    fn missing_token_fails_without_verification() {
        let mut s = Session::new(0, TIMERS);
        assert_eq!(s.on_message(&ClientKind::Authenticate { token: None }), Decision::AuthFailed("Token required"));
    }
}
