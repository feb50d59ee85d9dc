//! The message every stage passes on: what an app sent, validated, before any stage adds its
//! own framing (the socket's JSON, the spool's rows, the broker's publish).

/// Largest payload IoT Core accepts.
pub const MAX_PAYLOAD_BYTES: usize = 128 * 1024;

/// Delivery guarantee a message asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    AtMostOnce,
    AtLeastOnce,
}

impl Qos {
    pub fn as_u8(self) -> u8 {
        match self {
            Qos::AtMostOnce => 0,
            Qos::AtLeastOnce => 1,
        }
    }

    pub fn from_u8(value: u8) -> Option<Qos> {
        match value {
            0 => Some(Qos::AtMostOnce),
            1 => Some(Qos::AtLeastOnce),
            _ => None,
        }
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

/// A validated message, ready for the spool. `topic` is relative; the prefix is added at publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: Qos,
    pub kind: PayloadKind,
}
