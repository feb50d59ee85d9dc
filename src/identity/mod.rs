//! The identity manager: owns the onboarding chain of SPEC.md and keeps the device's
//! authenticated Cognito credentials fresh. It publishes each new [`Session`] through a
//! `watch` channel; the MQTT side signs every (re)connect with the latest one.

mod attach;
mod cache;
mod secret_source;
mod user_pool;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_config::SdkConfig;
use rand::Rng;
use tokio::sync::watch;

pub use attach::{authorization_refused, is_authorization_refusal};
pub use cache::{CACHE_FILE, IdentityCache};
pub use secret_source::DeviceSecret;
use user_pool::UserPoolTokens;

use crate::aws::{AwsCredentials, describe, error_code, to_system_time};
use crate::config::IdentityConfig;
use crate::heartbeat::Heartbeat;
use crate::logging::Repeats;
use crate::retry::Backoff;
use crate::secret::Secret;

/// First retry after a failed sign-in waits up to this long; later ones double up to the cap.
const RETRY_BASE: Duration = Duration::from_secs(2);
const RETRY_CAP: Duration = Duration::from_secs(300);
/// Refresh at the latest when this much of the credentials' lifetime is left, whatever the
/// configured margin, so that short-lived credentials (moto: 90 s) are still refreshed in time.
const MAX_LEAD_FRACTION: f64 = 0.5;
/// Credentials that expire sooner than this on arrival are refused, never used to sign.
const MIN_USEFUL_VALIDITY: Duration = Duration::from_secs(60);
/// Longest single sleep before the refresh time is recomputed from the wall clock.
const CLOCK_CHECK: Duration = Duration::from_secs(60);
/// Never wait less than this between two refreshes.
const MIN_REFRESH_DELAY: Duration = Duration::from_secs(5);
/// After attaching the policy again because IoT Core refused a connection, further refusals
/// are ignored this long: a refusal the policy does not cure (e.g. a network outside
/// DeviceCidrs) must not become a loop of attach calls.
const REATTACH_MIN_INTERVAL: Duration = Duration::from_secs(300);

/// Why a step of the chain failed. Texts never carry a password, token or key.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    #[error("unauthenticated Cognito identity: {0}")]
    Unauthenticated(String),
    #[error("reading the bootstrap secret: {0}")]
    Secret(String),
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
}

/// The device's standing with the user pool, kept between refreshes.
struct SignedIn {
    secret: DeviceSecret,
    tokens: UserPoolTokens,
}

/// Owns the chain; see the module docs.
pub struct IdentityManager {
    base: SdkConfig,
    config: IdentityConfig,
    state_dir: PathBuf,
    cache: IdentityCache,
    sessions: watch::Sender<Option<Arc<Session>>>,
    status: watch::Sender<IdentityStatus>,
}

