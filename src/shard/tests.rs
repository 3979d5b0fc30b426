//! The shard's operations over real socket pairs: routing, the sweep, the
//! outbox contract under random interleavings, latency samples.

use super::outbox::Lifecycle;
use super::stamps::MAX_STAMPS;
use super::*;
use crate::protocol::frame::server_frame_len;

fn shard(max: usize) -> Shard {
    Shard::new(0, max, Arc::new(ShardStats::default()))
}

fn price(data: &str) -> Arc<Update> {
    Arc::new(Update::encode(Route::Prices, "u1", 0, data.as_bytes()))
}

/// Everything queued for a connection: its outbox, then its unsent part
/// of the price log.
fn outbox(s: &mut Shard, key: usize) -> Vec<u8> {
    let (queued, log_part) = s.conns[key].out.unsent(&s.log);
    [queued, log_part].concat()
}

fn queued(s: &Shard, key: usize) -> &[u8] {
    s.conns[key].out.queued()
}

fn is_slow(s: &Shard, key: usize) -> bool {
    s.conns[key].out.lifecycle() == Lifecycle::Slow
}

#[test]
fn prices_reach_subscribers_only() {
    let mut s = shard(1 << 20);
    let (a, b, c) = (s.insert(None, 0), s.insert(None, 0), s.insert(None, 0));
    s.subscribe(a, Channel::Prices);
    s.subscribe(c, Channel::Prices);
    let u = price("{}");
    assert_eq!(s.fanout(&u), 2);
    assert_eq!(outbox(&mut s, a), &*u.frame);
    assert!(outbox(&mut s, b).is_empty());
    s.unsubscribe(a, Channel::Prices);
    assert_eq!(s.fanout(&u), 1);
    assert_eq!(outbox(&mut s, a), &*u.frame, "what was queued before the unsubscribe stays, nothing after");
    assert_eq!(outbox(&mut s, c).len(), 2 * u.frame.len());
}

#[test]
fn private_updates_reach_only_their_user_and_channel() {
    let mut s = shard(1 << 20);
    let (a, b, a2) = (s.insert(None, 0), s.insert(None, 0), s.insert(None, 0));
    s.set_user(a, "alice".into());
    s.set_user(a2, "alice".into());
    s.set_user(b, "bob".into());
    for k in [a, b] {
        s.subscribe(k, Channel::Orders);
    }
    s.subscribe(a2, Channel::Trades);
    let u = Arc::new(Update::encode(Route::User { channel: Channel::Orders, user: "alice".into() }, "u1", 0, b"{}"));
    assert_eq!(s.fanout(&u), 1);
    assert!(!queued(&s, a).is_empty());
    assert!(queued(&s, b).is_empty());
    assert!(queued(&s, a2).is_empty());
}

#[test]
fn slow_consumer_is_dropped_and_others_still_served() {
    let u = price(&format!("{{\"pad\":\"{}\"}}", "x".repeat(100)));
    let mut s = shard(u.frame.len() * 3);
    // No socket (-1): the sweep hands both to their drivers.
    let (slow, fast) = (s.insert(None, 0), s.insert(None, 0));
    s.subscribe(slow, Channel::Prices);
    s.subscribe(fast, Channel::Prices);
    s.conns[slow].out.set_in_driver(u.frame.len() as u32);
    for _ in 0..3 {
        s.fanout(&u);
    }
    s.begin_sweep();
    assert!(s.flush_step(64));
    assert!(is_slow(&s, slow), "one frame in flight plus three queued is over the limit");
    assert!(queued(&s, slow).is_empty(), "its backlog is dropped");
    assert_eq!(queued(&s, fast).len(), 3 * u.frame.len(), "the other one keeps all three");
    assert_eq!(s.fanout(&u), 1, "and the slow one gets nothing more");
    assert!(s.log.len() == u.frame.len(), "the log keeps only what a sweep has not passed");
}

#[test]
fn a_slow_consumer_keeps_the_frame_a_direct_write_stopped_inside() {
    let u = price(&format!("{{\"pad\":\"{}\"}}", "x".repeat(100)));
    let mut s = shard(u.frame.len() * 3);
    let k = s.insert(None, 0);
    // A direct write stopped inside the first frame.
    s.conns[k].out.set_sent([&u.frame[..], &u.frame[..]].concat(), 10);
    assert!(!s.queue(k, &[&u.frame[..], &u.frame[..]].concat()), "over the limit");
    assert!(is_slow(&s, k));
    assert_eq!(queued(&s, k), &*u.frame, "the first frame stays whole for the driver to finish");
    assert_eq!(s.conns[k].out.sent(), 10);
}

