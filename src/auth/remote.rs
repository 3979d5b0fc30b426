//! The remote Auth Service verifier (PROTOCOL.md §4.3, remote).
//!
//! Owns: a fixed pool of worker threads (the concurrency bound) that call
//! `GET {AUTH_SERVICE_URL}{AUTH_SERVICE_VERIFY_ENDPOINT}` with the bearer
//! token, a bounded job queue in front of them, and a cache of positive
//! answers. Shards never block: they get a oneshot receiver, and the worker's
//! send wakes the shard's task from the worker thread (glommio forwards
//! foreign wake-ups to the owning executor).
//!
//! Fail closed: timeouts, connection errors, 5xx and a full queue all answer
//! "Authentication service unavailable".

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Sender, TrySendError};
use futures_channel::oneshot;
use parking_lot::Mutex;
use serde::Deserialize;

use super::{AuthFailure, ConfigError, Identity, StringOrNumber, Verification};
use crate::config::Config;

const UNAVAILABLE: &str = "Authentication service unavailable";
/// Longest a positive answer is reused (PROTOCOL.md §4.3).
const CACHE_TTL: Duration = Duration::from_secs(60);
/// Entries kept before the cache is swept of expired ones (then cleared).
const CACHE_MAX: usize = 100_000;
/// Jobs waiting per worker before new requests are refused.
const QUEUE_PER_WORKER: usize = 64;
/// Largest response body read from the Auth Service.
const MAX_BODY: u64 = 64 * 1024;

type Reply = oneshot::Sender<Result<Identity, AuthFailure>>;

struct Job {
    token: String,
    reply: Reply,
}

struct Shared {
    cache: Mutex<HashMap<String, (Identity, Instant)>>,
    reachable: AtomicBool,
}

/// Handle to the worker pool; cheap to share behind the `Auth` enum.
pub struct RemoteAuth {
    jobs: Sender<Job>,
    shared: Arc<Shared>,
}

impl RemoteAuth {
    pub fn start(base: &str, cfg: &Config) -> Result<Self, ConfigError> {
        if !base.starts_with("http://") {
            return Err(ConfigError::AuthServiceUrl(format!(
                "{base:?}: only http:// URLs are supported (put TLS in front of the Auth Service on its side)"
            )));
        }
        let url = format!("{}{}", base.trim_end_matches('/'), cfg.auth_service_verify_endpoint);
        let workers = cfg.auth_service_concurrency.get();
        let (tx, rx) = channel::bounded::<Job>(workers * QUEUE_PER_WORKER);
        let shared = Arc::new(Shared { cache: Mutex::new(HashMap::new()), reachable: AtomicBool::new(true) });
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(cfg.auth_service_timeout_ms))
            .http_status_as_error(false)
            .build()
            .into();
        for i in 0..workers {
            let (rx, agent, url, shared) = (rx.clone(), agent.clone(), url.clone(), shared.clone());
            std::thread::Builder::new()
                .name(format!("auth-{i}"))
                .spawn(move || {
                    for job in rx.iter() {
                        let result = call(&agent, &url, &job.token, &shared);
                        if let Ok(identity) = &result {
                            remember(&shared, &job.token, identity);
                        }
                        let _ = job.reply.send(result); // the connection may be gone
                    }
                })
                .map_err(|e| ConfigError::AuthServiceUrl(format!("cannot start worker: {e}")))?;
        }
        Ok(Self { jobs: tx, shared })
    }

    pub fn verify(&self, token: &str) -> Verification {
        if let Some(identity) = self.cached(token) {
            return Verification::Done(Ok(identity));
        }
        let (reply, rx) = oneshot::channel();
        match self.jobs.try_send(Job { token: token.to_owned(), reply }) {
            Ok(()) => Verification::Pending(rx),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                Verification::Done(Err(AuthFailure(UNAVAILABLE.into())))
            }
        }
    }

    pub fn is_reachable(&self) -> bool {
        self.shared.reachable.load(Ordering::Relaxed)
    }

    fn cached(&self, token: &str) -> Option<Identity> {
        let cache = self.shared.cache.lock();
        let (identity, until) = cache.get(token)?;
        (Instant::now() < *until).then(|| identity.clone())
    }
}

fn remember(shared: &Shared, token: &str, identity: &Identity) {
    let now = Instant::now();
    let mut ttl = CACHE_TTL;
    if let Some(exp_ms) = identity.expires_at_ms {
        let left = exp_ms.saturating_sub(super::unix_secs() * 1000);
        ttl = ttl.min(Duration::from_millis(left));
    }
    let mut cache = shared.cache.lock();
    if cache.len() >= CACHE_MAX {
        cache.retain(|_, (_, until)| *until > now);
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
    }
    cache.insert(token.to_owned(), (identity.clone(), now + ttl));
}

#[derive(Deserialize)]
struct VerifyBody {
    #[serde(default)]
    data: Option<UserHolder>,
    #[serde(default)]
    user: Option<User>,
}

#[derive(Deserialize)]
struct UserHolder {
    #[serde(default)]
    user: Option<User>,
}

#[derive(Deserialize)]
struct User {
    id: StringOrNumber,
    #[serde(default)]
    email: Option<String>,
}

#[derive(Deserialize)]
struct ExpOnly {
    #[serde(default)]
    exp: Option<u64>,
}

fn call(agent: &ureq::Agent, url: &str, token: &str, shared: &Shared) -> Result<Identity, AuthFailure> {
    let unavailable = || AuthFailure(UNAVAILABLE.into());
    let response =
        agent.get(url).header("Authorization", &format!("Bearer {token}")).header("Accept", "application/json").call();
    let mut response = match response {
        Ok(r) => r,
        Err(e) => {
            shared.reachable.store(false, Ordering::Relaxed);
            tracing::warn!(error = %e, "auth service request failed");
            return Err(unavailable());
        }
    };
    let status = response.status().as_u16();
    shared.reachable.store(status < 500, Ordering::Relaxed);
    match status {
        200 => {}
        401 | 403 => return Err(AuthFailure("Invalid token".into())),
        _ => return Err(unavailable()),
    }
    let body: VerifyBody = response.body_mut().with_config().limit(MAX_BODY).read_json().map_err(|_| unavailable())?;
    let user = body.data.and_then(|d| d.user).or(body.user).ok_or_else(unavailable)?;
    let exp = jsonwebtoken::dangerous::insecure_decode_claims::<ExpOnly>(token).ok().and_then(|c| c.exp);
    Ok(Identity {
        user_id: Arc::from(user.id.into_string()),
        email: user.email.map(Arc::from),
        expires_at_ms: exp.map(|e| e.saturating_mul(1000)),
    })
}
