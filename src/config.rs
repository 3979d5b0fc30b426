//! Typed settings, parsed once at start.
//!
//! Owns: every environment variable of the seed and of PROTOCOL.md, their
//! defaults and units. Sources, lowest to highest priority: built-in
//! defaults, an optional `.env` file (loaded by `main`), the environment,
//! CLI flags. Each field is named after its environment variable, so a bad
//! value's error names the variable. Tests pass a map through
//! [`Config::from_sources`] instead of the process environment.

use std::net::IpAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser};
use ipnet::IpNet;

/// moonx-ws: streams price, order, portfolio and trade updates from Kafka to
/// WebSocket clients. Every flag can also be set by the environment variable
/// shown with it (or in a `.env` file); flags win over the environment.
#[derive(Debug, Clone, Parser)]
#[command(name = "moonx-ws", version, about, long_about = None)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "WEBSOCKET_SERVICE_HOST", default_value = "0.0.0.0")]
    pub websocket_service_host: IpAddr,
    /// Port for WebSocket upgrades (GET /ws) and the HTTP endpoints; 0 picks a free one.
    #[arg(long, env = "WEBSOCKET_SERVICE_PORT", default_value_t = 3008)]
    pub websocket_service_port: u16,
    /// Executors (one per core, each owning its connections). Default: available cores.
    #[arg(long, env = "WS_SHARDS")]
    pub ws_shards: Option<NonZeroUsize>,
    /// Start even when another process already listens on the port, and
    /// share it (SO_REUSEPORT): for a restart without refusing connections
    /// (start the new process, then SIGTERM the old one). Off: a port in use
    /// is an error at start, so a stray second instance cannot silently take
    /// part of the connections.
    #[arg(long, env = "WS_SHARE_PORT", default_value_t = false, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub ws_share_port: bool,

    /// HMAC secret for HS256/384/512 tokens (local verification).
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM public key (or a path to one) for RS256 / ES256 tokens.
    #[arg(long, env = "JWT_PUBLIC_KEY", hide_env_values = true)]
    pub jwt_public_key: Option<String>,
    /// Required `iss` claim, when set.
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim, when set.
    #[arg(long, env = "JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Clock skew allowed on exp/nbf, in seconds.
    #[arg(long, env = "JWT_LEEWAY_SECONDS", default_value = "30", value_parser = parse_secs)]
    pub jwt_leeway_seconds: Duration,
    /// Remote Auth Service base URL (used when no local key is set).
    #[arg(long, env = "AUTH_SERVICE_URL")]
    pub auth_service_url: Option<String>,
    /// Path of the Auth Service's verify endpoint.
    #[arg(long, env = "AUTH_SERVICE_VERIFY_ENDPOINT", default_value = "/api/v1/auth/verify")]
    pub auth_service_verify_endpoint: String,
    /// Auth Service request timeout, in ms.
    #[arg(long, env = "AUTH_SERVICE_TIMEOUT_MS", default_value = "3000", value_parser = parse_ms)]
    pub auth_service_timeout_ms: Duration,
    /// Auth Service requests in flight at once (worker threads).
    #[arg(long, env = "AUTH_SERVICE_CONCURRENCY", default_value = "16")]
    pub auth_service_concurrency: NonZeroUsize,
    /// Time a new connection has to authenticate, in ms.
    #[arg(long, env = "AUTH_TIMEOUT_MS", default_value = "10000", value_parser = parse_ms)]
    pub auth_timeout_ms: Duration,

    /// Redis URL for cluster-wide limits and the connection registry (unset:
    /// local only): `redis://` or `rediss://` (TLS), with an ACL user and
    /// password as `rediss://user:password@host:6379/`; `redis+cluster://`
    /// or `rediss+cluster://` (or REDIS_CLUSTER=true) for Redis Cluster,
    /// where a comma list of node URLs gives several seed nodes.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Talk to Redis Cluster (slot routing, failover) instead of one node.
    #[arg(long, env = "REDIS_CLUSTER", default_value_t = false, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub redis_cluster: bool,
    /// PEM file of the CA certificate(s) that sign Redis' TLS certificate
    /// (a private CA); unset: the system's trust store.
    #[arg(long, env = "REDIS_TLS_CA_FILE")]
    pub redis_tls_ca_file: Option<String>,
    /// Prefix of every Redis key this service writes.
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "moonx:ws:")]
    pub redis_key_prefix: String,
    /// Longest a new connection waits for Redis' per-IP answer, in ms
    /// (then the local count decides).
    #[arg(long, env = "REDIS_TIMEOUT_MS", default_value = "100", value_parser = parse_ms)]
    pub redis_timeout_ms: Duration,
    /// How often message counts and the registry are reconciled with Redis, in ms.
    #[arg(long, env = "REDIS_SYNC_INTERVAL_MS", default_value = "1000", value_parser = parse_ms)]
    pub redis_sync_interval_ms: Duration,

    /// Kafka bootstrap servers (unset: an embedded broker on loopback).
    #[arg(long, env = "KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    /// Base of the consumer group id (made unique per instance).
    #[arg(long, env = "KAFKA_CONSUMER_GROUP_ID", default_value = "websocket-consumers")]
    pub kafka_consumer_group_id: String,
    #[arg(long, env = "KAFKA_TOPIC_PRICES", default_value = "price.updates")]
    pub kafka_topic_prices: String,
    #[arg(long, env = "KAFKA_TOPIC_ORDERS", default_value = "order.updates")]
    pub kafka_topic_orders: String,
    #[arg(long, env = "KAFKA_TOPIC_PORTFOLIO", default_value = "portfolio.updates")]
    pub kafka_topic_portfolio: String,
    #[arg(long, env = "KAFKA_TOPIC_TRADES", default_value = "trade.updates")]
    pub kafka_topic_trades: String,
    /// Consumer fetch.max.bytes.
    #[arg(long, env = "KAFKA_CONSUMER_FETCH_MAX_BYTES", default_value_t = 1_048_576)]
    pub kafka_consumer_fetch_max_bytes: u32,
    /// Consumer max.partition.fetch.bytes.
    #[arg(long, env = "KAFKA_CONSUMER_MAX_PARTITION_FETCH_BYTES", default_value_t = 1_048_576)]
    pub kafka_consumer_max_partition_fetch_bytes: u32,
    /// Messages handed to the shards per ingest batch.
    #[arg(long, env = "KAFKA_CONSUMER_BATCH_SIZE", default_value = "100")]
    pub kafka_consumer_batch_size: NonZeroUsize,
    /// How often topic metadata is re-read to find new topics and
    /// partitions, in ms (a topic missing at start is looked for every
    /// 500 ms until it appears).
    #[arg(long, env = "KAFKA_TOPIC_REFRESH_MS", default_value = "10000", value_parser = parse_ms)]
    pub kafka_topic_refresh_ms: Duration,
    /// How far back, in ms, the prices topic is read on start for the
    /// markets' last values (snapshots), before the instance turns ready.
    /// 0: no read-back (markets have no snapshot until they tick).
    #[arg(long, env = "KAFKA_SNAPSHOT_LOOKBACK_MS", default_value = "86400000", value_parser = parse_ms_or_zero)]
    pub kafka_snapshot_lookback_ms: Duration,
    /// Most messages read back per prices partition on start (the newest).
    #[arg(long, env = "KAFKA_SNAPSHOT_MAX_MESSAGES", default_value = "1000000")]
    pub kafka_snapshot_max_messages: u32,
    /// Consumer fetch.wait.max.ms (how long a broker may hold an empty fetch).
    #[arg(long, env = "KAFKA_FETCH_WAIT_MAX_MS", default_value = "100", value_parser = parse_ms_or_zero)]
    pub kafka_fetch_wait_max_ms: Duration,
    /// How the Kafka clients reach the brokers: PLAINTEXT, SSL, SASL_PLAINTEXT
    /// or SASL_SSL (librdkafka's security.protocol).
    #[arg(long, env = "KAFKA_SECURITY_PROTOCOL", default_value = "PLAINTEXT", ignore_case = true,
          value_parser = ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"])]
    pub kafka_security_protocol: String,
    /// SASL mechanism with a SASL_* protocol: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
    #[arg(long, env = "KAFKA_SASL_MECHANISM", default_value = "PLAIN", ignore_case = true,
          value_parser = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])]
    pub kafka_sasl_mechanism: String,
    /// SASL user name (an API key on Confluent Cloud).
    #[arg(long, env = "KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,
    /// SASL password (an API secret on Confluent Cloud). Never logged.
    #[arg(long, env = "KAFKA_SASL_PASSWORD", hide_env_values = true)]
    pub kafka_sasl_password: Option<Secret>,
    /// CA certificate(s) that sign the brokers' certificates: a PEM file or a
    /// directory (unset: the system's trust store, found by probing).
    #[arg(long, env = "KAFKA_SSL_CA_LOCATION")]
    pub kafka_ssl_ca_location: Option<String>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, env = "KAFKA_SSL_CERTIFICATE_LOCATION")]
    pub kafka_ssl_certificate_location: Option<String>,
    /// Client private key (PEM) for mutual TLS.
    #[arg(long, env = "KAFKA_SSL_KEY_LOCATION")]
    pub kafka_ssl_key_location: Option<String>,
    /// Passphrase of the client private key. Never logged.
    #[arg(long, env = "KAFKA_SSL_KEY_PASSWORD", hide_env_values = true)]
    pub kafka_ssl_key_password: Option<Secret>,
    /// Any other librdkafka property for every Kafka client of the service,
    /// as property=value (repeatable). From the environment:
    /// `KAFKA_CONFIG_<PROPERTY>` with dots as `_` and `_` as `__`, e.g.
    /// KAFKA_CONFIG_SOCKET_KEEPALIVE_ENABLE=true. Values are never logged.
    #[arg(long = "kafka-config", value_name = "PROPERTY=VALUE", value_parser = parse_property)]
    pub kafka_config: Vec<(String, String)>,
    /// Produce demo price ticks into the embedded broker (default: on when
    /// KAFKA_BROKERS is unset; ignored otherwise).
    #[arg(long, env = "DEMO_FEED", num_args = 0..=1, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub demo_feed: Option<bool>,

    /// Turns the connection and message limits on or off.
    #[arg(long, env = "RATE_LIMIT_ENABLED", default_value_t = true, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub rate_limit_enabled: bool,
    /// Open WebSocket connections allowed per client IP.
    #[arg(long, env = "RATE_LIMIT_MAX_CONNECTIONS_PER_IP", default_value = "100")]
    pub rate_limit_max_connections_per_ip: NonZeroU32,
    /// Client messages per user (per connection before auth) per 60 s window.
    #[arg(long, env = "RATE_LIMIT_MAX_MESSAGES_PER_MINUTE", default_value = "120")]
    pub rate_limit_max_messages_per_minute: NonZeroU32,

    /// Interval between server ping frames, in ms.
    #[arg(long, env = "WS_PING_INTERVAL", default_value = "30000", value_parser = parse_ms)]
    pub ws_ping_interval: Duration,
    /// Time allowed for any frame after a ping before the socket is dropped, in ms.
    #[arg(long, env = "WS_PONG_TIMEOUT", default_value = "5000", value_parser = parse_ms)]
    pub ws_pong_timeout: Duration,
    /// WebSocket connections this instance holds at most (503 beyond).
    #[arg(long, env = "WS_MAX_CONNECTIONS", default_value = "10000")]
    pub ws_max_connections: NonZeroUsize,
    /// How often connection records are refreshed in Redis, in ms.
    #[arg(long, env = "WS_HEARTBEAT_INTERVAL", default_value = "60000", value_parser = parse_ms)]
    pub ws_heartbeat_interval: Duration,
    /// Largest client frame or message, in bytes (close 1009 beyond).
    #[arg(long, env = "WS_MAX_MESSAGE_BYTES", default_value = "16384")]
    pub ws_max_message_bytes: NonZeroUsize,
    /// Most frames one fragmented client message may span (close 1009 beyond).
    #[arg(long, env = "WS_MAX_FRAGMENTS", default_value = "64")]
    pub ws_max_fragments: NonZeroU32,
    /// Subscriptions allowed per connection (every channel counts, market
    /// and chain channels included).
    #[arg(long, env = "WS_MAX_SUBSCRIPTIONS", default_value = "256")]
    pub ws_max_subscriptions: NonZeroU32,
    /// Markets whose last price update is kept for snapshots; past this the
    /// least recently updated market loses its value (counted).
    #[arg(long, env = "WS_MAX_MARKETS", default_value = "100000")]
    pub ws_max_markets: NonZeroUsize,
    /// Most updates one resume (`subscribe` with `since`) replays; past
    /// this it answers `recovered: false`.
    #[arg(long, env = "WS_RECOVERY_MAX_MESSAGES", default_value = "10000")]
    pub ws_recovery_max_messages: NonZeroUsize,
    /// Time a resume's replay may take, in ms; past this it answers
    /// `recovered: false`.
    #[arg(long, env = "WS_RECOVERY_TIMEOUT_MS", default_value = "5000", value_parser = parse_ms)]
    pub ws_recovery_timeout_ms: Duration,
    /// Kafka partitions read for replays at a time (each scan serves every
    /// resume waiting on its partition).
    #[arg(long, env = "WS_RECOVERY_CONCURRENCY", default_value = "4")]
    pub ws_recovery_concurrency: NonZeroUsize,
    /// Memory kept of what replay scans read, in bytes, over all
    /// partitions: a later resume in that range is served from it and
    /// Kafka is not read twice (oldest first beyond; 0: keep nothing).
    #[arg(long, env = "WS_RECOVERY_WINDOW_BYTES", default_value = "67108864")]
    pub ws_recovery_window_bytes: usize,
    /// Most snapshot frames one `prices:<chainId>` or `prices` subscription
    /// with `"snapshot": true` is sent (newest markets first).
    #[arg(long, env = "WS_SNAPSHOT_MAX_MARKETS", default_value = "1000")]
    pub ws_snapshot_max_markets: NonZeroUsize,
    /// Unsent output after which a connection is a slow consumer (close 4009), in bytes (at most 1 GiB).
    #[arg(long, env = "WS_MAX_BUFFERED_BYTES", default_value = "1048576", value_parser = parse_buffer_limit)]
    pub ws_max_buffered_bytes: NonZeroUsize,
    /// Time a client has to send its complete request head, in ms.
    #[arg(long, env = "WS_HANDSHAKE_TIMEOUT_MS", default_value = "5000", value_parser = parse_ms)]
    pub ws_handshake_timeout_ms: Duration,
    /// Idle time after which a connection is parked, in ms: its task and
    /// read state are freed and its socket is watched by the shard's poll
    /// ring until input, a deadline or a write needs it. 0: never park.
    #[arg(long, env = "WS_PARK_IDLE_MS", default_value = "1000", value_parser = parse_ms_or_zero)]
    pub ws_park_idle_ms: Duration,
    /// Write coalescing under saturation, in ms: when a shard's sweeps over
    /// its sockets fill the core, the next sweep waits so more frames share
    /// each socket write (CPU per delivery falls; latency rises by up to
    /// this). The wait starts at a quarter of this and stretches toward it
    /// as sweeps get costlier, keeping them near two thirds of the core.
    /// Below saturation nothing waits. 0: never wait.
    #[arg(long, env = "WS_COALESCE_MAX_MS", default_value = "160", value_parser = parse_ms_or_zero)]
    pub ws_coalesce_max_ms: Duration,
    /// Bench A/B only: a sweep starts at most once per this interval, in
    /// µs, saturated or not (`perf/flush-curve.sh`). 0: no fixed interval.
    #[arg(long, env = "WS_BENCH_FLUSH_INTERVAL_US", default_value = "0", value_parser = parse_us, hide = true)]
    pub ws_bench_flush_interval_us: Duration,
    /// Bench A/B only: the share of the core saturated sweeps may take, in
    /// percent (100: the wait never stretches; `perf/floor.sh`, `perf/split.sh`).
    #[arg(long, env = "WS_BENCH_SWEEP_SHARE_PCT", default_value_t = 65, hide = true,
          value_parser = clap::value_parser!(u8).range(1..=100))]
    pub ws_bench_sweep_share_pct: u8,
    /// Updates each shard's inbox holds before the oldest is dropped (and counted).
    #[arg(long, env = "WS_SHARD_QUEUE_CAPACITY", default_value = "65536")]
    pub ws_shard_queue_capacity: NonZeroUsize,

    /// Browser origins allowed to connect (comma list; unset: any).
    #[arg(long, env = "ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Client IPs or CIDRs allowed to connect (comma list; unset: any).
    #[arg(long, env = "IP_WHITELIST", value_delimiter = ',', value_parser = parse_net)]
    pub ip_whitelist: Vec<IpNet>,
    /// Proxies whose X-Forwarded-For is honoured (IPs or CIDRs, comma list).
    #[arg(long, env = "TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_net)]
    pub trusted_proxies: Vec<IpNet>,

    /// TLS certificate chain (PEM) for wss://.
    #[arg(long, env = "TLS_CERT_FILE")]
    pub tls_cert_file: Option<String>,
    /// TLS private key (PEM) for wss://.
    #[arg(long, env = "TLS_KEY_FILE")]
    pub tls_key_file: Option<String>,

    /// Time allowed for close handshakes on shutdown, in ms.
    #[arg(long, env = "SHUTDOWN_GRACE_MS", default_value = "5000", value_parser = parse_ms)]
    pub shutdown_grace_ms: Duration,
    /// On shutdown each client is told to reconnect after a random delay
    /// below this (the 1001 close reason's `retryAfterMs`; a 503's
    /// `Retry-After`), so thousands do not reconnect at once; in ms, 0: none.
    #[arg(long, env = "SHUTDOWN_RECONNECT_SPREAD_MS", default_value = "5000", value_parser = parse_ms_or_zero)]
    pub shutdown_reconnect_spread_ms: Duration,
    /// Log format: pretty (coloured on a terminal only) or json (one object per line).
    #[arg(long, env = "LOG_FORMAT", default_value = "pretty", value_enum)]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax, e.g. info or moonx_ws=debug).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// `LOG_FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: u64 = s.trim().parse().map_err(|e| format!("expected seconds: {e}"))?;
    Ok(Duration::from_secs(secs))
}

