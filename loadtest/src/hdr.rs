//! HDR histograms on disk: the interval log `--hdr-log` writes (the
//! standard HdrHistogram log format, V2 compressed histograms, readable by
//! HdrHistogram's own `HistogramLogProcessor`), and the base64 V2
//! histograms the JSON result carries, so runs can be merged exactly.
//! Values are microseconds everywhere.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use base64::Engine as _;
use hdrhistogram::serialization::interval_log::{IntervalLogIterator, IntervalLogWriterBuilder, LogEntry, Tag};
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use hdrhistogram::Histogram;

/// 1 µs to 120 s at 3 significant digits: every latency the tool records.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds")
}

/// A latency recorded twice: into the run's total and into the current
/// interval (for the progress line and the interval log).
pub struct Recorder {
    pub tag: &'static str,
    pub total: Histogram<u64>,
    pub interval: Histogram<u64>,
}

impl Recorder {
    pub fn new(tag: &'static str) -> Self {
        Recorder { tag, total: histogram(), interval: histogram() }
    }

    /// Records `us` (at least 1 µs; past 120 s counts as 120 s).
    pub fn record(&mut self, us: u64) {
        let v = us.max(1);
        self.total.saturating_record(v);
        self.interval.saturating_record(v);
    }
}

/// The `--hdr-log` file: one interval histogram per tag per second of the
/// run. Only measured samples go in (warm-up is left out), so the log's
/// intervals add up to the histograms of the result.
pub struct HdrLog {
    file: std::io::BufWriter<std::fs::File>,
    serializer: V2DeflateSerializer,
    base: SystemTime,
    path: String,
}

impl HdrLog {
    /// Creates `path` and writes the header: the tool, the log format
    /// version, StartTime and BaseTime (interval timestamps are seconds
    /// since BaseTime, the start of the run) and the column legend.
    pub fn create(path: &str, start: SystemTime, comment: &str) -> anyhow::Result<HdrLog> {
        let file = std::fs::File::create(path).with_context(|| format!("--hdr-log {path}"))?;
        let mut file = std::io::BufWriter::new(file);
        let secs = start.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        write!(
            file,
            "#[Logged with moonx-loadtest {}]\n#[Histogram log format version 1.3]\n#[{comment}]\n#[Values in microseconds]\n\
             #[StartTime: {secs:.3} (seconds since epoch)]\n#[BaseTime: {secs:.3} (seconds since epoch)]\n\
             \"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\"\n",
            env!("CARGO_PKG_VERSION")
        )?;
        Ok(HdrLog { file, serializer: V2DeflateSerializer::new(), base: start, path: path.to_string() })
    }

    /// Writes `h` as the interval [from, from + length) under `tag`
    /// (nothing when `h` is empty).
    pub fn write(&mut self, tag: &str, h: &Histogram<u64>, from: SystemTime, length: Duration) -> anyhow::Result<()> {
        if h.is_empty() {
            return Ok(());
        }
        let offset = from.duration_since(self.base).unwrap_or_default();
        let mut w =
            IntervalLogWriterBuilder::new().begin_log_with(&mut self.file, &mut self.serializer).context("hdr log")?;
        w.write_histogram(h, offset, length, Tag::new(tag))
            .map_err(|e| anyhow::anyhow!("hdr log {}: {e}", self.path))?;
        Ok(())
    }

    pub fn flush(&mut self) -> anyhow::Result<()> {
        self.file.flush().with_context(|| format!("--hdr-log {}", self.path))
    }
}

