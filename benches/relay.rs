//! End-to-end relay benchmark: one run, one process tree, one private network
//! namespace with mosquitto (wss + TLS, the same broker for everyone) and moto.
//!
//! Systems, fed the same messages through the same socket framing by the same writers:
//! - `iot-cognito-relay`: the real daemon (onboarded through moto, spool and all);
//! - `awsiotsdk peer`: `benches/python/peer_relay.py`, a relay on the AWS IoT Device SDK for Python v2
//!   (websocket SigV4, QoS 1), what an operator would otherwise write;
//! - `bare rumqttc`: a publisher that makes its messages itself and sends them with rumqttc over
//!   wss, QoS 1, 100 in flight: the ceiling of the client library we build on.
//!
//! For each: end-to-end messages/s (written to the socket → received by a subscriber on the
//! plain listener), p50/p99 latency at a fixed 100 msg/s, CPU seconds per 10,000 messages, peak
//! RSS. Then a quota run of our daemon at IoT Core's limits with batching on, checked against
//! the broker's own per-second log, and idle CPU. Writes `results.json` and a PNG (benches/python/plot.py).
//!
//! Run: `make bench` (root; `cargo bench --profile release --bench relay`). Under `cargo test` it is a short
//! smoke run that checks the tool works and asserts nothing about speed.
//! `RELAY_BENCH_ONLY=quota` runs the quota run alone; `RELAY_BENCH_ONLY=latency` the latency
//! runs of our daemon and the peer alone, `RELAY_BENCH_ROUNDS` times (default 3), each right
//! after a flood and again once settled, with each run's tail.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Transport};
use serde_json::{Value, json};

#[path = "../tests/harness/mod.rs"]
mod harness;

use harness::{Cloud, MQTT_PORT, WSS_PORT};

/// The latency runs' fixed rate (the target is p99 ≤ 5 ms at 100 msg/s, docs/benchmarks.md).
const LATENCY_RATE: u32 = 100;
/// IoT Core's per-connection quotas, for the quota run.
const QUOTA_PUBLISHES: u32 = 100;
const QUOTA_BYTES: u64 = 512 * 1024;
/// In-flight QoS 1 publishes, for every system alike.
const IN_FLIGHT: u16 = 100;
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(300);

/// How big a run is: `cargo bench` (full) or `cargo test` (smoke).
struct Plan {
    writers: usize,
    per_writer: u64,
    latency_seconds: u64,
    quota_seconds: u64,
    idle_seconds: u64,
}

