//! The socket protocol: one JSON object per line in, one JSON answer per line out.
//!
//! Parsing is pure (no I/O) so the fuzzer and the unit tests drive it directly.

use base64::Engine;
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::message::{MAX_PAYLOAD_BYTES, Message, Options, PayloadKind, Priority, Qos};
use crate::spool::DeadLetterAction;
use crate::topic::TopicRules;

/// Longest line the daemon reads; longer lines are answered `line_too_long` and skipped.
pub const MAX_LINE_BYTES: usize = 256 * 1024;
/// Longest `id` (a string's UTF-8 bytes, a number's text): every answer echoes it, so an
/// unbounded one lets a client that never reads pin memory in its answer queue.
pub const MAX_ID_BYTES: usize = 128;

/// What a line asks for.
#[derive(Debug, PartialEq)]
pub enum Request {
    /// A message to publish; `id`, when given, is echoed in the answer.
    Publish {
        /// The app's request id (a string or a number), echoed in the answer.
        id: Option<Value>,
        /// The validated message.
        message: Message,
    },
    /// `{"op":"status"}`: the daemon's state and counters.
    Status {
        /// Echoed in the answer.
        id: Option<Value>,
    },
    /// `{"op":"dead_letters","action":"list|requeue|purge"}` (`list` when left out).
    DeadLetters {
        /// Echoed in the answer.
        id: Option<Value>,
        /// What to do with the dead letters.
        action: DeadLetterAction,
    },
    /// `{"op":"subscribe","topics":["commands/#"]}`: inbox messages matching these filters
    /// (relative, validated) come to this connection.
    Subscribe {
        /// Echoed in the answer.
        id: Option<Value>,
        /// Topic filters relative to the device prefix, each valid.
        topics: Vec<String>,
    },
    /// `{"op":"ack","seq":N}`: the app is done with message N.
    Ack {
        /// Echoed in the answer.
        id: Option<Value>,
        /// The `seq` of a message line this connection received.
        seq: i64,
    },
}

/// The error codes of docs/protocol.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The line is not one JSON object.
    InvalidJson,
    /// `topic` or the payload is missing.
    MissingField,
    /// The topic breaks IoT Core's rules once prefixed.
    InvalidTopic,
    /// The payload is over 128 KiB.
    PayloadTooLarge,
    /// The line is over `MAX_LINE_BYTES`.
    LineTooLong,
    /// `qos` is not 0 or 1.
    InvalidQos,
    /// `id` is not a string or a number, or is too long.
    InvalidId,
    /// `ttl`, `priority` or `conflate` has a value it cannot take.
    InvalidOption,
    /// The spool is at `max_bytes` under `reject-new`.
    SpoolFull,
    /// The disk failed (read-only, I/O error), as opposed to being full.
    StorageError,
    /// The daemon is draining and takes no new messages.
    ShuttingDown,
    /// A peer refused by `socket.allowed_uids` / `allowed_gids`.
    PermissionDenied,
    /// An `ack` for a seq this connection does not hold unacked (acked already, or never
    /// delivered to it).
    UnknownSeq,
    /// The peer's uid holds `socket.max_clients_per_uid` connections.
    TooManyConnections,
}

impl ErrorCode {
    /// The code as it appears in answers (`"invalid_topic"`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::InvalidTopic => "invalid_topic",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::LineTooLong => "line_too_long",
            ErrorCode::InvalidQos => "invalid_qos",
            ErrorCode::InvalidId => "invalid_id",
            ErrorCode::InvalidOption => "invalid_option",
            ErrorCode::SpoolFull => "spool_full",
            ErrorCode::StorageError => "storage_error",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::UnknownSeq => "unknown_seq",
        }
    }
}

/// A refused line: the code, a human message, and the request id when one could be read.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// The request id, when the line had a readable one.
    pub id: Option<Value>,
    /// What is wrong, as a code.
    pub code: ErrorCode,
    /// What is wrong, for people.
    pub message: String,
}

impl Rejection {
    /// A refusal of the request `id` (if known).
    pub fn new(id: Option<Value>, code: ErrorCode, message: impl Into<String>) -> Rejection {
        Rejection {
            id,
            code,
            message: message.into(),
        }
    }

