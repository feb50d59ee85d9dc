//! Log setup: human-readable lines on stderr, level from the config, `RUST_LOG` overrides.

use std::io::IsTerminal;

use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// Dependencies that are chatty at info level; `RUST_LOG` can still open them up.
const QUIET_DEPENDENCIES: &str = "aws_config=warn,aws_smithy_runtime=warn,aws_smithy_http_client=warn,rumqttc=warn,hyper=warn,rustls=warn";

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

fn level_filter(level: &str) -> EnvFilter {
    EnvFilter::new(format!("{level},{QUIET_DEPENDENCIES}"))
}

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(level: &str) -> LogControl {
    let from_env = EnvFilter::try_from_default_env();
    let control_from_env = from_env.is_ok();
    let filter = from_env.unwrap_or_else(|_| level_filter(level));
    let (filter, handle) = reload::Layer::new(filter);
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        // Dependencies' TRACE events carry whole requests and responses (the AWS SDK logs
        // InitiateAuth's password and the returned tokens there): never, whatever RUST_LOG says.
        .with_filter(filter_fn(|meta| {
            *meta.level() < tracing::Level::TRACE || meta.target().starts_with("iot_cognito_relay")
        }));
    tracing_subscriber::registry()
        .with(filter)
        .with(lines)
        .init();
    LogControl {
        handle,
        from_env: control_from_env,
    }
}
