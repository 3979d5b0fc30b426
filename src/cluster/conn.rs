//! Where Redis is and how to talk to it: one node or Redis Cluster, plain
//! TCP or TLS, with an ACL user.
//!
//! Owns: reading `REDIS_URL` (`redis://`, `rediss://`, `redis+cluster://`,
//! `rediss+cluster://`, a comma list of seed nodes for a cluster),
//! `REDIS_CLUSTER` and `REDIS_TLS_CA_FILE` into a client; connecting with
//! the configured timeouts; sending a batch of commands (one pipeline on one
//! node; split by node on a cluster, each command to its slot's primary);
//! and keeping the URL's password out of every text it hands out.
//!
//! Must not: pick key names (`mod.rs` and `sync.rs` do, with hash tags so
//! that every multi-key command and script stays within one slot).

use std::time::Duration;

use redis::{Cmd, ConnectionLike, RedisResult, Value};

use super::ClusterError;
use crate::config::Config;

/// A Redis deployment: one node, or a cluster reached through seed nodes.
#[derive(Clone)]
pub(crate) struct Target {
    client: Client,
    /// The URL passwords, scrubbed from errors.
    secrets: Vec<String>,
    /// `redis`, `rediss`, `redis+cluster`, `rediss+cluster`: for logs and `/health`.
    pub mode: &'static str,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it holds the password.
        f.debug_struct("Target").field("mode", &self.mode).finish_non_exhaustive()
    }
}

#[derive(Clone)]
enum Client {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

/// An open connection to a [`Target`].
pub(crate) enum Con {
    Single(redis::Connection),
    // Boxed: one per worker thread, and the enum stays small.
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl Target {
    pub fn from_config(cfg: &Config, url: &str, timeout: Duration) -> Result<Target, ClusterError> {
        let mut cluster = cfg.redis_cluster;
        let mut tls = None;
        let mut urls = Vec::new();
        let mut secrets = Vec::new();
        for raw in url.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let (scheme, rest) = raw
                .split_once("://")
                .ok_or_else(|| ClusterError("REDIS_URL: expected redis://, rediss:// or redis+cluster://".into()))?;
            let (scheme, is_cluster) = match scheme {
                "redis" | "rediss" => (scheme, false),
                "redis+cluster" => ("redis", true),
                "rediss+cluster" => ("rediss", true),
                other => {
                    return Err(ClusterError(format!(
                        "REDIS_URL: unsupported scheme {other}:// (redis, rediss, redis+cluster, rediss+cluster)"
                    )))
                }
            };
            cluster |= is_cluster;
            let secure = scheme == "rediss";
            if tls.replace(secure).is_some_and(|t| t != secure) {
                return Err(ClusterError("REDIS_URL: every node must use the same scheme (TLS or not)".into()));
            }
            if rest.contains("#insecure") {
                return Err(ClusterError(
                    "REDIS_URL: #insecure (no certificate check) is not supported; give the CA with REDIS_TLS_CA_FILE"
                        .into(),
                ));
            }
            if let Some(password) = password_of(rest) {
                secrets.push(password.to_owned());
                if let Some(decoded) = percent_decode(password) {
                    secrets.push(decoded);
                }
            }
            urls.push(format!("{scheme}://{rest}"));
        }
        if urls.is_empty() {
            return Err(ClusterError("REDIS_URL: empty".into()));
        }
        if urls.len() > 1 && !cluster {
            return Err(ClusterError(
                "REDIS_URL: several URLs are seed nodes of a Redis Cluster: set REDIS_CLUSTER=true or use redis+cluster://"
                    .into(),
            ));
        }
        let tls = tls == Some(true);
        let certs = match &cfg.redis_tls_ca_file {
            None => None,
            Some(_) if !tls => {
                return Err(ClusterError("REDIS_TLS_CA_FILE is set but REDIS_URL is not rediss://".into()));
            }
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| ClusterError(format!("REDIS_TLS_CA_FILE {path}: {e}")))?;
                Some(redis::TlsCertificates { client_tls: None, root_cert: Some(pem) })
            }
        };
        let mode = match (cluster, tls) {
            (false, false) => "redis",
            (false, true) => "rediss",
            (true, false) => "redis+cluster",
            (true, true) => "rediss+cluster",
        };
        let client = if cluster {
            let mut builder = redis::cluster::ClusterClient::builder(urls.iter().map(String::as_str))
                .connection_timeout(connect_timeout(timeout))
                .response_timeout(timeout * 10)
                // Redirections and a failover's refresh; a longer wait is an
                // outage, which the workers ride out by reconnecting.
                .retries(3)
                .min_retry_wait(10)
                .max_retry_wait(200);
            if let Some(certs) = certs {
                builder = builder.certs(certs);
            }
            builder.build().map(Client::Cluster)
        } else {
            match certs {
                Some(certs) => redis::Client::build_with_tls(urls[0].as_str(), certs),
                None => redis::Client::open(urls[0].as_str()),
            }
            .map(Client::Single)
        };
        let client = client.map_err(|e| ClusterError(format!("REDIS_URL: {}", redact(&secrets, &e.to_string()))))?;
        Ok(Target { client, secrets, mode })
    }

    /// Opens a connection (a cluster connection learns the slots from a
    /// seed node and connects to each primary).
    pub fn connect(&self, timeout: Duration) -> RedisResult<Con> {
        match &self.client {
            Client::Single(client) => {
                let con = client.get_connection_with_timeout(connect_timeout(timeout))?;
                con.set_read_timeout(Some(timeout * 10))?;
                con.set_write_timeout(Some(timeout * 10))?;
                Ok(Con::Single(con))
            }
            Client::Cluster(client) => client.get_connection().map(|c| Con::Cluster(Box::new(c))),
        }
    }

    /// `text` with the URL's password replaced by `***`.
    pub fn redact(&self, text: &str) -> String {
        redact(&self.secrets, text)
    }
}