    /// The answer line, newline included.
    pub fn to_line(&self) -> String {
        let mut answer = serde_json::Map::new();
        if let Some(id) = &self.id {
            answer.insert("id".into(), id.clone());
        }
        answer.insert("ok".into(), Value::Bool(false));
        answer.insert("error".into(), self.code.as_str().into());
        answer.insert("message".into(), self.message.clone().into());
        format!("{}\n", Value::Object(answer))
    }
}

/// `{"id":…,"ok":true}`, newline included.
pub fn ok_line(id: &Value) -> String {
    format!("{}\n", serde_json::json!({"id": id, "ok": true}))
}

/// The fields a line may carry, kept raw so each gets its own precise error code.
#[derive(Deserialize)]
struct RawLine<'a> {
    #[serde(borrow, default)]
    op: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    topic: Option<&'a RawValue>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default)]
    payload_base64: Option<&'a RawValue>,
    #[serde(borrow, default)]
    qos: Option<&'a RawValue>,
    #[serde(borrow, default)]
    ttl: Option<&'a RawValue>,
    #[serde(borrow, default)]
    priority: Option<&'a RawValue>,
    #[serde(borrow, default)]
    conflate: Option<&'a RawValue>,
    #[serde(borrow, default)]
    action: Option<&'a RawValue>,
    #[serde(borrow, default)]
    topics: Option<&'a RawValue>,
    #[serde(borrow, default)]
    seq: Option<&'a RawValue>,
}

/// Parses and validates one line (without its newline).
pub fn parse_line(line: &[u8], rules: &TopicRules) -> Result<Request, Rejection> {
    let invalid_json = |message: String| Rejection::new(None, ErrorCode::InvalidJson, message);
    let first = line.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(invalid_json("expected one JSON object per line".into()));
    }
    let raw: RawLine<'_> =
        serde_json::from_slice(line).map_err(|e| invalid_json(format!("not valid JSON: {e}")))?;
    let id = parse_id(raw.id)?;
    match parse_op(&raw, id.clone(), rules)? {
        Some(request) => Ok(request),
        None => parse_publish(&raw, id, rules),
    }
}

/// The request `id`: a string or number of at most `MAX_ID_BYTES`, or none.
fn parse_id(raw_id: Option<&RawValue>) -> Result<Option<Value>, Rejection> {
    let Some(raw_id) = raw_id else {
        return Ok(None);
    };
    // A too long id is answered without it: echoing it is what must not happen.
    let too_long = |len: usize| {
        Rejection::new(
            None,
            ErrorCode::InvalidId,
            format!("id is {len} bytes; at most {MAX_ID_BYTES}"),
        )
    };
    match serde_json::from_str::<Value>(raw_id.get()) {
        Ok(Value::String(text)) if text.len() > MAX_ID_BYTES => Err(too_long(text.len())),
        Ok(Value::Number(_)) if raw_id.get().len() > MAX_ID_BYTES => {
            Err(too_long(raw_id.get().len()))
        }
        Ok(id @ (Value::String(_) | Value::Number(_))) => Ok(Some(id)),
        Ok(Value::Null) => Ok(None),
        _ => Err(Rejection::new(
            None,
            ErrorCode::InvalidJson,
            "id must be a string or a number",
        )),
    }
}

