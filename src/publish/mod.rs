//! Stage 3: moves spooled messages to IoT Core over MQTT-over-WebSockets, within its quotas,
//! and removes each one from the spool only after the broker acknowledged it.

pub mod batch;
pub mod connection;
pub mod flow;
pub mod mqtt;
pub mod quota;
pub mod signer;
