//! The receiving side of the connection, as decisions: what to subscribe to after a connect,
//! which received topics are this device's, and in what order received messages are stored
//! and acknowledged. The connection loop does the I/O.
//!
//! The session is persistent (`clean_session = false`, the identity id as client id) whenever
//! `[downlink] topics` is set, so the broker queues QoS 1 messages while the daemon reconnects
//! or is stopped. rumqttc's event loop is built afresh for each connection, so it has no
//! session state of its own to resume: the broker redelivers what it sent unacknowledged, and
//! our unacknowledged publishes are republished from the spool as always. A CONNACK without
//! the session (`session_present = false`, e.g. IoT Core's session expiry) means subscribing
//! to every filter; one with it, only to filters the session does not hold yet ([`HeldFilters`]:
//! IoT Core's Device Advisor fails a client that subscribes again to a session it resumed).
//!
//! Acks are manual: a received batch is committed to the inbox first and only then
//! acknowledged (at least once into the device; a crash in between means a redelivery).

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::state_file::write_private;
use crate::topic::TopicRules;

/// The file in the state dir that remembers [`HeldFilters`].
pub const HELD_FILTERS_FILE: &str = "subscriptions.json";

/// Received messages stored in one inbox transaction at most (the broker's in-flight window
/// bounds it anyway: IoT Core sends at most 100 unacknowledged QoS 1 messages).
pub const MAX_RECEIVE_BATCH: usize = 256;

/// Messages remembered per connection for [`Redeliveries`]: more than the broker keeps in
/// flight (IoT Core sends at most 100 unacknowledged QoS 1 messages).
const REMEMBERED_PER_CONNECTION: usize = 1024;

/// Downlink messages stored on the last two connections, by packet id and a digest of topic
/// and payload. A broker redelivers (DUP) what it sent without seeing our PUBACK, right after
/// the session resumes: one that was stored already is acknowledged without being stored
/// again, so it keeps its `seq` and an app that deduplicates by `seq` acts on it once. Only a
/// DUP with the same packet id, topic and payload counts, and only from the connection before
/// (where its PUBACK may have been lost): a new message repeating an old one is stored.
#[derive(Debug, Default)]
pub struct Redeliveries {
    current: Remembered,
    previous: Remembered,
}

#[derive(Debug, Default)]
struct Remembered {
    order: VecDeque<(u16, u64)>,
    keys: HashSet<(u16, u64)>,
}

impl Remembered {
    fn insert(&mut self, key: (u16, u64)) {
        if self.keys.insert(key) {
            self.order.push_back(key);
        }
        if self.order.len() > REMEMBERED_PER_CONNECTION
            && let Some(oldest) = self.order.pop_front()
        {
            self.keys.remove(&oldest);
        }
    }
}

fn digest(topic: &str, payload: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    topic.hash(&mut hasher);
    payload.hash(&mut hasher);
    hasher.finish()
}

impl Redeliveries {
    /// A new connection: what was stored two connections ago can no longer come again.
    pub fn connected(&mut self) {
        self.previous = std::mem::take(&mut self.current);
    }

    /// Whether this received message is a redelivery of one already stored.
    pub fn is_redelivery(&self, dup: bool, packet_id: u16, topic: &str, payload: &[u8]) -> bool {
        let key = (packet_id, digest(topic, payload));
        dup && (self.current.keys.contains(&key) || self.previous.keys.contains(&key))
    }

    /// The message is stored (committed to the inbox).
    pub fn stored(&mut self, packet_id: u16, topic: &str, payload: &[u8]) {
        self.current.insert((packet_id, digest(topic, payload)));
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Inbound {
    rules: Arc<TopicRules>,
    /// `[downlink] topics`, relative.
    filters: Vec<String>,
}

/// What to do with a received message's topic.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// Under the device prefix: store it with this relative topic.
    Store(String),
    /// Not this device's (a broker that delivers more than the policy allows): ack and drop.
    Foreign,
}

impl Inbound {
    pub fn new(rules: Arc<TopicRules>, filters: Vec<String>) -> Inbound {
        Inbound { rules, filters }
    }

    /// The full filters to subscribe to (QoS 1) after every CONNACK.
    pub fn subscriptions(&self, identity_id: &str) -> Vec<String> {
        self.filters
            .iter()
            .map(|filter| self.rules.full_topic(identity_id, filter))
            .collect()
    }

    /// A full filter as configured (relative to the device prefix).
    pub fn relative(&self, identity_id: &str, full: &str) -> String {
        match self.classify(identity_id, full) {
            Received::Store(relative) => relative,
            Received::Foreign => full.to_owned(),
        }
    }

    /// Where a received message goes.
    pub fn classify(&self, identity_id: &str, topic: &str) -> Received {
        let prefix = self.rules.prefix(identity_id);
        match topic.strip_prefix(&prefix) {
            Some(relative) if !relative.is_empty() => Received::Store(relative.to_owned()),
            _ => Received::Foreign,
        }
    }
}

/// The full filters the broker's persistent session holds for one client id (granted in a
/// SUBACK), kept on disk so that a restart that finds the session does not subscribe again.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldFilters {
    identity_id: String,
    filters: BTreeSet<String>,
}

