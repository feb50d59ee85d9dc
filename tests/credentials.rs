//! The credential lifecycle against moto, whose Cognito credentials last 90 s: refresh ahead
//! of expiry, password rotation and revoked refresh tokens, throttling and 5xx, clocks that
//! hand out expired credentials; and no secret in any log line, file or status output.

mod harness;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use harness::{Cloud, Daemon, Streamer};

const WAIT: Duration = Duration::from_secs(180);
/// After a long run of refused identity steps, the next try may be as far away as the identity
/// side's backoff cap (300 s, full jitter): recovery is awaited that long, plus room.
const RECOVERY_WAIT: Duration = Duration::from_secs(330);

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

/// Epoch seconds of a SigV4 `X-Amz-Date` (`20261129T150000Z`).
fn amz_date_epoch(date: &str) -> f64 {
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &date[0..4],
        &date[4..6],
        &date[6..8],
        &date[9..11],
        &date[11..13],
        &date[13..15]
    );
    humantime::parse_rfc3339(&rfc3339)
        .unwrap_or_else(|e| panic!("X-Amz-Date {date:?}: {e}"))
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

/// The authenticated credentials the fault proxy handed out: (when, access key, expiry).
fn issued_credentials(proxy: &harness::FaultProxy) -> Vec<(f64, String, f64)> {
    proxy
        .requests()
        .iter()
        .filter_map(|r| {
            Some((
                r["t"].as_f64()?,
                r["access_key"].as_str()?.to_owned(),
                r["expiration"].as_f64()?,
            ))
        })
        .collect()
}

/// The PINGREQs the broker received from `client_id` (mosquitto logs each).
fn pings_from(cloud: &Cloud, client_id: &str) -> usize {
    count(
        &cloud.broker_log(),
        &format!("Received PINGREQ from {client_id}"),
    )
}

/// Connects through the websocket proxy, which logs every upgrade and can cut the link.
fn via_ws_proxy(config: &std::path::Path, ws: &harness::WsProxy) {
    harness::rewrite_config(
        config,
        &[(
            &format!("wss://127.0.0.1:{}/mqtt", harness::WSS_PORT),
            &ws.url(),
        )],
    );
}

/// When the fault proxy saw each user pool sign-in or refresh after `after` (epoch seconds).
fn user_pool_calls_after(proxy: &harness::FaultProxy, after: f64) -> Vec<f64> {
    proxy
        .requests()
        .iter()
        .filter_map(|r| {
            let t = r["t"].as_f64()?;
            (t > after && r["target"].as_str()?.ends_with(".InitiateAuth")).then_some(t)
        })
        .collect()
}

/// The seconds between each upgrade's signing and the expiry of the credentials it was signed
/// with (the fault proxy makes each answer's access key unique).
fn upgrade_validities(proxy: &harness::FaultProxy, ws: &harness::WsProxy) -> Vec<f64> {
    let expiries: std::collections::HashMap<String, f64> = issued_credentials(proxy)
        .into_iter()
        .map(|(_, key, expiry)| (key, expiry))
        .collect();
    ws.upgrades()
        .iter()
        .map(|upgrade| {
            let key = upgrade["access_key"].as_str().unwrap_or_default();
            let expiry = *expiries
                .get(key)
                .unwrap_or_else(|| panic!("upgrade signed with unknown key {key:?}: {upgrade}"));
            expiry - amz_date_epoch(upgrade["amz_date"].as_str().unwrap_or_default())
        })
        .collect()
}

