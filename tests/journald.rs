//! Native journald logging, read from a private journal socket: the daemon runs in its own
//! mount namespace where `/run/systemd/journal/socket` is a datagram socket this test bound,
//! and its stderr is the stream `JOURNAL_STREAM` names, as under systemd. Needs root (mounts).

mod harness;

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

type Entry = HashMap<String, String>;

/// Decodes journald's native protocol: `NAME=value\n`, or `NAME\n<u64 LE length><value>\n`.
fn parse_entry(datagram: &[u8]) -> Entry {
    let mut entry = Entry::new();
    let mut rest = datagram;
    while let Some(newline) = rest.iter().position(|&b| b == b'\n') {
        let line = &rest[..newline];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            let name = String::from_utf8_lossy(&line[..eq]).into_owned();
            entry.insert(name, String::from_utf8_lossy(&line[eq + 1..]).into_owned());
            rest = &rest[newline + 1..];
        } else {
            let name = String::from_utf8_lossy(line).into_owned();
            let after = &rest[newline + 1..];
            let length = u64::from_le_bytes(after[..8].try_into().expect("length")) as usize;
            let value = &after[8..8 + length];
            entry.insert(name, String::from_utf8_lossy(value).into_owned());
            rest = &after[8 + length + 1..];
        }
    }
    entry
}

fn entries_for(journal: &UnixDatagram, period: Duration, into: &mut Vec<Entry>) {
    let deadline = Instant::now() + period;
    let mut buffer = vec![0u8; 256 * 1024];
    while Instant::now() < deadline {
        if let Ok(len) = journal.recv(&mut buffer)
            && len > 0
        {
            into.push(parse_entry(&buffer[..len]));
        }
    }
}

fn find<'a>(entries: &'a [Entry], message: &str) -> &'a Entry {
    entries
        .iter()
        .find(|entry| {
            entry
                .get("MESSAGE")
                .is_some_and(|text| text.starts_with(message))
        })
        .unwrap_or_else(|| panic!("no entry {message:?} in {entries:#?}"))
}

#[test]
fn entries_carry_the_identifier_and_structured_fields() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("raw.sock");
    let config = harness::offline_config(
        dir.path(),
        &format!("[[socket.raw]]\npath = {raw:?}\ntopic = \"sensors/raw\"\n"),
    );
    let journal_dir = dir.path().join("journal");
    std::fs::create_dir(&journal_dir).expect("journal dir");
    let journal = UnixDatagram::bind(journal_dir.join("socket")).expect("journal socket");
    journal
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let stderr_path = dir.path().join("stderr.log");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let meta = stderr.metadata().expect("stat");

    // A private /run with our socket where journald's would be; the rest of the system is
    // untouched.
    let mut daemon = harness::KillOnDrop(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(
                "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal \
                 && mount --bind \"$0\" /run/systemd/journal && exec \"$@\"",
            )
            .arg(&journal_dir)
            .arg(env!("CARGO_BIN_EXE_iot-cognito-relay"))
            .args(["run", "--config"])
            .arg(&config)
            .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start daemon"),
    );

    let mut entries = Vec::new();
    // Offline: the first identity step fails after the SDK's own retries.
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline
        && !entries.iter().any(|entry: &Entry| {
            entry
                .get("MESSAGE")
                .is_some_and(|m| m == "identity step failed")
        })
    {
        entries_for(&journal, Duration::from_millis(200), &mut entries);
    }
    let ready = find(&entries, "ready");
    assert_eq!(ready["SYSLOG_IDENTIFIER"], "iot-cognito-relay");
    assert_eq!(ready["PRIORITY"], "6", "info");
    assert!(ready.contains_key("IDENTITY_ID"), "{ready:?}");
    assert!(
        !ready.keys().any(|name| name.starts_with("F_")),
        "fields are not prefixed: {ready:?}"
    );
    let failed = find(&entries, "identity step failed");
    assert_eq!(failed["PRIORITY"], "4", "warning");
    assert!(failed.contains_key("ERROR"), "{failed:?}");

    // A refused line names its error code; an oversize raw record names its topic.
    let mut app = UnixStream::connect(dir.path().join("relay.sock")).expect("socket");
    app.write_all(b"{\"topic\": \"a/#\", \"payload\": 1}\n")
        .expect("write");
    let mut sensor = UnixStream::connect(&raw).expect("raw socket");
    sensor
        .write_all(&vec![b'x'; 129 * 1024])
        .and_then(|()| sensor.write_all(b"\n"))
        .expect("write raw");
    entries_for(&journal, Duration::from_millis(1000), &mut entries);
    let refused = find(&entries, "message refused");
    assert_eq!(refused["ERROR_CODE"], "invalid_topic");
    let skipped = find(&entries, "raw socket record over");
    assert_eq!(skipped["TOPIC"], "sensors/raw");

    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    entries_for(&journal, Duration::from_millis(1000), &mut entries);
    assert_eq!(find(&entries, "stopping")["STATE"], "stopping");
    let status = daemon.0.wait().expect("wait");
    assert!(status.success(), "{status:?}");

    // Everything went to the journal; stderr stayed empty.
    let stderr = std::fs::read_to_string(&stderr_path).expect("stderr");
    assert!(stderr.is_empty(), "{stderr}");
}

#[test]
fn without_the_journal_lines_go_to_stderr() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = harness::offline_config(dir.path(), "");
    // JOURNAL_STREAM inherited from a unit but naming another stream: not ours, so stderr.
    let mut daemon = harness::KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_iot-cognito-relay"))
            .args(["run", "--config"])
            .arg(&config)
            .env("JOURNAL_STREAM", "1:1")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).expect("file"))
            .spawn()
            .expect("start daemon"),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !dir.path().join("relay.sock").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    let _ = daemon.0.wait();
    let stderr = std::fs::read_to_string(dir.path().join("stderr.log")).expect("stderr");
    assert!(stderr.contains("ready"), "{stderr}");
    assert!(stderr.contains("stopping"), "{stderr}");
}