/// The receiving ends the rest of the daemon holds.
#[derive(Clone)]
pub struct IdentityWatch {
    pub sessions: watch::Receiver<Option<Arc<Session>>>,
    pub status: watch::Receiver<IdentityStatus>,
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
        let manager = IdentityManager {
            base,
            config,
            state_dir,
            cache,
            sessions,
            status,
        };
        (
            manager,
            IdentityWatch {
                sessions: sessions_rx,
                status: status_rx,
            },
        )
    }

    /// The identity id remembered from an earlier run, if any.
    pub fn cached_identity_id(&self) -> Option<String> {
        self.cache.identity_id.clone()
    }

    /// Runs forever: sign in, publish, sleep until the refresh is due, refresh; back off on errors.
    /// Every step is a bounded wait on AWS (SDK timeouts) or a sleep, so it beats while waiting.
    pub async fn run(mut self, heartbeat: Heartbeat) {
        let mut backoff = Backoff::new(RETRY_BASE, RETRY_CAP, Duration::from_secs(1));
        let mut signed_in: Option<SignedIn> = None;
        let mut repeats = Repeats::default();
        let mut last_reattach: Option<tokio::time::Instant> = None;
        loop {
            let refreshing = signed_in.is_some();
            match heartbeat.waiting(self.obtain(signed_in.take())).await {
                Ok((standing, session)) => {
                    backoff.reset();
                    repeats.clear();
                    let expires_at = session.credentials.expires_at;
                    let left = expires_at
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    let jitter: f64 = rand::rng().random();
                    let delay = refresh_delay(left, self.config.refresh_margin, jitter);
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
                    signed_in = Some(standing);
                    let may_reattach =
                        last_reattach.is_none_or(|at| at.elapsed() >= REATTACH_MIN_INTERVAL);
                    let refused = heartbeat
                        .waiting(async {
                            tokio::select! {
                                _ = self.sleep_until_refresh(expires_at, jitter) => false,
                                _ = attach::authorization_refusal(), if may_reattach => true,
                            }
                        })
                        .await;
                    if refused {
                        // The next pass refreshes and attaches the policy again.
                        tracing::warn!(
                            "IoT Core refused the connection for authorization; attaching the IoT policy again"
                        );
                        self.cache.attached_policy = None;
                        last_reattach = Some(tokio::time::Instant::now());
                    }
                }
                Err((kept, error)) => {
                    signed_in = kept;
                    let delay = backoff.next_delay();
                    let text = error.to_string();
                    if let Some(held_back) = repeats.admit(&text) {
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
            }
        }
    }

    /// Sleeps until the refresh is due, in steps of at most `CLOCK_CHECK`, recomputing from
    /// the wall clock each time: a device whose clock jumps (NTP after a boot without RTC)
    /// still refreshes in time.
    async fn sleep_until_refresh(&self, expires_at: SystemTime, jitter: f64) {
        loop {
            let left = expires_at
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            let delay = refresh_delay(left, self.config.refresh_margin, jitter);
            if delay <= CLOCK_CHECK {
                tokio::time::sleep(delay).await;
                return;
            }
            tokio::time::sleep(CLOCK_CHECK).await;
        }
    }

    /// One pass through the chain, reusing what is still good from `prior`. On failure, hands
    /// back the standing worth keeping: a throttled or failed call is retried from where it
    /// was, while a rejected token or password moves down the fallbacks.
    async fn obtain(
        &mut self,
        prior: Option<SignedIn>,
    ) -> Result<(SignedIn, Session), (Option<SignedIn>, IdentityError)> {
        let standing = match prior {
            Some(prior) => match user_pool::refresh(&self.base, &prior.secret, &prior.tokens).await
            {
                Ok(tokens) => SignedIn {
                    secret: prior.secret,
                    tokens,
                },
                Err(IdentityError::RefreshRejected(reason)) => {
                    tracing::warn!(%reason, "refresh token rejected; signing in with the password");
                    self.sign_in(Some(prior.secret))
                        .await
                        .map_err(|e| (None, e))?
                }
                Err(error) => return Err((Some(prior), error)),
            },
            None => self.sign_in(None).await.map_err(|e| (None, e))?,
        };
        let (identity_id, credentials) = match self.authenticated_credentials(&standing).await {
            Ok(found) => found,
            Err(error) => return Err((Some(standing), error)),
        };
        if !credentials.valid_for(MIN_USEFUL_VALIDITY) {
            let error = IdentityError::Credentials(format!(
                "received credentials that expire at {} (already expired or about to): is this device's clock right?",
                humantime::format_rfc3339_seconds(credentials.expires_at)
            ));
            return Err((Some(standing), error));
        }
        // Step 5 once per identity id, and again when the secret names another policy.
        if self.cache.identity_id.as_deref() != Some(identity_id.as_str())
            || self.cache.attached_policy.as_deref() != Some(standing.secret.iot_policy.as_str())
        {
            if let Err(error) = attach::attach_policy(
                &self.base,
                &standing.secret,
                &identity_id,
                &credentials,
                &standing.tokens.id_token,
            )
            .await
            {
                return Err((Some(standing), error));
            }
            self.cache.identity_id = Some(identity_id.clone());
            self.cache.attached_policy = Some(standing.secret.iot_policy.clone());
            self.save_cache();
        }
        let session = Session {
            identity_id,
            credentials,
            iot_endpoint: standing.secret.iot_endpoint.clone(),
        };
        Ok((standing, session))
    }

    /// Steps 1-3. With a `known` secret, a rejected password means it may have been rotated:
    /// the secret is read again once.
    async fn sign_in(&mut self, known: Option<DeviceSecret>) -> Result<SignedIn, IdentityError> {
        let had_secret = known.is_some();
        let secret = match known {
            Some(secret) => secret,
            None => self.read_secret().await?,
        };
        match user_pool::sign_in(&self.base, &secret).await {
            Ok(tokens) => Ok(SignedIn { secret, tokens }),
            Err(IdentityError::PasswordRejected(reason)) if had_secret => {
                tracing::warn!(%reason, "password rejected; reading the secret again (it may have been rotated)");
                let secret = self.read_secret().await?;
                let tokens = user_pool::sign_in(&self.base, &secret).await?;
                Ok(SignedIn { secret, tokens })
            }
            Err(error) => Err(error),
        }
    }

    async fn read_secret(&mut self) -> Result<DeviceSecret, IdentityError> {
        let unauth = secret_source::unauthenticated_credentials(
            &self.base,
            &self.config.identity_pool_id,
            &mut self.cache.unauth_identity_id,
            &self.config.unauth_role_arn,
        )
        .await?;
        self.save_cache();
        secret_source::fetch_device_secret(&self.base, &unauth, &self.config.secret_id).await
    }

    /// Step 4. A cached identity id the pool no longer accepts is replaced by a new one.
    async fn authenticated_credentials(
        &mut self,
        standing: &SignedIn,
    ) -> Result<(String, AwsCredentials), IdentityError> {
        let pool_region = standing
            .secret
            .user_pool_id
            .split_once('_')
            .map(|(region, _)| region)
            .unwrap_or_default();
        let logins = HashMap::from([(
            format!(
                "cognito-idp.{pool_region}.amazonaws.com/{}",
                standing.secret.user_pool_id
            ),
            standing.tokens.id_token.expose().clone(),
        )]);
        let cognito = aws_sdk_cognitoidentity::Client::new(&self.base);
        if let Some(cached) = self.cache.identity_id.clone() {
            match self.credentials_for(&cognito, &cached, &logins).await {
                Ok(credentials) => return Ok((cached, credentials)),
                Err((Some(code), error))
                    if secret_source::IDENTITY_GONE.contains(&code.as_str()) =>
                {
                    tracing::warn!(identity_id = %cached, %error, "cached identity id rejected; asking for a new one");
                }
                Err((_, error)) => return Err(IdentityError::Credentials(error)),
            }
        }
        let identity_id = cognito
            .get_id()
            .identity_pool_id(&self.config.identity_pool_id)
            .set_logins(Some(logins.clone()))
            .send()
            .await
            .map_err(|e| IdentityError::Credentials(describe(&e)))?
            .identity_id
            .ok_or_else(|| IdentityError::Credentials("GetId returned no id".into()))?;
        let credentials = self
            .credentials_for(&cognito, &identity_id, &logins)
            .await
            .map_err(|(_, error)| IdentityError::Credentials(error))?;
        Ok((identity_id, credentials))
    }

    async fn credentials_for(
        &self,
        cognito: &aws_sdk_cognitoidentity::Client,
        identity_id: &str,
        logins: &HashMap<String, String>,
    ) -> Result<AwsCredentials, (Option<String>, String)> {
        let output = cognito
            .get_credentials_for_identity()
            .identity_id(identity_id)
            .set_logins(Some(logins.clone()))
            .send()
            .await
            .map_err(|e| (error_code(&e).map(str::to_owned), describe(&e)))?;
        let credentials = output.credentials.ok_or_else(|| {
            (
                None,
                "GetCredentialsForIdentity returned no credentials".to_owned(),
            )
        })?;
        Ok(AwsCredentials {
            access_key_id: credentials.access_key_id.unwrap_or_default(),
            secret_access_key: Secret::new(credentials.secret_key.unwrap_or_default()),
            session_token: Secret::new(credentials.session_token.unwrap_or_default()),
            expires_at: to_system_time(credentials.expiration.as_ref()),
        })
    }

    fn save_cache(&self) {
        if let Err(error) = self.cache.save(&self.state_dir) {
            tracing::warn!(%error, "cannot write the identity cache; the identity id may change at the next start");
        }
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

    #[test]
    fn expired_credentials_are_retried_soon_but_not_in_a_loop() {
        assert_eq!(
            refresh_delay(Duration::ZERO, FIVE_MIN, 0.5),
            MIN_REFRESH_DELAY
        );
    }
}
