//! The command line as users meet it: exit codes and one-line errors (docs/configuration.md,
//! "Command line").

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_iot-cognito-relay");

const VALID: &str = r#"
[identity]
identity_pool_id = "us-east-1:0b7c5a57-6a4f-4a62-9d36-3f1c0e3b6a11"
secret_id = "us-east-1_AbCdEfGhI_demo-app-user"
"#;

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .output()
        .expect("run binary")
}

fn write(dir: &Path, text: &str) -> String {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write");
    path.display().to_string()
}

/// Exit 2 and exactly one stderr line that contains every `needle`.
fn assert_config_error(output: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one clear line, got: {stderr}"
    );
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} missing in: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn check_config_prints_effective_config_with_defaults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), VALID);
    let output = run(&["check-config", "--config", &path], &[]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let effective: toml::Table = toml::from_str(&text).expect("check-config prints TOML");
    assert_eq!(effective["aws"]["region"].as_str(), Some("us-east-1"));
    assert_eq!(effective["mqtt"]["keep_alive"].as_str(), Some("30s"));
    assert_eq!(effective["spool"]["max_bytes"].as_str(), Some("256MiB"));
    assert_eq!(
        effective["publish"]["max_bytes_per_second"].as_str(),
        Some("512KiB")
    );
}

#[test]
fn env_overrides_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), VALID);
    let output = run(
        &["check-config", "--config", &path],
        &[
            ("IOT_COGNITO_RELAY__SOCKET__PATH", "/tmp/other.sock"),
            ("IOT_COGNITO_RELAY__PUBLISH__MAX_IN_FLIGHT", "7"),
            ("IOT_COGNITO_RELAY__SOCKET__MODE", "0600"),
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let effective: toml::Table =
        toml::from_str(&String::from_utf8_lossy(&output.stdout)).expect("toml");
    assert_eq!(
        effective["socket"]["path"].as_str(),
        Some("/tmp/other.sock")
    );
    assert_eq!(effective["socket"]["mode"].as_str(), Some("0600"));
    assert_eq!(effective["publish"]["max_in_flight"].as_integer(), Some(7));
}

#[test]
fn missing_required_key_exits_2_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "[identity]\nsecret_id = \"s\"\n");
    assert_config_error(
        &run(&["check-config", "--config", &path], &[]),
        &["identity.identity_pool_id", &path],
    );
    assert_config_error(
        &run(&["run", "--config", &path], &[]),
        &["identity.identity_pool_id"],
    );
}

#[test]
fn unknown_key_exits_2_naming_key_and_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        dir.path(),
        &format!("{VALID}\n[spool]\nmax_byte = \"1MiB\"\n"),
    );
    assert_config_error(
        &run(&["check-config", "--config", &path], &[]),
        &["max_byte", &path],
    );
}

#[test]
fn bad_duration_exits_2_naming_the_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        dir.path(),
        &format!("{VALID}\n[shutdown]\ndrain_timeout = \"ten seconds\"\n"),
    );
    assert_config_error(
        &run(&["check-config", "--config", &path], &[]),
        &["drain_timeout", "ten seconds"],
    );
}

#[test]
fn missing_config_file_exits_2() {
    assert_config_error(
        &run(
            &["check-config", "--config", "/nonexistent/config.toml"],
            &[],
        ),
        &["/nonexistent/config.toml"],
    );
}

#[test]
fn usage_error_exits_2() {
    let output = run(&["send", "--qos", "2", "--topic", "t", "x"], &[]);
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn config_from_stack_output_is_accepted_by_check_config() {
    let sample = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/describe-stacks.json"
    );
    let output = run(&["config-from-stack", sample], &[]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), &String::from_utf8_lossy(&output.stdout));
    let check = run(&["check-config", "--config", &path], &[]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, r#"{"Stacks":[{"Outputs":[]}]}"#).expect("write");
    let output = run(&["config-from-stack", &broken.display().to_string()], &[]);
    assert_config_error(&output, &["CognitoIdentityPoolID"]);
}

