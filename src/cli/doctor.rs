//! `iot-cognito-relay doctor`: walks the onboarding chain from the device as the daemon would,
//! one verdict per step, and on a failure names the likely cause and the fix.
//!
//! It changes nothing on the device or in the cloud: it reuses the identity ids the daemon
//! cached (`GetId` would create identities), never registers a device, never attaches a
//! policy, and never opens a second MQTT connection while the daemon is connected with the
//! same client id (IoT Core would disconnect the daemon): what the connected daemon proves
//! counts as passed. Every call is one the stack's policies allow; nothing it prints holds a
//! secret.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_config::SdkConfig;
use rumqttc::{ConnectReturnCode, ConnectionError};
use serde::Serialize;
use serde_json::Value;

use crate::config::{Config, Proxy};
use crate::identity::IdentityError;
use crate::identity::api_roots::api_roots;
use crate::identity::aws::{
    AwsCredentials, AwsFailure, SdkSetupError, base_config, credentials_for_identity,
};
use crate::identity::bootstrap::{DeviceSecret, fetch_device_secret, unauthenticated_existing};
use crate::identity::cache::IdentityCache;
use crate::identity::device::DeviceFile;
use crate::identity::user_pool::{self, UserPoolTokens};
use crate::publish::mqtt::{Connection, MqttSettings};
use crate::publish::refusal::{MAX_CLOCK_SKEW, Refusal};
use crate::publish::tls::TlsError;

/// How long a trial connection may take (TCP, TLS, upgrade, CONNECT, CONNACK).
const CONNECT_WAIT: Duration = Duration::from_secs(15);
/// How long the running daemon may take to answer `status`.
const STATUS_WAIT: Duration = Duration::from_secs(5);

/// One step's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    Pass {
        detail: String,
    },
    Fail {
        cause: String,
        fix: String,
    },
    /// Not checked, and why (a step before failed, or checking would change something).
    Skipped {
        reason: String,
    },
}

/// A step and its verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    pub step: &'static str,
    #[serde(flatten)]
    pub verdict: Verdict,
}

/// Every step, in the chain's order.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub steps: Vec<Step>,
}

impl Report {
    fn add(&mut self, step: &'static str, verdict: Verdict) {
        self.steps.push(Step { step, verdict });
    }

    fn pass(&mut self, step: &'static str, detail: impl Into<String>) {
        self.add(
            step,
            Verdict::Pass {
                detail: detail.into(),
            },
        );
    }

    fn fail(&mut self, step: &'static str, cause: impl Into<String>, fix: impl Into<String>) {
        self.add(
            step,
            Verdict::Fail {
                cause: cause.into(),
                fix: fix.into(),
            },
        );
    }

    fn skip(&mut self, step: &'static str, reason: impl Into<String>) {
        self.add(
            step,
            Verdict::Skipped {
                reason: reason.into(),
            },
        );
    }

    /// Whether any step failed (exit 1).
    pub fn failed(&self) -> bool {
        self.steps
            .iter()
            .any(|step| matches!(step.verdict, Verdict::Fail { .. }))
    }

    /// One line per step: `PASS`, `FAIL` (with the fix on the next line) or `SKIP`.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for Step { step, verdict } in &self.steps {
            match verdict {
                Verdict::Pass { detail } => out.push_str(&format!("PASS  {step}: {detail}\n")),
                Verdict::Fail { cause, fix } => {
                    out.push_str(&format!("FAIL  {step}: {cause}\n      fix: {fix}\n"));
                }
                Verdict::Skipped { reason } => out.push_str(&format!("SKIP  {step}: {reason}\n")),
            }
        }
        out
    }
}

/// The region an identity pool id names (`us-east-1:…`).
fn pool_region(identity_pool_id: &str) -> &str {
    identity_pool_id
        .split_once(':')
        .map_or("", |(region, _)| region)
}

/// How far AWS's clock (an HTTP `Date`) is ahead of this device's, in seconds.
fn clock_skew(date: &str, now: SystemTime) -> Option<i64> {
    let server =
        aws_smithy_types::DateTime::from_str(date, aws_smithy_types::date_time::Format::HttpDate)
            .ok()?;
    let local = now.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs() as i64;
    Some(server.secs() - local)
}