fn main() {
    if let Ok(role) = std::env::var("RELAY_BENCH_CEILING") {
        return ceiling_child(&role);
    }
    let full = std::env::args().any(|a| a == "--bench");
    let plan = if full {
        Plan {
            writers: 4,
            per_writer: 25_000,
            latency_seconds: 20,
            quota_seconds: 20,
            idle_seconds: 10,
        }
    } else {
        Plan {
            writers: 2,
            per_writer: 500,
            latency_seconds: 2,
            quota_seconds: 3,
            idle_seconds: 1,
        }
    };
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/relay-bench");
    std::fs::create_dir_all(&out_dir).expect("output dir");

    let mut cloud = Cloud::start();
    // Quiet broker for the speed runs: logging every PUBLISH would cost it more than anyone.
    cloud.start_broker_logging("error warning notice information");
    cloud.namespace.enter();
    let subscriber = Subscriber::start();
    // RELAY_BENCH_ONLY=quota: the quota run alone, for work on the publisher's pacing.
    if std::env::var("RELAY_BENCH_ONLY").as_deref() == Ok("quota") {
        let quota = quota_run(&mut cloud, &subscriber, &plan);
        println!("quota run: {quota}");
        return;
    }
    // RELAY_BENCH_ONLY=latency: the latency runs alone, repeated, for work on the tail.
    if std::env::var("RELAY_BENCH_ONLY").as_deref() == Ok("latency") {
        return latency_rounds(&cloud, &subscriber, &plan);
    }

    let (ours, idle) = bench_daemon(&cloud, &subscriber, &plan);
    let systems = vec![
        ours,
        bench_peer(&cloud, &subscriber, &plan),
        bench_ceiling(&cloud, &subscriber, &plan),
    ];
    let quota = quota_run(&mut cloud, &subscriber, &plan);

    let [ours, peer, ceiling] = [&systems[0], &systems[1], &systems[2]];
    let ratios = json!({
        "throughput_ours_over_peer": ours.msgs_per_s / peer.msgs_per_s,
        "throughput_ours_over_ceiling": ours.msgs_per_s / ceiling.msgs_per_s,
        "cpu_ours_over_peer": ours.cpu_s_per_10k / peer.cpu_s_per_10k,
    });
    let results = json!({
        "date": humantime::format_rfc3339_seconds(SystemTime::now()).to_string()[..10],
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "machine": format!("{} writers x {} messages, QoS 1, {IN_FLIGHT} in flight, mosquitto wss on loopback",
            plan.writers, plan.per_writer),
        "systems": systems.iter().map(System::to_json).collect::<Vec<_>>(),
        "ratios": ratios,
        "quota": quota,
        "idle": {
            "seconds": plan.idle_seconds,
            "cpu_ms": round(idle.idle * 1000.0, 1),
            "housekeeping_cpu_ms_before": round(idle.settling * 1000.0, 1),
        },
    });
    let results_path = out_dir.join("results.json");
    std::fs::write(
        &results_path,
        serde_json::to_string_pretty(&results).expect("json"),
    )
    .expect("write results");
    print_report(&systems, &results);

    let png = out_dir.join("relay-benchmark.png");
    let plotted = Command::new(harness::python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/python/plot.py"))
        .arg(&results_path)
        .arg(&png)
        .status()
        .expect("run benches/python/plot.py");
    assert!(plotted.success(), "benches/python/plot.py failed");
    println!(
        "results: {}\nplot: {}",
        results_path.display(),
        png.display()
    );
}

/// One system's figures.
struct System {
    name: &'static str,
    msgs_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_s_per_10k: f64,
    peak_rss_mb: f64,
}

impl System {
    fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "msgs_per_s": round(self.msgs_per_s, 0),
            "p50_ms": round(self.p50_ms, 2),
            "p99_ms": round(self.p99_ms, 2),
            "cpu_s_per_10k": round(self.cpu_s_per_10k, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
        })
    }
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

fn print_report(systems: &[System], results: &Value) {
    println!("\n| system | msgs/s | p50 ms | p99 ms | CPU s / 10k msgs | peak RSS MB |");
    println!("|---|---|---|---|---|---|");
    for s in systems {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.3} | {:.1} |",
            s.name, s.msgs_per_s, s.p50_ms, s.p99_ms, s.cpu_s_per_10k, s.peak_rss_mb
        );
    }
    println!(
        "\nratios: {}\nquota run: {}\nidle: {}\n",
        results["ratios"], results["quota"], results["idle"]
    );
}

/// Our daemon, onboarded through moto like a device.
/// Returns its figures and the CPU it used after them: housekeeping, then idle.
fn bench_daemon(cloud: &Cloud, subscriber: &Subscriber, plan: &Plan) -> (System, Idle) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = quiet(cloud.config(dir.path(), true, ""));
    let daemon = cloud.start_daemon(&config);
    harness::wait_connected(&daemon.socket);
    let pid = daemon.pid();
    let system = measure(
        "iot-cognito-relay",
        pid,
        &daemon.socket,
        subscriber,
        plan,
        "bench/ours",
    );
    // Idle: connected, nothing to send. No polling loop may burn CPU here. First the spool's
    // housekeeping after the runs (it gives the flood's pages back once 2 s pass without a
    // message), measured apart.
    let before = harness::cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(plan.idle_seconds));
    let settling = harness::cpu_seconds(pid) - before;
    let before = harness::cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(plan.idle_seconds));
    let idle = harness::cpu_seconds(pid) - before;
    (system, Idle { settling, idle })
}

/// Our daemon's CPU seconds after the runs: housekeeping first, then truly idle.
struct Idle {
    settling: f64,
    idle: f64,
}

/// The awsiotsdk relay, given the same socket framing and broker.
fn bench_peer(cloud: &Cloud, subscriber: &Subscriber, plan: &Plan) -> System {
    let peer = start_peer(cloud);
    measure(
        "awsiotsdk peer",
        peer.child.0.id(),
        &peer.socket,
        subscriber,
        plan,
        "bench/peer",
    )
}

