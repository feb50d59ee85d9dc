//! The identity manager: owns the onboarding chain (README, "How credentials are
//! kept fresh"; the steps as `doctor` walks them: docs/operations.md) and keeps the device's
//! authenticated Cognito credentials fresh. It publishes each new [`Session`] through a
//! `watch` channel; the MQTT side signs every (re)connect with the latest one.
//!
//! What to do next, and every fallback, is decided in `chain.rs`; this loop carries the steps
//! out: the AWS calls (through the step modules), the state files, the log and the watches.

pub mod api_roots;
mod attach;
pub mod aws;
pub mod bootstrap;
pub mod cache;
pub mod chain;
pub mod device;
mod rest;
mod signal;
pub mod user_pool;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;

pub use bootstrap::DeviceSecret;
use bootstrap::Registration;
pub use cache::IdentityCache;
use chain::{Attach, BackOff, Chain, Enrollment, Fallback, SecretRead, Serve, Step};
use device::{DEVICE_FILE, DeviceFile};
pub use signal::Signal;
use user_pool::UserPoolTokens;

use crate::config::{IdentityConfig, RefreshMode};
use crate::heartbeat::Heartbeat;
use crate::identity::aws::{Api, AwsCredentials, OPERATION_TIMEOUT};
use crate::repeats::Repeats;

/// Longest single sleep before the wall clock is read again: a clock that jumps (NTP after a
/// boot without RTC) moves the refresh by at most this much.
const CLOCK_CHECK: Duration = Duration::from_secs(60);
/// Where the time since boot is read.
const UPTIME_FILE: &str = "/proc/uptime";
/// Room over the SDK's own timeout before a step counts as stuck.
const STEP_SLACK: Duration = Duration::from_secs(5);

/// Why a step of the chain failed. Texts never carry a password, token or key.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    #[error("unauthenticated Cognito identity: {0}")]
    Unauthenticated(String),
    #[error("reading the bootstrap secret: {0}")]
    Secret(String),
    /// Enhanced-flow guest credentials were denied the secret: AWS scopes them down to a
    /// managed session policy without Secrets Manager. Only the basic flow can read it.
    #[error(
        "reading the bootstrap secret: access denied to guest credentials of Cognito's enhanced flow ({0}); AWS scopes those down with the session policy AmazonCognitoUnAuthedIdentitiesSessionPolicy, which allows no Secrets Manager action. Fix: set identity.unauth_role_arn to the stack's CognitoUnAuthRole output (the basic flow; update the stack first if its identity pool does not allow that flow), or regenerate the config with `iot-cognito-relay config-from-stack`"
    )]
    GuestScopedDown(String),
    /// AccessDeniedException on the secret; read_secret says which flow it was.
    #[error("reading the bootstrap secret: {0}")]
    SecretDenied(String),
    /// ResourceNotFoundException: no such secret (a wrong id, or another region).
    #[error("reading the bootstrap secret: {0}")]
    SecretNotFound(String),
    #[error("bootstrap secret is malformed: {0}")]
    SecretFormat(String),
    #[error("user pool rejected the password: {0}")]
    PasswordRejected(String),
    #[error("user pool sign-in: {0}")]
    SignIn(String),
    #[error("user pool rejected the refresh token: {0}")]
    RefreshRejected(String),
    #[error("authenticated Cognito credentials: {0}")]
    Credentials(String),
    #[error("attaching the IoT policy: {0}")]
    AttachPolicy(String),
    /// AWS refused a refresh step for a reason retrying will not fix (the app client or the
    /// pool was replaced, a parameter is no longer valid).
    #[error("refresh refused: {0}")]
    Refused(String),
    /// Fleet mode: `SignUp` failed in a way a retry may cure (throttling, the network).
    #[error("registering this device: {0}")]
    Registration(String),
    /// Fleet mode: the pool or its pre-sign-up trigger refused the `SignUp`.
    #[error("registration refused: {0}")]
    RegistrationRefused(String),
    /// Fleet mode: the name is registered and this device has no password for it.
    #[error(
        "device name {name} is already registered in user pool {pool} and this device holds no password for it (a re-flashed device, or a name used twice): if it is this device, remove the old user with `aws cognito-idp admin-delete-user --user-pool-id {pool} --username {name}`; otherwise set another identity.device_name"
    )]
    NameTaken { name: String, pool: String },
    /// Fleet mode: the device's own password was refused: the user was disabled, signed out
    /// or deleted by an operator.
    #[error(
        "the user pool refused this device's user {name} ({reason}): revoked by an operator (disabled or deleted)? See docs/operations.md"
    )]
    Revoked { name: String, reason: String },
    /// Fleet mode: the device name or `device.json` cannot be used.
    #[error("device identity: {0}")]
    Device(String),
}

