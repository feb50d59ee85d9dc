//! End to end: the real daemon onboards against moto and relays socket messages to mosquitto.

mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use harness::Cloud;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// A shared-user stack from the template, as `describe-stacks` shows its outputs.
fn stack_outputs(cloud: &Cloud) -> String {
    let account = &cloud.account;
    let outputs: Vec<Value> = [
        ("CognitoIdentityPoolID", account.identity_pool_id.as_str()),
        ("CognitoUnAuthRole", account.unauth_role_arn.as_str()),
        ("SecretName", account.secret_id.as_str()),
        ("Region", account.region.as_str()),
        ("IoTEndpoint", account.iot_endpoint.as_str()),
        ("IoTPolicy", account.iot_policy.as_str()),
        ("ClassicFlow", "true"),
        ("RegistrationMode", "shared-user"),
    ]
    .iter()
    .map(|(key, value)| serde_json::json!({"OutputKey": key, "OutputValue": value}))
    .collect();
    serde_json::json!({"Stacks": [{"StackName": "relay-test", "Outputs": outputs}]}).to_string()
}

/// What a new user does: the stack's outputs through `config-from-stack`, then the daemon.
/// Only what the test bed needs on top (its endpoints, CA, paths) comes from the environment.
fn config_from_stack(cloud: &Cloud, dir: &Path) -> (PathBuf, Vec<(String, String)>) {
    let outputs = dir.join("outputs.json");
    std::fs::write(&outputs, stack_outputs(cloud)).expect("outputs");
    let generated = Command::new(harness::daemon_binary())
        .arg("config-from-stack")
        .arg(&outputs)
        .output()
        .expect("config-from-stack");
    assert!(generated.status.success(), "{generated:?}");
    let config = dir.join("config.toml");
    std::fs::write(&config, &generated.stdout).expect("config");
    let env = [
        ("AWS__ENDPOINT_URL", cloud.daemon_endpoint()),
        ("MQTT__URL", cloud.mqtt_url()),
        ("MQTT__CA_FILE", cloud.ca_file.display().to_string()),
        ("SOCKET__PATH", dir.join("relay.sock").display().to_string()),
        ("STATE__DIR", dir.join("state").display().to_string()),
        ("LOG__LEVEL", "debug".into()),
    ]
    .into_iter()
    .map(|(key, value)| (format!("IOT_COGNITO_RELAY__{key}"), value))
    .collect();
    (config, env)
}

/// A shared-user stack -> `config-from-stack` -> daemon onboards and relays with AWS's
/// authorization enforced (tests/support/aws_gate.py: the template's role policies, the
/// guest session policy, the secret's resource policy, the IoT policy), and keeps its
/// identity across a restart.
#[test]
fn the_default_stack_onboards_and_relays_and_keeps_identity_across_restart() {
    let cloud = Cloud::start_enforced();
    let mut subscriber = cloud.subscribe();
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, env) = config_from_stack(&cloud, dir.path());
    let mut daemon = cloud.start_daemon_env(&config, &env);

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
    // Every AWS call and MQTT packet was decided by the gate, and none was denied.
    let decisions = cloud.gate().decisions();
    let denied: Vec<&Value> = decisions.iter().filter(|d| is_denied(d)).collect();
    assert!(denied.is_empty(), "{denied:?}");
    for needed in ["GetSecretValue", "connect", "publish"] {
        assert!(
            decisions.iter().any(|d| mentions(d, needed)),
            "the gate never saw {needed}: {decisions:?}"
        );
    }
    daemon.wait_status("spool emptied", WAIT, |s| {
        s["spool_messages"] == 0 && s["published_total"] == 1
    });

    // A restart keeps the client id and the topics.
    assert!(daemon.stop().success(), "{}", daemon.log_text());
    let daemon = cloud.start_daemon_env(&config, &env);
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
    cloud.assert_no_secrets("daemon log", &daemon.log_text());
}

fn is_denied(decision: &Value) -> bool {
    matches!(decision["decision"].as_str(), Some("deny" | "error"))
}

fn mentions(decision: &Value, what: &str) -> bool {
    decision.to_string().contains(what)
}

