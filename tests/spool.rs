//! A message the daemon answered `ok` is never lost: broker outages, daemon crashes, offline
//! boots, a full spool and a corrupt spool file, each against the real daemon.

mod harness;

use std::collections::BTreeSet;
use std::time::Duration;

use harness::{
    Cloud, Streamer, TestMount, fill_disk, free_bytes, numbers, publishes_per_second,
    rewrite_config, send_many,
};

const DELIVERY_WAIT: Duration = Duration::from_secs(120);
/// mosquitto saves its sessions every second; the subscriber's must be saved before a kill.
const AUTOSAVE: Duration = Duration::from_millis(1500);
/// Messages a streamer must get answered `ok` in the outage and crash tests for them to mean
/// something (each waits for its answer: at the PUBACK, or at the commit when offline).
const MIN_STREAMED: usize = 250;

fn collect_all(subscriber: &mut harness::Subscriber, acked: &[u64]) -> (Vec<u64>, usize) {
    subscriber.expect_all(acked, DELIVERY_WAIT)
}

#[test]
fn broker_killed_twice_loses_no_acked_message() {
    let mut cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = cloud.start_daemon(&cloud.config(dir.path(), true, ""));
    daemon.wait_status("connected", DELIVERY_WAIT, |s| s["state"] == "connected");
    std::thread::sleep(AUTOSAVE);

    let streamer = Streamer::start(daemon.socket.clone(), "outage", 100);
    for _ in 0..2 {
        std::thread::sleep(Duration::from_secs(3));
        cloud.kill_broker();
        std::thread::sleep(Duration::from_secs(2));
        cloud.start_broker();
    }
    std::thread::sleep(Duration::from_secs(3));
    let acked = streamer.finish();
    // The streamer waits for each answer; with write-behind (`spool.commit_window`) an answer
    // comes at the PUBACK or the commit, so a debug build on a busy machine gets a few hundred
    // through.
    assert!(
        acked.len() > MIN_STREAMED,
        "the daemon kept accepting during the outages: {}",
        acked.len()
    );

    let (_, duplicates) = collect_all(&mut subscriber, &acked);
    let status = daemon.wait_status("spool drained", DELIVERY_WAIT, |s| s["spool_messages"] == 0);
    eprintln!(
        "broker outage: {} acked, all delivered, {duplicates} duplicates, republished_total {}",
        acked.len(),
        status["republished_total"]
    );
}

#[test]
fn daemon_killed_mid_stream_loses_no_acked_message() {
    let cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = cloud.config(dir.path(), true, "");
    let mut daemon = cloud.start_daemon(&config);

    let streamer = Streamer::start(daemon.socket.clone(), "crash", 200);
    std::thread::sleep(Duration::from_secs(3));
    daemon.process.signal(libc::SIGKILL);
    daemon
        .process
        .wait_timeout(Duration::from_secs(10))
        .expect("killed");
    std::thread::sleep(Duration::from_millis(500));
    let daemon = cloud.start_daemon(&config);
    std::thread::sleep(Duration::from_secs(3));
    let acked = streamer.finish();
    assert!(acked.len() > MIN_STREAMED, "{}", acked.len());

    let (_, duplicates) = collect_all(&mut subscriber, &acked);
    daemon.wait_status("spool drained", DELIVERY_WAIT, |s| s["spool_messages"] == 0);
    eprintln!(
        "daemon crash: {} acked, all delivered, {duplicates} duplicates",
        acked.len()
    );
}

/// Daemon kills in the random-kill test, and the pause before each (milliseconds).
const RANDOM_KILLS: usize = 8;
const KILL_AFTER_MS: std::ops::Range<u64> = 300..3000;

/// A small xorshift generator: the kill points are random, and the seed is printed so that a
/// failing run can be replayed (`RELAY_TEST_SEED=...`).
struct KillPoints(u64);

