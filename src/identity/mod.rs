//! The identity manager: owns the onboarding chain (README, "How credentials are
//! kept fresh"; the steps as `doctor` walks them: docs/operations.md) and keeps the device's
//! authenticated Cognito credentials fresh. It publishes each new [`Session`] through a
//! `watch` channel; the MQTT side signs every (re)connect with the latest one.

mod attach;
pub mod aws;
pub mod bootstrap;
pub mod cache;
pub mod device;
pub mod user_pool;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_config::SdkConfig;
use rand::Rng;
use tokio::sync::watch;

pub use attach::RefusalSignal;
pub use bootstrap::DeviceSecret;
use bootstrap::Registration;
pub use cache::IdentityCache;
use device::{DEVICE_FILE, DeviceFile};
use user_pool::{SignUpOutcome, UserPoolTokens};

use crate::config::IdentityConfig;
use crate::heartbeat::Heartbeat;
use crate::identity::aws::{
    AwsCredentials, AwsFailure, OPERATION_TIMEOUT, credentials_for_identity,
};
use crate::repeats::Repeats;
use crate::retry::Backoff;

/// First retry after a failed sign-in waits up to this long; later ones double up to the cap.
const RETRY_BASE: Duration = Duration::from_secs(2);
const RETRY_CAP: Duration = Duration::from_secs(300);
/// Refresh at the latest when this much of the credentials' lifetime is left, whatever the
/// configured margin, so that short-lived credentials (moto: 90 s) are still refreshed in time.
const MAX_LEAD_FRACTION: f64 = 0.5;
/// Credentials that expire sooner than this on arrival are refused, never used to sign.
const MIN_USEFUL_VALIDITY: Duration = Duration::from_secs(60);
/// Longest single sleep before the wall clock is read again: a clock that jumps (NTP after a
/// boot without RTC) moves the refresh by at most this much.
const CLOCK_CHECK: Duration = Duration::from_secs(60);
/// After this many refreshes in a row that AWS refused for good (not throttling, 5xx or the
/// network), the standing is dropped: the secret is read again and the device signs in anew.
const NON_TRANSIENT_LIMIT: u32 = 3;
/// Never wait less than this between two refreshes.
const MIN_REFRESH_DELAY: Duration = Duration::from_secs(5);
/// After attaching the policy again because IoT Core refused a connection, further refusals
/// are ignored this long: a refusal the policy does not cure (e.g. a network outside
/// DeviceCidrs) must not become a loop of attach calls.
const REATTACH_MIN_INTERVAL: Duration = Duration::from_secs(300);
/// `identity.start_delay` applies only when the system booted less than this long ago: a
/// fleet that lost power together comes back together, a daemon restarted later does not wait.
pub const BOOT_WINDOW: Duration = Duration::from_secs(600);
/// How long user pool tokens that a failed pass obtained are used again by its retries; far
/// inside the ID token's hour.
const TOKEN_REUSE: Duration = Duration::from_secs(600);
/// Where the time since boot is read.
const UPTIME_FILE: &str = "/proc/uptime";

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

/// The device's standing with the user pool, kept between refreshes.
struct SignedIn {
    secret: DeviceSecret,
    tokens: UserPoolTokens,
    /// Set when a pass got these tokens and then failed at a later step (e.g. `GetId`
    /// throttled): the retry uses them again until then instead of spending another
    /// `InitiateAuth` (itself under a quota) on new ones.
    reusable_until: Option<tokio::time::Instant>,
}

impl SignedIn {
    fn new(secret: DeviceSecret, tokens: UserPoolTokens) -> SignedIn {
        SignedIn {
            secret,
            tokens,
            reusable_until: None,
        }
    }

    /// Kept after a failure past the sign-in: reusable for [`TOKEN_REUSE`] from the first one.
    fn kept(mut self) -> SignedIn {
        self.reusable_until
            .get_or_insert_with(|| tokio::time::Instant::now() + TOKEN_REUSE);
        self
    }

    fn reusable(&self) -> bool {
        self.reusable_until
            .is_some_and(|until| tokio::time::Instant::now() < until)
    }
}

