//! Cloud to device: messages IoT Core sends to the device's topics reach local apps that
//! subscribe on the socket, durably and at least once.
//!
//! ```text
//! IoT Core → MQTT (QoS 1, persistent session) → inbox (SQLite, committed before PUBACK)
//!          → dispatcher (filters, one holder per message) → subscribed socket apps → ack
//! ```
//!
//! `dispatch` is pure (the filter rule it matches with is `crate::topic_filter`); `inbox` is the storage; `hub` is the thread that owns
//! both and talks to the MQTT connection and the socket peers; `render` writes a message line.

pub mod dispatch;
pub mod hub;
pub mod inbox;
pub mod render;

pub use hub::{AckError, Downlink};
pub use inbox::InboxStats;
