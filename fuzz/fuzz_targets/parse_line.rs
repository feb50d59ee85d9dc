//! Fuzzes the socket line parser and validator: no input may panic, and whatever it accepts
//! must respect IoT Core's limits once the topic prefix is added.
#![no_main]

use iot_cognito_relay::ingest::protocol::{Request, parse_line};
use iot_cognito_relay::message::MAX_PAYLOAD_BYTES;
use iot_cognito_relay::topic::{MAX_TOPIC_BYTES, MAX_TOPIC_SLASHES, TopicRules};
use libfuzzer_sys::fuzz_target;

const POOL: &str = "us-east-1:0b7c5a57-6a4f-4a62-9d36-3f1c0e3b6a11";
const IDENTITY: &str = "us-east-1:9f0e3a2b-1c4d-4e5f-8a9b-0c1d2e3f4a5b";

fuzz_target!(|line: &[u8]| {
    let rules = TopicRules::new("{identity_pool_id}/{identity_id}", POOL, "us-east-1");
    match parse_line(line, &rules) {
        Ok(Request::Publish { message, .. }) => {
            assert!(message.payload.len() <= MAX_PAYLOAD_BYTES);
            let full = rules.full_topic(IDENTITY, &message.topic);
            assert!(full.len() <= MAX_TOPIC_BYTES);
            assert!(full.matches('/').count() <= MAX_TOPIC_SLASHES);
            assert!(!full.contains(['+', '#', '\0']));
        }
        Ok(Request::Subscribe { topics, .. }) => {
            for filter in topics {
                let full = rules.full_topic(IDENTITY, &filter);
                assert!(full.len() <= MAX_TOPIC_BYTES);
                assert!(full.matches('/').count() <= MAX_TOPIC_SLASHES);
                assert!(!full.contains('\0'));
            }
        }
        Ok(Request::Status { .. } | Request::DeadLetters { .. } | Request::Ack { .. }) => {}
        Err(rejection) => {
            // Every refusal renders as one JSON line.
            let answer = rejection.to_line();
            assert!(answer.ends_with('\n') && answer.matches('\n').count() == 1);
            assert!(serde_json::from_str::<serde_json::Value>(&answer).is_ok());
        }
    }
});
