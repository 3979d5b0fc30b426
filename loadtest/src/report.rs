//! `report`: reads JSON results (`--json`, one object per line) and HDR
//! interval logs (`--hdr-log`), prints a markdown percentile table, draws
//! a percentile-distribution plot (SVG), and merges the histograms of
//! several load-generator processes or machines into one result, exactly
//! (HDR histograms add bucket by bucket).

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use clap::Args;
use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

use crate::hdr;
use crate::run::{rfc3339, SCHEMA};
use crate::verdict::{fmt_us, Figures, Threshold, Verdict};

#[derive(Args)]
pub struct ReportArgs {
    /// JSON results (`--json` output; a file of several lines gives one
    /// input per line) and/or HDR interval logs (`--hdr-log` output).
    #[arg(required = true, value_name = "FILE")]
    inputs: Vec<String>,
    /// Which histogram to report: latency (the default; `setup` for
    /// connect results), to_socket, client_lag, churn_setup, connect,
    /// auth, subscribe.
    #[arg(long)]
    tag: Option<String>,
    /// Write a percentile-distribution plot of every input and the merge
    /// (SVG).
    #[arg(long, value_name = "PATH.svg")]
    plot: Option<String>,
    /// Plot title.
    #[arg(long, default_value = "moonx-loadtest latency by percentile")]
    title: String,
    /// Write the markdown table here instead of stdout.
    #[arg(long, value_name = "PATH")]
    markdown: Option<String>,
    /// Write the merge of all inputs as one JSON result (schema 1) here:
    /// the merged histogram, its percentiles and the summed counts.
    #[arg(long, value_name = "PATH")]
    merged: Option<String>,
    /// Fail (exit 1) unless this holds for the merge, e.g. 'p99<50ms',
    /// 'lost==0' (counts are summed over the inputs).
    #[arg(long, value_name = "EXPR")]
    threshold: Vec<Threshold>,
}

/// One input: a run's result or an interval log.
pub struct Series {
    pub label: String,
    pub histogram: Histogram<u64>,
    /// The JSON result, for its counts and verdict.
    pub result: Option<Value>,
}

/// The counts summed over merged results (top-level fields).
const SUMMED: &[&str] = &[
    "connections",
    "attempted",
    "subscribers",
    "produced",
    "expected",
    "expected_measured",
    "measured",
    "received",
    "lost",
    "gaps",
    "duplicates",
    "misrouted",
    "leaked",
    "snapshots",
    "delivered_in_window",
    "deliveries_per_s",
    "connections_per_s",
];

