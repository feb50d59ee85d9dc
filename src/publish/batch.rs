//! Batching (`[batch]`, off while `max_messages = 1`): IoT Core counts publishes (100/s per
//! connection), not readings, so consecutive spool messages for the same topic and QoS can
//! share one publish whose payload is a JSON array of their payloads, in order. With batching
//! on, every JSON payload goes out inside an array, alone or not, so consumers see one shape
//! (IoT rule actions with `batchMode`, such as Firehose, take each element as a record).
//! Only a payload that arrived as a JSON value (its kind, kept in the spool) is an array
//! element: a string payload, `payload_base64`, a raw record or a row stored before kinds were
//! kept goes out alone, byte for byte, as without batching, even when its bytes parse as JSON. `max_bytes` bounds arrays of two or more; a
//! single reading larger than that still goes out as an array of one (never over 128 KiB).

use crate::config::BatchConfig;
use crate::message::{MAX_PAYLOAD_BYTES, PayloadKind, Priority, Qos};
use crate::spool::StoredMessage;

/// One publish: the spool ids it carries (all removed on its PUBACK) and what goes on the wire.
#[derive(Debug)]
pub struct Outgoing {
    pub ids: Vec<i64>,
    pub topic: String,
    pub qos: Qos,
    pub payload: Vec<u8>,
    /// A JSON array that could still take more messages (what `linger` waits for).
    pub open: bool,
    /// Every message in it has this priority: an array never mixes them.
    pub priority: Priority,
}

/// Groups spool messages into publishes within `[batch]`'s limits.
#[derive(Debug, Clone)]
pub struct Batcher {
    max_messages: usize,
    max_bytes: usize,
}

impl Batcher {
    pub fn new(config: &BatchConfig) -> Batcher {
        Batcher {
            max_messages: config.max_messages.max(1) as usize,
            max_bytes: config.max_bytes.0 as usize,
        }
    }

    pub fn enabled(&self) -> bool {
        self.max_messages > 1
    }

    /// The most messages one publish carries (1 when batching is off).
    pub fn max_messages(&self) -> usize {
        self.max_messages
    }

    /// The most bytes one publish carries: `max_bytes` when batching, else IoT Core's limit.
    pub fn max_bytes(&self) -> usize {
        if self.enabled() {
            self.max_bytes
        } else {
            MAX_PAYLOAD_BYTES
        }
    }

