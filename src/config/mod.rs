//! The daemon's configuration: a TOML file plus `IOT_COGNITO_RELAY__<SECTION>__<KEY>` overrides.
//!
//! Every key has a sound default except the two that name the cloud side. Validation happens
//! here, once, so the rest of the daemon can trust the values it is handed.

pub mod changes;
mod downlink;
mod network;
pub mod sandbox;
mod trust;
mod units;
mod validate;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::message::{MAX_PAYLOAD_BYTES, Qos};
pub use downlink::{DownlinkConfig, HealthConfig};
pub use network::{NetworkConfig, Proxy, ProxyError};

use trust::check_not_tamperable;
use units::duration;
pub use units::{ByteSize, Delimiter, FileMode};

/// Where the daemon looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/iot-cognito-relay/config.toml";
/// Prefix of environment overrides, e.g. `IOT_COGNITO_RELAY__SOCKET__PATH`.
pub const ENV_PREFIX: &str = "IOT_COGNITO_RELAY";
/// IoT Core accepts keep-alive values between 30 s and 1200 s.
const KEEP_ALIVE_RANGE: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(1200));
/// Longest `identity.start_delay`: past an hour a device would look dead after every boot.
const MAX_START_DELAY: Duration = Duration::from_secs(3600);

/// Why a config could not be used. Every variant names the file or key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Load {
        path: PathBuf,
        source: config::ConfigError,
    },
    #[error("{path}: {key}: {reason}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
    #[error("{path}: {reason}; refusing to use it")]
    Insecure { path: PathBuf, reason: String },
}

/// A one-byte relative topic: what `mqtt.topic_prefix` must leave room for at least.
const SHORTEST_TOPIC: &str = "t";

/// More readings than this in one array would not fit 128 KiB anyway (each takes 2+ bytes).
const MAX_BATCH_MESSAGES: u32 = 65_536;
/// IoT Core's limit of unacknowledged QoS 1 publishes per connection.
const MAX_IN_FLIGHT: u16 = 100;
/// Longest `spool.commit_window`: a message the publisher sent waits at most this for its `ok`.
const MAX_COMMIT_WINDOW: Duration = Duration::from_secs(5);
/// Longest `shutdown.drain_timeout`: the unit's `TimeoutStopSec=20s` must leave time to
/// commit what is held and close after the drain, or systemd kills the daemon mid-commit.
const MAX_DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// The whole configuration, section by section as docs/configuration.md lists it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub aws: AwsConfig,
    #[serde(default)]
    pub identity: IdentityConfig,
    #[serde(default)]
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub socket: SocketConfig,
    #[serde(default)]
    pub state: StateConfig,
    #[serde(default)]
    pub spool: SpoolConfig,
    #[serde(default)]
    pub publish: PublishConfig,
    #[serde(default)]
    pub batch: BatchConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default)]
    pub downlink: DownlinkConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub network: NetworkConfig,
    #[serde(default)]
    pub log: LogConfig,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// Defaults to the region prefix of `identity.identity_pool_id`.
    #[serde(default)]
    pub region: String,
    /// For emulators; `AWS_ENDPOINT_URL` and `AWS_ENDPOINT_URL_<SERVICE>` work too.
    #[serde(default)]
    pub endpoint_url: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    #[serde(default)]
    pub identity_pool_id: String,
    #[serde(default)]
    pub secret_id: String,
    /// Set: the classic flow (GetOpenIdToken + AssumeRoleWithWebIdentity); empty: enhanced flow.
    #[serde(default)]
    pub unauth_role_arn: String,
    #[serde(with = "duration", default = "IdentityConfig::default_refresh_margin")]
    pub refresh_margin: Duration,
    /// When credentials are refreshed: ahead of expiry, or only when they are needed.
    #[serde(default)]
    pub refresh: RefreshMode,
    /// Fleet mode: this device's user name; empty derives one from `/etc/machine-id`.
    #[serde(default)]
    pub device_name: String,
    /// Right after boot, wait a random time below this before the first sign-in.
    #[serde(with = "duration", default = "IdentityConfig::default_start_delay")]
    pub start_delay: Duration,
}

impl IdentityConfig {
    fn default_refresh_margin() -> Duration {
        Duration::from_secs(5 * 60)
    }

