//! The message every stage passes on: what an app sent, validated, before any stage adds its
//! own framing (the socket's JSON, the spool's rows, the broker's publish).

/// Largest payload IoT Core accepts.
pub const MAX_PAYLOAD_BYTES: usize = 128 * 1024;

/// Delivery guarantee a message asks for. In a config file it is written 0 or 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum Qos {
    /// QoS 0: sent once, removed from the spool when it goes on the wire.
    AtMostOnce,
    /// QoS 1: kept in the spool until the broker's PUBACK.
    AtLeastOnce,
}

impl Qos {
    /// The MQTT QoS number.
    pub fn as_u8(self) -> u8 {
        match self {
            Qos::AtMostOnce => 0,
            Qos::AtLeastOnce => 1,
        }
    }

    /// `None` for anything but 0 and 1 (IoT Core has no QoS 2).
    pub fn from_u8(value: u8) -> Option<Qos> {
        match value {
            0 => Some(Qos::AtMostOnce),
            1 => Some(Qos::AtLeastOnce),
            _ => None,
        }
    }
}

impl TryFrom<u8> for Qos {
    type Error = String;

    fn try_from(value: u8) -> Result<Qos, String> {
        Qos::from_u8(value).ok_or_else(|| format!("QoS {value} must be 0 or 1"))
    }
}

impl From<Qos> for u8 {
    fn from(qos: Qos) -> u8 {
        qos.as_u8()
    }
}

/// What a payload was when it arrived, kept in the spool: only JSON values may be merged into
/// a batch array; text and binary go out alone, byte for byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    /// `payload` was a JSON value other than a string (stored as compact JSON).
    Json,
    /// `payload` was a JSON string (stored as its raw UTF-8 text).
    Text,
    /// `payload_base64`, a raw socket record, or a row from before kinds were stored.
    Binary,
}

impl PayloadKind {
    /// How the spool stores the kind.
    pub fn as_u8(self) -> u8 {
        match self {
            PayloadKind::Json => 0,
            PayloadKind::Text => 1,
            PayloadKind::Binary => 2,
        }
    }

    /// Unknown values (and rows stored before kinds existed) are opaque bytes: sent as they are.
    pub fn from_u8(value: Option<u8>) -> PayloadKind {
        match value {
            Some(0) => PayloadKind::Json,
            Some(1) => PayloadKind::Text,
            _ => PayloadKind::Binary,
        }
    }
}

/// Which backlog goes first: a waiting high-priority message is published before every waiting
/// normal one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    #[default]
    /// The default.
    Normal,
    /// Overtakes the normal backlog.
    High,
}

impl Priority {
    /// How the spool stores it.
    pub fn as_u8(self) -> u8 {
        match self {
            Priority::Normal => 0,
            Priority::High => 1,
        }
    }

    /// Unknown values (and rows from before priorities were stored) are normal.
    pub fn from_u8(value: Option<u8>) -> Priority {
        match value {
            Some(1) => Priority::High,
            _ => Priority::Normal,
        }
    }
}

/// What an app may say about a message while it waits in the daemon (docs/protocol.md,
/// "Message options").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Options {
    /// Seconds after its acceptance when it is no longer worth publishing.
    pub ttl: Option<u32>,
    /// Which backlog it joins.
    pub priority: Priority,
    /// Only the newest waiting conflating message of its topic is worth publishing.
    pub conflate: bool,
}

/// A validated message, ready for the spool. `topic` is relative; the prefix is added at publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Relative topic, validated against IoT Core's limits with the prefix added.
    pub topic: String,
    /// The bytes to publish (at most `MAX_PAYLOAD_BYTES`).
    pub payload: Vec<u8>,
    /// Delivery guarantee.
    pub qos: Qos,
    /// What the payload was when it arrived.
    pub kind: PayloadKind,
    /// Expiry, priority and conflation.
    pub options: Options,
}
