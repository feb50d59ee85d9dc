//! systemd integration (`Type=notify`): readiness, a status line that follows the state,
//! `STOPPING=1`, and the watchdog. Outside systemd (no `NOTIFY_SOCKET`) every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;

use crate::heartbeat::{self, Pulse};
use crate::ops::status::StatusSource;
use crate::repeats::Repeats;
use crate::spool::{Cursors, Spool};

/// The spool thread must answer a probe within this to count as alive.
const SPOOL_PROBE: Duration = Duration::from_secs(5);
/// A task silent for longer than half the watchdog period, or this if that is shorter, counts
/// as stuck (tasks beat at least every 2 s).
const MIN_SILENCE_LIMIT: Duration = Duration::from_secs(5);
/// The status line is refreshed at most this often.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// A notify socket that stopped working fails every status update and watchdog ping.
static NOTIFY_FAILURES: std::sync::Mutex<Repeats> = std::sync::Mutex::new(Repeats::new());

fn send(states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        let text = error.to_string();
        let admitted = NOTIFY_FAILURES
            .lock()
            .map_or(Some(0), |mut repeats| repeats.admit(&text));
        if let Some(held_back) = admitted {
            tracing::warn!(error = %text, held_back, "cannot notify systemd");
        }
    }
}

/// Config valid, spool open, socket listening: the daemon accepts data from now on.
pub fn ready(status: &StatusSource) {
    send(&[
        NotifyState::Ready,
        NotifyState::Status(&status_line(status)),
    ]);
}

/// A reload begins (systemd 252 has no `notify-reload`: RELOADING=1 with the monotonic time).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(error) => tracing::warn!(%error, "cannot read the monotonic clock"),
    }
}

pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: delivering what is pending"),
    ]);
}

/// `connected as us-east-1:…, 12 spooled` and the like.
fn status_line(status: &StatusSource) -> String {
    let now = status.snapshot();
    let identity = now.identity_id.as_deref().unwrap_or("(no identity yet)");
    format!(
        "{} as {identity}, {} spooled",
        now.state.as_str(),
        now.spool_messages
    )
}

/// Keeps `STATUS=` current, and pings the watchdog at half of `WATCHDOG_USEC` while every
/// main task has beaten recently (see `heartbeat`) and the spool thread answers a probe; a
/// quiet task means no ping, and systemd kills and restarts the daemon. Runs until stopped.
pub async fn supervise(status: StatusSource, spool: Spool, pulses: Vec<Pulse>) {
    let watchdog = sd_notify::watchdog_enabled();
    let tick = watchdog.map_or(STATUS_EVERY, |period| (period / 2).min(STATUS_EVERY));
    let mut ticker = tokio::time::interval(tick);
    let mut last_status = String::new();
    let mut last_ping = tokio::time::Instant::now();
    loop {
        ticker.tick().await;
        let line = status_line(&status);
        if line != last_status {
            send(&[NotifyState::Status(&line)]);
            last_status = line;
        }
        let Some(period) = watchdog else { continue };
        if last_ping.elapsed() < period / 2 {
            continue;
        }
        // Alive, and its last operation did not fail: a failing disk gets the daemon restarted.
        let spool_answers = tokio::time::timeout(
            SPOOL_PROBE.min(period),
            spool.read_after(
                Cursors {
                    high: i64::MAX,
                    normal: i64::MAX,
                },
                1,
                1,
            ),
        )
        .await
        .is_ok_and(|read| read.is_ok())
            && spool.stats().borrow().fault.is_none();
        let inbox_works = !inbox_stuck(&status.inbox.borrow());
        let limit = (period / 2).max(MIN_SILENCE_LIMIT);
        match heartbeat::first_stalled(&pulses, limit, tokio::time::Instant::now()) {
            None if spool_answers && inbox_works => {
                send(&[NotifyState::Watchdog]);
                last_ping = tokio::time::Instant::now();
            }
            stalled => tracing::error!(
                stalled_task = stalled.unwrap_or(if spool_answers {
                    "downlink inbox"
                } else {
                    "spool"
                }),
                "a task is not making progress; withholding the watchdog ping"
            ),
        }
    }
}

/// The downlink inbox failed every store and read for this long: a restart (which moves a
/// corrupt inbox aside) is the way out. Shorter failures are retried in place.
const INBOX_STUCK_AFTER: Duration = Duration::from_secs(300);

fn inbox_stuck(inbox: &crate::downlink::InboxStats) -> bool {
    inbox
        .failing_since
        .is_some_and(|since| since.elapsed() >= INBOX_STUCK_AFTER)
}
