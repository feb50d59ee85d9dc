//! IoT Core's per-connection quotas (publishes per second, bytes per second), enforced as a
//! sliding window of a little over a second: in no second do more publishes or bytes go out
//! than allowed, whatever the backlog. The publisher asks before each publish and waits, never spins.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// IoT Core counts each second at its end; a publish sent at the end of one second may arrive
/// in the next (network jitter, the broker's own queues). Counting over a slightly longer
/// window keeps every second at the broker within the quota for jitter up to 50 ms, for 5 % of
/// the throughput (measured in docs/benchmarks.md, "Quota run").
const WINDOW: Duration = Duration::from_millis(1050);

/// The publishes of the last second, with their sizes.
pub struct Quota {
    max_publishes: u32,
    max_bytes: u64,
    sent: VecDeque<(Instant, u64)>,
    bytes: u64,
}

impl Quota {
    /// 0 lifts a limit.
    pub fn new(max_publishes: u32, max_bytes: u64) -> Quota {
        Quota {
            max_publishes,
            max_bytes,
            sent: VecDeque::new(),
            bytes: 0,
        }
    }

    /// New limits (SIGHUP); the last second's publishes still count against them.
    pub fn set_limits(&mut self, max_publishes: u32, max_bytes: u64) {
        self.max_publishes = max_publishes;
        self.max_bytes = max_bytes;
    }

    /// `None` when a publish of `size` bytes may go out at `now`, else the moment it may.
    pub fn ready_at(&mut self, size: u64, now: Instant) -> Option<Instant> {
        while let Some((at, bytes)) = self.sent.front().copied() {
            if now.duration_since(at) < WINDOW {
                break;
            }
            self.sent.pop_front();
            self.bytes -= bytes;
        }
        let mut ready = None;
        if self.max_publishes > 0 && self.sent.len() >= self.max_publishes as usize {
            let index = self.sent.len() - self.max_publishes as usize;
            ready = Some(self.sent[index].0 + WINDOW);
        }
        // A single publish larger than the byte limit goes out alone, in an empty window.
        let allowed = self.max_bytes.max(size);
        if self.max_bytes > 0 && self.bytes + size > allowed {
            let mut freed = 0;
            for (at, bytes) in &self.sent {
                freed += bytes;
                if self.bytes - freed + size <= allowed {
                    let at_bytes = *at + WINDOW;
                    ready = Some(ready.map_or(at_bytes, |r| r.max(at_bytes)));
                    break;
                }
            }
        }
        ready
    }

    /// Records a publish that went out at `now`.
    pub fn record(&mut self, size: u64, now: Instant) {
        if self.max_publishes > 0 || self.max_bytes > 0 {
            self.sent.push_back((now, size));
            self.bytes += size;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends as fast as the quota allows for `seconds`; returns the send times and sizes.
    fn simulate(quota: &mut Quota, size: u64, seconds: u64) -> Vec<(Instant, u64)> {
        let start = Instant::now();
        let mut now = start;
        let mut sent = Vec::new();
        while now < start + Duration::from_secs(seconds) {
            match quota.ready_at(size, now) {
                None => {
                    quota.record(size, now);
                    sent.push((now, size));
                }
                Some(at) => {
                    assert!(at > now, "ready_at must move forward");
                    now = at;
                }
            }
        }
        sent
    }

    fn worst_second(sent: &[(Instant, u64)]) -> (usize, u64) {
        let mut worst = (0, 0);
        for (i, (start, _)) in sent.iter().enumerate() {
            let in_window: Vec<_> = sent[i..]
                .iter()
                .take_while(|(at, _)| at.duration_since(*start) < WINDOW)
                .collect();
            worst.0 = worst.0.max(in_window.len());
            worst.1 = worst.1.max(in_window.iter().map(|(_, b)| b).sum());
        }
        worst
    }

    #[test]
    fn never_more_than_the_publish_limit_in_any_second() {
        let mut quota = Quota::new(100, 0);
        let sent = simulate(&mut quota, 64, 5);
        assert_eq!(worst_second(&sent).0, 100);
        assert!(sent.len() >= 500 && sent.len() <= 501, "{}", sent.len());
    }

    #[test]
    fn never_more_than_the_byte_limit_in_any_second() {
        let mut quota = Quota::new(100, 512 * 1024);
        let sent = simulate(&mut quota, 100 * 1024, 5);
        let (count, bytes) = worst_second(&sent);
        assert!(bytes <= 512 * 1024, "{bytes}");
        assert_eq!(count, 5);
    }

    #[test]
    fn no_limits_never_wait() {
        let mut quota = Quota::new(0, 0);
        let now = Instant::now();
        for _ in 0..10_000 {
            assert_eq!(quota.ready_at(128 * 1024, now), None);
            quota.record(128 * 1024, now);
        }
    }
}
