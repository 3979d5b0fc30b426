//! The connections of `resume` and what they share: each private
//! connection follows its user's stream (in both lifetimes), the storm
//! reconnects every user at once and resumes `orders` from its last
//! position, and the observers on `prices` split their latency into the
//! baseline and the storm by each update's scheduled send time.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::json;
use tokio::task::JoinHandle;

use super::check::{pos_text, Pos, ReplayRange, Seen, Streams};
use crate::ws::{field_u64, Sequence, Ws, SENT_NS, SEQ, TIMESTAMP};
use crate::{authenticated, now_ns, subscribe, user_of, Common, Recorder, Resumed, Setup, Subscribed};

/// A resume (connect, authenticate, `subscribed`) gives up after this long.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Closes by cause.
pub(super) type Closes = Arc<Mutex<BTreeMap<String, u64>>>;

/// What the connections share. The private connections run on the run's
/// thread (no locking); the observers on a thread of their own
/// ([`Observers`]), so what they fill is behind a lock.
pub(super) struct Shared {
    pub(super) streams: RefCell<Streams>,
    pub(super) prices: Arc<Mutex<Prices>>,
    pub(super) storm: RefCell<Storm>,
    /// Private connections the server closed (or lost) while the run went
    /// on, by cause (the drop is the tool's own).
    pub(super) private_closed: Closes,
    pub(super) observers_closed: Closes,
    /// False once the run is over: closes after that are expected.
    pub(super) running: Cell<bool>,
}

impl Shared {
    pub(super) fn new(users: usize) -> Shared {
        Shared {
            streams: RefCell::new(Streams::new(users)),
            prices: Arc::new(Mutex::new(Prices::default())),
            storm: RefCell::new(Storm::default()),
            private_closed: Closes::default(),
            observers_closed: Closes::default(),
            running: Cell::new(true),
        }
    }
}

/// The observers' tally. Latency goes by each update's scheduled send
/// time: before `baseline_from` it is warm-up (not recorded), then the
/// baseline until `storm_from`, then the storm until `storm_until`; the
/// storm's two parts are kept apart too, the drop and the time away until
/// `reconnect_from`, the reconnect and after it from then on. The server's
/// share of each (`served`): from the envelope's `timestamp`, when the
/// server took the update from Kafka (ms), to its receipt here; the rest
/// is the producer's, the broker's and the fetch's.
pub(super) struct Prices {
    pub(super) baseline: Recorder,
    pub(super) storm: Recorder,
    pub(super) storm_away: Histogram<u64>,
    pub(super) storm_reconnect: Histogram<u64>,
    /// The server's share: baseline, the drop and away, the reconnect and after.
    pub(super) served: [Histogram<u64>; 3],
    /// Distinct updates received, over all observers.
    pub(super) received: u64,
    pub(super) gaps: u64,
    pub(super) dups: u64,
    pub(super) baseline_from: u64,
    pub(super) storm_from: u64,
    pub(super) reconnect_from: u64,
    pub(super) storm_until: u64,
}

impl Default for Prices {
    fn default() -> Self {
        Prices {
            baseline: Recorder::new("baseline"),
            storm: Recorder::new("latency"),
            storm_away: crate::hdr::histogram(),
            storm_reconnect: crate::hdr::histogram(),
            served: std::array::from_fn(|_| crate::hdr::histogram()),
            received: 0,
            gaps: 0,
            dups: 0,
            baseline_from: u64::MAX,
            storm_from: u64::MAX,
            reconnect_from: u64::MAX,
            storm_until: u64::MAX,
        }
    }
}

