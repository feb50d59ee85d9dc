//! A warning that repeats unchanged (every reconnect attempt of an outage, say) is let through
//! once per interval, with the count held back, so it cannot flood the journal.

use std::time::{Duration, Instant};

/// How often a warning that keeps repeating unchanged is let through.
pub const REPEAT_EVERY: Duration = Duration::from_secs(300);

/// Keeps a warning that repeats (every reconnect attempt of an outage, say) from flooding the
/// journal: a new or changed message passes at once, an identical one at most every
/// `REPEAT_EVERY`, carrying how many were held back.
#[derive(Debug, Default)]
pub struct Repeats {
    last: Option<(String, Instant)>,
    held_back: u64,
}

impl Repeats {
    /// An empty limiter, usable in a `static`.
    pub const fn new() -> Repeats {
        Repeats {
            last: None,
            held_back: 0,
        }
    }

    /// `Some(held_back)` when a warning with this text should be logged now.
    pub fn admit(&mut self, text: &str) -> Option<u64> {
        self.admit_at(text, Instant::now())
    }

    fn admit_at(&mut self, text: &str, now: Instant) -> Option<u64> {
        match &self.last {
            Some((last, at)) if last == text && now.duration_since(*at) < REPEAT_EVERY => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some((text.to_owned(), now));
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }

    /// The condition is over (connected again): the next warning passes whatever it says.
    pub fn clear(&mut self) {
        self.last = None;
        self.held_back = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_warnings_pass_once_per_interval_with_the_count_held_back() {
        let mut repeats = Repeats::default();
        let start = Instant::now();
        assert_eq!(repeats.admit_at("connection refused", start), Some(0));
        for second in 1..=10 {
            let at = start + Duration::from_secs(second);
            assert_eq!(repeats.admit_at("connection refused", at), None);
        }
        assert_eq!(
            repeats.admit_at("connection refused", start + REPEAT_EVERY),
            Some(10)
        );
        assert_eq!(
            repeats.admit_at("connection refused", start + REPEAT_EVERY),
            None
        );
    }

    #[test]
    fn a_changed_warning_passes_at_once_and_clear_resets() {
        let mut repeats = Repeats::default();
        let start = Instant::now();
        assert_eq!(repeats.admit_at("timed out", start), Some(0));
        assert_eq!(repeats.admit_at("timed out", start), None);
        assert_eq!(repeats.admit_at("refused", start), Some(1));
        repeats.clear();
        assert_eq!(repeats.admit_at("refused", start), Some(0));
    }
}
