//! The socket protocol from real clients on the real socket: every error code, hostile input,
//! and the examples of docs/protocol.md run as written.

mod harness;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use harness::{Cloud, Daemon, numbers};
use serde_json::Value;

const ANSWER: Duration = Duration::from_secs(10);

/// Sends raw bytes (newline included by the caller) and returns the one answer.
fn answer_to(daemon: &Daemon, bytes: &[u8]) -> Value {
    let mut client = daemon.connect();
    client.send_raw(bytes);
    client.read_answer(ANSWER).expect("an answer")
}

fn error_of(daemon: &Daemon, line: &str) -> String {
    let answer = answer_to(daemon, format!("{line}\n").as_bytes());
    assert_eq!(answer["ok"], false, "{line} → {answer}");
    answer["error"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn every_error_code_from_a_real_client_and_the_daemon_keeps_delivering() {
    let cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = cloud.start_daemon(&cloud.config(dir.path(), true, ""));

    let deep = "a/b/c/d/e/f/g";
    let long = "x".repeat(200);
    let big_payload = format!(
        r#"{{"topic":"t","payload":"{}","id":1}}"#,
        "x".repeat(128 * 1024 + 1)
    );
    let cases: Vec<(String, &str)> = vec![
        ("not json at all".into(), "invalid_json"),
        ("[1,2,3]".into(), "invalid_json"),
        (
            r#"{"topic":"t","payload":1,"id":{"no":"objects"}}"#.into(),
            "invalid_json",
        ),
        (r#"{"payload":1,"id":1}"#.into(), "missing_field"),
        (r#"{"topic":"t","id":1}"#.into(), "missing_field"),
        (r#"{"topic":"a/#","payload":1}"#.into(), "invalid_topic"),
        (r#"{"topic":"a/+/b","payload":1}"#.into(), "invalid_topic"),
        (
            r#"{"topic":"$aws/things","payload":1}"#.into(),
            "invalid_topic",
        ),
        (
            r#"{"topic":"a\u0000b","payload":1}"#.into(),
            "invalid_topic",
        ),
        (
            r#"{"topic":"/leading","payload":1}"#.into(),
            "invalid_topic",
        ),
        (
            format!(r#"{{"topic":"{long}","payload":1}}"#),
            "invalid_topic",
        ),
        (
            format!(r#"{{"topic":"{deep}","payload":1}}"#),
            "invalid_topic",
        ),
        (big_payload, "payload_too_large"),
        (r#"{"topic":"t","payload":1,"qos":2}"#.into(), "invalid_qos"),
    ];
    for (line, code) in &cases {
        assert_eq!(
            &error_of(&daemon, line),
            code,
            "{}",
            &line[..line.len().min(80)]
        );
    }
    // Invalid UTF-8 and binary garbage.
    let answer = answer_to(&daemon, b"{\"topic\":\"t\",\"payload\":\"\xff\xfe\"}\n");
    assert_eq!(answer["error"], "invalid_json");
    let answer = answer_to(&daemon, b"\x00\x01\x02\xff\xfe garbage \x7f\n");
    assert_eq!(answer["error"], "invalid_json");
    // A 1 MiB line: one line_too_long, then the connection keeps working.
    let mut client = daemon.connect();
    client.send_raw(&vec![b'x'; 1024 * 1024]);
    client.send_raw(b"\n{\"topic\":\"t\",\"payload\":1,\"id\":\"after\"}\n");
    assert_eq!(
        client.read_answer(ANSWER).expect("answer")["error"],
        "line_too_long"
    );
    assert_eq!(client.read_answer(ANSWER).expect("answer")["ok"], true);
    // A half line, then disconnect.
    let mut half = UnixStream::connect(&daemon.socket).expect("connect");
    half.write_all(br#"{"topic":"t","payl"#).expect("write");
    drop(half);

    // The daemon still runs and delivers a well-formed message from another client.
    let mut client = daemon.connect();
    client.send_line(r#"{"topic":"still/alive","payload":{"n":7},"id":"x"}"#);
    assert_eq!(client.read_answer(ANSWER).expect("answer")["ok"], true);
    let received = subscriber.collect_until(Duration::from_secs(60), |r| numbers(r).contains(&7));
    assert!(numbers(&received).contains(&7));
    assert!(!daemon.log_text().contains("panicked"));
}

#[test]
fn answers_keep_the_id_and_come_in_line_order() {
    let cloud = Cloud::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = cloud.start_daemon(&cloud.config(dir.path(), true, ""));
    let mut client = daemon.connect();
    client.send_raw(
        concat!(
            r#"{"topic":"t","payload":1,"id":"a"}"#,
            "\n",
            r##"{"topic":"#","payload":1,"id":"b"}"##,
            "\n",
            r#"{"topic":"t","payload":1}"#,
            "\n",
            r#"{"op":"status","id":"c"}"#,
            "\n",
            r#"{"topic":"t","payload_base64":"AAE=","id":4}"#,
            "\n",
        )
        .as_bytes(),
    );
    let ids: Vec<Value> = (0..4)
        .map(|_| client.read_answer(ANSWER).expect("answer")["id"].clone())
        .collect();
    assert_eq!(
        ids,
        vec![Value::from("a"), "b".into(), "c".into(), 4.into()]
    );
}

#[test]
fn docs_examples_work_as_written() {
    let cloud = Cloud::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = cloud.start_daemon(&cloud.config(dir.path(), true, ""));
    let socket = daemon.socket.display().to_string();
    let default = "/run/iot-cognito-relay/relay.sock";

    let shell = harness::doc_example("Shell, with", "sh")
        .lines()
        .take_while(|l| !l.starts_with("# or the bundled"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(default, &socket);
    let output = Command::new("bash")
        .args(["-c", &shell])
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        stdout.trim(),
        r#"{"id":1,"ok":true}"#,
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let python =
        harness::doc_example("Python, standard library only", "python").replace(default, &socket);
    harness::run_example("python3", &python, None);

    let mut answers = String::new();
    let mut stream = UnixStream::connect(&daemon.socket).expect("connect");
    stream.write_all(b"{\"op\":\"status\"}\n").expect("write");
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    stream.read_to_string(&mut answers).expect("read");
    let answer: Value = serde_json::from_str(answers.trim()).expect("status json");
    assert_eq!(answer["ok"], true);
    let status = &answer["status"];
    let accepted = status["spool_messages"].as_u64().unwrap_or(0)
        + status["published_total"].as_u64().unwrap_or(0);
    assert_eq!(
        accepted, 2,
        "both examples' messages were accepted: {status}"
    );
}

#[test]
fn peers_outside_allowed_uids_and_gids_are_refused_with_a_line() {
    let cloud = Cloud::start();
    let dir = tempfile::tempdir().expect("tempdir");
    // The test runs as root (uid 0, gid 0): neither is allowed here.
    let daemon = cloud.start_daemon(&with_socket_keys(
        cloud.config(dir.path(), true, ""),
        "allowed_uids = [4242]\nallowed_gids = [4242]\n",
    ));
    let mut client = daemon.connect();
    let answer = client.read_answer(ANSWER).expect("a refusal line");
    assert_eq!(answer["ok"], false);
    assert_eq!(answer["error"], "permission_denied");
    assert!(
        answer["message"]
            .as_str()
            .is_some_and(|m| m.contains("uid 0")),
        "{answer}"
    );
    assert_eq!(client.read_to_end(), "", "then the connection is closed");
    assert!(daemon.log_text().contains("refused a client"));

    let other = tempfile::tempdir().expect("tempdir");
    let allowed = cloud.start_daemon(&with_socket_keys(
        cloud.config(other.path(), true, ""),
        "allowed_gids = [0]\n",
    ));
    let mut client = allowed.connect();
    client.send_line(r#"{"topic":"t","payload":1,"id":1}"#);
    assert_eq!(client.read_answer(ANSWER).expect("answer")["ok"], true);
}

/// Adds keys to the `[socket]` section of a harness config.
fn with_socket_keys(config: std::path::PathBuf, keys: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&config).expect("config");
    let text = text.replace("[socket]\n", &format!("[socket]\n{keys}"));
    std::fs::write(&config, text).expect("write");
    config
}

#[test]
fn raw_socket_turns_each_record_into_a_message() {
    let cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("raw.sock");
    let extra = format!(
        "\n[[socket.raw]]\npath = {:?}\ntopic = \"sensors/raw\"\ndelimiter = \";\"\n",
        raw.display().to_string()
    );
    let daemon = cloud.start_daemon(&cloud.config(dir.path(), true, &extra));
    let mut sensor = UnixStream::connect(&raw).expect("raw socket");
    sensor
        .write_all(b"21.5;21.6;;not json at all;")
        .expect("write");
    drop(sensor);
    let received = subscriber.collect_until(Duration::from_secs(60), |r| r.len() >= 3);
    let payloads: Vec<&str> = received.iter().map(|r| r.payload.as_str()).collect();
    assert_eq!(
        payloads,
        ["21.5", "21.6", "not json at all"],
        "{}",
        daemon.log_text()
    );
    assert!(received.iter().all(|r| r.topic.ends_with("/sensors/raw")));
}

#[test]
fn a_half_line_left_idle_is_answered_and_closed() {
    let cloud = Cloud::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = cloud.start_daemon(&with_socket_keys(
        cloud.config(dir.path(), true, ""),
        "idle_timeout = \"1s\"\n",
    ));
    let mut client = daemon.connect();
    client.send_raw(br#"{"topic":"t","payl"#);
    let answer = client.read_answer(ANSWER).expect("answer");
    assert_eq!(answer["error"], "invalid_json");
    assert!(
        answer["message"]
            .as_str()
            .is_some_and(|m| m.contains("idle")),
        "{answer}"
    );
    assert_eq!(client.read_to_end(), "");
}

#[test]
fn many_clients_and_deaf_clients_keep_the_daemon_responsive_and_bounded() {
    let mut cloud = Cloud::start();
    cloud.kill_broker();
    let dir = tempfile::tempdir().expect("tempdir");
    // The test's 550 clients play many apps but all run as root: one uid may hold them all.
    let daemon = cloud.start_daemon(&with_socket_keys(
        cloud.config(dir.path(), true, ""),
        "max_clients_per_uid = 1000\n",
    ));
    let socket = daemon.socket.clone();

    // 50 clients that write 2,000 messages each and never read a single answer.
    let deaf: Vec<UnixStream> = (0..50)
        .map(|c| {
            let mut stream = UnixStream::connect(&socket).expect("connect");
            let mut lines = String::new();
            for n in 0..2000 {
                lines.push_str(&format!(
                    "{{\"topic\":\"deaf/{c}\",\"payload\":{{\"n\":{n}}},\"id\":{n}}}\n"
                ));
            }
            stream.write_all(lines.as_bytes()).expect("write");
            stream
        })
        .collect();

    // 500 clients at once, each sending one message and waiting for its answer.
    let started = std::time::Instant::now();
    let clients: Vec<_> = (0..500)
        .map(|c| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut stream = UnixStream::connect(&socket).expect("connect");
                stream
                    .write_all(
                        format!("{{\"topic\":\"many\",\"payload\":{c},\"id\":{c}}}\n").as_bytes(),
                    )
                    .expect("write");
                stream
                    .set_read_timeout(Some(Duration::from_secs(60)))
                    .expect("timeout");
                let mut answer = String::new();
                std::io::BufRead::read_line(&mut std::io::BufReader::new(stream), &mut answer)
                    .expect("read");
                answer.contains("\"ok\":true")
            })
        })
        .collect();
    let accepted = clients
        .into_iter()
        .map(|c| c.join().unwrap_or(false))
        .filter(|ok| *ok)
        .count();
    let elapsed = started.elapsed();
    assert_eq!(
        accepted, 500,
        "every one of 500 concurrent clients is answered"
    );

    // The deaf clients' messages are all stored, though nobody reads their answers.
    daemon.wait_status("every deaf message stored", Duration::from_secs(60), |s| {
        s["spool_messages"] == 50 * 2000 + 500
    });
    let rss = harness::peak_rss_kib(daemon.process.pid() as u32);
    eprintln!(
        "500 clients answered in {elapsed:?} beside 50 deaf clients; daemon peak RSS {rss} KiB"
    );
    assert!(rss < 150 * 1024, "memory stays bounded: {rss} KiB");
    drop(deaf);
}

#[test]
fn send_and_status_commands_end_to_end() {
    let cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = cloud.start_daemon(&cloud.config(dir.path(), true, ""));
    let bin = env!("CARGO_BIN_EXE_iot-cognito-relay");
    let socket = daemon.socket.display().to_string();
    let run = |args: &[&str], stdin: &str| {
        let mut child = Command::new(bin)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("stdin");
        child.wait_with_output().expect("output")
    };

    let one = run(
        &["send", "--socket", &socket, "--topic", "cli", r#"{"n": 1}"#],
        "",
    );
    assert_eq!(
        one.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );
    let lines = run(
        &["send", "--socket", &socket, "--topic", "cli"],
        "{\"n\": 2}\n{\"n\": 3}\n",
    );
    assert_eq!(lines.status.code(), Some(0));
    let raw = run(
        &["send", "--socket", &socket, "--json"],
        "{\"topic\":\"cli\",\"payload\":{\"n\":4}}\n",
    );
    assert_eq!(
        raw.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&raw.stderr)
    );
    let bad = run(&["send", "--socket", &socket, "--topic", "a/#", "1"], "");
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid_topic"));
    let mixed = run(
        &["send", "--socket", &socket, "--json"],
        "{\"topic\":\"cli\",\"payload\":{\"n\":5}}\nnot json\n",
    );
    assert_eq!(mixed.status.code(), Some(1), "one of two refused");

    let received = subscriber.collect_until(Duration::from_secs(60), |r| numbers(r).len() >= 5);
    let mut got = numbers(&received);
    got.sort_unstable();
    assert_eq!(got, vec![1, 2, 3, 4, 5]);

    let human = run(&["status", "--socket", &socket], "");
    assert_eq!(human.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&human.stdout).contains("state:"));
    let json = run(&["status", "--socket", &socket, "--json"], "");
    let status: Value = serde_json::from_slice(&json.stdout).expect("status --json is JSON");
    assert!(status["published_total"].as_u64() >= Some(5), "{status}");
}

#[test]
fn a_second_instance_on_the_same_socket_is_refused() {
    let cloud = Cloud::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = cloud.config(dir.path(), true, "");
    let daemon = cloud.start_daemon(&config);
    // Another state dir, so that the socket check speaks (the same state dir is refused even
    // earlier, by its lock: tests/publish.rs).
    let other_state = tempfile::tempdir().expect("tempdir");
    let output = Command::new(env!("CARGO_BIN_EXE_iot-cognito-relay"))
        .args(["run", "--config"])
        .arg(&config)
        .env("IOT_COGNITO_RELAY__STATE__DIR", other_state.path())
        .output()
        .expect("second instance");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("another instance is already listening"),
        "{stderr}"
    );
    // The first one is unharmed.
    let mut client = daemon.connect();
    client.send_line(r#"{"op":"status","id":1}"#);
    assert_eq!(client.read_answer(ANSWER).expect("answer")["ok"], true);
}

/// A daemon without any cloud (AWS unreachable) for the local interface alone: it accepts into
/// its spool as a device that lost its network does. Killed on drop.
struct Offline {
    child: Option<std::process::Child>,
    dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl Offline {
    /// Writes the config (`socket_keys` go into `[socket]`, `extra` at the end) and spawns.
    fn spawn(socket_keys: &str, extra: &str) -> Offline {
        let dir = tempfile::tempdir().expect("tempdir");
        Offline::spawn_in(dir, socket_keys, extra)
    }

    fn spawn_in(dir: tempfile::TempDir, socket_keys: &str, extra: &str) -> Offline {
        let config = with_socket_keys(harness::offline_config(dir.path(), extra), socket_keys);
        let log = dir.path().join("daemon.log");
        let child = Command::new(env!("CARGO_BIN_EXE_iot-cognito-relay"))
            .args(["run", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start daemon");
        let socket = dir.path().join("relay.sock");
        Offline {
            child: Some(child),
            dir,
            socket,
            log,
        }
    }

    /// Spawns and waits until the socket answers.
    fn start(socket_keys: &str, extra: &str) -> Offline {
        let mut daemon = Offline::spawn(socket_keys, extra);
        daemon.wait_ready();
        daemon
    }

    fn wait_ready(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&self.socket).is_err() {
            assert!(
                self.exited(Duration::ZERO).is_none(),
                "daemon exited at start: {}",
                self.log_text()
            );
            assert!(
                std::time::Instant::now() < deadline,
                "no socket: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The exit status if the daemon ends within `timeout`.
    fn exited(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn status(&self) -> Value {
        let mut client = harness::LocalApp::connect(&self.socket);
        client.send_line(r#"{"op":"status"}"#);
        client.read_answer(ANSWER).expect("status")["status"].clone()
    }
}

impl Drop for Offline {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn an_id_over_128_bytes_is_invalid_id_and_a_deaf_client_with_huge_ids_stays_bounded() {
    let daemon = Offline::start("", "");
    let mut client = harness::LocalApp::connect(&daemon.socket);
    let at_limit = "i".repeat(128);
    client.send_line(&format!(r#"{{"topic":"t","payload":1,"id":"{at_limit}"}}"#));
    let answer = client.read_answer(ANSWER).expect("answer");
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["id"], at_limit.as_str());
    client.send_line(&format!(
        r#"{{"topic":"t","payload":1,"id":"{}"}}"#,
        "i".repeat(129)
    ));
    let answer = client.read_answer(ANSWER).expect("answer");
    assert_eq!(answer["error"], "invalid_id", "{answer}");
    assert!(answer.get("id").is_none(), "the long id is not echoed");

    // A client that never reads, sending lines with 200 KiB ids: before, every answer echoed
    // the id and a deaf client's queues (1,024 answers and 1,024 lines in flight) held them.
    const LINES: usize = 600;
    let huge = "h".repeat(200 * 1024);
    let mut deaf = UnixStream::connect(&daemon.socket).expect("connect");
    let writer = std::thread::spawn(move || {
        for _ in 0..LINES {
            let line = format!("{{\"topic\":\"a/#\",\"payload\":1,\"id\":\"{huge}\"}}\n");
            if deaf.write_all(line.as_bytes()).is_err() {
                break;
            }
        }
        deaf
    });
    let deaf = writer.join().expect("writer");
    // The daemon has read nearly all of it (the rest sits in the socket buffer) and has had
    // time to give up on the deaf client.
    std::thread::sleep(Duration::from_secs(3));
    let rss = harness::peak_rss_kib(daemon.pid());
    eprintln!(
        "deaf client, {LINES} lines with 200 KiB ids ({} MiB written): daemon peak RSS (VmHWM) {rss} KiB",
        LINES * 200 / 1024
    );
    assert!(rss < 64 * 1024, "memory stays bounded: {rss} KiB");
    // Still serving others.
    let mut other = harness::LocalApp::connect(&daemon.socket);
    other.send_line(r#"{"topic":"t","payload":2,"id":2}"#);
    assert_eq!(other.read_answer(ANSWER).expect("answer")["ok"], true);
    drop(deaf);
}

#[test]
fn a_connection_that_sends_nothing_is_closed_after_idle_timeout() {
    let daemon = Offline::start("idle_timeout = \"1s\"\nmax_clients = 2\n", "");
    let started = std::time::Instant::now();
    let mut silent = harness::LocalApp::connect(&daemon.socket);
    let mut after_a_line = harness::LocalApp::connect(&daemon.socket);
    after_a_line.send_line(r#"{"topic":"t","payload":1,"id":1}"#);
    assert_eq!(
        after_a_line.read_answer(ANSWER).expect("answer")["ok"],
        true
    );
    // None at end of stream, or when the 10 s read timeout runs out (which the time tells).
    assert_eq!(silent.read_answer(Duration::from_secs(10)), None);
    assert_eq!(after_a_line.read_answer(Duration::from_secs(10)), None);
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(8),
        "silent connections closed after idle_timeout: {elapsed:?}"
    );
    // Both slots are free again.
    let mut next = harness::LocalApp::connect(&daemon.socket);
    next.send_line(r#"{"op":"status","id":"s"}"#);
    assert_eq!(next.read_answer(ANSWER).expect("answer")["ok"], true);
}

#[test]
fn a_file_that_is_not_a_socket_is_never_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("relay.sock");
    std::fs::write(&path, "precious").expect("write");
    let mut daemon = Offline::spawn_in(dir, "", "");
    let status = daemon.exited(Duration::from_secs(20));
    let log = daemon.log_text();
    // A path that names some other file is the operator's to fix: exit 2, no restart loop.
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(2),
        "refuses to start: {log}"
    );
    assert!(log.contains("not a socket"), "{log}");
    assert_eq!(
        std::fs::read_to_string(daemon.dir.path().join("relay.sock")).ok(),
        Some("precious".into())
    );
}

#[test]
fn a_live_socket_with_a_full_backlog_is_left_alone() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("relay.sock");
    // A live instance under load: it listens, but its backlog is full, so connecting gives
    // EAGAIN instead of a connection.
    let mut live = Command::new("python3")
        .args([
            "-c",
            "import socket,sys,time\n\
             s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(0)\n\
             held=[]\n\
             while True:\n\
             \x20   c=socket.socket(socket.AF_UNIX); c.setblocking(False)\n\
             \x20   try: c.connect(sys.argv[1])\n\
             \x20   except BlockingIOError: break\n\
             \x20   held.append(c)\n\
             print('full', flush=True); time.sleep(60)\n",
        ])
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(live.stdout.take().expect("stdout")),
        &mut ready,
    )
    .expect("read");
    assert_eq!(ready.trim(), "full");
    let inode = std::fs::metadata(&path).expect("socket").ino();

    let mut daemon = Offline::spawn_in(dir, "", "");
    let status = daemon.exited(Duration::from_secs(20));
    let log = daemon.log_text();
    let _ = live.kill();
    let _ = live.wait();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{log}");
    assert!(
        log.contains("another instance is already listening"),
        "{log}"
    );
    assert_eq!(
        std::fs::metadata(daemon.dir.path().join("relay.sock"))
            .map(|m| m.ino())
            .ok(),
        Some(inode),
        "the live instance's socket is still there"
    );
}

/// Throwaway system users and groups, removed on drop.
struct Accounts {
    users: Vec<String>,
    groups: Vec<String>,
}

impl Accounts {
    fn run(args: &[&str]) {
        let status = Command::new(args[0])
            .args(&args[1..])
            .status()
            .expect(args[0]);
        assert!(status.success(), "{args:?}");
    }

    fn gid(group: &str) -> u32 {
        let out = Command::new("getent")
            .args(["group", group])
            .output()
            .expect("getent");
        String::from_utf8_lossy(&out.stdout)
            .split(':')
            .nth(2)
            .and_then(|gid| gid.trim().parse().ok())
            .expect("gid")
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        for user in &self.users {
            let _ = Command::new("userdel").arg(user).status();
        }
        for group in self.groups.iter().chain(&self.users) {
            let _ = Command::new("groupdel")
                .arg(group)
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// A status request from `user` (its own groups, as a login would set them), the answer line.
fn status_as(user: &str, socket: &std::path::Path) -> Value {
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            user,
            "--regid",
            user,
            "--init-groups",
            "/usr/bin/python3",
            "-c",
        ])
        .arg(
            "import socket,sys\n\
             s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n\
             try: s.sendall(b'{\"op\":\"status\",\"id\":1}\\n')\n\
             except OSError: pass  # refused: the daemon answered and closed first\n\
             print(s.makefile().readline(), end='')\n",
        )
        .arg(socket)
        .output()
        .expect("setpriv");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "answer to {user}: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn supplementary_groups_count_for_allowed_gids() {
    let tag = std::process::id() % 100_000;
    let group = format!("icr-apps-{tag}");
    let member = format!("icr-app-{tag}");
    let outsider = format!("icr-out-{tag}");
    let _accounts = Accounts {
        users: vec![member.clone(), outsider.clone()],
        groups: vec![group.clone()],
    };
    Accounts::run(&["groupadd", &group]);
    // Each user's primary group is its own; the member joins the apps group the way
    // docs/operations.md says (usermod -aG).
    Accounts::run(&["useradd", "-M", "-U", "-s", "/usr/sbin/nologin", &member]);
    Accounts::run(&["useradd", "-M", "-U", "-s", "/usr/sbin/nologin", &outsider]);
    Accounts::run(&["usermod", "-aG", &group, &member]);
    let gid = Accounts::gid(&group);
    assert_ne!(Accounts::gid(&member), gid);

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let mut daemon = Offline::spawn_in(
        dir,
        &format!("mode = \"0666\"\nallowed_gids = [{gid}]\n"),
        "",
    );
    daemon.wait_ready();
    let answer = status_as(&member, &daemon.socket);
    assert_eq!(answer["ok"], true, "{answer}\n{}", daemon.log_text());
    let answer = status_as(&outsider, &daemon.socket);
    assert_eq!(answer["error"], "permission_denied", "{answer}");
}

#[test]
fn repeated_accept_errors_are_logged_once() {
    let daemon = Offline::start("", "[log]\nlevel = \"info\"\n");
    let pid = daemon.pid();
    // No file descriptor left for one more client: every accept fails with EMFILE, and is
    // retried every 100 ms while the client waits in the backlog. The fewest open over a
    // second: the offline identity step's retries open sockets and CA files for moments.
    let open = (0..20)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(50));
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .expect("fds")
                .count()
        })
        .min()
        .unwrap_or_default();
    // The soft limit only: raising it back needs no privilege.
    let limit = |n: usize| {
        let status = Command::new("prlimit")
            .args(["--pid", &pid.to_string(), &format!("--nofile={n}:")])
            .status()
            .expect("prlimit");
        assert!(status.success());
    };
    // One below the fewest: not one is free for the next accept.
    limit(open.saturating_sub(1));
    let mut waiting = harness::LocalApp::connect(&daemon.socket);
    std::thread::sleep(Duration::from_secs(3));
    limit(1024);
    waiting.send_line(r#"{"op":"status","id":1}"#);
    assert_eq!(
        waiting
            .read_answer(ANSWER)
            .expect("served once fds are back")["ok"],
        true
    );
    let log = daemon.log_text();
    let warnings = log.matches("accept failed").count();
    assert_eq!(warnings, 1, "one line for a repeating accept error:\n{log}");
    assert!(daemon.status()["state"].is_string());
}

/// Seconds until the offline daemon's spool holds `count` messages.
fn until_spooled(daemon: &Offline, count: u64, started: std::time::Instant) -> f64 {
    let deadline = started + Duration::from_secs(120);
    while daemon.status()["spool_messages"].as_u64() < Some(count) {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    started.elapsed().as_secs_f64()
}

#[test]
fn raw_records_are_stored_about_as_fast_as_json_lines() {
    const RECORDS: u64 = 2000;
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("raw.sock");
    let mut daemon = Offline::spawn_in(
        dir,
        "",
        &format!("[[socket.raw]]\npath = {raw:?}\ntopic = \"sensors/raw\"\n"),
    );
    daemon.wait_ready();

    // The JSON socket pipelines: lines without an id, nothing answered.
    let mut json = UnixStream::connect(&daemon.socket).expect("connect");
    let lines: String = (0..RECORDS)
        .map(|n| format!("{{\"topic\":\"j\",\"payload\":{n}}}\n"))
        .collect();
    let started = std::time::Instant::now();
    json.write_all(lines.as_bytes()).expect("write");
    let json_rate = RECORDS as f64 / until_spooled(&daemon, RECORDS, started);

    let mut sensor = UnixStream::connect(&raw).expect("raw socket");
    let records: String = (0..RECORDS).map(|n| format!("{n}\n")).collect();
    let started = std::time::Instant::now();
    sensor.write_all(records.as_bytes()).expect("write");
    let raw_rate = RECORDS as f64 / until_spooled(&daemon, 2 * RECORDS, started);
    eprintln!(
        "{RECORDS} records: raw socket {raw_rate:.0} records/s, JSON socket {json_rate:.0} lines/s"
    );
    // Before, every raw record waited for its own fsync: a small fraction of the JSON rate.
    assert!(
        raw_rate > json_rate / 4.0,
        "raw {raw_rate:.0}/s vs JSON {json_rate:.0}/s"
    );
}

#[test]
fn send_json_with_a_null_id_is_answered_and_exits_0() {
    let daemon = Offline::start("", "");
    let mut child = Command::new(env!("CARGO_BIN_EXE_iot-cognito-relay"))
        .args(["send", "--json", "--socket"])
        .arg(&daemon.socket)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("send");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"{\"topic\":\"t\",\"payload\":1,\"id\":null}\n")
        .expect("stdin");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("send --json with \"id\": null hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    let _ = child
        .stderr
        .take()
        .map(|mut e| e.read_to_string(&mut stderr));
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(daemon.status()["spool_messages"], 1);
}

/// A connection the daemon keeps: one answered `too_many_connections` is retried for up to 5 s.
fn connect_once_a_slot_is_free(socket: &std::path::Path) -> std::os::unix::net::UnixStream {
    use std::io::Read;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                stream.set_read_timeout(None).expect("timeout");
                return stream;
            }
            _ => {
                assert!(std::time::Instant::now() < deadline, "no slot came free");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// One uid holds at most `socket.max_clients_per_uid` of a socket's slots;
/// one more is answered `too_many_connections` and closed, and a slot given back is usable.
/// A line trickled a byte at a time is cut one `idle_timeout` after its first byte.
#[test]
fn one_uid_cannot_take_every_slot_and_a_trickled_line_is_cut() {
    let daemon = Offline::start(
        "idle_timeout = \"2s\"\nmax_clients = 8\nmax_clients_per_uid = 2\n",
        "",
    );
    let first = harness::LocalApp::connect(&daemon.socket);
    let second = harness::LocalApp::connect(&daemon.socket);
    let mut third = harness::LocalApp::connect(&daemon.socket);
    let refused = third.read_answer(ANSWER).expect("answer");
    assert_eq!(refused["error"], "too_many_connections", "{refused}");
    assert_eq!(third.read_to_end(), "");
    drop(first);
    let _again = connect_once_a_slot_is_free(&daemon.socket);

    drop(second);
    // A fresh connection, trickling a byte every half second (writes fail once it is cut). The
    // daemon frees `second`'s slot when it reads the close, so wait until a connection is kept.
    let mut trickler = connect_once_a_slot_is_free(&daemon.socket);
    let started = std::time::Instant::now();
    for byte in br#"{"topic":"t","payload":1}"# {
        use std::io::Write;
        if trickler.write_all(&[*byte]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut rest = String::new();
    use std::io::Read;
    let _ = trickler.read_to_string(&mut rest);
    let cut: Value = serde_json::from_str(rest.lines().next().expect("an answer")).expect("json");
    assert_eq!(cut["error"], "invalid_json", "{cut}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "cut about idle_timeout after the first byte: {:?}",
        started.elapsed()
    );
}