impl Prices {
    /// Update `seq`, scheduled at `sent` and stamped by the server at
    /// `stamped_ms` (when the frame has it), received at `now` (ns).
    fn see(&mut self, order: &mut Sequence, seq: u64, sent: u64, stamped_ms: Option<u64>, now: u64) {
        let (skipped, repeat) = order.see(seq, true);
        self.gaps += skipped;
        if repeat {
            self.dups += 1;
            return;
        }
        self.received += 1;
        let window = if sent >= self.storm_until {
            None
        } else if sent >= self.storm_from {
            Some(&mut self.storm)
        } else if sent >= self.baseline_from {
            Some(&mut self.baseline)
        } else {
            None
        };
        let us = now.saturating_sub(sent) / 1000;
        if let Some(w) = window {
            w.record(us);
        }
        if (self.storm_from..self.storm_until).contains(&sent) {
            let part = if sent >= self.reconnect_from { &mut self.storm_reconnect } else { &mut self.storm_away };
            part.saturating_record(us.max(1));
        }
        let served = match sent {
            s if s >= self.storm_until || s < self.baseline_from => None,
            s if s >= self.reconnect_from => Some(2),
            s if s >= self.storm_from => Some(1),
            _ => Some(0),
        };
        if let (Some(i), Some(ms)) = (served, stamped_ms) {
            self.served[i].saturating_record((now / 1000).saturating_sub(ms.saturating_mul(1000)).max(1));
        }
    }
}

/// The storm's tally: every resume's outcome and timing, from the moment
/// the reconnect began.
pub(super) struct Storm {
    /// Reconnect start → `subscribed`.
    pub(super) resubscribe: Recorder,
    /// Reconnect start → the last missed update in hand (`subscribed`
    /// when none was missed).
    pub(super) recover: Recorder,
    pub(super) failures: BTreeMap<String, u64>,
    pub(super) recovered: u64,
    /// Resumes answered without `recovered: true`.
    pub(super) not_recovered: u64,
    /// Users that had no position to resume from (subscribed without `since`).
    pub(super) without_since: u64,
    /// The `missed` the recovered resumes announced, summed.
    pub(super) missed: u64,
    /// Replayed updates received.
    pub(super) replayed: u64,
    /// Resumes over: recovered, refused, failed or without `since`.
    pub(super) settled: usize,
    /// When the last resume so far was recovered.
    pub(super) last_recovered: Duration,
    pub(super) range: ReplayRange,
}

impl Default for Storm {
    fn default() -> Self {
        Storm {
            resubscribe: Recorder::new("resubscribe"),
            recover: Recorder::new("recover"),
            failures: BTreeMap::new(),
            recovered: 0,
            not_recovered: 0,
            without_since: 0,
            missed: 0,
            replayed: 0,
            settled: 0,
            last_recovered: Duration::ZERO,
            range: ReplayRange::default(),
        }
    }
}

impl Storm {
    pub(super) fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    fn recovered_at(&mut self, start: Instant) {
        let took = start.elapsed();
        self.recover.record(took.as_micros() as u64);
        self.last_recovered = self.last_recovered.max(took);
        self.recovered += 1;
        self.settled += 1;
    }

    /// A resume answered: what follows is `missed` replayed updates when
    /// it recovered (None: the reader has nothing to count).
    fn answered(&mut self, since: Option<Pos>, resumed: Option<Resumed>, start: Instant) -> Option<Replay> {
        self.resubscribe.record(start.elapsed().as_micros() as u64);
        match (since, resumed) {
            (None, _) => {
                self.without_since += 1;
                self.settled += 1;
                None
            }
            (Some(since), Some(Resumed { recovered: true, missed })) => {
                self.range.wanted_after(since);
                self.missed += missed;
                if missed == 0 {
                    self.recovered_at(start);
                    return None;
                }
                Some(Replay { left: missed, start })
            }
            (Some(_), _) => {
                self.not_recovered += 1;
                self.settled += 1;
                None
            }
        }
    }
}

/// A replay still coming to a resumed connection.
pub(super) struct Replay {
    left: u64,
    /// When the reconnect began.
    start: Instant,
}

