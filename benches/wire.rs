//! Wire benchmark: what the daemon costs on a metered (cellular) link, in IP bytes and in
//! IoT Core messages.
//!
//! One emulated cloud (moto behind tests/support/fault_proxy.py, which makes credentials live
//! one hour like Cognito's instead of moto's 90 s, and mosquitto over wss behind
//! tests/support/ws_proxy.py, which answers mosquitto's own websocket pings, see below) in its namespace;
//! each case's daemon in its own "device" namespace, joined to the cloud's by a veth pair
//! (tests/harness/link.rs), so every byte the daemon exchanges with the cloud crosses that
//! link. All cases run at the same time, for one window (`WIRE_BENCH_SECONDS`, 3600 s under
//! `--bench`), measured once every daemon is connected and its traffic has gone quiet; the
//! onboarding before that is reported apart as startup. Per case:
//! - IP bytes up and down: the device end's interface counters less 14 bytes of Ethernet
//!   header per frame (the link carries no ARP and no IPv6, and one MSS per packet);
//! - TCP payload bytes per remote port, AWS API (the proxy) and MQTT (wss), from
//!   benches/python/tcp_payload.py sniffing the same interface, and the daemon's own
//!   `bytes_sent_total`/`bytes_received_total` against them (within 10 %, when it has them);
//! - readings written, and what a subscriber on the broker's plain listener saw: publishes,
//!   readings in them, and IoT Core's billed messages (a PUBLISH per 5 KB of payload + topic,
//!   rounded up; each CONNECT and SUBSCRIBE one; pings free), per 1,000 readings;
//! - MB per device-month: the window's IP bytes scaled to 30 days.
//!
//! Cases: idle, a reading a minute, a reading a second, and a reading a second batched into
//! arrays that fill one 5 KB billing unit, each with the default settings and with "cellular"
//! ones (`keep_alive = "10m"`, `identity.refresh = "on-demand"`: the profile docs/configuration.md
//! recommends, less its batching and health reports).
//!
//! mosquitto's libwebsockets sends every client a websocket PING every 300 s (its default
//! validity check; the client's PONG follows), 12 exchanges an hour that IoT Core does not
//! document (its idle check is the MQTT keep-alive: AWS IoT Core endpoints and quotas, message
//! broker limits), and that an idle cellular device would otherwise spend two thirds of its bytes
//! on. So the daemons reach the broker through ws_proxy.py, which answers those pings itself;
//! `WIRE_BENCH_BROKER_PINGS=1` connects them to mosquitto directly, as the first runs did.
//!
//! Environment: `WIRE_BENCH_SECONDS` (the window), `WIRE_BENCH_BINARY` (the daemon to measure,
//! e.g. an older commit's release binary; default this checkout's), `WIRE_BENCH_LEGACY=1`
//! (leave out `identity.refresh`, which an older binary refuses; also left out when the
//! binary's `check-config` does not know it), `WIRE_BENCH_OUT` (the output directory, default
//! `target/wire-bench`, to run before and after side by side). Writes `results.json` there.
//!
//! Run: `make bench-wire` (root; `cargo bench --profile release --bench wire`). Under `cargo test`
//! it is a short smoke run of two cases that checks the tool works and its numbers are sane.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};

#[path = "../tests/harness/mod.rs"]
mod harness;

use harness::{
    CLOUD_LINK_IP, Cloud, DEVICE_LINK_IFACE, DeviceLink, FAULT_PROXY_PORT, FaultProxy, KillOnDrop,
    LinkCounters, MQTT_PORT, WS_PROXY_PORT, WSS_PORT,
};

/// IoT Core meters a PUBLISH in units of 5 KB of payload plus topic, rounded up.
const BILLING_UNIT: u64 = 5 * 1024;
/// Room left in a batch's 5 KB unit for its topic (`<pool id>/<identity id>/wire/<case>`,
/// about 125 bytes).
const TOPIC_ALLOWANCE: u64 = 160;
const MONTH_SECONDS: f64 = 30.0 * 86_400.0;
/// The daemon's counters and the capture must agree this closely (what docs promise)...
const AGREEMENT: f64 = 0.10;
/// ...give or take what may be in flight at a snapshot (a ping and its answer).
const AGREEMENT_SLACK: u64 = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(120);
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