/// A user's connections, added and removed in every position of their
/// list, are exactly the ones a private update reaches.
#[test]
fn the_user_index_follows_connections_in_and_out() {
    let mut s = shard(1 << 20);
    let orders = |user: &str| {
        Arc::new(Update::encode(Route::User { channel: Channel::Orders, user: user.into() }, "u1", 0, b"{}"))
    };
    let reached = |s: &mut Shard, user: &str, keys: &[usize]| {
        let keys: Vec<usize> = keys.iter().copied().filter(|&k| s.conns.contains(k)).collect();
        for &k in &keys {
            let mut drained = InFlight::default();
            s.take_for_driver(k, &mut drained);
            s.driver_holds(k, 0);
        }
        let n = s.fanout(&orders(user));
        let mut got: Vec<usize> = keys.iter().copied().filter(|&k| !queued(s, k).is_empty()).collect();
        got.sort();
        (n, got)
    };
    let keys: Vec<usize> = (0..6).map(|_| s.insert(None, 0)).collect();
    // alice: 0, 2, 3, 5; bob: 1; carol: 4.
    for (i, &k) in keys.iter().enumerate() {
        let user = match i {
            1 => "bob",
            4 => "carol",
            _ => "alice",
        };
        s.set_user(k, user.into());
        s.subscribe(k, Channel::Orders);
    }
    assert_eq!(reached(&mut s, "alice", &keys), (4, vec![keys[0], keys[2], keys[3], keys[5]]));
    assert_eq!(reached(&mut s, "bob", &keys), (1, vec![keys[1]]));
    // The list is newest first: 5 is its head, 3 in the middle, 0 its tail.
    s.remove(keys[3]);
    assert_eq!(reached(&mut s, "alice", &keys), (3, vec![keys[0], keys[2], keys[5]]));
    s.remove(keys[5]);
    assert_eq!(reached(&mut s, "alice", &keys), (2, vec![keys[0], keys[2]]));
    s.remove(keys[0]);
    assert_eq!(reached(&mut s, "alice", &keys), (1, vec![keys[2]]));
    s.remove(keys[2]);
    assert_eq!(reached(&mut s, "alice", &keys), (0, vec![]));
    assert_eq!(reached(&mut s, "carol", &keys), (1, vec![keys[4]]), "other users keep their routes");
    assert_eq!(s.registry.users(), 2, "alice left the index with her last connection");
    // A new connection takes a freed slot: it must not inherit a route.
    let again = s.insert(None, 0);
    s.subscribe(again, Channel::Orders);
    assert_eq!(reached(&mut s, "alice", &[again]), (0, vec![]));
    s.set_user(again, "alice".into());
    assert_eq!(reached(&mut s, "alice", &[again]), (1, vec![again]));
    s.remove(keys[1]);
    s.remove(keys[4]);
    s.remove(again);
    assert_eq!(s.registry.users(), 0);
}

/// A sweep's write that the socket cuts short, of log bytes that are
/// over the limit: the frame it stopped in stays whole in the outbox
/// for the driver (wire bytes + the queue after what was sent = whole frames).
#[test]
fn a_short_direct_write_past_the_limit_keeps_its_frame() {
    use std::os::unix::net::UnixStream;
    for uring in [true, false] {
        let u = price(&format!("{{\"pad\":\"{}\"}}", "x".repeat(100)));
        let mut s = shard(u.frame.len() * 4);
        s.use_io_uring(uring);
        let (srv, mut cli) = UnixStream::pair().unwrap();
        socket2::SockRef::from(&srv).set_send_buffer_size(4096).unwrap();
        let k = s.insert(Some(DirectSocket::owned(srv.into())), 0);
        s.subscribe(k, Channel::Prices);
        for _ in 0..400 {
            s.fanout(&u);
        }
        s.begin_sweep();
        assert!(s.flush_step(64));
        assert!(is_slow(&s, k), "past the limit (io_uring {uring})");
        let sent = s.conns[k].out.sent() as usize;
        assert!(sent > 0, "the write was short");
        let wire = received(&mut cli);
        assert_eq!(wire.len(), sent, "what the socket took is on the wire");
        let mut stream = wire.clone();
        stream.extend_from_slice(&queued(&s, k)[sent..]);
        let mut pos = 0;
        while pos < stream.len() {
            let len = server_frame_len(&stream[pos..]).expect("whole frames");
            assert_eq!(&stream[pos..pos + len], &*u.frame);
            pos += len;
        }
        assert_eq!(pos, stream.len(), "no frame cut (io_uring {uring})");
        assert!(stream.len() < 400 * u.frame.len(), "the backlog behind it was dropped");
    }
}

