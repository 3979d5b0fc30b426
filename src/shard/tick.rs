//! The shard's coarse shared timer: one task that wakes connections whose
//! deadline passed (auth, ping, pong, close grace, parking), instead of a
//! timer per connection, and once a second hands memory nothing needed
//! back to the kernel.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::Shard;
use crate::clock::Clock;

/// Runs until dropped, waking every `tick`.
pub async fn run_tick(shard: Rc<RefCell<Shard>>, clock: Clock, tick: Duration) {
    let stats = shard.borrow().stats.clone();
    let mut parks_seen = stats.parks.get();
    let mut last_release = Instant::now();
    loop {
        glommio::timer::sleep(tick).await;
        shard.borrow_mut().wake_due(clock.mono_ms());
        // Once a second: free the spare buffers nothing needed, and if that
        // or parking freed memory, hand it back to the kernel.
        if last_release.elapsed() >= Duration::from_secs(1) {
            last_release = Instant::now();
            let trimmed = shard.borrow_mut().trim_spares();
            let parks = stats.parks.get();
            if parks != parks_seen || trimmed > 0 {
                parks_seen = parks;
                crate::sys::release_free_memory();
            }
        }
    }
}

/// The tick for these deadlines: an eighth of the shortest, within 5-250 ms
/// (a deadline is met within one tick).
pub fn tick_for(deadlines: &[Duration]) -> Duration {
    let shortest = deadlines.iter().copied().min().unwrap_or(Duration::from_secs(1));
    (shortest / 8).clamp(Duration::from_millis(5), Duration::from_millis(250))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tick_is_an_eighth_of_the_shortest_deadline_within_bounds() {
        let ms = Duration::from_millis;
        assert_eq!(tick_for(&[ms(30_000), ms(5_000), ms(10_000)]), ms(250));
        assert_eq!(tick_for(&[ms(800)]), ms(100));
        assert_eq!(tick_for(&[ms(1)]), ms(5));
        assert_eq!(tick_for(&[]), ms(125));
    }
}