/// What the template's default stack did before the basic flow was always on (a config without
/// `unauth_role_arn`): AWS scopes enhanced-flow guest credentials down to a session policy
/// without Secrets Manager, so the device never onboards. It says why and how to fix it.
#[test]
fn an_enhanced_flow_guest_cannot_read_the_secret_and_the_log_says_why() {
    let cloud = Cloud::start_enforced();
    let mut subscriber = cloud.subscribe();
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = cloud.start_daemon(&cloud.config(dir.path(), false, ""));
    let mut client = daemon.connect();
    client.send_line(r#"{"topic": "a/b", "payload": 1, "id": 1}"#);
    assert_eq!(
        client.read_answer(Duration::from_secs(10)).expect("answer")["ok"],
        true
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !daemon
        .log_text()
        .contains("AmazonCognitoUnAuthedIdentitiesSessionPolicy")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no diagnosis:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = daemon.log_text();
    assert!(log.contains("set identity.unauth_role_arn"), "{log}");
    assert!(log.contains("config-from-stack"), "{log}");
    let denials: Vec<Value> = cloud
        .gate()
        .decisions()
        .into_iter()
        .filter(|d| is_denied(d) && mentions(d, "GetSecretValue"))
        .collect();
    assert!(!denials.is_empty(), "{log}");
    assert!(
        denials.iter().all(|d| mentions(d, "session policy")),
        "{denials:?}"
    );
    let status = daemon.status();
    assert_ne!(status["state"], "connected", "{status}");
    assert!(
        subscriber
            .collect_until(Duration::from_secs(2), |r| !r.is_empty())
            .is_empty()
    );
}

/// Sends `{"n": i}` for `numbers` and waits for every `ok`.
fn send_numbers(client: &mut harness::LocalApp, numbers: std::ops::Range<u64>) {
    for n in numbers.clone() {
        client.send_line(&format!(
            r#"{{"topic": "heal/t", "payload": {{"n": {n}}}, "id": {n}}}"#
        ));
    }
    for _ in numbers {
        let answer = client.read_answer(Duration::from_secs(10)).expect("answer");
        assert_eq!(answer["ok"], true, "{answer}");
    }
}

/// IoT Core answers an identity without an attached policy by closing the connection right
/// after CONNECT. A detached policy heals: after a few such closes the daemon attaches it
/// again (through the stack's function, with a fresh ID token) and delivers everything sent
/// meanwhile; a network outage of the same length (connections refused) attaches nothing.
#[test]
fn a_detached_policy_is_attached_again_but_a_network_outage_attaches_nothing() {
    // IoT Core applies a new attachment within minutes: here after 5 s.
    let cloud = Cloud::start_enforced_with(5);
    let mut subscriber = cloud.subscribe();
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, env) = config_from_stack(&cloud, dir.path());
    let daemon = cloud.start_daemon_env(&config, &env);
    let mut client = daemon.connect();
    let attaches = || cloud.gate().attach.invocations().len();
    send_numbers(&mut client, 0..5);
    let status = daemon.wait_status("connected", Duration::from_secs(90), |s| {
        s["state"] == "connected" && s["published_total"] == 5
    });
    let identity = status["identity_id"].as_str().expect("identity").to_owned();
    assert_eq!(attaches(), 1, "{}", daemon.log_text());

    // A network outage: the gate refuses connections for 15 s while the app keeps sending.
    cloud.gate().set_mode("refuse");
    for round in 0..3 {
        send_numbers(&mut client, 5 + round * 5..10 + round * 5);
        std::thread::sleep(Duration::from_secs(5));
    }
    cloud.gate().set_mode("pass");
    let (_, _) = subscriber.expect_all(&(0..20).collect::<Vec<_>>(), Duration::from_secs(90));
    assert_eq!(
        attaches(),
        1,
        "an outage attached the policy:\n{}",
        daemon.log_text()
    );
    assert_eq!(daemon.status()["policy_reattaches_total"], 0);

    // The attachment is lost while connected: the next publish is refused, so is every
    // CONNECT, until the daemon attaches the policy again.
    cloud.detach_policy(&identity);
    for round in 0..3 {
        send_numbers(&mut client, 20 + round * 5..25 + round * 5);
        std::thread::sleep(Duration::from_secs(5));
    }
    let (_, _) = subscriber.expect_all(&(20..35).collect::<Vec<_>>(), Duration::from_secs(300));
    assert_eq!(attaches(), 2, "{}", daemon.log_text());
    let status = daemon.status();
    assert_eq!(status["policy_reattaches_total"], 1, "{status}");
    assert!(status["policy_reattached_at"].is_string(), "{status}");
    let log = daemon.log_text();
    assert!(
        log.contains("closed the connection right after CONNECT"),
        "{log}"
    );
    assert_eq!(status["dead_letter_total"], 0, "{status}");
    // The gate closed connections after CONNECT: what IoT Core does, not a refusal CONNACK.
    assert!(
        cloud
            .gate()
            .decisions()
            .iter()
            .any(|d| is_denied(d) && mentions(d, "connect")),
        "the gate never refused a CONNECT"
    );
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

/// With the secret's `AttachFunction` tag, the daemon has the stack's
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

/// When IoT Core refuses the connection for authorization (the policy was
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
            .contains("IoT Core refuses this identity's connections")
    );
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(proxy.invocations().len(), 2, "{}", daemon.log_text());

    cloud.start_broker();
    daemon.wait_status("published after the refusal", WAIT, |s| {
        s["state"] == "connected" && s["published_total"] == 1
    });
}

