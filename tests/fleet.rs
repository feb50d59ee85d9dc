//! Fleet mode end to end: a self-register stack (secret `{"registration_code": …}`)
//! in moto, the template's own pre-sign-up handler played by tests/support/cognito_proxy.py
//! (moto runs no Cognito trigger), mosquitto as the broker, real daemons. The shared-user mode
//! end to end is tests/e2e.rs.

mod harness;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use harness::{Cloud, Daemon};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);
/// moto's credentials live 90 s and are refreshed at half-life or earlier (minus jitter), so a
/// revoked device meets its next refresh within about 45 s; room for a slow machine.
const NEXT_REFRESH: Duration = Duration::from_secs(100);

/// A daemon in `dir` with this device name ("" = derived from /etc/machine-id).
fn start(cloud: &Cloud, dir: &Path, name: &str) -> Daemon {
    let extra = if name.is_empty() {
        String::new()
    } else {
        format!("\n[identity]\ndevice_name = {name:?}\n")
    };
    let config = cloud.config(dir, true, "");
    // The harness's config has an [identity] table already: add the key inside it.
    let text = std::fs::read_to_string(&config).expect("config");
    let text = text.replacen(
        "[identity]\n",
        &format!("[identity]\n{}", extra.trim_start_matches("\n[identity]\n")),
        1,
    );
    std::fs::write(&config, text).expect("config");
    cloud.start_daemon(&config)
}

fn send(daemon: &Daemon, topic: &str, payload: &str, id: u64) {
    let mut app = daemon.connect();
    app.send_line(&format!(
        r#"{{"topic": {topic:?}, "payload": {payload:?}, "id": {id}}}"#
    ));
    let answer = app.read_answer(Duration::from_secs(10)).expect("answer");
    assert_eq!(answer["ok"], true, "{answer}");
}

fn connected(daemon: &Daemon) -> Value {
    daemon.wait_status("connected", WAIT, |s| s["state"] == "connected")
}

fn device_password(state_dir: &Path) -> String {
    let text = std::fs::read_to_string(state_dir.join("device.json")).expect("device.json");
    let file: Value = serde_json::from_str(&text).expect("json");
    file["password"].as_str().expect("password").to_owned()
}