#[test]
fn send_without_daemon_fails_with_one_line() {
    let output = run(
        &[
            "send",
            "--socket",
            "/nonexistent/relay.sock",
            "--topic",
            "t",
            "1",
        ],
        &[],
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/relay.sock"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

#[test]
fn world_writable_config_or_its_directory_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), VALID);
    let mode = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };

    mode(Path::new(&path), 0o666);
    let output = run(&["check-config", "--config", &path], &[]);
    assert_config_error(&output, &[&path, "writable by every user", "0666"]);

    mode(Path::new(&path), 0o644);
    mode(dir.path(), 0o777);
    let output = run(&["check-config", "--config", &path], &[]);
    assert_config_error(&output, &["directory is writable by every user", "0777"]);

    // Sticky, like /tmp: others cannot replace our file, so it is accepted.
    mode(dir.path(), 0o1777);
    let output = run(&["check-config", "--config", &path], &[]);
    assert!(output.status.success(), "{output:?}");
}

#[test]
fn world_writable_state_dir_is_refused_before_anything_is_opened() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let config = format!(
        "{VALID}\n[state]\ndir = {state:?}\n[socket]\npath = {:?}\n",
        dir.path().join("relay.sock")
    );
    let path = write(dir.path(), &config);
    let output = run_briefly(&["run", "--config", &path]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // A config-type failure: exit 2, so that RestartPreventExitStatus=2 ends the restart loop.
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("writable by every user") && stderr.contains("chmod 700"),
        "{stderr}"
    );
    assert!(
        std::fs::read_dir(&state)
            .expect("read state dir")
            .next()
            .is_none(),
        "nothing was created in the refused state dir"
    );
}

/// Longest a `run` that must fail at start may take before the test calls it hung.
const START_FAILURE_TIMEOUT: Duration = Duration::from_secs(10);

/// `run`-like, for a daemon expected to exit at start: killed (and the test failed) if it is
/// still running after `START_FAILURE_TIMEOUT`.
fn run_briefly(args: &[&str]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start binary");
    let deadline = Instant::now() + START_FAILURE_TIMEOUT;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("collect output");
            panic!(
                "{args:?} still running after {START_FAILURE_TIMEOUT:?}; stderr: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect output")
}

/// A config that would run offline: state and socket in `dir`, AWS unreachable.
fn offline(dir: &Path, extra: &str) -> String {
    write(
        dir,
        &format!(
            "{VALID}\n[aws]\nendpoint_url = \"http://127.0.0.1:1\"\n{extra}\n[socket]\npath = {:?}\n[state]\ndir = {:?}\n",
            dir.join("relay.sock"),
            dir.join("state"),
        ),
    )
}

#[test]
fn group_writable_config_is_refused_unless_its_group_is_root() {
    use std::os::unix::fs::PermissionsExt;
    const NOGROUP: u32 = 65_534;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), VALID);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o664)).expect("chmod");
    std::os::unix::fs::chown(&path, Some(0), Some(NOGROUP)).expect("chgrp (needs root)");
    assert_config_error(
        &run(&["check-config", "--config", &path], &[]),
        &[&path, "writable by group 65534", "0664"],
    );
    assert_config_error(
        &run_briefly(&["run", "--config", &path]),
        &["writable by group 65534"],
    );

    // Group root may write it (root may anyway).
    std::os::unix::fs::chown(&path, Some(0), Some(0)).expect("chgrp root");
    let output = run(&["check-config", "--config", &path], &[]);
    assert!(output.status.success(), "{output:?}");
}

#[test]
fn check_config_loads_the_ca_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = |ca: &Path| {
        write(
            dir.path(),
            &format!(
                "{VALID}\n[mqtt]\nca_file = {:?}\n",
                ca.display().to_string()
            ),
        )
    };

    let missing = dir.path().join("missing.pem");
    let path = config(&missing);
    assert_config_error(
        &run(&["check-config", "--config", &path], &[]),
        &["mqtt.ca_file", "missing.pem"],
    );

    let not_pem = dir.path().join("not-a-certificate.pem");
    std::fs::write(&not_pem, "this is a key, not a certificate\n").expect("write");
    let path = config(&not_pem);
    assert_config_error(
        &run(&["check-config", "--config", &path], &[]),
        &["mqtt.ca_file", "holds no certificate"],
    );

    let broken = dir.path().join("broken.pem");
    std::fs::write(
        &broken,
        "-----BEGIN CERTIFICATE-----\nMIIBnotvalidDER==\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let path = config(&broken);
    assert_config_error(
        &run(&["check-config", "--config", &path], &[]),
        &["mqtt.ca_file", "broken.pem"],
    );

    let good = dir.path().join("ca.pem");
    let openssl = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=cli-test-ca", "-keyout"])
        .arg(dir.path().join("ca.key"))
        .arg("-out")
        .arg(&good)
        .output()
        .expect("run openssl");
    assert!(openssl.status.success(), "{openssl:?}");
    let path = config(&good);
    let output = run(&["check-config", "--config", &path], &[]);
    assert!(output.status.success(), "{output:?}");
}

