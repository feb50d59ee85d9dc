//! mosquitto as IoT Core's broker, and a subscriber that plays the cloud side.

use super::*;

impl Cloud {
    /// Starts (or restarts) mosquitto and waits until both listeners are up. It logs every
    /// packet (tests read the log).
    pub fn start_broker(&mut self) {
        self.start_broker_logging("all");
    }

    /// Like [`Cloud::start_broker`], logging only these `log_type`s (benchmarks keep it quiet).
    pub fn start_broker_logging(&mut self, log_types: &str) {
        self.start_broker_with(log_types, true);
    }

    /// (Re)starts mosquitto refusing every client without a user name with CONNACK 5 "not
    /// authorized": what IoT Core answers an identity without the policy, as near as mosquitto
    /// plays it.
    pub fn start_broker_refusing(&mut self) {
        self.start_broker_with("all", false);
    }

    pub(super) fn start_broker_with(&mut self, log_types: &str, anonymous: bool) {
        self.kill_broker();
        let log_types: String = log_types
            .split_whitespace()
            .map(|kind| format!("log_type {kind}\n"))
            .collect();
        let dir = self.dir.path();
        let log = dir.join("mosquitto.log");
        let config = format!(
            "per_listener_settings false\nallow_anonymous {anonymous}\nuser root\n\
             persistence true\npersistence_location {dir}/\nautosave_interval 1\nmax_queued_messages 0\n\
             log_dest file {log}\n{log_types}connection_messages true\n\
             listener {MQTT_PORT} 127.0.0.1\nprotocol mqtt\n\
             listener {WSS_PORT} 127.0.0.1\nprotocol websockets\nwebsockets_headers_size 8192\n\
             cafile {dir}/ca.crt\ncertfile {dir}/server.crt\nkeyfile {dir}/server.key\n",
            log = log.display(),
            dir = dir.display(),
        );
        std::fs::write(dir.join("mosquitto.conf"), config).expect("broker config");
        let before = std::fs::read_to_string(&log).map(|t| t.len()).unwrap_or(0);
        let broker = Process {
            name: "mosquitto",
            child: Some(
                self.namespace
                    .command("mosquitto")
                    .arg("-c")
                    .arg(dir.join("mosquitto.conf"))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start mosquitto"),
            ),
        };
        self.broker = Some(broker);
        wait_for("mosquitto to start", START_TIMEOUT, || {
            std::fs::read_to_string(&log)
                .map(|t| t.get(before..).unwrap_or("").contains(" running"))
                .unwrap_or(false)
        });
    }

    /// SIGKILLs the broker (an outage).
    pub fn kill_broker(&mut self) {
        if let Some(mut broker) = self.broker.take() {
            broker.kill();
        }
    }

    pub fn broker_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// A subscriber to every topic on the plain listener, ready when this returns.
    pub fn subscribe(&self) -> Subscriber {
        let mut child = self
            .namespace
            .command("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &MQTT_PORT.to_string()])
            // A persistent session (-c): across broker restarts the broker keeps its
            // subscription and queues for it, so nothing is missed while it reconnects.
            .args(["-t", "#", "-q", "1", "-F", "%j", "-c"])
            .args(["-i", "relay-test-subscriber"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto_sub");
        let stdout = child.stdout.take().expect("stdout");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(message) = serde_json::from_str::<Value>(&line)
                    && sender.send(message).is_err()
                {
                    break;
                }
            }
        });
        let mut subscriber = Subscriber {
            _process: Process {
                name: "mosquitto_sub",
                child: Some(child),
            },
            lines,
        };
        // Ready once a probe published after it started comes back.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            run_ok(self.namespace.command("mosquitto_pub").args([
                "-h",
                "127.0.0.1",
                "-p",
                &MQTT_PORT.to_string(),
                "-t",
                "relay-test/probe",
                "-m",
                "probe",
            ]));
            if subscriber
                .next_message(Duration::from_millis(500))
                .is_some_and(|m| m.topic == "relay-test/probe")
            {
                // The subscription must be on disk before a test kills the broker, or the
                // restarted broker forgets it; mosquitto autosaves every second.
                let subscribed = std::time::SystemTime::now();
                let db = self.dir.path().join("mosquitto.db");
                wait_for("the subscription to be saved", START_TIMEOUT, || {
                    std::fs::metadata(&db)
                        .and_then(|m| m.modified())
                        .is_ok_and(|saved| saved > subscribed)
                });
                return subscriber;
            }
            assert!(Instant::now() < deadline, "subscriber never became ready");
        }
    }
}

