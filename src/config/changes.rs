//! What a reload (SIGHUP) changes, as typed values. The daemon applies the live ones and names
//! the rest as waiting for a restart, in one match (`daemon/reload.rs`).

use super::{ByteSize, Config, SpoolConfig};

/// One difference between the running config and a reloaded one.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Applies live.
    LogLevel(String),
    /// Applies live: the publisher paces by the new quotas from its next publish.
    PublishLimits {
        max_publishes_per_second: u32,
        max_bytes_per_second: ByteSize,
    },
    /// Applies live: a lower `max_bytes` with `drop-oldest` trims in bounded steps; a new
    /// `commit_window` holds the next messages (what is held is committed first); a new
    /// `max_age` counts at the next read.
    SpoolLimits(SpoolConfig),
    /// A key (or a section's keys) that takes effect at the next start.
    NeedsRestart(&'static str),
}

/// The changes from `old` to `new`, live ones first.
pub fn changes(old: &Config, new: &Config) -> Vec<Change> {
    // Naming every field makes a new section a compile error here until it is sorted into
    // live or restart.
    let Config {
        aws,
        identity,
        mqtt,
        socket,
        state,
        spool,
        publish,
        batch,
        shutdown,
        downlink,
        health,
        network,
        log,
    } = new;
    let mut changes = Vec::new();
    if log.level != old.log.level {
        changes.push(Change::LogLevel(log.level.clone()));
    }
    if (
        publish.max_publishes_per_second,
        publish.max_bytes_per_second,
    ) != (
        old.publish.max_publishes_per_second,
        old.publish.max_bytes_per_second,
    ) {
        changes.push(Change::PublishLimits {
            max_publishes_per_second: publish.max_publishes_per_second,
            max_bytes_per_second: publish.max_bytes_per_second,
        });
    }
    if *spool != old.spool {
        changes.push(Change::SpoolLimits(spool.clone()));
    }
    let restart = [
        ("aws", *aws != old.aws),
        ("identity", *identity != old.identity),
        ("mqtt", *mqtt != old.mqtt),
        ("socket", *socket != old.socket),
        ("state", *state != old.state),
        (
            "publish.max_in_flight",
            publish.max_in_flight != old.publish.max_in_flight,
        ),
        ("batch", *batch != old.batch),
        ("shutdown", *shutdown != old.shutdown),
        ("downlink", *downlink != old.downlink),
        ("health", *health != old.health),
        ("network", *network != old.network),
    ];
    changes.extend(
        restart
            .into_iter()
            .filter(|(_, changed)| *changed)
            .map(|(key, _)| Change::NeedsRestart(key)),
    );
    changes
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::OnFull;

    fn config() -> Config {
        toml::from_str("[identity]\nidentity_pool_id = \"us-east-1:p\"\nsecret_id = \"s\"\n")
            .expect("minimal config")
    }

    #[test]
    fn each_change_is_sorted_into_live_or_restart() {
        type Edit = fn(&mut Config);
        let table: &[(&str, Edit, &[Change])] = &[
            ("nothing", |_| {}, &[]),
            (
                "log level",
                |c| c.log.level = "debug".into(),
                &[Change::LogLevel(String::new())],
            ),
            (
                "publish quota",
                |c| c.publish.max_publishes_per_second = 10,
                &[Change::PublishLimits {
                    max_publishes_per_second: 10,
                    max_bytes_per_second: ByteSize(512 * 1024),
                }],
            ),
            (
                "spool policy",
                |c| c.spool.on_full = OnFull::RejectNew,
                &[Change::SpoolLimits(SpoolConfig {
                    on_full: OnFull::RejectNew,
                    ..SpoolConfig::default()
                })],
            ),
            (
                "in-flight window",
                |c| c.publish.max_in_flight = 5,
                &[Change::NeedsRestart("publish.max_in_flight")],
            ),
            (
                "socket path",
                |c| c.socket.path = "/tmp/other.sock".into(),
                &[Change::NeedsRestart("socket")],
            ),
            (
                "refresh margin",
                |c| c.identity.refresh_margin = Duration::from_secs(60),
                &[Change::NeedsRestart("identity")],
            ),
            (
                "linger and drain",
                |c| {
                    c.batch.linger = Duration::from_millis(50);
                    c.shutdown.drain_timeout = Duration::from_secs(1);
                },
                &[
                    Change::NeedsRestart("batch"),
                    Change::NeedsRestart("shutdown"),
                ],
            ),
        ];
        for (what, edit, expected) in table {
            let old = config();
            let mut new = old.clone();
            edit(&mut new);
            let mut found = changes(&old, &new);
            // The level's text is checked below; the table names only the kind.
            for change in &mut found {
                if let Change::LogLevel(level) = change {
                    assert_eq!(level, "debug");
                    level.clear();
                }
            }
            assert_eq!(&found, expected, "{what}");
        }
    }

    #[test]
    fn live_and_restart_changes_come_together() {
        let old = config();
        let mut new = old.clone();
        new.log.level = "warn".into();
        new.mqtt.keep_alive = Duration::from_secs(60);
        assert_eq!(
            changes(&old, &new),
            [
                Change::LogLevel("warn".into()),
                Change::NeedsRestart("mqtt")
            ]
        );
    }
}
