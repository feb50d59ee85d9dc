//! Log setup: human-readable lines on stderr, level from the config, `RUST_LOG` overrides.

use std::io::IsTerminal;

use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Dependencies that are chatty at info level; `RUST_LOG` can still open them up.
const QUIET_DEPENDENCIES: &str = "aws_config=warn,aws_smithy_runtime=warn,aws_smithy_http_client=warn,rumqttc=warn,hyper=warn,rustls=warn";

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},{QUIET_DEPENDENCIES}")));
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
}