    /// Spreads the restart of about 3,000 devices within Cognito's default quotas
    /// (docs/operations.md, "Boot storms and Cognito quotas").
    fn default_start_delay() -> Duration {
        Duration::from_secs(30)
    }
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            identity_pool_id: String::new(),
            secret_id: String::new(),
            unauth_role_arn: String::new(),
            refresh_margin: Self::default_refresh_margin(),
            refresh: RefreshMode::default(),
            device_name: String::new(),
            start_delay: Self::default_start_delay(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Defaults to the secret's `IoTEndpoint` tag.
    pub endpoint: String,
    /// Full URL override, e.g. `wss://127.0.0.1:8443/mqtt`.
    pub url: String,
    /// A PEM bundle that replaces the built-in Amazon roots.
    pub ca_file: String,
    #[serde(with = "duration")]
    pub keep_alive: Duration,
    pub topic_prefix: String,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            endpoint: String::new(),
            url: String::new(),
            ca_file: String::new(),
            keep_alive: Duration::from_secs(30),
            topic_prefix: "{identity_pool_id}/{identity_id}".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SocketConfig {
    pub path: PathBuf,
    /// Octal file mode of the sockets.
    pub mode: FileMode,
    /// When either list is non-empty, only clients whose uid or gid is listed may connect
    /// (checked with SO_PEERCRED), on top of the socket's file mode.
    pub allowed_uids: Vec<u32>,
    pub allowed_gids: Vec<u32>,
    /// Clients served at once (per socket); more wait in the listen backlog.
    pub max_clients: u32,
    /// Of those, at most this many from one uid (one runaway app cannot take every slot);
    /// more from that uid are refused with `too_many_connections`.
    pub max_clients_per_uid: u32,
    /// A client that started a line and sent nothing more for this long is disconnected.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Per-client publish lines per second, enforced by reading slower; 0 lifts the limit.
    pub max_messages_per_second: u32,
    /// Raw sockets for sensors that cannot speak JSON: every record is one message's payload.
    pub raw: Vec<RawSocketConfig>,
}

/// One `[[socket.raw]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSocketConfig {
    pub path: PathBuf,
    /// The relative topic every record is published to.
    pub topic: String,
    /// One byte that ends a record (default newline).
    #[serde(default = "RawSocketConfig::default_delimiter")]
    pub delimiter: Delimiter,
    #[serde(default = "RawSocketConfig::default_qos")]
    pub qos: Qos,
}

impl RawSocketConfig {
    fn default_delimiter() -> Delimiter {
        Delimiter(b'\n')
    }

    fn default_qos() -> Qos {
        Qos::AtLeastOnce
    }
}

impl Default for SocketConfig {
    fn default() -> Self {
        SocketConfig {
            path: "/run/iot-cognito-relay/relay.sock".into(),
            mode: FileMode(0o660),
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            max_clients: 256,
            max_clients_per_uid: 128,
            idle_timeout: Duration::from_secs(60),
            max_messages_per_second: 0,
            raw: Vec::new(),
        }
    }
}

impl SocketConfig {
    /// Whether a peer with these credentials may use the socket.
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        (self.allowed_uids.is_empty() && self.allowed_gids.is_empty())
            || self.allowed_uids.contains(&uid)
            || self.allowed_gids.contains(&gid)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    pub dir: PathBuf,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            dir: "/var/lib/iot-cognito-relay".into(),
        }
    }
}

/// When the identity manager refreshes credentials.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RefreshMode {
    /// `refresh_margin` ahead of expiry, so credentials are always at hand.
    #[default]
    Eager,
    /// Only when they are needed: before a (re)connect or an AWS call of the identity
    /// manager's own. A connection outlives the credentials that signed it, so a device that
    /// stays connected refreshes about once a day instead of every hour (cellular plans).
    OnDemand,
}

/// What the spool does when a new message would exceed `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFull {
    DropOldest,
    RejectNew,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    pub max_bytes: ByteSize,
    pub on_full: OnFull,
    /// Write-behind: a message the broker acknowledges within this window is never written.
    #[serde(with = "duration")]
    pub commit_window: Duration,
    /// Messages without a `ttl` are dropped unpublished once they waited this long (zero:
    /// never).
    #[serde(with = "duration")]
    pub max_age: Duration,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            max_bytes: ByteSize(256 * 1024 * 1024),
            on_full: OnFull::DropOldest,
            commit_window: Duration::from_millis(200),
            max_age: Duration::ZERO,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublishConfig {
    pub max_publishes_per_second: u32,
    pub max_bytes_per_second: ByteSize,
    pub max_in_flight: u16,
}

