//! Cloud to device: a cloud-side publisher (mosquitto_pub on the plain listener, as an IoT
//! Core rule or the console would publish) and local apps that subscribe on the socket.

use super::*;

/// How long a subscribed app waits for a message it expects.
pub const MESSAGE_WAIT: Duration = Duration::from_secs(20);

impl Cloud {
    /// Publishes each payload (one per line, in order, on one connection, QoS 1) to the full
    /// `topic`; returns once the broker has acknowledged them all.
    pub fn cloud_publish(&self, topic: &str, payloads: &[String]) {
        let mut child = self
            .namespace
            .command("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &MQTT_PORT.to_string()])
            .args(["-q", "1", "-i", "relay-test-cloud", "-t", topic, "-l"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mosquitto_pub");
        let mut stdin = child.stdin.take().expect("stdin");
        for payload in payloads {
            assert!(!payload.contains('\n'), "one line per payload");
            writeln!(stdin, "{payload}").expect("write payload");
        }
        drop(stdin);
        let output = child.wait_with_output().expect("mosquitto_pub");
        assert!(
            output.status.success(),
            "mosquitto_pub: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Publishes one payload of arbitrary bytes (QoS 1) to the full `topic`.
    pub fn cloud_publish_bytes(&self, topic: &str, payload: &[u8]) {
        let file = self.dir.path().join("cloud-payload.bin");
        std::fs::write(&file, payload).expect("payload file");
        run_ok(
            self.namespace
                .command("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &MQTT_PORT.to_string()])
                .args(["-q", "1", "-i", "relay-test-cloud", "-t", topic, "-f"])
                .arg(&file),
        );
    }

    /// Waits until the broker has acknowledged a SUBSCRIBE from `client_id` after `from` (a
    /// length of `broker_log()` taken before).
    pub fn wait_for_suback(&self, client_id: &str, from: usize) {
        let needle = format!("Sending SUBACK to {client_id}");
        wait_for("the daemon's SUBSCRIBE", START_TIMEOUT, || {
            self.broker_log()
                .get(from..)
                .is_some_and(|log| log.contains(&needle))
        });
    }
}

impl LocalApp {
    /// Sends `{"op":"subscribe","topics":filters,"id":"sub"}` and returns the answer.
    pub fn subscribe(&mut self, filters: &[&str]) -> Value {
        let request = serde_json::json!({"op": "subscribe", "topics": filters, "id": "sub"});
        self.send_line(&request.to_string());
        self.read_answer(MESSAGE_WAIT).expect("subscribe answer")
    }

    /// The next `{"op":"message",...}` line; other lines (answers) are skipped.
    pub fn next_message(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let line = self.read_answer(left)?;
            if line["op"] == "message" {
                return Some(line);
            }
        }
    }

    /// Receives `count` messages, acking each; returns them in arrival order.
    pub fn receive_and_ack(&mut self, count: usize) -> Vec<Value> {
        (0..count)
            .map(|received| {
                let message = self
                    .next_message(MESSAGE_WAIT)
                    .unwrap_or_else(|| panic!("message {} of {count} never came", received + 1));
                self.send_line(&format!(r#"{{"op":"ack","seq":{}}}"#, message["seq"]));
                message
            })
            .collect()
    }
}