/// Messages as the broker delivered them.
pub struct Subscriber {
    pub(super) _process: Process,
    pub(super) lines: mpsc::Receiver<Value>,
}

/// One message the subscriber received.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: String,
}

impl Subscriber {
    pub fn next_message(&mut self, timeout: Duration) -> Option<Received> {
        let value = self.lines.recv_timeout(timeout).ok()?;
        Some(Received {
            topic: value["topic"].as_str().unwrap_or_default().to_owned(),
            payload: match &value["payload"] {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            },
        })
    }

    /// Waits until every `{"n": id}` in `acked` arrived (failing the test with the missing
    /// ids otherwise); returns the arrival order and the number of duplicates.
    pub fn expect_all(&mut self, acked: &[u64], timeout: Duration) -> (Vec<u64>, usize) {
        let wanted: std::collections::BTreeSet<u64> = acked.iter().copied().collect();
        let mut seen = std::collections::BTreeSet::new();
        let received = self.collect_until(timeout, |received| {
            if let Some(last) = received.last() {
                seen.extend(numbers(std::slice::from_ref(last)));
            }
            wanted.is_subset(&seen)
        });
        let arrivals = numbers(&received);
        let missing: Vec<&u64> = wanted.difference(&seen).collect();
        assert!(
            missing.is_empty(),
            "{} acked messages lost: {missing:?}",
            missing.len()
        );
        let duplicates = arrivals.len() - seen.len();
        (arrivals, duplicates)
    }

    /// Collects messages until `done` says so or `timeout` passes.
    pub fn collect_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        let mut received = Vec::new();
        while !done(&received) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if let Some(message) = self.next_message(left.min(Duration::from_millis(200)))
                && message.topic != "relay-test/probe"
            {
                received.push(message);
            }
        }
        received
    }
}

/// The message numbers in payloads of the form `{"n": <number>}`, in arrival order.
/// The `n` of every reading received, in order; a batch (a JSON array) counts element by element.
pub fn numbers(received: &[Received]) -> Vec<u64> {
    let mut numbers = Vec::new();
    for payload in received
        .iter()
        .filter_map(|r| serde_json::from_str::<Value>(&r.payload).ok())
    {
        match payload {
            Value::Array(readings) => {
                numbers.extend(readings.iter().filter_map(|reading| reading["n"].as_u64()))
            }
            reading => numbers.extend(reading["n"].as_u64()),
        }
    }
    numbers
}

/// The PUBLISH packets that relays (client ids are Cognito identity ids) sent on topics ending
/// in `topic`, per epoch second of the broker's log, as (publishes, payload bytes): counted
/// where IoT Core would count them. `log` is `broker_log()` or a tail of it.
pub fn publishes_per_second(log: &str, topic: &str) -> std::collections::BTreeMap<u64, (u64, u64)> {
    let topic = format!("/{topic}'");
    let mut per_second = std::collections::BTreeMap::<u64, (u64, u64)>::new();
    for line in log.lines() {
        if !line.contains("Received PUBLISH from us-east-1:") || !line.contains(&topic) {
            continue;
        }
        let second = line
            .split(':')
            .next()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        // "... (123 bytes))"
        let bytes: u64 = line
            .rsplit('(')
            .next()
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let entry = per_second.entry(second).or_default();
        entry.0 += 1;
        entry.1 += bytes;
    }
    per_second
}