impl IdentityError {
    /// Errors after which the device must stop using the credentials it holds.
    fn withdraws_session(&self) -> bool {
        matches!(
            self,
            IdentityError::Revoked { .. } | IdentityError::NameTaken { .. }
        )
    }
}

/// What the MQTT side needs to connect: who the device is and how to sign.
#[derive(Debug, Clone)]
pub struct Session {
    pub identity_id: String,
    pub credentials: AwsCredentials,
    /// The secret's `IoTEndpoint` tag.
    pub iot_endpoint: String,
    /// From then on the credentials are due for a refresh: a connect asks for fresh ones
    /// first (raises [`IdentityWatch::refresh_wanted`]).
    pub refresh_at: SystemTime,
}

/// Health of the identity side, for `status`.
#[derive(Debug, Clone, Default)]
pub struct IdentityStatus {
    pub last_refresh: Option<SystemTime>,
    /// The last failure, already free of secrets; cleared on success.
    pub last_error: Option<String>,
    /// `self-register` or `shared-user`, once the secret was read.
    pub registration_mode: Option<&'static str>,
    /// Fleet mode: this device's user name.
    pub device_name: Option<String>,
    /// When IoT Core's refusals last made the device attach its IoT policy again, and how
    /// often that happened since the start.
    pub policy_reattached_at: Option<SystemTime>,
    pub policy_reattaches_total: u64,
}

/// Owns the chain's I/O; see the module docs.
pub struct IdentityManager {
    api: Api,
    config: IdentityConfig,
    state_dir: PathBuf,
    chain: Chain,
    sessions: watch::Sender<Option<Arc<Session>>>,
    status: watch::Sender<IdentityStatus>,
    refusals: Signal,
    refresh_wanted: Signal,
    /// Holds back repeats of the same failure in the log.
    repeats: Repeats,
}

/// The ends the rest of the daemon holds.
#[derive(Clone)]
pub struct IdentityWatch {
    pub sessions: watch::Receiver<Option<Arc<Session>>>,
    pub status: watch::Receiver<IdentityStatus>,
    /// For the publisher: IoT Core refused a connection for authorization.
    pub refusals: Signal,
    /// For the publisher: a connect needs credentials that are not due for a refresh.
    pub refresh_wanted: Signal,
}

impl IdentityManager {
    pub fn new(
        api: Api,
        config: IdentityConfig,
        state_dir: PathBuf,
    ) -> (IdentityManager, IdentityWatch) {
        let cache = IdentityCache::load(&state_dir, &config.identity_pool_id);
        let chain = Chain::new(cache, config.refresh_margin);
        let (sessions, sessions_rx) = watch::channel(None);
        let (status, status_rx) = watch::channel(IdentityStatus::default());
        let refusals = Signal::default();
        let refresh_wanted = Signal::default();
        let manager = IdentityManager {
            api,
            config,
            state_dir,
            chain,
            sessions,
            status,
            refusals: refusals.clone(),
            refresh_wanted: refresh_wanted.clone(),
            repeats: Repeats::default(),
        };
        (
            manager,
            IdentityWatch {
                sessions: sessions_rx,
                status: status_rx,
                refusals,
                refresh_wanted,
            },
        )
    }

    /// The identity id remembered from an earlier run, if any.
    pub fn cached_identity_id(&self) -> Option<String> {
        self.chain.cache().identity_id.clone()
    }

    /// Runs forever: sign in, publish, sleep until the refresh is due, refresh; back off on errors.
    /// Beats between steps and while a step is within its bound (the SDK's timeouts); a step
    /// stuck past it silences the heartbeat, and the watchdog restarts the daemon.
    pub async fn run(mut self, heartbeat: Heartbeat) {
        self.wait_after_boot(&heartbeat).await;
        loop {
            heartbeat.beat();
            let jitter: f64 = rand::rng().random();
            let step = self.chain.next(Instant::now(), jitter);
            self.carry_out(step, &heartbeat).await;
            if self.chain.take_cache_changed() {
                self.save_cache();
            }
        }
    }