#[test]
fn check_config_refuses_a_topic_prefix_beyond_iot_limits() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (prefix, why) in [
        // With the separator, 8 '/' before any topic: IoT Core allows 7.
        ("a/b/c/d/e/f/{identity_pool_id}/{identity_id}", "'/'"),
        (&*format!("{}/{{identity_id}}", "x".repeat(220)), "bytes"),
    ] {
        let path = write(
            dir.path(),
            &format!("{VALID}\n[mqtt]\ntopic_prefix = {prefix:?}\n"),
        );
        assert_config_error(
            &run(&["check-config", "--config", &path], &[]),
            &["mqtt.topic_prefix", why],
        );
    }
    let path = write(
        dir.path(),
        &format!("{VALID}\n[mqtt]\ntopic_prefix = \"fleet/{{identity_id}}\"\n"),
    );
    let output = run(&["check-config", "--config", &path], &[]);
    assert!(output.status.success(), "{output:?}");
}

#[test]
fn check_config_refuses_whitespace_in_ids() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (key, line) in [
        (
            "identity.identity_pool_id",
            "identity_pool_id = \"us-east-1:0b7c5a57-6a4f-4a62-9d36-3f1c0e3b6a11 \"",
        ),
        (
            "identity.secret_id",
            "secret_id = \"us-east-1_AbCdEfGhI_demo-app-user\\n\"",
        ),
        (
            "identity.unauth_role_arn",
            "unauth_role_arn = \"arn:aws:iam::123456789012:role/ unauth\"",
        ),
    ] {
        let name = key.rsplit('.').next().expect("key name");
        let text: String = VALID
            .lines()
            .filter(|l| !l.starts_with(&format!("{name} =")))
            .chain([line])
            .collect::<Vec<_>>()
            .join("\n");
        let path = write(dir.path(), &format!("{text}\n"));
        assert_config_error(
            &run(&["check-config", "--config", &path], &[]),
            &[key, "whitespace"],
        );
    }
}

#[test]
fn check_config_refuses_plain_ws_to_a_remote_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    for url in [
        "ws://broker.example.com/mqtt",
        "ws://10.0.0.7:8080/mqtt",
        "ws://user:pw@192.0.2.1/mqtt",
    ] {
        let path = write(dir.path(), &format!("{VALID}\n[mqtt]\nurl = {url:?}\n"));
        let output = run(&["check-config", "--config", &path], &[]);
        assert_config_error(&output, &["mqtt.url", "wss://"]);
        assert!(
            !String::from_utf8_lossy(&output.stderr).contains("pw@"),
            "credentials in a URL stay out of errors"
        );
    }
    for url in [
        "ws://127.0.0.1:1883/mqtt",
        "ws://localhost/mqtt",
        "ws://[::1]:8080/mqtt",
        "wss://broker.example.com/mqtt",
    ] {
        let path = write(dir.path(), &format!("{VALID}\n[mqtt]\nurl = {url:?}\n"));
        let output = run(&["check-config", "--config", &path], &[]);
        assert!(output.status.success(), "{url}: {output:?}");
    }
}

