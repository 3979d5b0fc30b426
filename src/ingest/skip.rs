//! Finding the end of a Kafka batch the consumer cannot decode, sans-IO.
//!
//! When librdkafka cannot decode a record batch (a corrupt or unknown
//! compression, a malformed batch), it reports the batch's base offset and
//! fetches the same batch again forever: the partition is stuck. It does
//! not say where the batch ends. Fetching from an offset inside the batch
//! returns the whole batch again (and the same error); fetching from past
//! its last offset skips it. So the first offset past the batch is found by
//! probing: double the distance until a probe gets past, then halve the gap
//! between the last probe that failed and the first that passed. A probe
//! "passes" when the partition yields a record at or after it (or another
//! error with a different base), or when it reaches the partition's end.
//! About 2·log2(records in the batch) fetches, and no valid record after
//! the batch is skipped: consumption resumes exactly at the batch's end.
//!
//! This module decides the next probe; the consumer seeks and reports what
//! each probe saw. Nothing here does I/O or reads a clock.

/// What a probe at some offset saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The same undecodable batch again: the probe is inside it.
    Stuck,
    /// A record at or after the probe, or a different batch's error, or
    /// the partition's end: the probe is past the batch.
    Past,
}

/// The next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Seek here and report what the fetch saw.
    Probe(i64),
    /// The batch ends just before this offset: resume consuming here.
    Resume(i64),
}

/// The search for one stuck batch's end.
#[derive(Debug, Clone)]
pub struct BatchEnd {
    /// The bad batch's base offset (the first offset it covers).
    pub base: i64,
    /// The partition's end when the batch was found: the batch ends before.
    end: i64,
    /// The highest offset known to be inside the batch.
    inside: i64,
    /// The lowest offset known to be past it.
    past: i64,
    /// Distance of the next probe past `inside` while none has passed.
    step: i64,
}

impl BatchEnd {
    /// A batch at `base` that cannot be decoded, in a partition whose high
    /// watermark is `end` (at least `base + 1`: the batch is in it).
    pub fn new(base: i64, end: i64) -> Self {
        let end = end.max(base + 1);
        Self { base, end, inside: base, past: end, step: 1 }
    }

    /// Where to probe next, or where to resume.
    pub fn next(&self) -> Next {
        if self.past <= self.inside + 1 {
            return Next::Resume(self.past);
        }
        if self.past < self.end {
            // Bisect between the last offset inside and the first past.
            return Next::Probe(self.inside + (self.past - self.inside) / 2);
        }
        // Nothing has passed yet: the partition's end is past the batch
        // anyway, so probing stops short of it.
        Next::Probe((self.inside + self.step).min(self.end - 1).max(self.inside + 1))
    }

    /// Records what the probe at `at` saw.
    pub fn seen(&mut self, at: i64, seen: Seen) {
        match seen {
            Seen::Stuck => {
                self.inside = self.inside.max(at);
                self.step = self.step.saturating_mul(2);
            }
            Seen::Past => self.past = self.past.min(at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the search against a batch covering `base..=last` in a
    /// partition ending at `end`; returns where it resumes and the probes.
    fn search(base: i64, last: i64, end: i64) -> (i64, usize) {
        let mut s = BatchEnd::new(base, end);
        let mut probes = 0;
        loop {
            match s.next() {
                Next::Resume(at) => return (at, probes),
                Next::Probe(at) => {
                    probes += 1;
                    assert!(at > base && at < end, "probes stay inside the partition: {at}");
                    assert!(probes < 200, "the search ends");
                    s.seen(at, if at <= last { Seen::Stuck } else { Seen::Past });
                }
            }
        }
    }

    #[test]
    fn resumes_exactly_after_the_batch_whatever_its_size_and_place() {
        for (base, last, end) in [
            (0, 0, 1),
            (0, 0, 10),
            (5, 7, 100),
            (10, 10, 11),
            (100, 1_099, 5_000),
            (0, 99_999, 100_000),
            (42, 42 + 65_535, 1_000_000),
        ] {
            let (at, probes) = search(base, last, end);
            assert_eq!(at, last + 1, "batch {base}..={last} in ..{end}");
            let size = (last - base + 1) as f64;
            assert!(probes as f64 <= 2.0 * size.log2().ceil() + 2.0, "{probes} probes for {size} records");
        }
    }

    #[test]
    fn a_batch_at_the_end_of_the_partition_resumes_at_the_end() {
        assert_eq!(search(7, 9, 10).0, 10);
        let s = BatchEnd::new(9, 10);
        assert_eq!(s.next(), Next::Resume(10), "a one-offset batch at the end needs no probe");
    }
}