/// How long a worker may take to connect: a TLS handshake and the ACL
/// login take more round trips than the per-IP answer's budget
/// (REDIS_TIMEOUT_MS, which still bounds what a new connection waits:
/// the workers connect in the background).
fn connect_timeout(timeout: Duration) -> Duration {
    (timeout * 10).max(Duration::from_secs(1))
}

fn redact(secrets: &[String], text: &str) -> String {
    let mut out = text.to_owned();
    for s in secrets {
        if !s.is_empty() && out.contains(s.as_str()) {
            out = out.replace(s.as_str(), "***");
        }
    }
    out
}

impl Con {
    /// The connection for a single command or a script (a cluster routes
    /// it by its first key).
    pub fn like(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Con::Single(c) => c,
            Con::Cluster(c) => c.as_mut(),
        }
    }

    /// Runs `cmds` (not as a transaction) and returns every reply, in
    /// order: one pipeline on one node; on a cluster, each command goes to
    /// the primary of its key's slot, one pipeline per node.
    pub fn batch(&mut self, cmds: Vec<Cmd>) -> RedisResult<Vec<Value>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Con::Single(c) => {
                let mut pipe = redis::pipe();
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
                pipe.query(c)
            }
            Con::Cluster(c) => {
                let mut pipe = redis::cluster::cluster_pipe();
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
                pipe.query(c.as_mut())
            }
        }
    }
}

/// The password of `user:password@host...` (after the scheme), if any.
fn password_of(rest: &str) -> Option<&str> {
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let (userinfo, _) = authority.rsplit_once('@')?;
    match userinfo.split_once(':') {
        Some((_, password)) => Some(password),
        None => Some(userinfo), // `redis://password@host` is read as a password too
    }
    .filter(|p| !p.is_empty())
}

/// `%XX` decoded, when the text has any.
fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return None;
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn target(env: &[(&str, &str)]) -> Result<Target, String> {
        let map: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let cfg = Config::from_sources(["moonx-ws"], |k| map.get(k).cloned()).unwrap();
        Target::from_config(&cfg, cfg.redis_url.as_deref().unwrap(), Duration::from_millis(100)).map_err(|e| e.0)
    }

    #[test]
    fn url_forms() {
        assert_eq!(target(&[("REDIS_URL", "redis://127.0.0.1:6379/")]).unwrap().mode, "redis");
        assert_eq!(target(&[("REDIS_URL", "rediss://u:p@cache.example:6380/0")]).unwrap().mode, "rediss");
        assert_eq!(target(&[("REDIS_URL", "redis+cluster://10.0.0.1:6379")]).unwrap().mode, "redis+cluster");
        assert_eq!(
            target(&[("REDIS_URL", "rediss://a:6379,rediss://b:6379"), ("REDIS_CLUSTER", "true")]).unwrap().mode,
            "rediss+cluster"
        );
        let err = target(&[("REDIS_URL", "redis://a:1,redis://b:2")]).unwrap_err();
        assert!(err.contains("REDIS_CLUSTER"), "{err}");
        let err = target(&[("REDIS_URL", "rediss://a:1,redis://b:2"), ("REDIS_CLUSTER", "true")]).unwrap_err();
        assert!(err.contains("same scheme"), "{err}");
        let err = target(&[("REDIS_URL", "memcached://a:1")]).unwrap_err();
        assert!(err.contains("unsupported scheme"), "{err}");
        let err = target(&[("REDIS_URL", "redis://a:1"), ("REDIS_TLS_CA_FILE", "/x.pem")]).unwrap_err();
        assert!(err.contains("not rediss://"), "{err}");
        let err = target(&[("REDIS_URL", "rediss://a:1"), ("REDIS_TLS_CA_FILE", "/nonexistent/ca.pem")]).unwrap_err();
        assert!(err.contains("REDIS_TLS_CA_FILE /nonexistent/ca.pem"), "{err}");
        let err = target(&[("REDIS_URL", "rediss://a:1/#insecure")]).unwrap_err();
        assert!(err.contains("insecure"), "{err}");
    }

    #[test]
    fn the_password_is_scrubbed() {
        let t = target(&[("REDIS_URL", "rediss://svc:p%40ss-w0rd@cache.example:6380/")]).unwrap();
        assert_eq!(t.redact("auth p%40ss-w0rd / p@ss-w0rd failed"), "auth *** / *** failed");
        let t = target(&[("REDIS_URL", "redis://:only-pass@cache.example:6379/")]).unwrap();
        assert_eq!(t.redact("only-pass"), "***");
        assert_eq!(password_of("host:6379/0"), None);
        assert_eq!(password_of("user@host:6379"), Some("user"));
    }
}
