//! The health report: every `[health] interval`, a small JSON document to `<prefix>/<topic>`,
//! so an operator sees each device's state without logging in to it.
//!
//! Reports are made only while the link is up and handed to the publisher, which sends them
//! (QoS 0, within the publish quota) or drops them if the link went down meanwhile: they are
//! never spooled, since a stale health report is noise. The first one after a lost connection
//! came back carries `offline_s`, how long the link was down.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::downlink::InboxStats;
use crate::ops::status::{Status, StatusSource};
use crate::publish::publisher::LinkState;

/// Reports waiting for the publisher: a newer one is dropped while one still waits.
pub const HEALTH_QUEUE: usize = 1;

/// The report's JSON text.
pub fn document(
    status: &Status,
    inbox: &InboxStats,
    uptime: Duration,
    offline: Option<Duration>,
) -> Vec<u8> {
    let mut report = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": uptime.as_secs(),
        "state": status.state.as_str(),
        "registration_mode": status.registration_mode,
        "device_name": status.device_name,
        "spool_messages": status.spool_messages,
        "spool_bytes": status.spool_bytes,
        "published_total": status.published_total,
        "dropped_total": status.dropped_total,
        "dead_letter_total": status.dead_letter_total,
        "reconnects_total": status.reconnects_total,
        "bytes_sent_total": status.bytes_sent_total,
        "bytes_received_total": status.bytes_received_total,
        "inbox_messages": inbox.messages,
        "inbox_dropped_total": inbox.dropped_total,
        "inbox_state": inbox.state(),
        "last_error": status.last_error,
        "credentials_expire_at": status.credentials_expire_at,
    });
    if let (Some(offline), Value::Object(fields)) = (offline, &mut report) {
        fields.insert("offline_s".into(), offline.as_secs().into());
    }
    report.to_string().into_bytes()
}

/// Tracks outages of the link between reports (pure; the reporter feeds it).
#[derive(Debug, Default)]
pub struct Outages {
    /// Since when the link is down, once it had been up.
    down_since: Option<Instant>,
    was_up: bool,
    /// The outage to report with the next report.
    unreported: Option<Duration>,
}

impl Outages {
    pub fn observe(&mut self, link: LinkState, now: Instant) {
        let up = link == LinkState::Connected;
        match (up, self.down_since) {
            (true, Some(since)) => {
                let lasted = now.saturating_duration_since(since);
                self.unreported = Some(self.unreported.unwrap_or_default() + lasted);
                self.down_since = None;
            }
            (false, None) if self.was_up => self.down_since = Some(now),
            _ => {}
        }
        self.was_up |= up;
    }

    /// The outage time to put in the next report (then forgotten).
    pub fn take(&mut self) -> Option<Duration> {
        self.unreported.take()
    }
}

/// Makes a report every `interval` while the link is up.
pub struct HealthReporter {
    pub interval: Duration,
    pub status: StatusSource,
    pub inbox: watch::Receiver<InboxStats>,
    pub reports: mpsc::Sender<Vec<u8>>,
}

impl HealthReporter {
    pub async fn run(mut self) {
        let started = Instant::now();
        let mut outages = Outages::default();
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                changed = self.status.link.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    outages.observe(*self.status.link.borrow_and_update(), Instant::now());
                    continue;
                }
            }
            if *self.status.link.borrow() != LinkState::Connected {
                continue;
            }
            let status = self.status.snapshot();
            let inbox = *self.inbox.borrow();
            let report = document(&status, &inbox, started.elapsed(), outages.take());
            if self.reports.try_send(report).is_err() {
                tracing::debug!("health report dropped: the previous one is still waiting");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_reported_once_after_the_link_is_back() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut outages = Outages::default();
        outages.observe(LinkState::Connecting, at(0));
        outages.observe(LinkState::Connected, at(2));
        assert_eq!(outages.take(), None, "starting up is not an outage");
        outages.observe(LinkState::Backoff, at(10));
        outages.observe(LinkState::Connecting, at(20));
        assert_eq!(outages.take(), None, "still down");
        outages.observe(LinkState::Connected, at(25));
        assert_eq!(outages.take(), Some(Duration::from_secs(15)));
        assert_eq!(outages.take(), None, "reported once");
    }

    #[test]
    fn the_document_has_the_fields_operators_read() {
        let status: Status = Status {
            version: "0.0.0",
            uptime_s: 61,
            region: "us-east-1".into(),
            endpoint: Some("example-ats.iot.us-east-1.amazonaws.com".into()),
            mqtt_last_error: None,
            mqtt_last_error_at: None,
            last_connected_at: None,
            reconnects_total: 3,
            bytes_sent_total: 5000,
            bytes_received_total: 7000,
            state: crate::ops::status::State::Connected,
            identity_id: Some("us-east-1:x".into()),
            registration_mode: Some("self-register"),
            device_name: Some("dev-1".into()),
            credentials_expire_at: Some("2026-11-29T20:00:00Z".into()),
            last_refresh: None,
            last_error: None,
            spool_messages: 3,
            spool_bytes: 4096,
            oldest_spooled_age_s: Some(12),
            spool_state: "ok",
            spool_error: None,
            published_total: 10,
            republished_total: 0,
            dropped_total: 1,
            expired_total: 0,
            conflated_total: 0,
            clock_skew_s: None,
            dead_letter_total: 2,
            dead_letters: 2,
            inbox_messages: 0,
            inbox_dropped_total: 0,
            inbox_state: "ok",
            refused_filters: Vec::new(),
            policy_reattached_at: None,
            policy_reattaches_total: 0,
        };
        let inbox = InboxStats {
            messages: 4,
            ..InboxStats::default()
        };
        let report: Value = serde_json::from_slice(&document(
            &status,
            &inbox,
            Duration::from_secs(61),
            Some(Duration::from_secs(7)),
        ))
        .expect("json");
        assert_eq!(report["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(report["uptime_s"], 61);
        assert_eq!(report["state"], "connected");
        assert_eq!(report["device_name"], "dev-1");
        assert_eq!(report["registration_mode"], "self-register");
        assert_eq!(report["spool_messages"], 3);
        assert_eq!(report["published_total"], 10);
        assert_eq!(report["dropped_total"], 1);
        assert_eq!(report["reconnects_total"], 3);
        assert_eq!(report["bytes_sent_total"], 5000);
        assert_eq!(report["bytes_received_total"], 7000);
        assert_eq!(report["dead_letter_total"], 2);
        assert_eq!(report["inbox_messages"], 4);
        assert_eq!(report["offline_s"], 7);
        assert_eq!(report["credentials_expire_at"], "2026-11-29T20:00:00Z");
        assert!(
            report.get("identity_id").is_none(),
            "the topic names it already"
        );
        let quiet: Value =
            serde_json::from_slice(&document(&status, &inbox, Duration::ZERO, None)).expect("json");
        assert!(quiet.get("offline_s").is_none());
    }
}
