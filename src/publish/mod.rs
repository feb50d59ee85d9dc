//! Stage 3: moves spooled messages to IoT Core over MQTT-over-WebSockets, within its quotas,
//! and removes each one from the spool only after the broker acknowledged it.

pub(crate) mod batch;
mod flow;
pub(crate) mod inbound;
pub(crate) mod mqtt;
pub(crate) mod publisher;
pub(crate) mod quota;
pub(crate) mod refusal;
mod signer;
pub mod tls;
pub(crate) mod wire;

pub use flow::DEAD_LETTER_STRIKES;