    /// The publishes for `messages` (in spool order), in the same order.
    pub fn plan(&self, messages: Vec<StoredMessage>) -> Vec<Outgoing> {
        let mut planned: Vec<Outgoing> = Vec::new();
        for stored in messages {
            let message = stored.message;
            let element = self.enabled() && message.kind == PayloadKind::Json;
            if !element || message.payload.len() + 2 > MAX_PAYLOAD_BYTES {
                planned.push(Outgoing {
                    ids: vec![stored.id],
                    topic: message.topic,
                    qos: message.qos,
                    payload: message.payload,
                    open: false,
                    priority: message.options.priority,
                });
                continue;
            }
            if let Some(last) = planned.last_mut()
                && last.open
                && last.topic == message.topic
                && last.qos == message.qos
                && last.priority == message.options.priority
                && last.ids.len() < self.max_messages
                // A comma before it and the closing bracket after it must still fit.
                && last.payload.len() + message.payload.len() + 2 <= self.max_bytes
            {
                last.payload.push(b',');
                last.payload.extend_from_slice(&message.payload);
                last.ids.push(stored.id);
                continue;
            }
            let mut payload = Vec::with_capacity(message.payload.len() + 2);
            payload.push(b'[');
            payload.extend_from_slice(&message.payload);
            planned.push(Outgoing {
                ids: vec![stored.id],
                topic: message.topic,
                qos: message.qos,
                payload,
                open: true,
                priority: message.options.priority,
            });
        }
        // Close the arrays (only arrays are open while planning).
        for outgoing in &mut planned {
            if outgoing.open {
                outgoing.payload.push(b']');
                // Room for one more element of at least one byte, and a free slot?
                outgoing.open = outgoing.ids.len() < self.max_messages
                    && outgoing.payload.len() + 2 <= self.max_bytes;
            }
        }
        planned
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ByteSize;
    use crate::message::Message;

    fn stored(id: i64, topic: &str, payload: &str) -> StoredMessage {
        stored_as(id, topic, payload, PayloadKind::Json)
    }

    fn stored_as(id: i64, topic: &str, payload: &str, kind: PayloadKind) -> StoredMessage {
        StoredMessage {
            id,
            message: Message {
                topic: topic.into(),
                payload: payload.as_bytes().to_vec(),
                qos: Qos::AtLeastOnce,
                kind,
                options: Default::default(),
            },
        }
    }

    fn batcher(max_messages: u32, max_bytes: u64) -> Batcher {
        Batcher::new(&BatchConfig {
            max_messages,
            max_bytes: ByteSize(max_bytes),
            linger: std::time::Duration::ZERO,
        })
    }

    fn shapes(planned: &[Outgoing]) -> Vec<(Vec<i64>, String)> {
        planned
            .iter()
            .map(|o| {
                (
                    o.ids.clone(),
                    String::from_utf8_lossy(&o.payload).into_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn off_publishes_each_payload_as_is() {
        let planned =
            batcher(1, 131072).plan(vec![stored(1, "a", "{\"c\":1}"), stored(2, "a", "2")]);
        assert_eq!(
            shapes(&planned),
            [(vec![1], "{\"c\":1}".into()), (vec![2], "2".into())]
        );
    }

    #[test]
    fn consecutive_same_topic_messages_share_an_array_in_order() {
        let planned = batcher(3, 131072).plan(vec![
            stored(1, "a", "{\"c\":1}"),
            stored(2, "a", "21.5"),
            stored(3, "b", "\"x\""),
            stored(4, "a", "4"),
            stored(5, "a", "5"),
            stored(6, "a", "6"),
            stored(7, "a", "7"),
        ]);
        assert_eq!(
            shapes(&planned),
            [
                (vec![1, 2], "[{\"c\":1},21.5]".into()),
                (vec![3], "[\"x\"]".into()),
                (vec![4, 5, 6], "[4,5,6]".into()),
                (vec![7], "[7]".into()),
            ]
        );
        let open: Vec<bool> = planned.iter().map(|o| o.open).collect();
        assert_eq!(open, [true, true, false, true]);
        for outgoing in &planned {
            serde_json::from_slice::<Vec<serde_json::Value>>(&outgoing.payload)
                .expect("a JSON array");
        }
    }

    #[test]
    fn text_and_binary_go_alone_and_unwrapped() {
        let planned = batcher(10, 131072).plan(vec![
            stored(1, "a", "1"),
            stored_as(2, "a", "not json", PayloadKind::Text),
            stored(3, "a", "3"),
            // Bytes that parse as JSON, but were sent as a string and as base64.
            stored_as(4, "a", "42", PayloadKind::Text),
            stored_as(5, "a", "[1,2]", PayloadKind::Binary),
            stored(6, "a", "6"),
        ]);
        assert_eq!(
            shapes(&planned),
            [
                (vec![1], "[1]".into()),
                (vec![2], "not json".into()),
                (vec![3], "[3]".into()),
                (vec![4], "42".into()),
                (vec![5], "[1,2]".into()),
                (vec![6], "[6]".into()),
            ]
        );
    }

    #[test]
    fn max_bytes_bounds_the_array_including_brackets_and_commas() {
        // "[1111,2222]" is 11 bytes: fits in 11, not in 10.
        let messages = || vec![stored(1, "a", "1111"), stored(2, "a", "2222")];
        assert_eq!(batcher(10, 11).plan(messages()).len(), 1);
        assert_eq!(batcher(10, 10).plan(messages()).len(), 2);
    }

    #[test]
    fn a_payload_too_big_to_wrap_goes_alone_unwrapped() {
        let big = format!("\"{}\"", "x".repeat(MAX_PAYLOAD_BYTES - 2));
        let planned = batcher(10, 131072).plan(vec![stored(1, "a", &big)]);
        assert_eq!(planned[0].payload.len(), MAX_PAYLOAD_BYTES);
        assert_eq!(planned[0].payload[0], b'"');
    }
}
