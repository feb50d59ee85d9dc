//! `[downlink]` and `[health]`: cloud-to-device topics and the device health report.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ByteSize, Config, duration};
use crate::message::MAX_PAYLOAD_BYTES;

/// The inbox must hold at least one full-size message with its topic.
const MIN_INBOX_BYTES: u64 = 2 * MAX_PAYLOAD_BYTES as u64;
/// IoT Core accepts at most 8 filters per SUBSCRIBE and 50 subscriptions per connection.
pub const MAX_DOWNLINK_TOPICS: usize = 50;
/// A health report more often than this would only eat the publish quota.
const MIN_HEALTH_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownlinkConfig {
    /// Topic filters relative to the device prefix; empty: no downlink (clean session).
    pub topics: Vec<String>,
    /// Bound of the inbox (topics and payloads of messages no app acked yet).
    pub max_bytes: ByteSize,
}

impl Default for DownlinkConfig {
    fn default() -> Self {
        DownlinkConfig {
            topics: Vec::new(),
            max_bytes: ByteSize(16 * 1024 * 1024),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// 0 = no health reports.
    #[serde(with = "duration")]
    pub interval: Duration,
    /// Relative topic of the reports.
    pub topic: String,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::ZERO,
            topic: "health".into(),
        }
    }
}

impl Config {
    /// The `[downlink]` and `[health]` rules, with the prefix's room known.
    pub(super) fn validate_downlink(
        &self,
        rules: &crate::topic::TopicRules,
    ) -> Result<(), (&'static str, String)> {
        if self.downlink.topics.len() > MAX_DOWNLINK_TOPICS {
            return Err((
                "downlink.topics",
                format!(
                    "at most {MAX_DOWNLINK_TOPICS} filters (IoT Core's subscriptions per connection)"
                ),
            ));
        }
        for filter in &self.downlink.topics {
            if let Err(error) = crate::topic_filter::validate(rules, filter) {
                return Err(("downlink.topics", format!("{filter:?}: {error}")));
            }
        }
        if self.downlink.max_bytes.0 < MIN_INBOX_BYTES {
            return Err((
                "downlink.max_bytes",
                "must hold at least one full-size message (256KiB)".into(),
            ));
        }
        if !self.health.interval.is_zero() && self.health.interval < MIN_HEALTH_INTERVAL {
            return Err(("health.interval", "must be 0s (off) or at least 1s".into()));
        }
        if let Err(error) = rules.validate(&self.health.topic) {
            return Err(("health.topic", format!("{:?}: {error}", self.health.topic)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigError;

    fn load(extra: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        let text = format!(
            "[identity]\nidentity_pool_id = \"eu-west-1:0b7c5a57-6a4f-4a62-9d36-3f1c0e3b6a11\"\n\
             secret_id = \"s\"\n{extra}"
        );
        std::fs::write(&path, text).expect("write config");
        Config::load(&path)
    }

    #[test]
    fn defaults_are_off() {
        let config = load("").expect("valid");
        assert!(config.downlink.topics.is_empty());
        assert_eq!(config.downlink.max_bytes, ByteSize(16 << 20));
        assert_eq!(config.health.interval, Duration::ZERO);
        assert_eq!(config.health.topic, "health");
    }

    #[test]
    fn filters_are_checked_against_iot_core_limits_with_the_prefix() {
        let config = load("[downlink]\ntopics = [\"commands/#\", \"config/+\"]\n").expect("valid");
        assert_eq!(config.downlink.topics.len(), 2);
        for bad in ["a/#/b", "/x", "$aws/things/x", "a/b/c/d/e/f/g/h", ""] {
            let err = load(&format!("[downlink]\ntopics = [{bad:?}]\n")).expect_err(bad);
            assert!(err.to_string().contains("downlink.topics"), "{err}");
        }
        let long = "x".repeat(250);
        let err = load(&format!("[downlink]\ntopics = [{long:?}]\n")).expect_err("long");
        assert!(err.to_string().contains("bytes"), "{err}");
    }

    #[test]
    fn health_and_inbox_limits_are_checked() {
        let err = load("[health]\ninterval = \"100ms\"\n").expect_err("too often");
        assert!(err.to_string().contains("health.interval"), "{err}");
        let err = load("[health]\ntopic = \"a/#\"\n").expect_err("wildcard");
        assert!(err.to_string().contains("health.topic"), "{err}");
        let err = load("[downlink]\nmax_bytes = \"1KiB\"\n").expect_err("small");
        assert!(err.to_string().contains("downlink.max_bytes"), "{err}");
        assert!(load("[health]\ninterval = \"30s\"\n").is_ok());
    }
}
