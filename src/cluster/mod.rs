//! Redis: cluster-wide limits and the connection registry, off the hot path
//! (PROTOCOL.md §1, §7, §8).
//!
//! Owns: two worker threads with their own Redis connections. The *ip*
//! worker answers the one question a new connection may ask Redis (is this
//! IP over its cluster-wide limit?) with one `EVAL`; shards wait for it with a
//! short timeout and fall back to the local count. The *sync* worker, every
//! `REDIS_SYNC_INTERVAL_MS`, reconciles per-user message counts (pushes this
//! instance's increments, learns the others'), writes connection-registry
//! changes and refreshes the cluster view for `/connections`; every
//! `WS_HEARTBEAT_INTERVAL` it rewrites this instance's records in full, so
//! they heal after a Redis restart and expire three intervals after the
//! instance dies. Redis is never awaited on the path of a client message or
//! an update. While Redis is unreachable everything runs on local counts,
//! `/health` says `degraded`, and the workers reconnect on their own.
//!
//! Keys (all under `REDIS_KEY_PREFIX`, default `moonx:ws:`):
//! `ip:{ip}` hash instance -> open connections from that IP;
//! `ratelimit:{user}:{window}` message count of a 60 s window (expires);
//! `instances` sorted set instance -> last heartbeat (ms);
//! `instance:{id}` JSON summary (expires); `connections:{id}` hash
//! connection id -> JSON record (expires).
//!
//! Redis Cluster: every command and script here touches exactly one key,
//! so none can span two hash slots (the per-IP script is told which
//! instances are dead instead of reading `instances` itself), and batches
//! are split by node (`conn.rs`). The same commands run on one node.

mod conn;
mod sync;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam::channel::{self, Receiver, Sender};
use futures_channel::oneshot;
use parking_lot::Mutex;

use crate::clock::Clock;
use crate::config::Config;
use crate::limits::Limits;
use crate::telemetry::{Exposition, Kind, ShardStats};

/// Events the shards report for the registry (bounded; drops are counted).
#[derive(Debug)]
pub enum RegistryEvent {
    Open { id: u64, ip: IpAddr, at_ms: u64 },
    Auth { id: u64, user: Arc<str> },
    Subscriptions { id: u64, subs: u8 },
    Close { id: u64 },
}

/// What Redis said about a new connection's IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpVerdict {
    Allowed,
    OverLimit,
    /// No answer in time: the local count decided (counted as a fallback).
    Unavailable,
}

enum IpCmd {
    Admit { ip: IpAddr, local: u32, reply: oneshot::Sender<bool> },
    Set { ip: IpAddr, local: u32 },
}

/// Shared state read by `/health`, `/metrics` and `/connections`.
#[derive(Debug, Default)]
pub struct ClusterState {
    pub up: AtomicBool,
    /// Why the last round failed (readable, without the password); None
    /// while Redis answers.
    pub error: Mutex<Option<String>>,
    /// Instances whose last heartbeat is older than three heartbeat
    /// intervals, from the last sync: the per-IP script drops their counts.
    pub dead: Mutex<Arc<Vec<String>>>,
    /// Decisions taken on local counts because Redis did not answer.
    pub fallbacks: AtomicU64,
    /// Registry events dropped because the queue was full.
    pub events_dropped: AtomicU64,
    /// Per-IP count updates dropped because the queue was full (the next
    /// heartbeat rewrites every count).
    pub ip_updates_dropped: AtomicU64,
    /// The last cluster view (per-instance summaries and totals).
    pub view: Mutex<serde_json::Value>,
}

pub struct Cluster {
    ip_tx: Sender<IpCmd>,
    events: Sender<RegistryEvent>,
    pub state: Arc<ClusterState>,
    timeout: Duration,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Settings both workers share.
#[derive(Clone)]
pub(crate) struct Settings {
    pub target: conn::Target,
    pub prefix: String,
    pub instance: String,
    pub timeout: Duration,
    pub sync_interval: Duration,
    pub heartbeat: Duration,
    pub max_per_ip: u32,
    /// The server's clock (heartbeats, liveness, rate windows).
    pub clock: Clock,
}

impl Settings {
    /// Records expire after three missed heartbeats.
    pub fn ttl_ms(&self) -> u64 {
        self.heartbeat.as_millis() as u64 * 3
    }