/// Credentials living 2 minutes (rewritten by the fault proxy; moto's live 90 s) with a 50 s
/// margin are refreshed 50-75 s before they expire, three times in a row, while messages
/// stream: the MQTT connection is made once (IoT Core does not cut a connection when the
/// credentials that signed it expire; a reconnect per refresh costs a TLS handshake, an
/// upgrade, CONNECT and SUBSCRIBE each time), and it sends no ping while a message a second
/// goes out (each PUBLISH and its PUBACK show the link alive; the keep-alive is 30 s). A cut
/// link reconnects at once, signed with credentials that have the margin left. Nothing is
/// lost, nothing secret leaks, and the byte counters move.
#[test]
fn keeps_one_connection_across_refreshes_of_two_minute_credentials() {
    const LIFETIME_S: f64 = 120.0;
    const MARGIN_S: f64 = 50.0;
    const REFRESHES: usize = 3;
    // The fault proxy's log and the daemon's clock are the same machine's; requests take time.
    const SLACK_S: f64 = 3.0;
    let cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    let proxy = cloud.start_fault_proxy();
    proxy.set_mode(&format!("pass lifetime={LIFETIME_S}"));
    let ws = cloud.start_ws_proxy();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = cloud.config_via(dir.path(), true, &proxy.endpoint(), "");
    via_ws_proxy(&config, &ws);
    harness::rewrite_config(
        &config,
        &[(
            "[identity]\n",
            &format!("[identity]\nrefresh_margin = \"{MARGIN_S}s\"\n"),
        )],
    );
    let daemon = cloud.start_daemon(&config);
    daemon.wait_status("connected", WAIT, |s| s["state"] == "connected");
    let streamer = Streamer::start(daemon.socket.clone(), "refresh", 1);

    let (issued_at, _, expires_at) = issued_credentials(&proxy)[0].clone();
    let deadline =
        Instant::now() + Duration::from_secs_f64(REFRESHES as f64 * (LIFETIME_S - MARGIN_S) + 30.0);
    while user_pool_calls_after(&proxy, issued_at).len() < REFRESHES {
        assert!(
            Instant::now() < deadline,
            "fewer than {REFRESHES} refreshes:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let lead = expires_at - user_pool_calls_after(&proxy, issued_at)[0];
    eprintln!(
        "first refresh: {lead:.1} s before expiry (margin {MARGIN_S} s, lifetime {LIFETIME_S} s)"
    );
    assert!(
        (MARGIN_S - SLACK_S..=1.5 * MARGIN_S + SLACK_S).contains(&lead),
        "refreshed {lead:.1} s before expiry; the margin is {MARGIN_S} s (+ up to half of it as jitter)"
    );
    daemon.wait_status("refreshed", WAIT, |s| {
        s["last_error"].is_null() && s["state"] == "connected"
    });
    let log = daemon.log_text();
    assert!(count(&log, "credentials refreshed") >= REFRESHES, "{log}");
    assert_eq!(
        ws.upgrades().len(),
        1,
        "one MQTT connection across {REFRESHES} refreshes:\n{log}"
    );
    let status = daemon.status();
    assert_eq!(status["reconnects_total"], 0, "{status}");
    let client_id = status["identity_id"]
        .as_str()
        .expect("identity id")
        .to_owned();
    assert_eq!(
        pings_from(&cloud, &client_id),
        0,
        "no ping while messages flow"
    );
    let sent = status["bytes_sent_total"]
        .as_u64()
        .expect("bytes_sent_total");
    assert!(
        sent > 0 && status["bytes_received_total"].as_u64() > Some(0),
        "{status}"
    );

    // A forced disconnect: reconnected at once, with credentials that have the margin left.
    ws.set_mode("cut");
    std::thread::sleep(Duration::from_secs(1));
    ws.set_mode("pass");
    daemon.wait_status("reconnected", WAIT, |s| {
        s["state"] == "connected" && s["reconnects_total"] == 1
    });
    std::thread::sleep(Duration::from_secs(3));
    let acked = streamer.finish();
    assert_delivered(&mut subscriber, &acked);
    let validities = upgrade_validities(&proxy, &ws);
    eprintln!("upgrades signed with credentials valid for {validities:?} s");
    assert!(validities.len() >= 2, "{validities:?}");
    assert!(
        validities.iter().all(|v| *v >= MARGIN_S - SLACK_S),
        "every connect is signed with credentials valid for the margin: {validities:?}"
    );
    assert!(daemon.status()["bytes_sent_total"].as_u64() > Some(sent));
    assert_nothing_leaked(&cloud, &daemon);
}

/// `identity.refresh = "on-demand"`: a connected device does not refresh, also after its
/// credentials expired (the connection stays, kept alive by pings while idle); the reconnect
/// after a cut first refreshes and signs with the fresh credentials.
#[test]
fn on_demand_refreshes_only_for_a_reconnect() {
    // Credentials living less than a minute are refused as expired on arrival.
    const LIFETIME_S: f64 = 90.0;
    const MARGIN_S: f64 = 20.0;
    let cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    let proxy = cloud.start_fault_proxy();
    proxy.set_mode(&format!("pass lifetime={LIFETIME_S}"));
    let ws = cloud.start_ws_proxy();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = cloud.config_via(dir.path(), true, &proxy.endpoint(), "");
    via_ws_proxy(&config, &ws);
    harness::rewrite_config(
        &config,
        &[(
            "[identity]\n",
            &format!("[identity]\nrefresh = \"on-demand\"\nrefresh_margin = \"{MARGIN_S}s\"\n"),
        )],
    );
    let daemon = cloud.start_daemon(&config);
    daemon.wait_status("connected", WAIT, |s| s["state"] == "connected");
    // A connection per message: the daemon closes idle app connections.
    let send = |n: u64| {
        let mut client = daemon.connect();
        client.send_line(&format!(
            r#"{{"topic":"on-demand","payload":{{"n":{n}}},"id":{n}}}"#
        ));
        let answer = client.read_answer(Duration::from_secs(10)).expect("answer");
        assert_eq!(answer["ok"], true, "{answer}");
    };
    send(1);
    let (issued_at, _, expires_at) = issued_credentials(&proxy)[0].clone();
    while now_epoch() < expires_at + 10.0 {
        std::thread::sleep(Duration::from_millis(500));
    }
    let client_id = daemon.status()["identity_id"]
        .as_str()
        .expect("identity id")
        .to_owned();
    let pings = pings_from(&cloud, &client_id);
    assert!(pings >= 2, "an idle link pings every 30 s: {pings} pings");
    assert_eq!(
        user_pool_calls_after(&proxy, issued_at),
        Vec::<f64>::new(),
        "no refresh while connected:\n{}",
        daemon.log_text()
    );
    assert_eq!(daemon.status()["state"], "connected");

    let cut_at = now_epoch();
    ws.set_mode("cut");
    std::thread::sleep(Duration::from_secs(1));
    ws.set_mode("pass");
    daemon.wait_status("reconnected", WAIT, |s| {
        s["state"] == "connected" && s["reconnects_total"] == 1
    });
    assert_eq!(
        user_pool_calls_after(&proxy, cut_at).len(),
        1,
        "one refresh for the reconnect:\n{}",
        daemon.log_text()
    );
    send(2);
    assert_delivered(&mut subscriber, &[1, 2]);
    let validities = upgrade_validities(&proxy, &ws);
    eprintln!("upgrades signed with credentials valid for {validities:?} s");
    assert_eq!(validities.len(), 2, "{validities:?}");
    assert!(
        validities[1] >= LIFETIME_S - 15.0,
        "the reconnect signs with the fresh credentials: {validities:?}"
    );
    assert_nothing_leaked(&cloud, &daemon);
}

#[test]
fn recovers_from_password_rotation_and_revoked_refresh_token() {
    let cloud = Cloud::start_enforced();
    let mut subscriber = cloud.subscribe();
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = cloud.start_daemon(&cloud.config(dir.path(), true, ""));
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

    daemon.wait_status("recovered", RECOVERY_WAIT, |s| {
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

/// The stack replaced the app client (the secret's `ClientId` tag changed,
/// the old client is gone): refreshing with the old one is refused for good
/// (`ResourceNotFoundException`). After a few such refusals the daemon reads the secret again
/// and signs in with the new client, instead of retrying the dead one forever.
#[test]
fn a_replaced_app_client_is_found_by_reading_the_secret_again() {
    let cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = cloud.start_daemon(&cloud.config(dir.path(), true, ""));
    daemon.wait_status("connected", WAIT, |s| s["state"] == "connected");
    let streamer = Streamer::start(daemon.socket.clone(), "client", 2);

    let account = &cloud.account;
    cloud.python(&format!(
        "import boto3\n\
         idp = boto3.client('cognito-idp'); sm = boto3.client('secretsmanager')\n\
         new = idp.create_user_pool_client(UserPoolId={pool:?}, ClientName='replacement', \
             ExplicitAuthFlows=['ALLOW_USER_PASSWORD_AUTH', 'ALLOW_REFRESH_TOKEN_AUTH'])['UserPoolClient']['ClientId']\n\
         sm.tag_resource(SecretId={secret:?}, Tags=[{{'Key': 'ClientId', 'Value': new}}])\n\
         idp.delete_user_pool_client(UserPoolId={pool:?}, ClientId={client:?})\n",
        pool = account.user_pool_id,
        secret = account.secret_id,
        client = account.client_id,
    ));
    let replaced = Instant::now();
    // The next refresh (at most ~45 s away) is refused; three refusals take seconds.
    let limit = Duration::from_secs(120);
    while count(&daemon.log_text(), "refresh refused repeatedly") == 0 {
        assert!(
            replaced.elapsed() < limit,
            "still retrying the replaced app client:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    daemon.wait_status("recovered", WAIT, |s| {
        s["last_error"].is_null() && s["state"] == "connected"
    });
    let log = daemon.log_text();
    assert!(count(&log, "ResourceNotFoundException") >= 1, "{log}");
    std::thread::sleep(Duration::from_secs(3));
    let acked = streamer.finish();
    assert_delivered(&mut subscriber, &acked);
    assert_nothing_leaked(&cloud, &daemon);
}

/// While every refresh fails, the link is cut again and again, also after
/// the credentials in hand have expired. A proxy in front of the broker reads each websocket
/// upgrade: every one is signed (`X-Amz-Date`) with credentials (access key, made unique per
/// answer by the fault proxy) that were still valid then, with 30 s or more to go.
#[test]
fn no_upgrade_is_signed_with_expired_credentials_while_refreshes_fail() {
    let cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    let proxy = cloud.start_fault_proxy();
    let ws = cloud.start_ws_proxy();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = cloud.config_via(dir.path(), true, &proxy.endpoint(), "");
    harness::rewrite_config(
        &config,
        &[(
            &format!("wss://127.0.0.1:{}/mqtt", harness::WSS_PORT),
            &ws.url(),
        )],
    );
    let daemon = cloud.start_daemon(&config);
    daemon.wait_status("connected", WAIT, |s| s["state"] == "connected");
    let streamer = Streamer::start(daemon.socket.clone(), "expired", 2);

    proxy.set_mode("throttle");
    let outage_from = now_epoch();
    let held = issued_credentials(&proxy);
    let last_expiry = held.iter().map(|c| c.2).fold(0.0, f64::max);
    // Cut the link every few seconds until 15 s after the last credentials expired.
    while now_epoch() < last_expiry + 15.0 {
        std::thread::sleep(Duration::from_secs(6));
        ws.set_mode("cut");
        std::thread::sleep(Duration::from_secs(1));
        ws.set_mode("pass");
    }
    let outage_to = now_epoch();
    proxy.set_mode("pass");
    daemon.wait_status("recovered", RECOVERY_WAIT, |s| {
        s["last_error"].is_null() && s["state"] == "connected"
    });
    std::thread::sleep(Duration::from_secs(3));
    let acked = streamer.finish();
    assert_delivered(&mut subscriber, &acked);

    let expiries: std::collections::HashMap<String, f64> = issued_credentials(&proxy)
        .into_iter()
        .map(|(_, key, expiry)| (key, expiry))
        .collect();
    let upgrades = ws.upgrades();
    let in_outage = upgrades
        .iter()
        .filter(|u| {
            u["t"]
                .as_f64()
                .is_some_and(|t| t > outage_from && t < outage_to)
        })
        .count();
    assert!(
        in_outage >= 3,
        "the cuts forced reconnects while refreshes failed: {upgrades:?}"
    );
    for upgrade in &upgrades {
        let key = upgrade["access_key"].as_str().unwrap_or_default();
        let expiry = *expiries
            .get(key)
            .unwrap_or_else(|| panic!("upgrade signed with unknown key {key:?}: {upgrade}"));
        let signed = amz_date_epoch(upgrade["amz_date"].as_str().unwrap_or_default());
        assert!(
            signed + 30.0 <= expiry + 1.0,
            "upgrade signed {:.0} s before its credentials expire: {upgrade}",
            expiry - signed
        );
    }
    eprintln!(
        "expired: {} upgrades, {in_outage} during the refresh outage, all signed with valid credentials",
        upgrades.len()
    );
    assert_nothing_leaked(&cloud, &daemon);
}

/// The broker refuses the upgrade with 403 and a `Date` 15 minutes ahead of
/// this device's clock (what IoT Core does with a signature dated too far off): one log line
/// says how far off and "fix NTP", and `status` shows `clock_skew_s` until a connect works.
#[test]
fn a_refused_upgrade_from_a_clock_far_off_is_diagnosed() {
    let cloud = Cloud::start();
    let ws = cloud.start_ws_proxy();
    ws.set_mode("refuse403 900");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = cloud.config(dir.path(), true, "");
    harness::rewrite_config(
        &config,
        &[(
            &format!("wss://127.0.0.1:{}/mqtt", harness::WSS_PORT),
            &ws.url(),
        )],
    );
    let daemon = cloud.start_daemon(&config);
    let status = daemon.wait_status("skew shown", WAIT, |s| !s["clock_skew_s"].is_null());
    let skew = status["clock_skew_s"].as_i64().expect("clock_skew_s");
    assert!((895..=905).contains(&skew), "{status}");
    // Several refused attempts, one line.
    let refused = Instant::now();
    while ws.upgrades().len() < 3 {
        assert!(refused.elapsed() < WAIT, "the daemon stopped retrying");
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = daemon.log_text();
    assert_eq!(count(&log, "fix NTP"), 1, "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("fix NTP"))
        .unwrap_or_default();
    assert!(line.contains("s behind the server"), "{line}");

    ws.set_mode("pass");
    let status = daemon.wait_status("connected", WAIT, |s| s["state"] == "connected");
    assert!(status["clock_skew_s"].is_null(), "{status}");
}

fn now_epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}
