//! Redis for a test: real `redis-server` processes on free loopback ports,
//! owned by the test and killed when it ends: one node (optionally with a
//! TLS port, certificates generated here), or a Redis Cluster of three
//! primaries with a replica each, joined by `redis-cli --cluster create`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Polls `f` every 20 ms until it is true or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// A free port below the ephemeral range, so that no outgoing connection
/// takes it before redis-server binds it.
fn free_port() -> u16 {
    super::server_port()
}

/// A CA and a certificate it signed for `localhost` / 127.0.0.1, as PEM
/// files in a fresh directory.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A client certificate the CA signed, for mutual TLS.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let dir = super::test_file(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let cert = params.signed_by(&key, &*ca).unwrap();
        let client_key = KeyPair::generate().unwrap();
        let mut client_params = CertificateParams::new(vec!["moonx-ws".to_string()]).unwrap();
        client_params.distinguished_name.push(DnType::CommonName, "moonx-ws");
        let client = client_params.signed_by(&client_key, &*ca).unwrap();
        let pki = Pki {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
            dir,
        };
        std::fs::write(&pki.ca, ca.pem()).unwrap();
        std::fs::write(&pki.cert, cert.pem()).unwrap();
        std::fs::write(&pki.key, key.serialize_pem()).unwrap();
        std::fs::write(&pki.client_cert, client.pem()).unwrap();
        std::fs::write(&pki.client_key, client_key.serialize_pem()).unwrap();
        pki
    }

    pub fn path(p: &Path) -> &str {
        p.to_str().unwrap()
    }
}

/// One `redis-server`: plain port, and a TLS port when started with a [`Pki`].
pub struct Redis {
    pub port: u16,
    pub tls_port: Option<u16>,
    args: Vec<String>,
    child: Option<Child>,
}

/// The ports one start attempt of a node listens on.
pub struct Ports {
    pub port: u16,
    pub tls: u16,
    pub bus: u16,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_with(|_| Vec::new())
    }

    /// Also listens with TLS (`--tls-port`) on the certificate of `pki`;
    /// clients need no certificate of their own.
    pub fn start_tls(pki: &Pki) -> Redis {
        Self::start_with(|p| {
            [
                "--tls-port",
                &p.tls.to_string(),
                "--tls-cert-file",
                Pki::path(&pki.cert),
                "--tls-key-file",
                Pki::path(&pki.key),
                "--tls-ca-cert-file",
                Pki::path(&pki.ca),
                "--tls-auth-clients",
                "no",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        })
    }

    /// A node with the arguments `extra` gives for its ports. It starts on
    /// fresh free ports, and again on others when it exits at start: a port
    /// found free can still be taken before redis-server binds it.
    pub fn start_with(extra: impl Fn(&Ports) -> Vec<String>) -> Redis {
        const ATTEMPTS: usize = 5;
        let mut last = String::new();
        for _ in 0..ATTEMPTS {
            let ports = Ports { port: free_port(), tls: free_port(), bus: free_port() };
            let mut args: Vec<String> =
                ["--port", &ports.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
            let extra = extra(&ports);
            let tls_port = extra.iter().any(|a| a == "--tls-port").then_some(ports.tls);
            args.extend(extra);
            let mut r = Redis { port: ports.port, tls_port, args, child: None };
            match r.try_spawn() {
                Ok(()) => return r,
                Err(log) => last = log,
            }
        }
        panic!("redis-server exited at start {ATTEMPTS} times, on fresh ports each time; the last said:\n{last}");
    }

    /// Starts (or restarts, on the same ports) this node's process.
    pub fn spawn(&mut self) {
        if let Err(log) = self.try_spawn() {
            panic!("redis-server exited at start on port {}:\n{log}", self.port);
        }
    }

    /// Starts the process and waits until it answers PING as itself (its
    /// `process_id`, not another server's on the same port): `Err` with
    /// the end of its log when it exits first (it could not bind a port).
    fn try_spawn(&mut self) -> Result<(), String> {
        let log_path = super::test_file("redis-server.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("redis-server on PATH (tools/test.sh installs it)");
        let pid = child.id().to_string();
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        let mut exited = false;
        let answered = wait_until(Duration::from_secs(10), || {
            exited = matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(Some(_))));
            exited
                || client
                    .get_connection_with_timeout(Duration::from_millis(200))
                    .and_then(|mut c| redis::cmd("INFO").arg("server").query::<String>(&mut c))
                    .is_ok_and(|info| info.lines().any(|l| l.trim() == format!("process_id:{pid}")))
        });
        if exited {
            self.child = None;
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            return Err(tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        assert!(answered, "redis-server on port {} neither answered nor exited", self.port);
        Ok(())
    }

    /// The plain port, as the default (all-powerful) user.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id();
        assert!(Command::new("kill").arg(sig).arg(pid.to_string()).status().unwrap().success());
    }

    pub fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        let client = redis::Client::open(self.url()).unwrap();
        let mut c = client.get_connection_with_timeout(Duration::from_secs(2)).unwrap();
        cmd.query(&mut c).unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").arg("-CONT").arg(c.id().to_string()).status();
        }
        self.kill();
    }
}