/// Reads what a socket has received so far (non-blocking).
fn received(sock: &mut std::os::unix::net::UnixStream) -> Vec<u8> {
    use std::io::Read;
    sock.set_nonblocking(true).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

#[test]
fn a_sweep_carries_updates_that_arrive_before_it_reaches_a_socket() {
    use std::os::unix::net::UnixStream;
    let mut s = shard(1 << 20);
    let (a_srv, mut a_cli) = UnixStream::pair().unwrap();
    let (b_srv, mut b_cli) = UnixStream::pair().unwrap();
    let a = s.insert(Some(DirectSocket::owned(a_srv.into())), 0);
    let b = s.insert(Some(DirectSocket::owned(b_srv.into())), 0);
    s.subscribe(a, Channel::Prices);
    s.subscribe(b, Channel::Prices);
    let (u1, u2) = (price("{\"n\":1}"), price("{\"n\":2}"));
    s.fanout(&u1);
    s.begin_sweep();
    assert!(!s.flush_step(1), "one socket written, one to go");
    s.fanout(&u2);
    assert!(s.flush_step(64), "the sweep is done");
    let both = [&u1.frame[..], &u2.frame[..]].concat();
    assert_eq!(received(&mut b_cli), both, "the socket not yet reached sent both in this sweep");
    assert_eq!(received(&mut a_cli), &*u1.frame, "the socket already passed got the first only");
    assert!(s.has_dirty(), "and is listed for the next sweep");
    s.begin_sweep();
    assert!(s.flush_step(64));
    assert_eq!(received(&mut a_cli), &*u2.frame);
    assert!(received(&mut b_cli).is_empty(), "nothing is sent twice");
    assert!(!s.has_dirty());
}

/// Splits a byte stream of whole server frames into their payloads.
fn payloads(mut bytes: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let len = server_frame_len(bytes).expect("whole frames only");
        let header = match bytes[1] & 0x7F {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        out.push(String::from_utf8(bytes[header..len].to_vec()).unwrap());
        bytes = &bytes[len..];
    }
    out
}

/// Random interleavings of subscribe, unsubscribe, price and private
/// updates, and sweeps written in random steps: every connection gets
/// exactly the updates published while it was subscribed, each channel
/// in order, nothing twice, nothing lost; with the sweeps' direct writes
/// batched through io_uring and as one system call each.
#[test]
fn random_interleavings_deliver_each_channel_exactly_once_in_order() {
    use rand::{Rng, SeedableRng};
    use std::os::unix::net::UnixStream;
    for (seed, uring) in (0..20u64).flat_map(|seed| [(seed, true), (seed, false)]) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut s = shard(1 << 24);
        assert_eq!(s.use_io_uring(uring), uring, "io_uring is available (glommio needs it too)");
        let mut conns = Vec::new(); // (key, client side, user, got, expected prices, expected orders)
        for i in 0..6 {
            let (srv, cli) = UnixStream::pair().unwrap();
            let key = s.insert(Some(DirectSocket::owned(srv.into())), 0);
            let user: Arc<str> = format!("user{}", i % 3).into();
            s.set_user(key, user.clone());
            s.subscribe(key, Channel::Orders);
            conns.push((key, cli, user, Vec::<u8>::new(), Vec::<String>::new(), Vec::<String>::new()));
        }
        let mut seq = 0;
        for _ in 0..400 {
            match rng.random_range(0..10) {
                0 => {
                    let c = &conns[rng.random_range(0..conns.len())];
                    s.subscribe(c.0, Channel::Prices);
                }
                1 => {
                    let c = &conns[rng.random_range(0..conns.len())];
                    s.unsubscribe(c.0, Channel::Prices);
                }
                2..=5 => {
                    seq += 1;
                    let data = format!("p{seq}");
                    for c in conns.iter_mut() {
                        if s.conns[c.0].subs & Channel::Prices.bit() != 0 {
                            c.4.push(data.clone());
                        }
                    }
                    s.fanout(&price(&format!("\"{data}\"")));
                }
                6 => {
                    seq += 1;
                    let user: Arc<str> = format!("user{}", rng.random_range(0..3)).into();
                    let data = format!("o{seq}");
                    for c in conns.iter_mut().filter(|c| c.2 == user) {
                        c.5.push(data.clone());
                    }
                    let route = Route::User { channel: Channel::Orders, user: user.to_string().into() };
                    s.fanout(&Arc::new(Update::encode(route, "u1", 0, format!("\"{data}\"").as_bytes())));
                }
                _ => {
                    if !s.sweeping() {
                        s.begin_sweep();
                    }
                    s.flush_step(rng.random_range(1..8));
                }
            }
            for c in conns.iter_mut() {
                let got = received(&mut c.1);
                c.3.extend_from_slice(&got);
            }
        }
        while s.sweeping() || s.has_dirty() {
            if !s.sweeping() {
                s.begin_sweep();
            }
            s.flush_step(3);
        }
        for c in conns.iter_mut() {
            let got = received(&mut c.1);
            c.3.extend_from_slice(&got);
            assert!(queued(&s, c.0).is_empty(), "seed {seed} (io_uring {uring}): everything was written directly");
            let frames = payloads(&c.3);
            let data = |prefix: &str| -> Vec<String> {
                frames
                    .iter()
                    .filter_map(|f| {
                        let v: serde_json::Value = serde_json::from_str(f).unwrap();
                        let d = v["data"].as_str().unwrap().to_string();
                        d.starts_with(prefix).then_some(d)
                    })
                    .collect()
            };
            assert_eq!(data("p"), c.4, "seed {seed} (io_uring {uring}): prices for connection {}", c.0);
            assert_eq!(data("o"), c.5, "seed {seed} (io_uring {uring}): orders for connection {}", c.0);
        }
        assert!(s.log.is_empty(), "seed {seed} (io_uring {uring}): the log is empty once every sweep is done");
    }
}