    pub fn connect(&self) -> redis::RedisResult<conn::Con> {
        self.target.connect(self.timeout)
    }
}

/// Why Redis support could not start (a start-up error).
#[derive(Debug, thiserror::Error)]
#[error("REDIS_URL: {0}")]
pub struct ClusterError(String);

impl Cluster {
    /// Starts the workers when `REDIS_URL` is set (an unreachable Redis is
    /// not an error: the service starts degraded and keeps retrying).
    pub fn start(
        cfg: &Config,
        instance: &str,
        limits: Arc<Limits>,
        stats: Vec<Arc<ShardStats>>,
        clock: Clock,
    ) -> Result<Option<Arc<Cluster>>, ClusterError> {
        let Some(url) = &cfg.redis_url else { return Ok(None) };
        let target = conn::Target::from_config(cfg, url, cfg.redis_timeout_ms)?;
        let mode = target.mode;
        let settings = Settings {
            target,
            prefix: cfg.redis_key_prefix.clone(),
            instance: instance.to_owned(),
            timeout: cfg.redis_timeout_ms,
            sync_interval: cfg.redis_sync_interval_ms,
            heartbeat: cfg.ws_heartbeat_interval,
            max_per_ip: cfg.rate_limit_max_connections_per_ip.get(),
            clock,
        };
        let state = Arc::new(ClusterState::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (ip_tx, ip_rx) = channel::bounded::<IpCmd>(16 * 1024);
        let (events, events_rx) = channel::bounded::<RegistryEvent>(64 * 1024);
        let mut threads = Vec::new();
        {
            let (s, state, stop) = (settings.clone(), state.clone(), stop.clone());
            threads.push(spawn("redis-ip", move || ip_worker(s, ip_rx, state, stop))?);
        }
        {
            let (s, state, stop, limits) = (settings, state.clone(), stop.clone(), limits.clone());
            threads.push(spawn("redis-sync", move || sync::run(s, events_rx, limits, stats, state, stop))?);
        }
        let (tx, dropped) = (ip_tx.clone(), state.clone());
        limits.set_remote_release(Box::new(move |ip, local| {
            if tx.try_send(IpCmd::Set { ip, local }).is_err() {
                dropped.ip_updates_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }));
        tracing::info!(prefix = %cfg.redis_key_prefix, mode, "redis: cluster-wide limits and registry enabled");
        Ok(Some(Arc::new(Cluster {
            ip_tx,
            events,
            state,
            timeout: cfg.redis_timeout_ms,
            stop,
            threads: Mutex::new(threads),
        })))
    }

    /// Asks Redis whether `ip`, with `local` connections here (the new one
    /// included), stays within the cluster-wide limit. Waits at most the
    /// Redis timeout; never fails the connection for Redis' sake.
    pub async fn admit_ip(&self, ip: IpAddr, local: u32) -> IpVerdict {
        if !self.state.up.load(Ordering::Relaxed) {
            self.state.fallbacks.fetch_add(1, Ordering::Relaxed);
            return IpVerdict::Unavailable;
        }
        let (reply, rx) = oneshot::channel();
        if self.ip_tx.try_send(IpCmd::Admit { ip, local, reply }).is_err() {
            self.state.fallbacks.fetch_add(1, Ordering::Relaxed);
            return IpVerdict::Unavailable;
        }
        let timeout = self.timeout;
        let answer = futures_lite::future::or(async { rx.await.ok() }, async {
            glommio::timer::sleep(timeout).await;
            None
        })
        .await;
        match answer {
            Some(true) => IpVerdict::Allowed,
            Some(false) => IpVerdict::OverLimit,
            None => {
                self.state.fallbacks.fetch_add(1, Ordering::Relaxed);
                IpVerdict::Unavailable
            }
        }
    }

    /// Reports a registry event (never blocks; a full queue drops and counts).
    pub fn event(&self, e: RegistryEvent) {
        if self.events.try_send(e).is_err() {
            self.state.events_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn is_up(&self) -> bool {
        self.state.up.load(Ordering::Relaxed)
    }

    /// Describes the Redis metrics.
    pub fn describe(&self, e: &mut Exposition) {
        let s = &self.state;
        e.single(Kind::Gauge, "moonx_ws_redis_up", "Whether Redis answered the last sync.", self.is_up() as u8);
        e.single(
            Kind::Counter,
            "moonx_ws_redis_fallbacks_total",
            "New connections admitted on local counts because Redis did not answer.",
            s.fallbacks.load(Ordering::Relaxed),
        );
        e.single(
            Kind::Counter,
            "moonx_ws_redis_registry_events_dropped_total",
            "Registry events dropped (queue full).",
            s.events_dropped.load(Ordering::Relaxed),
        );
        e.single(
            Kind::Counter,
            "moonx_ws_redis_ip_updates_dropped_total",
            "Per-IP count updates dropped (queue full); the next heartbeat rewrites every count.",
            s.ip_updates_dropped.load(Ordering::Relaxed),
        );
    }

    /// Stops the workers; the sync worker removes this instance's records.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, ClusterError> {
    std::thread::Builder::new().name(name.into()).spawn(f).map_err(|e| ClusterError(e.to_string()))
}

/// Admits one IP: drops the fields of dead instances (ARGV[5..], from the
/// last sync), sums the others' counts with ours, and records ours if the
/// total stays within the limit. One key, so one slot on Redis Cluster.
const ADMIT_LUA: &str = r#"
local dead = {}
for i = 5, #ARGV do dead[ARGV[i]] = true end
local total = tonumber(ARGV[4])
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if dead[all[i]] then redis.call('HDEL', KEYS[1], all[i])
  elseif all[i] ~= ARGV[1] then total = total + tonumber(all[i + 1]) end
end
if total > tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"#;

fn ip_worker(s: Settings, rx: Receiver<IpCmd>, state: Arc<ClusterState>, stop: Arc<AtomicBool>) {
    let script = redis::Script::new(ADMIT_LUA);
    // Connected up front, so the first new connection does not pay for it.
    let mut con: Option<conn::Con> = s.connect().ok();
    while !stop.load(Ordering::Acquire) {
        let cmd = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(c) => c,
            Err(channel::RecvTimeoutError::Timeout) => continue,
            Err(channel::RecvTimeoutError::Disconnected) => break,
        };
        if con.is_none() {
            con = s.connect().ok();
        }
        let Some(c) = con.as_mut() else {
            // The sync worker owns the up/down state; an admit just goes unanswered.
            continue;
        };
        let result: redis::RedisResult<()> = match cmd {
            IpCmd::Admit { ip, local, reply } => {
                let dead = state.dead.lock().clone();
                script
                    .key(format!("{}ip:{ip}", s.prefix))
                    .arg(&s.instance)
                    .arg(s.max_per_ip)
                    .arg(s.ttl_ms())
                    .arg(local)
                    .arg(dead.as_slice())
                    .invoke::<i64>(c.like())
                    .map(|ok| {
                        let _ = reply.send(ok == 1);
                    })
            }
            IpCmd::Set { ip, local } => {
                let key = format!("{}ip:{ip}", s.prefix);
                if local == 0 {
                    redis::Cmd::hdel(&key, &s.instance).query::<()>(c.like())
                } else {
                    c.batch(vec![
                        redis::Cmd::hset(&key, &s.instance, local),
                        redis::Cmd::pexpire(&key, s.ttl_ms() as i64),
                    ])
                    .map(drop)
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "redis ip worker: command failed; reconnecting");
            state.up.store(false, Ordering::Relaxed);
            con = None;
        }
    }
}
