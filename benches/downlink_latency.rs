//! Cloud → app latency of the downlink: a cloud-side publisher (rumqttc on the
//! broker's plain listener, QoS 1, in a child process inside the cloud's namespace) sends `{"i":…,"t":<unix µs>}` at a fixed rate to the
//! device's prefix; a local app subscribed on the daemon's socket takes each message line,
//! notes the time, and acks. Latency = arrival at the app − the moment the message was handed
//! to the publisher's MQTT client, so it covers the broker, the wss hop, the inbox commit (an fsync) and the
//! socket. p50/p99 at 10 and 100 msg/s.
//!
//! Run: `make bench-downlink` (root; `cargo bench --profile release --bench downlink_latency`),
//! or `cargo test --bench downlink_latency --no-run` and the binary with `--bench` for a debug
//! build. Under `cargo test` it is a 2-second smoke run that asserts only that every message
//! arrived. Prints one JSON line per rate.

use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[path = "../tests/harness/mod.rs"]
mod harness;

use harness::{Cloud, MESSAGE_WAIT, MQTT_PORT};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const RATES: [u32; 2] = [10, 100];

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn main() {
    if let Ok(role) = std::env::var(PUBLISHER_ROLE) {
        return publisher_child(&role);
    }
    let full = std::env::args().any(|a| a == "--bench");
    let seconds = if full { 30 } else { 1 };
    let mut cloud = Cloud::start();
    cloud.start_broker_logging("error warning notice information");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = cloud.config(
        dir.path(),
        true,
        "\n[downlink]\ntopics = [\"commands/#\"]\n",
    );
    // The harness logs at debug; a benchmark measures the daemon, not its log.
    harness::rewrite_config(&config, &[("level = \"debug\"", "level = \"warn\"")]);
    let daemon = cloud.start_daemon(&config);
    let status = daemon.wait_status("connected", Duration::from_secs(30), |s| {
        s["state"] == "connected"
    });
    let identity = status["identity_id"].as_str().expect("identity").to_owned();
    let topic = format!(
        "{}/{identity}/commands/bench",
        cloud.account.identity_pool_id
    );
    // Let the daemon's SUBSCRIBE land before the first publish.
    std::thread::sleep(Duration::from_millis(500));
    let mut app = daemon.connect();
    app.subscribe(&["commands/#"]);

    for rate in RATES {
        let count = u64::from(rate) * seconds;
        // moto's credentials live 90 s, so the daemon renews its connection within a run
        // (hourly on AWS); messages sent meanwhile wait at the broker. Said with the figures.
        let refreshed_before = daemon.status()["last_refresh"].clone();
        let mut latencies = run(&cloud, &topic, &mut app, rate, count);
        let renewed = daemon.status()["last_refresh"] != refreshed_before;
        if let Ok(dump) = std::env::var("DOWNLINK_BENCH_DUMP") {
            // Arrival order, one latency (µs) per line: to see whether slow ones cluster.
            let text: String = latencies.iter().map(|l| format!("{l}\n")).collect();
            std::fs::write(format!("{dump}-{rate}.txt"), text).expect("dump");
        }
        latencies.sort_unstable();
        let pick = |q: f64| {
            let index = ((latencies.len() as f64 - 1.0) * q).round() as usize;
            latencies.get(index).copied().unwrap_or(0) as f64 / 1000.0
        };
        println!(
            "{}",
            serde_json::json!({
                "rate_per_s": rate,
                "messages": latencies.len(),
                "p50_ms": pick(0.50),
                "p99_ms": pick(0.99),
                "max_ms": pick(1.0),
                "credentials_renewed_during_run": renewed,
                "build": if cfg!(debug_assertions) { "debug" } else { "release" },
            })
        );
        assert_eq!(latencies.len() as u64, count, "every message arrived");
    }
}

/// Sends `count` messages at `rate`; returns each one's latency in µs.
fn run(cloud: &Cloud, topic: &str, app: &mut harness::LocalApp, rate: u32, count: u64) -> Vec<u64> {
    // The publisher runs in the cloud's namespace: this binary again, in its publisher role.
    let exe = std::env::current_exe().expect("current exe");
    let mut publisher = harness::KillOnDrop(
        cloud
            .namespace
            .command(exe)
            .env(PUBLISHER_ROLE, format!("{rate}:{count}:{topic}"))
            .stdout(Stdio::null())
            .spawn()
            .expect("start the cloud publisher"),
    );
    let mut latencies = Vec::new();
    while (latencies.len() as u64) < count {
        let Some(message) = app.next_message(MESSAGE_WAIT) else {
            break;
        };
        let arrived = now_us();
        let sent = message["payload"]["t"].as_u64().unwrap_or(arrived);
        latencies.push(arrived.saturating_sub(sent));
        app.send_line(&format!(r#"{{"op":"ack","seq":{}}}"#, message["seq"]));
    }
    let _ = publisher.0.wait();
    latencies
}

/// Set for the child that plays the cloud: `<rate>:<count>:<topic>`.
const PUBLISHER_ROLE: &str = "DOWNLINK_BENCH_PUBLISHER";

/// The cloud side: rumqttc on the broker's plain listener, QoS 1, one message every 1/rate s,
/// each stamped with the time it is handed to the client.
fn publisher_child(role: &str) {
    let mut parts = role.splitn(3, ':');
    let rate: u32 = parts.next().and_then(|r| r.parse().ok()).expect("rate");
    let count: u64 = parts.next().and_then(|c| c.parse().ok()).expect("count");
    let topic = parts.next().expect("topic").to_owned();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let mut options = MqttOptions::new("bench-cloud", "127.0.0.1", MQTT_PORT);
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut events) = AsyncClient::new(options, 1024);
        let interval = Duration::from_secs(1) / rate;
        let sender = tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            for i in 0..count {
                tokio::time::sleep_until(start + interval * i as u32).await;
                let payload = format!("{{\"i\":{i},\"t\":{}}}", now_us());
                client
                    .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                    .await
                    .expect("publish");
            }
        });
        let mut acked = 0;
        while acked < count {
            match events.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(_) => {}
                Err(error) => panic!("cloud publisher: {error}"),
            }
        }
        sender.await.expect("sender");
    });
}