/// The cause and fix of a failed guest step.
fn guest_failure(error: &AwsFailure, region: &str) -> (String, String) {
    match error.code.as_deref() {
        Some("ResourceNotFoundException") => (
            format!("the identity pool or the cached guest identity is not known in {region} ({error})"),
            "check identity.identity_pool_id and aws.region; a replaced stack needs a new config (config-from-stack)".into(),
        ),
        Some("NotAuthorizedException") => (
            format!("guest access refused ({error})"),
            "the identity pool must allow unauthenticated identities (the stack's template does); with identity.unauth_role_arn, check it is the stack's CognitoUnAuthRole".into(),
        ),
        _ => (
            error.to_string(),
            "check the network path to Cognito (DNS, firewall, network.proxy)".into(),
        ),
    }
}

/// The cause and fix of a failed secret read.
fn secret_failure(error: &IdentityError, secret_id: &str) -> (String, String) {
    match error {
        IdentityError::SecretDenied(reason) | IdentityError::GuestScopedDown(reason) => (
            format!("access denied to the secret ({reason})"),
            format!(
                "this network's public address is not in the stack's DeviceCidrs (an explicit deny in the secret's policy), or secret_id {secret_id:?} is not the stack's; with the enhanced flow, set identity.unauth_role_arn"
            ),
        ),
        IdentityError::SecretNotFound(reason) => (
            format!("no such secret ({reason})"),
            format!(
                "secret_id {secret_id:?} is wrong, or the secret is in another region than aws.region"
            ),
        ),
        other => (
            other.to_string(),
            "check the network path to Secrets Manager (DNS, firewall, network.proxy)".into(),
        ),
    }
}

/// `status` of a running daemon, if one answers on the socket.
fn daemon_status(socket: &Path) -> Option<Value> {
    crate::cli::socket_client::status(socket, STATUS_WAIT).ok()
}

/// Records the `Date` header of AWS's answers.
#[derive(Debug, Clone, Default)]
struct DateSeen(Arc<Mutex<Option<String>>>);

impl aws_smithy_runtime_api::client::interceptors::Intercept for DateSeen {
    fn name(&self) -> &'static str {
        "DateSeen"
    }

    fn read_after_transmit(
        &self,
        context: &aws_smithy_runtime_api::client::interceptors::context::BeforeDeserializationInterceptorContextRef<'_>,
        _components: &aws_smithy_runtime_api::client::runtime_components::RuntimeComponents,
        _config: &mut aws_smithy_types::config_bag::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        if let Some(date) = context.response().headers().get("date")
            && let Ok(mut seen) = self.0.lock()
        {
            *seen = Some(date.to_owned());
        }
        Ok(())
    }
}

/// Walks the chain for `config` (loaded from `config_path`; `sandbox` names the paths the
/// installed unit would not let the daemon write); the report says what passed.
pub async fn diagnose(
    config: &Config,
    config_path: &Path,
    sandbox: &[String],
    proxy: Option<&Proxy>,
) -> Report {
    let mut doctor = Doctor {
        config,
        proxy,
        report: Report::default(),
    };
    doctor.walk(config_path, sandbox).await;
    doctor.report
}

/// The walk's state: what it checks, and the verdicts so far. A step that returns `None`
/// ended the walk, and its verdict says why.
struct Doctor<'a> {
    config: &'a Config,
    proxy: Option<&'a Proxy>,
    report: Report,
}