/// Every request but a publish; `None` for a publish (no `op`, or `"publish"`).
fn parse_op(
    raw: &RawLine<'_>,
    id: Option<Value>,
    rules: &TopicRules,
) -> Result<Option<Request>, Rejection> {
    let reject = |code, message: &str| Rejection::new(id.clone(), code, message);
    let request = match raw.op.map(|op| serde_json::from_str::<String>(op.get())) {
        None => return Ok(None),
        Some(Ok(op)) if op == "publish" => return Ok(None),
        Some(Ok(op)) if op == "status" => Request::Status { id },
        Some(Ok(op)) if op == "dead_letters" => {
            let action = match raw.action.map(|a| serde_json::from_str::<String>(a.get())) {
                None => DeadLetterAction::List,
                Some(Ok(action)) if action == "list" => DeadLetterAction::List,
                Some(Ok(action)) if action == "requeue" => DeadLetterAction::Requeue,
                Some(Ok(action)) if action == "purge" => DeadLetterAction::Purge,
                Some(_) => {
                    return Err(reject(
                        ErrorCode::InvalidJson,
                        "action must be \"list\", \"requeue\" or \"purge\"",
                    ));
                }
            };
            Request::DeadLetters { id, action }
        }
        Some(Ok(op)) if op == "subscribe" => {
            let topics = parse_filters(raw.topics, rules)
                .map_err(|(code, message)| reject(code, &message))?;
            Request::Subscribe { id, topics }
        }
        Some(Ok(op)) if op == "ack" => {
            let seq = match raw.seq {
                None => return Err(reject(ErrorCode::MissingField, "seq is required")),
                Some(seq) => serde_json::from_str::<i64>(seq.get())
                    .map_err(|_| reject(ErrorCode::InvalidJson, "seq must be an integer"))?,
            };
            Request::Ack { id, seq }
        }
        Some(_) => {
            return Err(reject(
                ErrorCode::InvalidJson,
                "op must be \"publish\", \"status\", \"dead_letters\", \"subscribe\" or \"ack\"",
            ));
        }
    };
    Ok(Some(request))
}

/// A publish: topic, payload and qos, each checked.
fn parse_publish(
    raw: &RawLine<'_>,
    id: Option<Value>,
    rules: &TopicRules,
) -> Result<Request, Rejection> {
    let reject = |code, message: &str| Rejection::new(id.clone(), code, message);
    let topic = match raw.topic {
        None => return Err(reject(ErrorCode::MissingField, "topic is required")),
        Some(topic) => serde_json::from_str::<String>(topic.get())
            .map_err(|_| reject(ErrorCode::InvalidTopic, "topic must be a string"))?,
    };
    rules
        .validate(&topic)
        .map_err(|e| reject(ErrorCode::InvalidTopic, &e.to_string()))?;
    let (payload, kind) = parse_payload(raw).map_err(|(code, message)| reject(code, &message))?;
    let qos = match raw.qos {
        None => Qos::AtLeastOnce,
        Some(qos) => serde_json::from_str::<u8>(qos.get())
            .ok()
            .and_then(Qos::from_u8)
            .ok_or_else(|| reject(ErrorCode::InvalidQos, "qos must be 0 or 1"))?,
    };
    let options =
        parse_options(raw).map_err(|message| reject(ErrorCode::InvalidOption, message))?;
    Ok(Request::Publish {
        id,
        message: Message {
            topic,
            payload,
            qos,
            kind,
            options,
        },
    })
}

/// `ttl`, `priority` and `conflate`; each may be absent or null (the default). `Err` names
/// what is wrong.
fn parse_options(raw: &RawLine<'_>) -> Result<Options, &'static str> {
    fn given(value: Option<&RawValue>) -> Option<&RawValue> {
        value.filter(|v| v.get() != "null")
    }
    let ttl = match given(raw.ttl) {
        None => None,
        Some(ttl) => Some(
            serde_json::from_str::<u32>(ttl.get())
                .ok()
                .filter(|&seconds| seconds > 0)
                .ok_or("ttl must be a whole number of seconds from 1 to 4294967295")?,
        ),
    };
    let priority = match given(raw.priority).map(|p| serde_json::from_str::<&str>(p.get())) {
        None => Priority::Normal,
        Some(Ok("normal")) => Priority::Normal,
        Some(Ok("high")) => Priority::High,
        Some(_) => return Err("priority must be \"high\" or \"normal\""),
    };
    let conflate = match given(raw.conflate) {
        None => false,
        Some(conflate) => serde_json::from_str::<bool>(conflate.get())
            .map_err(|_| "conflate must be true or false")?,
    };
    Ok(Options {
        ttl,
        priority,
        conflate,
    })
}

/// `payload` or `payload_base64`, decoded and within IoT Core's payload limit.
fn parse_payload(raw: &RawLine<'_>) -> Result<(Vec<u8>, PayloadKind), (ErrorCode, String)> {
    let (payload, kind) = match (raw.payload, raw.payload_base64) {
        (Some(_), Some(_)) => {
            return Err((
                ErrorCode::InvalidJson,
                "give either payload or payload_base64, not both".into(),
            ));
        }
        (None, None) => {
            return Err((
                ErrorCode::MissingField,
                "payload (or payload_base64) is required".into(),
            ));
        }
        (Some(payload), None) => match serde_json::from_str::<String>(payload.get()) {
            Ok(text) => (text.into_bytes(), PayloadKind::Text),
            Err(_) => (compact_json(payload.get()), PayloadKind::Json),
        },
        (None, Some(encoded)) => {
            let text = serde_json::from_str::<String>(encoded.get()).map_err(|_| {
                (
                    ErrorCode::InvalidJson,
                    "payload_base64 must be a string".to_owned(),
                )
            })?;
            if text.len() / 4 * 3 > MAX_PAYLOAD_BYTES + 3 {
                return Err((ErrorCode::PayloadTooLarge, too_large(text.len() / 4 * 3)));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text.as_bytes())
                .map_err(|e| (ErrorCode::InvalidJson, format!("payload_base64: {e}")))?;
            (bytes, PayloadKind::Binary)
        }
    };
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err((ErrorCode::PayloadTooLarge, too_large(payload.len())));
    }
    Ok((payload, kind))
}