/// A running `benches/python/peer_relay.py`, ready for writers on `socket`.
struct Peer {
    child: KillOnDrop,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

fn start_peer(cloud: &Cloud) -> Peer {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("peer.sock");
    let mut child = KillOnDrop(
        Command::new(harness::python())
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/python/peer_relay.py"))
            .arg("--socket")
            .arg(&socket)
            .args(["--endpoint", "127.0.0.1", "--port", &WSS_PORT.to_string()])
            .arg("--ca-file")
            .arg(&cloud.ca_file)
            .args(["--region", "us-east-1", "--client-id", "bench-peer"])
            .args(["--topic-prefix", "bench-peer"])
            .args(["--max-in-flight", &IN_FLIGHT.to_string()])
            // mosquitto ignores the signature; the peer signs with these like with real ones.
            .env("AWS_ACCESS_KEY_ID", "AKIDBENCHPEER")
            .env("AWS_SECRET_ACCESS_KEY", "bench-peer-secret")
            .env("AWS_SESSION_TOKEN", "bench-peer-token")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start benches/python/peer_relay.py (pip install -r benches/python/requirements.txt)"),
    );
    let stdout = child.0.stdout.take().expect("stdout");
    let mut ready = String::new();
    BufReader::new(stdout)
        .read_line(&mut ready)
        .expect("peer output");
    assert_eq!(ready.trim(), "ready", "peer did not start");
    Peer {
        child,
        socket,
        _dir: dir,
    }
}

/// How long a relay stays quiet before the settled latency run: long enough for our spool's
/// housekeeping after a flood (it gives the flood's pages back once 2 s pass without a message).
const SETTLE: Duration = Duration::from_secs(15);

/// RELAY_BENCH_ONLY=latency: our daemon and the peer, RELAY_BENCH_ROUNDS rounds (default 3) of
/// a flood as in the full run, then the paced run at once (as the full run measures it), then
/// again after SETTLE of quiet; each run's tail as `Latency::report` prints it.
fn latency_rounds(cloud: &Cloud, subscriber: &Subscriber, plan: &Plan) {
    let rounds: u32 = std::env::var("RELAY_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = cloud.start_daemon(&quiet(cloud.config(dir.path(), true, "")));
    harness::wait_connected(&daemon.socket);
    let peer = start_peer(cloud);
    let relays = [
        ("ours", daemon.socket.as_path(), "bench/ours"),
        ("peer", peer.socket.as_path(), "bench/peer"),
    ];
    for round in 1..=rounds {
        for (name, socket, topic) in relays {
            subscriber.reset();
            flood_all(socket, topic, plan);
            subscriber.wait_for(plan.writers as u64 * plan.per_writer, DELIVERY_TIMEOUT);
            for settled in [false, true] {
                if settled {
                    std::thread::sleep(SETTLE);
                }
                subscriber.reset();
                paced_writer(socket, topic, plan.latency_seconds);
                subscriber.wait_for(
                    u64::from(LATENCY_RATE) * plan.latency_seconds,
                    DELIVERY_TIMEOUT,
                );
                let when = if settled {
                    "settled"
                } else {
                    "after the flood"
                };
                println!(
                    "round {round}, {name}, {when}: {}",
                    subscriber.latency().report()
                );
            }
        }
    }
}

/// The client library alone: this binary again, as a child that publishes by itself.
fn bench_ceiling(cloud: &Cloud, subscriber: &Subscriber, plan: &Plan) -> System {
    let total = plan.writers as u64 * plan.per_writer;
    // Started, connected, then told to go: its connect is not part of the measurement, as
    // the relays were connected before their writers started.
    let run = |role: String| {
        let mut child = KillOnDrop(
            Command::new(std::env::current_exe().expect("exe"))
                .env("RELAY_BENCH_CEILING", role)
                .env("RELAY_BENCH_CA", &cloud.ca_file)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("start ceiling child"),
        );
        let mut stdout = BufReader::new(child.0.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("ceiling output");
        assert_eq!(line.trim(), "connected", "ceiling child did not connect");
        subscriber.reset();
        writeln!(child.0.stdin.as_mut().expect("stdin"), "go").expect("go");
        (child, stdout)
    };
    let mut flood = run(format!("flood:{total}"));
    let started = Instant::now();
    subscriber.wait_for(total, DELIVERY_TIMEOUT);
    let elapsed = started.elapsed();
    let usage = child_report(&mut flood);
    let mut paced = run(format!("paced:{}", plan.latency_seconds));
    subscriber.wait_for(
        u64::from(LATENCY_RATE) * plan.latency_seconds,
        DELIVERY_TIMEOUT,
    );
    child_report(&mut paced);
    let (p50, p99) = subscriber.percentiles();
    System {
        name: "bare rumqttc",
        msgs_per_s: total as f64 / elapsed.as_secs_f64(),
        p50_ms: p50,
        p99_ms: p99,
        cpu_s_per_10k: usage["cpu_s"].as_f64().unwrap_or(0.0) / total as f64 * 10_000.0,
        peak_rss_mb: usage["rss_kib"].as_f64().unwrap_or(0.0) / 1024.0,
    }
}

/// Throughput (all writers flat out), then latency (one writer at 100 msg/s), for a relay
/// listening on `socket` as process `pid`.
fn measure(
    name: &'static str,
    pid: u32,
    socket: &Path,
    subscriber: &Subscriber,
    plan: &Plan,
    topic: &str,
) -> System {
    let total = plan.writers as u64 * plan.per_writer;
    subscriber.reset();
    // RELAY_PROFILE=DIR: the flood under `perf record`, reported by stage in DIR/<topic>.txt.
    let profile = std::env::var_os("RELAY_PROFILE").map(|dir| {
        let slug = topic.replace('/', "-");
        (
            harness::Profile::start(pid, Path::new(&dir), &slug),
            Path::new(&dir).join(slug + ".txt"),
        )
    });
    let cpu_before = harness::cpu_seconds(pid);
    let started = Instant::now();
    flood_all(socket, topic, plan);
    subscriber.wait_for(total, DELIVERY_TIMEOUT);
    let elapsed = started.elapsed();
    let cpu = harness::cpu_seconds(pid) - cpu_before;
    if let Some((profile, report)) = profile {
        let summary = format!(
            "{name}: flood of {total} messages, {:.1} us CPU per message\n",
            cpu / total as f64 * 1e6
        );
        std::fs::write(&report, summary + &profile.finish()).expect("write profile");
        println!("profile: {}", report.display());
    }

    subscriber.reset();
    paced_writer(socket, topic, plan.latency_seconds);
    subscriber.wait_for(
        u64::from(LATENCY_RATE) * plan.latency_seconds,
        DELIVERY_TIMEOUT,
    );
    let (p50, p99) = subscriber.percentiles();
    System {
        name,
        msgs_per_s: total as f64 / elapsed.as_secs_f64(),
        p50_ms: p50,
        p99_ms: p99,
        cpu_s_per_10k: cpu / total as f64 * 10_000.0,
        peak_rss_mb: harness::peak_rss_kib(pid) as f64 / 1024.0,
    }
}

/// Our daemon at IoT Core's quotas with batching on, writers flooding small readings: how close
/// it gets to 512 KB/s, and whether any broker second went over a quota.
fn quota_run(cloud: &mut Cloud, subscriber: &Subscriber, plan: &Plan) -> Value {
    // Every PUBLISH stamped with its second, where IoT Core would count it.
    cloud.start_broker_logging("all");
    subscriber.wait_resubscribed();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = quiet(cloud.config(
        dir.path(),
        true,
        // 8 KiB arrays: 63 of them fit the quota's 1.05-second window with their topics.
        "[batch]\nmax_messages = 1000\nmax_bytes = \"8KiB\"\n",
    ));
    harness::rewrite_config(
        &config,
        &[
            (
                "max_publishes_per_second = 0",
                &format!("max_publishes_per_second = {QUOTA_PUBLISHES}"),
            ),
            (
                "max_bytes_per_second = \"0\"",
                "max_bytes_per_second = \"512KiB\"",
            ),
        ],
    );
    let daemon = cloud.start_daemon(&config);
    harness::wait_connected(&daemon.socket);
    let log_start = cloud.broker_log().len();

    subscriber.reset();
    let seconds = plan.quota_seconds;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let writers: Vec<_> = (0..plan.writers)
        .map(|w| {
            let socket = daemon.socket.clone();
            std::thread::spawn(move || {
                // One connection for the whole run, as an app keeps it: a new one per burst
                // would pile up behind the spool and meet `socket.max_clients_per_uid`.
                let stream = UnixStream::connect(&socket).expect("connect");
                let mut out = std::io::BufWriter::with_capacity(64 * 1024, stream);
                let mut n = w as u64 * 1_000_000_000;
                while Instant::now() < deadline {
                    write_readings(&mut out, "bench/quota", n, 1000);
                    n += 1000;
                }
            })
        })
        .collect();
    // Measured from the first delivery over `seconds`, while the spool holds a backlog.
    let first = Instant::now();
    subscriber.wait_for(1, DELIVERY_TIMEOUT);
    let window_start = Instant::now();
    let base = subscriber.snapshot();
    std::thread::sleep(Duration::from_secs(seconds).saturating_sub(first.elapsed()));
    let measured = window_start.elapsed().as_secs_f64();
    let end = subscriber.snapshot();
    for writer in writers {
        writer.join().expect("writer");
    }
    let readings_per_s = (end.readings - base.readings) as f64 / measured;
    let bytes_per_s = (end.payload_bytes - base.payload_bytes) as f64 / measured;

    let per_second = harness::publishes_per_second(&cloud.broker_log()[log_start..], "bench/quota");
    let max_publishes = per_second.values().map(|v| v.0).max().unwrap_or(0);
    let max_bytes = per_second.values().map(|v| v.1).max().unwrap_or(0);
    let violations = per_second
        .values()
        .filter(|(p, b)| *p > u64::from(QUOTA_PUBLISHES) || *b > QUOTA_BYTES)
        .count();
    drop(daemon);
    json!({
        "readings_per_s": round(readings_per_s, 0),
        "payload_bytes_per_s": round(bytes_per_s, 0),
        "percent_of_512KiB": round(bytes_per_s / QUOTA_BYTES as f64 * 100.0, 1),
        "broker_seconds": per_second.len(),
        "max_publishes_in_a_second": max_publishes,
        "max_payload_bytes_in_a_second": max_bytes,
        "seconds_over_a_quota": violations,
        "publishes_per_broker_second": per_second.values().map(|v| v.0).collect::<Vec<_>>(),
    })
}

/// The harness config, logging only warnings (debug logging would be measured too).
fn quiet(config: PathBuf) -> PathBuf {
    harness::rewrite_config(&config, &[("level = \"debug\"", "level = \"warn\"")]);
    config
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Writes `count` readings as fast as the relay takes them (no ids: no answers to read).
/// The plan's writers flat out, each with its own numbers; returns when all have written.
fn flood_all(socket: &Path, topic: &str, plan: &Plan) {
    let writers: Vec<_> = (0..plan.writers)
        .map(|w| {
            let socket = socket.to_owned();
            let topic = topic.to_owned();
            let per_writer = plan.per_writer;
            std::thread::spawn(move || flood(&socket, &topic, w as u64 * per_writer, per_writer))
        })
        .collect();
    for writer in writers {
        writer.join().expect("writer");
    }
}

fn flood(socket: &Path, topic: &str, first: u64, count: u64) {
    let stream = UnixStream::connect(socket).expect("connect");
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, stream);
    write_readings(&mut out, topic, first, count);
}

/// `count` readings numbered from `first`, flushed.
fn write_readings(out: &mut impl Write, topic: &str, first: u64, count: u64) {
    for n in first..first + count {
        writeln!(
            out,
            "{{\"topic\":\"{topic}\",\"payload\":{{\"n\":{n},\"t\":{}}}}}",
            now_ns()
        )
        .expect("write");
    }
    out.flush().expect("flush");
}

/// One writer at `LATENCY_RATE` for `seconds`, each line flushed on its own.
fn paced_writer(socket: &Path, topic: &str, seconds: u64) {
    let mut stream = UnixStream::connect(socket).expect("connect");
    let interval = Duration::from_secs(1) / LATENCY_RATE;
    let start = Instant::now();
    for n in 0..u64::from(LATENCY_RATE) * seconds {
        let due = start + interval * n as u32;
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let line = format!(
            "{{\"topic\":\"{topic}\",\"payload\":{{\"n\":{n},\"t\":{}}}}}\n",
            now_ns()
        );
        stream.write_all(line.as_bytes()).expect("write");
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The ceiling child's last stdout line: its own CPU time and peak RSS.
fn child_report((child, stdout): &mut (KillOnDrop, BufReader<std::process::ChildStdout>)) -> Value {
    let line = stdout
        .lines()
        .map_while(Result::ok)
        .last()
        .unwrap_or_default();
    let _ = child.0.wait();
    serde_json::from_str(&line).unwrap_or_else(|_| panic!("ceiling child said {line:?}"))
}

/// What the subscriber has seen since the last reset.
#[derive(Clone, Copy)]
struct Counts {
    readings: u64,
    payload_bytes: u64,
}

/// A QoS 0 subscriber to `#` on the plain listener, in this process: it counts readings
/// (arrays element by element) and records each one's latency from the `t` it carries.
struct Subscriber {
    readings: Arc<AtomicU64>,
    payload_bytes: Arc<AtomicU64>,
    /// (the reading's `n`, its latency in µs)
    latencies_us: Arc<Mutex<Vec<(u64, u64)>>>,
}

impl Subscriber {
    fn start() -> Subscriber {
        let subscriber = Subscriber {
            readings: Arc::new(AtomicU64::new(0)),
            payload_bytes: Arc::new(AtomicU64::new(0)),
            latencies_us: Arc::new(Mutex::new(Vec::new())),
        };
        let (readings, bytes, latencies) = (
            subscriber.readings.clone(),
            subscriber.payload_bytes.clone(),
            subscriber.latencies_us.clone(),
        );
        let (ready_tx, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let mut options = MqttOptions::new("bench-subscriber", "127.0.0.1", MQTT_PORT);
                options.set_max_packet_size(256 * 1024, 256 * 1024);
                options.set_keep_alive(Duration::from_secs(30));
                let (client, mut events) = AsyncClient::new(options, 1024);
                let mut ready_tx = Some(ready_tx);
                loop {
                    match events.poll().await {
                        // Also after the quota run restarts the broker: a new session.
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            client
                                .try_subscribe("#", QoS::AtMostOnce)
                                .expect("subscribe");
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(tx) = ready_tx.take() {
                                let _ = tx.send(());
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(publish))) => {
                            let received = now_ns();
                            bytes.fetch_add(publish.payload.len() as u64, Ordering::Relaxed);
                            let Ok(value) = serde_json::from_slice::<Value>(&publish.payload)
                            else {
                                continue;
                            };
                            let items = match value {
                                Value::Array(items) => items,
                                reading => vec![reading],
                            };
                            let mut samples = Vec::with_capacity(items.len());
                            for reading in &items {
                                if let Some(sent) = reading["t"].as_u64() {
                                    let n = reading["n"].as_u64().unwrap_or(0);
                                    samples.push((n, received.saturating_sub(sent) / 1000));
                                }
                            }
                            latencies.lock().expect("lock").extend(samples);
                            readings.fetch_add(items.len() as u64, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(error) => {
                            eprintln!("bench subscriber: {error}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
        });
        ready
            .recv_timeout(Duration::from_secs(10))
            .expect("subscriber ready");
        subscriber
    }

    /// After a broker restart: until a probe comes through, the subscription is not back.
    fn wait_resubscribed(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.reset();
            let _ = Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &MQTT_PORT.to_string()])
                .args(["-t", "bench/probe", "-m", "{}"])
                .status();
            std::thread::sleep(Duration::from_millis(200));
            if self.readings.load(Ordering::SeqCst) > 0 {
                self.reset();
                return;
            }
            assert!(Instant::now() < deadline, "subscriber never came back");
        }
    }

    fn reset(&self) {
        self.readings.store(0, Ordering::SeqCst);
        self.payload_bytes.store(0, Ordering::SeqCst);
        self.latencies_us.lock().expect("lock").clear();
    }

    fn snapshot(&self) -> Counts {
        Counts {
            readings: self.readings.load(Ordering::SeqCst),
            payload_bytes: self.payload_bytes.load(Ordering::SeqCst),
        }
    }

    fn wait_for(&self, readings: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.readings.load(Ordering::SeqCst) < readings {
            assert!(
                Instant::now() < deadline,
                "only {} of {readings} readings arrived",
                self.readings.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// p50 and p99 latency in milliseconds of the readings since the last reset.
    fn percentiles(&self) -> (f64, f64) {
        let latency = self.latency();
        (latency.quantile(0.50), latency.quantile(0.99))
    }

    fn latency(&self) -> Latency {
        let mut samples = self.latencies_us.lock().expect("lock").clone();
        samples.sort_unstable_by_key(|&(n, us)| (us, n));
        Latency { samples }
    }
}

/// One run's latencies, fastest first.
struct Latency {
    samples: Vec<(u64, u64)>,
}

impl Latency {
    /// In milliseconds.
    fn quantile(&self, q: f64) -> f64 {
        self.samples
            .get(((self.samples.len() as f64 - 1.0) * q).round() as usize)
            .map_or(f64::NAN, |&(_, us)| us as f64 / 1000.0)
    }

    /// p50, p99, p99.9 and max, then how many of the slowest 1 % fell in each second of a
    /// paced run (reading n is sent at n / LATENCY_RATE s): spread out, or in a burst.
    fn report(&self) -> String {
        let slowest = &self.samples[self.samples.len() - self.samples.len().div_ceil(100)..];
        let mut by_second = std::collections::BTreeMap::<u64, u32>::new();
        for &(n, _) in slowest {
            *by_second.entry(n / u64::from(LATENCY_RATE)).or_default() += 1;
        }
        let seconds: Vec<String> = by_second.iter().map(|(s, c)| format!("{s}s:{c}")).collect();
        format!(
            "p50 {:.2} p99 {:.2} p99.9 {:.2} max {:.2} ms; slowest 1 % by second: {}",
            self.quantile(0.5),
            self.quantile(0.99),
            self.quantile(0.999),
            self.quantile(1.0),
            seconds.join(" ")
        )
    }
}

/// The ceiling: rumqttc alone over wss, QoS 1, `IN_FLIGHT` in flight. `flood:N` publishes N
/// messages as fast as acks allow; `paced:S` publishes at `LATENCY_RATE` for S seconds. Prints
/// its CPU time and peak RSS as JSON when every publish is acknowledged.
fn ceiling_child(role: &str) {
    let ca = std::env::var("RELAY_BENCH_CA").expect("RELAY_BENCH_CA");
    let (mode, count) = role.split_once(':').expect("role");
    let count: u64 = count.parse().expect("count");
    let (total, paced) = match mode {
        "flood" => (count, false),
        _ => (count * u64::from(LATENCY_RATE), true),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tls = iot_cognito_relay::publish::tls::tls_config(&ca).expect("tls");
        let mut options = MqttOptions::new(
            "bench-ceiling",
            format!("wss://127.0.0.1:{WSS_PORT}/mqtt"),
            WSS_PORT,
        );
        options.set_transport(Transport::Wss(rumqttc::TlsConfiguration::Rustls(tls)));
        options.set_inflight(IN_FLIGHT);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(256 * 1024, 256 * 1024);
        let (client, mut events) = AsyncClient::new(options, 1024);
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => break,
                Ok(_) => {}
                Err(error) => panic!("ceiling connect: {error}"),
            }
        }
        println!("connected");
        let mut go = String::new();
        std::io::stdin().read_line(&mut go).expect("go");
        let publisher = tokio::spawn(async move {
            let interval = Duration::from_secs(1) / LATENCY_RATE;
            let start = tokio::time::Instant::now();
            for n in 0..total {
                if paced {
                    tokio::time::sleep_until(start + interval * n as u32).await;
                }
                let payload = format!("{{\"n\":{n},\"t\":{}}}", now_ns());
                client
                    .publish("bench/ceiling", QoS::AtLeastOnce, false, payload)
                    .await
                    .expect("publish");
            }
        });
        let mut acked = 0;
        while acked < total {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(error) => panic!("ceiling connection: {error}"),
            }
        }
        publisher.await.expect("publisher");
    });
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let cpu = usage.ru_utime.tv_sec as f64
        + usage.ru_utime.tv_usec as f64 / 1e6
        + usage.ru_stime.tv_sec as f64
        + usage.ru_stime.tv_usec as f64 / 1e6;
    println!("{}", json!({"cpu_s": cpu, "rss_kib": usage.ru_maxrss}));
}
