//! Storage wear benchmark: what the daemon writes to the device's storage per message.
//!
//! One run, one private network namespace with mosquitto (wss + TLS) and moto, the real daemon:
//! - connected and offline (AWS unreachable), one local app writing readings of ~45 bytes with an
//!   `id` at 1, 10 and 100 msg/s, each line on its own, reading every answer;
//! - per message: bytes the daemon made the kernel write to storage (`/proc/PID/io`
//!   `write_bytes`, which counts page-cache pages dirtied, so 4 KiB at least per page touched
//!   between two flushes) and fsync/fdatasync calls (counted by `perf stat` on the syscall
//!   tracepoints: no ptrace, so the daemon runs at full speed; "n/a" without perf);
//! - `ok` latency p50/p99 (line written → `ok` read back);
//! - durable ingest: 4 writers pipelining publish lines into an offline daemon, messages/s until
//!   every `ok` is in (every `ok` is on disk then: offline, nothing can be acknowledged).
//!
//! `WEAR_DAEMON=/path/to/iot-cognito-relay` measures another build of the daemon (e.g. the
//! release binary of an older commit) with this same tool; `WEAR_LABEL` names it in the output.
//!
//! Run: `cargo bench --profile release --bench wear` (root, ~3 minutes). Under `cargo test` it is
//! a short smoke run that checks the tool works and asserts nothing about the figures.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};

#[path = "../tests/harness/mod.rs"]
mod harness;

use harness::Cloud;

/// The paced rates in msg/s, the rows of docs/benchmarks.md, "Storage wear".
const RATES: [u32; 3] = [1, 10, 100];
/// After a paced run: time for deletions, checkpoints and idle housekeeping the messages caused.
const SETTLE: Duration = Duration::from_secs(2);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// How big a run is: `cargo bench` (full) or `cargo test` (smoke).
struct Plan {
    /// Seconds per rate, in the order of `RATES`.
    seconds: [u64; 3],
    ingest_writers: usize,
    ingest_per_writer: u64,
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let plan = if full {
        Plan {
            seconds: [40, 30, 15],
            ingest_writers: 4,
            ingest_per_writer: 50_000,
        }
    } else {
        Plan {
            seconds: [2, 1, 1],
            ingest_writers: 2,
            ingest_per_writer: 500,
        }
    };
    let daemon_bin: PathBuf = std::env::var_os("WEAR_DAEMON").map_or_else(
        || env!("CARGO_BIN_EXE_iot-cognito-relay").into(),
        PathBuf::from,
    );
    let label = std::env::var("WEAR_LABEL").unwrap_or_else(|_| "this build".into());
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/wear-bench");
    std::fs::create_dir_all(&out_dir).expect("output dir");

    let cloud = Cloud::start();
    let mut runs = Vec::new();
    // WEAR_INGEST_ONLY=1: the durable ingest figure alone.
    let modes = if std::env::var_os("WEAR_INGEST_ONLY").is_some() {
        vec![]
    } else {
        vec![Mode::Connected, Mode::Offline]
    };
    for mode in modes {
        let dir = tempfile::tempdir().expect("tempdir");
        let daemon = start(&cloud, &daemon_bin, &config(&cloud, mode, dir.path()));
        if mode == Mode::Connected {
            harness::wait_connected(&daemon.socket);
        }
        for (rate, seconds) in RATES.iter().zip(plan.seconds) {
            let run = paced_run(&daemon, *rate, seconds);
            println!("{} {rate} msg/s: {run}", mode.name());
            runs.push(
                json!({"mode": mode.name(), "rate": rate, "seconds": seconds, "figures": run}),
            );
        }
        if mode == Mode::Connected
            && let Some(profile) = std::env::var_os("WEAR_PROFILE")
        {
            profile_flood(&daemon, Path::new(&profile), &plan);
        }
    }
    let ingest = {
        let dir = tempfile::tempdir().expect("tempdir");
        let daemon = start(
            &cloud,
            &daemon_bin,
            &config(&cloud, Mode::Offline, dir.path()),
        );
        // WEAR_PROFILE also profiles this offline flood: the durable ingest path alone.
        let profile = std::env::var_os("WEAR_PROFILE")
            .map(|dir| harness::Profile::start(daemon.child.id(), Path::new(&dir), "ingest"));
        let rate = harness::pipeline_publishes(
            &daemon.socket,
            plan.ingest_writers,
            plan.ingest_per_writer,
        );
        if let (Some(profile), Some(dir)) = (profile, std::env::var_os("WEAR_PROFILE")) {
            let report = Path::new(&dir).join("ingest.txt");
            let summary = format!("offline durable ingest: {rate:.0} msg/s\n");
            std::fs::write(&report, summary + &profile.finish()).expect("write report");
            println!("profile: {}", report.display());
        }
        rate
    };
    println!("durable ingest: {ingest:.0} msg/s");

