//! IoT Core's per-connection quotas (publishes per second, bytes per second).
//!
//! Two rules together:
//! - a token bucket per quota (GCRA form) paces publishes evenly at the quota's rate, with a
//!   small burst after idle time: a backlog goes out as one publish every 1/rate seconds, not
//!   as a whole second's worth at once followed by a pause. Delivery jitter then moves single
//!   publishes around a window edge, not bursts (a burst next to the next one doubled what one
//!   second at the broker held);
//! - a sliding window of a little over a second caps the total: in no window do more
//!   publishes or bytes go out than allowed, burst included.
//!
//! The publisher asks before each publish and waits, never spins. Pure: time comes in as an
//! argument.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// IoT Core counts each second at its end; a publish sent at the end of one second may arrive
/// in the next (network jitter, the broker's own queues). Counting over a slightly longer
/// window keeps every second at the broker within the quota for jitter up to 50 ms, for 5 % of
/// the throughput (measured in docs/benchmarks.md, "Quota run"). The buckets' rates are the
/// quotas per `WINDOW` too, so that steady pacing never runs into the window's cap.
const WINDOW: Duration = Duration::from_millis(1050);
/// Most publishes that go out back to back after idle time.
const MAX_BURST: u64 = 10;
/// The burst is at most this share of the quota (a tenth of a window's worth), for both
/// publishes and bytes.
const BURST_DIVISOR: u64 = 10;

/// A token bucket in GCRA form: `tat` is the theoretical arrival time of the next unit; a
/// request may go once `tat - tolerance <= now`.
#[derive(Debug, Clone)]
struct Bucket {
    /// Units (publishes or bytes) per `WINDOW`; 0 lifts the limit.
    limit: u64,
    /// How far ahead of `now` the bucket may run: the burst.
    tolerance: Duration,
    tat: Option<Instant>,
}

impl Bucket {
    fn new(limit: u64, burst_units: u64) -> Bucket {
        let mut bucket = Bucket {
            limit,
            tolerance: Duration::ZERO,
            tat: None,
        };
        bucket.tolerance = bucket.time_for(burst_units);
        bucket
    }

    /// How long `units` take at the bucket's rate.
    fn time_for(&self, units: u64) -> Duration {
        if self.limit == 0 {
            return Duration::ZERO;
        }
        let nanos = WINDOW.as_nanos() * u128::from(units) / u128::from(self.limit);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// When a request may go (`None`: now).
    fn ready_at(&self, now: Instant) -> Option<Instant> {
        let tat = self.tat.filter(|_| self.limit > 0)?;
        let at = tat.checked_sub(self.tolerance).unwrap_or(now);
        (at > now).then_some(at)
    }

    /// Takes `units` at `now`. `drained`: the window's cap held the publish back, so the
    /// bucket refilled meanwhile; start it empty instead, or the refill would go out as a burst
    /// again at the same point of every window.
    fn take(&mut self, units: u64, now: Instant, drained: bool) {
        if self.limit == 0 {
            return;
        }
        let mut start = self.tat.map_or(now, |tat| tat.max(now));
        if drained {
            start = start.max(now + self.tolerance);
        }
        self.tat = Some(start + self.time_for(units));
    }
}

/// The quotas' state for one daemon (kept across reconnects).
pub struct Quota {
    max_publishes: u32,
    max_bytes: u64,
    publishes: Bucket,
    bytes_bucket: Bucket,
    /// The publishes of the last `WINDOW`, with their sizes.
    sent: VecDeque<(Instant, u64)>,
    bytes: u64,
    /// The last `ready_at` answer came from the window's cap.
    capped: bool,
}

impl Quota {
    /// 0 lifts a limit.
    pub fn new(max_publishes: u32, max_bytes: u64) -> Quota {
        Quota {
            max_publishes,
            max_bytes,
            publishes: publish_bucket(max_publishes),
            bytes_bucket: byte_bucket(max_bytes),
            sent: VecDeque::new(),
            bytes: 0,
            capped: false,
        }
    }

