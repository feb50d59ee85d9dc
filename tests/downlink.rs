//! Cloud to device against mosquitto: a cloud-side publisher sends to the device's
//! prefix and local apps receive on the socket, while the daemon runs, while it is stopped and
//! while no app listens; an app that leaves without acking passes its message on; order within
//! a topic; bad requests; the CLI; the health report; the examples of docs/protocol.md.

mod harness;

use std::process::Command;
use std::time::{Duration, Instant};

use harness::{Cloud, Daemon, MESSAGE_WAIT, TestMount, fill_disk, send_many};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_iot-cognito-relay");
const CONNECT_WAIT: Duration = Duration::from_secs(30);

/// A cloud with its broker, and a daemon subscribed to `topics` and connected.
struct Device {
    cloud: Cloud,
    // Holds the daemon's config and state until the test ends.
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
    daemon: Daemon,
    identity_id: String,
}

impl Device {
    fn start(topics: &[&str], extra: &str) -> Device {
        Device::start_editing(topics, extra, &[])
    }

    /// Like `start`, with `edits` made to the harness's config first.
    fn start_editing(topics: &[&str], extra: &str, edits: &[(&str, &str)]) -> Device {
        let mut cloud = Cloud::start_enforced();
        cloud.start_broker();
        let dir = tempfile::tempdir().expect("tempdir");
        let downlink = format!("\n[downlink]\ntopics = {topics:?}\n{extra}");
        let config = cloud.config(dir.path(), true, &downlink);
        harness::rewrite_config(&config, edits);
        let from = cloud.broker_log().len();
        let daemon = cloud.start_daemon(&config);
        let identity_id = connected(&daemon);
        cloud.wait_for_suback(&identity_id, from);
        Device {
            cloud,
            _dir: dir,
            config,
            daemon,
            identity_id,
        }
    }

    /// The full topic the cloud publishes to for the relative `topic`.
    fn topic(&self, relative: &str) -> String {
        format!(
            "{}/{}/{relative}",
            self.cloud.account.identity_pool_id, self.identity_id
        )
    }

