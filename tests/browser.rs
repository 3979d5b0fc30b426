//! The `/docs` live console end to end in a real browser: headless
//! Chromium (Debian's `chromium`), driven over the DevTools protocol with a
//! real WebSocket client, loads the page from a server in embedded mode,
//! connects with the offered dev token, subscribes to prices and shows a
//! price update from the demo feed. Screenshots go to
//! `target/test-output/` for people to look at.

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tungstenite::Message;

struct Chromium {
    child: Child,
    profile: PathBuf,
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn chromium() -> Chromium {
    let profile = std::env::temp_dir().join(format!("moonx-chromium-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&profile);
    std::fs::create_dir_all(&profile).unwrap();
    let child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--window-size=1280,1000",
            "--remote-debugging-port=0",
            "about:blank",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium on PATH (tools/test.sh installs it)");
    Chromium { child, profile }
}

/// A DevTools session on the browser's first page.
struct Cdp {
    ws: tungstenite::WebSocket<std::net::TcpStream>,
    next: u64,
}

impl Cdp {
    fn attach(browser: &Chromium) -> Cdp {
        let port_file = browser.profile.join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        let port: u16 = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                if let Some(p) = text.lines().next().and_then(|l| l.parse().ok()) {
                    break p;
                }
            }
            assert!(Instant::now() < deadline, "chromium did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let list: Value = loop {
            // DevTools refuses Host headers that are not an IP or localhost.
            let (status, _, body) =
                try_http(addr, &format!("GET /json/list HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"))
                    .unwrap_or_default();
            if status == 200 {
                let v: Value = serde_json::from_str(&body).unwrap();
                if v.as_array().is_some_and(|a| a.iter().any(|t| t["type"] == "page")) {
                    break v;
                }
            }
            assert!(Instant::now() < deadline, "no page target");
            std::thread::sleep(Duration::from_millis(50));
        };
        let url = list.as_array().unwrap().iter().find(|t| t["type"] == "page").unwrap()["webSocketDebuggerUrl"]
            .as_str()
            .unwrap()
            .to_owned();
        let stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let (ws, _) = tungstenite::client(url.as_str(), stream).expect("devtools websocket");
        Cdp { ws, next: 0 }
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        self.ws.send(Message::text(json!({"id": id, "method": method, "params": params}).to_string())).unwrap();
        loop {
            let Message::Text(t) = self.ws.read().unwrap() else { continue };
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    fn eval(&mut self, expr: &str) -> Value {
        self.call("Runtime.evaluate", json!({"expression": expr, "returnByValue": true}))["result"]["value"].clone()
    }

    fn screenshot(&mut self, name: &str) -> PathBuf {
        let data = self.call("Page.captureScreenshot", json!({"format": "png"}))["data"].as_str().unwrap().to_owned();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-output");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, base64_decode(&data)).unwrap();
        path
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let table = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let clean: Vec<u8> = s.bytes().filter(|c| *c != b'=' && !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, c)| acc | (table(*c) as u32) << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

#[test]
fn docs_console_connects_subscribes_and_shows_a_price_update() {
    // Embedded mode: no JWT settings (a dev token is generated) and the demo feed on.
    let srv = TestServer::start(&[("JWT_SECRET", ""), ("DEMO_FEED", "true"), ("WS_SHARDS", "1")]);
    srv.wait_ready();
    let browser = chromium();
    let mut cdp = Cdp::attach(&browser);
    cdp.call("Page.enable", json!({}));
    cdp.call("Page.navigate", json!({"url": format!("http://{}/docs", srv.addr)}));
    let ready = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        cdp.eval("document.readyState === 'complete' && !!document.getElementById('token')") == json!(true)
    });
    assert!(ready, "page loaded");
    let token = cdp.eval("document.getElementById('token').value");
    assert!(token.as_str().is_some_and(|t| t.split('.').count() == 3), "the dev token is offered: {token}");
    let shot = cdp.screenshot("docs-page.png");

    // Use the console as a person would: tick prices, press Connect.
    cdp.eval("document.querySelector('.ch[value=prices]').click(); document.getElementById('connect').click(); true");
    let log_text = "document.getElementById('log').innerText";
    let mut seen = String::new();
    let ok = (0..300).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        seen = cdp.eval(log_text).as_str().unwrap_or("").to_owned();
        seen.contains("auth_success") && seen.contains("subscribed") && seen.contains("price_update")
    });
    assert!(ok, "console log: {seen}");
    let status = cdp.eval("document.getElementById('status').textContent");
    assert_eq!(status, json!("authenticated as demo"));
    cdp.eval("document.getElementById('ping').click(); true");
    assert!((0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        cdp.eval(log_text).as_str().unwrap_or("").contains("pong")
    }));
    let shot2 = cdp.screenshot("docs-console-streaming.png");
    let mut header = [0u8; 8];
    std::fs::File::open(&shot2).unwrap().read_exact(&mut header).unwrap();
    assert_eq!(&header, b"\x89PNG\r\n\x1a\n", "{}", shot.display());
}
