//! Log setup: native journald entries with structured fields when systemd sends our stderr to
//! the journal, human-readable lines on stderr otherwise. Level from the config, `RUST_LOG`
//! overrides, SIGHUP changes it (`LogControl`).

use std::io::IsTerminal;

use tracing_journald::{Priority, PriorityMappings};
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::reload;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// SYSLOG_IDENTIFIER of our journal entries (`journalctl -t iot-cognito-relay`).
pub const SYSLOG_IDENTIFIER: &str = "iot-cognito-relay";

/// Changes the log level of the running daemon (SIGHUP).
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    /// RUST_LOG was set: it wins over the config, also on reload.
    from_env: bool,
}

impl LogControl {
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        if self.from_env {
            return Err("RUST_LOG is set and takes precedence".into());
        }
        self.handle
            .reload(level_filter(level))
            .map_err(|e| e.to_string())
    }
}

/// A bare `log.level` is the daemon's own level, and dependencies (the AWS SDK is chatty even
/// at info) only show warnings; a level written as a filter (`info,rumqttc=debug`) is taken
/// as it is, like `RUST_LOG`.
fn level_filter(level: &str) -> EnvFilter {
    if level.contains('=') || level.contains(',') {
        EnvFilter::new(level)
    } else {
        EnvFilter::new(format!("warn,iot_cognito_relay={level}"))
    }
}

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(level: &str) -> LogControl {
    let from_env = EnvFilter::try_from_default_env();
    let control_from_env = from_env.is_ok();
    let filter = from_env.unwrap_or_else(|_| level_filter(level));
    let (filter, handle) = reload::Layer::new(filter);
    // Dependencies' TRACE events carry whole requests and responses (the AWS SDK logs
    // InitiateAuth's password and the returned tokens there): never, whatever RUST_LOG says.
    let no_dependency_trace = filter_fn(|meta| {
        *meta.level() < tracing::Level::TRACE || meta.target().starts_with("iot_cognito_relay")
    });
    let journal = stderr_is_journal()
        .then(|| {
            // Fields go in unprefixed and upper-cased: `identity_id` becomes IDENTITY_ID.
            tracing_journald::layer().map(|layer| {
                layer
                    .with_syslog_identifier(SYSLOG_IDENTIFIER.to_owned())
                    .with_field_prefix(None)
                    // syslog's meaning: info is 6, not the crate's default "notice".
                    .with_priority_mappings(PriorityMappings {
                        info: Priority::Informational,
                        debug: Priority::Debug,
                        ..PriorityMappings::new()
                    })
            })
        })
        .and_then(Result::ok);
    let output = match journal {
        Some(journal) => journal.boxed(),
        None => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .boxed(),
    };
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(output.with_filter(no_dependency_trace));
    if tracing::subscriber::set_global_default(subscriber).is_ok() {
        bridge_log_records();
    }
    LogControl {
        handle,
        from_env: control_from_env,
    }
}

/// Most `log` records a dependency may emit: debug. Their TRACE records carry whole frames
/// (tungstenite logs the websocket upgrade request, whose URL holds the signed session token).
const DEPENDENCY_LOG_MAX: tracing_log::log::LevelFilter = tracing_log::log::LevelFilter::Debug;

/// rumqttc, rustls and tungstenite log through the `log` crate, not tracing: their records are
/// turned into tracing events, so the same filter applies (`RUST_LOG=rumqttc=debug`, or
/// `log.level` on SIGHUP). The `log` side lets through up to `DEPENDENCY_LOG_MAX` whatever the
/// level at start, or a later reload to debug would find those records already dropped.
fn bridge_log_records() {
    // Fails only if another logger is installed already; then that one gets the records.
    let _ = tracing_log::LogTracer::builder()
        .with_max_level(DEPENDENCY_LOG_MAX)
        .init();
}

/// systemd connects stderr to the journal and names that stream in `JOURNAL_STREAM`
/// (`device:inode`); then native entries keep the structured fields. The variable is inherited,
/// so it only counts when it still names our stderr (not when someone runs us from a unit's
/// shell with stderr on a terminal or a file).
pub fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stderr) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(stderr).metadata() else {
        return false;
    };
    stream.to_str() == Some(&format!("{}:{}", meta.dev(), meta.ino()))
}
