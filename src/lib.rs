//! moonx-ws: the real-time WebSocket edge of the MoonX cross-chain DEX.
//!
//! Data flow:
//!
//! ```text
//!  updates:  producer -> Publisher::publish (encode frame once, Arc)
//!              -> per-shard bounded lock-free queue (crossbeam ArrayQueue + AtomicWaker)
//!              -> shard fan-out task: a price frame goes once into the
//!                 shard's price log (each subscriber has a cursor), a private
//!                 frame into its user's connections' outboxes
//!              -> sweep in steps of 64 sockets: one sendmsg per connection
//!                 (outbox + unsent log bytes), no task wake-up when it all fits
//!              -> connection task: writes only what a sweep could not
//!
//!  clients:  accept (SO_REUSEPORT listener per shard)
//!              -> handshake (httparse, refusals of §1, limits)
//!              -> session: auth_required -> authenticate -> subscribe
//!
//!  resumes:  subscribe with since -> shard holds the channel's live updates
//!              -> replay thread (own consumer, shared scan per partition)
//!              -> shard's recovery task: subscribed, replay, held updates
//! ```
//!
//! Module map: [`protocol`] is sans-IO (frames, HTTP upgrade, messages,
//! session state machine); [`config`] the typed settings; [`clock`] time; [`auth`] token
//! verification; [`cluster`] Redis: cluster-wide limits and registry; [`ingest`] Kafka -> validated, pre-encoded updates; [`recovery`] replays of private channels from Kafka positions; [`limits`] connection and message limits; [`shard`] the
//! per-core registry, inbox and fan-out; [`conn`] the per-connection driver;
//! [`stream`] the byte stream under a connection (plain TCP or TLS);
//! [`http`] the HTTP endpoints; [`telemetry`] counters, histograms, logs;
//! [`server`] starts and stops it all.

// `unsafe` is denied everywhere but `sys.rs`, which explains each use.
#![deny(unsafe_code)]

pub mod auth;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod global;
pub mod http;
pub mod ingest;
pub mod limits;
pub mod protocol;
pub mod recovery;
mod runtime;
pub mod server;
pub mod shard;
pub mod stream;
mod sys;
pub mod telemetry;
