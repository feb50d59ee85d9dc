//! Validation: every rule docs/configuration.md states, checked once at load, so the rest of the daemon can
//! trust the values it is handed. Each check names the key at fault.

use std::path::Path;

use super::{
    Config, ConfigError, IdentityConfig, KEEP_ALIVE_RANGE, MAX_BATCH_MESSAGES, MAX_COMMIT_WINDOW,
    MAX_DRAIN_TIMEOUT, MAX_IN_FLIGHT, MAX_START_DELAY, Proxy, SHORTEST_TOPIC, is_loopback_host,
    url_host,
};
use crate::message::MAX_PAYLOAD_BYTES;

/// The key at fault and why.
type Invalid = (&'static str, String);

impl Config {
    /// Checks every rule and fills the defaults derived from other keys.
    pub(super) fn validate(&mut self, path: &Path) -> Result<(), ConfigError> {
        self.check().map_err(|(key, reason)| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            reason,
        })
    }

    fn check(&mut self) -> Result<(), Invalid> {
        let pool_region = check_identity(&self.identity)?;
        check_fleet(&self.identity)?;
        if self.aws.region.is_empty() {
            self.aws.region = pool_region;
        }
        check_urls(self)?;
        check_topics(self)?;
        let rules = crate::topic::TopicRules::new(
            &self.mqtt.topic_prefix,
            &self.identity.identity_pool_id,
            &self.aws.region,
        );
        self.validate_downlink(&rules)?;
        check_limits(self)
    }
}

/// The identity keys; returns the region the identity pool id names.
fn check_identity(identity: &IdentityConfig) -> Result<String, Invalid> {
    if identity.identity_pool_id.trim().is_empty() {
        return Err((
            "identity.identity_pool_id",
            "is required (stack output CognitoIdentityPoolID)".into(),
        ));
    }
    // Ids are used as written: a space or newline pasted along would only show up as a
    // puzzling AWS error at the first sign-in.
    for (key, id) in [
        ("identity.identity_pool_id", &identity.identity_pool_id),
        ("identity.secret_id", &identity.secret_id),
        ("identity.unauth_role_arn", &identity.unauth_role_arn),
    ] {
        if id.contains(char::is_whitespace) {
            return Err((key, format!("{id:?} contains whitespace; remove it")));
        }
    }
    let pool = &identity.identity_pool_id;
    let Some((pool_region, pool_uuid)) = pool.split_once(':') else {
        return Err((
            "identity.identity_pool_id",
            format!("{pool:?} is not of the form <region>:<uuid>"),
        ));
    };
    if pool_region.is_empty() || pool_uuid.is_empty() {
        return Err((
            "identity.identity_pool_id",
            format!("{pool:?} is not of the form <region>:<uuid>"),
        ));
    }
    if identity.secret_id.trim().is_empty() {
        return Err((
            "identity.secret_id",
            "is required (stack output SecretName)".into(),
        ));
    }
    Ok(pool_region.to_owned())
}

/// Fleet mode's keys: the device name's rule, a bounded start delay.
fn check_fleet(identity: &IdentityConfig) -> Result<(), Invalid> {
    let name = &identity.device_name;
    if !name.is_empty()
        && let Err(error) = crate::device_name::validate_device_name(name)
    {
        return Err(("identity.device_name", error.to_string()));
    }
    if identity.start_delay > MAX_START_DELAY {
        return Err(("identity.start_delay", "must be at most 1h".into()));
    }
    Ok(())
}

/// Keep-alive and URLs. (The CA bundle is read by the TLS side; see `cli::run::load_config`.)
fn check_urls(config: &Config) -> Result<(), Invalid> {
    let keep_alive = config.mqtt.keep_alive;
    if keep_alive < KEEP_ALIVE_RANGE.0 || keep_alive > KEEP_ALIVE_RANGE.1 {
        return Err((
            "mqtt.keep_alive",
            "must be between 30s and 20m (IoT Core's range)".into(),
        ));
    }
    for (key, url) in [
        ("aws.endpoint_url", &config.aws.endpoint_url),
        ("mqtt.url", &config.mqtt.url),
    ] {
        if !url.is_empty() && !url.contains("://") {
            return Err((key, format!("{url:?} is not a URL")));
        }
    }
    let url = &config.mqtt.url;
    if !(url.is_empty() || url.starts_with("wss://") || url.starts_with("ws://")) {
        return Err(("mqtt.url", "must start with wss:// or ws://".into()));
    }
    // Plain ws:// sends the presigned URL (session token included) in clear text: only to
    // a broker on this machine (tests, a local bridge).
    if url.starts_with("ws://") && !is_loopback_host(url_host(url)) {
        return Err((
            "mqtt.url",
            format!(
                "ws:// (unencrypted) is allowed only to a loopback host, not {:?}; use wss://",
                url_host(url)
            ),
        ));
    }
    Ok(())
}

