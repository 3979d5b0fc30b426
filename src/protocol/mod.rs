//! The sans-IO protocol: bytes in, decisions and bytes out.
//!
//! Nothing here does I/O, spawns tasks or reads a clock; the drivers in
//! `conn/` and `ingest/` call these parsers and state machines, and so do the
//! unit tests, benches and fuzz targets.

pub mod channel;
pub mod close;
pub mod frame;
pub mod handshake;
pub mod link;
pub mod message;
pub mod session;

pub use close::CloseCode;
