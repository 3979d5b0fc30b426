//! The sync worker: message-count reconciliation, the connection registry,
//! heartbeats and the cluster view, every `REDIS_SYNC_INTERVAL_MS`.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::Receiver;
use serde_json::{json, Value};

use redis::{Cmd, FromRedisValue, Value as Reply};

use super::conn::Con;
use super::{ClusterState, RegistryEvent, Settings};
use crate::limits::Limits;
use crate::protocol::message::Channel;
use crate::telemetry::{total, LogLimiter, ShardStats};

/// A 60 s rate-limit key lives a little past its window.
const RATELIMIT_TTL_MS: i64 = 120_000;

struct Record {
    ip: IpAddr,
    at_ms: u64,
    user: Option<Arc<str>>,
    subs: u8,
}

impl Record {
    fn json(&self, id: u64) -> String {
        let subs: Vec<&str> = Channel::ALL.iter().filter(|c| self.subs & c.bit() != 0).map(|c| c.name()).collect();
        json!({"id": id, "user": self.user.as_deref(), "ip": self.ip.to_string(), "connectedAt": self.at_ms, "subscriptions": subs})
            .to_string()
    }
}

#[derive(Default)]
struct Registry {
    conns: HashMap<u64, Record>,
    dirty: HashSet<u64>,
    removed: HashSet<u64>,
}

impl Registry {
    fn apply(&mut self, e: RegistryEvent) {
        match e {
            RegistryEvent::Open { id, ip, at_ms } => {
                self.conns.insert(id, Record { ip, at_ms, user: None, subs: 0 });
                self.dirty.insert(id);
            }
            RegistryEvent::Auth { id, user } => {
                if let Some(r) = self.conns.get_mut(&id) {
                    r.user = Some(user);
                    self.dirty.insert(id);
                }
            }
            RegistryEvent::Subscriptions { id, subs } => {
                if let Some(r) = self.conns.get_mut(&id) {
                    r.subs = subs;
                    self.dirty.insert(id);
                }
            }
            RegistryEvent::Close { id } => {
                if self.conns.remove(&id).is_some() {
                    self.dirty.remove(&id);
                    self.removed.insert(id);
                }
            }
        }
    }
}

struct Worker {
    s: Settings,
    limits: Arc<Limits>,
    stats: Vec<Arc<ShardStats>>,
    state: Arc<ClusterState>,
    reg: Registry,
    written_ips: HashSet<IpAddr>,
}

pub(super) fn run(
    s: Settings,
    events: Receiver<RegistryEvent>,
    limits: Arc<Limits>,
    stats: Vec<Arc<ShardStats>>,
    state: Arc<ClusterState>,
    stop: Arc<AtomicBool>,
) {
    let log = LogLimiter::new(Duration::from_secs(10));
    let mut refused_log = LogLimiter::new(REFUSED_LOG_EVERY);
    let mut last_error: Option<String> = None;
    let interval = s.sync_interval;
    let heartbeat = s.heartbeat;
    let mut w = Worker { s, limits, stats, state, reg: Registry::default(), written_ips: HashSet::new() };
    let mut con: Option<Con> = None;
    let mut next_heartbeat = Instant::now();
    let mut full = true;
    loop {
        let stopping = stop.load(Ordering::Acquire);
        while let Ok(e) = events.try_recv() {
            w.reg.apply(e);
        }
        let mut connect_error = None;
        if con.is_none() {
            con = w.s.connect().map_err(|e| connect_error = Some(e)).ok();
            full = true;
        }
        let result = match con.as_mut() {
            None => {
                Err(connect_error.unwrap_or_else(|| redis::RedisError::from((redis::ErrorKind::Io, "not connected"))))
            }
            Some(c) => {
                let heartbeat_due = full || Instant::now() >= next_heartbeat;
                let r = w.round(c, heartbeat_due);
                if r.is_ok() && heartbeat_due {
                    next_heartbeat = Instant::now() + heartbeat;
                    full = false;
                }
                r
            }
        };
        let was_up = w.state.up.swap(result.is_ok(), Ordering::Relaxed);
        match &result {
            Ok(()) => {
                if !was_up {
                    tracing::info!("redis reachable: cluster-wide counting on");
                    // A refusal after this is a new one: logged at once.
                    refused_log = LogLimiter::new(REFUSED_LOG_EVERY);
                }
                last_error = None;
                *w.state.error.lock() = None;
            }
            Err(e) => {
                con = None;
                let (error, refused) = describe(&w.s, e);
                *w.state.error.lock() = Some(error.clone());
                if refused {
                    // Wrong credentials or certificates do not heal by
                    // themselves: error once, then a reminder at most every
                    // REFUSED_LOG_EVERY (however the failures alternate
                    // with timeouts meanwhile).
                    if let Some(suppressed) = refused_log.allow() {
                        tracing::error!(error, suppressed, "redis refused this client; limits fall back to local counts (check REDIS_URL's user and password, and REDIS_TLS_CA_FILE)");
                    }
                } else if was_up || last_error.is_none() {
                    tracing::warn!(error, "redis unreachable: limits fall back to local counts");
                } else if let Some(suppressed) = log.allow() {
                    tracing::debug!(error, suppressed, "redis still unreachable");
                }
                last_error = Some(error);
            }
        }
        if stopping {
            if let Some(c) = con.as_mut() {
                w.remove_own(c);
            }
            break;
        }
        let until = Instant::now() + interval;
        while Instant::now() < until && !stop.load(Ordering::Acquire) {
            std::thread::sleep(interval.min(Duration::from_millis(20)));
        }
    }
}

