//! The credential lifecycle against moto, whose Cognito credentials last 90 s: refresh ahead
//! of expiry, password rotation and revoked refresh tokens, throttling and 5xx, clocks that
//! hand out expired credentials; and no secret in any log line, file or status output.

mod harness;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use harness::{Cloud, Daemon, Streamer};

const WAIT: Duration = Duration::from_secs(180);

fn assert_delivered(subscriber: &mut harness::Subscriber, acked: &[u64]) {
    subscriber.expect_all(acked, WAIT);
}

/// No secret in the daemon's log, its state dir or its status answer.
fn assert_nothing_leaked(cloud: &Cloud, daemon: &Daemon) {
    cloud.assert_no_secrets("the daemon log", &daemon.log_text());
    cloud.assert_no_secrets("status", &daemon.status().to_string());
    for entry in std::fs::read_dir(&daemon.state_dir)
        .expect("state dir")
        .flatten()
    {
        let bytes = std::fs::read(entry.path()).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        cloud.assert_no_secrets(&entry.path().display().to_string(), &text);
    }
}

/// The `credentials_valid_s` of every connect the daemon logged.
fn connect_validities(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("connecting to the broker"))
        .filter_map(|l| {
            l.split("credentials_valid_s=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn four_minutes_on_90_second_credentials_refreshes_and_loses_nothing() {
    let cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = cloud.start_daemon(&cloud.config(dir.path(), true, ""));
    let streamer = Streamer::start(daemon.socket.clone(), "refresh", 1);
    std::thread::sleep(Duration::from_secs(240));
    let acked = streamer.finish();
    assert!(
        acked.len() >= 230,
        "one message a second for 4 minutes: {}",
        acked.len()
    );
    assert_delivered(&mut subscriber, &acked);

    let log = daemon.log_text();
    let refreshes = count(&log, "credentials refreshed");
    assert!(
        refreshes >= 2,
        "refreshed {refreshes} times in 4 minutes:\n{log}"
    );
    let validities = connect_validities(&log);
    assert!(!validities.is_empty());
    assert!(
        validities.iter().all(|v| *v >= 30),
        "every connect is signed with credentials valid for 30 s or more: {validities:?}"
    );
    let status = daemon.status();
    assert!(status["credentials_expire_at"].is_string());
    assert!(status["last_refresh"].is_string());
    eprintln!(
        "refresh: {} messages, {refreshes} refreshes, connects signed with {validities:?} s left",
        acked.len()
    );
    assert_nothing_leaked(&cloud, &daemon);
}

#[test]
fn recovers_from_password_rotation_and_revoked_refresh_token() {
    let cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = cloud.start_daemon(&cloud.config(dir.path(), false, ""));
    daemon.wait_status("connected", WAIT, |s| s["state"] == "connected");
    let streamer = Streamer::start(daemon.socket.clone(), "rotation", 5);

    let account = &cloud.account;
    cloud.python(&format!(
        "import boto3, json\n\
         idp = boto3.client('cognito-idp'); sm = boto3.client('secretsmanager')\n\
         idp.admin_set_user_password(UserPoolId={pool:?}, Username={user:?}, Password='Rotated-Passw0rd!', Permanent=True)\n\
         sm.put_secret_value(SecretId={secret:?}, SecretString=json.dumps({{{user:?}: 'Rotated-Passw0rd!'}}))\n\
         idp.admin_user_global_sign_out(UserPoolId={pool:?}, Username={user:?})\n",
        pool = account.user_pool_id,
        user = account.username,
        secret = account.secret_id,
    ));
    let rotated = Instant::now();
    // The next refresh (at most ~45 s away) meets the revoked token and the old password.
    while count(
        &daemon.log_text(),
        "password rejected; reading the secret again",
    ) == 0
    {
        assert!(
            rotated.elapsed() < WAIT,
            "never re-read the secret:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    daemon.wait_status("recovered", WAIT, |s| {
        s["last_error"].is_null() && s["state"] == "connected"
    });
    std::thread::sleep(Duration::from_secs(3));
    let acked = streamer.finish();
    assert_delivered(&mut subscriber, &acked);
    let log = daemon.log_text();
    assert!(count(&log, "refresh token rejected") >= 1, "{log}");
    assert!(
        !log.contains("Rotated-Passw0rd!"),
        "the new password leaked"
    );
    assert_nothing_leaked(&cloud, &daemon);
}

#[test]
fn backs_off_under_throttling_and_5xx_then_recovers_without_loss() {
    let cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    let proxy = cloud.start_fault_proxy();
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = cloud.start_daemon(&cloud.config_via(dir.path(), true, &proxy.endpoint(), ""));
    daemon.wait_status("connected", WAIT, |s| s["state"] == "connected");
    let streamer = Streamer::start(daemon.socket.clone(), "faults", 5);

    let faults_from = proxy.requests().len();
    proxy.set_mode("throttle");
    std::thread::sleep(Duration::from_secs(60));
    proxy.set_mode("error500");
    std::thread::sleep(Duration::from_secs(30));
    let status = daemon.status();
    assert_eq!(status["state"], "backoff", "{status}");
    assert!(
        status["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{status}"
    );
    proxy.set_mode("pass");
    let faulted: Vec<_> = proxy.requests()[faults_from..]
        .iter()
        .filter(|r| !r["fault"].is_null())
        .map(|r| r["t"].as_f64().unwrap_or_default())
        .collect();

    daemon.wait_status("recovered", WAIT, |s| {
        s["last_error"].is_null() && s["state"] == "connected"
    });
    std::thread::sleep(Duration::from_secs(3));
    let acked = streamer.finish();
    assert_delivered(&mut subscriber, &acked);

    // 90 s of faults: the SDK retries each call up to 3 times, and the daemon backs off
    // exponentially (2 s doubling, full jitter) between attempts of the chain.
    let per_minute = faulted.len() as f64 / 1.5;
    assert!(!faulted.is_empty(), "a refresh fell in the fault window");
    assert!(
        per_minute <= 30.0,
        "{} faulted requests in 90 s: no backoff?",
        faulted.len()
    );
    let gaps: Vec<f64> = faulted
        .windows(2)
        .map(|w| w[1] - w[0])
        .filter(|g| *g > 1.0)
        .collect();
    let distinct: BTreeSet<u64> = gaps.iter().map(|g| (g * 10.0) as u64).collect();
    assert!(
        gaps.len() < 2 || distinct.len() > 1,
        "retries are jittered: {gaps:?}"
    );
    eprintln!(
        "faults: {} failed requests in 90 s, gaps {gaps:?}",
        faulted.len()
    );
    assert_nothing_leaked(&cloud, &daemon);
}

#[test]
fn never_signs_with_credentials_that_are_already_expired() {
    let cloud = Cloud::start_with(true);
    let mut subscriber = cloud.subscribe();
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = cloud.start_daemon(&cloud.config(dir.path(), false, ""));
    daemon.wait_status("connected", WAIT, |s| s["state"] == "connected");
    let connects_before = count(&daemon.log_text(), "connecting to the broker");

    // moto's clock 5 minutes behind: its 90-second credentials expired before they arrive.
    cloud.set_moto_clock("-300s");
    let shifted = Instant::now();
    while !daemon.status()["last_error"]
        .as_str()
        .is_some_and(|e| e.contains("clock"))
    {
        assert!(
            shifted.elapsed() < WAIT,
            "expired credentials were not refused:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        count(&daemon.log_text(), "connecting to the broker"),
        connects_before,
        "no connect may be signed with expired credentials"
    );

    cloud.set_moto_clock("+0");
    daemon.wait_status("recovered", WAIT, |s| {
        s["last_error"].is_null() && s["state"] == "connected"
    });
    let mut client = daemon.connect();
    client.send_line(r#"{"topic":"clock","payload":{"n":1},"id":1}"#);
    assert_eq!(
        client.read_answer(Duration::from_secs(10)).expect("answer")["ok"],
        true
    );
    assert_delivered(&mut subscriber, &[1]);
    let validities = connect_validities(&daemon.log_text());
    assert!(validities.iter().all(|v| *v >= 30), "{validities:?}");
    assert_nothing_leaked(&cloud, &daemon);
}