/// What the retry loop of [`IdentityManager::run`] remembers between passes.
struct Retries {
    backoff: Backoff,
    repeats: Repeats,
    /// Refreshes in a row that AWS refused for good (see `NON_TRANSIENT_LIMIT`).
    refused_in_a_row: u32,
}

/// Owns the chain; see the module docs.
pub struct IdentityManager {
    base: SdkConfig,
    config: IdentityConfig,
    state_dir: PathBuf,
    cache: IdentityCache,
    sessions: watch::Sender<Option<Arc<Session>>>,
    status: watch::Sender<IdentityStatus>,
    refusals: RefusalSignal,
    /// When IoT Core's refusals last had the policy attached again: they are not acted on
    /// again sooner than [`REATTACH_MIN_INTERVAL`] after it (IoT Core may still be applying
    /// the attachment, or the refusal is one an attachment does not cure).
    last_reattach: Option<tokio::time::Instant>,
    /// A refusal asked for the attach that the next pass makes (for `status`).
    reattaching: bool,
}

/// The ends the rest of the daemon holds.
#[derive(Clone)]
pub struct IdentityWatch {
    pub sessions: watch::Receiver<Option<Arc<Session>>>,
    pub status: watch::Receiver<IdentityStatus>,
    /// For the publisher: IoT Core refused a connection for authorization.
    pub refusals: RefusalSignal,
}

impl IdentityManager {
    pub fn new(
        base: SdkConfig,
        config: IdentityConfig,
        state_dir: PathBuf,
    ) -> (IdentityManager, IdentityWatch) {
        let cache = IdentityCache::load(&state_dir, &config.identity_pool_id);
        let (sessions, sessions_rx) = watch::channel(None);
        let (status, status_rx) = watch::channel(IdentityStatus::default());
        let refusals = RefusalSignal::default();
        let manager = IdentityManager {
            base,
            config,
            state_dir,
            cache,
            sessions,
            status,
            refusals: refusals.clone(),
            last_reattach: None,
            reattaching: false,
        };
        (
            manager,
            IdentityWatch {
                sessions: sessions_rx,
                status: status_rx,
                refusals,
            },
        )
    }

    /// The identity id remembered from an earlier run, if any.
    pub fn cached_identity_id(&self) -> Option<String> {
        self.cache.identity_id.clone()
    }

    /// Runs forever: sign in, publish, sleep until the refresh is due, refresh; back off on errors.
    /// Beats between steps and while a step is within its bound (the SDK's timeouts); a step
    /// stuck past it silences the heartbeat, and the watchdog restarts the daemon.
    pub async fn run(mut self, heartbeat: Heartbeat) {
        let mut retries = Retries {
            backoff: Backoff::new(RETRY_BASE, RETRY_CAP, Duration::from_secs(1)),
            repeats: Repeats::default(),
            refused_in_a_row: 0,
        };
        let mut signed_in: Option<SignedIn> = None;
        self.wait_after_boot(&heartbeat).await;
        loop {
            let refreshing = signed_in.is_some();
            heartbeat.beat();
            signed_in = match self.obtain(signed_in.take(), &heartbeat).await {
                Ok((standing, session)) => Some(
                    self.serve(standing, session, refreshing, &mut retries, &heartbeat)
                        .await,
                ),
                Err((kept, error)) => self.back_off(kept, error, &mut retries, &heartbeat).await,
            };
        }
    }