/// Two devices of one stack register their own users, get their own identity ids, client ids
/// and topics; a restarted device signs in with its stored password and never calls SignUp
/// again. Nothing secret reaches a log or `status`.
#[test]
fn each_device_registers_its_own_user_once() {
    let cloud = Cloud::start_fleet("");
    let mut subscriber = cloud.subscribe();
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    // A: the default name (from /etc/machine-id); B: one chosen by the operator.
    let mut a = start(&cloud, dir_a.path(), "");
    let b = start(&cloud, dir_b.path(), "gate-7.b_2");
    send(&a, "sensors/t", "from a", 1);
    send(&b, "sensors/t", "from b", 1);
    let (status_a, status_b) = (connected(&a), connected(&b));
    for status in [&status_a, &status_b] {
        assert_eq!(status["registration_mode"], "self-register", "{status}");
    }
    let name_a = status_a["device_name"].as_str().expect("name").to_owned();
    assert!(name_a.starts_with("dev-") && name_a.len() == 28, "{name_a}");
    assert_eq!(status_b["device_name"], "gate-7.b_2");
    let id_a = status_a["identity_id"].as_str().expect("id").to_owned();
    let id_b = status_b["identity_id"].as_str().expect("id").to_owned();
    assert_ne!(id_a, id_b);

    // Each device's message under its own prefix, each connected with its own client id.
    let received = subscriber.collect_until(WAIT, |r| r.len() >= 2);
    let pool = &cloud.account.identity_pool_id;
    let mut topics: Vec<(String, String)> = received
        .iter()
        .map(|r| (r.topic.clone(), r.payload.clone()))
        .collect();
    topics.sort();
    let mut expected = vec![
        (format!("{pool}/{id_a}/sensors/t"), "from a".to_owned()),
        (format!("{pool}/{id_b}/sensors/t"), "from b".to_owned()),
    ];
    expected.sort();
    assert_eq!(topics, expected);
    let broker = cloud.broker_log();
    for id in [&id_a, &id_b] {
        assert!(broker.contains(&format!(" as {id} ")), "{broker}");
    }

    // The pool has both users, confirmed by the template's trigger, with <name>@<domain>.
    assert_eq!(cloud.cognito().count("SignUp", "ok"), 2);
    let users = cloud.python(&format!(
        "import boto3\nfor u in boto3.client('cognito-idp').list_users(UserPoolId={:?})['Users']:\n    \
         print(u['Username'], u['UserStatus'], [a['Value'] for a in u['Attributes'] if a['Name'] == 'email'][0])",
        cloud.account.user_pool_id
    ));
    assert!(
        users.contains(&format!("{name_a} CONFIRMED {name_a}@example.com")),
        "{users}"
    );
    assert!(
        users.contains("gate-7.b_2 CONFIRMED gate-7.b_2@example.com"),
        "{users}"
    );

    // device.json: 0600, written once; the password appears nowhere else.
    let state_a = dir_a.path().join("state");
    let mode = std::fs::metadata(state_a.join("device.json"))
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let password_a = device_password(&state_a);
    let password_b = device_password(&dir_b.path().join("state"));
    assert_ne!(password_a, password_b);
    for (what, text) in [
        ("log a", a.log_text()),
        ("log b", b.log_text()),
        ("status a", status_a.to_string()),
        ("status b", status_b.to_string()),
        (
            "proxy log",
            std::fs::read_to_string(cloud.dir.path().join("cognito-proxy.log")).expect("log"),
        ),
    ] {
        cloud.assert_none_of(
            what,
            &text,
            &[
                ("device password", &password_a),
                ("device password", &password_b),
            ],
        );
    }

    // A restart signs in with the stored password: same user, same identity, no SignUp.
    assert!(a.stop().success(), "{}", a.log_text());
    let mut a = start(&cloud, dir_a.path(), "");
    send(&a, "sensors/t", "a again", 2);
    let status = connected(&a);
    assert_eq!(status["identity_id"].as_str(), Some(id_a.as_str()));
    assert_eq!(status["device_name"].as_str(), Some(name_a.as_str()));
    let received = subscriber.collect_until(WAIT, |r| !r.is_empty());
    assert_eq!(received[0].topic, format!("{pool}/{id_a}/sensors/t"));
    assert_eq!(cloud.cognito().count("SignUp", "ok"), 2, "no second SignUp");
    assert_eq!(
        cloud
            .cognito()
            .calls()
            .iter()
            .filter(|c| c["op"] == "SignUp")
            .count(),
        2
    );
    assert_eq!(device_password(&state_a), password_a);

    // doctor signs in as the device's own user (device.json) and registers nothing.
    assert!(a.stop().success(), "{}", a.log_text());
    let doctor = cloud
        .namespace
        .command(env!("CARGO_BIN_EXE_iot-cognito-relay"))
        .args(["doctor", "--config"])
        .arg(dir_a.path().join("config.toml"))
        .output()
        .expect("doctor");
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert_eq!(doctor.status.code(), Some(0), "{text}");
    assert!(
        text.contains(&format!("PASS  sign-in: user {name_a}")),
        "{text}"
    );
    assert!(!text.contains(&password_a), "{text}");
    assert_eq!(
        cloud.cognito().count("SignUp", "ok"),
        2,
        "doctor registered nothing"
    );
}

