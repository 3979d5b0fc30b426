//! Connection and message limits (PROTOCOL.md §1, §7), counted in-process.
//!
//! Owns: the instance-wide connection count (`WS_MAX_CONNECTIONS`, 503), open
//! connections per client IP (429), and fixed-window message counters per
//! user (per connection before auth). Counts live in striped tables touched
//! once per connect/disconnect/login (a user's counter holds the user id, so
//! a table entry is one pointer); the per-message path is one atomic on a
//! counter shared only by one user's connections. Redis reconciliation
//! (cluster-wide counts) plugs in here later without touching the callers.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use hashbrown::HashTable;
use parking_lot::Mutex;

use crate::config::Config;
use crate::protocol::handshake::Refusal;

const STRIPES: usize = 16;
/// `Retry-After` of a 503 for capacity: long enough for the load balancer
/// to send the retry elsewhere or for connections here to close.
pub const CAPACITY_RETRY_AFTER_S: u32 = 5;
/// The message-limit window (PROTOCOL.md §7: fixed 60 s windows, the
/// same on every instance: window `n` is `[n, n + 1) × WINDOW_MS` since the
/// epoch on the server's clock).
pub const WINDOW_MS: u64 = 60_000;

/// aHash, keyed randomly per process: it resists hash flooding (though
/// not with SipHash's cryptographic margin) at a fraction of SipHash's
/// cost on short keys (IPs, user ids), three of which a connection hashes
/// at set-up.
type Hasher = ahash::RandomState;
type Stripes<K, V> = [Mutex<HashMap<K, V, Hasher>>; STRIPES];

/// Instance-wide limits; one per process, shared by every shard.
pub struct Limits {
    enabled: bool,
    max_per_ip: u32,
    max_messages: u32,
    max_total: usize,
    total: AtomicUsize,
    ips: Stripes<IpAddr, u32>,
    /// Each user's counter, found by the id it holds (a map keyed by a copy
    /// of the id took 24 bytes more per user, and a second allocation).
    users: [Mutex<HashTable<Arc<UserRate>>>; STRIPES],
    hasher: Hasher,
    /// Tells Redis an IP's new local count when a connection closes.
    remote_release: OnceLock<RemoteRelease>,
}

/// Called with an IP and this instance's new count of its connections.
pub type RemoteRelease = Box<dyn Fn(IpAddr, u32) + Send + Sync>;

/// What a client message may do under the message limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    Allowed,
    /// Refuse this message; the window ends in this many ms.
    Limited {
        retry_after_ms: u64,
    },
    /// Twice the limit in one window: close 4008.
    Close,
}

/// A slot held by one open WebSocket connection; releases it when dropped.
pub struct Admission {
    /// None once handed over to a [`ParkedAdmission`].
    limits: Option<Arc<Limits>>,
    ip: IpAddr,
    local: u32,
}

/// An admission held by a parked connection: its IP only (17 bytes, not
/// 32), the limits being the shard's. It does not release on drop: a
/// parked connection is always resumed ([`Admission::resume`]) to close.
pub struct ParkedAdmission {
    ip: IpAddr,
}

impl Admission {
    /// The client IP the slot is held for.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// This instance's connections from the IP, this one included, at admission.
    pub fn local_count(&self) -> u32 {
        self.local
    }

    /// Keeps the slot, without the limits' handle, for a parked connection.
    pub fn park(mut self) -> ParkedAdmission {
        self.limits = None;
        ParkedAdmission { ip: self.ip }
    }

    /// The slot a parked connection kept, with its limits again.
    pub fn resume(limits: &Arc<Limits>, parked: ParkedAdmission) -> Admission {
        Admission { limits: Some(limits.clone()), ip: parked.ip, local: 0 }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let Some(limits) = self.limits.take() else {
            return; // parked: the slot is still held
        };
        limits.total.fetch_sub(1, Ordering::Relaxed);
        let mut ips = limits.stripe(&limits.ips, &self.ip).lock();
        let left = match ips.get_mut(&self.ip) {
            Some(n) => {
                *n -= 1;
                *n
            }
            None => 0,
        };
        if left == 0 {
            ips.remove(&self.ip);
        }
        drop(ips);
        if let Some(release) = limits.remote_release.get() {
            release(self.ip, left);
        }
    }
}