/// Reads user `u`'s private connection until it ends: every update into
/// the user's stream; with `replay`, the first `left` updates are the
/// replay (their positions go to the replayed range, the last one
/// recovers the user).
async fn follow(u: usize, mut ws: Ws, early: Vec<Vec<u8>>, shared: Rc<Shared>, mut replay: Option<Replay>) {
    let me = format!("\"userId\":\"{}\"", user_of(u, 1)).into_bytes();
    for p in &early {
        shared.streams.borrow_mut().see(u, &me, p);
    }
    loop {
        let f = match ws.next_text_or_close().await {
            Ok(f) => f,
            Err(why) => {
                if shared.running.get() {
                    *shared.private_closed.lock().entry(why).or_insert(0) += 1;
                }
                return;
            }
        };
        let Seen::Update(pos) = shared.streams.borrow_mut().see(u, &me, ws.payload(&f)) else { continue };
        if let Some(r) = replay.as_mut() {
            let mut storm = shared.storm.borrow_mut();
            storm.replayed += 1;
            if let Some(pos) = pos {
                storm.range.replayed(pos);
            }
            r.left -= 1;
            if r.left == 0 {
                storm.recovered_at(r.start);
                replay = None;
            }
        }
    }
}

/// The reader of a private connection in its first lifetime.
pub(super) fn follow_first(u: usize, s: Setup, shared: Rc<Shared>) -> JoinHandle<()> {
    shared.streams.borrow_mut().follow(u);
    tokio::task::spawn_local(follow(u, s.ws, s.early, shared, None))
}

/// The reader of an observer on `prices`: every update in order, once.
/// The observers on `prices`, on a thread and runtime of their own. On the
/// run's one thread they waited behind the drop's 5,000 closes and the
/// storm's 5,000 set-ups and replays, and that wait, the tool's, was
/// charged to the server as latency. Both threads share the tool's core, so
/// the kernel's scheduler now shares it out: an observer woken by a frame
/// runs within its slice, not after every ready task of the storm.
pub(super) struct Observers {
    pub(super) count: usize,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Observers {
    /// Moves the observers' connections to a new thread, where each reads
    /// its prices into `prices` until [`Observers::stop`].
    pub(super) fn start(setups: Vec<Setup>, prices: Arc<Mutex<Prices>>, closed: Closes) -> anyhow::Result<Observers> {
        let detached = setups.into_iter().map(|s| s.ws.detach()).collect::<std::io::Result<Vec<_>>>()?;
        let count = detached.len();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("observers".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    *closed.lock().entry(format!("no runtime for the observers: {e}")).or_insert(0) += count as u64;
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let running = Rc::new(Cell::new(true));
                let mut tasks = Vec::with_capacity(count);
                for d in detached {
                    match d.attach() {
                        Ok(ws) => tasks.push(observe(ws, prices.clone(), closed.clone(), running.clone())),
                        Err(e) => {
                            *closed.lock().entry(format!("moving to the observers' thread: {e}")).or_insert(0) += 1
                        }
                    }
                }
                let _ = stopped.await;
                running.set(false);
                for t in tasks {
                    t.abort();
                }
            });
        })?;
        Ok(Observers { count, stop: Some(stop), thread: Some(thread) })
    }

    /// Ends every observer (closes from now on are the tool's own) and
    /// waits for the thread.
    pub(super) fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Observers {
    fn drop(&mut self) {
        self.stop();
    }
}

fn observe(mut ws: Ws, prices: Arc<Mutex<Prices>>, closed: Closes, running: Rc<Cell<bool>>) -> JoinHandle<()> {
    tokio::task::spawn_local(async move {
        let mut order = Sequence::default();
        loop {
            let f = match ws.next_text_or_close().await {
                Ok(f) => f,
                Err(why) => {
                    if running.get() {
                        *closed.lock().entry(why).or_insert(0) += 1;
                    }
                    return;
                }
            };
            let p = ws.payload(&f);
            if let (Some(seq), Some(sent)) = (field_u64(p, &SEQ), field_u64(p, &SENT_NS)) {
                prices.lock().see(&mut order, seq, sent, field_u64(p, &TIMESTAMP), now_ns());
            }
        }
    })
}