impl Doctor<'_> {
    async fn walk(&mut self, config_path: &Path, sandbox: &[String]) -> Option<()> {
        self.config_step(config_path, sandbox);
        self.proxy_step();
        self.region_step()?;
        let daemon_connected = self.daemon_step();
        let base = self.sdk_config().await?;
        let dates = DateSeen::default();
        let cognito_config = aws_sdk_cognitoidentity::config::Builder::from(&base)
            .interceptor(dates.clone())
            .build();
        let cognito = aws_sdk_cognitoidentity::Client::from_conf(cognito_config);
        let cache = IdentityCache::load(
            &self.config.state.dir,
            &self.config.identity.identity_pool_id,
        );
        let guest = self.guest_steps(&base, &cognito, &cache, &dates).await?;
        let secret = self.secret_step(&base, &guest).await?;
        let secret = with_device_user(&mut self.report, secret, &self.config.state.dir)?;
        let tokens = self.sign_in_step(&base, &secret).await?;
        let (identity_id, credentials) = self
            .credentials_step(&cognito, &cache, &secret, &tokens)
            .await?;
        self.mqtt_steps(&secret, &identity_id, credentials, daemon_connected)
            .await;
        Some(())
    }

    /// Loading checked the file (its keys, its permissions); the unit's sandbox is separate.
    fn config_step(&mut self, config_path: &Path, sandbox: &[String]) {
        if sandbox.is_empty() {
            self.report
                .pass("config", format!("{} is valid", config_path.display()));
        } else {
            self.report.fail(
                "config",
                sandbox.join("; "),
                "add the ReadWritePaths= drop-in named above (docs/operations.md, \"Paths outside the unit's sandbox\")",
            );
        }
    }

    fn proxy_step(&mut self) {
        match self.proxy {
            Some(proxy) => self
                .report
                .pass("proxy", format!("every connection goes through {proxy:?}")),
            None => self
                .report
                .skip("proxy", "none configured: direct connections"),
        }
    }

    /// An identity pool lives in the region its id names.
    fn region_step(&mut self) -> Option<()> {
        let region = &self.config.aws.region;
        let pool = &self.config.identity.identity_pool_id;
        if pool_region(pool) == region {
            self.report
                .pass("region", format!("{region}, as the identity pool id says"));
            return Some(());
        }
        self.report.fail(
            "region",
            format!(
                "aws.region is {region} but the identity pool {pool} is in {}",
                pool_region(pool)
            ),
            format!(
                "set aws.region = {:?} (or leave it out: it defaults to the pool's)",
                pool_region(pool)
            ),
        );
        None
    }

    /// The running daemon: what it proves is not tried again. Whether it is connected.
    fn daemon_step(&mut self) -> bool {
        let status = daemon_status(&self.config.socket.path);
        let daemon_connected = status.as_ref().is_some_and(|s| s["state"] == "connected");
        match &status {
            Some(status) => self.report.pass(
                "daemon",
                format!(
                    "running, state {}; mqtt last error: {}",
                    status["state"].as_str().unwrap_or("?"),
                    status["mqtt_last_error"].as_str().unwrap_or("none")
                ),
            ),
            None => self.report.skip(
                "daemon",
                "not running (or socket.path unreachable): every step is tried here",
            ),
        }
        daemon_connected
    }

    /// The SDK's client; which CA roots its HTTPS calls trust comes first, as a fallback to
    /// the built-in roots explains a TLS failure on a device with its own CA setup.
    async fn sdk_config(&mut self) -> Option<SdkConfig> {
        let config = self.config;
        self.report.pass(
            "trust store",
            format!("AWS API calls trust {}", api_roots().describe()),
        );
        match base_config(&config.aws.region, &config.aws.endpoint_url, self.proxy).await {
            Ok(api) => Some(api.sdk),
            Err(error @ SdkSetupError::Proxy) => {
                self.report.fail(
                    "proxy",
                    error.to_string(),
                    "check network.proxy or HTTPS_PROXY",
                );
                None
            }
            Err(error @ SdkSetupError::Roots(_)) => {
                self.report.fail(
                    "trust store",
                    error.to_string(),
                    "report this as a bug: the built-in roots are part of the binary",
                );
                None
            }
        }
    }

    /// The cached guest identity's credentials, and the clock against Cognito's answer.
    async fn guest_steps(
        &mut self,
        base: &SdkConfig,
        cognito: &aws_sdk_cognitoidentity::Client,
        cache: &IdentityCache,
        dates: &DateSeen,
    ) -> Option<Guest> {
        let Some(guest_id) = cache.unauth_identity_id.clone() else {
            self.report.skip(
                "guest credentials",
                format!(
                    "no guest identity cached in {} yet (the daemon creates one at its first start; doctor creates none). Run doctor as root or the iot-cognito-relay user to read the state dir",
                    self.config.state.dir.display()
                ),
            );
            return None;
        };
        let unauth_role_arn = &self.config.identity.unauth_role_arn;
        let guest = unauthenticated_existing(base, cognito, &guest_id, unauth_role_arn).await;
        let clock_off = self.clock_step(dates);
        match guest {
            Ok(credentials) => {
                self.report
                    .pass("guest credentials", format!("guest identity {guest_id}"));
                Some(Guest {
                    credentials,
                    clock_off,
                })
            }
            Err(error) => {
                let (cause, fix) = guest_failure(&error, &self.config.aws.region);
                self.report.fail("guest credentials", cause, fix);
                None
            }
        }
    }

    /// The clock, against the Date of Cognito's answer (whatever the answer was). Whether it
    /// is too far off for AWS to accept a signature.
    fn clock_step(&mut self, dates: &DateSeen) -> bool {
        let seen = dates.0.lock().ok().and_then(|seen| seen.clone());
        let skew = seen.and_then(|date| clock_skew(&date, SystemTime::now()));
        let clock_off = skew.is_some_and(|skew| skew.unsigned_abs() > MAX_CLOCK_SKEW.as_secs());
        match skew {
            Some(skew) if clock_off => self.report.fail(
                "clock",
                format!(
                    "this device's clock is {} s {} AWS's",
                    skew.abs(),
                    if skew > 0 { "behind" } else { "ahead of" }
                ),
                "fix the time (NTP: timedatectl set-ntp true); AWS refuses signatures more than 5 minutes off",
            ),
            Some(skew) => self
                .report
                .pass("clock", format!("{} s from AWS's", skew.abs())),
            None => self
                .report
                .skip("clock", "AWS's Date header was not seen (Cognito did not answer)"),
        }
        clock_off
    }

    async fn secret_step(&mut self, base: &SdkConfig, guest: &Guest) -> Option<DeviceSecret> {
        if guest.clock_off {
            // Every call from here on is signed, and AWS refuses those with a clock this far off.
            self.report.skip(
                "secret",
                "not tried: AWS refuses signed calls while the clock is off",
            );
            return None;
        }
        let secret_id = &self.config.identity.secret_id;
        match fetch_device_secret(base, &guest.credentials, secret_id).await {
            Ok(secret) => {
                self.report.pass(
                    "secret",
                    format!(
                        "{} mode, IoT endpoint {}",
                        secret.mode(),
                        secret.iot_endpoint
                    ),
                );
                Some(secret)
            }
            Err(error) => {
                let (cause, fix) = secret_failure(&error, secret_id);
                self.report.fail("secret", cause, fix);
                None
            }
        }
    }

    async fn sign_in_step(
        &mut self,
        base: &SdkConfig,
        secret: &DeviceSecret,
    ) -> Option<UserPoolTokens> {
        match user_pool::sign_in(base, secret).await {
            Ok(tokens) => {
                self.report.pass(
                    "sign-in",
                    format!("user {} in pool {}", secret.username, secret.user_pool_id),
                );
                Some(tokens)
            }
            Err(error) => {
                self.report.fail(
                    "sign-in",
                    error.to_string(),
                    if secret.registration.is_some() {
                        "this device's user was disabled or deleted (revoked), or device.json does not match the pool: see docs/operations.md, \"Fleets\""
                    } else {
                        "the shared user's password in the secret does not match the pool (rotated half-way?)"
                    },
                );
                None
            }
        }
    }

    /// The cached authenticated identity and its credentials.
    async fn credentials_step(
        &mut self,
        cognito: &aws_sdk_cognitoidentity::Client,
        cache: &IdentityCache,
        secret: &DeviceSecret,
        tokens: &UserPoolTokens,
    ) -> Option<(String, AwsCredentials)> {
        let Some(identity_id) = cache.identity_id.clone() else {
            self.report.skip(
                "credentials",
                "no authenticated identity cached yet (the daemon creates it at its first start)",
            );
            return None;
        };
        let logins =
            crate::identity::aws::user_pool_logins(&secret.user_pool_id, tokens.id_token.expose());
        match credentials_for_identity(cognito, &identity_id, Some(logins)).await {
            Ok(credentials) => {
                self.report
                    .pass("credentials", format!("identity {identity_id}"));
                Some((identity_id, credentials))
            }
            Err(error) => {
                self.report.fail(
                    "credentials",
                    error.to_string(),
                    "the identity pool no longer trusts this user pool, or the cached identity was deleted: restart the daemon (it asks for a new one)",
                );
                None
            }
        }
    }

    /// The IoT endpoint, the policy and a CONNECT: proven by the connected daemon, else tried
    /// once.
    async fn mqtt_steps(
        &mut self,
        secret: &DeviceSecret,
        identity_id: &str,
        credentials: AwsCredentials,
        daemon_connected: bool,
    ) {
        if daemon_connected {
            self.report.pass("mqtt", "the running daemon is connected (IoT policy attached, endpoint reachable); no second connection with its client id");
            return;
        }
        let settings = match trial_settings(self.config, self.proxy) {
            Ok(settings) => settings,
            Err(error) => {
                self.report
                    .fail("mqtt", error.to_string(), "fix mqtt.ca_file");
                return;
            }
        };
        let session = crate::identity::Session {
            identity_id: identity_id.to_owned(),
            refresh_at: credentials.expires_at,
            credentials,
            iot_endpoint: secret.iot_endpoint.clone(),
        };
        let url = settings.broker_url(&session);
        let host = crate::publish::mqtt::host_of(&url);
        let connection = match crate::publish::mqtt::connect(&settings, &session) {
            Ok(connection) => connection,
            Err(error) => {
                self.report
                    .fail("mqtt", error.to_string(), "see the credentials step");
                return;
            }
        };
        let outcome = try_connect(connection).await;
        self.report
            .add("mqtt", connect_verdict(&host, outcome, SystemTime::now()));
    }
}