/// A Redis Cluster on loopback: three primaries, one replica each (six
/// `redis-server --cluster-enabled yes`), with a 1 s node timeout so a
/// failover takes a few seconds.
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let dir = super::test_file("redis-cluster");
        std::fs::create_dir_all(&dir).unwrap();
        let nodes: Vec<Redis> = (0..6)
            .map(|i| {
                let node_dir = dir.join(format!("node-{i}"));
                std::fs::create_dir_all(&node_dir).unwrap();
                // The bus port is explicit: by default it is the port +
                // 10000, which a free port above 55535 pushes past 65535
                // (redis-server then refuses to start).
                let dir = node_dir.to_str().unwrap().to_string();
                Redis::start_with(|p| {
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-port",
                        &p.bus.to_string(),
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "1000",
                        // A replica takes over however long ago it last
                        // heard from its primary (the test's clock is short).
                        "--cluster-replica-validity-factor",
                        "0",
                        "--dir",
                        &dir,
                    ]
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
                })
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli on PATH (tools/test.sh installs redis-server, which brings it)");
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let cluster = RedisCluster { nodes };
        assert!(
            wait_until(Duration::from_secs(30), || cluster.live().all(|n| {
                let info: String = n.query(redis::cmd("CLUSTER").arg("INFO"));
                info.contains("cluster_state:ok")
            }) && cluster.client().get_connection().is_ok()),
            "the cluster never reached cluster_state:ok"
        );
        cluster
    }

    fn live(&self) -> impl Iterator<Item = &Redis> {
        self.nodes.iter().filter(|n| n.child.is_some())
    }

    /// Every node as a seed, in a `REDIS_URL` of the `redis+cluster://` form.
    pub fn url(&self) -> String {
        self.nodes.iter().map(|n| format!("redis+cluster://127.0.0.1:{}", n.port)).collect::<Vec<_>>().join(",")
    }

    fn client(&self) -> redis::cluster::ClusterClient {
        let seeds: Vec<String> = self.live().map(|n| format!("redis://127.0.0.1:{}/", n.port)).collect();
        redis::cluster::ClusterClient::builder(seeds).retries(10).build().unwrap()
    }

    /// A command routed by its key, as a cluster client sends it.
    pub fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        let mut c = self.client().get_connection().unwrap();
        cmd.query(&mut c).unwrap()
    }

    /// Keys matching `pattern` on every live primary.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut keys: Vec<String> = self
            .live()
            .filter(|n| self.is_primary(n))
            .flat_map(|n| n.query::<Vec<String>>(redis::cmd("KEYS").arg(pattern)))
            .collect();
        keys.sort();
        keys
    }

    fn is_primary(&self, n: &Redis) -> bool {
        let role: Vec<redis::Value> = n.query(&redis::cmd("ROLE"));
        matches!(role.first(), Some(redis::Value::BulkString(b)) if b == b"master")
    }

    /// The index of the live primary that holds `key`'s slot, if one does.
    pub fn primary_of(&self, key: &str) -> Option<usize> {
        let slot: u16 =
            self.nodes.iter().find(|n| n.child.is_some()).unwrap().query(redis::cmd("CLUSTER").arg("KEYSLOT").arg(key));
        (0..self.nodes.len()).find(|&i| {
            let n = &self.nodes[i];
            n.child.is_some() && self.is_primary(n) && {
                let myself: String = n.query(redis::cmd("CLUSTER").arg("MYID"));
                let slots: Vec<Vec<redis::Value>> = n.query(redis::cmd("CLUSTER").arg("SLOTS"));
                slots.iter().any(|range| {
                    let num = |v: &redis::Value| match v {
                        redis::Value::Int(i) => *i,
                        _ => -1,
                    };
                    let owner = match &range[2] {
                        redis::Value::Array(a) => a.get(2).and_then(|v| match v {
                            redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
                            _ => None,
                        }),
                        _ => None,
                    };
                    num(&range[0]) <= slot as i64 && slot as i64 <= num(&range[1]) && owner.as_deref() == Some(&myself)
                })
            }
        })
    }

    /// Kills node `i` (a primary: its replica takes over after the node timeout).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Waits until every live node says the cluster is whole again.
    pub fn wait_ok(&self, limit: Duration) -> bool {
        wait_until(limit, || {
            self.live().all(|n| {
                let client = redis::Client::open(n.url()).unwrap();
                client
                    .get_connection_with_timeout(Duration::from_millis(200))
                    .and_then(|mut c| redis::cmd("CLUSTER").arg("INFO").query::<String>(&mut c))
                    .is_ok_and(|info| info.contains("cluster_state:ok"))
            })
        })
    }
}
