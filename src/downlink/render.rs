//! How a received message is written to a local app: one JSON line.
//!
//! The payload goes inline when it is JSON (an object, array, number, boolean or null), as a
//! string when it is other UTF-8 text, and as `payload_base64` otherwise. A payload that is a
//! JSON string (`"on"`, quotes included) is text like any other and arrives with its quotes,
//! so text and JSON never look alike to the app.

use base64::Engine;
use serde_json::Value;

/// The `{"op":"message",...}` line, newline included.
pub fn message_line(seq: i64, topic: &str, payload: &[u8]) -> String {
    let mut line = serde_json::Map::new();
    line.insert("op".into(), "message".into());
    line.insert("seq".into(), seq.into());
    line.insert("topic".into(), topic.into());
    let (key, value) = render_payload(payload);
    line.insert(key.into(), value);
    format!("{}\n", Value::Object(line))
}

/// `("payload", value)` or `("payload_base64", text)`.
pub fn render_payload(payload: &[u8]) -> (&'static str, Value) {
    match serde_json::from_slice::<Value>(payload) {
        Ok(Value::String(_)) | Err(_) => match std::str::from_utf8(payload) {
            Ok(text) => ("payload", Value::String(text.to_owned())),
            Err(_) => (
                "payload_base64",
                Value::String(base64::engine::general_purpose::STANDARD.encode(payload)),
            ),
        },
        Ok(json) => ("payload", json),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(payload: &[u8]) -> Value {
        serde_json::from_str(&message_line(7, "commands/reboot", payload)).expect("json")
    }

    #[test]
    fn json_inline_text_as_string_binary_as_base64() {
        let line = rendered(br#"{"delay_s": 5}"#);
        assert_eq!(line["op"], "message");
        assert_eq!(line["seq"], 7);
        assert_eq!(line["topic"], "commands/reboot");
        assert_eq!(line["payload"], serde_json::json!({"delay_s": 5}));
        assert_eq!(rendered(b"42")["payload"], 42);
        assert_eq!(rendered(b"reboot now")["payload"], "reboot now");
        assert_eq!(rendered(br#""on""#)["payload"], "\"on\"");
        let binary = rendered(&[0xff, 0x00, 0x01]);
        assert_eq!(binary["payload_base64"], "/wAB");
        assert!(binary.get("payload").is_none());
        assert_eq!(rendered(b"")["payload"], "");
    }

    #[test]
    fn a_multi_line_payload_stays_one_line() {
        let line = message_line(1, "t", b"{\n  \"a\": 1\n}\n");
        assert_eq!(line.matches('\n').count(), 1);
        let text = message_line(1, "t", b"line one\nline two");
        assert_eq!(text.matches('\n').count(), 1);
    }
}