    /// Does one step and reports its outcome to the chain.
    async fn carry_out(&mut self, step: Step, heartbeat: &Heartbeat) {
        match step {
            Step::ReadSecret { after } => {
                log_fallback(after);
                let read = self.read_and_enroll(heartbeat).await;
                self.chain.on_secret(read);
            }
            Step::SignIn {
                secret,
                confirms_registration,
                after,
            } => {
                log_fallback(after);
                let signed_in = self
                    .sign_in(&secret, confirms_registration, heartbeat)
                    .await;
                self.chain.on_signed_in(signed_in);
            }
            Step::Refresh { secret, tokens } => {
                let refreshed = heartbeat
                    .bounded(
                        step_limit(1),
                        user_pool::refresh(&self.api.sdk, &secret, &tokens),
                    )
                    .await;
                self.chain.on_refreshed(refreshed);
            }
            Step::Credentials {
                identity_id,
                logins,
                after,
            } => {
                log_fallback(after);
                // GetId first when there is no identity id yet.
                let calls = if identity_id.is_some() { 1 } else { 2 };
                let found = heartbeat
                    .bounded(
                        step_limit(calls),
                        aws::authenticated_credentials(
                            &self.api.sdk,
                            &self.config.identity_pool_id,
                            identity_id,
                            logins,
                        ),
                    )
                    .await;
                self.chain
                    .on_credentials(found, Instant::now(), SystemTime::now());
            }
            Step::AttachPolicy(attach) => self.attach(attach, heartbeat).await,
            Step::Serve(serve) => self.serve(serve, heartbeat).await,
            Step::BackOff(back_off) => self.back_off(back_off, heartbeat).await,
        }
    }

    /// Step 5; a success that IoT Core's refusals asked for is counted in `status`.
    async fn attach(&mut self, attach: Attach, heartbeat: &Heartbeat) {
        let attached = heartbeat
            .bounded(
                step_limit(1),
                attach::attach_policy(
                    &self.api,
                    &attach.secret,
                    &attach.identity_id,
                    &attach.credentials,
                    &attach.id_token,
                ),
            )
            .await;
        if attached.is_ok() && attach.reattach {
            self.status.send_modify(|status| {
                status.policy_reattached_at = Some(SystemTime::now());
                status.policy_reattaches_total += 1;
            });
        }
        self.chain.on_attached(attached, Instant::now());
    }

    /// Publishes a new session, then waits until its refresh is due (or IoT Core refused a
    /// connection for authorization: the next pass attaches the policy again).
    async fn serve(&mut self, serve: Serve, heartbeat: &Heartbeat) {
        self.repeats.clear();
        let Serve {
            session,
            refresh_at,
            refreshed,
            refusals_from,
        } = serve;
        let now = SystemTime::now();
        let left = session
            .credentials
            .expires_at
            .duration_since(now)
            .unwrap_or_default();
        tracing::info!(
            identity_id = %session.identity_id,
            expires_in_s = left.as_secs(),
            // On demand, the refresh waits for the publisher to need one.
            next_refresh_s = (self.config.refresh == RefreshMode::Eager)
                .then(|| refresh_at.duration_since(now).unwrap_or_default().as_secs()),
            "{}",
            if refreshed { "credentials refreshed" } else { "signed in" }
        );
        self.status.send_modify(|status| {
            status.last_refresh = Some(SystemTime::now());
            status.last_error = None;
        });
        self.sessions.send_replace(Some(Arc::new(session)));
        // A want raised for the last session is answered by this one.
        self.refresh_wanted.clear();
        let eager = self.config.refresh == RefreshMode::Eager;
        let refused = heartbeat
            .waiting(async {
                tokio::select! {
                    _ = sleep_until(refresh_at, SystemTime::now), if eager => false,
                    _ = self.refresh_wanted.raised() => false,
                    _ = async {
                        if let Some(from) = refusals_from {
                            tokio::time::sleep_until(from).await;
                        }
                        self.refusals.raised().await;
                    } => true,
                }
            })
            .await;
        if refused {
            tracing::warn!(
                "IoT Core refuses this identity's connections: attaching the IoT policy again"
            );
            self.refusals.clear();
            self.chain.on_refused_by_iot(Instant::now());
        }
    }