impl Default for PublishConfig {
    fn default() -> Self {
        PublishConfig {
            max_publishes_per_second: 100,
            max_bytes_per_second: ByteSize(512 * 1024),
            max_in_flight: 100,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    pub max_messages: u32,
    pub max_bytes: ByteSize,
    #[serde(with = "duration")]
    pub linger: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_messages: 1,
            max_bytes: ByteSize(MAX_PAYLOAD_BYTES as u64),
            linger: Duration::ZERO,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
        }
    }
}

impl Config {
    /// Reads `path` and the environment overrides, then validates the result.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let load_err = |source| ConfigError::Load {
            path: path.to_owned(),
            source,
        };
        check_not_tamperable(path)?;
        let raw = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__"),
            )
            .build()
            .map_err(load_err)?;
        let mut config: Config = raw.try_deserialize().map_err(load_err)?;
        config.validate(path)?;
        Ok(config)
    }

    /// The effective config as TOML, for `check-config`. Nothing in the config is a secret by
    /// design; credentials embedded in a URL are masked all the same.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        for url in [
            &mut shown.aws.endpoint_url,
            &mut shown.mqtt.url,
            &mut shown.network.proxy,
        ] {
            *url = network::mask_credentials(url);
        }
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// The host of a URL, without brackets, port or user info.
pub fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    match host_port.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
        None => host_port.split(':').next().unwrap_or_default(),
    }
}

fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).expect("write config");
        Config::load(&path)
    }

    const MINIMAL: &str = r#"
