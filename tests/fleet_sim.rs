//! Fleet simulation: N daemons of one self-register stack, started together in one
//! network namespace against one moto and one mosquitto, behind tests/support/cognito_proxy.py,
//! which plays the template's pre-sign-up trigger and enforces Cognito's default per-API quotas
//! divided by a scale (answering TooManyRequestsException beyond them). Each daemon has its
//! own state dir, socket and device name.
//!
//! `cargo test --test fleet_sim` runs the smoke variant (5 devices; part of `make test`);
//! `make fleet-sim` runs 100 with the release binary and writes target/fleet-sim/report.json
//! and .png (docs/benchmarks.md). Environment: FLEET_SIM_DEVICES, FLEET_SIM_RATE_SCALE,
//! FLEET_SIM_OUT (report dir), IOT_COGNITO_RELAY_TEST_BINARY (the daemon binary).
//!
//! Shown: all N register and connect; N distinct identity ids, which are the client ids the
//! broker saw; no client takeover in the broker's log; each device's message only under its
//! own prefix; a restarted device reuses its user (no second SignUp); a revoked device stops
//! and the others do not. Measured: time until all are connected, API calls per device,
//! throttled calls, the sum of RSS, connected devices over time.

mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use harness::{Cloud, Daemon, Subscriber};
use serde_json::{Value, json};

const DEFAULT_DEVICES: usize = 5;
/// Cognito's default quotas per second (docs/operations.md), divided by the scale.
const QUOTAS: [(&str, f64); 4] = [
    ("SignUp", 50.0),
    ("InitiateAuth", 120.0),
    ("GetId", 25.0),
    ("GetCredentialsForIdentity", 200.0),
];
const DEFAULT_RATE_SCALE: f64 = 10.0;
/// How long all may take to connect: a base plus a share per device.
const CONNECT_BASE: Duration = Duration::from_secs(90);
const CONNECT_PER_DEVICE: Duration = Duration::from_secs(3);
/// A revoked device meets its next refresh within moto's 90 s credential half-life.
const NEXT_REFRESH: Duration = Duration::from_secs(100);
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// A device reconnecting with refreshed credentials is back within this.
const RECONNECT: Duration = Duration::from_secs(15);
const TOPIC: &str = "sim/hello";

struct Device {
    name: String,
    _dir: tempfile::TempDir,
    daemon: Daemon,
}

fn env_or<T: FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn send(daemon: &Daemon, payload: &str) {
    let mut app = daemon.connect();
    app.send_line(&format!(
        r#"{{"topic": "{TOPIC}", "payload": {payload:?}, "id": 1}}"#
    ));
    let answer = app.read_answer(Duration::from_secs(10)).expect("answer");
    assert_eq!(answer["ok"], true, "{answer}");
}

/// Connected devices over time: now, and at least once (credential refreshes reconnect, so
/// "all connected at one instant" would measure moto's 90-second credentials, not onboarding).
struct Sampler {
    started: Instant,
    last: Option<Instant>,
    first_connected: Vec<Option<f64>>,
    timeline: Vec<(f64, usize, usize)>,
}

impl Sampler {
    fn new(count: usize) -> Sampler {
        Sampler {
            started: Instant::now(),
            last: None,
            first_connected: vec![None; count],
            timeline: vec![(0.0, 0, 0)],
        }
    }

    /// Samples the started devices unless the last sample is recent.
    fn sample(&mut self, devices: &[Device]) {
        if self.last.is_some_and(|at| at.elapsed() < SAMPLE_EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        let now = self.started.elapsed().as_secs_f64();
        let mut connected = 0;
        for (i, device) in devices.iter().enumerate() {
            if device.daemon.status()["state"] == "connected" {
                connected += 1;
                self.first_connected[i].get_or_insert(now);
            }
        }
        let ever = self.first_connected.iter().flatten().count();
        self.timeline.push((now, connected, ever));
    }

    fn all_have_connected(&self) -> bool {
        self.first_connected.iter().all(Option::is_some)
    }
}

/// Starts every daemon (one after the other, as fast as their sockets appear); each gets one
/// message to relay, spooled until it is connected.
fn start_all(cloud: &Cloud, count: usize, sampler: &mut Sampler) -> Vec<Device> {
    let mut devices = Vec::with_capacity(count);
    for i in 0..count {
        let name = format!("sim-{i:04}");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = cloud.config(dir.path(), true, "");
        let text = std::fs::read_to_string(&config).expect("config");
        let text = text.replacen(
            "[identity]\n",
            &format!("[identity]\ndevice_name = {name:?}\n"),
            1,
        );
        // Quiet logs: 100 daemons at debug level would measure the logging.
        let text = text.replace("level = \"debug\"", "level = \"info\"");
        std::fs::write(&config, text).expect("config");
        let daemon = cloud.start_daemon(&config);
        send(&daemon, &name);
        devices.push(Device {
            name,
            _dir: dir,
            daemon,
        });
        sampler.sample(&devices);
    }
    devices
}

/// Samples until every device has connected at least once.
fn wait_all_connected(devices: &[Device], sampler: &mut Sampler) {
    let deadline = sampler.started + CONNECT_BASE + CONNECT_PER_DEVICE * devices.len() as u32;
    loop {
        sampler.sample(devices);
        if sampler.all_have_connected() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not all connected; timeline {:?}\nfirst never connected: {}",
            sampler.timeline,
            devices
                .iter()
                .zip(&sampler.first_connected)
                .find(|(_, first)| first.is_none())
                .map(|(d, _)| d.daemon.log_text())
                .unwrap_or_default()
        );
        std::thread::sleep(SAMPLE_EVERY / 5);
    }
}