    /// After a failed pass: withdraws the session of a refused device, logs (repeats held
    /// back) and waits the backoff.
    async fn back_off(&mut self, back_off: BackOff, heartbeat: &Heartbeat) {
        let BackOff {
            error,
            delay,
            withdraw_session,
            dropped_sign_in_after,
        } = back_off;
        if withdraw_session {
            // The publisher closes its connection and waits for a new session.
            tracing::error!(error = %error, "this device's user was refused: stopping its connection");
            self.sessions.send_replace(None);
        }
        if let Some(refused) = dropped_sign_in_after {
            tracing::warn!(
                refused,
                "refresh refused repeatedly; reading the secret again and signing in anew"
            );
        }
        let text = error.to_string();
        if let Some(held_back) = self.repeats.admit(&text) {
            tracing::warn!(
                error = %text,
                retry_in_s = delay.as_secs(),
                held_back,
                "identity step failed"
            );
        }
        self.status
            .send_modify(|status| status.last_error = Some(text));
        heartbeat.waiting(tokio::time::sleep(delay)).await;
    }

    /// `identity.start_delay`: right after boot, a random wait before the first AWS call.
    async fn wait_after_boot(&self, heartbeat: &Heartbeat) {
        let jitter: f64 = rand::rng().random();
        let delay = chain::start_delay(read_uptime(), self.config.start_delay, jitter);
        if delay.is_zero() {
            return;
        }
        tracing::info!(
            start_delay_s = delay.as_secs(),
            "the system booted recently: waiting before the first sign-in, so a fleet that booted together spreads out"
        );
        heartbeat.waiting(tokio::time::sleep(delay)).await;
    }

    /// Step 3 with the password; in fleet mode a sign-in that confirms the registration is
    /// noted in the device file first.
    async fn sign_in(
        &self,
        secret: &DeviceSecret,
        confirms_registration: bool,
        heartbeat: &Heartbeat,
    ) -> Result<UserPoolTokens, IdentityError> {
        let tokens = heartbeat
            .bounded(step_limit(1), user_pool::sign_in(&self.api.sdk, secret))
            .await?;
        if confirms_registration {
            self.note_registered()?;
        }
        Ok(tokens)
    }

    /// Steps 1-2, and in fleet mode the device's own user (registered on first start).
    async fn read_and_enroll(
        &mut self,
        heartbeat: &Heartbeat,
    ) -> Result<SecretRead, IdentityError> {
        let mut secret = self.read_secret(heartbeat).await?;
        let mode = secret.mode();
        self.status
            .send_modify(|status| status.registration_mode = Some(mode));
        let unconfirmed = match secret.registration.clone() {
            Some(registration) => {
                self.enroll(&mut secret, &registration, heartbeat).await? == Enrollment::Unconfirmed
            }
            None => false,
        };
        Ok(SecretRead {
            secret,
            unconfirmed,
        })
    }

    /// Fleet mode: fills in the device's user from `device.json`, and on first start makes it:
    /// a new password is written (fsynced) before `SignUp`, so no registered user is ever
    /// without its password on disk. Later starts never call `SignUp` again.
    async fn enroll(
        &mut self,
        secret: &mut DeviceSecret,
        registration: &Registration,
        heartbeat: &Heartbeat,
    ) -> Result<Enrollment, IdentityError> {
        let name = device::device_name(&self.config.device_name, &self.config.identity_pool_id)
            .map_err(device_error)?;
        self.status
            .send_modify(|status| status.device_name = Some(name.clone()));
        let (mut file, first_start) = self.device_file(&name)?;
        secret.username = file.username.clone();
        secret.password = file.password.clone();
        if file.registered {
            return Ok(Enrollment::Registered);
        }
        let outcome = heartbeat
            .bounded(
                step_limit(1),
                user_pool::sign_up(&self.api.sdk, secret, registration),
            )
            .await?;
        let enrollment = chain::enrollment(outcome, first_start, &name, &secret.user_pool_id)?;
        if enrollment == Enrollment::Registered {
            tracing::info!(device_name = %name, "registered this device's own user");
            file.registered = true;
            file.save(&self.state_dir).map_err(device_error)?;
        }
        Ok(enrollment)
    }

