//! The price frames a shard has queued since its last completed sweep, one
//! copy for all of its `prices` subscribers.
//!
//! Offsets are absolute (bytes since the shard started), so a subscriber's
//! place in the log ([`super::outbox::Outbox`]'s cursor) survives trims. A
//! sweep trims only what every subscriber has passed: each one was written,
//! or had its part copied into its own queue for its driver.

/// Above this capacity an emptied log gives its buffer back.
const KEEP_CAPACITY: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct PriceLog {
    buf: Vec<u8>,
    /// The offset of `buf[0]`.
    base: u64,
}

impl PriceLog {
    /// The offset just past the last frame.
    pub fn head(&self) -> u64 {
        self.base + self.buf.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Appends one update's frame.
    pub fn append(&mut self, frame: &[u8]) {
        self.buf.extend_from_slice(frame);
    }

    /// The bytes from `cursor` to the head. Every cursor is at or past
    /// `base` (a sweep trims only what every subscriber has passed).
    pub fn since(&self, cursor: u64) -> &[u8] {
        debug_assert!(cursor >= self.base && cursor <= self.head());
        let start = (cursor.saturating_sub(self.base) as usize).min(self.buf.len());
        &self.buf[start..]
    }

    /// Forgets everything before `offset`: every subscriber is past it.
    pub fn trim_to(&mut self, offset: u64) {
        let n = (offset - self.base) as usize;
        self.buf.drain(..n);
        self.base = offset;
        if self.buf.is_empty() && self.buf.capacity() > KEEP_CAPACITY {
            self.buf = Vec::new();
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.buf.len()
    }
}
