//! The Kafka consumer's event queue, read through librdkafka's C API.
//!
//! rust-rdkafka's `BaseConsumer::poll` turns a partition's consumer error
//! into `KafkaError::MessageConsumption(code)` and drops which partition
//! and offset it was about. Ingest needs both: an offset out of range is
//! repaired per partition, and an undecodable batch is skipped from the
//! offset it reported (`ingest::skip`). So the ingest thread reads the
//! consumer's queue here instead: messages, errors with their partition
//! and offset, and statistics, each handed out as a borrowed [`Event`].
//! Nothing else reads that queue.

use std::ffi::CStr;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::types::RDKafkaErrorCode;

/// One event of the consumer's queue, valid during the callback only.
#[derive(Debug)]
pub enum Event<'a> {
    Message(Message<'a>),
    /// A consumer error about one partition, at `offset` (librdkafka's
    /// figure: the fetch position, or the base offset of a bad batch).
    PartitionError {
        topic: &'a str,
        partition: i32,
        offset: i64,
        code: RDKafkaErrorCode,
        reason: &'a str,
    },
    /// An error about the client as a whole (brokers down, a failed
    /// authentication, ...).
    Error {
        code: RDKafkaErrorCode,
        reason: &'a str,
        fatal: bool,
    },
    /// librdkafka's statistics, as its JSON text.
    Stats(&'a str),
    /// A line of librdkafka's own log (`level` as syslog: 3 error, 4
    /// warning, 7 debug).
    Log {
        level: i32,
        facility: &'a str,
        message: &'a str,
    },
}

/// A consumed record.
#[derive(Debug)]
pub struct Message<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub payload: &'a [u8],
    /// The record's timestamp (create or log-append time), ms since the
    /// epoch; 0 when the record has none.
    pub timestamp_ms: i64,
}

/// The consumer's queue. Borrows the consumer, which must outlive it (a
/// queue handle keeps a reference into the client it came from).
pub struct EventQueue<'c> {
    queue: NonNull<rd::rd_kafka_queue_t>,
    _consumer: PhantomData<&'c ()>,
}

impl<'c> EventQueue<'c> {
    /// The queue every event of `consumer` lands on (a consumer created
    /// with a `group.id` has its main queue forwarded there). None when
    /// librdkafka has no consumer queue for it.
    pub fn of<C: ConsumerContext>(consumer: &'c BaseConsumer<C>) -> Option<Self> {
        // SAFETY: `native_ptr` is the live client handle of `consumer`,
        // which the returned queue borrows; librdkafka returns a new
        // reference to the queue (released in `drop`) or null.
        let queue = unsafe { rd::rd_kafka_queue_get_consumer(consumer.client().native_ptr()) };
        NonNull::new(queue).map(|queue| Self { queue, _consumer: PhantomData })
    }

    /// Waits up to `timeout` for one event and hands it (each message of
    /// it, for a batch of messages) to `on`. Returns false when none came.
    pub fn poll(&mut self, timeout: Duration, mut on: impl FnMut(Event<'_>)) -> bool {
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: the queue handle is live (released only in `drop`).
        let event = unsafe { rd::rd_kafka_queue_poll(self.queue.as_ptr(), ms) };
        let Some(event) = NonNull::new(event) else {
            return false;
        };
        let event = OwnedEvent(event);
        let ev = event.0.as_ptr();
        // (Below, "as above":) `ev` is a live event, destroyed only when
        // `event` drops at the end of this function; the strings and buffers
        // librdkafka returns from it live as long as it does, and `on`
        // cannot keep them (their lifetime ends with the call).
        // SAFETY: as above.
        let kind = unsafe { rd::rd_kafka_event_type(ev) };
        match kind {
            rd::RD_KAFKA_EVENT_FETCH => loop {
                // SAFETY: as above.
                let msg = unsafe { rd::rd_kafka_event_message_next(ev) };
                if msg.is_null() {
                    break;
                }
                // SAFETY: a message of the live event, valid as it is.
                on(unsafe { message_event(&*msg) });
            },
            rd::RD_KAFKA_EVENT_ERROR => {
                // SAFETY: as above.
                let code: RDKafkaErrorCode = unsafe { rd::rd_kafka_event_error(ev) }.into();
                // SAFETY: as above; a null string is handled by `text`.
                let reason = unsafe { text(rd::rd_kafka_event_error_string(ev)) };
                // SAFETY: as above; the partition is a new object we own
                // and destroy right after reading it (null: none).
                let tp = unsafe { rd::rd_kafka_event_topic_partition(ev) };
                if let Some(tp) = NonNull::new(tp) {
                    // SAFETY: `tp` is live until destroyed below.
                    let (topic, partition, offset) = unsafe {
                        let tp = tp.as_ref();
                        (text(tp.topic), tp.partition, tp.offset)
                    };
                    on(Event::PartitionError { topic, partition, offset, code, reason });
                    // SAFETY: created for us by the call above, not used after.
                    unsafe { rd::rd_kafka_topic_partition_destroy(tp.as_ptr()) };
                } else {
                    // SAFETY: as above.
                    let fatal = unsafe { rd::rd_kafka_event_error_is_fatal(ev) } != 0;
                    on(Event::Error { code, reason, fatal });
                }
            }
            rd::RD_KAFKA_EVENT_STATS => {
                // SAFETY: as above.
                let json = unsafe { text(rd::rd_kafka_event_stats(ev)) };
                on(Event::Stats(json));
            }
            rd::RD_KAFKA_EVENT_LOG => {
                let (mut facility, mut message, mut level) = (std::ptr::null(), std::ptr::null(), 0);
                // SAFETY: as above; the out-parameters are valid, and the
                // strings they receive live as long as the event.
                if unsafe { rd::rd_kafka_event_log(ev, &mut facility, &mut message, &mut level) } == 0 {
                    // SAFETY: as above (null is handled by `text`).
                    let (facility, message) = unsafe { (text(facility), text(message)) };
                    on(Event::Log { level, facility, message });
                }
            }
            _ => {} // rebalances and commits do not happen: manual assignment, no commits
        }
        true
    }
}

impl Drop for EventQueue<'_> {
    fn drop(&mut self) {
        // SAFETY: releases the reference taken in `of`; not used after.
        unsafe { rd::rd_kafka_queue_destroy(self.queue.as_ptr()) }
    }
}