/// Behind an HTTP proxy with Basic auth (tinyproxy, started by the test), with every
/// direct route to the emulated cloud refused by the firewall (only the proxy's uid may reach
/// moto and the broker), the daemon onboards through the proxy (Cognito, Secrets Manager) and
/// delivers over a WebSocket tunnelled with CONNECT; `doctor` walks the chain through it. The
/// proxy's password appears in no log, neither in `check-config` nor `doctor`.
#[test]
fn behind_a_proxy_the_daemon_onboards_and_delivers() {
    const PASSWORD: &str = "proxy-pass-7Qz";
    let cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    let proxy = cloud.start_http_proxy("relayuser", PASSWORD);
    cloud.allow_only_the_proxy_to(&[harness::MOTO_PORT, harness::WSS_PORT]);
    for port in [harness::MOTO_PORT, harness::WSS_PORT] {
        let direct = cloud
            .namespace
            .command("bash")
            .args(["-c", &format!("exec 3<>/dev/tcp/127.0.0.1/{port}")])
            .stderr(std::process::Stdio::null())
            .status()
            .expect("bash");
        assert!(!direct.success(), "port {port} is still reachable directly");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let config = cloud.config(
        dir.path(),
        true,
        &format!(
            "\n[network]\nproxy = \"http://relayuser:{PASSWORD}@127.0.0.1:{}\"\n",
            harness::HTTP_PROXY_PORT
        ),
    );
    let daemon = cloud.start_daemon(&config);
    let acked = harness::send_many(&daemon.socket, "proxied", 0..20);
    assert_eq!(acked.len(), 20);
    subscriber.expect_all(&acked, Duration::from_secs(60));

    let through = proxy.log_text();
    assert!(
        through.contains(&format!("CONNECT 127.0.0.1:{}", harness::WSS_PORT)),
        "the WebSocket was not tunnelled through the proxy:\n{through}"
    );
    assert!(
        through.contains(&format!("127.0.0.1:{}", harness::MOTO_PORT)),
        "the AWS calls did not go through the proxy:\n{through}"
    );
    let log = daemon.log_text();
    assert!(
        log.contains("outbound connections go through a proxy"),
        "{log}"
    );
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("relayuser:{PASSWORD}"));
    for secret in [PASSWORD, basic.as_str()] {
        assert!(!log.contains(secret), "the proxy password is in the log");
    }
    // doctor walks the chain through the proxy too (the direct routes are refused).
    let (code, text) = doctor(&cloud, &config, &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("PASS  secret:") && text.contains("PASS  proxy:"),
        "{text}"
    );
    assert!(!text.contains(PASSWORD), "{text}");
    let checked = std::process::Command::new(env!("CARGO_BIN_EXE_iot-cognito-relay"))
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .expect("check-config");
    let shown = String::from_utf8_lossy(&checked.stdout);
    assert!(shown.contains("http://***@127.0.0.1:"), "{shown}");
    assert!(!shown.contains(PASSWORD), "{shown}");
}

/// Runs `doctor` on `config` with `env` in the cloud's network; its exit code and its report.
fn doctor(cloud: &Cloud, config: &Path, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = cloud
        .namespace
        .command(env!("CARGO_BIN_EXE_iot-cognito-relay"))
        .args(["doctor", "--config"])
        .arg(config)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .envs(env.iter().copied())
        .output()
        .expect("doctor");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text)
}