    /// New limits (SIGHUP); the last second's publishes still count against them.
    pub fn set_limits(&mut self, max_publishes: u32, max_bytes: u64) {
        self.max_publishes = max_publishes;
        self.max_bytes = max_bytes;
        let (publish_tat, byte_tat) = (self.publishes.tat, self.bytes_bucket.tat);
        self.publishes = publish_bucket(max_publishes);
        self.publishes.tat = publish_tat;
        self.bytes_bucket = byte_bucket(max_bytes);
        self.bytes_bucket.tat = byte_tat;
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
        let mut capped_at = None;
        if self.max_publishes > 0 && self.sent.len() >= self.max_publishes as usize {
            let index = self.sent.len() - self.max_publishes as usize;
            capped_at = Some(self.sent[index].0 + WINDOW);
        }
        // A single publish larger than the byte limit goes out alone, in an empty window.
        let allowed = self.max_bytes.max(size);
        if self.max_bytes > 0 && self.bytes + size > allowed {
            let mut freed = 0;
            for (at, bytes) in &self.sent {
                freed += bytes;
                if self.bytes - freed + size <= allowed {
                    let at_bytes = *at + WINDOW;
                    capped_at = Some(capped_at.map_or(at_bytes, |r: Instant| r.max(at_bytes)));
                    break;
                }
            }
        }
        let paced_at = self
            .publishes
            .ready_at(now)
            .into_iter()
            .chain(self.bytes_bucket.ready_at(now))
            .max();
        if capped_at.is_some() {
            self.capped = capped_at > paced_at;
        }
        capped_at.max(paced_at)
    }

