//! Verdicts: the built-in rules a run must meet and the `--threshold`
//! expressions (k6's spirit: `p99<50ms`, `lost==0`), checked against the
//! run's figures.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// A comparison in a threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl Op {
    fn holds(self, left: f64, right: f64) -> bool {
        match self {
            Op::Lt => left < right,
            Op::Le => left <= right,
            Op::Gt => left > right,
            Op::Ge => left >= right,
            Op::Eq => left == right,
            Op::Ne => left != right,
        }
    }

    fn text(self) -> &'static str {
        match self {
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Eq => "==",
            Op::Ne => "!=",
        }
    }
}

/// What a threshold is about.
#[derive(Debug, Clone, PartialEq)]
pub enum Metric {
    /// A quantile (0..=1) of the scenario's main latency histogram.
    Quantile(f64),
    Min,
    Mean,
    /// A count or rate the scenario reports (`lost`, `throughput`, ...).
    Figure(String),
}

/// The figures a threshold may name besides latencies.
pub const FIGURES: &[(&str, &str)] = &[
    ("lost", "expected deliveries that never arrived"),
    ("duplicates", "deliveries received more than once"),
    ("gaps", "sequence numbers skipped within a connection's stream"),
    ("misrouted", "private updates that reached another user (private)"),
    ("leaked", "updates of a market a connection is not subscribed to that reached it (markets)"),
    ("snapshots", "snapshot frames received (markets)"),
    ("failed", "connections that failed to set up"),
    ("closed", "connections the server closed (or lost) before the run ended"),
    ("delivered", "deliveries measured"),
    ("connections", "connections set up"),
    ("throughput", "deliveries/s in the measured window (connect: connections/s)"),
    ("server_cpu_us", "server CPU µs per delivery (connect: per connection)"),
    ("not_recovered", "resumes not recovered: answered without recovered:true, or without a position (resume)"),
    ("recover_ms", "ms from the reconnect until every client had all its missed updates (resume)"),
    ("read_ratio", "Kafka messages the server read for replays per message in the replayed range, which ends at the last update replayed (resume; the server reads on to where its feed stood when the last resume began)"),
    ("reread", "Kafka messages the server read for replays that it had read for replays before (resume)"),
    ("p99_ratio", "p99 of prices during the storm over the baseline's (resume)"),
];

/// One `--threshold` expression.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    pub text: String,
    pub metric: Metric,
    pub op: Op,
    /// Latencies in µs; figures as given.
    pub value: f64,
}

impl FromStr for Threshold {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let text: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        let at = text.find(['<', '>', '=', '!']).ok_or_else(|| {
            format!("`{s}`: no comparison (expected e.g. `p99<50ms`, `lost==0`; operators < <= > >= == !=)")
        })?;
        let (name, rest) = text.split_at(at);
        let (op, value) =
            [("<=", Op::Le), (">=", Op::Ge), ("==", Op::Eq), ("!=", Op::Ne), ("<", Op::Lt), (">", Op::Gt)]
                .iter()
                .find_map(|(t, op)| rest.strip_prefix(t).map(|v| (*op, v)))
                .ok_or_else(|| format!("`{s}`: unknown operator (use < <= > >= == !=)"))?;
        let metric = parse_metric(name).ok_or_else(|| {
            let names: Vec<&str> = FIGURES.iter().map(|(n, _)| *n).collect();
            format!(
                "`{s}`: unknown figure `{name}` (latencies: p50, p99, p99.9, ..., min, mean, max; figures: {})",
                names.join(", ")
            )
        })?;
        let value = match metric {
            Metric::Figure(_) => value.parse::<f64>().map_err(|_| format!("`{s}`: `{value}` is not a number"))?,
            _ => parse_duration_us(value).ok_or_else(|| {
                format!("`{s}`: `{value}` is not a duration (a number with us, µs, ms or s; ms when no unit)")
            })?,
        };
        if !value.is_finite() {
            return Err(format!("`{s}`: `{value}` is not finite"));
        }
        Ok(Threshold { text, metric, op, value })
    }
}