/// The topic prefix and raw sockets' topics against IoT Core's limits, and socket paths.
fn check_topics(config: &Config) -> Result<(), Invalid> {
    let prefix = config
        .mqtt
        .topic_prefix
        .replace("{identity_pool_id}", "p")
        .replace("{identity_id}", "i");
    if prefix.contains(['+', '#', '\0', '{', '}']) || prefix.starts_with(['$', '/']) {
        return Err((
            "mqtt.topic_prefix",
            "may use {identity_pool_id} and {identity_id} but no wildcard, NUL, other braces, or leading '$' or '/'".into(),
        ));
    }
    if config.socket.max_clients_per_uid == 0 {
        return Err(("socket.max_clients_per_uid", "must be at least 1".into()));
    }
    if config.socket.max_clients == 0 {
        return Err(("socket.max_clients", "must be at least 1".into()));
    }
    let rules = crate::topic::TopicRules::new(
        &config.mqtt.topic_prefix,
        &config.identity.identity_pool_id,
        &config.aws.region,
    );
    // The expanded prefix (with the longest identity id) must leave room for a topic.
    if let Err(error) = rules.validate(SHORTEST_TOPIC) {
        return Err((
            "mqtt.topic_prefix",
            format!("leaves no room for a topic under IoT Core's limits: {error}"),
        ));
    }
    for raw in &config.socket.raw {
        if let Err(error) = rules.validate(&raw.topic) {
            return Err(("socket.raw.topic", format!("{:?}: {error}", raw.topic)));
        }
        if raw.path == config.socket.path
            || config
                .socket
                .raw
                .iter()
                .filter(|r| r.path == raw.path)
                .count()
                > 1
        {
            return Err((
                "socket.raw.path",
                format!("{} is used by another socket", raw.path.display()),
            ));
        }
    }
    Ok(())
}

/// Sizes, counts and the log filter.
fn check_limits(config: &Config) -> Result<(), Invalid> {
    if config.spool.max_bytes.0 < MAX_PAYLOAD_BYTES as u64 {
        return Err((
            "spool.max_bytes",
            "must hold at least one full-size message (128KiB)".into(),
        ));
    }
    if config.spool.commit_window > MAX_COMMIT_WINDOW {
        return Err((
            "spool.commit_window",
            format!(
                "at most {} (a sent message waits that long for its ok)",
                humantime::format_duration(MAX_COMMIT_WINDOW)
            ),
        ));
    }
    if let Err(error) = Proxy::resolve(&config.network, |_| None) {
        return Err(("network.proxy", error.reason.into()));
    }
    if config.shutdown.drain_timeout > MAX_DRAIN_TIMEOUT {
        return Err((
            "shutdown.drain_timeout",
            format!(
                "at most {} (the unit stops the daemon after TimeoutStopSec=20s; the last 5 s commit what is held and close)",
                humantime::format_duration(MAX_DRAIN_TIMEOUT)
            ),
        ));
    }
    if config.publish.max_in_flight == 0 || config.publish.max_in_flight > MAX_IN_FLIGHT {
        return Err((
            "publish.max_in_flight",
            format!(
                "must be between 1 and {MAX_IN_FLIGHT} (IoT Core takes at most {MAX_IN_FLIGHT} unacknowledged QoS 1 publishes per connection)"
            ),
        ));
    }
    if config.batch.max_messages == 0 || config.batch.max_messages > MAX_BATCH_MESSAGES {
        return Err((
            "batch.max_messages",
            format!("must be between 1 (batching off) and {MAX_BATCH_MESSAGES}"),
        ));
    }
    if config.batch.max_bytes.0 == 0 || config.batch.max_bytes.0 > MAX_PAYLOAD_BYTES as u64 {
        return Err((
            "batch.max_bytes",
            "must be between 1 byte and 128KiB (IoT Core's payload limit)".into(),
        ));
    }
    if tracing_subscriber::EnvFilter::try_new(&config.log.level).is_err() {
        return Err((
            "log.level",
            format!(
                "{:?} is not a level or filter like \"info\"",
                config.log.level
            ),
        ));
    }
    Ok(())
}
