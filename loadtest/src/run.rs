//! What every scenario shares: the run's stop signal (Ctrl-C or the
//! overall `--deadline`), the per-phase progress lines, the server probe
//! (`--server-pid`), and the result's envelope and verdict line.

use std::cell::Cell;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde_json::{json, Map, Value};
use tokio::sync::watch;

use crate::hdr::{HdrLog, Recorder};
use crate::procstat::{self, Sample};
use crate::verdict::{Figures, Threshold, Verdict};
use crate::Common;

/// Version of the JSON result's layout (README: "JSON result").
pub const SCHEMA: u64 = 1;

/// Why a run stopped before its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    Interrupted,
    Deadline,
}

/// The run's stop signal: set by the first Ctrl-C (a second one ends the
/// process at once) or when `--deadline` passes.
#[derive(Clone)]
pub struct Stop(watch::Receiver<Option<Stopped>>);

impl Stop {
    /// Must be called on the run's `LocalSet`.
    pub fn start(deadline: Duration) -> Stop {
        let (tx, rx) = watch::channel(None);
        tokio::task::spawn_local(async move {
            tokio::select! {
                r = tokio::signal::ctrl_c() => {
                    if r.is_err() {
                        std::future::pending::<()>().await;
                    }
                    let _ = tx.send(Some(Stopped::Interrupted));
                    eprintln!("interrupted: stopping and printing what was measured (Ctrl-C again to quit at once)");
                }
                _ = tokio::time::sleep(deadline) => {
                    let _ = tx.send(Some(Stopped::Deadline));
                    eprintln!("--deadline passed: stopping and printing what was measured");
                }
            }
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted again: exiting without a summary");
                std::process::exit(130);
            }
        });
        Stop(rx)
    }

    pub fn reason(&self) -> Option<Stopped> {
        *self.0.borrow()
    }

    pub fn stopped(&self) -> bool {
        self.reason().is_some()
    }

    /// Resolves once the run is stopped.
    pub async fn wait(&self) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(Option::is_some).await;
    }

    /// Sleeps `d`; true when the run was stopped meanwhile.
    pub async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => self.stopped(),
            _ = self.wait() => true,
        }
    }
}

/// A run in progress.
pub struct Run {
    pub server: SocketAddr,
    pub stop: Stop,
    pub started_at: SystemTime,
    pub started: Instant,
    pub probe: Option<Probe>,
    pub hdr: Option<HdrLog>,
    pub thresholds: Vec<Threshold>,
    pub json: bool,
    quiet: bool,
    phase: Cell<&'static str>,
    phase_started: Cell<Instant>,
    /// Start of the current progress interval (wall clock, for the log).
    interval_from: Cell<SystemTime>,
    interval_started: Cell<Instant>,
}

impl Run {
    /// Checks the common settings, resolves the server's address, checks
    /// `--server-pid`, opens `--hdr-log`. Errors are usage errors (exit 2).
    pub fn start(c: &Common, scenario: &str) -> anyhow::Result<Run> {
        let server = resolve(&c.server)?;
        let probe = match c.server_pid {
            Some(pid) => Some(Probe::check(pid)?),
            None => None,
        };
        let started_at = SystemTime::now();
        let hdr = match &c.hdr_log {
            Some(path) => Some(HdrLog::create(path, started_at, &format!("scenario {scenario}, server {}", c.server))?),
            None => None,
        };
        let now = Instant::now();
        Ok(Run {
            server,
            stop: Stop::start(Duration::from_secs(c.deadline)),
            started_at,
            started: now,
            probe,
            hdr,
            thresholds: c.threshold.clone(),
            json: c.json,
            quiet: c.quiet,
            phase: Cell::new("start"),
            phase_started: Cell::new(now),
            interval_from: Cell::new(started_at),
            interval_started: Cell::new(now),
        })
    }

