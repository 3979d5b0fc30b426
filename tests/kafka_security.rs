//! Kafka security settings (KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_*,
//! KAFKA_SSL_*): librdkafka's mock cluster speaks neither TLS nor SASL
//! (its ApiVersions lists no SaslHandshake), so a real SASL login cannot
//! succeed here. What is checked with real parts instead:
//! - a SASL login the broker refuses, and TLS to a plaintext listener:
//!   `/health` degraded with librdkafka's reason, never the password, one
//!   error line in the log, the service serving on;
//! - TLS against a real TLS endpoint (rustls, certificates made here): an
//!   untrusted certificate is refused with the reason; with
//!   KAFKA_SSL_CA_LOCATION the handshake completes and the first Kafka
//!   request arrives over it; a server that requires a client certificate
//!   refuses a client without one and accepts KAFKA_SSL_CERTIFICATE_LOCATION
//!   and KAFKA_SSL_KEY_LOCATION.
//!
//! That the settings reach librdkafka's effective configuration is checked
//! in `src/ingest/client.rs`.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::kafka::Kafka;
use common::redis_servers::{wait_until, Pki};
use common::*;
use serde_json::{json, Value};

fn reasons(h: &Value) -> String {
    h["reasons"]
        .as_array()
        .map(|r| r.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(" | "))
        .unwrap_or_default()
}

fn refused(addr: SocketAddr) -> Option<String> {
    let h = get_json(addr, "/health");
    let r = reasons(&h);
    (h["status"] == "degraded" && r.contains("kafka: the broker refused this client")).then_some(r)
}

fn still_serving(addr: SocketAddr) {
    let mut ws = authed(addr, "u");
    send(&mut ws, json!({"type":"ping"}));
    assert_eq!(recv(&mut ws)["type"], "pong");
}

#[test]
fn a_refused_sasl_login_degrades_health_with_the_reason_and_no_secret() {
    let kafka = Kafka::new(1);
    let password = "kafka-pw-31c0";
    let log = test_file("kafka-sasl.log");
    let (_srv, addr) = spawn_server_logged(
        &[
            ("JWT_SECRET", SECRET),
            ("KAFKA_BROKERS", &kafka.bootstrap()),
            ("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT"),
            ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-256"),
            ("KAFKA_SASL_USERNAME", "svc-moonx"),
            ("KAFKA_SASL_PASSWORD", password),
            ("LOG_FORMAT", "json"),
            ("LOG_LEVEL", "info"),
        ],
        &log,
    );
    assert!(wait_until(Duration::from_secs(20), || refused(addr).is_some()), "{}", get_json(addr, "/health"));
    let why = refused(addr).unwrap();
    assert!(why.contains("(SASL_PLAINTEXT/SCRAM-SHA-256)"), "{why}");
    let h = get_json(addr, "/health");
    assert_eq!(h["services"]["kafka"], false);
    assert!(!h.to_string().contains(password), "{h}");
    let line = wait_for_log(&log, "the refusal at error", |l| {
        l["level"] == "ERROR" && l["message"].as_str().is_some_and(|m| m.contains("refused this client"))
    });
    assert!(line["reason"].as_str().is_some_and(|r| !r.is_empty()), "librdkafka's reason: {line}");
    let created = wait_for_log(&log, "the consumer's start line", |l| l["message"] == "kafka consumer created");
    assert_eq!(created["security"], "SASL_PLAINTEXT/SCRAM-SHA-256");
    still_serving(addr);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(password), "the password never reaches the log");
    let refusals = log_lines(&log)
        .iter()
        .filter(|l| l["level"] == "ERROR" && l["message"].as_str().is_some_and(|m| m.contains("refused this client")))
        .count();
    assert_eq!(refusals, 1, "logged once when it starts, then rate-limited (once a minute)");
}

#[test]
fn tls_to_a_plaintext_listener_degrades_health_with_the_reason() {
    let kafka = Kafka::new(1);
    let srv = TestServer::start(&[("KAFKA_BROKERS", &kafka.bootstrap()), ("KAFKA_SECURITY_PROTOCOL", "SSL")]);
    assert!(wait_until(Duration::from_secs(20), || refused(srv.addr).is_some()), "{}", get_json(srv.addr, "/health"));
    let why = refused(srv.addr).unwrap();
    assert!(why.contains("(SSL)") && why.contains("SSL handshake failed"), "{why}");
    still_serving(srv.addr);
}

/// What the TLS endpoint saw of one connection.
#[derive(Debug, Clone)]
enum Seen {
    /// Handshake done; whether the client sent a certificate, and the
    /// first request's API key (18 = ApiVersions), if one arrived.
    Accepted {
        client_cert: bool,
        api_key: Option<i16>,
    },
    Refused(String),
}