fn e2e_samples(s: &Shard) -> u64 {
    s.stats.e2e_latency_us.lock().len()
}

/// An update is sampled for the Kafka-to-socket latency only when it
/// reaches a socket, at that write; nothing is kept for updates that
/// no connection on the shard takes, however many arrive.
#[test]
fn latency_is_sampled_at_the_first_write_of_a_delivered_update() {
    use std::os::unix::net::UnixStream;
    let stamped = |mut u: Update| {
        u.kafka_ts_ms = Clock::system().epoch_ms() as i64 - 5;
        Arc::new(u)
    };
    let price = |data: &str| Update::encode(Route::Prices, "u1", 0, data.as_bytes());
    let mut s = shard(1 << 20);
    for _ in 0..10_000 {
        s.fanout(&stamped(price("{}")));
        let orders = Route::User { channel: Channel::Orders, user: "nobody".into() };
        s.fanout(&stamped(Update::encode(orders, "u1", 0, b"{}")));
    }
    assert!(s.stamps.log.is_empty() && s.stamps.private.is_empty(), "no subscriber: nothing kept");
    assert!(!s.has_dirty(), "and nothing to write");

    let (srv, mut cli) = UnixStream::pair().unwrap();
    let k = s.insert(Some(DirectSocket::owned(srv.into())), 0);
    s.set_user(k, "alice".into());
    s.subscribe(k, Channel::Prices);
    s.subscribe(k, Channel::Orders);
    s.fanout(&stamped(price("{}")));
    let orders = Route::User { channel: Channel::Orders, user: "alice".into() };
    s.fanout(&stamped(Update::encode(orders, "u2", 0, b"{}")));
    assert_eq!(e2e_samples(&s), 0, "queued, not yet written");
    s.begin_sweep();
    assert!(s.flush_step(64));
    assert!(!received(&mut cli).is_empty());
    assert_eq!(e2e_samples(&s), 2, "one sample per delivered update, at its write");
    let min = s.stats.e2e_latency_us.lock().min();
    assert!(min >= 5_000, "measured from the Kafka timestamp: {min} µs");
    assert!(!s.conns[k].marks.get(Marks::STAMPED));
}

