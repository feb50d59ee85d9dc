//! iot-cognito-relay: relays what local apps write to a Unix socket into AWS IoT Core, using
//! only Cognito identities. The layout of these folders, the onboarding chain and the
//! invariants the code keeps are in docs/design.md; README.md gives the tour, and the other
//! documents of docs/ hold the contract (configuration, socket protocol, operations, security).

#![warn(missing_docs)]

// The public surface is what `main`, the fuzz target, the benches and the integration tests
// use; everything else is internal to the crate.
mod amazon_roots;
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
