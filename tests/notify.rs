//! The systemd notify protocol as the daemon speaks it, read from a test `NOTIFY_SOCKET`: no
//! systemd needed. The daemon runs offline (AWS unreachable): it must still become ready.

mod harness;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

fn datagrams_for(socket: &UnixDatagram, period: Duration) -> Vec<String> {
    let deadline = Instant::now() + period;
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(len) = socket.recv(&mut buffer) {
            received.push(String::from_utf8_lossy(&buffer[..len]).into_owned());
        }
    }
    received
}

#[test]
fn ready_status_watchdog_and_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = harness::offline_config(dir.path(), "");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
    notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");

    let mut daemon = harness::KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_iot-cognito-relay"))
            .args(["run", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("WATCHDOG_USEC", "1000000")
            .env_remove("RUST_LOG")
            .stderr(std::fs::File::create(dir.path().join("daemon.log")).expect("log"))
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start daemon"),
    );
    let daemon = &mut daemon.0;

    let started = datagrams_for(&notify, Duration::from_millis(2600));
    let first = started.first().expect("a first notification");
    assert!(first.contains("READY=1"), "{started:?}");
    assert!(first.contains("STATUS="), "{started:?}");
    assert!(
        dir.path().join("relay.sock").exists(),
        "ready means the socket listens"
    );
    let pings = started.iter().filter(|d| d.contains("WATCHDOG=1")).count();
    assert!(
        (3..=6).contains(&pings),
        "a ping every half second: {started:?}"
    );

    // SIGHUP: RELOADING=1 with MONOTONIC_USEC, the live parts applied, then READY=1 again.
    let base = std::fs::read_to_string(&config).expect("config");
    std::fs::write(
        &config,
        format!("{base}[publish]\nmax_publishes_per_second = 7\n[log]\nlevel = \"debug\"\n"),
    )
    .expect("config");
    unsafe { libc::kill(daemon.id() as i32, libc::SIGHUP) };
    let reload = datagrams_for(&notify, Duration::from_millis(1000));
    let reloading = reload
        .iter()
        .position(|d| d.contains("RELOADING=1"))
        .expect("RELOADING=1");
    assert!(reload[reloading].contains("MONOTONIC_USEC="), "{reload:?}");
    assert!(
        reload[reloading..].iter().any(|d| d.contains("READY=1")),
        "{reload:?}"
    );
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).expect("log");
    assert!(log.contains("configuration reloaded"), "{log}");
    assert!(log.contains("max_publishes_per_second 100 -> 7"), "{log}");
    assert!(log.contains(r#"log.level "info" -> "debug""#), "{log}");

    // A broken config on SIGHUP is refused; the daemon keeps running on the old one.
    std::fs::write(&config, "[identity\n").expect("config");
    unsafe { libc::kill(daemon.id() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(500));
    assert!(daemon.try_wait().expect("wait").is_none(), "still running");
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).expect("log");
    assert!(
        log.contains("reload failed; keeping the running config"),
        "{log}"
    );

    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let stopping = datagrams_for(&notify, Duration::from_millis(1500));
    assert!(
        stopping.iter().any(|d| d.contains("STOPPING=1")),
        "{stopping:?}"
    );
    let status = daemon.wait().expect("exit");
    assert!(status.success(), "{status:?}");
}

/// A notify socket that went away fails every watchdog ping (here every 0.5 s): the warning is
/// logged once, not per ping.
#[test]
fn a_broken_notify_socket_is_reported_once() {
    const WARNING: &str = "cannot notify systemd";
    let dir = tempfile::tempdir().expect("tempdir");
    let config = harness::offline_config(dir.path(), "");
    let log = dir.path().join("daemon.log");
    let mut daemon = harness::KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_iot-cognito-relay"))
            .args(["run", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", dir.path().join("gone.sock"))
            .env("WATCHDOG_USEC", "1000000")
            .env_remove("RUST_LOG")
            .stderr(std::fs::File::create(&log).expect("log"))
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start daemon"),
    );
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        daemon.0.try_wait().expect("wait").is_none(),
        "the daemon keeps running"
    );
    let text = std::fs::read_to_string(&log).expect("read log");
    assert_eq!(text.matches(WARNING).count(), 1, "{text}");
}