/// The storm: every user in `positions` reconnects now and resumes (see
/// [`resume_one`]); each connection then follows its user. Times count
/// from `start`, the moment every user was due. Returns the connections'
/// tasks.
pub(super) fn resume_all(
    common: &Common,
    server: SocketAddr,
    positions: Vec<(usize, Option<Pos>)>,
    shared: &Rc<Shared>,
    start: Instant,
) -> Vec<JoinHandle<()>> {
    let slots = Rc::new(tokio::sync::Semaphore::new(common.concurrency));
    let common = Rc::new(common.clone());
    positions
        .into_iter()
        .map(|(u, since)| {
            let (common, slots, shared) = (common.clone(), slots.clone(), shared.clone());
            tokio::task::spawn_local(async move {
                let r = tokio::time::timeout(SETUP_TIMEOUT, resume_one(&common, server, u, since, &slots, start))
                    .await
                    .unwrap_or_else(|_| {
                        Err(anyhow::anyhow!("resume set-up timed out after {} s", SETUP_TIMEOUT.as_secs()))
                    });
                match r {
                    Ok((ws, s)) => {
                        let replay = shared.storm.borrow_mut().answered(since, s.resumed, start);
                        follow(u, ws, s.early, shared, replay).await;
                    }
                    Err(e) => {
                        let mut storm = shared.storm.borrow_mut();
                        *storm.failures.entry(format!("{e:#}")).or_insert(0) += 1;
                        storm.settled += 1;
                    }
                }
            })
        })
        .collect()
}

/// User `u` reconnects (connect and authenticate with one of the
/// `--concurrency` set-up slots) and subscribes `orders` with `since` its
/// position (without, when it has none). The subscribe holds no slot: its
/// answer waits for the replay, and slots held meanwhile would let only
/// `--concurrency` resumes reach the server at a time.
async fn resume_one(
    common: &Common,
    server: SocketAddr,
    u: usize,
    since: Option<Pos>,
    slots: &tokio::sync::Semaphore,
    start: Instant,
) -> anyhow::Result<(Ws, Subscribed)> {
    let slot = slots.acquire().await?;
    let (mut ws, _, _) = authenticated(common, server, u, &user_of(u, 1), start).await?;
    drop(slot);
    let mut data = json!({"channel": "orders"});
    if let Some(since) = since {
        data["since"] = json!(pos_text(since));
    }
    let s = subscribe(&mut ws, &[data]).await?;
    Ok((ws, s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn price_latency_goes_to_the_window_of_its_scheduled_send_time() {
        let mut p =
            Prices { baseline_from: 100, storm_from: 200, reconnect_from: 280, storm_until: 300, ..Prices::default() };
        let mut order = Sequence::default();
        for (seq, sent) in [(0, 50), (1, 150), (2, 250), (3, 290), (4, 350)] {
            // Stamped by the server at 0 ms, received 5 µs after the send time.
            p.see(&mut order, seq, sent, Some(0), sent + 5_000);
        }
        p.see(&mut order, 4, 350, Some(0), 360_000);
        assert_eq!((p.baseline.total.len(), p.storm.total.len(), p.received, p.dups, p.gaps), (1, 2, 5, 1, 0));
        assert_eq!(p.storm.total.max(), 5);
        assert_eq!((p.storm_away.len(), p.storm_reconnect.len()), (1, 1), "the storm's two parts");
        let served: Vec<u64> = p.served.iter().map(|h| h.len()).collect();
        assert_eq!(served, [1, 1, 1], "the server's share, by the same windows");
        assert_eq!(p.served[0].max(), 5, "from the server's stamp to receipt");
        p.see(&mut order, 5, 150, None, 160_000);
        assert_eq!(p.served[0].len(), 1, "no stamp, no share");
        assert_eq!(p.baseline.total.len(), 2);
    }

    #[test]
    fn a_resume_settles_once_recovered_refused_or_without_since() {
        let mut s = Storm::default();
        let start = Instant::now();
        assert!(s.answered(None, None, start).is_none());
        assert!(s.answered(Some((0, 9)), Some(Resumed { recovered: false, missed: 0 }), start).is_none());
        assert!(s.answered(Some((0, 9)), None, start).is_none(), "no recovered field: not recovered");
        assert!(s.answered(Some((1, 4)), Some(Resumed { recovered: true, missed: 0 }), start).is_none());
        let r = s.answered(Some((1, 2)), Some(Resumed { recovered: true, missed: 3 }), start).unwrap();
        assert_eq!(r.left, 3);
        assert_eq!((s.without_since, s.not_recovered, s.recovered, s.missed, s.settled), (1, 2, 1, 3, 4));
        assert_eq!(s.resubscribe.total.len(), 5);
    }
}