[identity]
identity_pool_id = "eu-west-1:0b7c5a57-6a4f-4a62-9d36-3f1c0e3b6a11"
secret_id = "eu-west-1_abc_demo-app-user"
"#;

    #[test]
    fn minimal_config_gets_spec_defaults() {
        let config = load(MINIMAL).expect("valid");
        assert_eq!(config.aws.region, "eu-west-1");
        assert_eq!(config.identity.refresh_margin, Duration::from_secs(300));
        assert_eq!(config.mqtt.keep_alive, Duration::from_secs(30));
        assert_eq!(config.socket.mode, FileMode(0o660));
        assert_eq!(config.spool.max_bytes, ByteSize(256 << 20));
        assert_eq!(config.spool.on_full, OnFull::DropOldest);
        assert_eq!(config.identity.refresh, RefreshMode::Eager);
        assert_eq!(config.publish.max_publishes_per_second, 100);
        assert_eq!(config.publish.max_bytes_per_second, ByteSize(512 << 10));
        assert_eq!(config.batch.max_messages, 1);
        assert_eq!(config.shutdown.drain_timeout, Duration::from_secs(10));
    }

    #[test]
    fn refresh_is_eager_or_on_demand_and_nothing_else() {
        let with = |mode: &str| {
            load(&MINIMAL.replace(
                "[identity]\n",
                &format!("[identity]\nrefresh = \"{mode}\"\n"),
            ))
        };
        assert_eq!(
            with("on-demand").expect("valid").identity.refresh,
            RefreshMode::OnDemand
        );
        assert_eq!(
            with("eager").expect("valid").identity.refresh,
            RefreshMode::Eager
        );
        let text = with("lazy").expect_err("must fail").to_string();
        assert!(
            text.contains("lazy") && text.contains("identity.refresh"),
            "{text}"
        );
    }

    #[test]
    fn missing_required_key_is_named() {
        let err = load("[identity]\nsecret_id = \"s\"\n").expect_err("must fail");
        let text = err.to_string();
        assert!(text.contains("identity.identity_pool_id"), "{text}");
        assert!(text.contains("config.toml"), "{text}");
    }

    #[test]
    fn unknown_key_is_named_with_file() {
        let err =
            load(&format!("{MINIMAL}\n[mqtt]\nkeepalive = \"30s\"\n")).expect_err("must fail");
        let text = err.to_string();
        assert!(text.contains("keepalive"), "{text}");
        assert!(text.contains("config.toml"), "{text}");
    }

    #[test]
    fn unknown_section_is_named() {
        let err =
            load(&format!("{MINIMAL}\n[mqqt]\nurl = \"wss://x/mqtt\"\n")).expect_err("must fail");
        assert!(err.to_string().contains("mqqt"), "{err}");
    }

    #[test]
    fn bad_duration_is_named() {
        let err = load(&format!("{MINIMAL}\n[mqtt]\nkeep_alive = \"30 parsecs\"\n"))
            .expect_err("must fail");
        let text = err.to_string();
        assert!(text.contains("keep_alive"), "{text}");
        assert!(text.contains("30 parsecs"), "{text}");
    }

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(ByteSize::parse("512KiB"), Ok(ByteSize(524_288)));
        assert_eq!(ByteSize::parse("256MiB"), Ok(ByteSize(268_435_456)));
        assert_eq!(ByteSize::parse("0"), Ok(ByteSize(0)));
        assert!(ByteSize::parse("12 parsecs").is_err());
        assert!(ByteSize::parse("99999999999999GiB").is_err());
        assert_eq!(ByteSize(512 << 10).to_string(), "512KiB");
    }

    #[test]
    fn keep_alive_outside_iot_range_is_rejected() {
        let err =
            load(&format!("{MINIMAL}\n[mqtt]\nkeep_alive = \"5s\"\n")).expect_err("must fail");
        assert!(err.to_string().contains("mqtt.keep_alive"), "{err}");
    }

    #[test]
    fn batch_larger_than_a_payload_is_rejected() {
        let err =
            load(&format!("{MINIMAL}\n[batch]\nmax_bytes = \"1MiB\"\n")).expect_err("must fail");
        assert!(err.to_string().contains("batch.max_bytes"), "{err}");
    }

    #[test]
    fn topic_prefix_with_wildcards_is_rejected() {
        let err = load(&format!(
            "{MINIMAL}\n[mqtt]\ntopic_prefix = \"fleet/+/{{identity_id}}\"\n"
        ))
        .expect_err("must fail");
        assert!(err.to_string().contains("mqtt.topic_prefix"), "{err}");
    }

    #[test]
    fn allowed_ids_restrict_only_when_set() {
        let mut socket = SocketConfig::default();
        assert!(socket.allows(1000, 1000));
        socket.allowed_gids = vec![42];
        assert!(socket.allows(1000, 42));
        assert!(!socket.allows(1000, 1000));
        socket.allowed_uids = vec![1000];
        assert!(socket.allows(1000, 1000));
    }

    #[test]
    fn raw_sockets_are_validated() {
        let raw = |body: &str| {
            load(&format!(
                "{MINIMAL}\n[[socket.raw]]\npath = \"/tmp/raw.sock\"\n{body}"
            ))
        };
        let config = raw("topic = \"sensors/raw\"\ndelimiter = \";\"\n").expect("valid");
        assert_eq!(config.socket.raw[0].delimiter, Delimiter(b';'));
        assert_eq!(config.socket.raw[0].qos, Qos::AtLeastOnce);
        let err = raw("topic = \"a/#\"\n").expect_err("wildcard");
        assert!(err.to_string().contains("socket.raw.topic"), "{err}");
        let err = raw("topic = \"t\"\ndelimiter = \"ab\"\n").expect_err("two bytes");
        assert!(err.to_string().contains("delimiter"), "{err}");
        assert!(err.to_string().contains("exactly one byte"), "{err}");
        let err = raw("topic = \"t\"\nqos = 2\n").expect_err("no QoS 2");
        assert!(err.to_string().contains("qos"), "{err}");
        assert!(err.to_string().contains("must be 0 or 1"), "{err}");
        let config = raw("topic = \"t\"\nqos = 0\n").expect("QoS 0");
        assert_eq!(config.socket.raw[0].qos, Qos::AtMostOnce);
    }

    #[test]
    fn max_in_flight_is_capped_at_iot_cores_limit() {
        let in_flight = |n: u32| load(&format!("{MINIMAL}\n[publish]\nmax_in_flight = {n}\n"));
        assert_eq!(in_flight(100).expect("valid").publish.max_in_flight, 100);
        for bad in [0, 101, 1000] {
            let err = in_flight(bad).expect_err("out of range");
            assert!(err.to_string().contains("publish.max_in_flight"), "{err}");
            assert!(err.to_string().contains("between 1 and 100"), "{err}");
        }
    }

    #[test]
    fn drain_timeout_fits_the_units_stop_timeout() {
        let drain = |d: &str| load(&format!("{MINIMAL}\n[shutdown]\ndrain_timeout = \"{d}\"\n"));
        assert!(drain("15s").is_ok());
        let err = drain("16s").expect_err("longer than the unit allows");
        assert!(err.to_string().contains("shutdown.drain_timeout"), "{err}");
        assert!(err.to_string().contains("TimeoutStopSec"), "{err}");
    }

    #[test]
    fn bad_socket_mode_is_rejected() {
        let err = load(&format!("{MINIMAL}\n[socket]\nmode = \"rw-rw----\"\n")).expect_err("fail");
        assert!(err.to_string().contains("socket.mode"), "{err}");
        assert!(err.to_string().contains("not an octal file mode"), "{err}");
        let config = load(&format!("{MINIMAL}\n[socket]\nmode = \"0600\"\n")).expect("valid");
        assert_eq!(config.socket.mode, FileMode(0o600));
    }

    #[test]
    fn redacted_output_masks_url_credentials() {
        let mut config = load(MINIMAL).expect("valid");
        config.aws.endpoint_url = "http://user:hunter2@127.0.0.1:5000".into();
        let shown = config.to_redacted_toml();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("***@127.0.0.1:5000"), "{shown}");
    }
}