fn main() {
    let plan = Plan::from_env();
    let out_dir = std::env::var_os("WIRE_BENCH_OUT").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/wire-bench"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&out_dir).expect("output dir");

    let cloud = Cloud::start();
    let proxy = cloud.start_fault_proxy_on("0.0.0.0");
    proxy.set_mode("pass lifetime=3600");
    let front = (!broker_pings_passed()).then(|| cloud.start_ws_proxy_on("0.0.0.0", true));
    // The subscriber reaches the broker's plain listener on the cloud's loopback; the daemons
    // and the capture are placed in their namespaces explicitly.
    cloud.namespace.enter();
    let subscriber = Subscriber::start();
    let options = Options {
        refresh_key: refresh_key_known(&plan.binary, &cloud),
        binary: plan.binary.clone(),
    };
    println!(
        "wire bench: {} cases, {} s window, daemon {}{}",
        plan.cases.len(),
        plan.seconds,
        options.binary.display(),
        if options.refresh_key {
            ""
        } else {
            " (identity.refresh left out)"
        },
    );

    let mut devices: Vec<Device> = (plan.cases.iter().enumerate())
        .map(|(i, case)| Device::start(&cloud, i as u8, *case, &options))
        .collect();
    for device in &mut devices {
        device.wait_connected();
    }
    let settled = settle(&mut devices, plan.quiet);
    let results = measure(
        &mut devices,
        &cloud,
        &proxy,
        &subscriber,
        plan.seconds,
        &settled,
    );

    let report = json!({
        "date": humantime::format_rfc3339_seconds(SystemTime::now()).to_string()[..10],
        "window_s": plan.seconds,
        "binary": options.binary.display().to_string(),
        "identity_refresh_key": options.refresh_key,
        "billing_unit_bytes": BILLING_UNIT,
        "broker_websocket_pings": if front.is_some() { "answered by ws_proxy.py" } else { "passed to the devices" },
        "broker_pings_answered": front.as_ref().map(|f| {
            f.upgrades().iter().filter(|line| line["broker_ping"] == true).count()
        }),
        "cases": results,
    });
    save_logs(&out_dir, &cloud, &devices);
    let path = out_dir.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report).expect("json"))
        .expect("write results");
    print_table(&results);
    println!("results: {}", path.display());
    check(&results);
}

/// How big a run is: `cargo bench` (full) or `cargo test` (smoke), and what it measures.
struct Plan {
    seconds: u64,
    cases: Vec<Case>,
    binary: PathBuf,
    /// How long every device must have been silent before the window starts.
    quiet: Duration,
}

impl Plan {
    fn from_env() -> Plan {
        let full = std::env::args().any(|a| a == "--bench");
        let seconds = std::env::var("WIRE_BENCH_SECONDS")
            .ok()
            .map(|s| s.parse().expect("WIRE_BENCH_SECONDS: a number of seconds"))
            .unwrap_or(if full { 3600 } else { 10 });
        let binary = std::env::var_os("WIRE_BENCH_BINARY").map_or_else(
            || env!("CARGO_BIN_EXE_iot-cognito-relay").into(),
            PathBuf::from,
        );
        let cases = if full {
            Case::all()
        } else {
            // One case with MQTT traffic for the counters' check, one with the cellular settings.
            vec![
                Case::new(Workload::PerSecond, Settings::Default),
                Case::new(Workload::Idle, Settings::Cellular),
            ]
        };
        let quiet = Duration::from_secs(if full { 5 } else { 2 });
        Plan {
            seconds,
            cases,
            binary,
            quiet,
        }
    }
}

/// The logs behind the figures, for a look at traffic nobody expected (no secrets in either:
/// docs/design.md, "Never logged").
fn save_logs(out_dir: &Path, cloud: &Cloud, devices: &[Device]) {
    let logs = out_dir.join("logs");
    std::fs::create_dir_all(&logs).expect("logs dir");
    std::fs::write(logs.join("mosquitto.log"), cloud.broker_log()).expect("broker log");
    for device in devices {
        let name = device.case.topic().replace("wire/", "daemon-") + ".log";
        let _ = std::fs::copy(device.dir.path().join("daemon.log"), logs.join(name));
    }
}

/// What a device does during the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    Idle,
    PerMinute,
    PerSecond,
    /// A reading a second, published in arrays that fill one billing unit.
    PerSecondBatched,
}

/// The daemon's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settings {
    Default,
    /// For a metered link: the longest keep-alive IoT Core allows, credentials refreshed only
    /// when a connection or an AWS call needs them.
    Cellular,
}

#[derive(Debug, Clone, Copy)]
struct Case {
    workload: Workload,
    settings: Settings,
}

impl Case {
    fn new(workload: Workload, settings: Settings) -> Case {
        Case { workload, settings }
    }

    fn all() -> Vec<Case> {
        let workloads = [
            Workload::Idle,
            Workload::PerMinute,
            Workload::PerSecond,
            Workload::PerSecondBatched,
        ];
        let settings = [Settings::Default, Settings::Cellular];
        workloads
            .iter()
            .flat_map(|w| settings.iter().map(|s| Case::new(*w, *s)))
            .collect()
    }