/// How often a refusal that goes on (wrong password, untrusted
/// certificate) is logged again after its first error line.
const REFUSED_LOG_EVERY: Duration = Duration::from_secs(60);

/// A failed round as an operator reads it (the password scrubbed), and
/// whether Redis refused this client (credentials, ACL permissions, TLS)
/// rather than being out of reach.
fn describe(s: &Settings, e: &redis::RedisError) -> (String, bool) {
    let text = s.target.redact(&e.to_string());
    let lower = text.to_ascii_lowercase();
    let auth = matches!(
        e.kind(),
        redis::ErrorKind::AuthenticationFailed | redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm)
    ) || ["wrongpass", "noauth", "noperm", "invalid username-password"].iter().any(|w| lower.contains(w));
    let tls = ["certificate", "tls", "handshake", "corrupt message", "peer sent"].iter().any(|w| lower.contains(w));
    match (auth, tls) {
        (true, _) => (format!("authentication failed: {text}"), true),
        (false, true) => (format!("TLS failed: {text}"), true),
        _ => (text, false),
    }
}

/// The reply at `i` of a batch, converted.
fn reply<T: FromRedisValue>(replies: &[Reply], i: usize) -> redis::RedisResult<T> {
    T::from_redis_value(replies.get(i).cloned().unwrap_or(Reply::Nil)).map_err(Into::into)
}

impl Worker {
    fn round(&mut self, c: &mut Con, heartbeat: bool) -> redis::RedisResult<()> {
        self.reconcile_users(c)?;
        if heartbeat {
            self.heartbeat(c)?;
        } else {
            self.write_changes(c)?;
        }
        self.refresh_view(c)
    }

    /// Pushes this instance's new message counts per user and learns the
    /// other instances' counts for the current window.
    fn reconcile_users(&mut self, c: &mut Con) -> redis::RedisResult<()> {
        let now = self.s.clock.epoch_ms();
        let window = now / crate::limits::WINDOW_MS;
        let users = self.limits.user_counters();
        if users.is_empty() {
            return Ok(());
        }
        let mut cmds = Vec::with_capacity(users.len() * 2);
        // Per user: its local count and where its window's total is in the replies.
        let mut asked = Vec::with_capacity(users.len());
        for counter in &users {
            let key = format!("{}ratelimit:{}:{window}", self.s.prefix, counter.user());
            let local = counter.current(now);
            let delta = local.saturating_sub(counter.pushed(window));
            asked.push((local, cmds.len()));
            if delta > 0 {
                cmds.push(Cmd::incr(&key, delta));
                cmds.push(Cmd::pexpire(&key, RATELIMIT_TTL_MS));
            } else {
                cmds.push(Cmd::get(&key));
            }
        }
        let replies = c.batch(cmds)?;
        for (counter, (local, at)) in users.iter().zip(asked) {
            let total: Option<u32> = reply(&replies, at)?;
            counter.set_pushed(window, local);
            counter.set_others(window, total.unwrap_or(0).saturating_sub(local));
        }
        Ok(())
    }

    fn summary(&self) -> Value {
        let channels: serde_json::Map<String, Value> = Channel::ALL
            .iter()
            .map(|ch| (ch.name().to_owned(), json!(total(&self.stats, |s| s.subscribers[*ch as usize].get()))))
            .collect();
        json!({
            "instance": self.s.instance,
            "total": total(&self.stats, |s| s.connections_active.get()),
            "authenticated": total(&self.stats, |s| s.connections_authenticated.get()),
            "shards": self.stats.len(),
            "channels": channels,
            "heartbeatAt": self.s.clock.epoch_ms(),
        })
    }