/// The guest's credentials, and whether the clock is too far off to use them.
struct Guest {
    credentials: AwsCredentials,
    clock_off: bool,
}

/// Fleet mode: the device's own user from `device.json` (never registered here).
fn with_device_user(
    report: &mut Report,
    mut secret: DeviceSecret,
    state_dir: &Path,
) -> Option<DeviceSecret> {
    if secret.registration.is_none() {
        return Some(secret);
    }
    match DeviceFile::load(state_dir) {
        Ok(Some(device)) => {
            secret.username = device.username;
            secret.password = device.password;
            Some(secret)
        }
        Ok(None) => {
            report.skip(
                "sign-in",
                "this device is not registered yet (no device.json): the daemon registers it at its first start; doctor registers nothing",
            );
            None
        }
        Err(error) => {
            report.fail("sign-in", error.to_string(), "run doctor as root or the iot-cognito-relay user; a damaged device.json: see docs/operations.md, \"Fleets\"");
            None
        }
    }
}

/// The daemon's MQTT settings for one trial connection: no session kept, one message at most.
fn trial_settings(config: &Config, proxy: Option<&Proxy>) -> Result<MqttSettings, TlsError> {
    let tls = crate::publish::tls::tls_config(&config.mqtt.ca_file)?;
    let proxy_tls = match proxy {
        Some(proxy) if proxy.tls => crate::publish::tls::proxy_tls_config().ok(),
        _ => None,
    };
    Ok(MqttSettings {
        config: config.mqtt.clone(),
        region: config.aws.region.clone(),
        tls,
        max_in_flight: 1,
        persistent_session: false,
        proxy: proxy.cloned().map(|proxy| (proxy, proxy_tls)),
        wire: Arc::default(),
    })
}

