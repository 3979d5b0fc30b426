//! wss:// (PROTOCOL.md §1): TLS on the same port with a self-signed
//! certificate generated at test time; the HTTP endpoints behind it too; a
//! certificate reload serves new connections while open ones carry on.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;

use common::*;
use moonx_ws::shard::inbox::Route;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde_json::json;

type Tls = StreamOwned<ClientConnection, TcpStream>;

struct Cert {
    der: CertificateDer<'static>,
    cert_path: PathBuf,
    key_path: PathBuf,
}

fn self_signed(dir: &std::path::Path, name: &str) -> Cert {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), name.to_string()]).unwrap();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, ck.cert.pem()).unwrap();
    std::fs::write(&key_path, ck.signing_key.serialize_pem()).unwrap();
    Cert { der: ck.cert.der().clone(), cert_path, key_path }
}

fn tls_connect(addr: std::net::SocketAddr, trusted: &CertificateDer<'static>) -> std::io::Result<Tls> {
    let mut roots = RootCertStore::empty();
    roots.add(trusted.clone()).unwrap();
    let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn = ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap()).unwrap();
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut s = StreamOwned::new(conn, tcp);
    // Drive the handshake now so certificate errors surface here.
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

fn wss(addr: std::net::SocketAddr, trusted: &CertificateDer<'static>) -> tungstenite::WebSocket<Tls> {
    let stream = tls_connect(addr, trusted).expect("TLS handshake");
    let (ws, _) = tungstenite::client("wss://localhost/ws", stream).expect("upgrade over TLS");
    ws
}

fn recv_tls(ws: &mut tungstenite::WebSocket<Tls>) -> serde_json::Value {
    loop {
        if let tungstenite::Message::Text(t) = ws.read().unwrap() {
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

#[test]
fn wss_serves_the_protocol_and_reloads_certificates() {
    let dir = std::env::temp_dir().join(format!("moonx-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let first = self_signed(&dir, "first.example");
    let srv = TestServer::start(&[
        ("TLS_CERT_FILE", first.cert_path.to_str().unwrap()),
        ("TLS_KEY_FILE", first.key_path.to_str().unwrap()),
    ]);

    let mut ws = wss(srv.addr, &first.der);
    assert_eq!(recv_tls(&mut ws)["type"], "auth_required");
    ws.send(tungstenite::Message::text(
        json!({"type":"authenticate","data":{"token": token("tls-user", 600)}}).to_string(),
    ))
    .unwrap();
    assert_eq!(recv_tls(&mut ws)["type"], "auth_success");
    ws.send(tungstenite::Message::text(json!({"type":"subscribe","data":{"channel":"prices"}}).to_string())).unwrap();
    assert_eq!(recv_tls(&mut ws)["type"], "subscribed");
    srv.handle().publisher().publish_data(Route::Prices, 0, br#"{"token":"ETH","chainId":1,"n":1}"#);
    assert_eq!(recv_tls(&mut ws)["data"]["n"], 1, "updates are encrypted per connection");

    // HTTP endpoints share the TLS port.
    let mut s = tls_connect(srv.addr, &first.der).unwrap();
    s.write_all(b"GET /health/live HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    assert!(resp.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&resp));

    // Plain text on the TLS port goes nowhere.
    let (status, _, _) = http(srv.addr, &upgrade_request(""));
    assert_eq!(status, 0, "no HTTP answer without TLS");

    // Rotate the files in place and reload (what SIGHUP does): new
    // connections get the new certificate.
    let second = self_signed(&dir, "second.example");
    srv.handle().reload_tls().unwrap();
    assert!(tls_connect(srv.addr, &first.der).is_err(), "the old certificate is no longer served");
    let mut fresh = wss(srv.addr, &second.der);
    assert_eq!(recv_tls(&mut fresh)["type"], "auth_required");
    // The connection opened before the reload carries on.
    srv.handle().publisher().publish_data(Route::Prices, 0, br#"{"token":"ETH","chainId":1,"n":2}"#);
    assert_eq!(recv_tls(&mut ws)["data"]["n"], 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn half_a_tls_configuration_is_refused_at_start() {
    let cfg =
        moonx_ws::config::Config::from_sources(["moonx-ws", "--tls-cert-file", "/nonexistent.pem"], |_| None).unwrap();
    let err = moonx_ws::server::start(cfg).err().expect("refused").to_string();
    assert!(err.contains("TLS_CERT_FILE and TLS_KEY_FILE"), "{err}");
}

#[test]
fn sighup_reloads_the_certificate_of_the_running_binary() {
    let dir = std::env::temp_dir().join(format!("moonx-tls-hup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let first = self_signed(&dir, "first.example");
    let (cert, key) = (first.cert_path.display().to_string(), first.key_path.display().to_string());
    let (mut child, addr) = spawn_server(&[
        ("JWT_SECRET", SECRET),
        ("DEMO_FEED", "false"),
        ("TLS_CERT_FILE", cert.as_str()),
        ("TLS_KEY_FILE", key.as_str()),
        ("LOG_LEVEL", "warn"),
    ]);
    let mut old = wss(addr, &first.der);
    assert_eq!(recv_tls(&mut old)["type"], "auth_required");

    let second = self_signed(&dir, "second.example");
    let hup = std::process::Command::new("kill").arg("-HUP").arg(child.id().to_string()).status().unwrap();
    assert!(hup.success());
    let reloaded = (0..250).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(20));
        tls_connect(addr, &second.der).is_ok()
    });
    assert!(reloaded, "new connections get the new certificate after SIGHUP");
    // The connection opened before the reload is not dropped.
    old.send(tungstenite::Message::text(json!({"id":"still","type":"ping"}).to_string())).unwrap();
    assert_eq!(recv_tls(&mut old)["data"]["requestId"], "still");
    let _ = std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