    let results = json!({
        "label": label,
        "daemon": daemon_bin.display().to_string(),
        "date": humantime::format_rfc3339_seconds(SystemTime::now()).to_string()[..10],
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "runs": runs,
        "durable_ingest_msgs_per_s": ingest.round(),
        "ingest": format!("{} writers x {} messages, offline", plan.ingest_writers, plan.ingest_per_writer),
    });
    print_table(&results);
    let name = label.replace(|c: char| !c.is_ascii_alphanumeric(), "-");
    let path = out_dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&results).expect("json"))
        .expect("write results");
    println!("results: {}", path.display());
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Connected,
    Offline,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Connected => "connected",
            Mode::Offline => "offline",
        }
    }
}

fn config(cloud: &Cloud, mode: Mode, dir: &Path) -> PathBuf {
    // Warnings only: a debug line per message would be measured as wear too.
    let log = "[log]\nlevel = \"warn\"\n";
    match mode {
        Mode::Connected => {
            let config = cloud.config(dir, true, "");
            harness::rewrite_config(&config, &[("level = \"debug\"", "level = \"warn\"")]);
            config
        }
        Mode::Offline => {
            // WEAR_SPOOL: more `[spool]` keys (e.g. `commit_window = "0s"`) for the offline runs.
            let extra = std::env::var("WEAR_SPOOL").unwrap_or_default();
            harness::offline_config(
                dir,
                &format!("[spool]\nmax_bytes = \"1GiB\"\n{extra}\n{log}"),
            )
        }
    }
}