pub fn run(a: ReportArgs) -> anyhow::Result<u8> {
    if let Some(p) = &a.plot {
        if !p.to_ascii_lowercase().ends_with(".svg") {
            bail!("--plot {p}: only SVG is written (no font or system library needed); name it .svg");
        }
    }
    let mut series = Vec::new();
    for path in &a.inputs {
        series.extend(load(path, a.tag.as_deref())?);
    }
    if series.is_empty() {
        bail!("no results or histograms in {}", a.inputs.join(", "));
    }
    let tag = a.tag.clone().unwrap_or_else(|| default_tag(&series));
    let merged = merge_all(&series)?;
    let table = markdown(&series, &merged, &tag);
    match &a.markdown {
        Some(p) => std::fs::write(p, &table).with_context(|| format!("--markdown {p}"))?,
        None => out!("{table}"),
    }
    if let Some(p) = &a.plot {
        plot(p, &a.title, &series, &merged)?;
        eprintln!("plot: {p}");
    }
    let counts = summed_counts(&series);
    let mut v = Verdict::default();
    let mut values: BTreeMap<&'static str, f64> = BTreeMap::new();
    for (k, name) in [
        ("lost", "lost"),
        ("duplicates", "duplicates"),
        ("gaps", "gaps"),
        ("misrouted", "misrouted"),
        ("deliveries_per_s", "throughput"),
        ("subscribers", "connections"),
    ] {
        if let Some(x) = counts.get(k).and_then(Value::as_f64) {
            values.insert(name, x);
        }
    }
    if let Some(x) = counts.get("measured").or(counts.get("received")).and_then(Value::as_f64) {
        values.insert("delivered", x);
    }
    if !values.contains_key("connections") {
        if let Some(x) = counts.get("connections").and_then(Value::as_f64) {
            values.insert("connections", x);
        }
    }
    if !values.contains_key("throughput") {
        if let Some(x) = counts.get("connections_per_s").and_then(Value::as_f64) {
            values.insert("throughput", x);
        }
    }
    let results: Vec<&Value> = series.iter().filter_map(|s| s.result.as_ref()).collect();
    if !results.is_empty() {
        let failed: f64 = results.iter().map(|r| sum_map(&r["failures"]) + sum_map(&r["connect_failures"])).sum();
        let closed: f64 = results.iter().map(|r| sum_map(&r["closed_unexpectedly"])).sum();
        values.insert("failed", failed);
        values.insert("closed", closed);
    }
    let figures = Figures { latency: &merged, values };
    v.thresholds(&a.threshold, &figures);
    if let Some(p) = &a.merged {
        let inputs_pass: Vec<Value> = series
            .iter()
            .map(|s| json!({"label": s.label, "pass": s.result.as_ref().map(|r| r["verdict"]["pass"].clone())}))
            .collect();
        let all_pass = results.iter().all(|r| r["verdict"]["pass"].as_bool() == Some(true));
        let out = json!({
            "schema": SCHEMA,
            "tool": {"name": "moonx-loadtest", "version": env!("CARGO_PKG_VERSION")},
            "scenario": "merged",
            "created_at": rfc3339(std::time::SystemTime::now()),
            "tag": tag,
            "inputs": inputs_pass,
            "inputs_all_passed": all_pass,
            "counts": counts,
            "latency": crate::percentiles(&merged),
            "hdr": {tag.clone(): hdr::encode(&merged)},
            "verdict": v.to_json(),
        });
        std::fs::write(p, format!("{out}\n")).with_context(|| format!("--merged {p}"))?;
        eprintln!("merged result: {p}");
    }
    if !a.threshold.is_empty() || !v.pass() {
        eprintln!("{}", v.line());
    }
    Ok(v.exit_code())
}

fn sum_map(v: &Value) -> f64 {
    v.as_object().map_or(0.0, |m| m.values().filter_map(Value::as_f64).sum())
}

fn default_tag(series: &[Series]) -> String {
    let connect = series.iter().any(|s| s.result.as_ref().is_some_and(|r| r["scenario"] == "connect"));
    if connect { "setup" } else { "latency" }.to_string()
}

/// The inputs in one file.
pub fn load(path: &str, tag: Option<&str>) -> anyhow::Result<Vec<Series>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    let name = std::path::Path::new(path).file_name().map_or(path.into(), |n| n.to_string_lossy().into_owned());
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'{') {
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().filter(|l| l.trim_start().starts_with('{')).collect();
        let mut out = Vec::new();
        for (n, line) in lines.iter().enumerate() {
            let v: Value = serde_json::from_str(line).with_context(|| format!("{path}: line {} is not JSON", n + 1))?;
            if v.get("schema").is_none() {
                // perf/compare.sh's error markers and results from before schema 1.
                eprintln!("{path}: skipping a line without a schema field");
                continue;
            }
            let hdrs = v["hdr"].as_object().with_context(|| format!("{path}: no histograms (`hdr`) in the result"))?;
            let t = tag
                .map(str::to_string)
                .unwrap_or_else(|| if v["scenario"] == "connect" { "setup" } else { "latency" }.to_string());
            let Some(text) = hdrs.get(&t).and_then(Value::as_str) else {
                let have: Vec<&String> = hdrs.keys().collect();
                bail!("{path}: no `{t}` histogram (has {have:?}); pick one with --tag");
            };
            let label = if lines.len() > 1 { format!("{name}#{}", n + 1) } else { name.clone() };
            out.push(Series { label, histogram: hdr::decode(text)?, result: Some(v) });
        }
        Ok(out)
    } else {
        let intervals = hdr::read_log(&bytes).with_context(|| path.to_string())?;
        let mut totals = hdr::totals(&intervals)?;
        let t = match tag {
            Some(t) => t.to_string(),
            None if totals.contains_key("latency") => "latency".into(),
            None if totals.contains_key("setup") => "setup".into(),
            None if totals.len() == 1 => totals.keys().next().cloned().unwrap_or_default(),
            None => bail!("{path}: several tags ({:?}); pick one with --tag", totals.keys().collect::<Vec<_>>()),
        };
        match totals.remove(&t) {
            Some(h) => Ok(vec![Series { label: name, histogram: h, result: None }]),
            None if intervals.is_empty() => Ok(vec![Series { label: name, histogram: hdr::histogram(), result: None }]),
            None => bail!("{path}: no `{t}` intervals (has {:?})", totals.keys().collect::<Vec<_>>()),
        }
    }
}