    fn send(&self, relative: &str, numbers: std::ops::Range<u64>) {
        let payloads: Vec<String> = numbers.map(|n| format!(r#"{{"n":{n}}}"#)).collect();
        self.cloud.cloud_publish(&self.topic(relative), &payloads);
    }
}

/// Waits for `state: connected`; returns the identity id.
fn connected(daemon: &Daemon) -> String {
    let status = daemon.wait_status("the daemon to connect", CONNECT_WAIT, |s| {
        s["state"] == "connected"
    });
    status["identity_id"]
        .as_str()
        .expect("identity id")
        .to_owned()
}

/// The `n` of each message's JSON payload, in order.
fn ns(messages: &[Value]) -> Vec<u64> {
    messages
        .iter()
        .map(|m| m["payload"]["n"].as_u64().expect("payload n"))
        .collect()
}

#[test]
fn every_message_reaches_an_app_whether_the_daemon_runs_is_stopped_or_nobody_listens() {
    let mut device = Device::start(&["commands/#"], "");
    let mut uplink = device.cloud.subscribe();

    // Nobody listens: the messages wait in the inbox.
    device.send("commands/a", 0..5);
    device
        .daemon
        .wait_status("five messages in the inbox", MESSAGE_WAIT, |s| {
            s["inbox_messages"] == 5
        });
    let mut app = device.daemon.connect();
    assert_eq!(
        app.subscribe(&["commands/#"]),
        serde_json::json!({"id": "sub", "ok": true})
    );
    let waited = app.receive_and_ack(5);
    assert_eq!(ns(&waited), (0..5).collect::<Vec<_>>(), "in arrival order");
    assert!(waited.iter().all(|m| m["topic"] == "commands/a"));

    // Running, the app listening, while the device publishes too: both ways at once.
    let acked = send_many(&device.daemon.socket, "sensors/t", 0..50);
    device.send("commands/b", 5..25);
    let live = app.receive_and_ack(20);
    assert_eq!(ns(&live), (5..25).collect::<Vec<_>>());
    let (_, _) = uplink.expect_all(&acked, MESSAGE_WAIT);
    device
        .daemon
        .wait_status("the inbox emptied by the acks", MESSAGE_WAIT, |s| {
            s["inbox_messages"] == 0
        });

    // Stopped: the broker queues for the persistent session; the restarted daemon gets it,
    // and does not subscribe again to what the resumed session holds (IoT Core's Device
    // Advisor fails a client that does).
    assert!(device.daemon.stop().success());
    assert!(app.next_message(Duration::from_millis(200)).is_none());
    device.send("commands/c", 25..30);
    let from = device.cloud.broker_log().len();
    device.daemon = device.cloud.start_daemon(&device.config);
    connected(&device.daemon);
    let mut app = device.daemon.connect();
    app.subscribe(&["commands/#"]);
    let queued = app.receive_and_ack(5);
    assert_eq!(ns(&queued), (25..30).collect::<Vec<_>>());
    let log = device.cloud.broker_log();
    let since_restart = &log[from..];
    assert!(
        since_restart.contains("New client connected from")
            && !since_restart.contains(&format!("Received SUBSCRIBE from {}", device.identity_id)),
        "subscribed again to a resumed session:\n{since_restart}"
    );
    device
        .daemon
        .wait_status("nothing left", MESSAGE_WAIT, |s| s["inbox_messages"] == 0);
}

#[test]
fn an_unacked_message_goes_to_the_next_subscriber_and_payloads_keep_their_kind() {
    // Silent connections are closed after idle_timeout; subscribers wait in silence.
    let device = Device::start_editing(
        &["commands/#", "config/+"],
        "",
        &[("[socket]\n", "[socket]\nidle_timeout = \"1s\"\n")],
    );
    let mut first = device.daemon.connect();
    first.subscribe(&["commands/#"]);
    let mut second = device.daemon.connect();
    second.subscribe(&["commands/#", "config/+"]);
    std::thread::sleep(Duration::from_millis(2500));

    device.send("commands/reboot", 0..1);
    let handed = first
        .next_message(MESSAGE_WAIT)
        .expect("the first subscriber gets it");
    assert!(
        second.next_message(Duration::from_millis(300)).is_none(),
        "one app at a time"
    );
    drop(first);
    let again = second
        .next_message(MESSAGE_WAIT)
        .expect("redelivered to the next subscriber");
    assert_eq!(again, handed, "same seq, topic and payload");
    second.send_line(&format!(
        r#"{{"op":"ack","seq":{},"id":"a1"}}"#,
        again["seq"]
    ));
    let answer = second.read_answer(MESSAGE_WAIT).expect("ack answer");
    assert_eq!(answer, serde_json::json!({"id": "a1", "ok": true}));
    second.send_line(&format!(r#"{{"op":"ack","seq":{}}}"#, again["seq"]));
    let twice = second.read_answer(MESSAGE_WAIT).expect("answer");
    assert_eq!(twice["error"], "unknown_seq", "{twice}");

    device
        .cloud
        .cloud_publish(&device.topic("config/mode"), &["eco".into()]);
    device
        .cloud
        .cloud_publish_bytes(&device.topic("config/blob"), &[0xff, 0x00, 0x7f]);
    let kinds = second.receive_and_ack(2);
    assert_eq!(kinds[0]["topic"], "config/mode");
    assert_eq!(kinds[0]["payload"], "eco", "UTF-8 text as a string");
    assert_eq!(kinds[1]["payload_base64"], "/wB/", "binary as base64");
    assert_eq!(
        handed["payload"],
        serde_json::json!({"n": 0}),
        "JSON inline"
    );
}

#[test]
fn bad_subscribe_and_ack_requests_get_protocol_errors() {
    let cloud = Cloud::start_enforced();
    let dir = tempfile::tempdir().expect("tempdir");
    // No broker needed: the socket answers offline.
    let daemon = cloud.start_daemon(&cloud.config(dir.path(), true, ""));
    let mut app = daemon.connect();
    for (line, code) in [
        (r#"{"op":"subscribe","id":1}"#, "missing_field"),
        (r#"{"op":"subscribe","topics":[],"id":2}"#, "invalid_topic"),
        (
            r#"{"op":"subscribe","topics":["a/#/b"],"id":3}"#,
            "invalid_topic",
        ),
        (
            r#"{"op":"subscribe","topics":["$aws/things/x"],"id":4}"#,
            "invalid_topic",
        ),
        (
            r#"{"op":"subscribe","topics":"commands/#","id":5}"#,
            "invalid_topic",
        ),
        (r#"{"op":"ack","id":6}"#, "missing_field"),
        (r#"{"op":"ack","seq":"7","id":7}"#, "invalid_json"),
        (r#"{"op":"ack","seq":7,"id":8}"#, "unknown_seq"),
    ] {
        app.send_line(line);
        let answer = app.read_answer(MESSAGE_WAIT).expect("answer");
        assert_eq!(answer["ok"], false, "{line}: {answer}");
        assert_eq!(answer["error"], code, "{line}: {answer}");
    }
    // Still a working connection: publish and subscribe share it.
    app.send_line(r#"{"op":"subscribe","topics":["commands/#"],"id":"s"}"#);
    assert_eq!(app.read_answer(MESSAGE_WAIT).expect("answer")["ok"], true);
    app.send_line(r#"{"topic":"t","payload":1,"id":"p"}"#);
    assert_eq!(app.read_answer(MESSAGE_WAIT).expect("answer")["ok"], true);

    let output = Command::new(BIN)
        .args(["subscribe", "--socket"])
        .arg(&daemon.socket)
        .arg("a/#/b")
        .output()
        .expect("run subscribe");
    assert_eq!(
        output.status.code(),
        Some(2),
        "a bad filter is a usage error"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("invalid_topic"), "{stderr}");
}

#[test]
fn the_cli_and_the_documented_examples_print_and_ack() {
    let device = Device::start(&["commands/#"], "");
    let socket = device.daemon.socket.display().to_string();
    let default = "/run/iot-cognito-relay/relay.sock";

    let cli = Command::new(BIN)
        .args([
            "subscribe",
            "--socket",
            &socket,
            "--count",
            "2",
            "commands/#",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run subscribe");
    device.send("commands/x", 0..3);
    let output = cli.wait_with_output().expect("subscribe output");
    assert!(output.status.success());
    let lines: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(
        lines,
        vec![
            serde_json::json!({"topic": "commands/x", "payload": {"n": 0}}),
            serde_json::json!({"topic": "commands/x", "payload": {"n": 1}}),
        ]
    );
    // The third was not printed, so not acked: it waits for the next subscriber.
    device
        .daemon
        .wait_status("one left in the inbox", MESSAGE_WAIT, |s| {
            s["inbox_messages"] == 1
        });

    let shell = harness::doc_example("Shell: act on commands", "sh").replace(default, &socket);
    let stdout = harness::run_example("bash", &shell, Some(&path_with_binary()));
    assert_eq!(stdout.trim(), "command x: {\"n\":2}");

    device.send("commands/reboot", 7..8);
    let python =
        harness::doc_example("Python: subscribe and ack", "python").replace(default, &socket);
    let stdout = harness::run_example("python3", &python, None);
    assert_eq!(stdout.trim(), "commands/reboot {'n': 7}");
    device
        .daemon
        .wait_status("both acked", MESSAGE_WAIT, |s| s["inbox_messages"] == 0);
}

#[test]
fn health_reports_come_every_interval_and_the_first_after_an_outage_says_how_long() {
    let mut cloud = Cloud::start_enforced();
    cloud.start_broker();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = cloud.config(dir.path(), true, "\n[health]\ninterval = \"1s\"\n");
    let mut reports = cloud.subscribe();
    let daemon = cloud.start_daemon(&config);
    let identity_id = connected(&daemon);
    let topic = format!("{}/{identity_id}/health", cloud.account.identity_pool_id);

    let mut arrivals = Vec::new();
    let mut first = None;
    while arrivals.len() < 4 {
        let received = reports
            .next_message(Duration::from_secs(10))
            .expect("a health report within 10 s");
        if received.topic == topic {
            arrivals.push(Instant::now());
            first.get_or_insert(received.payload);
        }
    }
    let report: Value = serde_json::from_str(&first.expect("a report")).expect("JSON");
    for field in [
        "version",
        "uptime_s",
        "state",
        "spool_messages",
        "spool_bytes",
        "published_total",
        "dropped_total",
        "dead_letter_total",
        "inbox_messages",
        "last_error",
        "credentials_expire_at",
    ] {
        assert!(report.get(field).is_some(), "{field} missing: {report}");
    }
    assert_eq!(report["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(report["state"], "connected");
    assert!(report.get("offline_s").is_none(), "no outage yet: {report}");
    for pair in arrivals.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap > Duration::from_millis(500) && gap < Duration::from_millis(1600),
            "reports {gap:?} apart with interval 1s"
        );
    }

    // An outage: nothing is spooled for it, and the first report after it says how long.
    cloud.kill_broker();
    daemon.wait_status("the link to drop", CONNECT_WAIT, |s| {
        s["state"] != "connected"
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        daemon.status()["spool_messages"],
        0,
        "reports are never spooled"
    );
    cloud.start_broker();
    let deadline = Instant::now() + CONNECT_WAIT;
    let after = loop {
        let received = reports
            .next_message(deadline.saturating_duration_since(Instant::now()))
            .expect("a report after the outage");
        if received.topic == topic {
            break serde_json::from_str::<Value>(&received.payload).expect("JSON");
        }
    };
    let offline = after["offline_s"]
        .as_u64()
        .expect("offline_s after an outage");
    assert!((2..60).contains(&offline), "{after}");
}

/// PATH with the binary under test first, so the docs' `iot-cognito-relay` is this build.
fn path_with_binary() -> String {
    let dir = std::path::Path::new(BIN).parent().expect("bin dir");
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// The inbox cannot store (its disk is full). Before, each failure tore the
/// MQTT connection down, and the persistent session redelivered right after every CONNACK:
/// the uplink stopped though the spool was fine. Now the connection stays, the message stays
/// unacknowledged and is stored once there is room, `status` says `inbox_state: failing`.
#[test]
fn an_inbox_that_cannot_store_keeps_the_connection_and_the_uplink() {
    let mut cloud = Cloud::start_enforced();
    cloud.start_broker();
    let mut uplink = cloud.subscribe();
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let _mount = TestMount::mount(&state, &["-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs"]);
    let config = cloud.config(
        dir.path(),
        true,
        "\n[downlink]\ntopics = [\"commands/#\"]\n",
    );
    let from = cloud.broker_log().len();
    let daemon = cloud.start_daemon(&config);
    let identity_id = connected(&daemon);
    cloud.wait_for_suback(&identity_id, from);

    let filler = fill_disk(&state);
    let topic = format!(
        "{}/{identity_id}/commands/big",
        cloud.account.identity_pool_id
    );
    // Larger than any room the inbox's files have: storing it needs new disk space.
    cloud.cloud_publish(
        &topic,
        &[format!(r#"{{"n":7,"pad":"{}"}}"#, "x".repeat(100_000))],
    );
    daemon.wait_status("the inbox failing", MESSAGE_WAIT, |s| {
        s["inbox_state"] == "failing"
    });
    let acked = send_many(&daemon.socket, "sensors/t", 0..50);
    assert!(!acked.is_empty(), "the uplink takes messages");
    uplink.expect_all(&acked, MESSAGE_WAIT);
    // A few store retries later, still the first connection.
    std::thread::sleep(Duration::from_secs(4));
    let log = daemon.log_text();
    assert_eq!(
        log.matches("connecting to the broker").count(),
        1,
        "the connection was renewed:\n{log}"
    );
    assert!(log.contains("cannot store received messages"), "{log}");

    std::fs::remove_file(filler).expect("space returns");
    let mut app = daemon.connect();
    app.subscribe(&["commands/#"]);
    let stored = app.receive_and_ack(1);
    assert_eq!(stored[0]["payload"]["n"], 7);
    daemon.wait_status("the inbox working", MESSAGE_WAIT, |s| {
        s["inbox_state"] == "ok"
    });
}

/// A downlink filter the IoT policy does not allow (here a `topic_prefix`
/// outside the policy's `<pool>/<identity>/*`) is refused in the SUBACK: logged once with the
/// filter, and listed in `status` as `refused_filters`.
#[test]
fn a_filter_the_policy_refuses_is_logged_and_shown_in_status() {
    let mut cloud = Cloud::start_enforced();
    cloud.start_broker();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = cloud.config(
        dir.path(),
        true,
        "\n[downlink]\ntopics = [\"commands/#\"]\n",
    );
    harness::rewrite_config(
        &config,
        &[(
            "[mqtt]\n",
            "[mqtt]\ntopic_prefix = \"devices/{identity_id}\"\n",
        )],
    );
    let daemon = cloud.start_daemon(&config);
    let status = daemon.wait_status("the refusal in status", CONNECT_WAIT, |s| {
        s["refused_filters"] == serde_json::json!(["commands/#"])
    });
    assert_eq!(status["state"], "connected");
    let log = daemon.log_text();
    assert_eq!(
        log.matches("the broker refused this downlink subscription")
            .count(),
        1,
        "{log}"
    );
    let output = Command::new(BIN)
        .args(["status", "--socket"])
        .arg(&daemon.socket)
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("refused filters:     commands/#"), "{text}");
}
