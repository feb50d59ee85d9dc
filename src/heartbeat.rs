//! Signs of life for the systemd watchdog: each main task beats from inside its own loop, so a
//! task that is stuck (blocked thread, an await that never returns) goes quiet and the
//! watchdog kills and restarts the daemon, instead of a timer pinging on its behalf.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// While a task sits in a wait that is healthy however long it lasts (no client connects, the
/// next refresh is hours away), it beats this often.
const BEAT_WHILE_WAITING: Duration = Duration::from_secs(2);

/// Held by a task; `beat` says "my loop just went round".
pub struct Heartbeat {
    last: watch::Sender<Instant>,
}

/// Read by the supervisor: when did the task last beat?
#[derive(Clone)]
pub struct Pulse {
    pub task: &'static str,
    last: watch::Receiver<Instant>,
}

/// A heartbeat for `task` and the pulse that watches it.
pub fn channel(task: &'static str) -> (Heartbeat, Pulse) {
    let (last, last_rx) = watch::channel(Instant::now());
    (
        Heartbeat { last },
        Pulse {
            task,
            last: last_rx,
        },
    )
}

impl Heartbeat {
    pub fn beat(&self) {
        self.last.send_replace(Instant::now());
    }

    /// Awaits `work`, beating while it is pending. Only for waits that are healthy at any
    /// length (each is bounded or driven by the outside world); never wrap the task's own
    /// progress in it, or a stuck task would look alive.
    pub async fn waiting<F: Future>(&self, work: F) -> F::Output {
        tokio::pin!(work);
        let mut ticker = tokio::time::interval(BEAT_WHILE_WAITING);
        loop {
            tokio::select! {
                output = &mut work => {
                    self.beat();
                    return output;
                }
                _ = ticker.tick() => self.beat(),
            }
        }
    }

    /// Awaits `work`, a step that must finish within `limit` (e.g. an AWS call bounded by the
    /// SDK's timeouts): beats while it is pending for up to `limit`, then goes quiet, so a step
    /// stuck past its bound shows as a stalled task instead of looking alive forever.
    pub async fn bounded<F: Future>(&self, limit: Duration, work: F) -> F::Output {
        self.beat();
        tokio::pin!(work);
        match tokio::time::timeout(limit, self.waiting(&mut work)).await {
            Ok(output) => output,
            Err(_) => work.await,
        }
    }
}

impl Pulse {
    pub fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(*self.last.borrow())
    }
}

/// The first task that has been silent for longer than `limit`, if any.
pub fn first_stalled(pulses: &[Pulse], limit: Duration, now: Instant) -> Option<&'static str> {
    pulses
        .iter()
        .find(|pulse| pulse.silent_for(now) > limit)
        .map(|pulse| pulse.task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_task_that_stops_beating_is_named_stalled() {
        let (busy, busy_pulse) = channel("publisher");
        let (_stuck, stuck_pulse) = channel("identity manager");
        let pulses = [busy_pulse, stuck_pulse];
        let limit = Duration::from_secs(10);
        assert_eq!(first_stalled(&pulses, limit, Instant::now()), None);
        for _ in 0..15 {
            tokio::time::advance(Duration::from_secs(1)).await;
            busy.beat();
        }
        assert_eq!(
            first_stalled(&pulses, limit, Instant::now()),
            Some("identity manager")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_healthy_long_wait_keeps_beating_and_a_stuck_await_does_not() {
        let (heartbeat, pulse) = channel("ingest");
        let limit = Duration::from_secs(10);
        heartbeat
            .waiting(tokio::time::sleep(Duration::from_secs(60)))
            .await;
        assert_eq!(
            first_stalled(std::slice::from_ref(&pulse), limit, Instant::now()),
            None
        );

        // The same length of wait outside `waiting`: the task goes quiet.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            first_stalled(&[pulse], limit, Instant::now()),
            Some("ingest")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_bounded_step_beats_within_its_bound_and_goes_quiet_past_it() {
        let (heartbeat, pulse) = channel("identity manager");
        let limit = Duration::from_secs(10);
        let step = Duration::from_secs(35);
        // A slow step that finishes within its bound: alive throughout.
        heartbeat
            .bounded(step, tokio::time::sleep(Duration::from_secs(30)))
            .await;
        assert_eq!(
            first_stalled(std::slice::from_ref(&pulse), limit, Instant::now()),
            None
        );

        // A stuck step: the pulse goes quiet once its bound has passed.
        let stuck = heartbeat.bounded(step, std::future::pending::<()>());
        let watch = async {
            tokio::time::sleep(step - Duration::from_secs(1)).await;
            let before = first_stalled(std::slice::from_ref(&pulse), limit, Instant::now());
            tokio::time::sleep(limit + Duration::from_secs(5)).await;
            let after = first_stalled(std::slice::from_ref(&pulse), limit, Instant::now());
            (before, after)
        };
        tokio::select! {
            _ = stuck => panic!("a pending step cannot finish"),
            (before, after) = watch => {
                assert_eq!(before, None);
                assert_eq!(after, Some("identity manager"));
            }
        }
    }
}
