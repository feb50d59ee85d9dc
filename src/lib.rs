//! iot-cognito-relay: relays what local apps write to a Unix socket into AWS IoT Core, using
//! only Cognito identities. See SPEC.md for the contract and README.md for the tour.

pub mod aws;
pub mod batch;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod heartbeat;
pub mod identity;
pub mod ingest;
pub mod lines;
pub mod logging;
pub mod mqtt;
pub mod notify;
pub mod protocol;
pub mod publisher;
pub mod quota;
pub mod raw;
pub mod retry;
pub mod secret;
pub mod signer;
pub mod spool;
pub mod stack;
pub mod status;
pub mod topic;

pub use config::Config;
pub use daemon::run;
