//! A connection's lifecycle after the upgrade (PROTOCOL.md §4, §5), sans-IO.
//!
//! Owns: the stage (awaiting auth -> authenticated -> closing), the
//! subscription set, and every decision about a parsed client message
//! (`not_authenticated`, channel rules, refresh rules, deadlines). It never
//! verifies a token itself: it asks the driver to ([`Decision::Verify`]) and
//! is told the result. Time is a parameter (`now_ms`), never read here.

use std::sync::Arc;

use super::message::{Channel, ChannelArg, ClientKind, ErrorCode};
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
    /// Reply `subscribed`; `added` says whether the registry must change.
    Subscribed {
        channel: Channel,
        added: bool,
    },
    /// Reply `unsubscribed`; `removed` says whether the registry must change.
    Unsubscribed {
        channel: Channel,
        removed: bool,
    },
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
            ClientKind::Subscribe(ChannelArg::Known(channel)) => {
                let bit = channel.bit();
                if self.subs & bit != 0 {
                    return Decision::Subscribed { channel: *channel, added: false };
                }
                if self.subs.count_ones() >= self.timers.max_subscriptions {
                    return Decision::Error(ErrorCode::TooManySubscriptions, "subscription limit reached");
                }
                self.subs |= bit;
                Decision::Subscribed { channel: *channel, added: true }
            }
            ClientKind::Unsubscribe(ChannelArg::Known(channel)) => {
                let removed = self.subs & channel.bit() != 0;
                self.subs &= !channel.bit();
                Decision::Unsubscribed { channel: *channel, removed }
            }
            ClientKind::Subscribe(ChannelArg::Unknown) | ClientKind::Unsubscribe(ChannelArg::Unknown) => {
                Decision::Error(
                    ErrorCode::UnknownChannel,
                    "unknown channel: expected prices, orders, portfolio or trades",
                )
            }
            ClientKind::Ping | ClientKind::Authenticate { .. } => unreachable!("handled above"),
        }
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

    /// Called when `deadline_ms` has passed: the `auth_failed` text and the
    /// close code to end the connection with, if it must end.
    pub fn on_deadline(&mut self, now_ms: u64) -> Option<(&'static str, CloseCode)> {
        let due = self.deadline_ms().is_some_and(|d| now_ms >= d);
        if !due {
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
            s.on_message(&ClientKind::Subscribe(ChannelArg::Known(Channel::Orders)));
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
        let sub = ClientKind::Subscribe(ChannelArg::Known(Channel::Prices));
        assert!(matches!(s.on_message(&sub), Decision::Error(ErrorCode::NotAuthenticated, _)));
        assert_eq!(s.on_message(&ClientKind::Ping), Decision::Pong);
        let auth = ClientKind::Authenticate { token: Some("tok".into()) };
        assert_eq!(s.on_message(&auth), Decision::Verify("tok"));
        assert_eq!(s.on_verified(Ok(ident("u1", None))), Verified::Authenticated);
        assert_eq!(s.on_message(&sub), Decision::Subscribed { channel: Channel::Prices, added: true });
        assert_eq!(s.on_message(&sub), Decision::Subscribed { channel: Channel::Prices, added: false });
    }

    #[test]
    fn subscription_cap_and_unknown_channels() {
        let mut s = Session::new(0, TIMERS);
        s.on_verified(Ok(ident("u1", None)));
        for ch in [Channel::Prices, Channel::Orders] {
            s.on_message(&ClientKind::Subscribe(ChannelArg::Known(ch)));
        }
        assert!(matches!(
            s.on_message(&ClientKind::Subscribe(ChannelArg::Known(Channel::Trades))),
            Decision::Error(ErrorCode::TooManySubscriptions, _)
        ));
        assert!(matches!(
            s.on_message(&ClientKind::Subscribe(ChannelArg::Unknown)),
            Decision::Error(ErrorCode::UnknownChannel, _)
        ));
        assert_eq!(
            s.on_message(&ClientKind::Unsubscribe(ChannelArg::Known(Channel::Orders))),
            Decision::Unsubscribed { channel: Channel::Orders, removed: true }
        );
        assert_eq!(s.subscriptions(), Channel::Prices.bit());
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