#[test]
fn latency_samples_are_bounded_and_counted() {
    let mut s = shard(1 << 30);
    let k = s.insert(None, 0);
    s.subscribe(k, Channel::Prices);
    for _ in 0..MAX_STAMPS + 10 {
        let mut u = Update::encode(Route::Prices, "u1", 0, b"{}");
        u.kafka_ts_ms = 1;
        s.fanout(&Arc::new(u));
    }
    assert_eq!(s.stamps.log.len(), MAX_STAMPS);
    assert_eq!(s.stats.latency_samples_skipped.get(), 10);
}

/// The slot owns its share of the socket: the descriptor stays open
/// while the slot holds it, whoever else let go, and closes with it.
#[test]
fn a_slot_keeps_its_socket_open_until_it_is_removed() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let mut s = shard(1 << 20);
    let (srv, mut cli) = UnixStream::pair().unwrap();
    let k = s.insert(Some(DirectSocket::owned(srv.into())), 0);
    s.subscribe(k, Channel::Prices);
    let u = price("{}");
    s.fanout(&u);
    s.begin_sweep();
    assert!(s.flush_step(64));
    assert_eq!(received(&mut cli), &*u.frame, "written through the slot's descriptor");
    s.remove(k);
    cli.set_nonblocking(false).unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(cli.read(&mut byte).unwrap(), 0, "removing the slot closed the socket");
}

#[test]
fn removal_keeps_the_price_list_consistent() {
    let mut s = shard(1 << 20);
    let keys: Vec<_> = (0..5).map(|_| s.insert(None, 0)).collect();
    for &k in &keys {
        s.subscribe(k, Channel::Prices);
    }
    s.remove(keys[1]);
    s.remove(keys[4]);
    let u = price("{}");
    assert_eq!(s.fanout(&u), 3);
    for k in [keys[0], keys[2], keys[3]] {
        assert_eq!(outbox(&mut s, k), &*u.frame);
    }
}

mod size {
    /// Every open connection has a slot, reserved up front for
    /// `WS_MAX_CONNECTIONS`: a field that makes it grow should be a decision.
    #[test]
    fn a_slot_stays_at_104_bytes() {
        assert_eq!(std::mem::size_of::<super::Slot>(), 104);
    }
}

fn market_update(chain: u64, token: &str, data: &str) -> Arc<Update> {
    let route = Route::Market(crate::protocol::channel::Market { chain, token: token.into() });
    Arc::new(Update::encode(route, "u1", 0, data.as_bytes()))
}

fn name(text: &str) -> ChannelName {
    ChannelName::parse(text).unwrap()
}

/// Market and chain channels: each connection gets exactly the updates of
/// its channels, once however many match, and `prices` subscribers get
/// them through the log, not a second time.
#[test]
fn market_and_chain_routing_delivers_each_update_once() {
    let mut s = shard(1 << 20);
    let (eth, chain, both, all, none) =
        (s.insert(None, 0), s.insert(None, 0), s.insert(None, 0), s.insert(None, 0), s.insert(None, 0));
    s.subscribe_to(eth, name("prices:1:ETH"));
    s.subscribe_to(chain, name("prices:1"));
    s.subscribe_to(both, name("prices:1"));
    s.subscribe_to(both, name("prices:1:ETH"));
    s.subscribe_to(all, name("prices"));
    s.subscribe_to(all, name("prices:1:ETH"));
    s.subscribe_to(none, name("prices:2:ETH"));
    let u = market_update(1, "ETH", "1");
    assert_eq!(s.fanout(&u), 4, "eth, chain, both once, all through the log");
    for k in [eth, chain, both, all] {
        assert_eq!(outbox(&mut s, k), u.frame.to_vec(), "connection {k}");
    }
    assert!(outbox(&mut s, none).is_empty());
    // Another token on chain 1: chain subscribers only (and `prices`).
    let btc = market_update(1, "BTC", "2");
    assert_eq!(s.fanout(&btc), 3);
    assert_eq!(outbox(&mut s, eth), u.frame.to_vec());
    assert_eq!(outbox(&mut s, both), [&u.frame[..], &btc.frame[..]].concat());
    // Unsubscribing one of two overlapping channels leaves the other.
    s.unsubscribe_from(both, &name("prices:1"));
    let u2 = market_update(1, "ETH", "3");
    s.fanout(&u2);
    assert_eq!(outbox(&mut s, both), [&u.frame[..], &btc.frame[..], &u2.frame[..]].concat());
    assert_eq!(s.topics_held(both), 1);
    assert!(s.holds(both, &name("prices:1:ETH")) && !s.holds(both, &name("prices:1")));
    // A removed connection leaves every list; the others keep theirs.
    s.remove(eth);
    assert_eq!(s.fanout(&market_update(1, "ETH", "4")), 3);
    assert_eq!(s.stats.market_subscriptions.get(), 4, "chain, both, all, none: one each");
}