/// The daemon under test, killed on drop.
struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(cloud: &Cloud, bin: &Path, config: &Path) -> Daemon {
    let dir = config.parent().expect("config dir");
    let log = std::fs::File::create(dir.join("daemon.log")).expect("daemon log");
    let child = cloud
        .namespace
        .command(bin)
        .args(["run", "--config"])
        .arg(config)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir)
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start daemon");
    let daemon = Daemon {
        child,
        socket: dir.join("relay.sock"),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(&daemon.socket).is_err() {
        assert!(Instant::now() < deadline, "daemon socket never appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    daemon
}

/// The daemon's (process-wide, all threads) storage writes so far, in bytes.
fn write_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Counts fsync + fdatasync calls of one process while it lives, with `perf stat`.
struct SyncCounter {
    child: Option<Child>,
    output: PathBuf,
}

impl SyncCounter {
    fn start(pid: u32, output: PathBuf) -> SyncCounter {
        let child = Command::new("perf")
            .args(["stat", "-x,", "-e"])
            .arg("syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync")
            .arg("-p")
            .arg(pid.to_string())
            .arg("-o")
            .arg(&output)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok();
        // perf needs a moment to attach to every thread.
        std::thread::sleep(Duration::from_millis(300));
        SyncCounter { child, output }
    }

    /// Stops counting; `None` without perf.
    fn finish(mut self) -> Option<u64> {
        let child = self.child.take()?;
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let _ = child.wait_with_output();
        let text = std::fs::read_to_string(&self.output).ok()?;
        let counts: Vec<u64> = text
            .lines()
            .filter(|l| l.contains("syscalls:sys_enter_"))
            .filter_map(|l| l.split(',').next()?.trim().parse().ok())
            .collect();
        (!counts.is_empty()).then(|| counts.iter().sum())
    }
}

impl Drop for SyncCounter {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One app at `rate` msg/s for `seconds`, every line with an id, every answer read: bytes
/// written and fsyncs per message, `ok` latency.
fn paced_run(daemon: &Daemon, rate: u32, seconds: u64) -> Value {
    let pid = daemon.child.id();
    let counter = SyncCounter::start(
        pid,
        std::env::temp_dir().join(format!("wear-perf-{pid}-{rate}.csv")),
    );
    let before = write_bytes(pid);
    let count = u64::from(rate) * seconds;
    let latencies = paced_writer(&daemon.socket, rate, count);
    std::thread::sleep(SETTLE);
    let written = write_bytes(pid) - before;
    let syncs = counter.finish();
    let (p50, p99) = percentiles(&latencies);
    json!({
        "messages": count,
        "ok": latencies.len(),
        "write_bytes_per_msg": (written as f64 / count as f64).round(),
        "fsyncs_per_msg": syncs.map(|s| round(s as f64 / count as f64, 3)),
        "ok_p50_ms": round(p50, 2),
        "ok_p99_ms": round(p99, 2),
    })
}

/// Writes `count` publish lines at `rate` on one connection; returns each `ok`'s latency (ms).
fn paced_writer(socket: &Path, rate: u32, count: u64) -> Vec<f64> {
    let stream = UnixStream::connect(socket).expect("connect");
    let mut writer = stream.try_clone().expect("clone");
    let sent: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; count as usize]));
    let sent_by_writer = sent.clone();
    let interval = Duration::from_secs(1) / rate;
    let sender = std::thread::spawn(move || {
        let start = Instant::now();
        for n in 0..count {
            std::thread::sleep(
                (start + interval * n as u32).saturating_duration_since(Instant::now()),
            );
            // ~45-byte payloads, like one sensor reading.
            let line = format!(
                "{{\"topic\":\"wear/sensor\",\"payload\":{{\"n\":{n},\"celsius\":21.5,\"rh\":40.25}},\"id\":{n}}}\n"
            );
            sent_by_writer.lock().expect("lock")[n as usize] = Some(Instant::now());
            writer.write_all(line.as_bytes()).expect("write");
        }
    });
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .expect("timeout");
    let mut reader = BufReader::new(stream);
    let mut latencies = Vec::with_capacity(count as usize);
    let mut line = String::new();
    for _ in 0..count {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        let answered = Instant::now();
        let Ok(answer) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let Some(id) = answer["id"].as_u64() else {
            continue;
        };
        if answer["ok"] == true
            && let Some(Some(at)) = sent.lock().expect("lock").get(id as usize)
        {
            latencies.push(answered.duration_since(*at).as_secs_f64() * 1000.0);
        }
    }
    sender.join().expect("sender");
    latencies
}

/// `WEAR_PROFILE=DIR`: a connected flood under `perf record`, reported by stage; its CPU per
/// message from `/proc/PID/stat`.
fn profile_flood(daemon: &Daemon, dir: &Path, plan: &Plan) {
    let pid = daemon.child.id();
    let profile = harness::Profile::start(pid, dir, "wear-flood");
    let cpu_before = harness::cpu_seconds(pid);
    let rate =
        harness::pipeline_publishes(&daemon.socket, plan.ingest_writers, plan.ingest_per_writer);
    let cpu = harness::cpu_seconds(pid) - cpu_before;
    let total = plan.ingest_writers as u64 * plan.ingest_per_writer;
    let summary = format!(
        "connected flood: {total} messages, {rate:.0} msg/s answered ok, {:.1} us CPU per message\n",
        cpu / total as f64 * 1e6
    );
    print!("{summary}");
    let report = summary + &profile.finish();
    std::fs::write(dir.join("report.txt"), report).expect("write report");
    println!("profile: {}", dir.join("report.txt").display());
}

fn percentiles(samples: &[f64]) -> (f64, f64) {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let at = |q: f64| {
        sorted
            .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    (at(0.50), at(0.99))
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

fn print_table(results: &Value) {
    println!("\n{}: {}", results["label"], results["daemon"]);
    println!("| mode | msg/s | bytes written / msg | fsyncs / msg | ok p50 ms | ok p99 ms |");
    println!("|---|---|---|---|---|---|");
    for run in results["runs"].as_array().into_iter().flatten() {
        let f = &run["figures"];
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            run["mode"].as_str().unwrap_or("?"),
            run["rate"],
            f["write_bytes_per_msg"],
            f["fsyncs_per_msg"],
            f["ok_p50_ms"],
            f["ok_p99_ms"]
        );
    }
    println!(
        "durable ingest: {} msg/s ({})",
        results["durable_ingest_msgs_per_s"], results["ingest"]
    );
}