    pub fn phase(&self) -> &'static str {
        self.phase.get()
    }

    /// Enters a phase (`connect`, `warm-up`, `measure`, `drain`, `hold`).
    pub fn enter(&self, phase: &'static str) {
        self.phase.set(phase);
        self.phase_started.set(Instant::now());
    }

    /// Prints one progress line (stderr) for the interval just ended.
    pub fn progress(&self, text: &str) {
        if !self.quiet {
            eprintln!(
                "[{:>6.1}s {:<7} {:>4.0}s] {text}",
                self.started.elapsed().as_secs_f64(),
                self.phase.get(),
                self.phase_started.get().elapsed().as_secs_f64()
            );
        }
    }

    /// Length of the progress interval so far.
    pub fn interval(&self) -> Duration {
        self.interval_started.get().elapsed()
    }

    /// Ends the progress interval: writes the recorders' interval
    /// histograms to the HDR log and clears them.
    pub fn end_interval(&mut self, recorders: &mut [&mut Recorder]) -> anyhow::Result<()> {
        let from = self.interval_from.get();
        let length = self.interval_started.get().elapsed();
        if let Some(log) = self.hdr.as_mut() {
            for r in recorders.iter() {
                log.write(r.tag, &r.interval, from, length)?;
            }
        }
        for r in recorders.iter_mut() {
            r.interval.reset();
        }
        self.interval_from.set(SystemTime::now());
        self.interval_started.set(Instant::now());
        Ok(())
    }

    /// Server CPU and RSS now (None without `--server-pid` or when the
    /// server is gone).
    pub fn sample(&self) -> Option<Sample> {
        self.probe.as_ref().and_then(|p| Sample::of(p.pid))
    }

    /// Adds the stop reason and the thresholds to `verdict`, prints the
    /// result (JSON or the human summary `human` prints) and the verdict
    /// line last; returns the exit code.
    pub fn finish(
        &mut self,
        scenario: &str,
        settings: Value,
        mut report: Map<String, Value>,
        verdict: &mut Verdict,
        figures: &Figures,
        human: impl FnOnce(),
    ) -> u8 {
        if let Some(why) = self.stop.reason() {
            let phase = self.phase();
            let text = match why {
                Stopped::Interrupted => {
                    verdict.code = 130;
                    format!("interrupted (Ctrl-C) in the {phase} phase: the figures cover only what was measured until then")
                }
                Stopped::Deadline => format!("--deadline passed in the {phase} phase: the run did not complete"),
            };
            verdict.reasons.insert(0, text);
        }
        verdict.thresholds(&self.thresholds, figures);
        if let Some(log) = self.hdr.as_mut() {
            if let Err(e) = log.flush() {
                verdict.fail(format!("{e:#}"));
            }
        }
        report.insert("schema".into(), json!(SCHEMA));
        report.insert("tool".into(), json!({"name": "moonx-loadtest", "version": env!("CARGO_PKG_VERSION")}));
        report.insert("scenario".into(), json!(scenario));
        report.insert("started_at".into(), json!(rfc3339(self.started_at)));
        report.insert("finished_at".into(), json!(rfc3339(SystemTime::now())));
        report.insert("run_s".into(), json!(self.started.elapsed().as_secs_f64()));
        report.insert("settings".into(), settings);
        report.insert("command_line".into(), json!(command_line()));
        report.insert("host".into(), host());
        report.insert("server_address".into(), json!(self.server.to_string()));
        report.insert("interrupted".into(), json!(self.stop.reason().map(|s| format!("{s:?}").to_lowercase())));
        report.insert("verdict".into(), verdict.to_json());
        if self.json {
            out!("{}", Value::Object(report));
            eprintln!("{}", verdict.line());
        } else {
            human();
            out!("{}", verdict.line());
        }
        verdict.exit_code()
    }
}

/// `host:port` (a name is resolved; the first address is used).
pub fn resolve(server: &str) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = server.parse::<SocketAddr>() {
        return Ok(a);
    }
    let mut addrs: Vec<SocketAddr> = server
        .to_socket_addrs()
        .with_context(|| format!("--server {server}: expected host:port (e.g. 127.0.0.1:3008 or localhost:3008)"))?
        .collect();
    // Prefer IPv4 (servers commonly listen on 0.0.0.0 or 127.0.0.1 only).
    addrs.sort_by_key(|a| !a.is_ipv4());
    match addrs.first() {
        Some(a) => Ok(*a),
        None => bail!("--server {server}: the name has no address"),
    }
}

