//! Which partitions the consumer reads, and from where.
//!
//! Every instance reads every partition of the four topics (manual
//! assignment: no group, no rebalances). Where a partition starts depends
//! on what was true when the service started:
//! - a topic that existed then starts at the high watermark read before
//!   `/health/ready` (a live feed does not replay the past);
//! - a topic that metadata showed missing then, and that appears later, is
//!   read from its beginning: everything in it was produced after the start;
//! - a partition added later to an assigned topic is read from its beginning
//!   too, for the same reason.
//!
//! "Missing" needs a broker's answer: while metadata cannot be fetched at
//! all nothing is concluded, and a topic first seen after an outage counts
//! as one that existed (its past is not replayed).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use super::readback::Readback;
use crate::telemetry::LogLimiter;

/// Bounds each metadata call, so a stop request waits at most this long.
pub(super) const METADATA_TIMEOUT: Duration = Duration::from_secs(2);

/// What is known of a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// No broker has answered about it yet.
    Unknown,
    /// A broker said it does not exist (after the start).
    Missing,
    /// Its partitions are assigned.
    Assigned,
}

/// The partitions this consumer reads, grown as metadata shows new ones.
pub(super) struct Assignment {
    topics: Vec<(String, Seen)>,
    /// (topic index, partition) assigned so far.
    partitions: BTreeSet<(usize, i32)>,
    log: LogLimiter,
}

impl Assignment {
    pub fn new(topics: impl IntoIterator<Item = String>) -> Self {
        Self {
            topics: topics.into_iter().map(|t| (t, Seen::Unknown)).collect(),
            partitions: BTreeSet::new(),
            log: LogLimiter::new(Duration::from_secs(10)),
        }
    }

    /// How many partitions topic `t` has, as far as assigned (its highest
    /// partition number + 1; 0 before any).
    pub fn partitions_of(&self, t: usize) -> u32 {
        self.partitions.range((t, i32::MIN)..=(t, i32::MAX)).next_back().map_or(0, |&(_, p)| p as u32 + 1)
    }

    /// Assigns partitions not assigned yet; true when every topic exists
    /// and all its partitions are assigned. The topic at `readback.0`
    /// (prices) starts where its read-back says, when it existed at start.
    pub fn refresh<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        stop: &AtomicBool,
        mut readback: Option<(usize, &mut Readback)>,
    ) -> bool {
        let mut complete = true;
        let mut add = TopicPartitionList::new();
        let mut added = Vec::new();
        // Topics marked assigned this round, with what was known before.
        let mut done = Vec::new();
        for t in 0..self.topics.len() {
            if stop.load(Ordering::Acquire) {
                return false;
            }
            let (topic, seen) = (self.topics[t].0.clone(), self.topics[t].1);
            let md = match consumer.fetch_metadata(Some(&topic), METADATA_TIMEOUT) {
                Ok(md) => md,
                Err(e) => {
                    if let Some(suppressed) = self.log.allow() {
                        tracing::warn!(topic, error = %e, suppressed, "kafka metadata unavailable; will retry");
                    }
                    complete = false;
                    continue;
                }
            };
            let partitions: Vec<i32> = match md.topics().iter().find(|m| m.name() == topic) {
                Some(m) if m.error().is_none() && !m.partitions().is_empty() => {
                    m.partitions().iter().map(|p| p.id()).collect()
                }
                _ => {
                    if seen == Seen::Unknown {
                        self.topics[t].1 = Seen::Missing;
                        tracing::warn!(
                            topic,
                            "kafka topic not found: /health/ready waits for it, and it is read from its beginning once it appears"
                        );
                    }
                    complete = false;
                    continue;
                }
            };
            let mut all = true;
            for p in partitions {
                if self.partitions.contains(&(t, p)) {
                    continue;
                }
                let offset = match seen {
                    // It existed when the service started: live from now.
                    Seen::Unknown => match consumer.fetch_watermarks(&topic, p, METADATA_TIMEOUT) {
                        Ok(marks) => match readback.as_mut() {
                            // The prices tail is read back for snapshots first.
                            Some((r, rb)) if *r == t => Offset::Offset(rb.start(consumer, &topic, p, marks)),
                            _ => Offset::Offset(marks.1),
                        },
                        Err(e) => {
                            if let Some(suppressed) = self.log.allow() {
                                tracing::warn!(topic, partition = p, error = %e, suppressed, "kafka watermarks unavailable; will retry");
                            }
                            all = false;
                            continue;
                        }
                    },
                    // Created after the start: all of it is new.
                    Seen::Missing | Seen::Assigned => Offset::Beginning,
                };
                if add.add_partition_offset(&topic, p, offset).is_ok() {
                    added.push((t, p));
                }
            }
            if all {
                done.push((t, seen));
                self.topics[t].1 = Seen::Assigned;
            } else {
                complete = false;
            }
        }
        if add.count() > 0 {
            match consumer.incremental_assign(&add) {
                Ok(()) => {
                    self.partitions.extend(added);
                    if let Some((r, rb)) = readback {
                        if done.iter().any(|(t, _)| t == &r) {
                            rb.all_assigned();
                        }
                    }
                    tracing::info!(
                        partitions = add.count(),
                        total = self.partitions.len(),
                        "kafka partitions assigned"
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "kafka assignment failed; will retry");
                    // Nothing went in: what was known before still holds.
                    for (t, before) in done {
                        self.topics[t].1 = before;
                    }
                    return false;
                }
            }
        }
        complete
    }
}
