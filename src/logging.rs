//! Log setup: human-readable lines on stderr, level from the config, `RUST_LOG` overrides.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Dependencies that are chatty at info level; `RUST_LOG` can still open them up.
const QUIET_DEPENDENCIES: &str = "aws_config=warn,aws_smithy_runtime=warn,aws_smithy_http_client=warn,rumqttc=warn,hyper=warn,rustls=warn";

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},{QUIET_DEPENDENCIES}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