/// Every input's histogram added into one.
pub fn merge_all(series: &[Series]) -> anyhow::Result<Histogram<u64>> {
    let mut m = hdr::histogram();
    for s in series {
        hdr::merge(&mut m, &s.histogram)?;
    }
    Ok(m)
}

fn summed_counts(series: &[Series]) -> Map<String, Value> {
    let mut out = Map::new();
    for k in SUMMED {
        let vals: Vec<f64> = series.iter().filter_map(|s| s.result.as_ref()?.get(*k)?.as_f64()).collect();
        if !vals.is_empty() {
            let sum: f64 = vals.iter().sum();
            out.insert((*k).into(), if sum.fract() == 0.0 { json!(sum as u64) } else { json!(sum) });
        }
    }
    out
}

const COLUMNS: [(&str, f64); 6] =
    [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999), ("p99.99", 0.9999), ("max", 1.0)];

fn cell(h: &Histogram<u64>, q: f64) -> String {
    if h.is_empty() {
        return "-".into();
    }
    let v = if q >= 1.0 { h.max() } else { h.value_at_quantile(q) };
    fmt_us(v as f64)
}

/// The markdown percentile table: one row per input, and the merge.
pub fn markdown(series: &[Series], merged: &Histogram<u64>, tag: &str) -> String {
    let mut s = format!("Latency percentiles (`{tag}`)\n\n| input | verdict | samples |");
    for (c, _) in COLUMNS {
        s.push_str(&format!(" {c} |"));
    }
    s.push_str("\n|---|---|--:|");
    s.push_str(&"--:|".repeat(COLUMNS.len()));
    s.push('\n');
    let mut row = |label: &str, verdict: &str, h: &Histogram<u64>| {
        s.push_str(&format!("| {label} | {verdict} | {} |", h.len()));
        for (_, q) in COLUMNS {
            if h.is_empty() {
                s.push_str(" no samples |");
            } else {
                s.push_str(&format!(" {} |", cell(h, q)));
            }
        }
        s.push('\n');
    };
    for x in series {
        let verdict = match x.result.as_ref().map(|r| &r["verdict"]) {
            Some(v) if v["pass"] == true => "PASS".to_string(),
            Some(v) if v["pass"] == false => {
                format!("FAIL: {}", v["reasons"].get(0).and_then(Value::as_str).unwrap_or("").replace('|', "/"))
            }
            _ => "-".into(),
        };
        row(&x.label, &verdict, &x.histogram);
    }
    if series.len() > 1 {
        row("**merged**", "", merged);
    }
    s
}