fn parse_metric(name: &str) -> Option<Metric> {
    match name {
        "min" => return Some(Metric::Min),
        "mean" | "avg" => return Some(Metric::Mean),
        "max" => return Some(Metric::Quantile(1.0)),
        "p999" => return Some(Metric::Quantile(0.999)),
        "p9999" => return Some(Metric::Quantile(0.9999)),
        _ => {}
    }
    // A figure may start with `p` too (`p99_ratio`): only a number after it is a percentile.
    if let Some(p) = name.strip_prefix('p').and_then(|p| p.parse::<f64>().ok()) {
        // Rounded so `p99.9` is exactly 0.999.
        return (p > 0.0 && p <= 100.0).then_some(Metric::Quantile((p * 1e6).round() / 1e8));
    }
    FIGURES.iter().any(|(n, _)| *n == name).then(|| Metric::Figure(name.to_string()))
}

/// `50ms`, `1.5s`, `200us`, `200µs`, `50` (ms) → µs.
pub fn parse_duration_us(v: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us").or_else(|| v.strip_suffix("µs")) {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        (v, 1e3)
    };
    let x: f64 = num.parse().ok()?;
    (x.is_finite() && x >= 0.0).then_some(x * scale)
}

/// What a run measured, for the thresholds.
pub struct Figures<'a> {
    /// The scenario's main latency (set-up for `connect`,
    /// publish→receive otherwise).
    pub latency: &'a Histogram<u64>,
    pub values: BTreeMap<&'static str, f64>,
}

/// The outcome of one threshold.
pub struct Checked {
    pub threshold: String,
    pub pass: bool,
    /// The measured value (µs for latencies), None when nothing was measured.
    pub actual: Option<f64>,
    pub note: String,
}

pub fn check(t: &Threshold, f: &Figures) -> Checked {
    let actual = match &t.metric {
        Metric::Quantile(q) => (!f.latency.is_empty()).then(|| {
            if *q >= 1.0 {
                f.latency.max() as f64
            } else {
                f.latency.value_at_quantile(*q) as f64
            }
        }),
        Metric::Min => (!f.latency.is_empty()).then(|| f.latency.min() as f64),
        Metric::Mean => (!f.latency.is_empty()).then(|| f.latency.mean()),
        Metric::Figure(name) => f.values.get(name.as_str()).copied(),
    };
    let is_latency = !matches!(t.metric, Metric::Figure(_));
    let show = |v: f64| if is_latency { fmt_us(v) } else { fmt_num(v) };
    match actual {
        None if is_latency => {
            Checked { threshold: t.text.clone(), pass: false, actual: None, note: "no samples".into() }
        }
        None => Checked {
            threshold: t.text.clone(),
            pass: false,
            actual: None,
            note: "not measured in this scenario".into(),
        },
        Some(v) => {
            let pass = t.op.holds(v, t.value);
            Checked {
                threshold: t.text.clone(),
                pass,
                actual: Some(v),
                note: format!("{} was {} (limit {} {})", name_of(&t.metric), show(v), t.op.text(), show(t.value)),
            }
        }
    }
}

fn name_of(m: &Metric) -> String {
    match m {
        Metric::Quantile(q) if *q >= 1.0 => "max".into(),
        Metric::Quantile(q) => format!("p{}", fmt_num(q * 100.0)),
        Metric::Min => "min".into(),
        Metric::Mean => "mean".into(),
        Metric::Figure(n) => n.clone(),
    }
}

/// µs as a readable duration: `812 µs`, `3.412 ms`, `1.250 s`.
pub fn fmt_us(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1e6 {
        format!("{:.3} ms", us / 1e3)
    } else {
        format!("{:.3} s", us / 1e6)
    }
}

fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// The verdict of a run: every reason it failed, in the order found.
#[derive(Default)]
pub struct Verdict {
    pub reasons: Vec<String>,
    pub checked: Vec<Checked>,
    /// Exit code when it fails (1, or 130 when interrupted).
    pub code: u8,
}

impl Verdict {
    pub fn fail(&mut self, reason: impl Into<String>) {
        self.reasons.push(reason.into());
    }

    pub fn pass(&self) -> bool {
        self.reasons.is_empty()
    }