    fn workload_name(&self) -> &'static str {
        match self.workload {
            Workload::Idle => "idle",
            Workload::PerMinute => "1/min",
            Workload::PerSecond => "1/s",
            Workload::PerSecondBatched => "1/s batched",
        }
    }

    fn settings_name(&self) -> &'static str {
        match self.settings {
            Settings::Default => "default",
            Settings::Cellular => "cellular",
        }
    }

    fn name(&self) -> String {
        format!("{} {}", self.workload_name(), self.settings_name())
    }

    /// The relative topic its readings go to: one per case, so the subscriber tells them apart.
    fn topic(&self) -> String {
        let slug: String = self
            .name()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        format!("wire/{}", slug.replace("--", "-"))
    }

    fn interval(&self) -> Option<Duration> {
        match self.workload {
            Workload::Idle => None,
            Workload::PerMinute => Some(Duration::from_secs(60)),
            Workload::PerSecond | Workload::PerSecondBatched => Some(Duration::from_secs(1)),
        }
    }

    /// The config keys that differ between cases.
    fn config_extra(&self, refresh_key: bool) -> ConfigExtra {
        let mut extra = ConfigExtra::default();
        if self.settings == Settings::Cellular {
            if refresh_key {
                extra.identity.push_str("refresh = \"on-demand\"\n");
            }
            extra.mqtt.push_str("keep_alive = \"10m\"\n");
        }
        if self.workload == Workload::PerSecondBatched {
            // 100 readings of ~45 bytes (~4.6 KB) fill a unit within its bytes; the linger
            // outlasts the 100 s they take to arrive.
            extra.sections.push_str(&format!(
                "[batch]\nmax_messages = 100\nmax_bytes = {}\nlinger = \"150s\"\n",
                BILLING_UNIT - TOPIC_ALLOWANCE
            ));
        }
        extra
    }
}

/// Lines added to `[identity]` and `[mqtt]`, and whole sections.
#[derive(Default)]
struct ConfigExtra {
    identity: String,
    mqtt: String,
    sections: String,
}

/// How every daemon is run.
struct Options {
    binary: PathBuf,
    /// Whether the binary knows `identity.refresh` (and `WIRE_BENCH_LEGACY` is not set).
    refresh_key: bool,
}

/// `WIRE_BENCH_BROKER_PINGS=1`: the daemons talk to mosquitto directly and get its websocket pings.
fn broker_pings_passed() -> bool {
    std::env::var("WIRE_BENCH_BROKER_PINGS").is_ok_and(|v| v == "1")
}

/// The port the daemons' MQTT connections go to on the cloud's end of the link.
fn mqtt_port() -> u16 {
    if broker_pings_passed() {
        WSS_PORT
    } else {
        WS_PROXY_PORT
    }
}

/// Whether `binary` accepts `identity.refresh`: unknown keys are config errors, so an older
/// binary must be given a config without it.
fn refresh_key_known(binary: &Path, cloud: &Cloud) -> bool {
    if std::env::var("WIRE_BENCH_LEGACY").is_ok_and(|v| v == "1") {
        return false;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        cloud,
        &Case::new(Workload::Idle, Settings::Cellular),
        true,
    );
    let output = Command::new(binary)
        .arg("check-config")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run check-config");
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Exit 1: the config is valid, but an installed unit's sandbox would not let the daemon
    // write a path it names (the bench's are temp dirs); exit 2: the config is refused.
    if matches!(output.status.code(), Some(0 | 1)) {
        return true;
    }
    assert!(
        stderr.contains("`refresh`"),
        "check-config refused the bench's config: {stderr}"
    );
    false
}

