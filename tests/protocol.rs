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

/// The fenced block of docs/protocol.md that follows `marker`.
fn doc_example(marker: &str, fence: &str) -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md"))
        .expect("doc");
    let start = doc.find(marker).expect("marker");
    let block = &doc[start..];
    let open = block.find(&format!("```{fence}\n")).expect("fence") + fence.len() + 4;
    let close = open + block[open..].find("```").expect("closing fence");
    block[open..close].to_owned()
}

#[test]
fn docs_examples_work_as_written() {
    let cloud = Cloud::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = cloud.start_daemon(&cloud.config(dir.path(), true, ""));
    let socket = daemon.socket.display().to_string();
    let default = "/run/iot-cognito-relay/relay.sock";

    let shell = doc_example("Shell, with", "sh")
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

    let python = doc_example("Python, standard library only", "python").replace(default, &socket);
    let output = Command::new("python3")
        .args(["-c", &python])
        .output()
        .expect("python3");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

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
    let daemon = cloud.start_daemon(&cloud.config(dir.path(), true, ""));
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
    let output = Command::new(env!("CARGO_BIN_EXE_iot-cognito-relay"))
        .args(["run", "--config"])
        .arg(&config)
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