/// How a trial CONNECT ended: `None` if no CONNACK came within `CONNECT_WAIT`; else the
/// broker's answer, or the connection's error (`None`: it ended without one).
type TrialOutcome = Option<Result<ConnectReturnCode, Option<ConnectionError>>>;

/// Waits for the CONNACK, then disconnects at once.
async fn try_connect(mut connection: Connection) -> TrialOutcome {
    let outcome = tokio::time::timeout(CONNECT_WAIT, async {
        loop {
            match connection.events.recv().await {
                Some(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack)))) => {
                    return Ok(ack.code);
                }
                Some(Ok(_)) => continue,
                Some(Err(error)) => return Err(Some(error)),
                None => return Err(None),
            }
        }
    })
    .await;
    let _ = connection.client.try_disconnect();
    outcome.ok()
}

/// The `mqtt` step's verdict on a trial CONNECT to `host`.
fn connect_verdict(host: &str, outcome: TrialOutcome, now: SystemTime) -> Verdict {
    let fail = |cause: String, fix: &str| Verdict::Fail {
        cause,
        fix: fix.to_owned(),
    };
    match outcome {
        Some(Ok(ConnectReturnCode::Success)) => Verdict::Pass {
            detail: format!(
                "CONNECT to {host} accepted (IoT policy attached); disconnected at once"
            ),
        },
        Some(Ok(code)) => fail(
            format!("{host} refused the CONNECT: {code:?}"),
            "check the IoT policy attached to this identity (the stack's policy allows its own client id)",
        ),
        Some(Err(Some(error)))
            if Refusal::classify(&error, now) != Refusal::Other
                || crate::publish::mqtt::closed_by_broker(&error) =>
        {
            fail(
                format!("{host} closed the connection after CONNECT ({error})"),
                "no IoT policy allows this identity to connect: it is attached at the daemon's first start (or after a refusal); start the daemon, or attach the stack's IoT policy to this identity",
            )
        }
        Some(Err(error)) => fail(
            format!(
                "cannot reach {host}: {}",
                error.map_or_else(|| "the connection ended".to_owned(), |e| e.to_string())
            ),
            "check DNS, the firewall (port 443 out), mqtt.endpoint / mqtt.url and network.proxy",
        ),
        None => fail(
            format!("no CONNACK from {host} within {} s", CONNECT_WAIT.as_secs()),
            "check DNS, the firewall (port 443 out) and network.proxy",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_step_fails_the_report_and_its_fix_is_printed() {
        let mut report = Report::default();
        report.pass("region", "us-east-1");
        report.skip("daemon", "not running");
        assert!(!report.failed());
        report.fail("secret", "access denied", "check DeviceCidrs");
        assert!(report.failed());
        assert_eq!(
            report.to_text(),
            "PASS  region: us-east-1\nSKIP  daemon: not running\nFAIL  secret: access denied\n      fix: check DeviceCidrs\n"
        );
        let json = serde_json::to_value(&report).expect("json");
        assert_eq!(json["steps"][2]["verdict"], "fail");
        assert_eq!(json["steps"][2]["fix"], "check DeviceCidrs");
    }

    #[test]
    fn the_clock_is_compared_with_aws_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_765_000_000);
        let date = aws_smithy_types::DateTime::from_secs(1_765_000_000 + 7200)
            .fmt(aws_smithy_types::date_time::Format::HttpDate)
            .expect("format");
        assert_eq!(clock_skew(&date, now), Some(7200));
        assert_eq!(clock_skew("not a date", now), None);
        assert_eq!(pool_region("us-east-1:0b7c"), "us-east-1");
    }

    #[test]
    fn a_denied_secret_points_at_the_device_network() {
        let (cause, fix) = secret_failure(
            &IdentityError::SecretDenied("AccessDeniedException: explicit deny".into()),
            "relay/bootstrap",
        );
        assert!(cause.contains("access denied"));
        assert!(fix.contains("DeviceCidrs") && fix.contains("relay/bootstrap"));
        let (_, fix) = secret_failure(
            &IdentityError::SecretNotFound("ResourceNotFoundException: no such secret".into()),
            "typo",
        );
        assert!(fix.contains("secret_id \"typo\" is wrong"));
    }

    fn cause_of(verdict: Verdict) -> String {
        match verdict {
            Verdict::Fail { cause, .. } => cause,
            other => panic!("not a failure: {other:?}"),
        }
    }

    #[test]
    fn a_trial_connect_is_judged_by_how_it_ended() {
        let now = SystemTime::now();
        let host = "a1.iot.us-east-1.amazonaws.com";
        assert_eq!(
            connect_verdict(host, Some(Ok(ConnectReturnCode::Success)), now),
            Verdict::Pass {
                detail: format!(
                    "CONNECT to {host} accepted (IoT policy attached); disconnected at once"
                )
            }
        );
        assert_eq!(
            cause_of(connect_verdict(
                host,
                Some(Ok(ConnectReturnCode::NotAuthorized)),
                now
            )),
            format!("{host} refused the CONNECT: NotAuthorized")
        );
        assert_eq!(
            cause_of(connect_verdict(host, Some(Err(None)), now)),
            format!("cannot reach {host}: the connection ended")
        );
        assert_eq!(
            cause_of(connect_verdict(host, None, now)),
            format!("no CONNACK from {host} within 15 s")
        );
    }

    #[test]
    fn a_trial_connect_the_broker_closes_points_at_the_iot_policy() {
        use rumqttc::StateError;
        let now = SystemTime::now();
        let closed = ConnectionError::MqttState(StateError::ConnectionAborted);
        let Verdict::Fail { cause, fix } = connect_verdict("host", Some(Err(Some(closed))), now)
        else {
            panic!("a closed connection must fail the step");
        };
        assert!(cause.starts_with("host closed the connection after CONNECT ("));
        assert!(fix.starts_with("no IoT policy allows this identity to connect"));
        let unreachable = ConnectionError::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        let Verdict::Fail { cause, fix } =
            connect_verdict("host", Some(Err(Some(unreachable))), now)
        else {
            panic!("an unreachable host must fail the step");
        };
        assert!(cause.starts_with("cannot reach host: "));
        assert!(fix.starts_with("check DNS, the firewall (port 443 out), mqtt.endpoint"));
    }
}