/// Percentile-distribution plot: latency (ms) against percentile on the
/// usual log scale of 1/(1 - p).
pub fn plot(path: &str, title: &str, series: &[Series], merged: &Histogram<u64>) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let mut lines: Vec<(String, Vec<(f64, f64)>)> =
        series.iter().map(|s| (s.label.clone(), points(&s.histogram))).collect();
    if series.len() > 1 {
        lines.push(("merged".into(), points(merged)));
    }
    let max_count = series.iter().map(|s| s.histogram.len()).max().unwrap_or(1).max(merged.len());
    // Up to the nines the samples can support (at least 99%, at most 99.9999%).
    let x_max = ((max_count.max(100) as f64).log10().ceil()).clamp(2.0, 6.0);
    let y_max = lines.iter().flat_map(|(_, p)| p.iter().map(|(_, y)| *y)).fold(0.0f64, f64::max).max(0.001) * 1.1;
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("--plot {path}: {e}");
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_labels(x_max as usize + 1)
        .x_label_formatter(&|x| {
            let p = 100.0 * (1.0 - 10f64.powf(-x));
            let digits = (x.round() as usize).saturating_sub(2);
            format!("{p:.digits$}%")
        })
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (label, pts)) in lines.into_iter().enumerate() {
        let color = if label == "merged" { BLACK.to_rgba() } else { Palette99::pick(i).to_rgba() };
        let pts: Vec<(f64, f64)> = pts.into_iter().map(|(x, y)| (x.min(x_max), y)).collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// (−log10(1 − quantile), value in ms) along the distribution.
fn points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut pts = Vec::new();
    for v in h.iter_quantiles(10) {
        let q = v.quantile_iterated_to();
        let x = if q >= 1.0 { 7.0 } else { -(1.0 - q).log10() };
        pts.push((x, h.highest_equivalent(v.value_iterated_to()) as f64 / 1000.0));
    }
    pts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(seed: u64, n: usize) -> Vec<u64> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                1 + (x >> 33) % 2_000_000
            })
            .collect()
    }

    /// Two runs' histograms, each through the format the tool writes
    /// (an interval log and a JSON result), merged by `report`'s own
    /// loader: equal, bucket for bucket, to one histogram of every sample.
    #[test]
    fn merging_two_runs_equals_one_run_over_both_samples() {
        let dir = std::env::temp_dir().join(format!("moonx-lt-merge-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (samples(7, 20_000), samples(8, 15_000));
        let mut one = hdr::histogram();
        for v in a.iter().chain(&b) {
            one.record(*v).unwrap();
        }
        // Run A as an interval log of several intervals.
        let start = std::time::SystemTime::now();
        let log_path = dir.join("a.hlog");
        let mut log = hdr::HdrLog::create(log_path.to_str().unwrap(), start, "test").unwrap();
        for (k, chunk) in a.chunks(6000).enumerate() {
            let mut h = hdr::histogram();
            for v in chunk {
                h.record(*v).unwrap();
            }
            log.write(
                "latency",
                &h,
                start + std::time::Duration::from_secs(k as u64),
                std::time::Duration::from_secs(1),
            )
            .unwrap();
        }
        log.flush().unwrap();
        // Run B as a JSON result.
        let mut hb = hdr::histogram();
        for v in &b {
            hb.record(*v).unwrap();
        }
        let json_path = dir.join("b.json");
        let result = json!({"schema": 1, "scenario": "fanout", "lost": 0, "measured": b.len(),
            "verdict": {"pass": true}, "hdr": {"latency": hdr::encode(&hb)}});
        std::fs::write(&json_path, format!("{result}\n")).unwrap();

        let mut series = load(log_path.to_str().unwrap(), None).unwrap();
        series.extend(load(json_path.to_str().unwrap(), None).unwrap());
        assert_eq!(series.len(), 2);
        let merged = merge_all(&series).unwrap();
        assert_eq!(merged, one, "merge differs from one histogram of both runs' samples");
        assert_eq!(merged.len(), (a.len() + b.len()) as u64);
        for q in [0.5, 0.9, 0.99, 0.999, 0.9999] {
            assert_eq!(merged.value_at_quantile(q), one.value_at_quantile(q));
        }
        let table = markdown(&series, &merged, "latency");
        assert!(table.contains("| **merged** |") && table.contains("| b.json | PASS | 15000 |"), "{table}");
        let svg = dir.join("plot.svg");
        plot(svg.to_str().unwrap(), "t", &series, &merged).unwrap();
        let svg = std::fs::read_to_string(svg).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("merged") && svg.contains("polyline"), "{}", &svg[..200]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