    /// Records a publish that went out at `now`.
    pub fn record(&mut self, size: u64, now: Instant) {
        let drained = std::mem::take(&mut self.capped);
        self.publishes.take(1, now, drained);
        self.bytes_bucket.take(size, now, drained);
        if self.max_publishes > 0 || self.max_bytes > 0 {
            self.sent.push_back((now, size));
            self.bytes += size;
        }
    }
}

/// Up to `MAX_BURST` publishes (a tenth of the quota for small quotas) back to back.
fn publish_bucket(max_publishes: u32) -> Bucket {
    let burst = (u64::from(max_publishes) / BURST_DIVISOR).clamp(1, MAX_BURST);
    // GCRA: a tolerance of n-1 intervals lets n requests through at once.
    Bucket::new(u64::from(max_publishes), burst - 1)
}

/// A tenth of the byte quota back to back; a larger publish waits for the bucket to be full.
fn byte_bucket(max_bytes: u64) -> Bucket {
    Bucket::new(max_bytes, max_bytes / BURST_DIVISOR)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends as fast as the quota allows for `seconds` of (paused) tokio time, sleeping until
    /// each `ready_at` as the publisher does; returns the send times and sizes.
    async fn simulate(quota: &mut Quota, size: u64, seconds: u64) -> Vec<(Instant, u64)> {
        simulate_late(quota, size, seconds, Duration::ZERO).await
    }

    /// Like [`simulate`], waking `late` after each `ready_at`, as a real timer and a busy
    /// runtime do.
    async fn simulate_late(
        quota: &mut Quota,
        size: u64,
        seconds: u64,
        late: Duration,
    ) -> Vec<(Instant, u64)> {
        let start = Instant::now();
        let mut sent = Vec::new();
        while Instant::now() < start + Duration::from_secs(seconds) {
            let now = Instant::now();
            match quota.ready_at(size, now) {
                None => {
                    quota.record(size, now);
                    sent.push((now, size));
                }
                Some(at) => {
                    assert!(at > now, "ready_at must move forward");
                    tokio::time::sleep_until(at + late).await;
                }
            }
        }
        sent
    }

    /// The most publishes and bytes in any window of `length` (sliding, from each send).
    fn worst_window(sent: &[(Instant, u64)], length: Duration) -> (usize, u64) {
        let mut worst = (0, 0);
        for (i, (start, _)) in sent.iter().enumerate() {
            let in_window: Vec<_> = sent[i..]
                .iter()
                .take_while(|(at, _)| at.duration_since(*start) < length)
                .collect();
            worst.0 = worst.0.max(in_window.len());
            worst.1 = worst.1.max(in_window.iter().map(|(_, b)| b).sum());
        }
        worst
    }

    fn worst_second(sent: &[(Instant, u64)]) -> (usize, u64) {
        worst_window(sent, WINDOW)
    }

    /// Publishes per 100 ms slot, counted from the first send.
    fn per_slot(sent: &[(Instant, u64)]) -> Vec<usize> {
        let Some((first, _)) = sent.first() else {
            return Vec::new();
        };
        let mut slots = Vec::new();
        for (at, _) in sent {
            let slot = (at.duration_since(*first).as_millis() / 100) as usize;
            if slots.len() <= slot {
                slots.resize(slot + 1, 0);
            }
            slots[slot] += 1;
        }
        slots
    }

    /// Delivery that keeps order but delays each publish by 0-200 ms, the delay rising over
    /// each 2 s and falling back at once: the adversarial case for a sender that bursts
    /// (a burst before the fall lands next to the one after it). `phase` shifts the sawtooth.
    fn jittered(sent: &[(Instant, u64)], phase: Duration) -> Vec<(Instant, u64)> {
        const PERIOD: Duration = Duration::from_secs(2);
        const MAX_DELAY_MS: u128 = 200;
        let Some((first, _)) = sent.first() else {
            return Vec::new();
        };
        let mut last = *first;
        sent.iter()
            .map(|(at, size)| {
                let position = (at.duration_since(*first) + phase).as_millis() % PERIOD.as_millis();
                let delay =
                    Duration::from_millis((position * MAX_DELAY_MS / PERIOD.as_millis()) as u64);
                last = last.max(*at + delay);
                (last, *size)
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_publish_limit_in_any_second() {
        let mut quota = Quota::new(100, 0);
        let sent = simulate(&mut quota, 64, 5).await;
        assert_eq!(worst_second(&sent).0, 100);
        // Paced at 100 per window of 1.05 s, plus the first burst.
        assert!((470..=501).contains(&sent.len()), "{}", sent.len());
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_byte_limit_in_any_second() {
        let mut quota = Quota::new(100, 512 * 1024);
        let sent = simulate(&mut quota, 100 * 1024, 5).await;
        let (count, bytes) = worst_second(&sent);
        assert!(bytes <= 512 * 1024, "{bytes}");
        assert_eq!(count, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_backlog_is_paced_evenly_not_in_bursts() {
        let mut quota = Quota::new(100, 0);
        let sent = simulate(&mut quota, 64, 5).await;
        let slots = per_slot(&sent);
        // At most the burst (10) on top of the 100 ms share at the start; then never more
        // than the share, and once the burst has left the window (one short dip where it
        // does), about one tenth of the quota in every 100 ms.
        assert!(slots[0] <= 20, "{slots:?}");
        assert!(slots[1..].iter().all(|&n| n <= 11), "{slots:?}");
        let steady = &slots[12..slots.len() - 1];
        assert!(
            steady.iter().all(|n| (8..=11).contains(n)),
            "publishes per 100 ms: {slots:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_are_paced_evenly_too() {
        let mut quota = Quota::new(0, 100 * 1000);
        let sent = simulate(&mut quota, 1000, 5).await;
        assert!(worst_second(&sent).1 <= 100 * 1000);
        let slots = per_slot(&sent);
        assert!(slots[1..].iter().all(|&n| n <= 11), "{slots:?}");
        let steady = &slots[12..slots.len() - 1];
        assert!(
            steady.iter().all(|n| (8..=11).contains(n)),
            "1000-byte publishes per 100 ms: {slots:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn jittered_delivery_keeps_every_second_near_the_quota() {
        let mut quota = Quota::new(100, 0);
        let sent = simulate(&mut quota, 64, 6).await;
        for phase_ms in (0..2000).step_by(100) {
            let arrived = jittered(&sent, Duration::from_millis(phase_ms));
            let (worst, _) = worst_window(&arrived, Duration::from_secs(1));
            // Ordered delivery whose delay falls by 200 ms squeezes 1.2 s of sending into
            // one second: 120 is the floor for any sender at the quota's rate; bursts of a
            // whole second's worth made it 200.
            assert!(worst <= 120, "{worst} in one second at phase {phase_ms} ms");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn steady_pacing_does_not_rebuild_the_burst_at_the_window_cap() {
        let mut quota = Quota::new(100, 0);
        let sent = simulate(&mut quota, 64, 4).await;
        let slots = per_slot(&sent);
        // Only the first slot may hold the burst.
        assert!(slots[1..].iter().all(|&n| n <= 11), "{slots:?}");
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

    /// A publisher woken late (a real timer, a busy runtime) still gets the quota's rate:
    /// lateness is not carried into the next publish's slot.
    #[tokio::test(start_paused = true)]
    async fn waking_late_costs_no_throughput() {
        const SIZE: u64 = 8 * 1024;
        const SECONDS: u64 = 20;
        let ideal = (SECONDS * 512 * 1024) as f64 / WINDOW.as_secs_f64() / SIZE as f64;
        for late_ms in [1, 5] {
            let mut quota = Quota::new(100, 512 * 1024);
            let late = Duration::from_millis(late_ms);
            let sent = simulate_late(&mut quota, SIZE, SECONDS, late).await;
            assert!(
                sent.len() as f64 >= 0.99 * ideal,
                "{} publishes of {ideal:.0} waking {late_ms} ms late",
                sent.len()
            );
        }
    }
}
