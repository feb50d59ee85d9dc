//! A message the daemon answered `ok` is never lost: broker outages, daemon crashes, offline
//! boots, a full spool and a corrupt spool file, each against the real daemon.

mod harness;

use std::collections::BTreeSet;
use std::time::Duration;

use harness::{Cloud, Streamer, numbers, publishes_per_second, rewrite_config, send_many};

const DELIVERY_WAIT: Duration = Duration::from_secs(120);
/// mosquitto saves its sessions every second; the subscriber's must be saved before a kill.
const AUTOSAVE: Duration = Duration::from_millis(1500);

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
    assert!(
        acked.len() > 500,
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
    assert!(acked.len() > 500, "{}", acked.len());

    let (_, duplicates) = collect_all(&mut subscriber, &acked);
    daemon.wait_status("spool drained", DELIVERY_WAIT, |s| s["spool_messages"] == 0);
    eprintln!(
        "daemon crash: {} acked, all delivered, {duplicates} duplicates",
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
    assert!(status["spool_bytes"].as_u64().expect("bytes") <= 128 * 1024);
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
