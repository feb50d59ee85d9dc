use super::*;
use crate::identity::chain::refresh_at;

const HOUR: Duration = Duration::from_secs(3600);
const FIVE_MIN: Duration = Duration::from_secs(300);

/// A wall clock that follows tokio's paused time, plus a jump the test can apply.
fn test_clock(
    jump: &std::sync::Arc<std::sync::atomic::AtomicI64>,
) -> (SystemTime, impl Fn() -> SystemTime + 'static) {
    let start_wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let start = tokio::time::Instant::now();
    let jump = jump.clone();
    let clock = move || {
        let shifted = start_wall + start.elapsed();
        let jump = jump.load(std::sync::atomic::Ordering::SeqCst);
        if jump >= 0 {
            shifted + Duration::from_secs(jump.unsigned_abs())
        } else {
            shifted - Duration::from_secs(jump.unsigned_abs())
        }
    };
    (start_wall, clock)
}

/// The refresh lands `margin` ahead of expiry (half the lifetime for short-lived
/// credentials), with jitter of up to half that lead, whatever the lifetime.
#[tokio::test(start_paused = true)]
async fn the_refresh_keeps_its_lead_over_the_whole_sleep() {
    for lifetime_s in [3600u64, 900, 90] {
        for jitter in [0.0, 0.5, 0.999] {
            let jump = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
            let (arrived, clock) = test_clock(&jump);
            let lifetime = Duration::from_secs(lifetime_s);
            let expires_at = arrived + lifetime;
            let started = tokio::time::Instant::now();
            sleep_until(refresh_at(arrived, expires_at, FIVE_MIN, jitter), clock).await;
            let left = lifetime.saturating_sub(started.elapsed());
            let lead = FIVE_MIN.min(lifetime / 2);
            assert!(
                left >= lead && left <= lead + lead / 2,
                "{lifetime_s} s credentials, jitter {jitter}: refreshed {} s before expiry, lead {} s",
                left.as_secs(),
                lead.as_secs()
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_clock_jump_forward_brings_the_refresh_forward() {
    let jump = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let (arrived, clock) = test_clock(&jump);
    let due = refresh_at(arrived, arrived + HOUR, FIVE_MIN, 0.0);
    let started = tokio::time::Instant::now();
    let sleeper = sleep_until(due, clock);
    let jumper = async {
        tokio::time::sleep(Duration::from_secs(600)).await;
        // NTP corrects a clock that was 50 minutes behind.
        jump.store(3000, std::sync::atomic::Ordering::SeqCst);
        std::future::pending::<()>().await;
    };
    tokio::select! {
        _ = sleeper => {}
        _ = jumper => unreachable!(),
    }
    assert!(started.elapsed() <= Duration::from_secs(600) + CLOCK_CHECK);
}

/// An AWS call that never ends (here: a server that accepts and never answers, and an SDK
/// config without the timeouts `aws::base_config` sets) is a stuck step: the identity
/// manager's heartbeat goes quiet, so the watchdog can restart the daemon. Before, the whole
/// chain sat inside `Heartbeat::waiting` and beat forever.
#[tokio::test(start_paused = true)]
async fn a_stuck_identity_step_silences_the_heartbeat() {
    let hole = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = hole.local_addr().expect("address");
    let ring = || {
        aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        )
    };
    let http_client = aws_smithy_http_client::Builder::new()
        .tls_provider(ring())
        .build_https();
    let http = aws_smithy_runtime_api::client::http::SharedHttpConnector::new(
        aws_smithy_http_client::Connector::builder()
            .tls_provider(ring())
            .build(),
    );
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .http_client(http_client)
        .timeout_config(aws_config::timeout::TimeoutConfig::disabled())
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .no_credentials()
        .endpoint_url(format!("http://{address}"))
        .load()
        .await;
    let state = tempfile::tempdir().expect("tempdir");
    let config = IdentityConfig {
        identity_pool_id: "us-east-1:00000000-0000-0000-0000-000000000000".into(),
        secret_id: "secret".into(),
        ..IdentityConfig::default()
    };
    let api = aws::Api {
        sdk,
        http,
        endpoint_url: None,
    };
    let (manager, _watch) = IdentityManager::new(api, config, state.path().to_owned());
    let (heartbeat, pulse) = crate::heartbeat::channel("identity manager");
    let task = tokio::spawn(manager.run(heartbeat));
    let limit = Duration::from_secs(10);
    // Within the first step's bound the manager looks alive...
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        crate::heartbeat::first_stalled(
            std::slice::from_ref(&pulse),
            limit,
            tokio::time::Instant::now()
        ),
        None
    );
    // ...past it, it is named stalled.
    tokio::time::sleep(step_limit(6) + limit).await;
    assert_eq!(
        crate::heartbeat::first_stalled(&[pulse], limit, tokio::time::Instant::now()),
        Some("identity manager")
    );
    task.abort();
    drop(hole);
}

#[test]
fn the_time_since_boot_is_read() {
    assert!(read_uptime().is_some_and(|up| up > Duration::ZERO));
}