/// Identity ids per device name: all distinct, each the client id the broker saw, and no
/// connection taken over by another with the same client id.
fn check_identities(cloud: &Cloud, devices: &[Device]) -> BTreeMap<String, String> {
    let mut ids = BTreeMap::new();
    for device in devices {
        let status = device.daemon.status();
        assert_eq!(status["registration_mode"], "self-register", "{status}");
        assert_eq!(status["device_name"], device.name.as_str(), "{status}");
        let id = status["identity_id"]
            .as_str()
            .expect("identity id")
            .to_owned();
        ids.insert(device.name.clone(), id);
    }
    let distinct: BTreeSet<&String> = ids.values().collect();
    assert_eq!(
        distinct.len(),
        devices.len(),
        "identity ids are not distinct"
    );
    let broker = cloud.broker_log();
    for id in ids.values() {
        assert!(
            broker.contains(&format!(" as {id} ")),
            "client id {id} never connected"
        );
    }
    assert!(
        !broker.contains("already connected"),
        "a client took over another's connection:\n{}",
        broker
            .lines()
            .filter(|l| l.contains("already connected"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    ids
}

/// Each device's message arrived once, under its own prefix only.
fn check_messages(cloud: &Cloud, subscriber: &mut Subscriber, ids: &BTreeMap<String, String>) {
    let pool = &cloud.account.identity_pool_id;
    let received = subscriber.collect_until(Duration::from_secs(60), |r| {
        r.iter().filter(|m| m.topic.ends_with(TOPIC)).count() >= ids.len()
    });
    let mut seen = BTreeSet::new();
    for message in received.iter().filter(|m| m.topic.ends_with(TOPIC)) {
        let id = ids
            .get(&message.payload)
            .expect("a device's name as payload");
        assert_eq!(
            message.topic,
            format!("{pool}/{id}/{TOPIC}"),
            "{}",
            message.payload
        );
        assert!(
            seen.insert(message.payload.clone()),
            "{} twice",
            message.payload
        );
    }
    assert_eq!(seen.len(), ids.len());
}

/// Calls per API (ok and throttled) from the Cognito proxy's log; InitiateAuth by flow.
fn call_counts(cloud: &Cloud) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let (mut all, mut throttled) = (BTreeMap::new(), BTreeMap::new());
    for call in cloud.cognito().calls() {
        let mut op = call["op"].as_str().unwrap_or("?").to_owned();
        if let Some(flow) = call["flow"].as_str() {
            op = format!("{op} {flow}");
        }
        if call["result"] == "throttled" {
            *throttled.entry(op.clone()).or_insert(0) += 1;
        }
        *all.entry(op).or_insert(0) += 1;
    }
    (all, throttled)
}

/// A restarted device signs in as the user it registered: same identity, no SignUp.
fn check_restart(cloud: &Cloud, devices: &mut [Device], ids: &BTreeMap<String, String>) -> f64 {
    let signups = cloud.cognito().count("SignUp", "ok");
    let device = &mut devices[0];
    assert!(
        device.daemon.stop().success(),
        "{}",
        device.daemon.log_text()
    );
    let config = device.daemon.socket.with_file_name("config.toml");
    let started = Instant::now();
    device.daemon = cloud.start_daemon(&config);
    let status = device
        .daemon
        .wait_status("restarted", Duration::from_secs(60), |s| {
            s["state"] == "connected"
        });
    let took = started.elapsed().as_secs_f64();
    assert_eq!(
        status["identity_id"].as_str(),
        ids.get(&device.name).map(String::as_str)
    );
    assert_eq!(
        cloud.cognito().count("SignUp", "ok"),
        signups,
        "a second SignUp"
    );
    took
}

/// Revokes one device: it stops at its next refresh, every other stays connected.
fn check_revocation(cloud: &Cloud, devices: &[Device]) -> f64 {
    let revoked = &devices[1];
    let started = Instant::now();
    cloud.revoke_device(&revoked.name);
    revoked
        .daemon
        .wait_status("the revoked device stopped", NEXT_REFRESH, |s| {
            s["state"] != "connected"
                && s["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("refused this device's user"))
        });
    let took = started.elapsed().as_secs_f64();
    // The others stay connected (a sample may catch one reconnecting with refreshed
    // credentials: moto's live 90 s) and none was refused.
    for device in devices.iter().filter(|d| d.name != revoked.name) {
        let status = device
            .daemon
            .wait_status(&device.name, RECONNECT, |s| s["state"] == "connected");
        assert_eq!(
            status["last_error"],
            Value::Null,
            "{}: {status}",
            device.name
        );
    }
    took
}

fn write_report(report: &Value) {
    let out =
        PathBuf::from(std::env::var("FLEET_SIM_OUT").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/target/fleet-sim").to_owned()
        }));
    std::fs::create_dir_all(&out).expect("report dir");
    let path = out.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(report).expect("json")).expect("report");
    eprintln!("fleet-sim report: {}", path.display());
}