/// A setting that must never be shown: its `Debug` and `Display` print
/// `***` (read it with [`Secret::expose`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// The prefix of the environment variables that pass librdkafka properties.
pub const KAFKA_CONFIG_PREFIX: &str = "KAFKA_CONFIG_";

/// `KAFKA_CONFIG_SOCKET_KEEPALIVE_ENABLE` -> `socket.keepalive.enable`:
/// lower case, `__` stands for `_` (`LOG__LEVEL` -> `log_level`), `_` for `.`.
pub fn kafka_property_of(var: &str) -> Option<String> {
    let rest = var.strip_prefix(KAFKA_CONFIG_PREFIX)?;
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return None;
    }
    let name = rest.to_ascii_lowercase().split("__").map(|part| part.replace('_', ".")).collect::<Vec<_>>().join("_");
    (!name.starts_with('.') && !name.ends_with('.') && !name.contains("..")).then_some(name)
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err("expected PROPERTY=VALUE (a librdkafka property)".into()),
    }
}

fn parse_ms(s: &str) -> Result<Duration, String> {
    let ms: u64 = s.trim().parse().map_err(|e| format!("expected milliseconds: {e}"))?;
    if ms == 0 {
        return Err("must be greater than 0".into());
    }
    Ok(Duration::from_millis(ms))
}

