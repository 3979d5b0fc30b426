//! The shard fan-out path in process: one update queued for N subscribers
//! (`prices`) without sockets (each outbox gets a copy), and with the sweep
//! that writes it to N real sockets (Unix socket pairs; the reading side is drained outside the
//! timing as far as criterion allows: it is part of each iteration).
//! Run: `cargo bench --bench fanout`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moonx_ws::protocol::message::Channel;
use moonx_ws::shard::inbox::{Route, Update};
use moonx_ws::shard::{DirectSocket, InFlight, Shard};
use moonx_ws::telemetry::ShardStats;
use std::sync::Arc;

fn fanout(c: &mut Criterion) {
    let data = br#"{"token":"ETH","chainId":8453,"price":"2150.45","priceUsd":"2150.45","change24h":"5.2","volume24h":"1250000","timestamp":1701234567890,"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
    let update = Arc::new(Update::encode(Route::Prices, "u1", 1701234567890, data));
    let mut g = c.benchmark_group("shard_fanout");
    for n in [100usize, 1000, 5000] {
        let mut shard = Shard::new(0, 1 << 20, Arc::new(ShardStats::default()));
        let keys: Vec<usize> = (0..n).map(|_| shard.insert(None, 0)).collect();
        for &k in &keys {
            shard.subscribe(k, Channel::Prices);
        }
        let mut written = InFlight::default();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("prices", n), &n, |b, _| {
            b.iter(|| {
                let delivered = shard.fanout(&update);
                // No sockets: the sweep copies the frame into every outbox
                // (the path of a connection whose driver is mid-write).
                shard.begin_sweep();
                while !shard.flush_step(64) {}
                // Drain the outboxes as the connection drivers would.
                for &k in &keys {
                    shard.take_for_driver(k, &mut written);
                    shard.driver_holds(k, 0);
                }
                delivered
            })
        });
    }
    g.finish();
}

/// Fan-out plus the sweep that hands the frame to every subscriber's socket.
fn fanout_to_sockets(c: &mut Criterion) {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let data = br#"{"token":"ETH","chainId":8453,"price":"2150.45","priceUsd":"2150.45","change24h":"5.2","volume24h":"1250000","timestamp":1701234567890,"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
    let update = Arc::new(Update::encode(Route::Prices, "u1", 1701234567890, data));
    let mut g = c.benchmark_group("shard_fanout_sockets");
    g.sample_size(20);
    g.measurement_time(std::time::Duration::from_secs(4));
    let n = 1000;
    let mut shard = Shard::new(0, 1 << 20, Arc::new(ShardStats::default()));
    let mut clients = Vec::new();
    for _ in 0..n {
        let (srv, cli) = UnixStream::pair().unwrap();
        cli.set_nonblocking(true).unwrap();
        let k = shard.insert(Some(DirectSocket::owned(srv.into())), 0);
        shard.subscribe(k, Channel::Prices);
        clients.push(cli);
    }
    let mut buf = vec![0u8; 4096];
    g.throughput(Throughput::Elements(n as u64));
    for per_write in [1usize, 8] {
        g.bench_with_input(BenchmarkId::new("prices_1000_frames_per_write", per_write), &per_write, |b, &k| {
            b.iter(|| {
                for _ in 0..k {
                    shard.fanout(&update);
                }
                shard.begin_sweep();
                while !shard.flush_step(64) {}
                for c in clients.iter_mut() {
                    while let Ok(m) = c.read(&mut buf) {
                        if m < buf.len() {
                            break;
                        }
                    }
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, fanout, fanout_to_sockets);
criterion_main!(benches);
