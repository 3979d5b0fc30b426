//! Starting and stopping the service.
//!
//! Owns: building [`Global`] from the config, binding the shared port,
//! launching one pinned glommio executor per shard (each running
//! `runtime::run_shard`), starting Kafka ingest and the Redis workers, and
//! the shutdown sequence of PROTOCOL.md §10 as seen from outside
//! ([`ServerHandle`]).

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context as _;
use atomic_waker::AtomicWaker;
use glommio::{CpuSet, LocalExecutorPoolBuilder, PoolPlacement};

use crate::auth::{Auth, DevToken};
use crate::clock::Clock;
use crate::cluster::Cluster;
use crate::config::Config;
pub use crate::global::Global;
use crate::ingest::{self, Ingest, IngestStats};
use crate::limits::Limits;
use crate::recovery::Hub;
use crate::shard::inbox::Publisher;
use crate::stream::Tls;
use crate::telemetry::ShardStats;

pub use crate::sys::disable_transparent_huge_pages;

/// io_uring submission queue entries per ring (see `start`).
const RING_DEPTH: usize = 4096;

/// A running server.
pub struct ServerHandle {
    global: Arc<Global>,
    addr: SocketAddr,
    pool: Option<JoinHandle<()>>,
    ingest: Option<Ingest>,
    dev_token: Option<DevToken>,
}

impl ServerHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The publish entry point (what Kafka ingest feeds).
    pub fn publisher(&self) -> Publisher {
        self.global.publisher.clone()
    }

    /// The generated dev token in embedded-auth mode.
    pub fn dev_token(&self) -> Option<&DevToken> {
        self.dev_token.as_ref()
    }

    /// Re-reads the TLS certificate and key (as SIGHUP does): new
    /// connections use them, open ones are untouched.
    pub fn reload_tls(&self) -> anyhow::Result<()> {
        match &self.global.tls {
            Some(tls) => Ok(tls.reload()?),
            None => Ok(()),
        }
    }

    /// Begins a graceful shutdown (as SIGTERM does).
    pub fn shutdown(&self) {
        self.global.begin_shutdown();
    }

    /// Waits for every shard to finish, then stops the Kafka consumer.
    pub fn join(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        if let Some(pool) = self.pool.take() {
            let _ = pool.join();
        }
        if let Some(ingest) = self.ingest.take() {
            ingest.stop();
        }
        if let Some(cluster) = &self.global.cluster {
            cluster.stop();
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.global.begin_shutdown();
        self.finish();
    }
}

/// Binds the port, starts the shards and returns once all are listening.
pub fn start(config: Config) -> anyhow::Result<ServerHandle> {
    start_with(config, Clock::system())
}