/// Most filters one `subscribe` may name (IoT Core takes 8 per SUBSCRIBE; apps need few).
pub const MAX_SUBSCRIBE_FILTERS: usize = 16;

/// A subscribe's `topics`: a non-empty array of valid relative filters.
fn parse_filters(
    raw: Option<&RawValue>,
    rules: &TopicRules,
) -> Result<Vec<String>, (ErrorCode, String)> {
    let Some(raw) = raw else {
        return Err((ErrorCode::MissingField, "topics is required".into()));
    };
    let topics = serde_json::from_str::<Vec<String>>(raw.get()).map_err(|_| {
        (
            ErrorCode::InvalidTopic,
            "topics must be an array of topic filters (strings)".to_owned(),
        )
    })?;
    if topics.is_empty() || topics.len() > MAX_SUBSCRIBE_FILTERS {
        return Err((
            ErrorCode::InvalidTopic,
            format!("topics must name 1 to {MAX_SUBSCRIBE_FILTERS} topic filters"),
        ));
    }
    for topic in &topics {
        crate::topic_filter::validate(rules, topic)
            .map_err(|e| (ErrorCode::InvalidTopic, format!("{topic:?}: {e}")))?;
    }
    Ok(topics)
}

fn too_large(len: usize) -> String {
    format!("payload is {len} bytes; IoT Core allows {MAX_PAYLOAD_BYTES}")
}

