//! The server's recovery counters, read from its `/metrics` page (a plain
//! HTTP/1.1 GET on the WebSocket port) before and after the storm; a
//! server without them (a peer) reads as unavailable, with the reason.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A read of `/metrics` gives up after this long.
const TIMEOUT: Duration = Duration::from_secs(5);

/// moonx-ws's recovery counters (PROTOCOL.md, "Resuming after a reconnect").
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Counters {
    /// `moonx_ws_recovery_read_total`: Kafka messages read for replays.
    pub(crate) read: u64,
    /// `moonx_ws_recovery_reread_total`: of those, read for replays before.
    pub(crate) reread: u64,
    /// `moonx_ws_recovery_replayed_total`: updates sent by replays.
    pub(crate) replayed: u64,
    /// `moonx_ws_recovery_scans_total`: partition scans started.
    pub(crate) scans: u64,
    /// `moonx_ws_recoveries_total`, by outcome.
    pub(crate) outcomes: BTreeMap<String, u64>,
}

impl Counters {
    /// The counters of a `/metrics` page; None without the read counter.
    fn parse(page: &str) -> Option<Counters> {
        let mut c = Counters::default();
        let mut read = None;
        for line in page.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, value)) = line.rsplit_once(' ') else { continue };
            let Ok(n) = value.trim().parse::<f64>() else { continue };
            let n = n as u64;
            match name {
                "moonx_ws_recovery_read_total" => read = Some(n),
                "moonx_ws_recovery_reread_total" => c.reread = n,
                "moonx_ws_recovery_replayed_total" => c.replayed = n,
                "moonx_ws_recovery_scans_total" => c.scans = n,
                _ => {
                    if let Some(label) = name.strip_prefix("moonx_ws_recoveries_total{outcome=\"") {
                        c.outcomes.insert(label.trim_end_matches("\"}").to_string(), n);
                    }
                }
            }
        }
        c.read = read?;
        Some(c)
    }

    /// What grew from `before` to these.
    pub(crate) fn since(&self, before: &Counters) -> Counters {
        let grew = |k: &String, n: &u64| (k.clone(), n.saturating_sub(*before.outcomes.get(k).unwrap_or(&0)));
        Counters {
            read: self.read.saturating_sub(before.read),
            reread: self.reread.saturating_sub(before.reread),
            replayed: self.replayed.saturating_sub(before.replayed),
            scans: self.scans.saturating_sub(before.scans),
            outcomes: self.outcomes.iter().map(|(k, n)| grew(k, n)).filter(|(_, n)| *n > 0).collect(),
        }
    }
}

/// The server's counters now, or why they could not be read.
pub(crate) async fn read(server: SocketAddr) -> Result<Counters, String> {
    let page = tokio::time::timeout(TIMEOUT, get(server, "/metrics"))
        .await
        .map_err(|_| format!("GET /metrics: no answer within {} s", TIMEOUT.as_secs()))?
        .map_err(|e| format!("GET /metrics: {e:#}"))?;
    Counters::parse(&page).ok_or_else(|| "GET /metrics: no moonx_ws_recovery_read_total".to_string())
}

/// The body of `GET path` (HTTP/1.1, the connection closed after it).
async fn get(server: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(server).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow::anyhow!("no complete response"))?;
    let status = head.lines().next().unwrap_or_default();
    anyhow::ensure!(status.split_whitespace().nth(1) == Some("200"), "{status}");
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "# HELP moonx_ws_recovery_read_total Kafka messages read for replays.\n\
        # TYPE moonx_ws_recovery_read_total counter\n\
        moonx_ws_recovery_read_total 1200\n\
        moonx_ws_recovery_reread_total 30\n\
        moonx_ws_recovery_replayed_total 800\n\
        moonx_ws_recovery_scans_total 4\n\
        moonx_ws_recoveries_total{outcome=\"recovered\"} 50\n\
        moonx_ws_recoveries_total{outcome=\"timeout\"} 0\n\
        moonx_ws_recovery_read_total_other 7\n";

    #[test]
    fn parses_the_recovery_counters_and_their_growth() {
        let after = Counters::parse(PAGE).unwrap();
        assert_eq!((after.read, after.reread, after.replayed, after.scans), (1200, 30, 800, 4));
        assert_eq!(after.outcomes["recovered"], 50);
        let before = Counters {
            read: 200,
            reread: 10,
            replayed: 100,
            scans: 1,
            outcomes: BTreeMap::from([("recovered".into(), 10)]),
        };
        let d = after.since(&before);
        assert_eq!((d.read, d.reread, d.replayed, d.scans), (1000, 20, 700, 3));
        assert_eq!(d.outcomes, BTreeMap::from([("recovered".to_string(), 40)]));
        assert_eq!(Counters::parse("up 1\n"), None, "a server without the counters");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reads_a_metrics_page_over_http() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for status in ["200 OK", "404 Not Found"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap();
                assert!(buf[..n].starts_with(b"GET /metrics HTTP/1.1\r\n"));
                let head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", PAGE.len());
                s.write_all(head.as_bytes()).await.unwrap();
                s.write_all(PAGE.as_bytes()).await.unwrap();
            }
        });
        assert_eq!(read(addr).await.unwrap().read, 1200);
        assert_eq!(read(addr).await.unwrap_err(), "GET /metrics: HTTP/1.1 404 Not Found");
        server.await.unwrap();
    }
}
