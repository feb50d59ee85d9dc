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

/// The IoT policy's targets in moto.
fn policy_targets(cloud: &Cloud, policy: &str) -> Vec<String> {
    let out = cloud.python(&format!(
        "import boto3, json; print(json.dumps(boto3.client('iot').list_targets_for_policy(policyName={policy:?})['targets']))"
    ));
    serde_json::from_str(out.trim()).expect("targets")
}

/// Issue 14, point 2: with the secret's `AttachFunction` tag, the daemon has the stack's
/// function attach the policy (Lambda `Invoke` with its ID token) and never calls
/// `AttachPolicy` itself; once per identity, and again when the secret names another policy.
/// moto runs no Lambda code: tests/support/attach_proxy.py runs the template's handler.
#[test]
fn attaches_the_policy_through_the_stacks_function() {
    let cloud = Cloud::start();
    let proxy = cloud.enable_attach_function();
    let mut subscriber = cloud.subscribe();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = proxy.config(&cloud, dir.path());
    let mut daemon = cloud.start_daemon_env(&config, &proxy.env());
    let mut client = daemon.connect();
    client.send_line(r#"{"topic": "sensors/temp", "payload": "one", "id": 1, "qos": 1}"#);
    assert_eq!(
        client.read_answer(Duration::from_secs(10)).expect("answer")["ok"],
        true
    );
    let status = daemon.wait_status("connected", WAIT, |s| s["state"] == "connected");
    let identity = status["identity_id"]
        .as_str()
        .expect("identity id")
        .to_owned();
    let received = subscriber.collect_until(WAIT, |r| !r.is_empty());
    assert_eq!(received.len(), 1, "{}", daemon.log_text());
    assert_eq!(received[0].payload, "one");

    let invocations = proxy.invocations();
    assert_eq!(
        invocations.len(),
        1,
        "{invocations:?}\n{}",
        daemon.log_text()
    );
    let call = &invocations[0];
    assert_eq!(call["function"], proxy.function.as_str());
    assert_eq!(call["payload_keys"], serde_json::json!(["IdToken"]));
    assert_eq!(call["answer"]["policy"], cloud.account.iot_policy.as_str());
    // The policy's only target is the one the function derived (moto's GetId mints a new id
    // per call): the daemon attached nothing itself.
    let attached_to = call["answer"]["identity_id"].as_str().expect("attached to");
    assert_eq!(
        policy_targets(&cloud, &cloud.account.iot_policy),
        vec![attached_to.to_owned()]
    );
    assert!(
        daemon
            .log_text()
            .contains("IoT policy attached by the stack's function")
    );
    cloud.assert_no_secrets("daemon log", &daemon.log_text());

    // Same identity, same policy: a restart invokes nothing.
    assert!(daemon.stop().success(), "{}", daemon.log_text());
    let mut daemon = cloud.start_daemon_env(&config, &proxy.env());
    let mut client = daemon.connect();
    client.send_line(r#"{"topic": "sensors/temp", "payload": "two", "id": 2, "qos": 1}"#);
    let received = subscriber.collect_until(WAIT, |r| !r.is_empty());
    assert_eq!(received[0].payload, "two", "{}", daemon.log_text());
    let status = daemon.status();
    assert_eq!(status["identity_id"].as_str(), Some(identity.as_str()));
    assert_eq!(proxy.invocations().len(), 1);

    // The secret names another policy: attached again at the next sign-in.
    assert!(daemon.stop().success(), "{}", daemon.log_text());
    cloud.python(&format!(
        "import boto3; boto3.client('iot').create_policy(policyName='relay-test-iot-policy-2', policyDocument='{{}}'); \
         boto3.client('secretsmanager').tag_resource(SecretId={:?}, Tags=[{{'Key': 'IoTPolicy', 'Value': 'relay-test-iot-policy-2'}}])",
        cloud.account.secret_id
    ));
    let daemon = cloud.start_daemon_env(&config, &proxy.env());
    let mut client = daemon.connect();
    client.send_line(r#"{"topic": "sensors/temp", "payload": "three", "id": 3, "qos": 1}"#);
    let received = subscriber.collect_until(WAIT, |r| !r.is_empty());
    assert_eq!(received[0].payload, "three", "{}", daemon.log_text());
    assert_eq!(proxy.invocations().len(), 2, "{}", daemon.log_text());
}

/// Issue 14, point 2: when IoT Core refuses the connection for authorization (the policy was
/// detached, or never attached), the daemon has the policy attached again, then connects.
#[test]
fn attaches_again_when_the_broker_refuses_for_authorization() {
    let mut cloud = Cloud::start();
    let proxy = cloud.enable_attach_function();
    cloud.start_broker_refusing();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = proxy.config(&cloud, dir.path());
    let daemon = cloud.start_daemon_env(&config, &proxy.env());
    let mut client = daemon.connect();
    client.send_line(r#"{"topic": "sensors/temp", "payload": "one", "id": 1, "qos": 1}"#);
    assert_eq!(
        client.read_answer(Duration::from_secs(10)).expect("answer")["ok"],
        true
    );
    // One attach at sign-in, one more after the refusal (and no more: refusals the policy
    // does not cure must not loop).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while proxy.invocations().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no second attach after the refusal:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        daemon
            .log_text()
            .contains("IoT Core refused the connection for authorization")
    );
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(proxy.invocations().len(), 2, "{}", daemon.log_text());

    cloud.start_broker();
    daemon.wait_status("published after the refusal", WAIT, |s| {
        s["state"] == "connected" && s["published_total"] == 1
    });
}