    /// Rewrites every record of this instance (heals after a Redis restart).
    fn heartbeat(&mut self, c: &mut Con) -> redis::RedisResult<()> {
        let (p, id, ttl) = (&self.s.prefix, &self.s.instance, self.s.ttl_ms() as i64);
        let now = self.s.clock.epoch_ms();
        let mut cmds = vec![
            Cmd::zadd(format!("{p}instances"), id, now),
            Cmd::zrembyscore(format!("{p}instances"), "-inf", now.saturating_sub(2 * ttl as u64)),
            Cmd::set(format!("{p}instance:{id}"), self.summary().to_string()),
            Cmd::pexpire(format!("{p}instance:{id}"), ttl),
        ];
        let ips = self.limits.ip_counts();
        let current: HashSet<IpAddr> = ips.iter().map(|(ip, _)| *ip).collect();
        for (ip, n) in &ips {
            let key = format!("{p}ip:{ip}");
            cmds.push(Cmd::hset(&key, id, *n));
            cmds.push(Cmd::pexpire(&key, ttl));
        }
        for gone in self.written_ips.difference(&current) {
            cmds.push(Cmd::hdel(format!("{p}ip:{gone}"), id));
        }
        let conns_key = format!("{p}connections:{id}");
        cmds.push(Cmd::del(&conns_key));
        for chunk in self.reg.conns.iter().collect::<Vec<_>>().chunks(500) {
            let fields: Vec<(String, String)> = chunk.iter().map(|(cid, r)| (cid.to_string(), r.json(**cid))).collect();
            cmds.push(Cmd::hset_multiple(&conns_key, &fields));
        }
        cmds.push(Cmd::pexpire(&conns_key, ttl));
        c.batch(cmds)?;
        self.written_ips = current;
        self.reg.dirty.clear();
        self.reg.removed.clear();
        Ok(())
    }

    fn write_changes(&mut self, c: &mut Con) -> redis::RedisResult<()> {
        if self.reg.dirty.is_empty() && self.reg.removed.is_empty() {
            return Ok(());
        }
        let key = format!("{}connections:{}", self.s.prefix, self.s.instance);
        let mut cmds = Vec::with_capacity(self.reg.dirty.len() + self.reg.removed.len() + 1);
        for id in &self.reg.dirty {
            if let Some(r) = self.reg.conns.get(id) {
                cmds.push(Cmd::hset(&key, id.to_string(), r.json(*id)));
            }
        }
        for id in &self.reg.removed {
            cmds.push(Cmd::hdel(&key, id.to_string()));
        }
        cmds.push(Cmd::pexpire(&key, self.s.ttl_ms() as i64));
        c.batch(cmds)?;
        self.reg.dirty.clear();
        self.reg.removed.clear();
        Ok(())
    }

    /// Reads the live instances' summaries into the shared view.
    /// Also tells the per-IP worker which instances are dead.
    fn refresh_view(&mut self, c: &mut Con) -> redis::RedisResult<()> {
        let p = &self.s.prefix;
        let cutoff = self.s.clock.epoch_ms().saturating_sub(self.s.ttl_ms());
        let all: Vec<(String, u64)> = Cmd::zrange_withscores(format!("{p}instances"), 0, -1)
            .query::<Vec<(String, f64)>>(c.like())
            .map(|v| v.into_iter().map(|(i, score)| (i, score as u64)).collect())?;
        let (alive, dead): (Vec<_>, Vec<_>) = all.into_iter().partition(|(_, at)| *at >= cutoff);
        *self.state.dead.lock() = Arc::new(dead.into_iter().map(|(i, _)| i).collect());
        // One GET per summary (each instance's key has its own slot on a
        // cluster: no MGET across slots).
        let gets: Vec<Cmd> = alive.iter().map(|(i, _)| Cmd::get(format!("{p}instance:{i}"))).collect();
        let raw = c.batch(gets)?;
        let summaries: Vec<Value> = (0..raw.len())
            .filter_map(|i| reply::<Option<String>>(&raw, i).ok().flatten())
            .filter_map(|s| serde_json::from_str(&s).ok())
            .collect();
        let sum = |field: &str| summaries.iter().map(|v| v[field].as_u64().unwrap_or(0)).sum::<u64>();
        let mut channels = serde_json::Map::new();
        for ch in Channel::ALL {
            let n: u64 = summaries.iter().map(|v| v["channels"][ch.name()].as_u64().unwrap_or(0)).sum();
            channels.insert(ch.name().to_owned(), json!(n));
        }
        *self.state.view.lock() = json!({
            "instances": summaries,
            "total": sum("total"),
            "authenticated": sum("authenticated"),
            "channels": channels,
        });
        Ok(())
    }

    /// On shutdown: this instance's records go away at once.
    fn remove_own(&mut self, c: &mut Con) {
        let (p, id) = (&self.s.prefix, &self.s.instance);
        let mut cmds = vec![
            Cmd::del(format!("{p}connections:{id}")),
            Cmd::del(format!("{p}instance:{id}")),
            Cmd::zrem(format!("{p}instances"), id),
        ];
        for ip in &self.written_ips {
            cmds.push(Cmd::hdel(format!("{p}ip:{ip}"), id));
        }
        match c.batch(cmds) {
            Ok(_) => tracing::info!("redis: this instance's records removed"),
            Err(e) => tracing::warn!(error = %e, "redis: could not remove this instance's records (they expire)"),
        }
    }
}