impl KillPoints {
    fn from_env() -> KillPoints {
        let seed = std::env::var("RELAY_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            })
            .max(1);
        eprintln!("random kill points: RELAY_TEST_SEED={seed}");
        KillPoints(seed)
    }

    fn next(&mut self, range: &std::ops::Range<u64>) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        range.start + self.0 % (range.end - range.start)
    }
}

/// Write-behind keeps the promise. A steady 10 msg/s stream; the daemon is SIGKILLed
/// at random points, again and again, and restarted; in some rounds the broker is down too, so
/// messages wait in memory for their commit window when the kill comes. Every message answered
/// `ok` arrives.
#[test]
fn random_sigkills_of_a_steady_stream_lose_no_acked_message() {
    let mut cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = cloud.config(dir.path(), true, "");
    let mut daemon = cloud.start_daemon(&config);
    daemon.wait_status("connected", DELIVERY_WAIT, |s| s["state"] == "connected");
    std::thread::sleep(AUTOSAVE);
    let mut points = KillPoints::from_env();
    let streamer = Streamer::start(daemon.socket.clone(), "kills", 10);
    for round in 0..RANDOM_KILLS {
        let broker_down = round % 3 == 1;
        if broker_down {
            cloud.kill_broker();
        }
        std::thread::sleep(Duration::from_millis(points.next(&KILL_AFTER_MS)));
        daemon.process.signal(libc::SIGKILL);
        daemon
            .process
            .wait_timeout(Duration::from_secs(10))
            .expect("killed");
        if broker_down {
            cloud.start_broker();
        }
        daemon = cloud.start_daemon(&config);
    }
    std::thread::sleep(Duration::from_secs(2));
    let acked = streamer.finish();
    assert!(acked.len() > 50, "{}", acked.len());
    let (_, duplicates) = collect_all(&mut subscriber, &acked);
    daemon.wait_status("spool drained", DELIVERY_WAIT, |s| s["spool_messages"] == 0);
    eprintln!(
        "{RANDOM_KILLS} random kills: {} acked, all delivered, {duplicates} duplicates",
        acked.len()
    );
}

#[test]
fn offline_boot_delivers_everything_in_order() {
    let mut cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    std::thread::sleep(AUTOSAVE);
    cloud.kill_broker();
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = cloud.start_daemon(&cloud.config(dir.path(), true, ""));

    let acked = send_many(&daemon.socket, "offline", 0..10_000);
    assert_eq!(acked.len(), 10_000, "an offline daemon accepts everything");
    let status = daemon.status();
    assert_eq!(status["spool_messages"], 10_000);
    assert_ne!(status["state"], "connected");

    cloud.start_broker();
    let (arrivals, duplicates) = collect_all(&mut subscriber, &acked);
    let mut firsts = Vec::new();
    let mut seen = BTreeSet::new();
    for n in arrivals {
        if seen.insert(n) {
            firsts.push(n);
        }
    }
    assert!(
        firsts.windows(2).all(|w| w[0] < w[1]),
        "first arrivals must be in order"
    );
    eprintln!("offline boot: 10000 acked, all delivered in order, {duplicates} duplicates");
}

#[test]
fn full_spool_reject_new_answers_spool_full() {
    let mut cloud = Cloud::start();
    cloud.kill_broker();
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = "\n[spool]\nmax_bytes = \"128KiB\"\non_full = \"reject-new\"\n";
    let daemon = cloud.start_daemon(&cloud.config(dir.path(), true, extra));

    let acked = send_many(&daemon.socket, "full", 0..20_000);
    assert!(
        acked.len() > 1000 && acked.len() < 20_000,
        "{}",
        acked.len()
    );
    assert_eq!(
        acked,
        (0..acked.len() as u64).collect::<Vec<_>>(),
        "the oldest are kept"
    );
    let status = daemon.status();
    assert_eq!(status["spool_messages"], acked.len() as u64);
    let bytes = status["spool_bytes"].as_u64().expect("bytes");
    assert!(bytes <= 128 * 1024, "{bytes} bytes: {status}");
    assert_eq!(status["dropped_total"], 0);

    let mut client = daemon.connect();
    let late = format!(
        r#"{{"topic":"full","payload":"{}","id":"late"}}"#,
        "x".repeat(1000)
    );
    client.send_line(&late);
    let answer = client.read_answer(Duration::from_secs(10)).expect("answer");
    assert_eq!(answer["error"], "spool_full");
    assert_eq!(answer["id"], "late");
}