/// The last update of each market is its snapshot; chain and all-market
/// snapshots list markets newest first, bounded.
#[test]
fn snapshots_are_each_markets_newest_update() {
    let mut s = shard(1 << 20);
    let m = |c: &str| name(c);
    assert!(s.snapshot(&m("prices:1:ETH"), None, 10).is_empty(), "never ticked: no snapshot");
    let (a, b, c) = (market_update(1, "ETH", "1"), market_update(2, "ETH", "2"), market_update(1, "BTC", "3"));
    for u in [&a, &b, &c] {
        s.fanout(u);
    }
    let newer = market_update(1, "ETH", "4");
    s.fanout(&newer);
    let frames = |v: Vec<Arc<Update>>| v.iter().map(|u| u.frame.to_vec()).collect::<Vec<_>>();
    assert_eq!(frames(s.snapshot(&m("prices:1:ETH"), None, 10)), [newer.frame.to_vec()]);
    assert!(s.snapshot(&m("prices:1:ETH"), Some(false), 10).is_empty(), "turned off");
    assert!(s.snapshot(&m("prices:1"), None, 10).is_empty(), "opt-in for chains");
    assert_eq!(frames(s.snapshot(&m("prices:1"), Some(true), 10)), [newer.frame.to_vec(), c.frame.to_vec()]);
    assert_eq!(
        frames(s.snapshot(&m("prices"), Some(true), 10)),
        [newer.frame.to_vec(), c.frame.to_vec(), b.frame.to_vec()]
    );
    assert_eq!(s.snapshot(&m("prices"), Some(true), 2).len(), 2, "bounded by WS_SNAPSHOT_MAX_MARKETS");
    assert!(s.snapshot(&m("orders"), Some(true), 10).is_empty());
}

/// At most `WS_MAX_MARKETS` markets keep a value: the least recently
/// updated loses it, counted; subscribers of an evicted market stay.
#[test]
fn the_last_value_table_is_bounded_by_least_recent_update() {
    let mut s = shard(1 << 20);
    s.set_max_markets(3);
    let k = s.insert(None, 0);
    s.subscribe_to(k, name("prices:1:T0"));
    for i in 0..3 {
        s.fanout(&market_update(1, &format!("T{i}"), "1"));
    }
    s.fanout(&market_update(1, "T0", "2")); // T0 is now the newest
    s.fanout(&market_update(1, "T3", "3")); // evicts T1, the least recent
    assert_eq!(s.stats.markets_evicted.get(), 1);
    assert_eq!(s.stats.markets_known.get(), 3);
    assert!(s.snapshot(&name("prices:1:T1"), None, 10).is_empty());
    for t in ["T0", "T2", "T3"] {
        assert_eq!(s.snapshot(&name(&format!("prices:1:{t}")), None, 10).len(), 1, "{t}");
    }
    for i in 4..1000 {
        s.fanout(&market_update(1, &format!("T{i}"), "1"));
    }
    assert_eq!(s.stats.markets_known.get(), 3);
    assert_eq!(s.stats.markets_evicted.get(), 997);
    // The evicted market's subscriber still gets its updates.
    let t0 = market_update(1, "T0", "9");
    let before = outbox(&mut s, k).len();
    s.fanout(&t0);
    assert_eq!(outbox(&mut s, k).len(), before + t0.frame.len());
}

/// A connection that went slow and is removed leaves no topic list
/// holding its key: the next connection given the same key receives
/// nothing it did not subscribe to.
#[test]
fn a_removed_slow_connection_leaves_no_market_subscription_behind() {
    let mut s = shard(600);
    let k = s.insert(None, 0);
    s.subscribe_to(k, name("prices:1"));
    // Each update its own market: nothing to conflate, so it goes slow.
    for i in 0..10 {
        s.fanout(&market_update(1, &format!("T{i}"), &format!("{{\"pad\":\"{}\"}}", "x".repeat(100))));
    }
    assert!(is_slow(&s, k));
    s.remove(k);
    let again = s.insert(None, 0);
    assert_eq!(again, k, "the slab hands the key out again");
    assert_eq!(s.fanout(&market_update(1, "T0", "{}")), 0);
    assert!(outbox(&mut s, again).is_empty());
    assert_eq!(s.stats.market_subscriptions.get(), 0);
}

