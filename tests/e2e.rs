//! End to end: the real daemon onboards against moto and relays socket messages to mosquitto.

mod harness;

use std::time::Duration;

use harness::Cloud;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

fn relay_one(classic: bool) {
    let cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = cloud.config(dir.path(), classic, "");
    let mut daemon = cloud.start_daemon(&config);

    let mut client = daemon.connect();
    client.send_line(r#"{"topic": "sensors/temp", "payload": {"c": 21.5}, "id": "r1", "qos": 1}"#);
    let answer = client.read_answer(Duration::from_secs(10)).expect("answer");
    assert_eq!(answer, serde_json::json!({"id": "r1", "ok": true}));

    let status = daemon.wait_status("connected", WAIT, |s| s["state"] == "connected");
    let identity = status["identity_id"]
        .as_str()
        .expect("identity id")
        .to_owned();
    assert!(identity.starts_with("us-east-1:"), "{identity}");

    let received = subscriber.collect_until(WAIT, |r| !r.is_empty());
    assert_eq!(received.len(), 1, "{}", daemon.log_text());
    let expected_topic = format!("{}/{identity}/sensors/temp", cloud.account.identity_pool_id);
    assert_eq!(received[0].topic, expected_topic);
    assert_eq!(received[0].payload, r#"{"c":21.5}"#);
    assert!(
        cloud.broker_log().contains(&format!(" as {identity} ")),
        "the broker must see the identity id as client id:\n{}",
        cloud.broker_log()
    );
    daemon.wait_status("spool emptied", WAIT, |s| {
        s["spool_messages"] == 0 && s["published_total"] == 1
    });

    // A restart keeps the client id and the topics.
    assert!(daemon.stop().success(), "{}", daemon.log_text());
    let daemon = cloud.start_daemon(&config);
    let mut client = daemon.connect();
    client.send_line(r#"{"topic": "sensors/temp", "payload": "second", "id": 2}"#);
    assert_eq!(
        client.read_answer(Duration::from_secs(10)).expect("answer")["ok"],
        true
    );
    let status = daemon.wait_status("connected again", WAIT, |s| s["state"] == "connected");
    assert_eq!(status["identity_id"].as_str(), Some(identity.as_str()));
    let received = subscriber.collect_until(WAIT, |r| !r.is_empty());
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].topic, expected_topic);
    assert_eq!(received[0].payload, "second");
}

#[test]
fn relays_with_the_classic_flow_and_keeps_identity_across_restart() {
    relay_one(true);
}

#[test]
fn relays_with_the_enhanced_flow() {
    let cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = cloud.start_daemon(&cloud.config(dir.path(), false, ""));
    let mut client = daemon.connect();
    for i in 0..20 {
        client.send_line(&format!(
            r#"{{"topic": "a/b", "payload": {{"n": {i}}}, "id": {i}}}"#
        ));
    }
    for i in 0..20 {
        let answer = client.read_answer(Duration::from_secs(10)).expect("answer");
        assert_eq!(answer["id"], Value::from(i));
        assert_eq!(answer["ok"], true);
    }
    let received = subscriber.collect_until(WAIT, |r| r.len() >= 20);
    let payloads: Vec<String> = received.iter().map(|r| r.payload.clone()).collect();
    let expected: Vec<String> = (0..20).map(|i| format!(r#"{{"n":{i}}}"#)).collect();
    assert_eq!(payloads, expected, "{}", daemon.log_text());
}

/// rumqttc logs through the `log` crate: its records reach the daemon's log and obey the same
/// filter as the rest, including a `log.level` changed by SIGHUP. (rumqttc logs every outgoing
/// PUBLISH at debug as "Publish. Topic = …".)
#[test]
fn rumqttc_log_records_follow_the_log_filter() {
    const RUMQTTC_PUBLISH: &str = "Publish. Topic = ";
    let cloud = Cloud::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = cloud.config(dir.path(), false, "");
    let mut daemon = cloud.start_daemon(&config);
    let mut client = daemon.connect();
    client.send_line(r#"{"topic": "log/bridge", "payload": 1, "id": 1}"#);
    assert_eq!(
        client.read_answer(Duration::from_secs(10)).expect("answer")["ok"],
        true
    );
    daemon.wait_status("first published", WAIT, |s| s["published_total"] == 1);
    // The harness's level "debug" is the daemon's own: dependencies stay at warn.
    assert!(
        !daemon.log_text().contains(RUMQTTC_PUBLISH),
        "rumqttc's debug records must be filtered out by default:\n{}",
        daemon.log_text()
    );

    harness::rewrite_config(
        &config,
        &[(
            "level = \"debug\"",
            "level = \"warn,iot_cognito_relay=debug,rumqttc=debug\"",
        )],
    );
    daemon.process.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !daemon.log_text().contains("configuration reloaded") {
        assert!(
            std::time::Instant::now() < deadline,
            "no reload:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    client.send_line(r#"{"topic": "log/bridge", "payload": 2, "id": 2}"#);
    assert_eq!(
        client.read_answer(Duration::from_secs(10)).expect("answer")["ok"],
        true
    );
    daemon.wait_status("second published", WAIT, |s| s["published_total"] == 2);
    let log = daemon.log_text();
    let line = log
        .lines()
        .find(|line| line.contains(RUMQTTC_PUBLISH))
        .unwrap_or_else(|| panic!("rumqttc=debug shows rumqttc's records:\n{log}"));
    assert!(line.contains("/log/bridge"), "{line}");
    assert!(line.contains("DEBUG"), "{line}");
    assert!(daemon.stop().success(), "{}", daemon.log_text());
}