#[test]
fn run_exits_2_when_the_state_dir_or_socket_path_cannot_be_used() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").expect("write");

    // The state dir would have to be created under a regular file.
    let path = offline(dir.path(), "");
    let text = std::fs::read_to_string(&path).expect("read").replace(
        &format!("{:?}", dir.path().join("state")),
        &format!("{:?}", file.join("state")),
    );
    std::fs::write(&path, text).expect("write");
    let output = run_briefly(&["run", "--config", &path]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("state dir"), "{stderr}");

    // Likewise the socket.
    let path = offline(dir.path(), "");
    let text = std::fs::read_to_string(&path).expect("read").replace(
        &format!("{:?}", dir.path().join("relay.sock")),
        &format!("{:?}", file.join("relay.sock")),
    );
    std::fs::write(&path, text).expect("write");
    let output = run_briefly(&["run", "--config", &path]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("relay.sock"), "{stderr}");
}

#[test]
fn run_exits_2_on_a_broken_ca_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "no certificate here\n").expect("write");
    let path = offline(
        dir.path(),
        &format!("[mqtt]\nca_file = {:?}\n", ca.display().to_string()),
    );
    let output = run_briefly(&["run", "--config", &path]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("ca.pem"), "{stderr}");
}

/// Runs the binary, killing it after `limit`; `None` when it had to be killed.
fn run_for(args: &[&str], limit: std::time::Duration) -> Option<Output> {
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run binary");
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().ok().flatten().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().ok()
}

#[test]
fn send_and_status_give_up_on_a_daemon_that_never_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("stuck.sock");
    // A daemon that accepts and then never answers nor closes (hung, or stopped with SIGSTOP).
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    let socket = path.display().to_string();
    let started = std::time::Instant::now();
    let status = run_for(
        &["status", "--socket", &socket],
        std::time::Duration::from_secs(20),
    )
    .expect("status gives up by itself, with its default timeout");
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert_eq!(status.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("no answer from the daemon within 10s"),
        "{stderr}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(15));

    let send = run_for(
        &[
            "send",
            "--socket",
            &socket,
            "--timeout",
            "1s",
            "--topic",
            "t",
            "1",
        ],
        std::time::Duration::from_secs(20),
    )
    .expect("send gives up by itself");
    let stderr = String::from_utf8_lossy(&send.stderr);
    assert_eq!(send.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("no answer from the daemon within 1s"),
        "{stderr}"
    );
}

/// check-config knows fleet mode's device name (derived from /etc/machine-id when
/// not set, which the machine running the tests has) and refuses a name outside the rule.
#[test]
fn check_config_shows_the_device_name_and_refuses_a_bad_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), VALID);
    let output = run(&["check-config", "--config", &path], &[]);
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    let effective: toml::Table = toml::from_str(&text).expect("still TOML");
    assert_eq!(effective["identity"]["device_name"].as_str(), Some(""));
    assert_eq!(effective["identity"]["start_delay"].as_str(), Some("30s"));
    assert!(
        text.contains("# self-register stacks: this device registers as \"dev-"),
        "{text}"
    );
    assert!(text.contains("derived from /etc/machine-id"), "{text}");

    let named = write(dir.path(), &format!("{VALID}device_name = \"gate-7\"\n"));
    let output = run(&["check-config", "--config", &named], &[]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("registers as \"gate-7\""), "{text}");

    for bad in ["gate 7", "gate/7", "gäte", "a@b"] {
        let path = write(dir.path(), &format!("{VALID}device_name = {bad:?}\n"));
        let output = run(&["check-config", "--config", &path], &[]);
        assert_config_error(&output, &["identity.device_name", "not a device name"]);
    }
    let long = "x".repeat(65);
    let path = write(dir.path(), &format!("{VALID}device_name = {long:?}\n"));
    assert_config_error(
        &run(&["check-config", "--config", &path], &[]),
        &["identity.device_name"],
    );
    let path = write(dir.path(), &format!("{VALID}start_delay = \"2h\"\n"));
    assert_config_error(
        &run(&["check-config", "--config", &path], &[]),
        &["identity.start_delay", "at most 1h"],
    );
}