impl Limits {
    pub fn new(cfg: &Config) -> Self {
        Self {
            enabled: cfg.rate_limit_enabled,
            max_per_ip: cfg.rate_limit_max_connections_per_ip.get(),
            max_messages: cfg.rate_limit_max_messages_per_minute.get(),
            max_total: cfg.ws_max_connections.get(),
            total: AtomicUsize::new(0),
            ips: Default::default(),
            // Room for every connection allowed (a stripe's even share),
            // reserved at start so a connection storm does not rehash user
            // ids as the tables grow. A bucket is 8 bytes of address space
            // until used and one control byte, written now.
            users: std::array::from_fn(|_| {
                let share = cfg.ws_max_connections.get().div_ceil(STRIPES);
                Mutex::new(HashTable::with_capacity(share))
            }),
            hasher: Default::default(),
            remote_release: OnceLock::new(),
        }
    }

    /// Installs the Redis hook (once, at start).
    pub fn set_remote_release(&self, f: RemoteRelease) {
        let _ = self.remote_release.set(f);
    }

    /// This instance's open connections per IP (for Redis heartbeats).
    pub fn ip_counts(&self) -> Vec<(IpAddr, u32)> {
        self.ips.iter().flat_map(|s| s.lock().iter().map(|(ip, n)| (*ip, *n)).collect::<Vec<_>>()).collect()
    }

    /// Every user with an open connection here, with their counter.
    pub fn user_counters(&self) -> Vec<Arc<UserRate>> {
        self.users.iter().flat_map(|s| s.lock().iter().cloned().collect::<Vec<_>>()).collect()
    }

    fn stripe<'a, K: Hash, V>(&self, stripes: &'a Stripes<K, V>, key: &K) -> &'a Mutex<HashMap<K, V, Hasher>> {
        &stripes[self.hasher.hash_one(key) as usize % STRIPES]
    }

    /// Takes a connection slot for `ip`, or refuses with 429 / 503.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admission, Refusal> {
        let mut ips = self.stripe(&self.ips, &ip).lock();
        let count = ips.entry(ip).or_insert(0);
        if self.enabled && *count >= self.max_per_ip {
            if *count == 0 {
                ips.remove(&ip);
            }
            return Err(Refusal::new(429, "too many connections from this IP"));
        }
        if self.total.fetch_add(1, Ordering::Relaxed) >= self.max_total {
            self.total.fetch_sub(1, Ordering::Relaxed);
            if *count == 0 {
                ips.remove(&ip);
            }
            return Err(Refusal::unavailable("server at connection capacity", CAPACITY_RETRY_AFTER_S));
        }
        *count += 1;
        Ok(Admission { limits: Some(self.clone()), ip, local: *count })
    }

    /// Open WebSocket connections on this instance.
    pub fn open_connections(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// The stripe and table hash of a user id. The stripe takes bits the
    /// table does not use (it indexes by the low bits, tags by the top 7).
    fn user_hash(&self, user: &str) -> (&Mutex<HashTable<Arc<UserRate>>>, u64) {
        let hash = self.hasher.hash_one(user);
        (&self.users[(hash >> 32) as usize % STRIPES], hash)
    }

    /// The counter shared by all of `user`'s connections on this instance.
    pub fn user_counter(&self, user: &Arc<str>) -> Arc<UserRate> {
        let (stripe, hash) = self.user_hash(user);
        let mut users = stripe.lock();
        if let Some(found) = users.find(hash, |e| *e.user == **user) {
            return found.clone();
        }
        let counter = Arc::new(UserRate { user: user.clone(), counter: RateCounter::default() });
        users.insert_unique(hash, counter.clone(), |e| self.hasher.hash_one(&*e.user));
        counter
    }

    /// Drops a connection's hold on its user's counter, forgetting the user
    /// when no connection of theirs is left.
    pub fn release_user(&self, counter: Arc<UserRate>) {
        let (stripe, hash) = self.user_hash(&counter.user);
        let mut users = stripe.lock();
        let ptr = Arc::as_ptr(&counter);
        drop(counter);
        if let Ok(entry) = users.find_entry(hash, |e| Arc::as_ptr(e) == ptr) {
            if Arc::strong_count(entry.get()) == 1 {
                entry.remove();
            }
        }
    }

    /// Counts one client message against `counter` and judges it.
    pub fn check_message(&self, counter: &RateCounter, now_ms: u64) -> RateDecision {
        if !self.enabled {
            return RateDecision::Allowed;
        }
        // Local count plus what other instances reported for this user's
        // window at the last Redis reconciliation (0 without Redis).
        let count = counter.hit(now_ms, 1).saturating_add(counter.others(now_ms / WINDOW_MS));
        self.judge(count, now_ms)
    }

    fn judge(&self, count: u32, now_ms: u64) -> RateDecision {
        if count <= self.max_messages {
            RateDecision::Allowed
        } else if count >= self.max_messages.saturating_mul(2) {
            RateDecision::Close
        } else {
            RateDecision::Limited { retry_after_ms: WINDOW_MS - now_ms % WINDOW_MS }
        }
    }
}