    /// The device file for `name`, made (with a new password, saved) on first start; with
    /// whether it was.
    fn device_file(&self, name: &str) -> Result<(DeviceFile, bool), IdentityError> {
        match DeviceFile::load(&self.state_dir).map_err(device_error)? {
            Some(file) if file.username != name => Err(IdentityError::Device(format!(
                "{DEVICE_FILE} in the state dir holds the user {:?} but the device name is {name:?}: remove that file to register under the new name (the old user stays in the pool)",
                file.username
            ))),
            Some(file) => Ok((file, false)),
            None => {
                let file = DeviceFile {
                    username: name.to_owned(),
                    password: device::generate_password(),
                    registered: false,
                };
                file.save(&self.state_dir).map_err(device_error)?;
                Ok((file, true))
            }
        }
    }

    /// A sign-in proved the stored user is ours: no `SignUp` at later starts.
    fn note_registered(&self) -> Result<(), IdentityError> {
        if let Some(mut file) = DeviceFile::load(&self.state_dir).map_err(device_error)? {
            file.registered = true;
            file.save(&self.state_dir).map_err(device_error)?;
        }
        Ok(())
    }

    async fn read_secret(&mut self, heartbeat: &Heartbeat) -> Result<DeviceSecret, IdentityError> {
        // GetId, GetOpenIdToken and AssumeRoleWithWebIdentity, twice for a stale cached id.
        let unauth = heartbeat
            .bounded(
                step_limit(6),
                bootstrap::unauthenticated_credentials(
                    &self.api.sdk,
                    &self.config.identity_pool_id,
                    &mut self.chain.cache_mut().unauth_identity_id,
                    &self.config.unauth_role_arn,
                ),
            )
            .await?;
        self.save_cache();
        heartbeat
            .bounded(
                step_limit(2),
                bootstrap::fetch_device_secret(&self.api.sdk, &unauth, &self.config.secret_id),
            )
            .await
            .map_err(|error| match error {
                IdentityError::SecretDenied(reason) if self.config.unauth_role_arn.is_empty() => {
                    IdentityError::GuestScopedDown(reason)
                }
                IdentityError::SecretDenied(reason) => IdentityError::Secret(reason),
                other => other,
            })
    }

    fn save_cache(&self) {
        if let Err(error) = self.chain.cache().save(&self.state_dir) {
            tracing::warn!(%error, "cannot write the identity cache; the identity id may change at the next start");
        }
    }
}

/// Logs why the chain fell back to a step.
fn log_fallback(after: Option<Fallback>) {
    match after {
        None => {}
        Some(Fallback::RefreshRejected(reason)) => {
            tracing::warn!(%reason, "refresh token rejected; signing in with the password");
        }
        Some(Fallback::PasswordRejected(reason)) => {
            tracing::warn!(%reason, "password rejected; reading the secret again (it may have been rotated)");
        }
        Some(Fallback::IdentityGone { identity_id, error }) => {
            tracing::warn!(identity_id = %identity_id, %error, "cached identity id rejected; asking for a new one");
        }
    }
}

fn device_error(error: device::DeviceError) -> IdentityError {
    IdentityError::Device(error.to_string())
}

/// The time since boot, from `/proc/uptime`.
fn read_uptime() -> Option<Duration> {
    let text = std::fs::read_to_string(UPTIME_FILE).ok()?;
    let seconds: f64 = text.split_whitespace().next()?.parse().ok()?;
    Duration::try_from_secs_f64(seconds).ok()
}

/// How long a step of `calls` AWS calls may take: each is bounded by the SDK's timeout. Past
/// it the step is stuck, and the identity manager's heartbeat goes quiet.
fn step_limit(calls: u32) -> Duration {
    OPERATION_TIMEOUT * calls + STEP_SLACK
}

/// Sleeps until the wall clock `clock` reads `due`, in steps of at most `CLOCK_CHECK`: the
/// instant is fixed, and only a jump of the clock (NTP after a boot without RTC) moves the
/// wake-up, by at most `CLOCK_CHECK`.
pub async fn sleep_until(due: SystemTime, clock: impl Fn() -> SystemTime) {
    loop {
        let left = due.duration_since(clock()).unwrap_or_default();
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(CLOCK_CHECK)).await;
    }
}

#[cfg(test)]
mod tests;
