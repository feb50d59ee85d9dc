//! iot-cognito-relay: relays what local apps write to a Unix socket into AWS IoT Core, using
//! only Cognito identities. README.md gives the tour; docs/ hold the contract (configuration, socket protocol,
//! operations, security).
//!
//! # Layout
//!
//! The folders follow one message from a local app to the broker:
//!
//! ```text
//! ingest/    Unix sockets: the JSON protocol, raw sockets, record splitting
//!   → spool/     the durable queue ("ok" means on disk, or acknowledged by IoT Core)
//!   → publish/   batching, IoT Core quotas, the MQTT-over-WebSockets connection, SigV4
//!        ↑
//! identity/  secret → user pool → Cognito credentials, refreshed ahead of expiry
//! downlink/  the way back: IoT Core → inbox → subscribed local apps
//! ```
//!
//! Around them: `daemon/` builds the tasks and supervises them, `config/` loads and validates
//! the config file, `ops/` speaks to systemd and journald and reports status, `cli/` holds the
//! command line and the commands that talk to a running daemon. `topic`, `topic_filter`,
//! `device_name`, `message`, `retry`, `secret`, `heartbeat` (signs of life for the watchdog)
//! and `repeats` (rate-limited warnings) are small rules and plumbing every stage shares; they
//! and `config` import no stage.

#![warn(missing_docs)]

// The public surface is what `main`, the fuzz target, the benches and the integration tests
// use; everything else is internal to the crate.
pub mod cli;
mod config;
mod daemon;
mod device_name;
mod downlink;
mod heartbeat;
mod identity;
pub mod ingest;
pub mod message;
mod ops;
pub mod publish;
mod repeats;
mod retry;
mod secret;
mod spool;
mod state_file;
pub mod topic;
mod topic_filter;