    pub fn thresholds(&mut self, thresholds: &[Threshold], f: &Figures) {
        for t in thresholds {
            let c = check(t, f);
            if !c.pass {
                self.fail(format!("threshold {} failed: {}", c.threshold, c.note));
            }
            self.checked.push(c);
        }
    }

    pub fn exit_code(&self) -> u8 {
        if self.pass() {
            0
        } else if self.code != 0 {
            self.code
        } else {
            1
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "pass": self.pass(),
            "exit_code": self.exit_code(),
            "reasons": self.reasons,
            "thresholds": self.checked.iter().map(|c| json!({
                "threshold": c.threshold, "pass": c.pass, "actual": c.actual, "note": c.note,
            })).collect::<Vec<_>>(),
        })
    }

    /// The last line a run prints.
    pub fn line(&self) -> String {
        if self.pass() {
            let n = self.checked.len();
            if n == 0 {
                "PASS".to_string()
            } else {
                format!("PASS ({n} threshold{} met)", if n == 1 { "" } else { "s" })
            }
        } else {
            format!("FAIL: {}", self.reasons.join("; "))
        }
    }
}

impl serde::Serialize for Threshold {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(h: &Histogram<u64>) -> Figures<'_> {
        Figures { latency: h, values: BTreeMap::from([("lost", 0.0), ("throughput", 1500.0)]) }
    }

    #[test]
    fn parses_thresholds() {
        let t: Threshold = "p99<50ms".parse().unwrap();
        assert_eq!((t.metric, t.op, t.value), (Metric::Quantile(0.99), Op::Lt, 50_000.0));
        let t: Threshold = " p99.9 <= 1.5s ".parse().unwrap();
        assert_eq!((t.metric, t.op, t.value), (Metric::Quantile(0.999), Op::Le, 1_500_000.0));
        let t: Threshold = "p999<200us".parse().unwrap();
        assert_eq!((t.metric, t.value), (Metric::Quantile(0.999), 200.0));
        let t: Threshold = "max<20".parse().unwrap();
        assert_eq!((t.metric, t.value), (Metric::Quantile(1.0), 20_000.0), "no unit: ms");
        let t: Threshold = "lost==0".parse().unwrap();
        assert_eq!((t.metric, t.op, t.value), (Metric::Figure("lost".into()), Op::Eq, 0.0));
        let t: Threshold = "throughput>=1000".parse().unwrap();
        assert_eq!(t.op, Op::Ge);
        let t: Threshold = "p99_ratio<=1.5".parse().unwrap();
        assert_eq!((t.metric, t.value), (Metric::Figure("p99_ratio".into()), 1.5), "a figure, not a percentile");
        for bad in ["p99", "p99<", "p99<fast", "p0<1ms", "p101<1ms", "latency<1ms", "lost==none", "p99=>1ms"] {
            assert!(bad.parse::<Threshold>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn checks_thresholds() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).unwrap();
        for v in 1..=100u64 {
            h.record(v * 1000).unwrap();
        }
        let f = figures(&h);
        let c = |s: &str| check(&s.parse().unwrap(), &f);
        assert!(c("p99<100ms").pass);
        assert!(!c("p99<50ms").pass);
        assert!(c("p50<=50.1ms").pass);
        assert!(c("max<101ms").pass && !c("max<99ms").pass);
        assert!(c("lost==0").pass && !c("lost>0").pass);
        assert!(c("throughput>1000").pass && !c("throughput<1000").pass);
        let gone = c("misrouted==0");
        assert!(!gone.pass && gone.note.contains("not measured"));
        let empty = Histogram::<u64>::new(3).unwrap();
        let f = figures(&empty);
        let e = check(&"p99<1s".parse().unwrap(), &f);
        assert!(!e.pass && e.note == "no samples" && e.actual.is_none());
    }

    #[test]
    fn verdict_lines() {
        let mut v = Verdict::default();
        assert_eq!((v.line(), v.exit_code()), ("PASS".to_string(), 0));
        v.fail("lost 3 of 10 expected deliveries");
        v.fail("2 connections closed");
        assert_eq!(v.line(), "FAIL: lost 3 of 10 expected deliveries; 2 connections closed");
        assert_eq!(v.exit_code(), 1);
        v.code = 130;
        assert_eq!(v.exit_code(), 130);
    }
}
