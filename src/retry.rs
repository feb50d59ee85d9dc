//! Retry delays: exponential, capped, with full jitter so that a fleet that failed together
//! does not retry together.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use rand::Rng;

/// An endless sequence of retry delays. Each is drawn uniformly from `[floor, exponential]`
/// ("full jitter"), where the exponential part doubles from `base` up to `cap`.
pub struct Backoff {
    base: Duration,
    cap: Duration,
    floor: Duration,
    schedule: ExponentialBackoff,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration, floor: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            floor,
            schedule: Self::schedule(base, cap),
        }
    }

    fn schedule(base: Duration, cap: Duration) -> ExponentialBackoff {
        ExponentialBuilder::default()
            .with_min_delay(base)
            .with_max_delay(cap)
            .with_factor(2.0)
            .without_max_times()
            .build()
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.schedule.next().unwrap_or(self.cap).max(self.floor);
        rand::rng().random_range(self.floor..=ceiling)
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.schedule = Self::schedule(self.base, self.cap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_are_capped_and_jittered() {
        let (base, cap, floor) = (
            Duration::from_secs(1),
            Duration::from_secs(60),
            Duration::from_secs(1),
        );
        let mut backoff = Backoff::new(base, cap, floor);
        let delays: Vec<_> = (0..200).map(|_| backoff.next_delay()).collect();
        assert!(delays.iter().all(|d| *d >= floor && *d <= cap));
        // Attempt n may wait up to base * 2^n: the first is at most 1 s, the fourth at most 8 s.
        assert!(delays[0] <= Duration::from_secs(1));
        assert!(delays[3] <= Duration::from_secs(8));
        // Full jitter: late delays spread over the whole range instead of sitting at the cap.
        let late = &delays[20..];
        assert!(late.iter().any(|d| *d < Duration::from_secs(30)));
        assert!(late.iter().any(|d| *d > Duration::from_secs(30)));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_secs(1));
    }
}
