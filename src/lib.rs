//! moonx-ws: the real-time WebSocket edge of the MoonX cross-chain DEX.
//!
//! Data flow:
//!
//! ```text
//!  updates:  producer -> Publisher::publish (encode frame once, Arc)
//!              -> per-shard bounded lock-free queue (crossbeam ArrayQueue + AtomicWaker)
//!              -> shard fan-out task: registry lookup, append bytes to each
//!                 subscriber's outbox, wake its connection once per batch
//!              -> connection task: one write() for everything queued
//!
//!  clients:  accept (SO_REUSEPORT listener per shard)
//!              -> handshake (httparse, refusals of §1, limits)
//!              -> session: auth_required -> authenticate -> subscribe
//! ```
//!
//! Module map: [`protocol`] is sans-IO (frames, HTTP upgrade, messages,
//! session state machine); [`config`] the typed settings; [`auth`] token
//! verification; [`cluster`] Redis: cluster-wide limits and registry; [`ingest`] Kafka -> validated, pre-encoded updates; [`limits`] connection and message limits; [`shard`] the
//! per-core registry, inbox and fan-out; [`conn`] the per-connection driver;
//! [`http`] the HTTP endpoints; [`telemetry`] counters, histograms, logs;
//! [`server`] starts and stops it all.

// `unsafe` is denied everywhere but `sys.rs`, which explains each use.
#![deny(unsafe_code)]

pub mod auth;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod http;
pub mod ingest;
pub mod limits;
pub mod protocol;
pub mod server;
pub mod shard;
mod sys;
pub mod telemetry;