impl HeldFilters {
    /// What `path` remembers; nothing (so: subscribe to everything) if it is missing or bad.
    pub fn load(path: &Path) -> HeldFilters {
        std::fs::read(path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Writes atomically (temp file + rename), mode 0600.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        write_private(path, &serde_json::to_vec(self)?)
    }

    /// After a CONNACK for `identity_id`: the filters of `wanted` to subscribe to. A broker
    /// without the session, or another client id, holds nothing.
    pub fn after_connack(
        &mut self,
        identity_id: &str,
        wanted: &[String],
        session_present: bool,
    ) -> Vec<String> {
        if !session_present || self.identity_id != identity_id {
            self.identity_id = identity_id.to_owned();
            self.filters.clear();
        }
        wanted
            .iter()
            .filter(|filter| !self.filters.contains(*filter))
            .cloned()
            .collect()
    }

    /// A SUBACK for `filters`, `granted[i]` for each: the granted ones are held now. Returns
    /// the refused ones.
    /// The client id whose session holds the filters.
    pub fn identity_id(&self) -> &str {
        &self.identity_id
    }

    pub fn on_suback(&mut self, filters: &[String], granted: &[bool]) -> Vec<String> {
        let mut refused = Vec::new();
        for (filter, &ok) in filters.iter().zip(granted) {
            if ok {
                self.filters.insert(filter.clone());
            } else {
                refused.push(filter.clone());
            }
        }
        refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A redelivery (DUP) of a stored message is recognised on the next
    /// connection; a new message repeating it, or one two connections later, is not.
    #[test]
    fn a_redelivered_message_is_recognised_once_stored() {
        let mut seen = Redeliveries::default();
        seen.connected();
        assert!(!seen.is_redelivery(true, 7, "c/x", b"1"), "never stored");
        seen.stored(7, "c/x", b"1");
        seen.connected();
        assert!(seen.is_redelivery(true, 7, "c/x", b"1"));
        assert!(
            !seen.is_redelivery(false, 7, "c/x", b"1"),
            "not a DUP: a new message"
        );
        assert!(!seen.is_redelivery(true, 7, "c/x", b"2"), "another payload");
        assert!(
            !seen.is_redelivery(true, 8, "c/x", b"1"),
            "another packet id"
        );
        seen.connected();
        assert!(
            !seen.is_redelivery(true, 7, "c/x", b"1"),
            "two connections later"
        );

        for id in 0..=u16::try_from(REMEMBERED_PER_CONNECTION).expect("fits") {
            seen.stored(id, "c/x", b"1");
        }
        assert!(
            !seen.is_redelivery(true, 0, "c/x", b"1"),
            "bounded: the oldest forgotten"
        );
        assert!(seen.is_redelivery(true, 1, "c/x", b"1"));
    }

    const POOL: &str = "us-east-1:0b7c5a57-6a4f-4a62-9d36-3f1c0e3b6a11";
    const IDENTITY: &str = "us-east-1:9f0e3a2b-1c4d-4e5f-8a9b-0c1d2e3f4a5b";

    fn inbound(filters: &[&str]) -> Inbound {
        let rules = Arc::new(TopicRules::new(
            "{identity_pool_id}/{identity_id}",
            POOL,
            "us-east-1",
        ));
        Inbound::new(rules, filters.iter().map(|f| f.to_string()).collect())
    }

    #[test]
    fn subscribes_under_the_device_prefix_only_when_downlink_is_on() {
        let on = inbound(&["commands/#", "config/+"]);
        assert_eq!(
            on.subscriptions(IDENTITY),
            vec![
                format!("{POOL}/{IDENTITY}/commands/#"),
                format!("{POOL}/{IDENTITY}/config/+")
            ]
        );
        let off = inbound(&[]);
        assert!(off.subscriptions(IDENTITY).is_empty());
    }

    #[test]
    fn received_topics_become_relative_and_foreign_ones_are_recognised() {
        let inbound = inbound(&["#"]);
        assert_eq!(
            inbound.classify(IDENTITY, &format!("{POOL}/{IDENTITY}/commands/reboot")),
            Received::Store("commands/reboot".into())
        );
        assert_eq!(
            inbound.classify(IDENTITY, &format!("{POOL}/someone-else/commands/reboot")),
            Received::Foreign
        );
        assert_eq!(
            inbound.classify(IDENTITY, &format!("{POOL}/{IDENTITY}/")),
            Received::Foreign
        );
    }

    #[test]
    fn a_resumed_session_subscribes_only_to_filters_it_does_not_hold() {
        let wanted = |list: &[&str]| list.iter().map(|f| f.to_string()).collect::<Vec<_>>();
        let mut held = HeldFilters::default();
        let first = held.after_connack(IDENTITY, &wanted(&["a/#", "b"]), false);
        assert_eq!(first, ["a/#", "b"]);
        assert_eq!(held.on_suback(&first, &[true, false]), ["b"]);
        // The session is back: only what it does not hold (the refused one, a new filter).
        assert_eq!(
            held.after_connack(IDENTITY, &wanted(&["a/#", "b", "c"]), true),
            ["b", "c"]
        );
        // The broker lost the session, or this is another client id: everything again.
        assert_eq!(
            held.after_connack(IDENTITY, &wanted(&["a/#"]), false),
            ["a/#"]
        );
        held.on_suback(&wanted(&["a/#"]), &[true]);
        assert_eq!(
            held.after_connack("other", &wanted(&["a/#"]), true),
            ["a/#"]
        );
    }

    #[test]
    fn held_filters_survive_a_restart_and_a_bad_file_means_subscribing_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(HELD_FILTERS_FILE);
        assert_eq!(HeldFilters::load(&path), HeldFilters::default());
        let mut held = HeldFilters::default();
        let filters = held.after_connack(IDENTITY, &["a/#".to_string()], false);
        held.on_suback(&filters, &[true]);
        held.save(&path).expect("save");
        let mut loaded = HeldFilters::load(&path);
        assert_eq!(loaded, held);
        assert!(
            loaded
                .after_connack(IDENTITY, &["a/#".to_string()], true)
                .is_empty()
        );
        std::fs::write(&path, "{not json").expect("write");
        assert_eq!(HeldFilters::load(&path), HeldFilters::default());
    }
}
