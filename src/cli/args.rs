//! The command-line interface, as data: `main` parses it, and the packaging tests turn it into
//! the man page and the shell completions.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config;

/// Where the man pages send readers: the documents the package installs.
const SEE_CONFIGURATION: &str = "Every config key (type, default, validation, whether SIGHUP applies it): \
/usr/share/doc/iot-cognito-relay/configuration.md. Operations: \
/usr/share/doc/iot-cognito-relay/operations.md.";
const SEE_PROTOCOL: &str = "The socket protocol, its error codes and limits: \
/usr/share/doc/iot-cognito-relay/protocol.md.";

/// Relays local sensor data to AWS IoT Core using only Cognito identities.
#[derive(Parser)]
#[command(name = "iot-cognito-relay", version, about, after_long_help = concat!(
    "Config keys: /usr/share/doc/iot-cognito-relay/configuration.md. ",
    "Socket protocol: /usr/share/doc/iot-cognito-relay/protocol.md. ",
    "Operations: /usr/share/doc/iot-cognito-relay/operations.md."
))]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (systemd runs this).
    #[command(after_long_help = SEE_CONFIGURATION)]
    Run {
        /// The config file.
        #[arg(long, default_value = config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Publish PAYLOAD, or one message per stdin line, through the daemon; waits for the acks.
    #[command(after_long_help = SEE_PROTOCOL)]
    Send {
        /// Where the daemon's socket is.
        #[command(flatten)]
        socket: SocketArgs,
        /// Relative topic; the daemon adds <identity_pool_id>/<identity_id>/.
        #[arg(long, required_unless_present = "json")]
        topic: Option<String>,
        /// 1: kept until IoT Core acknowledges it; 0: sent once.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
        qos: u8,
        /// Drop it unpublished once it waited this many seconds in the daemon.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        ttl: Option<u32>,
        /// high: published before every waiting normal message.
        #[arg(long, value_parser = ["high", "normal"])]
        priority: Option<String>,
        /// Keep only the newest waiting conflating message of the topic.
        #[arg(long)]
        conflate: bool,
        /// Inputs are whole protocol lines (see docs/protocol.md) instead of payloads.
        #[arg(long, conflicts_with_all = ["topic", "qos", "ttl", "priority", "conflate"])]
        json: bool,
        /// JSON (published compact) or plain text; omit to read one message per stdin line.
        payload: Option<String>,
        /// Give up (exit 1) when the daemon owes an answer, or does not read, for this long.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Show the daemon's state and counters.
    #[command(after_long_help = SEE_PROTOCOL)]
    Status {
        /// Where the daemon's socket is.
        #[command(flatten)]
        socket: SocketArgs,
        /// Print the raw JSON object.
        #[arg(long)]
        json: bool,
        /// Give up (exit 1) when the daemon has not answered within this long.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Validate the config and print the effective values.
    #[command(after_long_help = SEE_CONFIGURATION)]
    CheckConfig {
        /// The config file.
        #[arg(long, default_value = config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Turn `aws cloudformation describe-stacks` JSON into a config.toml on stdout.
    #[command(after_long_help = SEE_CONFIGURATION)]
    ConfigFromStack {
        /// The saved output of `aws cloudformation describe-stacks`.
        file: PathBuf,
    },
    /// Print cloud-to-device messages matching FILTER (one JSON line each), acking each one
    /// after it is printed.
    ///
    /// Each line is {"topic": T, "payload": P} (P inline when the message is JSON, a string
    /// when it is other text) or {"topic": T, "payload_base64": B}; topics are relative to the
    /// device prefix. A message is acked only after its line is written and flushed, so one
    /// that is not printed (the command is killed, stdout is closed) goes to the next
    /// subscriber: a script may see a message twice, never zero times. The daemon receives
    /// what `[downlink] topics` subscribes to; FILTER picks from that (MQTT wildcards + and #).
    #[command(after_long_help = SEE_PROTOCOL)]
    Subscribe {
        /// Where the daemon's socket is.
        #[command(flatten)]
        socket: SocketArgs,
        /// Exit 0 after N messages (default: run until the daemon stops).
        #[arg(long)]
        count: Option<u64>,
        /// Topic filters relative to the device prefix, e.g. 'commands/#'.
        #[arg(required = true, value_name = "FILTER")]
        filters: Vec<String>,
    },
    /// Walk the onboarding chain online, as the daemon would, one verdict per step.
    ///
    /// Config and the unit's sandbox, the region, the running daemon, the clock against AWS,
    /// guest credentials, the bootstrap secret, the user pool sign-in, authenticated
    /// credentials, and a CONNECT to the IoT endpoint (the IoT policy). It changes nothing:
    /// it reuses the identities the daemon cached, registers nothing, attaches nothing, and
    /// opens no MQTT connection while the daemon is connected (what the daemon proves counts as
    /// passed). Exit 0 when every step passed, 1 when one failed, 2 for an invalid config.
    #[command(after_long_help = SEE_CONFIGURATION)]
    Doctor {
        /// The config file.
        #[arg(long, default_value = config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// One JSON object: {"steps":[{"step","verdict","detail"|"cause","fix"|"reason"}]}.
        #[arg(long)]
        json: bool,
    },
    /// List, requeue or purge the dead letters: messages the broker never accepted.
    DeadLetters {
        /// What to do with them.
        #[arg(value_enum, default_value_t = DeadLetterAction::List)]
        action: DeadLetterAction,
        /// Where the daemon's socket is.
        #[command(flatten)]
        socket: SocketArgs,
        /// Print the daemon's raw JSON answer.
        #[arg(long)]
        json: bool,
        /// Give up (exit 1) when the daemon has not answered within this long.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

/// Where the daemon's socket is: `--socket`, else the config's `socket.path`.
#[derive(clap::Args, Clone)]
pub struct SocketArgs {
    /// The daemon's socket (default: the config's socket.path).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// The config whose socket.path to use.
    #[arg(long, default_value = config::DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
}

/// What `dead-letters` does.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeadLetterAction {
    /// Show the newest 100 (topic, size, reason, when).
    List,
    /// Put them all back in the queue, behind what is waiting.
    Requeue,
    /// Delete them all.
    Purge,
}

impl DeadLetterAction {
    /// The socket protocol's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterAction::List => "list",
            DeadLetterAction::Requeue => "requeue",
            DeadLetterAction::Purge => "purge",
        }
    }
}
