//! The shard fan-out path in process: one update appended to N subscribers'
//! outboxes (registry lookup + copy + wake bookkeeping), without sockets.
//! Run: `cargo bench --bench fanout`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use moonx_ws::protocol::message::Channel;
use moonx_ws::shard::inbox::{Route, Update};
use moonx_ws::shard::Shard;
use moonx_ws::telemetry::ShardStats;
use std::sync::Arc;

fn fanout(c: &mut Criterion) {
    let data = br#"{"token":"ETH","chainId":8453,"price":"2150.45","priceUsd":"2150.45","change24h":"5.2","volume24h":"1250000","timestamp":1701234567890,"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
    let update = Update::encode(Route::Prices, "u1", 1701234567890, data);
    let mut g = c.benchmark_group("shard_fanout");
    for n in [100usize, 1000, 5000] {
        let mut shard = Shard::new(0, 1 << 20, Arc::new(ShardStats::default()));
        let keys: Vec<usize> = (0..n).map(|_| shard.insert(-1, 0)).collect();
        for &k in &keys {
            shard.subscribe(k, Channel::Prices);
        }
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("prices", n), &n, |b, _| {
            b.iter(|| {
                let delivered = shard.fanout(&update);
                // Drain the outboxes as the connection drivers would.
                for &k in &keys {
                    shard.slot(k).pending.clear();
                }
                delivered
            })
        });
    }
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