/// A daemon config pointing at the cloud's end of the link.
fn write_config(dir: &Path, cloud: &Cloud, case: &Case, refresh_key: bool) -> PathBuf {
    let extra = case.config_extra(refresh_key);
    let text = format!(
        "[aws]\nendpoint_url = \"http://{CLOUD_LINK_IP}:{FAULT_PROXY_PORT}\"\n\n\
         [identity]\nidentity_pool_id = {pool:?}\nsecret_id = {secret:?}\n\
         unauth_role_arn = {role:?}\nstart_delay = \"0s\"\n{identity}\n\
         [mqtt]\nurl = \"wss://{CLOUD_LINK_IP}:{port}/mqtt\"\nca_file = {ca:?}\n{mqtt}\n\
         [socket]\npath = {socket:?}\n\n[state]\ndir = {state:?}\n\n\
         [log]\nlevel = \"info\"\n\n{sections}",
        identity = extra.identity,
        port = mqtt_port(),
        mqtt = extra.mqtt,
        sections = extra.sections,
        pool = cloud.account.identity_pool_id,
        secret = cloud.account.secret_id,
        role = cloud.account.unauth_role_arn,
        ca = cloud.ca_file.display().to_string(),
        socket = dir.join("relay.sock").display().to_string(),
        state = dir.join("state").display().to_string(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// One case's daemon in its own namespace, with the capture on its link.
struct Device {
    case: Case,
    // Dropped in this order: the processes, then the namespace they ran in, then their files.
    _daemon: KillOnDrop,
    sniffer: Sniffer,
    link: DeviceLink,
    dir: tempfile::TempDir,
    /// Before the daemon started.
    start: Snapshot,
    /// When its status first said `connected`.
    connected: Option<Instant>,
}

impl Device {
    fn start(cloud: &Cloud, index: u8, case: Case, options: &Options) -> Device {
        let link = DeviceLink::create(&cloud.namespace, index);
        let mut sniffer = Sniffer::start(&link);
        let dir = tempfile::tempdir().expect("tempdir");
        let config = write_config(dir.path(), cloud, &case, options.refresh_key);
        let start = Snapshot::take(&link, &mut sniffer, None);
        let log = std::fs::File::create(dir.path().join("daemon.log")).expect("daemon log");
        let daemon = KillOnDrop(
            link.namespace
                .command(&options.binary)
                .arg("run")
                .arg("--config")
                .arg(&config)
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("HOME", dir.path())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("start the daemon"),
        );
        Device {
            case,
            _daemon: daemon,
            sniffer,
            link,
            dir,
            start,
            connected: None,
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("relay.sock")
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The `status` object; None while the socket does not answer (yet).
    fn status(&self) -> Option<Value> {
        let stream = UnixStream::connect(self.socket()).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        (&stream).write_all(b"{\"op\":\"status\"}\n").ok()?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).ok()?;
        let answer: Value = serde_json::from_str(&line).ok()?;
        Some(answer["status"].clone())
    }

    fn wait_connected(&mut self) {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        loop {
            let status = self.status();
            if status.as_ref().is_some_and(|s| s["state"] == "connected") {
                self.connected = Some(Instant::now());
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} never connected; last status {status:?}; log:\n{}",
                self.case.name(),
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn snapshot(&mut self) -> Snapshot {
        let status = self.status();
        Snapshot::take(&self.link, &mut self.sniffer, status)
    }
}

/// Waits until no device has sent or received anything for `quiet` (the end of
/// onboarding), at most `SETTLE_TIMEOUT`. Returns, per device, whether it went quiet.
fn settle(devices: &mut [Device], quiet: Duration) -> Vec<bool> {
    let started = Instant::now();
    let mut last: Vec<(Traffic, Instant)> = devices
        .iter_mut()
        .map(|d| (d.sniffer.totals(), Instant::now()))
        .collect();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let now = Instant::now();
        for (device, (traffic, changed)) in devices.iter_mut().zip(last.iter_mut()) {
            let current = device.sniffer.totals();
            if current != *traffic {
                *traffic = current;
                *changed = now;
            }
        }
        let settled: Vec<bool> = last.iter().map(|(_, at)| now - *at >= quiet).collect();
        if settled.iter().all(|s| *s) || started.elapsed() > SETTLE_TIMEOUT {
            return settled;
        }
    }
}

/// Everything counted about one device at one moment.
struct Snapshot {
    at: Instant,
    epoch_s: f64,
    link: LinkCounters,
    traffic: Traffic,
    status: Option<Value>,
}

impl Snapshot {
    fn take(link: &DeviceLink, sniffer: &mut Sniffer, status: Option<Value>) -> Snapshot {
        Snapshot {
            at: Instant::now(),
            epoch_s: epoch_s(),
            link: link.counters(),
            traffic: sniffer.totals(),
            status,
        }
    }

    /// A `status` counter; None when the daemon has no such field (an older binary).
    fn counter(&self, name: &str) -> Option<u64> {
        self.status.as_ref().and_then(|s| s[name].as_u64())
    }
}

fn epoch_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The window: the same for every device, all running at once.
fn measure(
    devices: &mut [Device],
    cloud: &Cloud,
    proxy: &FaultProxy,
    subscriber: &Subscriber,
    seconds: u64,
    settled: &[bool],
) -> Vec<Value> {
    let log_start = cloud.broker_log().len();
    let mut begins = Vec::new();
    let mut writers = Vec::new();
    for device in devices.iter_mut() {
        begins.push((device.snapshot(), subscriber.counts(&device.case.topic())));
        writers.push(Writer::start(&device.socket(), &device.case));
    }
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        std::thread::sleep(left.min(Duration::from_secs(300)));
        if !left.is_zero() && seconds >= 600 {
            println!(
                "wire bench: {} s left",
                deadline.saturating_duration_since(Instant::now()).as_secs()
            );
        }
    }
    let written: Vec<u64> = writers.into_iter().map(Writer::finish).collect();
    // The last reading's publish and its PUBACK.
    std::thread::sleep(Duration::from_secs(1));
    let ends: Vec<Snapshot> = devices.iter_mut().map(Device::snapshot).collect();
    let whole_log = cloud.broker_log();
    let startup_log = whole_log.get(..log_start).unwrap_or("");
    let log = whole_log.get(log_start..).unwrap_or("");
    let api_calls = proxy.requests();
    let mut results = Vec::new();
    for (i, (device, end)) in devices.iter().zip(&ends).enumerate() {
        let published = subscriber.counts(&device.case.topic()).since(&begins[i].1);
        let window = Window {
            begin: &begins[i].0,
            end,
            published,
            written: written[i],
            broker: BrokerEvents::count(log, end),
            startup_broker: BrokerEvents::count(startup_log, end),
            api_calls: &api_calls,
            settled: settled[i],
        };
        results.push(window.report(device));
    }
    results
}

/// What one device did in the window, and the numbers it makes.
struct Window<'a> {
    begin: &'a Snapshot,
    end: &'a Snapshot,
    published: TopicCounts,
    written: u64,
    broker: BrokerEvents,
    startup_broker: BrokerEvents,
    api_calls: &'a [Value],
    settled: bool,
}

impl Window<'_> {
    fn report(&self, device: &Device) -> Value {
        let seconds = (self.end.at - self.begin.at).as_secs_f64();
        let link = self.end.link.since(&self.begin.link);
        let traffic = self.end.traffic.since(&self.begin.traffic);
        let month = MONTH_SECONDS / seconds;
        let counter = |name: &str| {
            Some(
                self.end
                    .counter(name)?
                    .saturating_sub(self.begin.counter(name)?),
            )
        };
        let sent = counter("bytes_sent_total");
        let received = counter("bytes_received_total");
        let billed = self.published.units + self.broker.connects + self.broker.subscribes;
        let per_1000 = (self.published.readings > 0)
            .then(|| billed as f64 * 1000.0 / self.published.readings as f64);
        let startup = self.begin.link.since(&device.start.link);
        let startup_traffic = self.begin.traffic.since(&device.start.traffic);
        json!({
            "case": device.case.name(),
            "workload": device.case.workload_name(),
            "settings": device.case.settings_name(),
            "topic": device.case.topic(),
            "window_s": round(seconds, 1),
            "settled_before_window": self.settled,
            "ip_bytes": {"up": link.ip_up(), "down": link.ip_down()},
            "ip_packets": {"up": link.tx_packets, "down": link.rx_packets},
            "tcp_payload": traffic.payload_json(),
            "tcp_connections": {"api": traffic.syn(API), "mqtt": traffic.syn(MQTT)},
            "capture": {"non_ip_frames": traffic.non_ip_frames, "dropped": traffic.dropped},
            "api_calls": api_calls(self.api_calls, &device.link.device_ip, self.begin, self.end),
            "daemon": {
                "bytes_sent": sent,
                "bytes_received": received,
                "reconnects": counter("reconnects_total"),
            },
            "agreement": agreement(sent, received, &traffic),
            "mb_per_device_month": round((link.ip_up() + link.ip_down()) as f64 * month / 1e6, 3),
            "readings": {"written": self.written, "delivered": self.published.readings},
            "broker": {
                "publishes": self.published.publishes,
                "payload_bytes": self.published.payload_bytes,
                "publish_units": self.published.units,
                "connects": self.broker.connects,
                "subscribes": self.broker.subscribes,
                "pings": self.broker.pings,
            },
            "billed": {
                "messages": billed,
                "per_1000_readings": per_1000.map(|v| round(v, 2)),
                "per_device_month": round(billed as f64 * month, 0),
            },
            "startup": {
                "connected_after_s": device
                    .connected
                    .map(|at| round((at - device.start.at).as_secs_f64(), 1)),
                "window_after_s": round((self.begin.at - device.start.at).as_secs_f64(), 1),
                "connects": self.startup_broker.connects,
                "subscribes": self.startup_broker.subscribes,
                "ip_bytes": {"up": startup.ip_up(), "down": startup.ip_down()},
                "tcp_payload": startup_traffic.payload_json(),
                "api_calls": api_calls(self.api_calls, &device.link.device_ip, &device.start, self.begin),
            },
        })
    }
}

/// The daemon's MQTT byte counters against the captured TCP payload of its MQTT connections:
/// null when the daemon has no counters.
fn agreement(sent: Option<u64>, received: Option<u64>, traffic: &Traffic) -> Value {
    let (Some(sent), Some(received)) = (sent, received) else {
        return Value::Null;
    };
    let captured = (traffic.up[MQTT].payload, traffic.down[MQTT].payload);
    let close = |ours: u64, theirs: u64| {
        ours.abs_diff(theirs) as f64
            <= (AGREEMENT * ours.max(theirs) as f64).max(AGREEMENT_SLACK as f64)
    };
    let ratio =
        |ours: u64, theirs: u64| (theirs > 0).then(|| round(ours as f64 / theirs as f64, 3));
    json!({
        "sent_over_captured": ratio(sent, captured.0),
        "received_over_captured": ratio(received, captured.1),
        "ok": close(sent, captured.0) && close(received, captured.1),
    })
}

/// The proxy's log of AWS calls from `device_ip` between two snapshots, by operation.
fn api_calls(
    log: &[Value],
    device_ip: &str,
    from: &Snapshot,
    to: &Snapshot,
) -> BTreeMap<String, u64> {
    let mut calls = BTreeMap::new();
    for entry in log {
        let t = entry["t"].as_f64().unwrap_or(0.0);
        if entry["client"] != device_ip || t < from.epoch_s || t >= to.epoch_s {
            continue;
        }
        let target = entry["target"].as_str().unwrap_or("?");
        // "AWSCognitoIdentityService.GetId" → "GetId"; REST paths (IoT) by their first part;
        // STS (a form POST to "/") stays "/".
        let name = match target.rsplit_once('.') {
            Some((_, operation)) if !target.starts_with('/') => operation.to_owned(),
            _ => format!(
                "/{}",
                target
                    .trim_start_matches('/')
                    .split('/')
                    .next()
                    .unwrap_or("")
            ),
        };
        *calls.entry(name).or_insert(0) += 1;
    }
    calls
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

/// MQTT packets the broker logged for one device.
#[derive(Debug, Default)]
struct BrokerEvents {
    connects: u64,
    subscribes: u64,
    pings: u64,
}

impl BrokerEvents {
    /// Counts in `log` (the window's part of the broker's log) by the device's client id (the
    /// identity id, from its status): through ws_proxy.py every client comes from loopback.
    fn count(log: &str, end: &Snapshot) -> BrokerEvents {
        let client = end
            .status
            .as_ref()
            .and_then(|s| s["identity_id"].as_str())
            .unwrap_or("?");
        let from = |line: &str, packet: &str| {
            let marker = format!("Received {packet} from {client}");
            line.split_once(&marker)
                .is_some_and(|(_, after)| after.is_empty() || after.starts_with(' '))
        };
        // "New client connected from <address>:<port> as <client id> (p2, c0, k30)."
        let connected = format!(" as {client} (");
        let mut events = BrokerEvents::default();
        for line in log.lines() {
            events.connects +=
                u64::from(line.contains("New client connected from ") && line.contains(&connected));
            events.subscribes += u64::from(from(line, "SUBSCRIBE"));
            events.pings += u64::from(from(line, "PINGREQ"));
        }
        events
    }
}

/// Index of a remote port's class in [`Traffic`].
const API: usize = 0;
const MQTT: usize = 1;
const CLASSES: [&str; 3] = ["api", "mqtt", "other"];

/// TCP packets of one direction and port class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Flow {
    packets: u64,
    ip_bytes: u64,
    payload: u64,
    syn: u64,
}

/// The capture's totals (benches/python/tcp_payload.py).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Traffic {
    up: [Flow; 3],
    down: [Flow; 3],
    non_ip_frames: u64,
    dropped: u64,
}

impl Traffic {
    fn parse(value: &Value) -> Traffic {
        let flows = |direction: &str| {
            CLASSES.map(|class| {
                let flow = &value[direction][class];
                let field = |name: &str| flow[name].as_u64().unwrap_or(0);
                Flow {
                    packets: field("packets"),
                    ip_bytes: field("ip_bytes"),
                    payload: field("payload"),
                    syn: field("syn"),
                }
            })
        };
        Traffic {
            up: flows("up"),
            down: flows("down"),
            non_ip_frames: value["non_ip"]["frames"].as_u64().unwrap_or(0),
            dropped: value["dropped"].as_u64().unwrap_or(0),
        }
    }

    fn since(&self, earlier: &Traffic) -> Traffic {
        let minus = |a: &[Flow; 3], b: &[Flow; 3]| {
            std::array::from_fn(|i| Flow {
                packets: a[i].packets.saturating_sub(b[i].packets),
                ip_bytes: a[i].ip_bytes.saturating_sub(b[i].ip_bytes),
                payload: a[i].payload.saturating_sub(b[i].payload),
                syn: a[i].syn.saturating_sub(b[i].syn),
            })
        };
        Traffic {
            up: minus(&self.up, &earlier.up),
            down: minus(&self.down, &earlier.down),
            non_ip_frames: self.non_ip_frames.saturating_sub(earlier.non_ip_frames),
            dropped: self.dropped.saturating_sub(earlier.dropped),
        }
    }

    /// Connections the device opened to that class of port.
    fn syn(&self, class: usize) -> u64 {
        self.up[class].syn
    }

    fn payload_json(&self) -> Value {
        let mut classes = serde_json::Map::new();
        for (i, class) in CLASSES.iter().enumerate() {
            classes.insert(
                (*class).to_owned(),
                json!({"up": self.up[i].payload, "down": self.down[i].payload}),
            );
        }
        Value::Object(classes)
    }
}

/// benches/python/tcp_payload.py on a device's end of its link.
struct Sniffer {
    _process: KillOnDrop,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl Sniffer {
    fn start(link: &DeviceLink) -> Sniffer {
        let mut child = link
            .namespace
            .command(harness::python())
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/python/tcp_payload.py"))
            .args(["--iface", DEVICE_LINK_IFACE, "--local", &link.device_ip])
            .arg(format!("--port=api={FAULT_PROXY_PORT}"))
            .arg(format!("--port=mqtt={}", mqtt_port()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start benches/python/tcp_payload.py");
        let input = child.stdin.take().expect("stdin");
        let mut output = BufReader::new(child.stdout.take().expect("stdout"));
        let mut ready = String::new();
        output.read_line(&mut ready).expect("sniffer output");
        assert_eq!(ready.trim(), "ready", "tcp_payload.py did not start");
        Sniffer {
            _process: KillOnDrop(child),
            input,
            output,
        }
    }

    fn totals(&mut self) -> Traffic {
        writeln!(self.input, "totals").expect("ask the sniffer");
        let mut line = String::new();
        self.output.read_line(&mut line).expect("sniffer answer");
        Traffic::parse(&serde_json::from_str(&line).expect("sniffer JSON"))
    }
}

/// A local app writing readings at the case's pace through the daemon's socket, from the
/// start of the window. Each reading has an `id` and the app waits for its answer, as
/// `iot-cognito-relay send` does; only readings answered `ok` count as written.
struct Writer {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<u64>>,
}

impl Writer {
    fn start(socket: &Path, case: &Case) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let Some(interval) = case.interval() else {
            return Writer { stop, handle: None };
        };
        let (socket, topic, stopped) = (socket.to_owned(), case.topic(), stop.clone());
        let handle = std::thread::spawn(move || {
            let start = Instant::now();
            let mut app: Option<App> = None;
            let (mut n, mut written) = (0u64, 0u64);
            while !stopped.load(Ordering::SeqCst) {
                let due = start + interval * n as u32;
                if Instant::now() < due {
                    let left = due - Instant::now();
                    std::thread::sleep(left.min(Duration::from_millis(200)));
                    continue;
                }
                let line = format!(
                    "{{\"topic\":\"{topic}\",\"id\":{n},\"payload\":\
                     {{\"n\":{n},\"t\":21.5,\"h\":40.1,\"ts\":{}}}}}\n",
                    epoch_s() as u64
                );
                n += 1;
                match app.take().or_else(|| App::connect(&socket)) {
                    Some(mut connected) => match connected.send(&line) {
                        Some(ok) => {
                            written += u64::from(ok);
                            // The daemon closes a connection silent for a minute
                            // (socket.idle_timeout): an app writing once a minute
                            // connects each time.
                            if interval < Duration::from_secs(30) {
                                app = Some(connected);
                            }
                        }
                        None => eprintln!("wire bench: {topic}: no answer; reconnecting"),
                    },
                    None => eprintln!("wire bench: {topic}: cannot connect to the daemon"),
                }
            }
            written
        });
        Writer {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops writing; returns the readings answered `ok`.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.take().map_or(0, |h| h.join().expect("writer"))
    }
}

/// One connection of a local app to the daemon's socket.
struct App {
    stream: UnixStream,
    answers: BufReader<UnixStream>,
}

impl App {
    fn connect(socket: &Path) -> Option<App> {
        let stream = UnixStream::connect(socket).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        let answers = BufReader::new(stream.try_clone().ok()?);
        Some(App { stream, answers })
    }

    /// Writes one line and reads its answer: whether it was `ok`; None when the connection
    /// failed.
    fn send(&mut self, line: &str) -> Option<bool> {
        self.stream.write_all(line.as_bytes()).ok()?;
        let mut answer = String::new();
        match self.answers.read_line(&mut answer) {
            Ok(n) if n > 0 => {}
            _ => return None,
        }
        let answer: Value = serde_json::from_str(&answer).ok()?;
        Some(answer["ok"] == true)
    }
}

/// What the subscriber saw on one topic.
#[derive(Debug, Clone, Copy, Default)]
struct TopicCounts {
    publishes: u64,
    payload_bytes: u64,
    /// IoT Core's billing units of these publishes.
    units: u64,
    /// Readings in them (an array counts element by element).
    readings: u64,
}

impl TopicCounts {
    fn since(&self, earlier: &TopicCounts) -> TopicCounts {
        TopicCounts {
            publishes: self.publishes - earlier.publishes,
            payload_bytes: self.payload_bytes - earlier.payload_bytes,
            units: self.units - earlier.units,
            readings: self.readings - earlier.readings,
        }
    }
}

/// A subscriber to `#` on the broker's plain listener (the cloud's loopback); counts per
/// full topic.
struct Subscriber {
    topics: Arc<Mutex<HashMap<String, TopicCounts>>>,
    /// Set when the bench is done: the broker going away is no error then.
    done: Arc<AtomicBool>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
    }
}

impl Subscriber {
    /// Call from a thread inside the cloud's namespace: its thread inherits it.
    fn start() -> Subscriber {
        let topics = Arc::new(Mutex::new(HashMap::<String, TopicCounts>::new()));
        let counts = topics.clone();
        let done = Arc::new(AtomicBool::new(false));
        let quiet = done.clone();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(subscribe(counts, ready_tx, quiet));
        });
        ready
            .recv_timeout(Duration::from_secs(10))
            .expect("subscriber ready");
        Subscriber { topics, done }
    }

    /// The counts of every topic ending in `/<relative>`.
    fn counts(&self, relative: &str) -> TopicCounts {
        let suffix = format!("/{relative}");
        let topics = self.topics.lock().expect("lock");
        let mut total = TopicCounts::default();
        for (_, counts) in topics.iter().filter(|(topic, _)| topic.ends_with(&suffix)) {
            total.publishes += counts.publishes;
            total.payload_bytes += counts.payload_bytes;
            total.units += counts.units;
            total.readings += counts.readings;
        }
        total
    }
}

async fn subscribe(
    topics: Arc<Mutex<HashMap<String, TopicCounts>>>,
    ready: std::sync::mpsc::Sender<()>,
    done: Arc<AtomicBool>,
) {
    let mut options = MqttOptions::new("wire-bench-subscriber", "127.0.0.1", MQTT_PORT);
    options.set_max_packet_size(256 * 1024, 256 * 1024);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(options, 1024);
    let mut ready = Some(ready);
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                client
                    .try_subscribe("#", QoS::AtLeastOnce)
                    .expect("subscribe");
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                if let Some(tx) = ready.take() {
                    let _ = tx.send(());
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let readings = match serde_json::from_slice::<Value>(&publish.payload) {
                    Ok(Value::Array(items)) => items.len() as u64,
                    _ => 1,
                };
                let metered = (publish.payload.len() + publish.topic.len()) as u64;
                let mut topics = topics.lock().expect("lock");
                let counts = topics.entry(publish.topic.clone()).or_default();
                counts.publishes += 1;
                counts.payload_bytes += publish.payload.len() as u64;
                counts.units += metered.div_ceil(BILLING_UNIT);
                counts.readings += readings;
            }
            Ok(_) => {}
            Err(error) => {
                if !done.load(Ordering::SeqCst) {
                    eprintln!("wire bench subscriber: {error}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

fn print_table(results: &[Value]) {
    println!(
        "\n| case | IP up / down B | API payload up / down B | MQTT payload up / down B | \
         daemon sent / received B | MB / device-month | readings written / delivered | \
         publishes | billed / 1k readings | pings | reconnects | startup IP up / down B |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let n = |v: &Value| match v {
        Value::Null => "n/a".to_owned(),
        other => other.to_string(),
    };
    for r in results {
        println!(
            "| {} | {} / {} | {} / {} | {} / {} | {} / {} | {} | {} / {} | {} | {} | {} | {} | {} / {} |",
            r["case"].as_str().unwrap_or("?"),
            r["ip_bytes"]["up"],
            r["ip_bytes"]["down"],
            r["tcp_payload"]["api"]["up"],
            r["tcp_payload"]["api"]["down"],
            r["tcp_payload"]["mqtt"]["up"],
            r["tcp_payload"]["mqtt"]["down"],
            n(&r["daemon"]["bytes_sent"]),
            n(&r["daemon"]["bytes_received"]),
            r["mb_per_device_month"],
            r["readings"]["written"],
            r["readings"]["delivered"],
            r["broker"]["publishes"],
            n(&r["billed"]["per_1000_readings"]),
            r["broker"]["pings"],
            n(&r["daemon"]["reconnects"]),
            r["startup"]["ip_bytes"]["up"],
            r["startup"]["ip_bytes"]["down"],
        );
    }
    println!();
}

/// Sanity: the tool saw traffic, the capture lost nothing, every device went quiet before the
/// window, readings arrived, and the daemon's counters (when it has them) match the capture.
fn check(results: &[Value]) {
    for r in results {
        let case = r["case"].as_str().unwrap_or("?");
        let startup = r["startup"]["ip_bytes"]["up"].as_u64().unwrap_or(0);
        assert!(startup > 0, "{case}: no startup bytes on the link");
        // Also checks that the broker's log is read right.
        assert!(
            r["startup"]["connects"].as_u64().unwrap_or(0) >= 1,
            "{case}: no CONNECT from the device in the broker's log"
        );
        assert_eq!(
            r["capture"]["dropped"], 0,
            "{case}: the capture dropped frames"
        );
        assert_eq!(
            r["capture"]["non_ip_frames"], 0,
            "{case}: non-IP frames on the link"
        );
        let written = r["readings"]["written"].as_u64().unwrap_or(0);
        if written > 0 {
            assert!(
                r["ip_bytes"]["up"].as_u64().unwrap_or(0) > 0
                    && r["tcp_payload"]["mqtt"]["up"].as_u64().unwrap_or(0) > 0,
                "{case}: readings written but no bytes on the link"
            );
        }
        if !r["agreement"].is_null() {
            assert_eq!(
                r["agreement"]["ok"], true,
                "{case}: the daemon's byte counters disagree with the capture: {}",
                r["agreement"]
            );
        }
    }
}