/// An event polled from the queue, destroyed when dropped.
struct OwnedEvent(NonNull<rd::rd_kafka_event_t>);

impl Drop for OwnedEvent {
    fn drop(&mut self) {
        // SAFETY: the event came from `rd_kafka_queue_poll` and is destroyed
        // once, here; nothing borrowed from it outlives `poll`.
        unsafe { rd::rd_kafka_event_destroy(self.0.as_ptr()) }
    }
}

/// A message of a fetch event: a record, or an error about its partition.
///
/// # Safety
/// `msg` must be a message of a live event; what it points to must stay
/// valid for `'a`.
unsafe fn message_event<'a>(msg: &'a rd::rd_kafka_message_t) -> Event<'a> {
    // SAFETY: the topic handle of a live message; its name lives with it.
    let topic = unsafe { text(rd::rd_kafka_topic_name(msg.rkt)) };
    if msg.err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        // SAFETY: for an error message librdkafka puts the error text in
        // the payload (not NUL-terminated: `len` bytes).
        let reason = unsafe { bytes(msg.payload.cast(), msg.len) };
        return Event::PartitionError {
            topic,
            partition: msg.partition,
            offset: msg.offset,
            code: msg.err.into(),
            reason: std::str::from_utf8(reason).unwrap_or("(not UTF-8)"),
        };
    }
    let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
    // SAFETY: reads the live message; `kind` is a valid out-parameter.
    let ts = unsafe { rd::rd_kafka_message_timestamp(msg, &mut kind) };
    let timestamp_ms = if kind == rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE { 0 } else { ts };
    Event::Message(Message {
        topic,
        partition: msg.partition,
        offset: msg.offset,
        // SAFETY: the payload is `len` bytes (or null for an empty value).
        payload: unsafe { bytes(msg.payload.cast(), msg.len) },
        timestamp_ms,
    })
}

/// A C string as `&str` ("" for null, lossy UTF-8 cut at the first bad byte).
///
/// # Safety
/// `p` must be null or a NUL-terminated string valid for `'a`.
unsafe fn text<'a>(p: *const std::os::raw::c_char) -> &'a str {
    if p.is_null() {
        return "";
    }
    // SAFETY: per the contract.
    let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
    match std::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
    }
}

/// # Safety
/// `p` must be null or valid for reads of `len` bytes for `'a`.
unsafe fn bytes<'a>(p: *const u8, len: usize) -> &'a [u8] {
    if p.is_null() || len == 0 {
        return &[];
    }
    // SAFETY: per the contract.
    unsafe { std::slice::from_raw_parts(p, len) }
}

/// What librdkafka holds for `name` in the configuration `client` runs
/// with (its effective value; None for a property that is unknown or
/// holds no value). Confirms that settings reached the client; never
/// log a secret property's value read this way.
pub fn effective_property<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    name: &str,
) -> Option<String> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: `native_ptr` is the live handle of `client`, borrowed for
    // this call; librdkafka returns a pointer to the configuration it owns
    // (valid while the client lives) and never null for a live client.
    let conf = unsafe { rd::rd_kafka_conf(client.native_ptr()) };
    if conf.is_null() {
        return None;
    }
    let mut size: usize = 0;
    // SAFETY: `conf` is live (above); a null destination asks for the size
    // only, written to `size`.
    let res = unsafe { rd::rd_kafka_conf_get(conf, name.as_ptr(), std::ptr::null_mut(), &mut size) };
    if res != rd::rd_kafka_conf_res_t::RD_KAFKA_CONF_OK || size == 0 {
        return None;
    }
    let mut buf = vec![0u8; size];
    // SAFETY: as above; `buf` has the `size` bytes librdkafka asked for.
    let res = unsafe { rd::rd_kafka_conf_get(conf, name.as_ptr(), buf.as_mut_ptr().cast(), &mut size) };
    if res != rd::rd_kafka_conf_res_t::RD_KAFKA_CONF_OK {
        return None;
    }
    let text = CStr::from_bytes_until_nul(&buf).ok()?.to_str().ok()?;
    (!text.is_empty()).then(|| text.to_owned())
}
