//! The command line as users meet it: exit codes and one-line errors (SPEC.md, CLI).

use std::path::Path;
use std::process::{Command, Output};

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
    let output = run(&["run", "--config", &path], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
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