/// Base64 of the V2 compressed (deflate) encoding: the text the interval
/// log uses per histogram, kept in the JSON result.
pub fn encode(h: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    V2DeflateSerializer::new().serialize(h, &mut bytes).expect("histogram serialization");
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The inverse of [`encode`]; accepts the uncompressed V2 encoding too.
pub fn decode(text: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(text.trim()).context("histogram base64")?;
    let h: Histogram<u64> =
        Deserializer::new().deserialize(&mut &bytes[..]).map_err(|e| anyhow::anyhow!("histogram: {e:?}"))?;
    Ok(h)
}

/// Adds `from` to `into`, resizing as needed.
pub fn merge(into: &mut Histogram<u64>, from: &Histogram<u64>) -> anyhow::Result<()> {
    if into.high() < from.high() {
        into.auto(true);
    }
    into.add(from).map_err(|e| anyhow::anyhow!("merging histograms: {e:?}"))
}

/// One interval of a log.
pub struct Interval {
    // `report` adds intervals up; their times are checked by the tests.
    pub tag: String,
    #[allow(dead_code)]
    pub start: Duration,
    #[allow(dead_code)]
    pub length: Duration,
    pub histogram: Histogram<u64>,
}

/// Every interval of an interval log (untagged ones get the tag `""`).
pub fn read_log(text: &[u8]) -> anyhow::Result<Vec<Interval>> {
    let mut out = Vec::new();
    for entry in IntervalLogIterator::new(text) {
        match entry {
            Ok(LogEntry::Interval(i)) => out.push(Interval {
                tag: i.tag().map(|t| t.as_str().to_string()).unwrap_or_default(),
                start: i.start_timestamp(),
                length: i.duration(),
                histogram: decode(i.encoded_histogram())?,
            }),
            Ok(_) => {}
            Err(e) => bail!("not an HdrHistogram interval log: {e:?}"),
        }
    }
    Ok(out)
}

/// The intervals of a log added up per tag.
pub fn totals(intervals: &[Interval]) -> anyhow::Result<BTreeMap<String, Histogram<u64>>> {
    let mut out: BTreeMap<String, Histogram<u64>> = BTreeMap::new();
    for i in intervals {
        match out.get_mut(&i.tag) {
            Some(h) => merge(h, &i.histogram)?,
            None => {
                out.insert(i.tag.clone(), i.histogram.clone());
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(seed: u64, n: usize) -> Vec<u64> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                1 + (x >> 33) % 5_000_000
            })
            .collect()
    }

    #[test]
    fn json_encoding_round_trips() {
        let mut h = histogram();
        for v in samples(1, 5000) {
            h.record(v).unwrap();
        }
        let back = decode(&encode(&h)).unwrap();
        assert_eq!(back, h);
        assert_eq!(back.len(), 5000);
    }

    #[test]
    fn interval_log_round_trips_through_the_crates_reader() {
        let dir = std::env::temp_dir().join(format!("moonx-lt-hdr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.hlog");
        let base = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut log = HdrLog::create(path.to_str().unwrap(), base, "test").unwrap();
        let mut written = Vec::new();
        for k in 0..3u64 {
            let mut h = histogram();
            for v in samples(k + 10, 1000 * (k as usize + 1)) {
                h.record(v).unwrap();
            }
            log.write("latency", &h, base + Duration::from_secs(k), Duration::from_secs(1)).unwrap();
            written.push(h);
        }
        log.write("latency", &histogram(), base + Duration::from_secs(3), Duration::from_secs(1)).unwrap();
        log.flush().unwrap();
        let text = std::fs::read(&path).unwrap();
        let head = String::from_utf8_lossy(&text);
        assert!(head.contains("#[StartTime: 1800000000.000 (seconds since epoch)]"), "{head}");
        assert!(
            head.contains("\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\"")
        );
        let read = read_log(&text).unwrap();
        assert_eq!(read.len(), 3, "the empty interval is not written");
        for (k, (r, w)) in read.iter().zip(&written).enumerate() {
            assert_eq!(r.tag, "latency");
            assert_eq!(r.start, Duration::from_secs(k as u64));
            assert_eq!(r.length, Duration::from_secs(1));
            assert_eq!(&r.histogram, w, "interval {k}");
        }
        let mut all = histogram();
        for w in &written {
            all.add(w).unwrap();
        }
        assert_eq!(totals(&read).unwrap()["latency"], all);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_what_is_not_a_log() {
        assert!(read_log(b"{\"schema\":1}\n").is_err());
    }
}