#[test]
fn full_spool_drop_oldest_keeps_the_newest() {
    let mut cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    std::thread::sleep(AUTOSAVE);
    cloud.kill_broker();
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = "\n[spool]\nmax_bytes = \"128KiB\"\non_full = \"drop-oldest\"\n";
    let daemon = cloud.start_daemon(&cloud.config(dir.path(), true, extra));

    let acked = send_many(&daemon.socket, "full", 0..20_000);
    assert_eq!(acked.len(), 20_000, "drop-oldest accepts everything");
    let status = daemon.status();
    let kept = status["spool_messages"].as_u64().expect("messages");
    assert!(kept > 1000 && kept < 20_000, "{kept}");
    assert_eq!(status["dropped_total"].as_u64(), Some(20_000 - kept));

    cloud.start_broker();
    let newest: Vec<u64> = (20_000 - kept..20_000).collect();
    collect_all(&mut subscriber, &newest);
    daemon.wait_status("spool drained", DELIVERY_WAIT, |s| s["spool_messages"] == 0);
}

#[test]
fn corrupt_spool_is_moved_aside_and_the_daemon_works() {
    let cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    std::fs::write(state.join("spool.db"), vec![0xa5u8; 16 * 1024]).expect("garbage");
    let daemon = cloud.start_daemon(&cloud.config(dir.path(), true, ""));

    let acked = send_many(&daemon.socket, "after-corruption", 0..10);
    assert_eq!(acked.len(), 10);
    collect_all(&mut subscriber, &acked);
    let moved = std::fs::read_dir(&state)
        .expect("list")
        .filter_map(Result::ok)
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("spool.db.corrupt-")
        });
    assert!(moved, "the corrupt file is kept for inspection");
    assert!(
        daemon.log_text().contains("corrupt"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn sigterm_refuses_new_lines_drains_and_keeps_the_rest_for_the_next_start() {
    let mut cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    std::thread::sleep(AUTOSAVE);
    cloud.kill_broker();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = cloud.config(dir.path(), true, "\n[shutdown]\ndrain_timeout = \"4s\"\n");
    let mut daemon = cloud.start_daemon(&config);
    let acked = send_many(&daemon.socket, "drain", 0..100);
    assert_eq!(acked.len(), 100);

    let mut client = daemon.connect();
    daemon.process.signal(libc::SIGTERM);
    daemon.wait_status("stopping", Duration::from_secs(5), |s| {
        s["state"] == "stopping"
    });
    client.send_line(r#"{"topic":"drain","payload":{"n":1000},"id":1000}"#);
    let answer = client.read_answer(Duration::from_secs(5)).expect("answer");
    assert_eq!(answer["error"], "shutting_down", "{answer}");
    let status = daemon
        .process
        .wait_timeout(Duration::from_secs(20))
        .expect("exits after the drain time");
    assert!(status.success(), "exit 0 after draining: {status:?}");

    cloud.start_broker();
    let daemon = cloud.start_daemon(&config);
    collect_all(&mut subscriber, &acked);
    daemon.wait_status("spool drained", DELIVERY_WAIT, |s| s["spool_messages"] == 0);
}

#[test]
fn a_backlog_goes_out_within_the_publish_quota() {
    let mut cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    cloud.kill_broker();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = cloud.config(dir.path(), true, "");
    rewrite_config(
        &config,
        &[(
            "max_publishes_per_second = 0",
            "max_publishes_per_second = 50",
        )],
    );
    let daemon = cloud.start_daemon(&config);
    let acked = send_many(&daemon.socket, "quota", 0..300);
    assert_eq!(acked.len(), 300);

    cloud.start_broker();
    let wanted: BTreeSet<u64> = acked.iter().copied().collect();
    let received = subscriber.collect_until(DELIVERY_WAIT, |r| {
        numbers(r)
            .into_iter()
            .collect::<BTreeSet<_>>()
            .is_superset(&wanted)
    });
    assert!(numbers(&received).len() >= 300);
    // Counted where IoT Core would count: at the broker, whose log stamps each PUBLISH it
    // receives with the epoch second.
    let per_second: std::collections::BTreeMap<u64, u64> =
        publishes_per_second(&cloud.broker_log(), "quota")
            .into_iter()
            .map(|(second, (publishes, _))| (second, publishes))
            .collect();
    let busiest = per_second.values().copied().max().unwrap_or(0);
    eprintln!("quota 50/s: 300 messages, per broker second {per_second:?}");
    assert!(
        busiest <= 50,
        "at most 50 publishes in any second: {per_second:?}"
    );
    assert!(
        per_second.len() >= 6,
        "300 at 50/s span at least 6 calendar seconds: {per_second:?}"
    );
}

#[test]
fn batching_packs_a_backlog_into_arrays_within_the_publish_quota() {
    let mut cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    cloud.kill_broker();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = cloud.config(
        dir.path(),
        true,
        "[batch]\nmax_messages = 100\nmax_bytes = \"2KiB\"\nlinger = \"50ms\"\n",
    );
    rewrite_config(
        &config,
        &[(
            "max_publishes_per_second = 0",
            "max_publishes_per_second = 5",
        )],
    );
    let daemon = cloud.start_daemon(&config);
    let acked = send_many(&daemon.socket, "batched", 0..1000);
    assert_eq!(acked.len(), 1000);

    cloud.start_broker();
    let received = subscriber.collect_until(DELIVERY_WAIT, |r| numbers(r).len() >= 1000);
    let delivered = numbers(&received);
    assert_eq!(delivered, acked, "every reading, once, in order");
    for publish in &received {
        let array: Vec<serde_json::Value> =
            serde_json::from_str(&publish.payload).expect("each publish is a JSON array");
        assert!(array.len() <= 100, "{} readings", array.len());
        assert!(
            publish.payload.len() <= 2048,
            "{} bytes",
            publish.payload.len()
        );
    }
    // "{"n":999}" is 9 bytes: a 2 KiB array holds at most 100 of them, so 1000 readings take
    // at least 10 publishes, and at 5 publishes per second no less than 2 seconds.
    assert!(
        (10..=40).contains(&received.len()),
        "{} publishes",
        received.len()
    );
    // Counted per reading, and each PUBACK empties the spool of its whole array.
    daemon.wait_status(
        "all acknowledged and removed",
        Duration::from_secs(10),
        |s| s["published_total"] == 1000 && s["spool_messages"] == 0,
    );
}

#[test]
fn with_batching_a_lone_reading_waits_no_longer_than_linger() {
    let cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = cloud.config(
        dir.path(),
        true,
        "[batch]\nmax_messages = 10\nlinger = \"300ms\"\n",
    );
    let daemon = cloud.start_daemon(&config);
    daemon.wait_status("connected", Duration::from_secs(30), |s| {
        s["state"] == "connected"
    });
    let sent = std::time::Instant::now();
    assert_eq!(send_many(&daemon.socket, "lone", 0..1), vec![0]);
    let received = subscriber
        .next_message(Duration::from_secs(5))
        .expect("the reading arrives");
    let waited = sent.elapsed();
    assert_eq!(received.payload, "[{\"n\":0}]");
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(2),
        "held for linger, then sent: {waited:?}"
    );
}

/// Item 6: disk full (a few MiB tmpfs as the state dir) with `drop-oldest`: the daemon drops
/// the oldest to make room and keeps answering `ok`; once the broker is back, everything acked
/// is delivered except what was dropped, and that is exactly `dropped_total`.
#[test]
fn disk_full_with_drop_oldest_makes_room_and_loses_only_what_it_counts() {
    let mut cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    std::thread::sleep(AUTOSAVE);
    cloud.kill_broker();
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let _mount = TestMount::mount(&state, &["-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs"]);
    let extra = "\n[spool]\nmax_bytes = \"2MiB\"\non_full = \"drop-oldest\"\n";
    let daemon = cloud.start_daemon(&cloud.config(dir.path(), true, extra));

    let mut acked = send_many(&daemon.socket, "disk", 0..3000);
    assert_eq!(acked.len(), 3000);
    let filler = fill_disk(&state);
    acked.extend(send_many(&daemon.socket, "disk", 3000..8000));
    let status = daemon.status();
    eprintln!("disk full: {} acked of 8000, status {status}", acked.len());
    assert_eq!(
        acked.len(),
        8000,
        "drop-oldest keeps accepting on a full disk"
    );
    let dropped = status["dropped_total"].as_u64().expect("dropped_total");
    assert!(dropped > 0, "room was made by dropping: {status}");
    assert_eq!(
        status["spool_state"], "ok",
        "a full disk is not a failing disk"
    );
    assert!(
        daemon.log_text().contains("disk full: dropped the oldest"),
        "{}",
        daemon.log_text()
    );

    std::fs::remove_file(filler).expect("space returns");
    cloud.start_broker();
    let newest: Vec<u64> = (dropped..8000).collect();
    collect_all(&mut subscriber, &newest);
    daemon.wait_status("spool drained", DELIVERY_WAIT, |s| s["spool_messages"] == 0);
    // The dropped ones were the oldest, and only those: every other acked one arrived.
    assert_eq!(daemon.status()["dropped_total"].as_u64(), Some(dropped));
}

/// Item 6: disk full with `reject-new` answers `spool_full`, and accepts again once space
/// returns.
#[test]
fn disk_full_with_reject_new_answers_spool_full_until_space_returns() {
    let mut cloud = Cloud::start();
    cloud.kill_broker();
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let _mount = TestMount::mount(&state, &["-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs"]);
    let extra = "\n[spool]\nmax_bytes = \"2MiB\"\non_full = \"reject-new\"\n";
    let daemon = cloud.start_daemon(&cloud.config(dir.path(), true, extra));
    assert_eq!(send_many(&daemon.socket, "disk", 0..100).len(), 100);
    let filler = fill_disk(&state);
    let mut client = daemon.connect();
    let mut answers = Vec::new();
    for n in 0..2000 {
        client.send_line(&format!(
            r#"{{"topic":"disk","payload":{{"n":{n},"pad":"{}"}},"id":{n}}}"#,
            "x".repeat(200)
        ));
        let answer = client.read_answer(Duration::from_secs(10)).expect("answer");
        if answer["ok"] != true {
            answers.push(answer);
            break;
        }
    }
    let refused = answers.first().expect("a full disk refuses");
    assert_eq!(refused["error"], "spool_full", "{refused}");
    std::fs::remove_file(filler).expect("space returns");
    client.send_line(r#"{"topic":"disk","payload":{"n":1},"id":"after"}"#);
    let answer = client.read_answer(Duration::from_secs(10)).expect("answer");
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(daemon.status()["dropped_total"], 0);
}

/// Item 6: a disk that fails (ext4 shut down under the daemon: every I/O is EIO) is not
/// "full": appends answer `storage_error`, `status` shows the spool failing, the journal gets
/// one line, and the watchdog pings stop so systemd restarts the daemon.
#[test]
fn failing_disk_answers_storage_error_and_stops_the_watchdog() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(16 << 20))
        .expect("image");
    let made = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&image)
        .status()
        .expect("mkfs.ext4");
    assert!(made.success());
    let image_arg = image.display().to_string();
    let _mount = TestMount::mount(&state, &["-o", "loop", &image_arg]);
    let config = harness::offline_config(dir.path(), "");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
    notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let log = dir.path().join("daemon.log");
    let mut daemon = harness::KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_iot-cognito-relay"))
            .args(["run", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("WATCHDOG_USEC", "1000000")
            .env_remove("RUST_LOG")
            .stderr(std::fs::File::create(&log).expect("log"))
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start daemon"),
    );
    let socket = dir.path().join("relay.sock");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "daemon never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut client = harness::LocalApp::connect(&socket);
    client.send_line(r#"{"topic":"t","payload":1,"id":"before"}"#);
    let answer = client.read_answer(Duration::from_secs(10)).expect("answer");
    assert_eq!(answer["ok"], true, "{answer}");
    let pings = |period| {
        let deadline = std::time::Instant::now() + period;
        let mut buffer = [0u8; 4096];
        let mut count = 0;
        while std::time::Instant::now() < deadline {
            if let Ok(len) = notify.recv(&mut buffer) {
                count +=
                    usize::from(String::from_utf8_lossy(&buffer[..len]).contains("WATCHDOG=1"));
            }
        }
        count
    };
    assert!(
        pings(Duration::from_millis(1600)) >= 2,
        "pings while healthy"
    );

    // EXT4_IOC_SHUTDOWN (_IOR('X', 125, u32)) with EXT4_GOING_FLAGS_NOLOGFLUSH.
    let root = std::fs::File::open(&state).expect("mount root");
    let flags: u32 = 2;
    let shut = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&root),
            0x8004_587d,
            &flags as *const u32,
        )
    };
    assert_eq!(shut, 0, "shutdown: {}", std::io::Error::last_os_error());
    for n in 0..5 {
        client.send_line(&format!(r#"{{"topic":"t","payload":1,"id":{n}}}"#));
        let answer = client.read_answer(Duration::from_secs(10)).expect("answer");
        assert_eq!(answer["error"], "storage_error", "{answer}");
    }
    let mut status_client = harness::LocalApp::connect(&socket);
    status_client.send_line(r#"{"op":"status"}"#);
    let status = status_client
        .read_answer(Duration::from_secs(5))
        .expect("status")["status"]
        .clone();
    assert_eq!(status["spool_state"], "failing", "{status}");
    assert!(
        status["spool_error"]
            .as_str()
            .is_some_and(|e| e.contains("write failed")),
        "{status}"
    );
    // A ping may already be on its way; after that, silence.
    let _ = pings(Duration::from_millis(600));
    assert_eq!(
        pings(Duration::from_millis(2500)),
        0,
        "no watchdog ping while failing"
    );
    assert!(
        daemon.0.try_wait().expect("wait").is_none(),
        "the daemon stays up; systemd's watchdog restarts it"
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let lines = text.matches("spool storage failed").count();
    assert_eq!(lines, 1, "one journal line, not one per message:\n{text}");
}

/// Item 11: with batching on, a string payload that looks like JSON ("42") and a
/// `payload_base64` whose bytes parse as JSON go out alone, byte for byte; JSON values are
/// still batched.
#[test]
fn batching_sends_strings_and_binary_alone_byte_for_byte() {
    let mut cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    std::thread::sleep(AUTOSAVE);
    cloud.kill_broker();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = cloud.config(
        dir.path(),
        true,
        "[batch]\nmax_messages = 10\nlinger = \"0ms\"\n",
    );
    let daemon = cloud.start_daemon(&config);
    let mut client = daemon.connect();
    let lines = [
        r#"{"topic":"kinds","payload":{"n":0},"id":0}"#,
        // base64 of `[1,2]`
        r#"{"topic":"kinds","payload_base64":"WzEsMl0=","id":1}"#,
        r#"{"topic":"kinds","payload":"42","id":2}"#,
        r#"{"topic":"kinds","payload":{"n":1},"id":3}"#,
        r#"{"topic":"kinds","payload":{"n":2},"id":4}"#,
    ];
    for line in lines {
        client.send_line(line);
        let answer = client.read_answer(Duration::from_secs(10)).expect("answer");
        assert_eq!(answer["ok"], true, "{answer}");
    }
    cloud.start_broker();
    let received = subscriber.collect_until(DELIVERY_WAIT, |r| r.len() >= 4);
    let payloads: Vec<&str> = received.iter().map(|r| r.payload.as_str()).collect();
    assert_eq!(
        payloads,
        [r#"[{"n":0}]"#, "[1,2]", "42", r#"[{"n":1},{"n":2}]"#],
        "only JSON values are wrapped and merged"
    );
}

/// A spool from before incremental vacuum (4 KiB pages, no auto-vacuum) on a
/// disk with less free space than the spool's size: the one-time conversion (VACUUM, which
/// rewrites the whole file through the WAL) cannot run. The daemon starts anyway, says why in
/// the journal, and delivers the old spool's messages. Before, it exited 1 and systemd
/// restarted it into the same failure.
#[test]
fn an_old_spool_on_a_nearly_full_disk_starts_and_delivers() {
    let cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    std::thread::sleep(AUTOSAVE);
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let _mount = TestMount::mount(&state, &["-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs"]);
    // One 4 KiB page per row: a 4 MiB spool, 2 MiB free.
    const ROWS: u64 = 1000;
    write_old_spool(&state.join("spool.db"), ROWS, "");
    let spool_bytes = std::fs::metadata(state.join("spool.db"))
        .expect("spool")
        .len();
    let free = free_bytes(&state);
    assert!(
        free < spool_bytes,
        "the test needs less free space ({free}) than the spool ({spool_bytes})"
    );

    let daemon = cloud.start_daemon(&cloud.config(dir.path(), true, ""));
    let acked: Vec<u64> = (0..ROWS).collect();
    collect_all(&mut subscriber, &acked);
    daemon.wait_status("spool drained", DELIVERY_WAIT, |s| s["spool_messages"] == 0);
    assert!(
        daemon.log_text().contains("cannot convert the spool now"),
        "{}",
        daemon.log_text()
    );
}

/// A full disk and an empty spool: nothing can be dropped, so the disk
/// reserve (kept to let drops happen on a full disk) is given to a new message instead of
/// refusing it while the reserve holds the space. Before, it was answered `spool_full`.
#[test]
fn a_full_disk_and_an_empty_spool_give_the_reserve_to_new_messages() {
    let mut cloud = Cloud::start();
    cloud.kill_broker();
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let _mount = TestMount::mount(&state, &["-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs"]);
    let extra = "\n[spool]\nmax_bytes = \"2MiB\"\non_full = \"reject-new\"\n";
    let daemon = cloud.start_daemon(&cloud.config(dir.path(), true, extra));
    daemon.wait_status("started", DELIVERY_WAIT, |s| s["state"] != "starting");
    assert!(
        state.join("spool.db.reserve").exists(),
        "the reserve is written at start"
    );
    let _filler = fill_disk(&state);
    let mut client = daemon.connect();
    // Larger than anything the spool's files have room for: it needs new disk space.
    client.send_line(&format!(
        r#"{{"topic":"reserve","payload":"{}","id":1}}"#,
        "x".repeat(100_000)
    ));
    let answer = client.read_answer(Duration::from_secs(10)).expect("answer");
    assert_eq!(answer["ok"], true, "{answer}");
    assert!(!state.join("spool.db.reserve").exists());
    assert!(
        daemon.log_text().contains("gave the spool's disk reserve"),
        "{}",
        daemon.log_text()
    );
}

/// A corrupt 4.4 MB spool on a disk with less than that free. The salvage
/// reads the moved-aside file in place, a chunk at a time, and stops while 2 MiB are still
/// free so the daemon keeps working; it publishes what it saved, and the next start goes on
/// from where the last one stopped. Every message arrives, none twice. Before, the salvage
/// copied the whole file first (here it did not fit: nothing was saved) and read every row
/// into memory, and no later start looked at the file again: every message was lost.
#[test]
fn a_corrupt_spool_on_a_short_disk_is_salvaged_over_several_starts() {
    let cloud = Cloud::start();
    let mut subscriber = cloud.subscribe();
    std::thread::sleep(AUTOSAVE);
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let _mount = TestMount::mount(&state, &["-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs"]);
    const ROWS: u64 = 1100;
    let spool = state.join("spool.db");
    let junk_root: i64 = write_old_spool(
        &spool,
        ROWS,
        "CREATE TABLE junk (x); INSERT INTO junk VALUES (1);",
    )
    .query_row(
        "SELECT rootpage FROM sqlite_master WHERE name = 'junk'",
        [],
        |row| row.get(0),
    )
    .expect("junk root page");
    // Corrupt a page that holds no message: the file fails its check, the rows still read.
    {
        use std::io::{Seek, Write};
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&spool)
            .expect("open");
        file.seek(std::io::SeekFrom::Start((junk_root as u64 - 1) * 4096))
            .expect("seek");
        file.write_all(&[0xa5; 4096]).expect("corrupt");
    }
    let size = std::fs::metadata(&spool).expect("spool").len();
    let free = free_bytes(&state);
    assert!(free < size, "{free} free, {size} spool");

    let config = cloud.config(dir.path(), true, "");
    let finished = |state: &std::path::Path| {
        std::fs::read_dir(state)
            .expect("list")
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().ends_with(".done"))
    };
    let mut starts = 0;
    while !finished(&state) && starts < 5 {
        starts += 1;
        let mut daemon = cloud.start_daemon(&config);
        daemon.wait_status("what was salvaged delivered", DELIVERY_WAIT, |s| {
            s["spool_messages"] == 0
        });
        // Idle maintenance gives the delivered rows' pages back to the file system.
        std::thread::sleep(Duration::from_secs(4));
        assert!(daemon.stop().success());
    }
    eprintln!("salvaged over {starts} starts");
    let acked: Vec<u64> = (0..ROWS).collect();
    let (_, duplicates) = collect_all(&mut subscriber, &acked);
    assert_eq!(duplicates, 0, "nothing was salvaged twice");
    assert!(finished(&state));
    assert!(
        starts >= 2,
        "the test needs a salvage that does not finish at once"
    );
}

/// A spool as versions before incremental vacuum wrote it (4 KiB pages, no `kind`, no
/// acceptance time) at `path`, with `rows` messages `{"n": N, "pad": "x…"}` of one page each
/// and `extra` SQL run with the schema; the connection, for more looks at the file.
fn write_old_spool(path: &std::path::Path, rows: u64, extra: &str) -> rusqlite::Connection {
    let db = rusqlite::Connection::open(path).expect("old spool");
    db.execute_batch(&format!(
        "PRAGMA page_size = 4096;
         CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
             payload BLOB NOT NULL, qos INTEGER NOT NULL, size INTEGER NOT NULL);
         {extra}"
    ))
    .expect("old schema");
    let pad = "x".repeat(3000);
    let tx = db.unchecked_transaction().expect("transaction");
    for n in 0..rows {
        let payload = format!(r#"{{"n":{n},"pad":"{pad}"}}"#);
        tx.execute(
            "INSERT INTO messages (topic, payload, qos, size) VALUES ('old', ?1, 1, ?2)",
            rusqlite::params![payload.as_bytes(), payload.len() as i64 + 3],
        )
        .expect("old row");
    }
    tx.commit().expect("commit");
    db
}