/// A user's message counter on this instance, with the user it counts.
#[derive(Debug)]
pub struct UserRate {
    user: Arc<str>,
    counter: RateCounter,
}

impl UserRate {
    pub fn user(&self) -> &Arc<str> {
        &self.user
    }
}

impl std::ops::Deref for UserRate {
    type Target = RateCounter;

    fn deref(&self) -> &RateCounter {
        &self.counter
    }
}

/// A fixed 60 s window message counter: window number in the high 32 bits,
/// count in the low 32, so one atomic read-modify-write does both.
#[derive(Debug, Default)]
pub struct RateCounter {
    state: AtomicU64,
    /// Other instances' count for a window (window << 32 | count).
    others: AtomicU64,
    /// How much of this instance's count was pushed to Redis (window << 32 | count).
    pushed: AtomicU64,
}

impl RateCounter {
    /// Adds `n` to the current window (resetting it if a new window began)
    /// and returns the window's count.
    pub fn hit(&self, now_ms: u64, n: u32) -> u32 {
        let window = (now_ms / WINDOW_MS) as u32;
        let mut out = 0;
        let _ = self.state.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
            let (w, c) = ((s >> 32) as u32, s as u32);
            out = if w == window { c.saturating_add(n) } else { n };
            Some(((window as u64) << 32) | out as u64)
        });
        out
    }

    /// This window's count (0 if the stored window is over).
    pub fn current(&self, now_ms: u64) -> u32 {
        unpack(self.state.load(Ordering::Relaxed), now_ms / WINDOW_MS)
    }

    /// Other instances' count for `window` (a minute number).
    pub fn others(&self, window: u64) -> u32 {
        unpack(self.others.load(Ordering::Relaxed), window)
    }

    pub fn set_others(&self, window: u64, n: u32) {
        self.others.store(pack(window, n), Ordering::Relaxed);
    }

    /// How much of `window`'s local count Redis already has.
    pub fn pushed(&self, window: u64) -> u32 {
        unpack(self.pushed.load(Ordering::Relaxed), window)
    }

    pub fn set_pushed(&self, window: u64, n: u32) {
        self.pushed.store(pack(window, n), Ordering::Relaxed);
    }
}

fn pack(window: u64, n: u32) -> u64 {
    ((window as u32 as u64) << 32) | n as u64
}