fn parse_ms_or_zero(s: &str) -> Result<Duration, String> {
    let ms: u64 = s.trim().parse().map_err(|e| format!("expected milliseconds: {e}"))?;
    Ok(Duration::from_millis(ms))
}

/// A connection's output limit: its slot counts bytes in 32 bits.
fn parse_buffer_limit(s: &str) -> Result<NonZeroUsize, String> {
    let n: NonZeroUsize = s.trim().parse().map_err(|e| format!("expected a byte count above 0: {e}"))?;
    if n.get() > 1 << 30 {
        return Err("must be at most 1073741824 (1 GiB)".into());
    }
    Ok(n)
}

fn parse_us(s: &str) -> Result<Duration, String> {
    let us: u64 = s.trim().parse().map_err(|e| format!("expected microseconds: {e}"))?;
    Ok(Duration::from_micros(us))
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("expected an IP address or CIDR, got {s:?}"))
}

impl Config {
    /// Parses settings from `args` (the first is the program name) and a
    /// lookup standing for the environment. Flags win over the lookup.
    pub fn from_sources<I, S>(args: I, env: impl Fn(&str) -> Option<String>) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::from_sources_with(args, env, std::iter::empty())
    }

    /// [`Config::from_sources`], where `names` lists the variables the
    /// lookup holds, so that `KAFKA_CONFIG_*` (named by the operator, not
    /// by this file) can be found: the process environment's names in
    /// `main`, a map's keys in tests.
    pub fn from_sources_with<I, S>(
        args: I,
        env: impl Fn(&str) -> Option<String>,
        names: impl IntoIterator<Item = String>,
    ) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let args: Vec<String> = args.into_iter().map(Into::into).collect();
        if args.iter().skip(1).any(|a| matches!(a.as_str(), "-h" | "--help" | "-V" | "--version")) {
            // Help is printed from the command as declared, env names included.
            return Config::try_parse_from(args);
        }
        let cmd = Config::command().args_override_self(true);
        let mut argv = vec![args.first().cloned().unwrap_or_else(|| "moonx-ws".into())];
        for arg in cmd.get_arguments() {
            let (Some(name), Some(long)) = (arg.get_env(), arg.get_long()) else {
                continue;
            };
            if let Some(value) = name.to_str().and_then(&env) {
                if !value.is_empty() {
                    argv.push(format!("--{long}={value}"));
                }
            }
        }
        // `KAFKA_CONFIG_*` first, so `--kafka-config` flags (later) win.
        let mut vars: Vec<String> = names.into_iter().filter(|n| n.starts_with(KAFKA_CONFIG_PREFIX)).collect();
        vars.sort();
        vars.dedup();
        for var in vars {
            let Some(value) = env(&var) else { continue };
            let Some(property) = kafka_property_of(&var) else {
                let cmd = Config::command();
                return Err(clap::Error::raw(
                    clap::error::ErrorKind::InvalidValue,
                    format!("{var}: not a librdkafka property name (KAFKA_CONFIG_ then the property in capitals, `_` for `.` and `__` for `_`)\n"),
                )
                .with_cmd(&cmd));
            };
            argv.push(format!("--kafka-config={property}={value}"));
        }
        argv.extend(args.into_iter().skip(1));
        let cmd = cmd.mut_args(|a| a.env(None::<&str>));
        let matches = cmd.try_get_matches_from(argv)?;
        Config::from_arg_matches(&matches)
    }

    /// Built-in defaults only (no environment), for tests and benches.
    pub fn defaults() -> Self {
        // The declared defaults all parse; a failure here is a bug in this file.
        Self::from_sources(["moonx-ws"], |_| None).expect("built-in defaults parse")
    }

    /// Shards to run: `WS_SHARDS`, or the cores this process may use.
    pub fn shard_count(&self) -> usize {
        self.ws_shards
            .map(NonZeroUsize::get)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, NonZeroUsize::get))
    }

    /// How tokens are verified: `jwt` (a configured key), `remote` (the
    /// Auth Service) or `dev` (a random secret generated at start: the
    /// quick start's embedded mode, never for production).
    pub fn auth_mode(&self) -> &'static str {
        if self.jwt_secret.is_some() || self.jwt_public_key.is_some() {
            "jwt"
        } else if self.auth_service_url.is_some() {
            "remote"
        } else {
            "dev"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(args: &[&str], env: &[(&str, &str)]) -> Result<Config, clap::Error> {
        let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut argv = vec!["moonx-ws"];
        argv.extend_from_slice(args);
        Config::from_sources(argv, |k| env.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_protocol() {
        let c = Config::defaults();
        assert_eq!(c.websocket_service_port, 3008);
        assert_eq!(c.ws_ping_interval, Duration::from_millis(30_000));
        assert_eq!(c.auth_timeout_ms, Duration::from_millis(10_000));
        assert_eq!(c.ws_max_buffered_bytes.get(), 1 << 20);
        assert_eq!(c.rate_limit_max_messages_per_minute.get(), 120);
        assert!(c.rate_limit_enabled);
        assert_eq!(c.redis_key_prefix, "moonx:ws:");
    }

    #[test]
    fn env_then_flags() {
        let c = parse(
            &["--ws-pong-timeout", "7"],
            &[
                ("WS_PONG_TIMEOUT", "5"),
                ("WEBSOCKET_SERVICE_PORT", "4000"),
                ("IP_WHITELIST", "10.0.0.0/8, 127.0.0.1"),
                ("RATE_LIMIT_ENABLED", "false"),
            ],
        )
        .unwrap();
        assert_eq!(c.ws_pong_timeout, Duration::from_millis(7));
        assert_eq!(c.websocket_service_port, 4000);
        assert_eq!(c.ip_whitelist.len(), 2);
        assert!(!c.rate_limit_enabled);
    }

    #[test]
    fn kafka_config_variables_name_librdkafka_properties() {
        assert_eq!(
            kafka_property_of("KAFKA_CONFIG_SOCKET_KEEPALIVE_ENABLE").as_deref(),
            Some("socket.keepalive.enable")
        );
        assert_eq!(kafka_property_of("KAFKA_CONFIG_LOG__LEVEL").as_deref(), Some("log_level"));
        assert_eq!(kafka_property_of("KAFKA_CONFIG_DEBUG").as_deref(), Some("debug"));
        assert_eq!(kafka_property_of("KAFKA_CONFIG_"), None);
        assert_eq!(kafka_property_of("KAFKA_CONFIG__X"), None);
        assert_eq!(kafka_property_of("KAFKA_CONFIG_A-B"), None);
        assert_eq!(kafka_property_of("KAFKA_BROKERS"), None);
    }

    #[test]
    fn secrets_do_not_print() {
        let c = parse(&[], &[("KAFKA_SASL_PASSWORD", "pw-123"), ("KAFKA_SSL_KEY_PASSWORD", "pw-456")]).unwrap();
        assert_eq!(c.kafka_sasl_password.as_ref().map(Secret::expose), Some("pw-123"));
        let shown = format!("{c:?}");
        assert!(!shown.contains("pw-123") && !shown.contains("pw-456"), "{shown}");
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        let err = parse(&[], &[("WS_PING_INTERVAL", "soon")]).unwrap_err().to_string();
        assert!(err.contains("WS_PING_INTERVAL"), "{err}");
        let err = parse(&[], &[("TRUSTED_PROXIES", "nope")]).unwrap_err().to_string();
        assert!(err.contains("TRUSTED_PROXIES"), "{err}");
        let err = parse(&[], &[("WS_MAX_BUFFERED_BYTES", "2147483648")]).unwrap_err().to_string();
        assert!(err.contains("WS_MAX_BUFFERED_BYTES") && err.contains("1 GiB"), "{err}");
        assert_eq!(
            parse(&[], &[("WS_MAX_BUFFERED_BYTES", "1073741824")]).unwrap().ws_max_buffered_bytes.get(),
            1 << 30
        );
    }
}
