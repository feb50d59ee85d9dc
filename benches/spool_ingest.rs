//! Spool ingest benchmark: how many messages per second the real daemon accepts durably (answered
//! `ok` = committed with fsync) from local writers, and its peak RSS while doing so.
//!
//! Peer in the same run: a bare Unix-socket line sink (reads each line, parses it as JSON,
//! answers `ok` with its id, stores nothing): the ceiling of socket I/O and parsing without
//! durability, on this machine. The daemon runs offline (AWS
//! unreachable), the way a device that lost its network keeps accepting data.
//!
//! Run: `cargo bench --bench spool_ingest` (optional args: WRITERS MESSAGES_PER_WRITER).
//! Environment: `SPOOL_BENCH_BINARY` (the daemon to measure, e.g. a static musl or ARM build;
//! default this checkout's), `SPOOL_BENCH_RUNNER` (words run before it, e.g.
//! `qemu-arm-static -cpu cortex-a7`; the peak RSS is then the emulator's).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../tests/harness/mod.rs"]
mod harness;

const BIN: &str = env!("CARGO_BIN_EXE_iot-cognito-relay");

fn main() {
    let all: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes --bench; under `cargo test` this is a quick smoke run.
    let full = all.iter().any(|a| a == "--bench");
    let args: Vec<&String> = all.iter().filter(|a| !a.starts_with('-')).collect();
    let writers: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(4);
    let default_count = if full { 50_000 } else { 1_000 };
    let per_writer: u64 = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default_count);
    let dir = tempfile::tempdir().expect("tempdir");

    let sink_socket = dir.path().join("sink.sock");
    let sink = UnixListener::bind(&sink_socket).expect("bind sink");
    std::thread::spawn(move || {
        for stream in sink.incoming().flatten() {
            std::thread::spawn(move || line_sink(stream));
        }
    });
    let sink_rate = harness::pipeline_publishes(&sink_socket, writers, per_writer);

    let config = harness::offline_config(
        dir.path(),
        "[spool]\nmax_bytes = \"1GiB\"\n[log]\nlevel = \"error\"\n",
    );
    let binary = std::env::var("SPOOL_BENCH_BINARY").unwrap_or_else(|_| BIN.to_owned());
    let runner = std::env::var("SPOOL_BENCH_RUNNER").unwrap_or_default();
    let mut command = runner.split_whitespace().chain([binary.as_str()]);
    let mut daemon = Command::new(command.next().expect("a program to run"))
        .args(command)
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stderr(Stdio::null())
        .spawn()
        .expect("start daemon");
    let socket = dir.path().join("relay.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rss_idle = harness::peak_rss_kib(daemon.id());
    let daemon_rate = harness::pipeline_publishes(&socket, writers, per_writer);
    let rss_peak = harness::peak_rss_kib(daemon.id());
    let _ = daemon.kill();
    let _ = daemon.wait();

    let total = writers as u64 * per_writer;
    println!(
        "spool ingest: {writers} writers x {per_writer} messages ({total} total), ~40-byte payloads"
    );
    println!("  iot-cognito-relay (durable, fsync'd): {daemon_rate:>10.0} msg/s");
    println!("  line sink (parse + answer, no storage): {sink_rate:>8.0} msg/s");
    println!(
        "  ratio ours / sink:                    {:>10.2}",
        daemon_rate / sink_rate
    );
    println!(
        "  daemon peak RSS: {} KiB (after start: {} KiB)",
        rss_peak, rss_idle
    );
}

fn line_sink(stream: UnixStream) {
    let mut writer = std::io::BufWriter::new(stream.try_clone().expect("clone"));
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                // Parse and answer with the id, as the daemon does; store nothing.
                let id = serde_json::from_slice::<serde_json::Value>(&line)
                    .map(|v| v["id"].clone())
                    .unwrap_or_default();
                let answer = format!("{}\n", serde_json::json!({"id": id, "ok": true}));
                if writer.write_all(answer.as_bytes()).is_err() {
                    return;
                }
                if reader.buffer().is_empty() && writer.flush().is_err() {
                    return;
                }
            }
        }
    }
}