/// The server process `--server-pid` names.
pub struct Probe {
    pub pid: u32,
    pub command: String,
    pub clock: String,
    pub resolution_ns: f64,
    /// Threads that run a Kafka broker inside the server.
    pub broker_threads: Vec<String>,
}

impl Probe {
    pub fn check(pid: u32) -> anyhow::Result<Probe> {
        if pid == 0 || !procstat::alive(pid) {
            bail!("--server-pid {pid}: no live process with that id (its CPU and RSS could not be read)");
        }
        if Sample::of(pid).is_none() {
            bail!("--server-pid {pid}: cannot read its CPU time");
        }
        let (clock, resolution_ns) = procstat::cpu_clock_source(pid);
        let (broker_threads, _) = procstat::broker_threads(pid);
        Ok(Probe { pid, command: procstat::command(pid).unwrap_or_default(), clock, resolution_ns, broker_threads })
    }

    pub fn broker_cpu(&self) -> Duration {
        procstat::broker_threads(self.pid).1
    }

    /// The server's librdkafka client threads: their names and CPU so far.
    pub fn kafka_client_cpu(&self) -> (Vec<String>, Duration) {
        procstat::kafka_client_threads(self.pid)
    }

    /// The note printed and recorded when the server hosts a broker.
    pub fn broker_note(&self) -> Option<String> {
        (!self.broker_threads.is_empty()).then(|| {
            format!(
                "the server process hosts an embedded Kafka broker (threads {}): its CPU and RSS include the \
                 broker's and any demo feed's; run it with KAFKA_BROKERS pointing at `moonx-loadtest broker` to \
                 measure the server alone",
                self.broker_threads.join(", ")
            )
        })
    }

    /// The fields every scenario's `server` object has.
    pub fn base_json(&self, exited: bool) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("pid".into(), json!(self.pid));
        m.insert("command".into(), json!(self.command));
        m.insert("cpu_clock".into(), json!(self.clock));
        m.insert("cpu_clock_resolution_ns".into(), json!(self.resolution_ns));
        m.insert("embedded_broker".into(), json!(!self.broker_threads.is_empty()));
        m.insert("exited".into(), json!(exited));
        m.insert("note".into(), json!(self.broker_note()));
        m
    }

    /// The human lines about the probe itself.
    pub fn describe(&self, exited: bool) {
        out!(
            "  server pid {} ({}); CPU from the {}, resolution {}",
            self.pid,
            self.command,
            self.clock,
            if self.resolution_ns >= 1e6 {
                format!("{:.0} ms", self.resolution_ns / 1e6)
            } else {
                format!("{:.0} ns", self.resolution_ns)
            }
        );
        if exited {
            out!("  the server process exited during the run: no CPU or RSS figures");
        }
        if let Some(n) = self.broker_note() {
            out!("  note: {n}");
        }
    }
}

/// The command line with the JWT secret's value left out.
fn command_line() -> Vec<String> {
    let mut out = Vec::new();
    let mut hide = false;
    for a in std::env::args() {
        if hide {
            out.push("<secret>".into());
            hide = false;
        } else if a == "--jwt-secret" {
            hide = true;
            out.push(a);
        } else if a.starts_with("--jwt-secret=") {
            out.push("--jwt-secret=<secret>".into());
        } else {
            out.push(a);
        }
    }
    out
}

fn host() -> Value {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    json!({"hostname": name, "cpus": cpus, "os": std::env::consts::OS, "arch": std::env::consts::ARCH})
}

/// `2026-12-02T04:15:53.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_timestamps() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_millis(951_782_400_250)), "2000-02-29T00:00:00.250Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(1_798_761_599)), "2026-12-31T23:59:59.000Z");
    }

    #[test]
    fn resolves_names_and_addresses() {
        assert_eq!(resolve("127.0.0.1:3008").unwrap(), "127.0.0.1:3008".parse().unwrap());
        assert_eq!(resolve("[::1]:80").unwrap(), "[::1]:80".parse().unwrap());
        let l = resolve("localhost:3008").unwrap();
        assert!(l.ip().is_loopback() && l.port() == 3008);
        assert!(resolve("localhost").is_err(), "no port");
    }
}
