//! The receiving side of the connection, as decisions: what to subscribe to after a connect,
//! which received topics are this device's, and in what order received messages are stored
//! and acknowledged. The connection loop does the I/O.
//!
//! The session is persistent (`clean_session = false`, the identity id as client id) whenever
//! `[downlink] topics` is set, so the broker queues QoS 1 messages while the daemon reconnects
//! or is stopped. rumqttc's event loop is built afresh for each connection, so it has no
//! session state of its own to resume: the broker redelivers what it sent unacknowledged, and
//! our unacknowledged publishes are republished from the spool as always. Subscribing again
//! after every CONNACK costs one packet and covers a broker that lost the session
//! (`session_present = false`, e.g. IoT Core's session expiry).
//!
//! Acks are manual: a received batch is committed to the inbox first and only then
//! acknowledged (at least once into the device; a crash in between means a redelivery).

use std::sync::Arc;

use crate::topic::TopicRules;

/// Received messages stored in one inbox transaction at most (the broker's in-flight window
/// bounds it anyway: IoT Core sends at most 100 unacknowledged QoS 1 messages).
pub const MAX_RECEIVE_BATCH: usize = 256;

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

    /// Where a received message goes.
    pub fn classify(&self, identity_id: &str, topic: &str) -> Received {
        let prefix = self.rules.prefix(identity_id);
        match topic.strip_prefix(&prefix) {
            Some(relative) if !relative.is_empty() => Received::Store(relative.to_owned()),
            _ => Received::Foreign,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
