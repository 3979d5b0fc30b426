//! What every shard shares: [`Global`] (the config, the verifier, the
//! limits, the publisher, per-shard statistics, the clock, lifecycle flags).
//! Read-mostly; counters live per shard. Built once by `server::start`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use atomic_waker::AtomicWaker;

use crate::auth::Auth;
use crate::clock::Clock;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::ingest::IngestStats;
use crate::limits::Limits;
use crate::shard::inbox::Publisher;
use crate::stream::Tls;
use crate::telemetry::ShardStats;

/// State shared by every shard (read-mostly; counters live per shard).
pub struct Global {
    pub config: Config,
    pub auth: Auth,
    pub limits: Arc<Limits>,
    pub publisher: Publisher,
    pub stats: Vec<Arc<ShardStats>>,
    pub ingest: Arc<IngestStats>,
    /// Resumes (PROTOCOL.md §12): requests to the replay thread, results
    /// back to each shard.
    pub recovery: Arc<crate::recovery::Hub>,
    /// Redis: cluster-wide limits and registry (None without REDIS_URL).
    pub cluster: Option<Arc<Cluster>>,
    pub clock: Clock,
    /// The `/docs` page, rendered once at start.
    pub docs_html: String,
    /// TLS settings when serving wss:// (reloadable).
    pub tls: Option<Arc<Tls>>,
    /// Unique name of this instance (host + pid + start time).
    pub instance_id: String,
    /// Shards that have bound their listener.
    pub(crate) listening: AtomicUsize,
    pub(crate) shutting_down: AtomicBool,
    /// One waker per shard, woken when shutdown begins.
    pub(crate) stop_wakers: Vec<AtomicWaker>,
}

impl Global {
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Every shard is accepting and the instance is not draining.
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire) == self.stats.len() && !self.is_shutting_down()
    }

    /// Listening, and the Kafka consumer has its partitions (consuming).
    pub fn is_ready(&self) -> bool {
        self.is_listening()
            && self.ingest.assigned.load(Ordering::Acquire)
            && self.ingest.readback_done.load(Ordering::Acquire)
    }

    /// Starts the shutdown sequence on every shard (idempotent).
    pub fn begin_shutdown(&self) {
        if !self.shutting_down.swap(true, Ordering::AcqRel) {
            for w in &self.stop_wakers {
                w.wake();
            }
        }
    }
}
