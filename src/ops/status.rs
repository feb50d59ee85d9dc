//! The daemon's state and counters, assembled from the tasks' `watch` channels for `status`.

use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::watch;

use crate::downlink::InboxStats;
use crate::identity::IdentityWatch;
use crate::ingest::server::StatusReport;
use crate::publish::publisher::{LinkReport, LinkState, PublishCounters};
use crate::publish::wire::WireBytes;
use crate::spool::SpoolStats;

/// `status`'s `state` (docs/protocol.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Starting,
    Connecting,
    Connected,
    Backoff,
    Stopping,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Connecting => "connecting",
            State::Connected => "connected",
            State::Backoff => "backoff",
            State::Stopping => "stopping",
        }
    }
}

/// The `status` answer. Holds no secret: ids, times and counters only.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub version: &'static str,
    /// Seconds since the daemon started.
    pub uptime_s: u64,
    pub region: String,
    /// The IoT endpoint (host) the daemon connects to; null until first known.
    pub endpoint: Option<String>,
    pub state: State,
    pub identity_id: Option<String>,
    pub credentials_expire_at: Option<String>,
    pub last_refresh: Option<String>,
    pub last_error: Option<String>,
    /// The MQTT side's last failure (connection refused, TLS, closed after CONNECT, ...) and
    /// when it happened; the last CONNACK; connections after the first since the start.
    pub mqtt_last_error: Option<String>,
    pub mqtt_last_error_at: Option<String>,
    pub last_connected_at: Option<String>,
    pub reconnects_total: u64,
    /// Bytes of the MQTT connections since the start, on their TCP streams (TLS, WebSocket
    /// and the proxy's CONNECT included; TCP/IP headers not).
    pub bytes_sent_total: u64,
    pub bytes_received_total: u64,
    /// `self-register` or `shared-user` (the stack's mode, seen in its secret); null until read.
    pub registration_mode: Option<&'static str>,
    /// Self-register mode: this device's user pool user name.
    pub device_name: Option<String>,
    pub spool_messages: u64,
    /// What the spool takes on disk (pages in use plus the WAL).
    pub spool_bytes: u64,
    /// Seconds the oldest waiting message has waited since it was accepted; null when none
    /// waits or that is not known (messages from an older version's spool).
    pub oldest_spooled_age_s: Option<u64>,
    /// `ok`, or `failing` while the spool's last operation failed (see `spool_error`).
    pub spool_state: &'static str,
    pub spool_error: Option<String>,
    pub published_total: u64,
    pub republished_total: u64,
    pub dropped_total: u64,
    /// Messages dropped unpublished for their `ttl` or `spool.max_age`.
    pub expired_total: u64,
    /// Conflating messages dropped for a newer one on their topic.
    pub conflated_total: u64,
    /// Seconds the server's clock is ahead of this device's (negative: behind), while upgrades
    /// are refused (403) because of it; null otherwise.
    pub clock_skew_s: Option<i64>,
    /// Messages moved to the dead letters since the start, and held there now.
    pub dead_letter_total: u64,
    pub dead_letters: u64,
    /// Cloud-to-device messages waiting for an app's ack, and dropped (oldest first) beyond
    /// `downlink.max_bytes` since the start.
    pub inbox_messages: u64,
    pub inbox_dropped_total: u64,
    /// `ok`, `full` (the last message received had to drop the oldest unacked ones) or
    /// `failing` (storing or reading received messages fails).
    pub inbox_state: &'static str,
    /// Downlink filters (relative) the broker refused in its last SUBACK for them.
    pub refused_filters: Vec<String>,
    /// When IoT Core's refusals (connections closed right after CONNECT, or refused) last
    /// made the device attach its IoT policy again; null if never since the start.
    pub policy_reattached_at: Option<String>,
    pub policy_reattaches_total: u64,
}

/// Everything `status` reads from; cheap to clone into each client task.
#[derive(Clone)]
pub struct StatusSource {
    pub link: watch::Receiver<LinkState>,
    pub stopping: watch::Receiver<bool>,
    pub identity: IdentityWatch,
    pub spool: watch::Receiver<SpoolStats>,
    pub counters: watch::Receiver<PublishCounters>,
    pub inbox: watch::Receiver<InboxStats>,
    pub refused_filters: watch::Receiver<Vec<String>>,
    pub mqtt: watch::Receiver<LinkReport>,
    pub wire: Arc<WireBytes>,
    pub region: String,
    pub started: std::time::Instant,
}

impl StatusSource {
    pub fn snapshot(&self) -> Status {
        let session = self.identity.sessions.borrow().clone();
        let identity = self.identity.status.borrow().clone();
        let spool = *self.spool.borrow();
        let counters = *self.counters.borrow();
        let inbox = *self.inbox.borrow();
        let link = *self.link.borrow();
        let mqtt = self.mqtt.borrow().clone();
        let state = if *self.stopping.borrow() {
            State::Stopping
        } else {
            match *self.link.borrow() {
                // The identity side is retrying: the link may still be up on credentials that
                // are running out.
                _ if identity.last_error.is_some() => State::Backoff,
                LinkState::Starting => State::Starting,
                LinkState::Connecting => State::Connecting,
                LinkState::Connected => State::Connected,
                LinkState::Backoff => State::Backoff,
            }
        };
        Status {
            version: env!("CARGO_PKG_VERSION"),
            uptime_s: self.started.elapsed().as_secs(),
            region: self.region.clone(),
            endpoint: mqtt.endpoint,
            mqtt_last_error: mqtt.last_error,
            mqtt_last_error_at: mqtt.last_error_at.map(rfc3339),
            last_connected_at: mqtt.last_connected_at.map(rfc3339),
            reconnects_total: mqtt.reconnects_total,
            bytes_sent_total: self.wire.sent(),
            bytes_received_total: self.wire.received(),
            state,
            identity_id: session.as_ref().map(|s| s.identity_id.clone()),
            credentials_expire_at: session.as_ref().map(|s| rfc3339(s.credentials.expires_at)),
            last_refresh: identity.last_refresh.map(rfc3339),
            last_error: identity.last_error,
            registration_mode: identity.registration_mode,
            device_name: identity.device_name,
            spool_messages: spool.messages,
            spool_bytes: spool.bytes,
            oldest_spooled_age_s: spool.oldest_accepted_at.filter(|_| spool.messages > 0).map(
                |at| {
                    SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |now| now.as_secs())
                        .saturating_sub(at)
                },
            ),
            spool_state: if spool.fault.is_some() {
                "failing"
            } else {
                "ok"
            },
            spool_error: spool.fault.map(|fault| fault.to_string()),
            published_total: counters.published_total,
            republished_total: counters.republished_total,
            dropped_total: spool.dropped_total,
            expired_total: spool.expired_total,
            conflated_total: spool.conflated_total,
            clock_skew_s: counters
                .clock_skew_s
                .filter(|_| link != LinkState::Connected),
            dead_letter_total: spool.dead_letter_total,
            dead_letters: spool.dead_letters,
            inbox_messages: inbox.messages,
            inbox_dropped_total: inbox.dropped_total,
            inbox_state: inbox.state(),
            refused_filters: self.refused_filters.borrow().clone(),
            policy_reattached_at: identity.policy_reattached_at.map(rfc3339),
            policy_reattaches_total: identity.policy_reattaches_total,
        }
    }
}

impl StatusReport for StatusSource {
    fn status(&self) -> serde_json::Value {
        // A `Status` is plain fields and strings: it always serializes.
        serde_json::to_value(self.snapshot()).unwrap_or_default()
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}
