//! Samples for `moonx_ws_kafka_to_socket_latency_seconds`: the time from
//! an update's Kafka timestamp to the first write of its frame to a socket.
//!
//! An update is sampled only when it was queued for at least one
//! connection, and recorded when the first of them is written (or handed to
//! its task, for a connection the fan-out cannot write directly). Each
//! queue is bounded: past [`MAX_STAMPS`] an update goes unsampled, counted
//! in `moonx_ws_latency_samples_skipped_total`.

use std::collections::VecDeque;

use crate::telemetry::ShardStats;

/// Samples each queue holds at most.
pub(super) const MAX_STAMPS: usize = 4096;

#[derive(Debug, Default)]
pub(super) struct Stamps {
    /// Price frames: the log offset where the frame ends, and its Kafka
    /// timestamp (ms). Written once any subscriber's write passes the end.
    pub log: VecDeque<(u64, i64)>,
    /// Private frames: the first recipient's key (its slot is marked
    /// `STAMPED`) and the Kafka timestamp.
    pub private: VecDeque<(u32, i64)>,
    /// Stamped slots written (or handed over) in the current sweep step.
    pub written: Vec<u32>,
    /// How far into the price log a write of this step reached.
    pub log_written: u64,
}

impl Stamps {
    /// Samples a price frame ending at log offset `end`.
    pub fn price(&mut self, end: u64, kafka_ts_ms: i64, stats: &ShardStats) {
        push(&mut self.log, (end, kafka_ts_ms), stats);
    }

    /// Samples a private frame whose first recipient is `key`; false when
    /// the queue was full (the slot is then not marked).
    pub fn private(&mut self, key: usize, kafka_ts_ms: i64, stats: &ShardStats) -> bool {
        push(&mut self.private, (key as u32, kafka_ts_ms), stats)
    }

    /// A connection that was never written is gone: its samples are not
    /// latencies.
    pub fn forget(&mut self, key: usize) {
        self.private.retain(|&(k, _)| k as usize != key);
    }

    /// Records, at `now_ms`, the samples this sweep step's writes reached.
    pub fn record_written(&mut self, now_ms: u64, stats: &ShardStats) {
        let log_done = self.log.front().is_some_and(|&(end, _)| end <= self.log_written);
        if !log_done && self.written.is_empty() {
            return;
        }
        let now = now_ms as i64;
        let mut hist = stats.e2e_latency_us.lock();
        let mut record = |ts: i64| hist.saturating_record(((now - ts).max(0) as u64 * 1000).max(1));
        while let Some(&(end, ts)) = self.log.front() {
            if end > self.log_written {
                break;
            }
            record(ts);
            self.log.pop_front();
        }
        if !self.written.is_empty() {
            self.written.sort_unstable();
            let written = &self.written;
            self.private.retain(|&(key, ts)| {
                let done = written.binary_search(&key).is_ok();
                if done {
                    record(ts);
                }
                !done
            });
            self.written.clear();
        }
    }
}

fn push<T>(queue: &mut VecDeque<T>, stamp: T, stats: &ShardStats) -> bool {
    if queue.len() >= MAX_STAMPS {
        stats.latency_samples_skipped.inc();
        return false;
    }
    queue.push_back(stamp);
    true
}
