//! The embedded Kafka-protocol broker (PROTOCOL.md §6, `KAFKA_BROKERS`
//! unset) and its optional demo price feed.
//!
//! Owns: one thread that holds librdkafka's mock cluster (it is not `Send`),
//! creates the topics, and, with the demo feed on, produces realistic price
//! ticks into the prices topic through the real Kafka protocol, so a fresh
//! checkout shows updates flowing end to end. Any Kafka client can produce to
//! the logged bootstrap address too.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use super::client::ClientSettings;
use super::IngestError;

/// Partitions per embedded topic.
const PARTITIONS: i32 = 4;
/// Time between demo ticks (each tick updates every token).
const TICK: Duration = Duration::from_millis(500);

/// Starts the broker thread; returns its bootstrap address.
pub fn start(
    topics: &[String],
    demo_topic: Option<String>,
    client: ClientSettings,
    stop: Arc<AtomicBool>,
) -> Result<(String, JoinHandle<()>), IngestError> {
    let topics = topics.to_vec();
    let (tx, rx) = crossbeam::channel::bounded::<Result<String, String>>(1);
    let thread = std::thread::Builder::new()
        .name("kafka-embedded".into())
        .spawn(move || {
            let cluster = match MockCluster::new(1) {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            for t in &topics {
                if let Err(e) = cluster.create_topic(t, PARTITIONS, 1) {
                    let _ = tx.send(Err(format!("create topic {t}: {e}")));
                    return;
                }
            }
            let bootstrap = cluster.bootstrap_servers();
            let _ = tx.send(Ok(bootstrap.clone()));
            match demo_topic {
                Some(topic) => demo_feed(&client, &bootstrap, &topic, &stop),
                None => {
                    while !stop.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
            drop(cluster);
        })
        .map_err(|e| IngestError::Embedded(e.to_string()))?;
    match rx.recv() {
        Ok(Ok(addr)) => Ok((addr, thread)),
        Ok(Err(e)) => Err(IngestError::Embedded(e)),
        Err(_) => Err(IngestError::Embedded("broker thread exited".into())),
    }
}

/// A token on a chain with a random-walk price.
struct Ticker {
    token: &'static str,
    chain_id: u32,
    price: f64,
    open: f64,
    volume: f64,
}

fn demo_feed(client: &ClientSettings, bootstrap: &str, topic: &str, stop: &AtomicBool) {
    // The properties every client of the service uses (security, passthrough).
    let producer: BaseProducer = match client.client_config(bootstrap).set("linger.ms", "0").create() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %client.redact(&e.to_string()), "demo feed: cannot create producer");
            return;
        }
    };
    let mut tickers = [
        ("ETH", 8453, 2150.45),
        ("ETH", 1, 2151.10),
        ("cbBTC", 8453, 43_010.0),
        ("WBTC", 1, 43_025.0),
        ("USDC", 8453, 1.0),
        ("BNB", 56, 310.2),
    ]
    .map(|(token, chain_id, price)| Ticker { token, chain_id, price, open: price, volume: 1_250_000.0 });
    tracing::info!(topic, tokens = tickers.len(), "demo price feed running (disable with --demo-feed=false)");
    while !stop.load(Ordering::Acquire) {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        for t in tickers.iter_mut() {
            let step: f64 = rand::random::<f64>() - 0.5;
            if t.token != "USDC" {
                t.price *= 1.0 + step * 0.002;
            }
            t.volume += rand::random::<f64>() * 5_000.0;
            let change = (t.price / t.open - 1.0) * 100.0;
            let value = format!(
                r#"{{"token":"{}","chainId":{},"price":"{:.2}","priceUsd":"{:.2}","change24h":"{:.2}","volume24h":"{:.0}","timestamp":{}}}"#,
                t.token, t.chain_id, t.price, t.price, change, t.volume, now
            );
            let key = format!("{}:{}", t.chain_id, t.token);
            if let Err((e, _)) = producer.send(BaseRecord::to(topic).key(&key).payload(&value)) {
                tracing::debug!(error = %e, "demo feed: produce failed");
            }
        }
        producer.poll(Duration::ZERO);
        std::thread::sleep(TICK);
    }
    let _ = producer.flush(Duration::from_secs(1));
}