/// Removes insignificant whitespace from valid JSON text, keeping everything else byte for byte
/// (key order, number spelling), which a round trip through `Value` would not.
fn compact_json(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    for &byte in text.as_bytes() {
        if in_string {
            out.push(byte);
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
        } else if byte == b'"' {
            in_string = true;
            out.push(byte);
        } else if !byte.is_ascii_whitespace() {
            out.push(byte);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> TopicRules {
        TopicRules::new(
            "{identity_pool_id}/{identity_id}",
            "us-east-1:0b7c5a57-6a4f-4a62-9d36-3f1c0e3b6a11",
            "us-east-1",
        )
    }

    fn parse(line: &str) -> Result<Request, Rejection> {
        parse_line(line.as_bytes(), &rules())
    }

    fn code(line: &str) -> ErrorCode {
        parse(line).expect_err("must be rejected").code
    }

    fn options(line: &str) -> Options {
        match parse(line) {
            Ok(Request::Publish { message, .. }) => message.options,
            other => panic!("{line}: {other:?}"),
        }
    }

    #[test]
    fn message_options_are_read_and_a_bad_one_is_invalid_option() {
        assert_eq!(options(r#"{"topic":"t","payload":1}"#), Options::default());
        assert_eq!(
            options(r#"{"topic":"t","payload":1,"ttl":60,"priority":"high","conflate":true}"#),
            Options {
                ttl: Some(60),
                priority: Priority::High,
                conflate: true,
            }
        );
        assert_eq!(
            options(r#"{"topic":"t","payload":1,"ttl":null,"priority":"normal","conflate":false}"#),
            Options::default()
        );
        for bad in [
            r#"{"topic":"t","payload":1,"ttl":0}"#,
            r#"{"topic":"t","payload":1,"ttl":-5}"#,
            r#"{"topic":"t","payload":1,"ttl":1.5}"#,
            r#"{"topic":"t","payload":1,"ttl":"60"}"#,
            r#"{"topic":"t","payload":1,"ttl":4294967296}"#,
            r#"{"topic":"t","payload":1,"priority":"urgent"}"#,
            r#"{"topic":"t","payload":1,"priority":1}"#,
            r#"{"topic":"t","payload":1,"conflate":"yes"}"#,
        ] {
            assert_eq!(code(bad), ErrorCode::InvalidOption, "{bad}");
        }
    }

    #[test]
    fn spec_example_is_a_qos1_publish() {
        let request =
            parse(r#"{"topic": "sensors/temp", "payload": {"c": 21.5}, "id": "r1", "qos": 1}"#);
        assert_eq!(
            request,
            Ok(Request::Publish {
                id: Some("r1".into()),
                message: Message {
                    topic: "sensors/temp".into(),
                    payload: br#"{"c":21.5}"#.to_vec(),
                    qos: Qos::AtLeastOnce,
                    kind: PayloadKind::Json,
                    options: Default::default(),
                },
            })
        );
    }

    #[test]
    fn string_payload_is_published_raw_and_json_compacted_faithfully() {
        let Ok(Request::Publish { message, .. }) = parse(r#"{"topic":"t","payload":"21.5 C"}"#)
        else {
            panic!("expected publish")
        };
        assert_eq!(message.payload, b"21.5 C");
        let Ok(Request::Publish { message, .. }) =
            parse(r#"{"topic":"t","payload":{ "z" : 1.10, "a": "x y\" z" }}"#)
        else {
            panic!("expected publish")
        };
        assert_eq!(message.payload, br#"{"z":1.10,"a":"x y\" z"}"#);
    }

    #[test]
    fn base64_payload_carries_binary() {
        let Ok(Request::Publish { message, .. }) =
            parse(r#"{"topic":"t","payload_base64":"AAEC/w==","qos":0}"#)
        else {
            panic!("expected publish")
        };
        assert_eq!(message.payload, vec![0, 1, 2, 255]);
        assert_eq!(message.qos, Qos::AtMostOnce);
    }

    #[test]
    fn each_error_code_has_its_cause() {
        assert_eq!(code("not json"), ErrorCode::InvalidJson);
        assert_eq!(code("[1,2]"), ErrorCode::InvalidJson);
        assert_eq!(code(r#"{"topic":"t""#), ErrorCode::InvalidJson);
        assert_eq!(code(r#"{"payload":1}"#), ErrorCode::MissingField);
        assert_eq!(code(r#"{"topic":"t"}"#), ErrorCode::MissingField);
        assert_eq!(
            code(r#"{"topic":"a/#","payload":1}"#),
            ErrorCode::InvalidTopic
        );
        assert_eq!(code(r#"{"topic":7,"payload":1}"#), ErrorCode::InvalidTopic);
        assert_eq!(
            code(r#"{"topic":"t","payload":1,"qos":2}"#),
            ErrorCode::InvalidQos
        );
        assert_eq!(
            code(r#"{"topic":"t","payload":1,"qos":"1"}"#),
            ErrorCode::InvalidQos
        );
        assert_eq!(
            code(r#"{"topic":"t","payload_base64":"!!"}"#),
            ErrorCode::InvalidJson
        );
        let big = format!(
            r#"{{"topic":"t","payload":"{}"}}"#,
            "x".repeat(MAX_PAYLOAD_BYTES + 1)
        );
        assert_eq!(code(&big), ErrorCode::PayloadTooLarge);
        let exact = format!(
            r#"{{"topic":"t","payload":"{}"}}"#,
            "x".repeat(MAX_PAYLOAD_BYTES)
        );
        assert!(parse(&exact).is_ok());
    }

    #[test]
    fn subscribe_and_ack_are_parsed_and_checked() {
        assert_eq!(
            parse(r#"{"op":"subscribe","topics":["commands/#","config/+"],"id":"s1"}"#),
            Ok(Request::Subscribe {
                id: Some("s1".into()),
                topics: vec!["commands/#".into(), "config/+".into()],
            })
        );
        assert_eq!(
            parse(r#"{"op":"ack","seq":42}"#),
            Ok(Request::Ack { id: None, seq: 42 })
        );
        assert_eq!(code(r#"{"op":"subscribe"}"#), ErrorCode::MissingField);
        assert_eq!(
            code(r#"{"op":"subscribe","topics":[]}"#),
            ErrorCode::InvalidTopic
        );
        assert_eq!(
            code(r#"{"op":"subscribe","topics":"a"}"#),
            ErrorCode::InvalidTopic
        );
        assert_eq!(
            code(r#"{"op":"subscribe","topics":[1]}"#),
            ErrorCode::InvalidTopic
        );
        assert_eq!(
            code(r#"{"op":"subscribe","topics":["a/#/b"]}"#),
            ErrorCode::InvalidTopic
        );
        assert_eq!(
            code(r#"{"op":"subscribe","topics":["$aws/x"]}"#),
            ErrorCode::InvalidTopic
        );
        assert_eq!(code(r#"{"op":"ack"}"#), ErrorCode::MissingField);
        assert_eq!(code(r#"{"op":"ack","seq":"7"}"#), ErrorCode::InvalidJson);
        assert_eq!(code(r#"{"op":"ack","seq":1.5}"#), ErrorCode::InvalidJson);
        let rejection = parse(r#"{"op":"subscribe","topics":["+x"],"id":3}"#).expect_err("bad");
        assert_eq!(rejection.id, Some(3.into()));
    }

    #[test]
    fn rejection_keeps_the_id() {
        let rejection = parse(r#"{"id":7,"topic":"$x","payload":1}"#).expect_err("rejected");
        assert_eq!(rejection.id, Some(7.into()));
        let answer: Value = serde_json::from_str(&rejection.to_line()).expect("json");
        assert_eq!(answer["id"], 7);
        assert_eq!(answer["ok"], false);
        assert_eq!(answer["error"], "invalid_topic");
    }

    #[test]
    fn an_id_over_128_bytes_is_invalid_id_and_not_echoed() {
        let at_limit = format!(r#"{{"id":"{}","topic":"t","payload":1}}"#, "i".repeat(128));
        assert!(parse(&at_limit).is_ok());
        let over = format!(r#"{{"id":"{}","topic":"t","payload":1}}"#, "i".repeat(129));
        let rejection = parse(&over).expect_err("rejected");
        assert_eq!(rejection.code, ErrorCode::InvalidId);
        assert_eq!(rejection.id, None);
        let long_number = format!(r#"{{"id":1{},"op":"status"}}"#, "0".repeat(128));
        assert_eq!(code(&long_number), ErrorCode::InvalidId);
    }

    #[test]
    fn status_op_is_recognised() {
        assert_eq!(
            parse(r#"{"op":"status"}"#),
            Ok(Request::Status { id: None })
        );
        assert_eq!(code(r#"{"op":"reboot"}"#), ErrorCode::InvalidJson);
    }

    #[test]
    fn dead_letters_op_takes_an_action() {
        assert_eq!(
            parse(r#"{"op":"dead_letters"}"#),
            Ok(Request::DeadLetters {
                id: None,
                action: DeadLetterAction::List
            })
        );
        assert_eq!(
            parse(r#"{"op":"dead_letters","action":"purge","id":3}"#),
            Ok(Request::DeadLetters {
                id: Some(3.into()),
                action: DeadLetterAction::Purge
            })
        );
        assert_eq!(
            code(r#"{"op":"dead_letters","action":"drop"}"#),
            ErrorCode::InvalidJson
        );
    }

    #[test]
    fn invalid_utf8_is_invalid_json() {
        let line = b"{\"topic\":\"t\",\"payload\":\"\xff\xfe\"}";
        assert_eq!(
            parse_line(line, &rules()).expect_err("rejected").code,
            ErrorCode::InvalidJson
        );
    }
}