/// docs/configuration.md and config/config.toml name every key of `Config`, and nothing else;
/// the doc gives each key's default as `check-config` prints it.
#[cfg(test)]
mod docs_in_step {
    use std::collections::BTreeMap;

    use super::Config;

    const DOC: &str = include_str!("../../docs/configuration.md");
    const SHIPPED: &str = include_str!("../../config/config.toml");

    /// Every key as `section.key` (`socket.raw.path` for array entries) with its TOML value.
    fn keys(text: &str) -> BTreeMap<String, String> {
        let config: Config = toml::from_str(text).expect("config parses");
        let table = toml::Table::try_from(&config).expect("config serialises");
        let mut keys = BTreeMap::new();
        for (section, body) in &table {
            for (key, value) in body.as_table().expect("section is a table") {
                keys.insert(format!("{section}.{key}"), value.to_string());
                if let Some(entry) = value
                    .as_array()
                    .and_then(|a| a.first())
                    .and_then(|v| v.as_table())
                {
                    for (sub, value) in entry {
                        keys.insert(format!("{section}.{key}.{sub}"), value.to_string());
                    }
                }
            }
        }
        keys
    }

    /// The doc's table rows: key → default cell.
    fn doc_rows() -> BTreeMap<String, String> {
        DOC.lines()
            .filter_map(|line| {
                let cells: Vec<&str> = line.split('|').map(str::trim).collect();
                let key = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
                Some((key.to_owned(), cells.get(3)?.to_string()))
            })
            .collect()
    }

    /// config/config.toml's keys, commented out or not, as `section.key`.
    fn shipped_keys() -> Vec<String> {
        let mut section = String::new();
        let mut found = Vec::new();
        for line in SHIPPED.lines() {
            let line = line.trim_start_matches('#').trim();
            if let Some(name) = line.strip_prefix('[') {
                section = name.trim_matches(['[', ']']).to_owned();
                // `[[socket.raw]]` stands for the key `socket.raw` too.
                if name.starts_with('[') {
                    found.push(section.clone());
                }
            } else if let Some((key, _)) = line.split_once('=')
                && !key.trim().is_empty()
                && key
                    .trim()
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_')
            {
                found.push(format!("{section}.{}", key.trim()));
            }
        }
        found
    }

    #[test]
    fn every_key_is_documented_and_shipped_and_nothing_else() {
        let defaults = keys("");
        let all = keys("[[socket.raw]]\npath = \"/run/raw.sock\"\ntopic = \"t\"\n");
        let rows = doc_rows();
        let shipped = shipped_keys();
        let mut problems = Vec::new();
        for key in all.keys() {
            match (rows.get(key), defaults.get(key)) {
                (None, default) => problems.push(format!(
                    "docs/configuration.md: no row for `{key}` (default {})",
                    default.map_or("none".into(), |d| format!("`{d}`"))
                )),
                (Some(cell), Some(default)) if !cell.contains(&format!("`{default}`")) => problems
                    .push(format!(
                        "docs/configuration.md: `{key}` default should read `{default}`, not {cell}"
                    )),
                _ => {}
            }
            if !shipped.contains(key) {
                problems.push(format!("config/config.toml: `{key}` missing"));
            }
        }
        for key in rows.keys() {
            if !all.contains_key(key) {
                problems.push(format!(
                    "docs/configuration.md: `{key}` is not a config key"
                ));
            }
        }
        for key in &shipped {
            if !all.contains_key(key) {
                problems.push(format!("config/config.toml: `{key}` is not a config key"));
            }
        }
        assert!(problems.is_empty(), "\n{}", problems.join("\n"));
    }
}
