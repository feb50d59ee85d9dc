//! SIGHUP: applies what can change live and names what waits for a restart.

use tokio::sync::watch;

use crate::config::changes::{Change, changes};
use crate::config::{Config, PublishConfig};
use crate::daemon::spool_settings;
use crate::ops::logging::LogControl;
use crate::ops::notify;
use crate::spool::Spool;

/// The live parts of the daemon a reload reaches.
pub struct Live<'a> {
    pub log: Option<&'a LogControl>,
    pub publish_limits: &'a watch::Sender<PublishConfig>,
    pub spool: &'a Spool,
}

/// Applies `new` over `running` and logs one line saying what changed.
pub async fn reload(running: &mut Config, new: Config, live: Live<'_>) {
    notify::reloading();
    let mut applied = Vec::new();
    let mut waiting = Vec::new();
    let mut log_refused = false;
    for change in changes(running, &new) {
        match change {
            Change::LogLevel(level) => match live.log.map(|log| log.set_level(&level)) {
                Some(Err(reason)) => {
                    tracing::warn!(%reason, "log.level not changed");
                    // Still the running level: the next reload tries again.
                    log_refused = true;
                }
                _ => applied.push(format!("log.level {:?} -> {level:?}", running.log.level)),
            },
            Change::PublishLimits {
                max_publishes_per_second,
                max_bytes_per_second,
            } => {
                applied.push(format!(
                    "publish.max_publishes_per_second {} -> {max_publishes_per_second}, publish.max_bytes_per_second {} -> {max_bytes_per_second}",
                    running.publish.max_publishes_per_second, running.publish.max_bytes_per_second,
                ));
                live.publish_limits.send_replace(new.publish.clone());
            }
            Change::SpoolLimits(spool) => {
                applied.push(format!(
                    "spool.max_bytes {} -> {}, spool.on_full {:?} -> {:?}, spool.commit_window {} -> {}, spool.max_age {} -> {}",
                    running.spool.max_bytes,
                    spool.max_bytes,
                    running.spool.on_full,
                    spool.on_full,
                    humantime::format_duration(running.spool.commit_window),
                    humantime::format_duration(spool.commit_window),
                    humantime::format_duration(running.spool.max_age),
                    humantime::format_duration(spool.max_age),
                ));
                live.spool.set_limits(spool_settings(&spool)).await;
            }
            Change::NeedsRestart(key) => waiting.push(key),
        }
    }
    let needs_restart = !waiting.is_empty();
    tracing::info!(
        changed = %if applied.is_empty() { "nothing live".to_owned() } else { applied.join("; ") },
        needs_restart,
        restart_keys = %waiting.join(", "),
        "configuration reloaded{}",
        if needs_restart { "; other changes take effect at the next restart" } else { "" }
    );
    if !log_refused {
        running.log = new.log;
    }
    running.publish.max_publishes_per_second = new.publish.max_publishes_per_second;
    running.publish.max_bytes_per_second = new.publish.max_bytes_per_second;
    running.spool = new.spool;
}