    /// Publishes a new session, then waits until its refresh is due (or IoT Core refused a
    /// connection for authorization: the next pass attaches the policy again).
    async fn serve(
        &mut self,
        standing: SignedIn,
        session: Session,
        refreshing: bool,
        retries: &mut Retries,
        heartbeat: &Heartbeat,
    ) -> SignedIn {
        retries.backoff.reset();
        retries.repeats.clear();
        retries.refused_in_a_row = 0;
        let expires_at = session.credentials.expires_at;
        let arrived = SystemTime::now();
        let left = expires_at.duration_since(arrived).unwrap_or_default();
        let jitter: f64 = rand::rng().random();
        // Fixed now, from the whole lifetime: recomputing it from the time left
        // would shrink the lead as time passes (issue 18, item 1).
        let due = refresh_at(arrived, expires_at, self.config.refresh_margin, jitter);
        let delay = due.duration_since(arrived).unwrap_or_default();
        tracing::info!(
            identity_id = %session.identity_id,
            expires_in_s = left.as_secs(),
            next_refresh_s = delay.as_secs(),
            "{}",
            if refreshing { "credentials refreshed" } else { "signed in" }
        );
        self.status.send_modify(|status| {
            status.last_refresh = Some(SystemTime::now());
            status.last_error = None;
        });
        self.sessions.send_replace(Some(Arc::new(session)));
        let hold_off = self.last_reattach.map(|at| at + REATTACH_MIN_INTERVAL);
        let refused = heartbeat
            .waiting(async {
                tokio::select! {
                    _ = sleep_until(due, SystemTime::now) => false,
                    _ = async {
                        if let Some(until) = hold_off {
                            tokio::time::sleep_until(until).await;
                        }
                        self.refusals.raised().await;
                    } => true,
                }
            })
            .await;
        if refused {
            // The next pass refreshes (a fresh ID token for the attach function) and attaches
            // the policy again; forgotten on disk too, so a restart attaches it as well.
            tracing::warn!(
                "IoT Core refuses this identity's connections: attaching the IoT policy again"
            );
            self.refusals.clear();
            self.cache.attached_policy = None;
            self.save_cache();
            self.last_reattach = Some(tokio::time::Instant::now());
            self.reattaching = true;
        }
        SignedIn {
            reusable_until: None,
            ..standing
        }
    }