/// A copy of `config` beside it with `edits` made.
fn edited(config: &Path, name: &str, edits: &[(&str, &str)]) -> PathBuf {
    let copy = config.with_file_name(name);
    std::fs::copy(config, &copy).expect("copy config");
    harness::rewrite_config(&copy, edits);
    copy
}

/// `doctor` on a healthy device (AWS's authorization enforced by the gate) passes
/// every step: with the daemon connected it opens no second connection (the daemon proves
/// the MQTT side), without it one trial CONNECT. Then each broken link of the chain fails
/// its own step and names the fix: wrong region, wrong secret id, a device network outside
/// DeviceCidrs, a clock 2 h off (libfaketime), an unreachable endpoint. Nothing it prints
/// holds the password.
#[test]
fn doctor_passes_a_healthy_device_and_names_each_broken_step_with_its_fix() {
    let mut cloud = Cloud::start_enforced();
    cloud.start_broker();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = cloud.config(dir.path(), true, "");
    let mut daemon = cloud.start_daemon(&config);
    daemon.wait_status("connected", WAIT, |s| s["state"] == "connected");
    let (code, text) = doctor(&cloud, &config, &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("PASS  mqtt: the running daemon is connected"),
        "{text}"
    );
    assert!(daemon.stop().success());
    let (code, text) = doctor(&cloud, &config, &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("PASS  mqtt: CONNECT to"), "{text}");
    for step in [
        "config",
        "region",
        "clock",
        "guest credentials",
        "secret",
        "sign-in",
        "credentials",
    ] {
        assert!(text.contains(&format!("PASS  {step}:")), "{step}: {text}");
    }
    assert!(
        !text.contains(&cloud.account.password),
        "the password in: {text}"
    );
    assert!(
        text.contains("PASS  trust store: AWS API calls trust the system's CA store"),
        "{text}"
    );
    // A system without a CA store (a static binary on Alpine without ca-certificates): the
    // built-in Amazon roots, and the chain still walks (the emulated AWS is plain HTTP).
    let empty_store = dir.path().join("no-certificates.pem");
    std::fs::write(&empty_store, "").expect("write empty store");
    let (code, text) = doctor(
        &cloud,
        &config,
        &[
            ("SSL_CERT_FILE", empty_store.to_str().expect("utf-8 path")),
            ("SSL_CERT_DIR", ""),
        ],
    );
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("PASS  trust store: AWS API calls trust the built-in Amazon roots (5 certificates; no system CA store: no certificate in the usual places"),
        "{text}"
    );

    let url_line = format!("url = {:?}", cloud.mqtt_url());
    let secret_line = format!("secret_id = {:?}", cloud.account.secret_id);
    for (name, edit, failed, fix) in [
        (
            "region.toml",
            ("[aws]\n", "[aws]\nregion = \"eu-west-1\"\n"),
            "FAIL  region:",
            "set aws.region = \"us-east-1\"",
        ),
        (
            "secret.toml",
            (secret_line.as_str(), "secret_id = \"relay/typo\""),
            "FAIL  secret:",
            "secret_id \"relay/typo\"",
        ),
        (
            "endpoint.toml",
            (url_line.as_str(), "url = \"wss://127.0.0.1:1/mqtt\""),
            "FAIL  mqtt: cannot reach 127.0.0.1:1",
            "check DNS, the firewall",
        ),
    ] {
        let broken = edited(&config, name, &[edit]);
        let (code, text) = doctor(&cloud, &broken, &[]);
        assert_eq!(code, Some(1), "{name}: {text}");
        assert!(
            text.contains(failed) && text.contains(fix),
            "{name}: {text}"
        );
    }

    cloud.gate().set_mode("outside");
    let (code, text) = doctor(&cloud, &config, &[]);
    cloud.gate().set_mode("pass");
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("FAIL  secret: access denied") && text.contains("DeviceCidrs"),
        "{text}"
    );

    let (code, text) = doctor(
        &cloud,
        &config,
        &[
            ("LD_PRELOAD", harness::LIBFAKETIME),
            ("FAKETIME", "+2h"),
            ("FAKETIME_DONT_RESET", "1"),
        ],
    );
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("FAIL  clock: this device's clock is 7") && text.contains("NTP"),
        "{text}"
    );
}
