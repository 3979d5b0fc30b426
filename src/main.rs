//! The `moonx-ws` binary: config -> logging -> server; waits for SIGTERM or
//! SIGINT, then runs the graceful shutdown of PROTOCOL.md §10 and exits 0.

use mimalloc::MiMalloc;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

use moonx_ws::config::Config;

fn main() -> anyhow::Result<()> {
    // Before the allocator maps much: see `sys::disable_transparent_huge_pages`.
    let thp = moonx_ws::server::disable_transparent_huge_pages();
    let _ = dotenvy::dotenv();
    let names = std::env::vars_os().filter_map(|(k, _)| k.into_string().ok());
    let config = match Config::from_sources_with(std::env::args(), |k| std::env::var(k).ok(), names) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    moonx_ws::telemetry::init_logging(config.log_format, &config.log_level);
    if let Err(e) = thp {
        tracing::debug!(error = %e, "could not opt out of transparent huge pages");
    }
    // Installed before anything listens, so an early SIGTERM is a graceful stop too.
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let server = moonx_ws::server::start(config)?;
    let addr = server.local_addr();
    if let Some(dev) = server.dev_token() {
        tracing::info!(
            user = %dev.user_id,
            token = %dev.token,
            "embedded auth: no JWT_SECRET, JWT_PUBLIC_KEY or AUTH_SERVICE_URL set, so a random dev secret was generated; this token is valid for 24 h"
        );
        tracing::info!(
            "try it: cargo run --release --example wsclient -- ws://{}/ws --token {} --subscribe prices",
            display_addr(addr),
            dev.token
        );
    }
    for sig in signals.forever() {
        if sig == SIGHUP {
            match server.reload_tls() {
                Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded (when configured)"),
                Err(e) => tracing::error!(error = %e, "SIGHUP: TLS reload failed; keeping the previous certificate"),
            }
            continue;
        }
        tracing::info!(signal = sig, "shutdown requested");
        break;
    }
    server.shutdown();
    server.join();
    tracing::info!("stopped");
    Ok(())
}

fn display_addr(addr: std::net::SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    }
}