fn unpack(v: u64, window: u64) -> u32 {
    if (v >> 32) as u32 == window as u32 {
        v as u32
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(env: &[(&str, &str)]) -> Arc<Limits> {
        let env: HashMap<_, _> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Arc::new(Limits::new(&Config::from_sources(["x"], |k| env.get(k).cloned()).unwrap()))
    }

    #[test]
    fn per_ip_and_total_caps_release_on_drop() {
        let l = limits(&[("RATE_LIMIT_MAX_CONNECTIONS_PER_IP", "2"), ("WS_MAX_CONNECTIONS", "3")]);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = l.admit(a).unwrap();
        let _s2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).err().map(|r| r.status), Some(429));
        let _s3 = l.admit(b).unwrap();
        assert_eq!(l.admit(b).err().map(|r| r.status), Some(503));
        drop(s1);
        let _s4 = l.admit(a).unwrap();
        assert_eq!(l.open_connections(), 3);
    }

    #[test]
    fn message_window_limits_then_closes_then_resets() {
        let l = limits(&[("RATE_LIMIT_MAX_MESSAGES_PER_MINUTE", "3")]);
        let c = RateCounter::default();
        let t = 120_000;
        for _ in 0..3 {
            assert_eq!(l.check_message(&c, t), RateDecision::Allowed);
        }
        assert_eq!(l.check_message(&c, t + 1000), RateDecision::Limited { retry_after_ms: 59_000 });
        assert_eq!(l.check_message(&c, t + 1000), RateDecision::Limited { retry_after_ms: 59_000 });
        assert_eq!(l.check_message(&c, t + 1000), RateDecision::Close);
        assert_eq!(l.check_message(&c, t + 60_000), RateDecision::Allowed, "new window");
    }

    #[test]
    fn other_instances_counts_join_the_local_one() {
        let l = limits(&[("RATE_LIMIT_MAX_MESSAGES_PER_MINUTE", "5")]);
        let c = RateCounter::default();
        let t = 600_000;
        c.set_others(t / WINDOW_MS, 4);
        assert_eq!(l.check_message(&c, t), RateDecision::Allowed, "4 elsewhere + 1 here");
        assert!(matches!(l.check_message(&c, t), RateDecision::Limited { .. }), "6th in the cluster");
        c.set_pushed(t / WINDOW_MS, 2);
        assert_eq!(c.pushed(t / WINDOW_MS), 2);
        assert_eq!(c.others(t / WINDOW_MS + 1), 0, "a new window starts from zero");
    }

    #[test]
    fn disabled_limits_allow_everything_but_capacity() {
        let l = limits(&[
            ("RATE_LIMIT_ENABLED", "false"),
            ("RATE_LIMIT_MAX_CONNECTIONS_PER_IP", "1"),
            ("WS_MAX_CONNECTIONS", "2"),
        ]);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let (_a, _b) = (l.admit(ip).unwrap(), l.admit(ip).unwrap());
        assert_eq!(l.admit(ip).err().map(|r| r.status), Some(503));
        let c = RateCounter::default();
        assert!((0..1000).all(|_| l.check_message(&c, 0) == RateDecision::Allowed));
    }

    #[test]
    fn a_parked_admission_keeps_its_slot_until_resumed_and_dropped() {
        let l = Arc::new(limits(&[("RATE_LIMIT_MAX_CONNECTIONS_PER_IP", "1")]));
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let parked = l.admit(ip).unwrap().park();
        assert_eq!(l.open_connections(), 1, "parking releases nothing");
        assert_eq!(l.admit(ip).err().map(|r| r.status), Some(429), "the IP's slot is still taken");
        let resumed = Admission::resume(&l, parked);
        assert_eq!(l.open_connections(), 1);
        drop(resumed);
        assert_eq!(l.open_connections(), 0, "released once, on the resumed admission's drop");
        assert_eq!(l.ip_counts(), vec![]);
        let _again = l.admit(ip).unwrap();
    }

    #[test]
    fn user_counters_are_shared_and_forgotten() {
        let l = limits(&[]);
        let u: Arc<str> = "u1".into();
        let (a, b) = (l.user_counter(&u), l.user_counter(&u));
        let other = l.user_counter(&"u2".into());
        a.hit(0, 5);
        assert_eq!(b.current(0), 5);
        assert_eq!(other.current(0), 0, "another user counts apart");
        l.release_user(a);
        let c = l.user_counter(&u);
        assert_eq!(c.current(0), 5, "still held by b");
        l.release_user(c);
        l.release_user(b);
        assert_eq!(l.user_counters().len(), 1, "u1 is forgotten, u2 is not");
        assert_eq!(l.user_counter(&u).current(0), 0, "forgotten");
        l.release_user(other);
    }
}
