//! The sync worker: message-count reconciliation, the connection registry,
//! heartbeats and the cluster view, every `REDIS_SYNC_INTERVAL_MS`.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::Receiver;
use serde_json::{json, Value};

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
    let interval = s.sync_interval;
    let heartbeat = s.heartbeat;
    let mut w = Worker { s, limits, stats, state, reg: Registry::default(), written_ips: HashSet::new() };
    let mut con: Option<redis::Connection> = None;
    let mut next_heartbeat = Instant::now();
    let mut full = true;
    loop {
        let stopping = stop.load(Ordering::Acquire);
        while let Ok(e) = events.try_recv() {
            w.reg.apply(e);
        }
        if con.is_none() {
            con = w.s.connect().ok();
            full = true;
        }
        let result = match con.as_mut() {
            None => Err(redis::RedisError::from((redis::ErrorKind::Io, "not connected"))),
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
            Ok(()) if !was_up => tracing::info!("redis reachable: cluster-wide counting on"),
            Err(e) => {
                con = None;
                if was_up {
                    tracing::warn!(error = %e, "redis unreachable: limits fall back to local counts");
                } else if let Some(suppressed) = log.allow() {
                    tracing::debug!(error = %e, suppressed, "redis still unreachable");
                }
            }
            Ok(()) => {}
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

impl Worker {
    fn round(&mut self, c: &mut redis::Connection, heartbeat: bool) -> redis::RedisResult<()> {
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
    fn reconcile_users(&mut self, c: &mut redis::Connection) -> redis::RedisResult<()> {
        let now = self.s.clock.epoch_ms();
        let window = now / crate::limits::WINDOW_MS;
        let users = self.limits.user_counters();
        if users.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        let mut locals = Vec::with_capacity(users.len());
        for counter in &users {
            let key = format!("{}ratelimit:{}:{window}", self.s.prefix, counter.user());
            let local = counter.current(now);
            let delta = local.saturating_sub(counter.pushed(window));
            if delta > 0 {
                pipe.incr(&key, delta).pexpire(&key, RATELIMIT_TTL_MS).ignore();
            } else {
                pipe.get(&key);
            }
            locals.push(local);
        }
        let totals: Vec<Option<u32>> = pipe.query(c)?;
        for ((counter, total), local) in users.iter().zip(totals).zip(locals) {
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
    fn heartbeat(&mut self, c: &mut redis::Connection) -> redis::RedisResult<()> {
        let (p, id, ttl) = (&self.s.prefix, &self.s.instance, self.s.ttl_ms() as i64);
        let now = self.s.clock.epoch_ms();
        let mut pipe = redis::pipe();
        pipe.zadd(format!("{p}instances"), id, now).ignore();
        pipe.zrembyscore(format!("{p}instances"), "-inf", now.saturating_sub(2 * ttl as u64)).ignore();
        pipe.set(format!("{p}instance:{id}"), self.summary().to_string()).ignore();
        pipe.pexpire(format!("{p}instance:{id}"), ttl).ignore();
        let ips = self.limits.ip_counts();
        let current: HashSet<IpAddr> = ips.iter().map(|(ip, _)| *ip).collect();
        for (ip, n) in &ips {
            let key = format!("{p}ip:{ip}");
            pipe.hset(&key, id, *n).ignore().pexpire(&key, ttl).ignore();
        }
        for gone in self.written_ips.difference(&current) {
            pipe.hdel(format!("{p}ip:{gone}"), id).ignore();
        }
        let conns_key = format!("{p}connections:{id}");
        pipe.del(&conns_key).ignore();
        for chunk in self.reg.conns.iter().collect::<Vec<_>>().chunks(500) {
            let fields: Vec<(String, String)> = chunk.iter().map(|(cid, r)| (cid.to_string(), r.json(**cid))).collect();
            pipe.hset_multiple(&conns_key, &fields).ignore();
        }
        pipe.pexpire(&conns_key, ttl).ignore();
        pipe.query::<()>(c)?;
        self.written_ips = current;
        self.reg.dirty.clear();
        self.reg.removed.clear();
        Ok(())
    }

    fn write_changes(&mut self, c: &mut redis::Connection) -> redis::RedisResult<()> {
        if self.reg.dirty.is_empty() && self.reg.removed.is_empty() {
            return Ok(());
        }
        let key = format!("{}connections:{}", self.s.prefix, self.s.instance);
        let mut pipe = redis::pipe();
        for id in &self.reg.dirty {
            if let Some(r) = self.reg.conns.get(id) {
                pipe.hset(&key, id.to_string(), r.json(*id)).ignore();
            }
        }
        for id in &self.reg.removed {
            pipe.hdel(&key, id.to_string()).ignore();
        }
        pipe.pexpire(&key, self.s.ttl_ms() as i64).ignore();
        pipe.query::<()>(c)?;
        self.reg.dirty.clear();
        self.reg.removed.clear();
        Ok(())
    }

    /// Reads the live instances' summaries into the shared view.
    fn refresh_view(&mut self, c: &mut redis::Connection) -> redis::RedisResult<()> {
        let p = &self.s.prefix;
        let alive: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(format!("{p}instances"))
            .arg(self.s.clock.epoch_ms().saturating_sub(self.s.ttl_ms()))
            .arg("+inf")
            .query(c)?;
        let summaries: Vec<Value> = if alive.is_empty() {
            Vec::new()
        } else {
            let keys: Vec<String> = alive.iter().map(|i| format!("{p}instance:{i}")).collect();
            let raw: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(c)?;
            raw.into_iter().flatten().filter_map(|s| serde_json::from_str(&s).ok()).collect()
        };
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
    fn remove_own(&mut self, c: &mut redis::Connection) {
        let (p, id) = (&self.s.prefix, &self.s.instance);
        let mut pipe = redis::pipe();
        pipe.del(format!("{p}connections:{id}")).ignore();
        pipe.del(format!("{p}instance:{id}")).ignore();
        pipe.zrem(format!("{p}instances"), id).ignore();
        for ip in &self.written_ips {
            pipe.hdel(format!("{p}ip:{ip}"), id).ignore();
        }
        match pipe.query::<()>(c) {
            Ok(()) => tracing::info!("redis: this instance's records removed"),
            Err(e) => tracing::warn!(error = %e, "redis: could not remove this instance's records (they expire)"),
        }
    }
}
