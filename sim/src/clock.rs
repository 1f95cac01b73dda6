//! Clocks per machine (issue 17, item 2): every simulated driver, sweeper, refresh, selection,
//! release, creation and boot agent reads its own clock, which is off the true (virtual) time by a
//! seeded skew and drifts from it, never by more than [`MAX_OFFSET_MS`]. The true time is the
//! world's (`World::now`): the invariants judge with it, never with a machine's reading.
//!
//! Safety must hold under any skew: a machine's clock may decide when it *tries* something, but
//! whether a write is allowed is the store's decision. Liveness may suffer (a take-over that waits
//! too long, or one that comes too early and is refused), and the summary counts by how much.

use post_provision::timestamp::Timestamp;

use crate::rng::Rng;

/// The largest offset of a machine's clock from the true time: NTP-less machines in one region
/// stay within a minute of each other (issue 17: "seeded skew up to ±60 s").
pub const MAX_OFFSET_MS: i64 = 60_000;

/// One machine's clock: `reading = true time + skew + drift × elapsed`, clamped to
/// ±[`MAX_OFFSET_MS`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MachineClock {
    /// The offset at the start of the seed, in milliseconds.
    pub skew_ms: i64,
    /// How fast the offset grows, in parts per million of the elapsed true time.
    pub drift_ppm: i64,
}

impl MachineClock {
    /// A clock for a seed whose machines are off by at most `max_skew_ms`; drift only where
    /// there is skew (a calm seed keeps every clock true).
    pub fn draw(rng: &mut Rng, max_skew_ms: i64) -> MachineClock {
        if max_skew_ms == 0 {
            return MachineClock::default();
        }
        let skew_ms = rng.range(0, 2 * max_skew_ms as u64) as i64 - max_skew_ms;
        let drift_ppm = rng.range(0, 4_000) as i64 - 2_000;
        MachineClock { skew_ms, drift_ppm }
    }

    /// The offset from the true time after `elapsed_ms` of true time since the start.
    pub fn offset_ms(&self, elapsed_ms: i64) -> i64 {
        (self.skew_ms + self.drift_ppm * elapsed_ms / 1_000_000).clamp(-MAX_OFFSET_MS, MAX_OFFSET_MS)
    }

    /// What this machine reads when the true time is `base_unix` seconds plus `elapsed_ms`.
    pub fn read(&self, base_unix: i64, elapsed_ms: i64) -> Timestamp {
        let millis = base_unix * 1_000 + elapsed_ms + self.offset_ms(elapsed_ms);
        Timestamp::from_unix_secs(millis.div_euclid(1_000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_stays_within_a_minute_of_the_true_time() {
        let mut rng = Rng::new(3);
        for _ in 0..200 {
            let clock = MachineClock::draw(&mut rng, MAX_OFFSET_MS);
            for elapsed_ms in [0, 1_000, 3_600_000, 6 * 3_600_000] {
                let offset = clock.read(1_000, elapsed_ms).unix_secs() * 1_000 - (1_000_000 + elapsed_ms);
                assert!(offset.abs() <= MAX_OFFSET_MS + 1_000, "{clock:?} at {elapsed_ms}: {offset}");
            }
        }
        assert_eq!(MachineClock::draw(&mut rng, 0).read(5, 2_500).unix_secs(), 7, "a calm clock is true");
    }
}