/// A TLS endpoint on loopback with the certificate of `pki`, standing where
/// a broker's TLS listener is: it completes (or refuses) handshakes and
/// reads the first request, then hangs up.
struct TlsEndpoint {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TlsEndpoint {
    fn start(pki: &Pki, require_client_cert: bool) -> TlsEndpoint {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(&pki.cert).unwrap().collect::<Result<_, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_file(&pki.key).unwrap();
        // Requiring a client certificate, TLS 1.2: the refusal is part of
        // the handshake. (Under TLS 1.3 the server rejects the certificate
        // after the client finished; librdkafka then only sees the
        // connection drop during ApiVersion, which it does not report as
        // an error: /health says no broker connection is up, without why.)
        let versions: &[&rustls::SupportedProtocolVersion] =
            if require_client_cert { &[&rustls::version::TLS12] } else { rustls::DEFAULT_VERSIONS };
        let builder =
            rustls::ServerConfig::builder_with_provider(provider.clone()).with_protocol_versions(versions).unwrap();
        let config = if require_client_cert {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(CertificateDer::from_pem_file(&pki.ca).unwrap()).unwrap();
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
            builder.with_client_cert_verifier(verifier).with_single_cert(certs, key).unwrap()
        } else {
            builder.with_no_client_auth().with_single_cert(certs, key).unwrap()
        };
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let Ok((tcp, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                tcp.set_nonblocking(false).unwrap();
                tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let conn = rustls::ServerConnection::new(config.clone()).unwrap();
                let mut s = rustls::StreamOwned::new(conn, tcp);
                let mut result = Ok(());
                while s.conn.is_handshaking() {
                    if let Err(e) = s.conn.complete_io(&mut s.sock) {
                        result = Err(e.to_string());
                        break;
                    }
                }
                let entry = match result {
                    Err(e) => Seen::Refused(e),
                    Ok(()) => {
                        let client_cert = s.conn.peer_certificates().is_some_and(|c| !c.is_empty());
                        let mut head = [0u8; 6];
                        let api_key = s.read_exact(&mut head).ok().map(|()| i16::from_be_bytes([head[4], head[5]]));
                        Seen::Accepted { client_cert, api_key }
                    }
                };
                seen2.lock().unwrap().push(entry);
            }
        });
        TlsEndpoint { addr, seen, stop, thread: Some(thread) }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for TlsEndpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn an_untrusted_broker_certificate_is_refused_with_the_reason() {
    let pki = Pki::new("kafka-untrusted");
    let endpoint = TlsEndpoint::start(&pki, false);
    // No KAFKA_SSL_CA_LOCATION: the system's CAs, which do not know the test CA.
    let srv = TestServer::start(&[("KAFKA_BROKERS", &endpoint.addr.to_string()), ("KAFKA_SECURITY_PROTOCOL", "SSL")]);
    assert!(wait_until(Duration::from_secs(20), || refused(srv.addr).is_some()), "{}", get_json(srv.addr, "/health"));
    let why = refused(srv.addr).unwrap();
    assert!(why.contains("certificate verify failed"), "{why}");
    assert!(endpoint.seen().iter().all(|s| matches!(s, Seen::Refused(_))), "{:?}", endpoint.seen());
    still_serving(srv.addr);
}

#[test]
fn a_private_ca_and_a_client_certificate_complete_the_handshake() {
    let pki = Pki::new("kafka-mtls");
    let endpoint = TlsEndpoint::start(&pki, true);
    let bootstrap = endpoint.addr.to_string();
    let ca = Pki::path(&pki.ca);
    // The server wants a client certificate: without one, refused with the reason.
    let srv = TestServer::start(&[
        ("KAFKA_BROKERS", &bootstrap),
        ("KAFKA_SECURITY_PROTOCOL", "SSL"),
        ("KAFKA_SSL_CA_LOCATION", ca),
    ]);
    assert!(wait_until(Duration::from_secs(20), || refused(srv.addr).is_some()), "{}", get_json(srv.addr, "/health"));
    assert!(
        endpoint.seen().iter().any(|s| matches!(s, Seen::Refused(e) if e.to_lowercase().contains("certificate"))),
        "{:?}",
        endpoint.seen()
    );
    drop(srv);

    // With the client certificate and key: the handshake completes, the
    // server saw the certificate, and the first request (ApiVersions) came
    // over the encrypted connection.
    let endpoint = TlsEndpoint::start(&pki, true);
    let bootstrap = endpoint.addr.to_string();
    let _srv = TestServer::start(&[
        ("KAFKA_BROKERS", &bootstrap),
        ("KAFKA_SECURITY_PROTOCOL", "SSL"),
        ("KAFKA_SSL_CA_LOCATION", ca),
        ("KAFKA_SSL_CERTIFICATE_LOCATION", Pki::path(&pki.client_cert)),
        ("KAFKA_SSL_KEY_LOCATION", Pki::path(&pki.client_key)),
    ]);
    assert!(
        wait_until(Duration::from_secs(20), || endpoint
            .seen()
            .iter()
            .any(|s| matches!(s, Seen::Accepted { client_cert: true, api_key: Some(18) }))),
        "{:?}",
        endpoint.seen()
    );
}
