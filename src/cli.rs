//! The command-line interface, as data: `main` parses it, and the packaging tests turn it into
//! the man page and the shell completions.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config;

/// Relays local sensor data to AWS IoT Core using only Cognito identities.
#[derive(Parser)]
#[command(name = "iot-cognito-relay", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (systemd runs this).
    Run {
        #[arg(long, default_value = config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Publish PAYLOAD, or one message per stdin line, through the daemon; waits for the acks.
    Send {
        #[arg(long, default_value = "/run/iot-cognito-relay/relay.sock")]
        socket: PathBuf,
        /// Relative topic; the daemon adds <identity_pool_id>/<identity_id>/.
        #[arg(long, required_unless_present = "json")]
        topic: Option<String>,
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
        qos: u8,
        /// Inputs are whole protocol lines (see docs/protocol.md) instead of payloads.
        #[arg(long, conflicts_with_all = ["topic", "qos"])]
        json: bool,
        /// JSON (published compact) or plain text; omit to read one message per stdin line.
        payload: Option<String>,
        /// Give up (exit 1) when the daemon owes an answer, or does not read, for this long.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Show the daemon's state and counters.
    Status {
        #[arg(long, default_value = "/run/iot-cognito-relay/relay.sock")]
        socket: PathBuf,
        /// Print the raw JSON object.
        #[arg(long)]
        json: bool,
        /// Give up (exit 1) when the daemon has not answered within this long.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Validate the config and print the effective values.
    CheckConfig {
        #[arg(long, default_value = config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Turn `aws cloudformation describe-stacks` JSON into a config.toml on stdout.
    ConfigFromStack { file: PathBuf },
}