    /// After a failed pass: withdraws the session of a refused device, drops a standing AWS
    /// keeps refusing, logs (repeats held back) and waits the backoff. Returns what to keep.
    async fn back_off(
        &mut self,
        mut kept: Option<SignedIn>,
        error: IdentityError,
        retries: &mut Retries,
        heartbeat: &Heartbeat,
    ) -> Option<SignedIn> {
        if error.withdraws_session() && self.sessions.borrow().is_some() {
            // The publisher closes its connection and waits for a new session.
            tracing::error!(error = %error, "this device's user was refused: stopping its connection");
            self.sessions.send_replace(None);
        }
        if matches!(error, IdentityError::Refused(_)) {
            retries.refused_in_a_row += 1;
        } else {
            retries.refused_in_a_row = 0;
        }
        if retries.refused_in_a_row >= NON_TRANSIENT_LIMIT && kept.is_some() {
            tracing::warn!(
                refused = retries.refused_in_a_row,
                "refresh refused repeatedly; reading the secret again and signing in anew"
            );
            kept = None;
            retries.refused_in_a_row = 0;
        }
        let delay = retries.backoff.next_delay();
        let text = error.to_string();
        if let Some(held_back) = retries.repeats.admit(&text) {
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
        kept
    }

    /// `identity.start_delay`: right after boot, a random wait before the first AWS call.
    async fn wait_after_boot(&self, heartbeat: &Heartbeat) {
        let jitter: f64 = rand::rng().random();
        let delay = start_delay(read_uptime(), self.config.start_delay, jitter);
        if delay.is_zero() {
            return;
        }
        tracing::info!(
            start_delay_s = delay.as_secs(),
            "the system booted recently: waiting before the first sign-in, so a fleet that booted together spreads out"
        );
        heartbeat.waiting(tokio::time::sleep(delay)).await;
    }

    /// One pass through the chain, reusing what is still good from `prior`. On failure, hands
    /// back the standing worth keeping: a throttled or failed call is retried from where it
    /// was, while a rejected token or password moves down the fallbacks.
    async fn obtain(
        &mut self,
        prior: Option<SignedIn>,
        heartbeat: &Heartbeat,
    ) -> Result<(SignedIn, Session), (Option<SignedIn>, IdentityError)> {
        let standing = match prior {
            Some(prior) if prior.reusable() => prior,
            Some(prior) => match heartbeat
                .bounded(
                    step_limit(1),
                    user_pool::refresh(&self.base, &prior.secret, &prior.tokens),
                )
                .await
            {
                Ok(tokens) => SignedIn::new(prior.secret, tokens),
                Err(IdentityError::RefreshRejected(reason)) => {
                    tracing::warn!(%reason, "refresh token rejected; signing in with the password");
                    self.sign_in(Some(prior.secret), heartbeat)
                        .await
                        .map_err(|e| (None, e))?
                }
                Err(error) => return Err((Some(prior), error)),
            },
            None => self.sign_in(None, heartbeat).await.map_err(|e| (None, e))?,
        };
        let (identity_id, credentials) =
            match self.authenticated_credentials(&standing, heartbeat).await {
                Ok(found) => found,
                Err(error) => return Err((Some(standing.kept()), error)),
            };
        if !credentials.valid_for(MIN_USEFUL_VALIDITY) {
            let error = IdentityError::Credentials(format!(
                "received credentials that expire at {} (already expired or about to): is this device's clock right?",
                humantime::format_rfc3339_seconds(credentials.expires_at)
            ));
            return Err((Some(standing.kept()), error));
        }
        // Step 5 once per identity id, and again when the secret names another policy.
        if self.cache.identity_id.as_deref() != Some(identity_id.as_str())
            || self.cache.attached_policy.as_deref() != Some(standing.secret.iot_policy.as_str())
        {
            if let Err(error) = heartbeat
                .bounded(
                    step_limit(1),
                    attach::attach_policy(
                        &self.base,
                        &standing.secret,
                        &identity_id,
                        &credentials,
                        &standing.tokens.id_token,
                    ),
                )
                .await
            {
                return Err((Some(standing.kept()), error));
            }
            self.cache.identity_id = Some(identity_id.clone());
            self.cache.attached_policy = Some(standing.secret.iot_policy.clone());
            self.save_cache();
            if std::mem::take(&mut self.reattaching) {
                self.status.send_modify(|status| {
                    status.policy_reattached_at = Some(SystemTime::now());
                    status.policy_reattaches_total += 1;
                });
            }
        }
        let session = Session {
            identity_id,
            credentials,
            iot_endpoint: standing.secret.iot_endpoint.clone(),
        };
        Ok((standing, session))
    }

    /// Steps 1-3. With a `known` secret, a rejected password means it may have been rotated:
    /// the secret is read again once. In fleet mode a rejected password is the device's own:
    /// it was revoked (or, right after a `SignUp` that found the name taken, never was ours).
    async fn sign_in(
        &mut self,
        known: Option<DeviceSecret>,
        heartbeat: &Heartbeat,
    ) -> Result<SignedIn, IdentityError> {
        let had_secret = known.is_some();
        let (secret, unconfirmed) = match known {
            Some(secret) => (secret, false),
            None => self.read_and_enroll(heartbeat).await?,
        };
        match heartbeat
            .bounded(step_limit(1), user_pool::sign_in(&self.base, &secret))
            .await
        {
            Ok(tokens) => {
                if unconfirmed {
                    self.note_registered()?;
                }
                Ok(SignedIn::new(secret, tokens))
            }
            Err(IdentityError::PasswordRejected(reason)) if secret.registration.is_some() => {
                Err(if unconfirmed {
                    IdentityError::NameTaken {
                        name: secret.username,
                        pool: secret.user_pool_id,
                    }
                } else {
                    IdentityError::Revoked {
                        name: secret.username,
                        reason,
                    }
                })
            }
            Err(IdentityError::PasswordRejected(reason)) if had_secret => {
                tracing::warn!(%reason, "password rejected; reading the secret again (it may have been rotated)");
                let (secret, _) = self.read_and_enroll(heartbeat).await?;
                let tokens = heartbeat
                    .bounded(step_limit(1), user_pool::sign_in(&self.base, &secret))
                    .await?;
                Ok(SignedIn::new(secret, tokens))
            }
            Err(error) => Err(error),
        }
    }

    /// Steps 1-2, and in fleet mode the device's own user (registered on first start). The
    /// flag says the registration still waits for a sign-in to confirm it.
    async fn read_and_enroll(
        &mut self,
        heartbeat: &Heartbeat,
    ) -> Result<(DeviceSecret, bool), IdentityError> {
        let mut secret = self.read_secret(heartbeat).await?;
        let mode = secret.mode();
        self.status
            .send_modify(|status| status.registration_mode = Some(mode));
        let unconfirmed = match secret.registration.clone() {
            Some(registration) => self.enroll(&mut secret, &registration, heartbeat).await?,
            None => false,
        };
        Ok((secret, unconfirmed))
    }

    /// Fleet mode: fills in the device's user from `device.json`, and on first start makes it:
    /// a new password is written (fsynced) before `SignUp`, so no registered user is ever
    /// without its password on disk. Later starts never call `SignUp` again.
    async fn enroll(
        &mut self,
        secret: &mut DeviceSecret,
        registration: &Registration,
        heartbeat: &Heartbeat,
    ) -> Result<bool, IdentityError> {
        let device_error = |e: device::DeviceError| IdentityError::Device(e.to_string());
        let name = device::device_name(&self.config.device_name, &self.config.identity_pool_id)
            .map_err(device_error)?;
        self.status
            .send_modify(|status| status.device_name = Some(name.clone()));
        let stored = DeviceFile::load(&self.state_dir).map_err(device_error)?;
        let fresh = stored.is_none();
        let mut file = match stored {
            Some(file) if file.username != name => {
                return Err(IdentityError::Device(format!(
                    "{DEVICE_FILE} in the state dir holds the user {:?} but the device name is {name:?}: remove that file to register under the new name (the old user stays in the pool)",
                    file.username
                )));
            }
            Some(file) => file,
            None => {
                let file = DeviceFile {
                    username: name.clone(),
                    password: device::generate_password(),
                    registered: false,
                };
                file.save(&self.state_dir).map_err(device_error)?;
                file
            }
        };
        secret.username = file.username.clone();
        secret.password = file.password.clone();
        if file.registered {
            return Ok(false);
        }
        let outcome = heartbeat
            .bounded(
                step_limit(1),
                user_pool::sign_up(&self.base, secret, registration),
            )
            .await?;
        match outcome {
            SignUpOutcome::Registered => {
                tracing::info!(device_name = %name, "registered this device's own user");
                file.registered = true;
                file.save(&self.state_dir).map_err(device_error)?;
                Ok(false)
            }
            SignUpOutcome::NameTaken if fresh => Err(IdentityError::NameTaken {
                name,
                pool: secret.user_pool_id.clone(),
            }),
            // An earlier start may have registered it and stopped before noting so: the
            // sign-in with the stored password tells.
            SignUpOutcome::NameTaken => Ok(true),
        }
    }

    /// A sign-in proved the stored user is ours: no `SignUp` at later starts.
    fn note_registered(&self) -> Result<(), IdentityError> {
        let device_error = |e: device::DeviceError| IdentityError::Device(e.to_string());
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
                    &self.base,
                    &self.config.identity_pool_id,
                    &mut self.cache.unauth_identity_id,
                    &self.config.unauth_role_arn,
                ),
            )
            .await?;
        self.save_cache();
        heartbeat
            .bounded(
                step_limit(2),
                bootstrap::fetch_device_secret(&self.base, &unauth, &self.config.secret_id),
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

    /// Step 4. A cached identity id the pool no longer accepts is replaced by a new one.
    async fn authenticated_credentials(
        &mut self,
        standing: &SignedIn,
        heartbeat: &Heartbeat,
    ) -> Result<(String, AwsCredentials), IdentityError> {
        let logins = user_pool_logins(
            &standing.secret.user_pool_id,
            standing.tokens.id_token.expose(),
        );
        let cognito = aws_sdk_cognitoidentity::Client::new(&self.base);
        if let Some(cached) = self.cache.identity_id.clone() {
            match heartbeat
                .bounded(
                    step_limit(1),
                    self.credentials_for(&cognito, &cached, &logins),
                )
                .await
            {
                Ok(credentials) => return Ok((cached, credentials)),
                Err(error) if error.is_one_of(&bootstrap::IDENTITY_GONE) => {
                    tracing::warn!(identity_id = %cached, %error, "cached identity id rejected; asking for a new one");
                }
                Err(error) => return Err(credentials_error(error)),
            }
        }
        let get_id = cognito
            .get_id()
            .identity_pool_id(&self.config.identity_pool_id)
            .set_logins(Some(logins.clone()))
            .send();
        let identity_id = heartbeat
            .bounded(step_limit(1), get_id)
            .await
            .map_err(|e| credentials_error(AwsFailure::from_sdk(&e)))?
            .identity_id
            .ok_or_else(|| IdentityError::Credentials("GetId returned no id".into()))?;
        let credentials = heartbeat
            .bounded(
                step_limit(1),
                self.credentials_for(&cognito, &identity_id, &logins),
            )
            .await
            .map_err(credentials_error)?;
        Ok((identity_id, credentials))
    }

    async fn credentials_for(
        &self,
        cognito: &aws_sdk_cognitoidentity::Client,
        identity_id: &str,
        logins: &HashMap<String, String>,
    ) -> Result<AwsCredentials, AwsFailure> {
        credentials_for_identity(cognito, identity_id, Some(logins.clone())).await
    }

    fn save_cache(&self) {
        if let Err(error) = self.cache.save(&self.state_dir) {
            tracing::warn!(%error, "cannot write the identity cache; the identity id may change at the next start");
        }
    }
}

/// The `Logins` map of `GetId` / `GetCredentialsForIdentity` for a user pool's ID token.
pub fn user_pool_logins(user_pool_id: &str, id_token: &str) -> HashMap<String, String> {
    let pool_region = user_pool_id
        .split_once('_')
        .map(|(region, _)| region)
        .unwrap_or_default();
    HashMap::from([(
        format!("cognito-idp.{pool_region}.amazonaws.com/{user_pool_id}"),
        id_token.to_owned(),
    )])
}

/// A failed step 4: refused for good when AWS named a reason retrying will not fix.
fn credentials_error(failure: AwsFailure) -> IdentityError {
    if failure.is_transient() {
        IdentityError::Credentials(failure.message)
    } else {
        IdentityError::Refused(format!("authenticated Cognito credentials: {failure}"))
    }
}

/// `identity.start_delay` after a boot: a random part (`jitter` in `[0, 1)`) of `bound` while
/// the system has been up less than [`BOOT_WINDOW`]; nothing later or when uptime is unknown.
pub fn start_delay(uptime: Option<Duration>, bound: Duration, jitter: f64) -> Duration {
    match uptime {
        Some(uptime) if uptime < BOOT_WINDOW => bound.mul_f64(jitter.clamp(0.0, 1.0)),
        _ => Duration::ZERO,
    }
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

/// Room over the SDK's own timeout before a step counts as stuck.
const STEP_SLACK: Duration = Duration::from_secs(5);

/// When to refresh credentials that arrived at `arrived` and expire at `expires_at`: `margin`
/// ahead of expiry (at most half the lifetime ahead), minus jitter; see [`refresh_delay`].
pub fn refresh_at(
    arrived: SystemTime,
    expires_at: SystemTime,
    margin: Duration,
    jitter: f64,
) -> SystemTime {
    let lifetime = expires_at.duration_since(arrived).unwrap_or_default();
    arrived + refresh_delay(lifetime, margin, jitter)
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

/// How long to wait before refreshing credentials that are valid for `left`: refresh
/// `margin` ahead of expiry (at most half the lifetime ahead), minus a random part of up to
/// half that lead (`jitter` in `[0, 1)`), so a fleet that booted together spreads out.
pub fn refresh_delay(left: Duration, margin: Duration, jitter: f64) -> Duration {
    let lead = margin.min(left.mul_f64(MAX_LEAD_FRACTION));
    let spread = lead.mul_f64(0.5 * jitter.clamp(0.0, 1.0));
    left.saturating_sub(lead)
        .saturating_sub(spread)
        .max(MIN_REFRESH_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);
    const FIVE_MIN: Duration = Duration::from_secs(300);

    #[test]
    fn refreshes_margin_ahead_with_bounded_jitter() {
        assert_eq!(refresh_delay(HOUR, FIVE_MIN, 0.0), HOUR - FIVE_MIN);
        let latest_jitter = refresh_delay(HOUR, FIVE_MIN, 0.999_999);
        assert!(latest_jitter >= HOUR - FIVE_MIN - FIVE_MIN / 2);
        assert!(latest_jitter < HOUR - FIVE_MIN);
    }

    #[test]
    fn short_lived_credentials_refresh_at_half_life_or_earlier() {
        let left = Duration::from_secs(90);
        let delay = refresh_delay(left, FIVE_MIN, 0.0);
        assert_eq!(delay, Duration::from_secs(45));
        let jittered = refresh_delay(left, FIVE_MIN, 0.999);
        assert!(jittered >= Duration::from_secs(22) && jittered <= Duration::from_secs(45));
    }

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

    /// Issue 18 item 1: the refresh lands `margin` ahead of expiry (half the lifetime for
    /// short-lived credentials), with jitter of up to half that lead, whatever the lifetime.
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

    /// Issue 18 item 4: an AWS call that never ends (here: a server that accepts and never
    /// answers, and an SDK config without the timeouts `aws::base_config` sets) is a stuck
    /// step: the identity manager's heartbeat goes quiet, so the watchdog can restart the
    /// daemon. Before, the whole chain sat inside `Heartbeat::waiting` and beat forever.
    #[tokio::test(start_paused = true)]
    async fn a_stuck_identity_step_silences_the_heartbeat() {
        let hole = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = hole.local_addr().expect("address");
        let http_client = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let base = aws_config::defaults(aws_config::BehaviorVersion::latest())
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
        let (manager, _watch) = IdentityManager::new(base, config, state.path().to_owned());
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

    fn standing() -> SignedIn {
        let secret = DeviceSecret {
            username: "gate-7".into(),
            password: crate::secret::Secret::new("pw".into()),
            registration: None,
            client_id: "client".into(),
            user_pool_id: "us-east-1_pool".into(),
            iot_endpoint: "endpoint".into(),
            iot_policy: "policy".into(),
            attach_function: None,
        };
        let tokens = UserPoolTokens {
            id_token: crate::secret::Secret::new("id".into()),
            refresh_token: crate::secret::Secret::new("refresh".into()),
        };
        SignedIn::new(secret, tokens)
    }

    /// Issue 13: a retry after a throttled GetId uses the tokens it got again, for a bounded
    /// time counted from the first failure, instead of spending another InitiateAuth.
    #[tokio::test(start_paused = true)]
    async fn tokens_of_a_failed_pass_are_reused_for_a_bounded_time() {
        let fresh = standing();
        assert!(
            !fresh.reusable(),
            "a refreshed standing is refreshed again when due"
        );
        let kept = fresh.kept();
        assert!(kept.reusable());
        tokio::time::advance(TOKEN_REUSE / 2).await;
        // A second failure does not extend the window.
        let kept = kept.kept();
        assert!(kept.reusable());
        tokio::time::advance(TOKEN_REUSE / 2).await;
        assert!(!kept.reusable());
    }

    #[test]
    fn the_start_delay_applies_only_right_after_boot() {
        let bound = Duration::from_secs(30);
        let just_booted = Some(Duration::from_secs(20));
        assert_eq!(
            start_delay(just_booted, bound, 0.5),
            Duration::from_secs(15)
        );
        assert!(start_delay(just_booted, bound, 0.999) < bound);
        assert_eq!(start_delay(just_booted, bound, 0.0), Duration::ZERO);
        assert_eq!(start_delay(Some(BOOT_WINDOW), bound, 0.5), Duration::ZERO);
        assert_eq!(start_delay(None, bound, 0.5), Duration::ZERO);
        assert_eq!(
            start_delay(just_booted, Duration::ZERO, 0.5),
            Duration::ZERO
        );
        assert!(read_uptime().is_some_and(|up| up > Duration::ZERO));
    }

    #[test]
    fn expired_credentials_are_retried_soon_but_not_in_a_loop() {
        assert_eq!(
            refresh_delay(Duration::ZERO, FIVE_MIN, 0.5),
            MIN_REFRESH_DELAY
        );
    }
}