/// A waker that counts its wake-ups (the shard's tests of who wakes whom).
#[derive(Default)]
pub(super) struct Wakes(std::sync::atomic::AtomicUsize);

impl Wakes {
    /// A waker that counts into a fresh counter, and the counter.
    pub(super) fn waker() -> (std::task::Waker, Arc<Wakes>) {
        let count = Arc::new(Wakes::default());
        (std::task::Waker::from(count.clone()), count)
    }

    pub(super) fn get(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl std::task::Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn a_driver_is_not_woken_by_what_is_queued_while_it_is_polled() {
    let mut s = shard(1 << 20);
    let key = s.insert(None, 0);
    let (waker, count) = Wakes::waker();
    let wakes = || count.get();
    s.poll_began(key, &waker);
    assert!(s.queue(key, b"reply"), "queued");
    assert_eq!(wakes(), 0, "the driver writes its own replies before it returns");
    s.poll_ended(key);
    assert!(s.queue(key, b"update"));
    assert_eq!(wakes(), 1, "queued after its poll: woken");
    assert!(s.queue(key, b"another"));
    assert_eq!(wakes(), 1, "woken once until it runs again");
    s.poll_began(key, &waker);
    s.poll_ended(key);
    assert!(s.queue(key, b"more"));
    assert_eq!(wakes(), 2);
    assert_eq!(queued(&s, key), b"replyupdateanothermore");
}

#[test]
fn a_watch_completion_marks_the_socket_readable_and_an_earlier_watchs_changes_nothing() {
    use super::Watched;
    let mut s = shard(1 << 20);
    let key = s.insert(None, 0);
    let (waker, count) = Wakes::waker();
    s.poll_began(key, &waker);
    s.poll_ended(key);
    assert!(s.take_readable(key), "no watch armed: the driver reads");
    s.set_watch(key, 7);
    assert!(!s.take_readable(key), "watched and nothing arrived: it waits");
    assert_eq!(s.on_watch(key, 6, true, false), Watched::Stale);
    assert_eq!(count.get(), 0, "a completion of an earlier watch (another connection with this key) wakes nothing");
    assert!(!s.take_readable(key));
    assert_eq!(s.on_watch(key, 7, true, false), Watched::Woken);
    assert_eq!(count.get(), 1, "its own watch's completion wakes the driver");
    assert!(s.take_readable(key), "and tells it to read");
    assert!(!s.take_readable(key), "once");
    s.poll_began(key, &waker);
    s.poll_ended(key);
    assert_eq!(s.on_watch(key, 7, false, false), Watched::Woken);
    assert_eq!((count.get(), s.watch(key)), (2, 0), "the watch's last completion: woken, no watch left");
    assert!(!s.take_watch_failed(key), "ended, not failed: the driver arms another");
    assert!(s.take_readable(key) && s.take_readable(key), "without a watch it reads (and arms one again)");
    assert_eq!(
        s.on_watch(key, 7, true, false),
        Watched::Stale,
        "the ended watch's generation is not the slot's any more"
    );
    assert_eq!(count.get(), 2);
    s.set_watch(key, 8);
    s.poll_began(key, &waker);
    s.poll_ended(key);
    assert_eq!(s.on_watch(key, 8, false, true), Watched::Woken);
    assert!(s.take_watch_failed(key), "failed: the driver reads through glommio");
    assert!(!s.take_watch_failed(key));
}

#[test]
fn a_watch_completion_of_a_parked_connection_asks_its_parker_to_resume_it() {
    use super::Watched;
    let mut s = shard(1 << 20);
    let key = s.insert(None, 0);
    s.set_watch(key, 3);
    let (parker, count) = Wakes::waker();
    let (mine, _) = std::os::unix::net::UnixStream::pair().unwrap();
    s.park(key, mine.into(), 0, &parker);
    assert_eq!(s.on_watch(key, 3, true, false), Watched::Parked);
    assert_eq!(count.get(), 0, "the parker resumes it directly, without a wake-up");
    let (record, _fd) = s.unpark(key).expect("parked");
    assert_eq!(record, 0);
    assert!(s.take_readable(key), "the resumed driver reads first");
    assert_eq!(s.watch(key), 3, "the watch goes on");
}