/// [`start`] on a given clock (tests hold its wall time still or move it
/// by hand: rate windows, timestamps and heartbeats all follow it).
pub fn start_with(config: Config, clock: Clock) -> anyhow::Result<ServerHandle> {
    let tls = Tls::from_files(config.tls_cert_file.as_deref(), config.tls_key_file.as_deref())?;
    let (auth, dev_token) = Auth::from_config(&config)?;
    let shards = config.shard_count();
    let requested = SocketAddr::new(config.websocket_service_host, config.websocket_service_port);
    // Hold the port while the shards bind theirs (SO_REUSEPORT), so a port
    // of 0 resolves to one port for all of them. Not listening: it never
    // receives connections.
    if requested.port() != 0 && !config.ws_share_port {
        ensure_port_free(requested)?;
    }
    let placeholder = reserve_port(requested).with_context(|| format!("cannot bind {requested}"))?;
    let addr = placeholder.local_addr()?;

    let limits = Arc::new(Limits::new(&config));
    let stats: Vec<Arc<ShardStats>> = (0..shards).map(|_| Arc::new(ShardStats::default())).collect();
    let instance_id = instance_id();
    let cluster = Cluster::start(&config, &instance_id, limits.clone(), stats.clone(), clock.clone())?;
    let global = Arc::new(Global {
        limits,
        publisher: Publisher::new(shards, config.ws_shard_queue_capacity.get()),
        stats,
        cluster,
        ingest: Arc::new(IngestStats::default()),
        recovery: Arc::new(Hub::new(shards, config.ws_recovery_timeout_ms)),
        clock,
        tls,
        docs_html: crate::http::docs::render(dev_token.as_ref().map(|d| d.token.as_str())),
        instance_id,
        listening: AtomicUsize::new(0),
        shutting_down: AtomicBool::new(false),
        stop_wakers: (0..shards).map(|_| AtomicWaker::new()).collect(),
        auth,
        config,
    });

    // From here on, an early return drops the handle, which stops whatever
    // was started (shards, Redis workers, ingest).
    let mut handle = ServerHandle { global: global.clone(), addr, pool: None, ingest: None, dev_token };
    let (ready_tx, ready_rx) = crossbeam::channel::bounded::<Result<(), String>>(shards);
    let next_shard = Arc::new(AtomicUsize::new(0));
    let g = global.clone();
    let placement = PoolPlacement::MaxSpread(shards, CpuSet::online().ok());
    let handles = LocalExecutorPoolBuilder::new(placement)
        .name("moonx-shard")
        // Network I/O only: no DMA buffers needed beyond glommio's minimum.
        .io_memory(64 * 1024)
        // The kernel sizes a ring's cancel hash from its depth. Every pending
        // socket read is a poll in that hash, and each cancellation glommio
        // submits (for an operation dropped while in flight) walks a bucket:
        // at glommio's default depth of 128 the buckets hold over a thousand
        // entries each with 10k connections. A deeper ring costs a little
        // ring memory per shard.
        .ring_depth(RING_DEPTH)
        .on_all_shards(move || async move {
            let id = next_shard.fetch_add(1, Ordering::Relaxed);
            crate::runtime::run_shard(g, id, addr, ready_tx).await
        })
        .map_err(|e| anyhow::anyhow!("cannot start shard executors: {e}"))?;
    handle.pool = Some(std::thread::Builder::new().name("moonx-pool".into()).spawn(move || {
        for r in handles.join_all() {
            if let Err(e) = r {
                tracing::error!(error = %e, "shard executor failed");
            }
        }
    })?);
    for _ in 0..shards {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => anyhow::bail!("cannot listen on {addr}: {e}"),
            Err(_) => anyhow::bail!("a shard exited during start-up"),
        }
    }
    drop(placeholder);
    tracing::info!(%addr, shards, instance = %global.instance_id, "listening");
    handle.ingest = Some(ingest::start(
        &global.config,
        global.publisher.clone(),
        &global.instance_id,
        global.ingest.clone(),
        global.clock.clone(),
        global.recovery.clone(),
    )?);
    Ok(handle)
}

/// Fails when another socket already listens on `addr`. The shards bind
/// with SO_REUSEPORT, which the kernel would otherwise let them share with
/// any process of the same user (`WS_SHARE_PORT` allows that on purpose).
/// The probe sets SO_REUSEADDR only: a listener conflicts with it, while
/// an earlier instance's connections still closing (its listeners set
/// SO_REUSEADDR too, which they inherit) do not.
fn ensure_port_free(addr: SocketAddr) -> anyhow::Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    match sock.bind(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(anyhow::anyhow!(
            "cannot bind {addr}: another process is listening on it (set WS_SHARE_PORT=true to share the port, e.g. to restart without refusing connections)"
        )),
        Err(e) => Err(e).with_context(|| format!("cannot bind {addr}")),
    }
}

fn reserve_port(addr: SocketAddr) -> std::io::Result<StdListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_port(true)?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

fn instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    format!("{host}-{}-{:x}", std::process::id(), rand::random::<u32>())
}
