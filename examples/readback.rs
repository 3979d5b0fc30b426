//! How long a starting instance takes to read the prices topic back for
//! snapshots (PROTOCOL.md §11): fills librdkafka's mock cluster with N price
//! messages over M markets, starts the server on it, and times start →
//! `/health/ready`.
//!
//! `cargo run --release --example readback -- [messages] [markets] [partitions]`
//! (defaults 1000000, 1000 and 64). The mock broker runs in this process,
//! so the figure includes serving the fetches on the same two cores. It
//! keeps about 5 MB per partition and drops the oldest beyond: 64
//! partitions hold a million of these ~170-byte values (the run checks
//! that every message was read back).
//!
//! `KAFKA_CONSUMER_*`, `KAFKA_FETCH_WAIT_MAX_MS` and `KAFKA_CONFIG_*` from
//! the environment reach the server (to see what a setting changes);
//! `PROGRESS=1` prints the messages read back every half second.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use moonx_ws::config::Config;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let messages: usize = args.next().map_or(Ok(1_000_000), |a| a.parse())?;
    let markets: usize = args.next().map_or(Ok(1000), |a| a.parse())?;
    let partitions: i32 = args.next().map_or(Ok(64), |a| a.parse())?;
    let cluster = MockCluster::new(1)?;
    for topic in ["price.updates", "order.updates", "portfolio.updates", "trade.updates"] {
        cluster.create_topic(topic, partitions, 1)?;
    }
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("linger.ms", "50")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let filled = Instant::now();
    for i in 0..messages {
        let market = i % markets;
        let value = format!(
            r#"{{"token":"T{market}","chainId":{},"price":"{i}.25","priceUsd":"{i}.25","change24h":"1.5","volume24h":"1250000","timestamp":1701234567890}}"#,
            market % 4 + 1
        );
        let key = format!("{}:T{market}", market % 4 + 1);
        let mut rec = BaseRecord::to("price.updates").key(&key).payload(&value);
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((_, back)) => {
                    producer.poll(Duration::from_millis(5));
                    rec = back;
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120))?;
    eprintln!("produced {messages} messages over {markets} markets in {:.1} s", filled.elapsed().as_secs_f64());

    let mut env = vec![
        ("KAFKA_BROKERS", cluster.bootstrap_servers()),
        ("WEBSOCKET_SERVICE_HOST", "127.0.0.1".into()),
        ("WEBSOCKET_SERVICE_PORT", "0".into()),
        ("WS_SHARDS", "1".into()),
        ("JWT_SECRET", "readback-secret".into()),
        ("LOG_LEVEL", std::env::var("LOG_LEVEL").unwrap_or_else(|_| "warn".into())),
    ];
    // Fetch settings from the environment, to see what they change.
    for (name, v) in std::env::vars() {
        let fetch =
            ["KAFKA_CONSUMER_FETCH_MAX_BYTES", "KAFKA_CONSUMER_MAX_PARTITION_FETCH_BYTES", "KAFKA_FETCH_WAIT_MAX_MS"];
        if fetch.contains(&name.as_str()) || name.starts_with("KAFKA_CONFIG_") {
            env.push((name.leak(), v));
        }
    }
    let config = Config::from_sources_with(
        ["moonx-ws"],
        |k| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()),
        env.iter().map(|(n, _)| n.to_string()),
    )?;
    moonx_ws::telemetry::init_logging(config.log_format, &config.log_level);
    let started = Instant::now();
    let server = moonx_ws::server::start(config)?;
    let addr = server.local_addr();
    let deadline = started + Duration::from_secs(120);
    let mut next_report = Instant::now();
    while get(addr, "/health/ready").0 != 200 {
        anyhow::ensure!(Instant::now() < deadline, "not ready within 120 s");
        if std::env::var_os("PROGRESS").is_some() && Instant::now() >= next_report {
            next_report += Duration::from_millis(500);
            let metrics = get(addr, "/metrics").1;
            let read = metrics.lines().find(|l| l.starts_with("moonx_ws_kafka_readback_messages_total ")).unwrap_or("");
            eprintln!("{:.1} s: {read}", started.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let ready = started.elapsed();
    let metrics = get(addr, "/metrics").1;
    let metric = |name: &str| metrics.lines().find(|l| l.starts_with(name)).unwrap_or("").to_owned();
    println!("start -> ready: {:.2} s", ready.as_secs_f64());
    let read = metric("moonx_ws_kafka_readback_messages_total ");
    println!("{read}");
    println!("{}", metric("moonx_ws_kafka_readback_markets "));
    let read: usize = read.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0);
    anyhow::ensure!(read == messages, "read back {read} of {messages}: the broker did not keep them all");
    // Where the CPU went, by thread (ingest, the mock broker, shards).
    let mut threads: Vec<(String, u64)> = std::fs::read_dir("/proc/self/task")?
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?.trim().to_owned();
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
            Some((comm, ticks * 10))
        })
        .filter(|(_, ms)| *ms >= 50)
        .collect();
    threads.sort_by_key(|t| std::cmp::Reverse(t.1));
    println!("CPU ms by thread (whole run): {threads:?}");
    server.shutdown();
    server.join();
    Ok(())
}

fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr) else { return (0, String::new()) };
    let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_owned());
    (status, body)
}