#[test]
fn fleet_of_daemons_registers_connects_and_is_revoked_one_by_one() {
    let count: usize = env_or("FLEET_SIM_DEVICES", DEFAULT_DEVICES).max(2);
    let scale: f64 = env_or("FLEET_SIM_RATE_SCALE", DEFAULT_RATE_SCALE);
    let rates: Vec<String> = QUOTAS
        .iter()
        .map(|(op, quota)| format!("{op}={}", quota / scale))
        .collect();
    let cloud = Cloud::start_fleet(&rates.join(","));
    let mut subscriber = cloud.subscribe();
    let mut sampler = Sampler::new(count);
    let mut devices = start_all(&cloud, count, &mut sampler);
    let all_started_s = sampler.started.elapsed().as_secs_f64();
    wait_all_connected(&devices, &mut sampler);
    let first_connected: Vec<f64> = sampler.first_connected.iter().flatten().copied().collect();
    let all_connected_s = first_connected.iter().copied().fold(0.0, f64::max);
    let ids = check_identities(&cloud, &devices);
    check_messages(&cloud, &mut subscriber, &ids);
    let (calls, throttled) = call_counts(&cloud);
    assert_eq!(cloud.cognito().count("SignUp", "ok"), count);
    // One password sign-in per device: a retry after a throttled GetId reuses its tokens.
    let password_sign_ins = cloud
        .cognito()
        .calls()
        .iter()
        .filter(|c| c["flow"] == "USER_PASSWORD_AUTH" && c["result"] == "ok")
        .count();
    assert_eq!(password_sign_ins, count, "{calls:?}");
    let rss_kib: u64 = devices
        .iter()
        .map(|d| harness::rss_kib(d.daemon.pid()))
        .sum();
    let peak_kib: u64 = devices
        .iter()
        .map(|d| harness::peak_rss_kib(d.daemon.pid()))
        .sum();
    let restart_s = check_restart(&cloud, &mut devices, &ids);
    let revocation_s = check_revocation(&cloud, &devices);

    let per_device: BTreeMap<&String, f64> = calls
        .iter()
        .map(|(op, n)| (op, *n as f64 / count as f64))
        .collect();
    let report = json!({
        "devices": count,
        "binary": harness::daemon_binary(),
        "rate_scale": scale,
        "rates_per_s": rates,
        "all_started_s": all_started_s,
        "all_connected_s": all_connected_s,
        "timeline": sampler.timeline,
        "first_connected_s": first_connected,
        "calls_total": calls,
        "calls_per_device": per_device,
        "throttled": throttled,
        "throttled_total": throttled.values().sum::<u64>(),
        "rss_sum_mib": rss_kib as f64 / 1024.0,
        "peak_rss_sum_mib": peak_kib as f64 / 1024.0,
        "restart_to_connected_s": restart_s,
        "revocation_to_stopped_s": revocation_s,
    });
    eprintln!("{}", serde_json::to_string_pretty(&report).expect("json"));
    write_report(&report);
}
