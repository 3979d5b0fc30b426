//! A Kafka for a test: librdkafka's mock cluster (the real protocol on
//! loopback), owned by the test, with a producer.

use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer};
use rdkafka::ClientConfig;

pub const TOPICS: [&str; 4] = ["price.updates", "order.updates", "portfolio.updates", "trade.updates"];

pub struct Kafka {
    pub cluster: MockCluster<'static, DefaultProducerContext>,
    pub producer: BaseProducer,
}

impl Kafka {
    pub fn new(partitions: i32) -> Kafka {
        Self::with_topics(partitions, &TOPICS)
    }

    /// A cluster with only `topics` (the others can be created later).
    pub fn with_topics(partitions: i32, topics: &[&str]) -> Kafka {
        let cluster = MockCluster::new(1).unwrap();
        for t in topics {
            cluster.create_topic(t, partitions, 1).unwrap();
        }
        let producer = producer(&cluster.bootstrap_servers(), &[]);
        Kafka { cluster, producer }
    }

    pub fn bootstrap(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    pub fn produce(&self, topic: &str, partition: Option<i32>, value: &[u8]) {
        let mut rec = BaseRecord::<(), [u8]>::to(topic).payload(value);
        if let Some(p) = partition {
            rec = rec.partition(p);
        }
        let mut rec = rec;
        loop {
            match self.producer.send(rec) {
                Ok(()) => break,
                Err((_, back)) => {
                    self.producer.poll(Duration::from_millis(10));
                    rec = back;
                }
            }
        }
        self.producer.poll(Duration::ZERO);
    }

    pub fn flush(&self) {
        self.producer.flush(Duration::from_secs(30)).unwrap();
    }
}

/// A producer to `bootstrap` with `settings` (librdkafka properties) over
/// the test defaults.
pub fn producer(bootstrap: &str, settings: &[(&str, &str)]) -> BaseProducer {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap).set("linger.ms", "0").set("message.timeout.ms", "60000");
    for (k, v) in settings {
        config.set(*k, *v);
    }
    config.create().unwrap()
}

/// Writes one record batch to `topic`/`partition` with a Produce request
/// (v3) built by hand: `records` records whose encoded form is `body`,
/// under compression `codec` (the batch attributes' low bits: 0 none, 1
/// gzip, 2 snappy, 3 lz4, 4 zstd, 5-7 unknown). What a corrupt batch, or
/// one with a codec the consumer lacks, looks like on the wire; librdkafka
/// never produces one. Returns the broker's error code for the partition.
pub fn produce_raw_batch(bootstrap: &str, topic: &str, partition: i32, codec: i16, records: i32, body: &[u8]) -> i16 {
    use std::io::{Read, Write};
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let mut batch = Vec::new();
    batch.extend(0i64.to_be_bytes()); // base offset (the broker assigns it)
    batch.extend(0i32.to_be_bytes()); // batch length, set below
    batch.extend((-1i32).to_be_bytes()); // partition leader epoch
    batch.push(2); // magic: record batch v2
    batch.extend(0u32.to_be_bytes()); // CRC: checked by neither the mock broker nor a consumer by default
    batch.extend(codec.to_be_bytes()); // attributes
    batch.extend((records - 1).to_be_bytes()); // last offset delta
    batch.extend(now.to_be_bytes()); // first timestamp
    batch.extend(now.to_be_bytes()); // max timestamp
    batch.extend((-1i64).to_be_bytes()); // producer id
    batch.extend((-1i16).to_be_bytes()); // producer epoch
    batch.extend((-1i32).to_be_bytes()); // base sequence
    batch.extend(records.to_be_bytes());
    batch.extend_from_slice(body);
    let len = (batch.len() - 12) as i32;
    batch[8..12].copy_from_slice(&len.to_be_bytes());

    let mut req = Vec::new();
    req.extend(0i16.to_be_bytes()); // Produce
    req.extend(3i16.to_be_bytes()); // v3
    req.extend(7i32.to_be_bytes()); // correlation id
    req.extend(4i16.to_be_bytes());
    req.extend_from_slice(b"test"); // client id
    req.extend((-1i16).to_be_bytes()); // no transactional id
    req.extend(1i16.to_be_bytes()); // acks
    req.extend(10_000i32.to_be_bytes()); // timeout
    req.extend(1i32.to_be_bytes()); // one topic
    req.extend((topic.len() as i16).to_be_bytes());
    req.extend_from_slice(topic.as_bytes());
    req.extend(1i32.to_be_bytes()); // one partition
    req.extend(partition.to_be_bytes());
    req.extend((batch.len() as i32).to_be_bytes());
    req.extend_from_slice(&batch);

    let mut s = std::net::TcpStream::connect(bootstrap).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&(req.len() as i32).to_be_bytes()).unwrap();
    s.write_all(&req).unwrap();
    let mut size = [0u8; 4];
    s.read_exact(&mut size).unwrap();
    let mut resp = vec![0u8; i32::from_be_bytes(size) as usize];
    s.read_exact(&mut resp).unwrap();
    // correlation id, topic count, topic name, partition count, partition, error code
    let name_end = 4 + 4 + 2 + topic.len();
    let at = name_end + 4 + 4;
    i16::from_be_bytes([resp[at], resp[at + 1]])
}
