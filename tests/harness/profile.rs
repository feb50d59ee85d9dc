//! CPU profiles for the benchmarks: `perf record` on one process, reported as where the time
//! goes (socket I/O in the kernel, JSON, spool, MQTT, websocket, TLS, runtime, allocator), so a
//! change to the per-message path can be judged by the stage it moved, not only by the total.
//!
//! Needs Debian's `linux-perf`; function names need a binary with symbols (the release profile
//! strips them: build with `CARGO_PROFILE_RELEASE_STRIP=false`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Where a function's time is counted, by the first pattern its `dso` + symbol contains.
/// Order matters: the allocator and the kernel before the crates whose code calls them.
const STAGES: &[(&str, &[&str])] = &[
    ("kernel (syscalls, sockets, wake-ups)", &["[k] "]),
    (
        "allocator and memcpy (libc)",
        &[
            "malloc", "free", "realloc", "memmove", "memcpy", "memset", "_int_", "cfree",
        ],
    ),
    ("TLS (rustls, ring)", &["rustls", "ring_core", "ring::"]),
    (
        "websocket framing (tungstenite)",
        &["tungstenite", "ws_stream"],
    ),
    ("MQTT (rumqttc)", &["rumqttc", "mqttbytes"]),
    ("JSON (serde_json)", &["serde_json", "serde::"]),
    (
        "spool (SQLite)",
        &["sqlite3", "rusqlite", "iot_cognito_relay::spool"],
    ),
    (
        "socket protocol (ingest)",
        &["iot_cognito_relay::ingest", "iot_cognito_relay::message"],
    ),
    ("publisher", &["iot_cognito_relay::publish"]),
    ("tokio runtime", &["tokio::", "mio::", "parking_lot"]),
    ("other daemon code", &["iot_cognito_relay"]),
    ("Python interpreter", &["libpython"]),
    (
        "awscrt (C: MQTT, websocket, TLS)",
        &["_awscrt", "libs2n", "libcrypto"],
    ),
];

/// A `perf record` of one process, stopped and reported by `finish`.
pub struct Profile {
    perf: Option<Child>,
    data: PathBuf,
}

impl Profile {
    /// Starts sampling `pid` (all its threads) into `dir/name.perf.data`.
    pub fn start(pid: u32, dir: &Path, name: &str) -> Profile {
        std::fs::create_dir_all(dir).expect("profile dir");
        let data = dir.join(format!("{name}.perf.data"));
        let perf = Command::new("perf")
            .args(["record", "-F", "999", "--call-graph", "dwarf,16384", "-o"])
            .arg(&data)
            .arg("-p")
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("perf record (apt-get install linux-perf)");
        // perf needs a moment to attach to every thread.
        std::thread::sleep(Duration::from_millis(500));
        Profile {
            perf: Some(perf),
            data,
        }
    }

    /// Stops sampling; returns the report: share of samples per stage, then per thread, per
    /// library and the top functions, as perf prints them.
    pub fn finish(mut self) -> String {
        if let Some(perf) = self.perf.take() {
            unsafe { libc::kill(perf.id() as i32, libc::SIGINT) };
            let _ = perf.wait_with_output();
        }
        let report = |sort: &str, limit: &str| {
            let out = Command::new("perf")
                .args([
                    "report",
                    "--stdio",
                    "--no-children",
                    "--percent-limit",
                    limit,
                ])
                .args(["-g", "none", "--sort", sort, "-i"])
                .arg(&self.data)
                .output()
                .expect("perf report");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let mut text = String::from("share of CPU samples by stage:\n");
        for (stage, share) in by_stage(&report("dso,sym", "0")) {
            let _ = writeln!(text, "{share:6.1} %  {stage}");
        }
        text.push('\n');
        for sort in ["comm", "comm,dso", "sym"] {
            text.push_str(&report(sort, "1"));
        }
        text
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        if let Some(mut perf) = self.perf.take() {
            let _ = perf.kill();
            let _ = perf.wait();
        }
    }
}

/// Sums perf's `--sort dso,sym` lines (`  12.34%  libc.so.6  [.] malloc`) into `STAGES`,
/// largest first; what matches none is "other".
fn by_stage(report: &str) -> Vec<(&'static str, f64)> {
    let mut shares: BTreeMap<&'static str, f64> = BTreeMap::new();
    for line in report.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let Some((percent, rest)) = line.trim_start().split_once('%') else {
            continue;
        };
        let Ok(percent) = percent.parse::<f64>() else {
            continue;
        };
        let stage = STAGES
            .iter()
            .find(|(_, patterns)| patterns.iter().any(|p| rest.contains(p)))
            .map_or_else(|| sqlite_or_other(rest), |(stage, _)| stage);
        *shares.entry(stage).or_default() += percent;
    }
    let mut shares: Vec<_> = shares.into_iter().collect();
    shares.sort_by(|a, b| b.1.total_cmp(&a.1));
    shares
}

/// SQLite is the only C in the daemon besides ring (matched by name before): its functions
/// (`sqlite3VdbeExec`, `pcache1Fetch`, `yy_reduce`…) are the daemon binary's symbols that are
/// not Rust paths.
fn sqlite_or_other(dso_and_symbol: &str) -> &'static str {
    let Some((dso, symbol)) = dso_and_symbol.split_once("[.] ") else {
        return "other";
    };
    let c_function = !symbol.contains("::") && !symbol.contains('<') && !symbol.contains("rust");
    if dso.trim() == "iot-cognito-relay" && c_function {
        "spool (SQLite)"
    } else {
        "other"
    }
}

/// A process's CPU time so far (user + system, all threads), in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: u64 = fields
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}