/// Kills a child (a daemon started by a test) when the test ends, also on failure.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The documented pipe `some-sensor | iot-cognito-relay send --topic t` with a sensor slower
/// than `socket.idle_timeout`: the daemon closes the idle connection between two lines, and
/// `send` connects again instead of losing the next line to a broken pipe.
#[test]
fn send_from_a_slow_pipe_survives_the_daemons_idle_close() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("relay.sock");
    let config = write(
        dir.path(),
        &format!(
            "{VALID}\n[aws]\nendpoint_url = \"http://127.0.0.1:1\"\n\
             [socket]\npath = {socket:?}\nidle_timeout = \"1s\"\n[state]\ndir = {:?}\n",
            dir.path().join("state"),
        ),
    );
    let _daemon = Running(
        Command::new(BIN)
            .args(["run", "--config", &config])
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start daemon"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "the daemon never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    let socket = socket.display().to_string();
    let spooled = || {
        let output = run(&["status", "--json", "--socket", &socket], &[]);
        let status: serde_json::Value = serde_json::from_slice(&output.stdout).expect("status");
        status["spool_messages"].as_u64().expect("spool_messages")
    };
    let mut sender = Command::new(BIN)
        .args(["send", "--socket", &socket, "--topic", "sensors/slow"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start send");
    let mut sensor = sender.stdin.take().expect("stdin");
    for reading in 1..=2u64 {
        use std::io::Write;
        writeln!(sensor, "{{\"c\": {reading}}}").expect("write a reading");
        let deadline = Instant::now() + Duration::from_secs(10);
        while spooled() < reading {
            assert!(Instant::now() < deadline, "reading {reading} never arrived");
            std::thread::sleep(Duration::from_millis(100));
        }
        // Quieter than socket.idle_timeout: the daemon closes the connection.
        std::thread::sleep(Duration::from_millis(2500));
    }
    drop(sensor);
    let output = sender.wait_with_output().expect("send ends");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(spooled(), 2);
}

/// The clients of every socket need file descriptors; a config whose sum
/// passes the hard `RLIMIT_NOFILE` is refused at start (exit 2, one line naming the keys and
/// the limit) instead of failing the daemon's own connections with EMFILE later. Within the
/// hard limit the daemon raises its soft limit and starts.
#[test]
fn run_refuses_more_clients_than_file_descriptors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = offline(dir.path(), "");
    let text = std::fs::read_to_string(&path)
        .expect("read")
        .replace("[socket]\n", "[socket]\nmax_clients = 1000\n");
    std::fs::write(&path, text).expect("write");
    let under = |nofile: &str| {
        let mut child = Command::new("prlimit")
            .arg(format!("--nofile={nofile}"))
            .arg(BIN)
            .args(["run", "--config", &path])
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("prlimit");
        std::thread::sleep(Duration::from_secs(2));
        let _ = child.kill();
        child.wait_with_output().expect("output")
    };
    let refused = under("1024:1024");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("socket.max_clients") && stderr.contains("1256") && stderr.contains("1024"),
        "{stderr}"
    );
    let raised = under("1024:4096");
    let stderr = String::from_utf8_lossy(&raised.stderr);
    assert_ne!(raised.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("raised the file descriptor limit"),
        "{stderr}"
    );
}

/// Client commands take the socket from the config's `socket.path` (`--config`,
/// default path) unless `--socket` says otherwise, and a failed connect names its cause.
#[test]
fn client_commands_find_the_socket_in_the_config_and_say_why_they_cannot_connect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("elsewhere.sock");
    let path = write(
        dir.path(),
        &format!(
            "{VALID}\n[socket]\npath = {:?}\n",
            socket.display().to_string()
        ),
    );
    let output = run(&["status", "--config", &path], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("elsewhere.sock")
            && stderr.contains("the daemon is not running, or its socket.path differs"),
        "{stderr}"
    );

    // A config named on the command line that exists must load; an absent one means the
    // default socket.
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "[socket\n").expect("write");
    let output = run(&["status", "--config", &broken.display().to_string()], &[]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let missing = dir.path().join("missing.toml").display().to_string();
    let output = run(&["status", "--config", &missing], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("/run/iot-cognito-relay/relay.sock"),
        "{stderr}"
    );

    // A socket the user may not open: the group is the fix.
    let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    let output = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            BIN,
            "status",
            "--socket",
        ])
        .arg(&socket)
        .output()
        .expect("setpriv");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("add your user to the iot-cognito-relay group"),
        "{stderr}"
    );
}