/// A device whose state dir was wiped (re-flashed) finds its name registered: one clear line
/// that names the recovery command, no password anywhere; after the operator runs it, the
/// device registers again by itself.
#[test]
fn a_reflashed_device_names_the_recovery_command() {
    let cloud = Cloud::start_fleet("");
    let dir = tempfile::tempdir().expect("dir");
    let mut first = start(&cloud, dir.path(), "kiosk-12");
    connected(&first);
    assert!(first.stop().success());
    std::fs::remove_dir_all(dir.path().join("state")).expect("wipe the state dir");

    let second = start(&cloud, dir.path(), "kiosk-12");
    let status = second.wait_status("the name-taken error", WAIT, |s| {
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("already registered"))
    });
    let error = status["last_error"].as_str().expect("error");
    let command = format!(
        "aws cognito-idp admin-delete-user --user-pool-id {} --username kiosk-12",
        cloud.account.user_pool_id
    );
    assert!(error.contains(&command), "{error}");
    assert_ne!(status["state"], "connected");
    let log = second.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("already registered"))
        .collect();
    assert!(!lines.is_empty(), "{log}");
    assert!(lines.iter().all(|l| l.contains(&command)), "{lines:?}");
    let password = device_password(&dir.path().join("state"));
    cloud.assert_none_of("log", &log, &[("device password", &password)]);
    cloud.assert_none_of(
        "status",
        &status.to_string(),
        &[("device password", &password)],
    );

    // The operator's recovery: the device registers again at its next retry.
    cloud.delete_device_user("kiosk-12");
    let status = second.wait_status("registered again", WAIT, |s| s["state"] == "connected");
    assert_eq!(status["device_name"], "kiosk-12");
    assert_eq!(status["last_error"], Value::Null);
}

/// Revocation (docs/operations.md): AdminDisableUser + AdminUserGlobalSignOut on one device
/// stops that device at its next refresh (its connection closes, its data stays spooled), and
/// the other device goes on. What moto cannot show: IoT Core refusing the revoked identity
/// (moto enforces no IoT policy, mosquitto checks no credentials) and the still-valid AWS
/// credentials expiring; the daemon's own reaction is what is tested.
#[test]
fn a_revoked_device_stops_at_its_next_refresh_and_no_other() {
    let cloud = Cloud::start_fleet("");
    let mut subscriber = cloud.subscribe();
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let a = start(&cloud, dir_a.path(), "revoked-1");
    let b = start(&cloud, dir_b.path(), "kept-2");
    let id_a = connected(&a)["identity_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let id_b = connected(&b)["identity_id"]
        .as_str()
        .expect("id")
        .to_owned();

    cloud.revoke_device("revoked-1");
    let status = a.wait_status("the revoked device stopped", NEXT_REFRESH, |s| {
        s["state"] != "connected"
            && s["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("refused this device's user revoked-1"))
    });
    assert!(
        a.log_text().contains("stopping its connection"),
        "{}",
        a.log_text()
    );
    assert_eq!(status["identity_id"], Value::Null, "{status}");

    // A message to the revoked device stays in its spool; the other device's goes out.
    send(&a, "after", "revoked", 10);
    send(&b, "after", "kept", 10);
    let pool = &cloud.account.identity_pool_id;
    let received = subscriber.collect_until(Duration::from_secs(15), |r| {
        r.iter().any(|m| m.payload == "kept")
    });
    assert!(
        received
            .iter()
            .any(|m| m.topic == format!("{pool}/{id_b}/after")),
        "{:?}",
        received.iter().map(|m| &m.topic).collect::<Vec<_>>()
    );
    assert!(
        !received.iter().any(|m| m.topic.contains(&id_a)),
        "the revoked device still published"
    );
    assert_eq!(a.status()["spool_messages"], 1);
    // B stays connected (a sample may catch it reconnecting with refreshed credentials).
    let b_status = b.wait_status("b connected", Duration::from_secs(15), |s| {
        s["state"] == "connected"
    });
    assert_eq!(b_status["last_error"], Value::Null);
    assert_eq!(b_status["identity_id"].as_str(), Some(id_b.as_str()));
}
