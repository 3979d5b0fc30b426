//! The Prometheus text format, written in one place.
//!
//! Every metric the service exports goes through [`Exposition`]: each
//! family's `HELP` and `TYPE` are written once, before its samples; label
//! values are escaped; histograms (recorded in µs) are exported in seconds
//! with one set of buckets. The owners of the figures (`telemetry` for the
//! shards, `ingest`, `cluster`) describe their own metrics with it;
//! `http::metrics` puts the page together.

use std::fmt::{Display, Write as _};

use hdrhistogram::Histogram;

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// Latency buckets exported for every histogram, in seconds.
const BUCKETS_S: [f64; 15] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// A page of metrics being written.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

/// One family's samples, after its header.
pub struct Family<'a> {
    out: &'a mut String,
    name: &'a str,
}

impl Exposition {
    pub fn new() -> Self {
        Self { out: String::with_capacity(16 * 1024) }
    }

    pub fn finish(self) -> String {
        self.out
    }

    /// A family with no labels and one value.
    pub fn single(&mut self, kind: Kind, name: &str, help: &str, value: impl Display) {
        self.family(kind, name, help).sample(&[], value);
    }

    /// Starts a family: its samples follow.
    pub fn family<'a>(&'a mut self, kind: Kind, name: &'a str, help: &str) -> Family<'a> {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {}", kind.as_str());
        Family { out: &mut self.out, name }
    }

    /// A histogram of values recorded in µs, exported in seconds.
    pub fn histogram_us(&mut self, name: &str, help: &str, hist: &Histogram<u64>) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for le in BUCKETS_S {
            let le_us = (le * 1e6) as u64;
            let _ = writeln!(self.out, "{name}_bucket{{le=\"{le}\"}} {}", hist.count_between(0, le_us));
        }
        let _ = writeln!(self.out, "{name}_bucket{{le=\"+Inf\"}} {}", hist.len());
        let _ = writeln!(self.out, "{name}_sum {}", hist.mean() * hist.len() as f64 / 1e6);
        let _ = writeln!(self.out, "{name}_count {}", hist.len());
    }
}

impl Family<'_> {
    /// One sample with these labels (name, value).
    pub fn sample(&mut self, labels: &[(&str, &dyn Display)], value: impl Display) -> &mut Self {
        self.out.push_str(self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (label, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{label}=\"");
                escape_into(self.out, &v.to_string());
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }
}

/// A label value as the text format wants it: `\`, `"` and newlines escaped.
fn escape_into(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_have_one_header_and_escaped_labels() {
        let mut e = Exposition::new();
        e.family(Kind::Counter, "x_total", "Things.").sample(&[("a", &"q\"\\\n")], 3).sample(&[("a", &2)], 4);
        e.single(Kind::Gauge, "y", "A gauge.", 1.5);
        let text = e.finish();
        assert_eq!(
            text,
            "# HELP x_total Things.\n# TYPE x_total counter\nx_total{a=\"q\\\"\\\\\\n\"} 3\nx_total{a=\"2\"} 4\n\
             # HELP y A gauge.\n# TYPE y gauge\ny 1.5\n"
        );
    }

    #[test]
    fn histograms_export_seconds() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        h.record(150).unwrap();
        let mut e = Exposition::new();
        e.histogram_us("lat_seconds", "Latency.", &h);
        let text = e.finish();
        assert!(text.contains("lat_seconds_bucket{le=\"0.0001\"} 0\n"));
        assert!(text.contains("lat_seconds_bucket{le=\"0.00025\"} 1\n"));
        assert!(text.contains("lat_seconds_count 1\n"));
    }
}
