//! The onboarding chain's decisions, as data: which step comes next, what a failed step falls
//! back to, when credentials are refreshed and how long to back off. No I/O and no clock of its
//! own: the identity manager's loop (`mod.rs`) asks [`Chain::next`] for a [`Step`] at the time
//! it passes in, carries the step out (the AWS calls, the state files, the log) and reports the
//! outcome with the matching `on_*` method. So every fallback is unit-tested here without AWS.
//!
//! The fallbacks, in order: a rejected refresh token signs in with the password; a rejected
//! password reads the secret again once (it may have been rotated); in fleet mode a rejected
//! password is the device's own, so its user was revoked (or, right after a `SignUp` that
//! found the name taken, never was this device's); refreshes AWS refuses for good several times
//! in a row drop the sign-in; IoT Core refusing the identity attaches the policy again, at
//! most every [`REATTACH_MIN_INTERVAL`].

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::identity::aws::{AwsCredentials, AwsFailure, user_pool_logins};
use crate::identity::bootstrap::{DeviceSecret, IDENTITY_GONE};
use crate::identity::cache::IdentityCache;
use crate::identity::user_pool::{SignUpOutcome, UserPoolTokens};
use crate::identity::{IdentityError, Session};
use crate::retry::Backoff;
use crate::secret::Secret;

/// First retry after a failed sign-in waits up to this long; later ones double up to the cap.
const RETRY_BASE: Duration = Duration::from_secs(2);
const RETRY_CAP: Duration = Duration::from_secs(300);
/// No retry comes sooner than this after a failure.
const RETRY_FLOOR: Duration = Duration::from_secs(1);
/// Refresh at the latest when this much of the credentials' lifetime is left, whatever the
/// configured margin, so that short-lived credentials (moto: 90 s) are still refreshed in time.
const MAX_LEAD_FRACTION: f64 = 0.5;
/// Credentials that expire sooner than this on arrival are refused, never used to sign.
const MIN_USEFUL_VALIDITY: Duration = Duration::from_secs(60);
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

/// The next thing the loop does.
#[derive(Debug)]
pub enum Step {
    /// Steps 1-2, and in fleet mode the device's own user: report with [`Chain::on_secret`].
    ReadSecret { after: Option<Fallback> },
    /// Step 3 with the password: report with [`Chain::on_signed_in`].
    SignIn {
        secret: DeviceSecret,
        /// Fleet mode: a sign-in that works proves the stored user is this device's; note so
        /// in the device file (no `SignUp` at later starts) before reporting success.
        confirms_registration: bool,
        after: Option<Fallback>,
    },
    /// Step 3 again with the refresh token: report with [`Chain::on_refreshed`].
    Refresh {
        secret: DeviceSecret,
        tokens: UserPoolTokens,
    },
    /// Step 4: `GetCredentialsForIdentity` for `identity_id`, after `GetId` when there is
    /// none yet: report with [`Chain::on_credentials`].
    Credentials {
        identity_id: Option<String>,
        logins: HashMap<String, String>,
        after: Option<Fallback>,
    },
    /// Step 5: report with [`Chain::on_attached`].
    AttachPolicy(Attach),
    /// Hand out the session, then wait for its refresh or a refusal: report the latter with
    /// [`Chain::on_refused_by_iot`]. Either way, the next step is the refresh.
    Serve(Serve),
    /// The pass failed: wait, then ask for the next step.
    BackOff(BackOff),
}

/// Why a step is taken instead of the usual one, for the log.
#[derive(Debug, Clone, PartialEq)]
pub enum Fallback {
    /// The user pool rejected the refresh token: sign in with the password.
    RefreshRejected(String),
    /// The user pool rejected the password: read the secret again, it may have been rotated.
    PasswordRejected(String),
    /// The identity pool no longer knows the cached identity id: ask for a new one.
    IdentityGone {
        identity_id: String,
        error: AwsFailure,
    },
}

#[derive(Debug)]
pub struct Attach {
    pub secret: DeviceSecret,
    pub identity_id: String,
    pub credentials: AwsCredentials,
    pub id_token: Secret<String>,
    /// IoT Core's refusals asked for this attachment (counted in `status`).
    pub reattach: bool,
}

#[derive(Debug)]
pub struct Serve {
    pub session: Session,
    /// Wall-clock time of the refresh: fixed now, from the whole lifetime (recomputing it from
    /// the time left would shrink the lead as time passes).
    pub refresh_at: SystemTime,
    /// The pass began signed in: its session replaces one (for the log).
    pub refreshed: bool,
    /// IoT Core's refusals are not acted on before this (see [`REATTACH_MIN_INTERVAL`]).
    pub refusals_from: Option<Instant>,
}

#[derive(Debug)]
pub struct BackOff {
    pub error: IdentityError,
    pub delay: Duration,
    /// The error refuses this device's user: the publisher must stop using its session.
    pub withdraw_session: bool,
    /// The sign-in was dropped after this many refusals in a row (see
    /// [`NON_TRANSIENT_LIMIT`]): the next pass reads the secret again.
    pub dropped_sign_in_after: Option<u32>,
}

/// What steps 1-2 found.
#[derive(Debug)]
pub struct SecretRead {
    /// In fleet mode with the device's own user filled in.
    pub secret: DeviceSecret,
    /// Fleet mode: `SignUp` found the name taken after an earlier start made the device file;
    /// only a sign-in with the stored password tells whether the user is this device's.
    pub unconfirmed: bool,
}

/// Fleet mode: what a `SignUp` answer means for the device's user.
#[derive(Debug, PartialEq, Eq)]
pub enum Enrollment {
    /// Registered and confirmed: note it in the device file.
    Registered,
    /// The name was taken, perhaps by this device's own earlier start: a sign-in tells.
    Unconfirmed,
}

/// What `SignUp` answered, given whether this start made the device file (and so the password):
/// a taken name is then someone else's.
pub fn enrollment(
    outcome: SignUpOutcome,
    first_start: bool,
    name: &str,
    pool: &str,
) -> Result<Enrollment, IdentityError> {
    match outcome {
        SignUpOutcome::Registered => Ok(Enrollment::Registered),
        SignUpOutcome::NameTaken if first_start => Err(IdentityError::NameTaken {
            name: name.to_owned(),
            pool: pool.to_owned(),
        }),
        // An earlier start may have registered it and stopped before noting so.
        SignUpOutcome::NameTaken => Ok(Enrollment::Unconfirmed),
    }
}

/// The device's standing with the user pool, kept between refreshes.
struct SignedIn {
    secret: DeviceSecret,
    tokens: UserPoolTokens,
    /// Set when a pass got these tokens and then failed at a later step (e.g. `GetId`
    /// throttled): the retry uses them again until then instead of spending another
    /// `InitiateAuth` (itself under a quota) on new ones.
    reusable_until: Option<Instant>,
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
    fn kept(mut self, now: Instant) -> SignedIn {
        self.reusable_until.get_or_insert(now + TOKEN_REUSE);
        self
    }

    fn reusable(&self, now: Instant) -> bool {
        self.reusable_until.is_some_and(|until| now < until)
    }
}

/// Where the password of a sign-in came from: that decides what its rejection means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PasswordFrom {
    /// The secret was just read (`unconfirmed`: see [`SecretRead`]).
    Read { unconfirmed: bool },
    /// The secret of a standing whose refresh token was rejected.
    Known,
    /// The secret read again after the known password was rejected: the last try.
    Reread,
}

/// Where a pass stands.
enum Stage {
    /// A step was (or is about to be) asked for and waits for its outcome.
    Asked(Ask),
    /// The pass succeeded: its session goes out.
    Serve {
        standing: SignedIn,
        identity_id: String,
        credentials: AwsCredentials,
        /// When the credentials arrived (their lifetime counts from then).
        arrived: SystemTime,
    },
    /// The pass failed.
    BackOff(BackOff),
}

/// A step that waits for its outcome, with what deciding on it needs.
enum Ask {
    ReadSecret {
        reread: bool,
    },
    SignIn {
        secret: DeviceSecret,
        from: PasswordFrom,
    },
    Refresh {
        prior: SignedIn,
    },
    Credentials {
        standing: SignedIn,
        cached: Option<String>,
    },
    Attach {
        standing: SignedIn,
        identity_id: String,
        credentials: AwsCredentials,
        arrived: SystemTime,
    },
}

/// See the module docs.
pub struct Chain {
    refresh_margin: Duration,
    /// The identity ids and the attachment remembered across restarts.
    cache: IdentityCache,
    cache_changed: bool,
    /// The standing kept between passes.
    standing: Option<SignedIn>,
    /// Where the pass under way stands; `None` between passes.
    stage: Option<Stage>,
    /// Why the step asked for next replaces the usual one.
    fallback: Option<Fallback>,
    /// The pass under way began signed in.
    refreshing: bool,
    backoff: Backoff,
    /// Refreshes in a row that AWS refused for good (see [`NON_TRANSIENT_LIMIT`]).
    refused_in_a_row: u32,
    /// A session was handed out and not withdrawn since.
    session_out: bool,
    /// When IoT Core's refusals last had the policy attached again.
    last_reattach: Option<Instant>,
    /// A refusal asked for the attach that the next pass makes.
    reattaching: bool,
}

impl Chain {
    pub fn new(cache: IdentityCache, refresh_margin: Duration) -> Chain {
        Chain {
            refresh_margin,
            cache,
            cache_changed: false,
            standing: None,
            stage: None,
            fallback: None,
            refreshing: false,
            backoff: Backoff::new(RETRY_BASE, RETRY_CAP, RETRY_FLOOR),
            refused_in_a_row: 0,
            session_out: false,
            last_reattach: None,
            reattaching: false,
        }
    }

    pub fn cache(&self) -> &IdentityCache {
        &self.cache
    }

    /// Step 1 remembers the unauthenticated identity here.
    pub fn cache_mut(&mut self) -> &mut IdentityCache {
        &mut self.cache
    }

    /// Whether the cache changed since the last call, so the loop writes it.
    pub fn take_cache_changed(&mut self) -> bool {
        std::mem::take(&mut self.cache_changed)
    }

    /// What to do at `now` (`jitter` in `[0, 1)` spreads a fleet's refreshes). A step that
    /// waits for its outcome is asked again until it is reported.
    pub fn next(&mut self, now: Instant, jitter: f64) -> Step {
        let stage = match self.stage.take() {
            Some(stage) => stage,
            None => self.begin_pass(now),
        };
        match stage {
            Stage::Asked(ask) => {
                let step = self.step_for(&ask);
                self.stage = Some(Stage::Asked(ask));
                step
            }
            Stage::Serve {
                standing,
                identity_id,
                credentials,
                arrived,
            } => self.serve(standing, identity_id, credentials, arrived, jitter),
            Stage::BackOff(back_off) => Step::BackOff(back_off),
        }
    }

    /// A pass reuses what is still good from the last one.
    fn begin_pass(&mut self, now: Instant) -> Stage {
        self.refreshing = self.standing.is_some();
        Stage::Asked(match self.standing.take() {
            Some(standing) if standing.reusable(now) => self.credentials_for(standing),
            Some(prior) => Ask::Refresh { prior },
            None => Ask::ReadSecret { reread: false },
        })
    }

    fn step_for(&mut self, ask: &Ask) -> Step {
        let after = self.fallback.take();
        match ask {
            Ask::ReadSecret { .. } => Step::ReadSecret { after },
            Ask::SignIn { secret, from } => Step::SignIn {
                secret: secret.clone(),
                confirms_registration: *from == PasswordFrom::Read { unconfirmed: true },
                after,
            },
            Ask::Refresh { prior } => Step::Refresh {
                secret: prior.secret.clone(),
                tokens: prior.tokens.clone(),
            },
            Ask::Credentials { standing, cached } => Step::Credentials {
                identity_id: cached.clone(),
                logins: user_pool_logins(
                    &standing.secret.user_pool_id,
                    standing.tokens.id_token.expose(),
                ),
                after,
            },
            Ask::Attach {
                standing,
                identity_id,
                credentials,
                ..
            } => Step::AttachPolicy(Attach {
                secret: standing.secret.clone(),
                identity_id: identity_id.clone(),
                credentials: credentials.clone(),
                id_token: standing.tokens.id_token.clone(),
                reattach: self.reattaching,
            }),
        }
    }

    /// Takes the step asked for if this report answers it; a report that answers no step
    /// asked changes nothing.
    fn take_asked(&mut self, answered: impl Fn(&Ask) -> bool) -> Option<Ask> {
        match self
            .stage
            .take_if(|stage| matches!(stage, Stage::Asked(ask) if answered(ask)))
        {
            Some(Stage::Asked(ask)) => Some(ask),
            _ => None,
        }
    }

    fn ask(&mut self, ask: Ask) {
        self.stage = Some(Stage::Asked(ask));
    }

    /// Asks for `ask` next instead of the usual step, because of `fallback`.
    fn fall_back(&mut self, ask: Ask, fallback: Fallback) {
        self.fallback = Some(fallback);
        self.ask(ask);
    }

    /// Steps 1-2 ended.
    pub fn on_secret(&mut self, read: Result<SecretRead, IdentityError>) {
        let Some(Ask::ReadSecret { reread }) =
            self.take_asked(|ask| matches!(ask, Ask::ReadSecret { .. }))
        else {
            return;
        };
        match read {
            Ok(read) => {
                let from = if reread {
                    PasswordFrom::Reread
                } else {
                    PasswordFrom::Read {
                        unconfirmed: read.unconfirmed,
                    }
                };
                self.ask(Ask::SignIn {
                    secret: read.secret,
                    from,
                });
            }
            Err(error) => self.fail(error, None),
        }
    }

    /// The sign-in with the password ended.
    pub fn on_signed_in(&mut self, signed_in: Result<UserPoolTokens, IdentityError>) {
        let Some(Ask::SignIn { secret, from }) =
            self.take_asked(|ask| matches!(ask, Ask::SignIn { .. }))
        else {
            return;
        };
        match signed_in {
            Ok(tokens) => {
                let ask = self.credentials_for(SignedIn::new(secret, tokens));
                self.ask(ask);
            }
            Err(IdentityError::PasswordRejected(reason))
                if secret.registration.is_some() && from != PasswordFrom::Reread =>
            {
                let error = if from == (PasswordFrom::Read { unconfirmed: true }) {
                    IdentityError::NameTaken {
                        name: secret.username,
                        pool: secret.user_pool_id,
                    }
                } else {
                    IdentityError::Revoked {
                        name: secret.username,
                        reason,
                    }
                };
                self.fail(error, None);
            }
            Err(IdentityError::PasswordRejected(reason)) if from == PasswordFrom::Known => {
                self.fall_back(
                    Ask::ReadSecret { reread: true },
                    Fallback::PasswordRejected(reason),
                );
            }
            Err(error) => self.fail(error, None),
        }
    }

    /// The refresh with the refresh token ended. Any failure but a rejected token keeps the
    /// standing: a throttled or failed call is retried from where it was.
    pub fn on_refreshed(&mut self, refreshed: Result<UserPoolTokens, IdentityError>) {
        let Some(Ask::Refresh { prior }) =
            self.take_asked(|ask| matches!(ask, Ask::Refresh { .. }))
        else {
            return;
        };
        match refreshed {
            Ok(tokens) => {
                let ask = self.credentials_for(SignedIn::new(prior.secret, tokens));
                self.ask(ask);
            }
            Err(IdentityError::RefreshRejected(reason)) => self.fall_back(
                Ask::SignIn {
                    secret: prior.secret,
                    from: PasswordFrom::Known,
                },
                Fallback::RefreshRejected(reason),
            ),
            Err(error) => self.fail(error, Some(prior)),
        }
    }

    /// Step 4 ended: with the identity id the credentials are for.
    pub fn on_credentials(
        &mut self,
        found: Result<(String, AwsCredentials), AwsFailure>,
        now: Instant,
        wall: SystemTime,
    ) {
        let Some(Ask::Credentials { standing, cached }) =
            self.take_asked(|ask| matches!(ask, Ask::Credentials { .. }))
        else {
            return;
        };
        let (identity_id, credentials) = match (found, cached) {
            (Ok(found), _) => found,
            (Err(error), Some(identity_id)) if error.is_one_of(&IDENTITY_GONE) => {
                return self.fall_back(
                    Ask::Credentials {
                        standing,
                        cached: None,
                    },
                    Fallback::IdentityGone { identity_id, error },
                );
            }
            (Err(error), _) => {
                return self.fail(credentials_error(error), Some(standing.kept(now)));
            }
        };
        if !useful_at(&credentials, wall) {
            let error = IdentityError::Credentials(format!(
                "received credentials that expire at {} (already expired or about to): is this device's clock right?",
                humantime::format_rfc3339_seconds(credentials.expires_at)
            ));
            return self.fail(error, Some(standing.kept(now)));
        }
        // Step 5 once per identity id, and again when the secret names another policy.
        let attached = self.cache.identity_id.as_deref() == Some(identity_id.as_str())
            && self.cache.attached_policy.as_deref() == Some(standing.secret.iot_policy.as_str());
        // The lifetime counts from now: a slow attach must not shrink the refresh's lead.
        let arrived = wall;
        if attached {
            self.stage = Some(Stage::Serve {
                standing,
                identity_id,
                credentials,
                arrived,
            });
        } else {
            self.ask(Ask::Attach {
                standing,
                identity_id,
                credentials,
                arrived,
            });
        }
    }

    /// Step 5 ended.
    pub fn on_attached(&mut self, attached: Result<(), IdentityError>, now: Instant) {
        let Some(Ask::Attach {
            standing,
            identity_id,
            credentials,
            arrived,
        }) = self.take_asked(|ask| matches!(ask, Ask::Attach { .. }))
        else {
            return;
        };
        if let Err(error) = attached {
            return self.fail(error, Some(standing.kept(now)));
        }
        self.cache.identity_id = Some(identity_id.clone());
        self.cache.attached_policy = Some(standing.secret.iot_policy.clone());
        self.cache_changed = true;
        self.reattaching = false;
        self.stage = Some(Stage::Serve {
            standing,
            identity_id,
            credentials,
            arrived,
        });
    }

    /// IoT Core refused the served identity's connections: the next pass refreshes (a fresh ID
    /// token for the attach function) and attaches the policy again. The attachment is
    /// forgotten on disk too, so a restart attaches it as well.
    pub fn on_refused_by_iot(&mut self, now: Instant) {
        self.cache.attached_policy = None;
        self.cache_changed = true;
        self.last_reattach = Some(now);
        self.reattaching = true;
    }

    /// Step 4 for `standing`: the cached identity id first.
    fn credentials_for(&self, standing: SignedIn) -> Ask {
        Ask::Credentials {
            standing,
            cached: self.cache.identity_id.clone(),
        }
    }

    /// A pass succeeded: the session goes out, the retries start over.
    fn serve(
        &mut self,
        standing: SignedIn,
        identity_id: String,
        credentials: AwsCredentials,
        arrived: SystemTime,
        jitter: f64,
    ) -> Step {
        self.backoff.reset();
        self.refused_in_a_row = 0;
        self.session_out = true;
        let refresh_at = refresh_at(arrived, credentials.expires_at, self.refresh_margin, jitter);
        let session = Session {
            identity_id,
            credentials,
            iot_endpoint: standing.secret.iot_endpoint.clone(),
            refresh_at,
        };
        self.standing = Some(SignedIn {
            reusable_until: None,
            ..standing
        });
        Step::Serve(Serve {
            session,
            refresh_at,
            refreshed: self.refreshing,
            refusals_from: self.last_reattach.map(|at| at + REATTACH_MIN_INTERVAL),
        })
    }

    /// A pass failed: `kept` is the standing worth keeping for the retry, unless AWS keeps
    /// refusing it.
    fn fail(&mut self, error: IdentityError, mut kept: Option<SignedIn>) {
        let withdraw_session = error.withdraws_session() && self.session_out;
        if withdraw_session {
            self.session_out = false;
        }
        if matches!(error, IdentityError::Refused(_)) {
            self.refused_in_a_row += 1;
        } else {
            self.refused_in_a_row = 0;
        }
        let mut dropped_sign_in_after = None;
        if self.refused_in_a_row >= NON_TRANSIENT_LIMIT && kept.is_some() {
            dropped_sign_in_after = Some(self.refused_in_a_row);
            kept = None;
            self.refused_in_a_row = 0;
        }
        self.standing = kept;
        self.stage = Some(Stage::BackOff(BackOff {
            error,
            delay: self.backoff.next_delay(),
            withdraw_session,
            dropped_sign_in_after,
        }));
    }
}

/// A failed step 4: refused for good when AWS named a reason retrying will not fix.
fn credentials_error(failure: AwsFailure) -> IdentityError {
    if failure.is_transient() {
        IdentityError::Credentials(failure.message)
    } else {
        IdentityError::Refused(format!("authenticated Cognito credentials: {failure}"))
    }
}

/// Whether credentials are worth signing with at `wall`: valid for [`MIN_USEFUL_VALIDITY`].
fn useful_at(credentials: &AwsCredentials, wall: SystemTime) -> bool {
    wall.checked_add(MIN_USEFUL_VALIDITY)
        .is_some_and(|deadline| credentials.expires_at > deadline)
}

/// `identity.start_delay` after a boot: a random part (`jitter` in `[0, 1)`) of `bound` while
/// the system has been up less than [`BOOT_WINDOW`]; nothing later or when uptime is unknown.
pub fn start_delay(uptime: Option<Duration>, bound: Duration, jitter: f64) -> Duration {
    match uptime {
        Some(uptime) if uptime < BOOT_WINDOW => bound.mul_f64(jitter.clamp(0.0, 1.0)),
        _ => Duration::ZERO,
    }
}

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
    const POLICY: &str = "relay-iot-policy";

    fn secret(fleet: bool) -> DeviceSecret {
        DeviceSecret {
            username: "gate-7".into(),
            password: Secret::new("pw".into()),
            registration: fleet.then(|| crate::identity::bootstrap::Registration {
                code: Secret::new("c0de".into()),
                email_domain: "devices.example.com".into(),
            }),
            client_id: "client".into(),
            user_pool_id: "us-east-1_pool".into(),
            iot_endpoint: "endpoint".into(),
            iot_policy: POLICY.into(),
            attach_function: None,
        }
    }

    fn tokens(id: &str) -> UserPoolTokens {
        UserPoolTokens {
            id_token: Secret::new(id.into()),
            refresh_token: Secret::new("refresh".into()),
        }
    }

    fn credentials(expires_at: SystemTime) -> AwsCredentials {
        AwsCredentials::for_test("AKIA", "key", "session", expires_at)
    }

    fn failure(code: &str) -> AwsFailure {
        AwsFailure {
            code: Some(code.into()),
            message: format!("{code}: no"),
        }
    }

    /// A clock for the tests: an instant and the wall time that goes with it.
    struct Clock {
        now: Instant,
        wall: SystemTime,
    }

    impl Clock {
        fn start() -> Clock {
            Clock {
                now: Instant::now(),
                wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            }
        }

        fn advance(&mut self, by: Duration) {
            self.now += by;
            self.wall += by;
        }
    }

    /// A chain with this cache, and the identity `id` with `POLICY` attached when `attached`.
    fn chain_with(id: Option<&str>, attached: bool) -> Chain {
        let cache = IdentityCache {
            identity_pool_id: "us-east-1:pool".into(),
            unauth_identity_id: None,
            identity_id: id.map(str::to_owned),
            attached_policy: attached.then(|| POLICY.to_owned()),
        };
        Chain::new(cache, FIVE_MIN)
    }

    fn next(chain: &mut Chain, clock: &Clock) -> Step {
        chain.next(clock.now, 0.0)
    }

    fn read(secret: DeviceSecret, unconfirmed: bool) -> Result<SecretRead, IdentityError> {
        Ok(SecretRead {
            secret,
            unconfirmed,
        })
    }

    fn found(id: &str, clock: &Clock) -> Result<(String, AwsCredentials), AwsFailure> {
        Ok((id.to_owned(), credentials(clock.wall + HOUR)))
    }

    /// Runs a first pass to its session: read, sign in, credentials (identity `id-1`, cached
    /// and attached already).
    fn signed_in_chain(clock: &Clock, fleet: bool) -> Chain {
        let mut chain = chain_with(Some("id-1"), true);
        assert!(matches!(
            next(&mut chain, clock),
            Step::ReadSecret { after: None }
        ));
        chain.on_secret(read(secret(fleet), false));
        assert!(matches!(next(&mut chain, clock), Step::SignIn { .. }));
        chain.on_signed_in(Ok(tokens("id")));
        assert!(matches!(next(&mut chain, clock), Step::Credentials { .. }));
        chain.on_credentials(found("id-1", clock), clock.now, clock.wall);
        assert!(matches!(next(&mut chain, clock), Step::Serve(_)));
        chain
    }

    fn backed_off(step: Step) -> BackOff {
        match step {
            Step::BackOff(back_off) => back_off,
            other => panic!("expected a backoff, got {other:?}"),
        }
    }

    #[test]
    fn a_first_pass_reads_the_secret_signs_in_and_serves_the_session() {
        let clock = Clock::start();
        let mut chain = chain_with(Some("id-1"), true);
        assert!(matches!(
            next(&mut chain, &clock),
            Step::ReadSecret { after: None }
        ));
        chain.on_secret(read(secret(false), false));
        match next(&mut chain, &clock) {
            Step::SignIn {
                secret,
                confirms_registration,
                after,
            } => {
                assert_eq!(secret.username, "gate-7");
                assert!(!confirms_registration);
                assert_eq!(after, None);
            }
            other => panic!("{other:?}"),
        }
        chain.on_signed_in(Ok(tokens("id")));
        match next(&mut chain, &clock) {
            Step::Credentials {
                identity_id,
                logins,
                after,
            } => {
                assert_eq!(identity_id.as_deref(), Some("id-1"), "the cached id first");
                assert_eq!(
                    logins.get("cognito-idp.us-east-1.amazonaws.com/us-east-1_pool"),
                    Some(&"id".to_owned())
                );
                assert_eq!(after, None);
            }
            other => panic!("{other:?}"),
        }
        chain.on_credentials(found("id-1", &clock), clock.now, clock.wall);
        match next(&mut chain, &clock) {
            Step::Serve(serve) => {
                assert_eq!(serve.session.identity_id, "id-1");
                assert_eq!(serve.session.iot_endpoint, "endpoint");
                assert!(!serve.refreshed, "a first sign-in");
                assert_eq!(serve.refusals_from, None);
            }
            other => panic!("{other:?}"),
        }
        assert!(!chain.take_cache_changed(), "nothing new to remember");
    }

    #[test]
    fn a_served_session_is_refreshed_with_the_refresh_token_next() {
        let clock = Clock::start();
        let mut chain = signed_in_chain(&clock, false);
        match next(&mut chain, &clock) {
            Step::Refresh { tokens, .. } => assert_eq!(tokens.refresh_token.expose(), "refresh"),
            other => panic!("{other:?}"),
        }
        chain.on_refreshed(Ok(tokens("id-2")));
        match next(&mut chain, &clock) {
            Step::Credentials { logins, .. } => {
                assert!(
                    logins.values().all(|token| token == "id-2"),
                    "the new ID token"
                );
            }
            other => panic!("{other:?}"),
        }
        chain.on_credentials(found("id-1", &clock), clock.now, clock.wall);
        assert!(matches!(next(&mut chain, &clock), Step::Serve(serve) if serve.refreshed));
    }

    #[test]
    fn a_refused_refresh_token_falls_back_to_the_password() {
        let clock = Clock::start();
        let mut chain = signed_in_chain(&clock, false);
        assert!(matches!(next(&mut chain, &clock), Step::Refresh { .. }));
        chain.on_refreshed(Err(IdentityError::RefreshRejected("revoked".into())));
        match next(&mut chain, &clock) {
            Step::SignIn { secret, after, .. } => {
                assert_eq!(
                    secret.username, "gate-7",
                    "the secret in hand, not read again"
                );
                assert_eq!(after, Some(Fallback::RefreshRejected("revoked".into())));
            }
            other => panic!("{other:?}"),
        }
        chain.on_signed_in(Ok(tokens("id")));
        assert!(matches!(next(&mut chain, &clock), Step::Credentials { .. }));
    }

    #[test]
    fn a_rejected_password_reads_the_secret_again_once() {
        let clock = Clock::start();
        let mut chain = signed_in_chain(&clock, false);
        next(&mut chain, &clock);
        chain.on_refreshed(Err(IdentityError::RefreshRejected("revoked".into())));
        next(&mut chain, &clock);
        chain.on_signed_in(Err(IdentityError::PasswordRejected("old".into())));
        assert!(matches!(
            next(&mut chain, &clock),
            Step::ReadSecret { after: Some(Fallback::PasswordRejected(reason)) } if reason == "old"
        ));
        chain.on_secret(read(secret(false), false));
        assert!(matches!(
            next(&mut chain, &clock),
            Step::SignIn { after: None, .. }
        ));
        // The rotated secret's password is refused too: an error, not another read.
        chain.on_signed_in(Err(IdentityError::PasswordRejected("still".into())));
        let back_off = backed_off(next(&mut chain, &clock));
        assert!(matches!(back_off.error, IdentityError::PasswordRejected(_)));
        assert!(matches!(
            next(&mut chain, &clock),
            Step::ReadSecret { after: None }
        ));
    }

    #[test]
    fn a_password_rejected_right_after_reading_the_secret_is_not_read_again() {
        let clock = Clock::start();
        let mut chain = chain_with(None, false);
        next(&mut chain, &clock);
        chain.on_secret(read(secret(false), false));
        next(&mut chain, &clock);
        chain.on_signed_in(Err(IdentityError::PasswordRejected("wrong".into())));
        let back_off = backed_off(next(&mut chain, &clock));
        assert!(matches!(back_off.error, IdentityError::PasswordRejected(_)));
        assert!(!back_off.withdraw_session);
    }

    #[test]
    fn in_fleet_mode_a_rejected_password_means_the_device_was_revoked() {
        let clock = Clock::start();
        let mut chain = signed_in_chain(&clock, true);
        next(&mut chain, &clock);
        chain.on_refreshed(Err(IdentityError::RefreshRejected("signed out".into())));
        next(&mut chain, &clock);
        chain.on_signed_in(Err(IdentityError::PasswordRejected("disabled".into())));
        let back_off = backed_off(next(&mut chain, &clock));
        assert!(matches!(
            &back_off.error,
            IdentityError::Revoked { name, reason } if name == "gate-7" && reason == "disabled"
        ));
        assert!(back_off.withdraw_session, "the publisher stops using it");
        // The retries read the secret again; the session is withdrawn once.
        assert!(matches!(
            next(&mut chain, &clock),
            Step::ReadSecret { after: None }
        ));
        chain.on_secret(read(secret(true), false));
        next(&mut chain, &clock);
        chain.on_signed_in(Err(IdentityError::PasswordRejected("disabled".into())));
        let again = backed_off(next(&mut chain, &clock));
        assert!(matches!(again.error, IdentityError::Revoked { .. }));
        assert!(!again.withdraw_session);
    }

    #[test]
    fn in_fleet_mode_a_name_taken_at_first_start_belongs_to_another_device() {
        let taken = enrollment(SignUpOutcome::NameTaken, true, "kiosk-12", "us-east-1_pool")
            .expect_err("someone else's");
        assert!(matches!(
            &taken,
            IdentityError::NameTaken { name, pool } if name == "kiosk-12" && pool == "us-east-1_pool"
        ));
        assert!(taken.withdraws_session());
        assert_eq!(
            enrollment(SignUpOutcome::Registered, true, "kiosk-12", "p").expect("ok"),
            Enrollment::Registered
        );
    }

    #[test]
    fn in_fleet_mode_a_name_taken_after_an_interrupted_start_is_tried_with_the_stored_password() {
        assert_eq!(
            enrollment(SignUpOutcome::NameTaken, false, "kiosk-12", "p").expect("maybe ours"),
            Enrollment::Unconfirmed
        );
        let clock = Clock::start();
        // The sign-in works: the user is ours, and the device file says so.
        let mut chain = chain_with(None, false);
        next(&mut chain, &clock);
        chain.on_secret(read(secret(true), true));
        assert!(matches!(
            next(&mut chain, &clock),
            Step::SignIn {
                confirms_registration: true,
                ..
            }
        ));
        chain.on_signed_in(Ok(tokens("id")));
        assert!(matches!(next(&mut chain, &clock), Step::Credentials { .. }));
        // The sign-in is refused: the name is another device's.
        let mut chain = chain_with(None, false);
        next(&mut chain, &clock);
        chain.on_secret(read(secret(true), true));
        next(&mut chain, &clock);
        chain.on_signed_in(Err(IdentityError::PasswordRejected("not ours".into())));
        let back_off = backed_off(next(&mut chain, &clock));
        assert!(matches!(back_off.error, IdentityError::NameTaken { .. }));
    }

    #[test]
    fn three_refusals_in_a_row_drop_the_saved_sign_in() {
        let clock = Clock::start();
        let mut chain = signed_in_chain(&clock, false);
        for attempt in 1..=NON_TRANSIENT_LIMIT {
            assert!(
                matches!(next(&mut chain, &clock), Step::Refresh { .. }),
                "attempt {attempt} keeps the sign-in"
            );
            chain.on_refreshed(Err(IdentityError::Refused(
                "ResourceNotFoundException: no such client".into(),
            )));
            let back_off = backed_off(next(&mut chain, &clock));
            let dropped = (attempt == NON_TRANSIENT_LIMIT).then_some(NON_TRANSIENT_LIMIT);
            assert_eq!(back_off.dropped_sign_in_after, dropped);
        }
        assert!(matches!(
            next(&mut chain, &clock),
            Step::ReadSecret { after: None }
        ));
    }

    #[test]
    fn a_transient_failure_between_refusals_starts_the_count_over() {
        let clock = Clock::start();
        let mut chain = signed_in_chain(&clock, false);
        let fail_refresh = |chain: &mut Chain, error: IdentityError| {
            assert!(matches!(next(chain, &clock), Step::Refresh { .. }));
            chain.on_refreshed(Err(error));
            backed_off(next(chain, &clock))
        };
        let refused = || IdentityError::Refused("InvalidParameterException".into());
        fail_refresh(&mut chain, refused());
        fail_refresh(&mut chain, refused());
        fail_refresh(&mut chain, IdentityError::SignIn("throttled".into()));
        fail_refresh(&mut chain, refused());
        let back_off = fail_refresh(&mut chain, refused());
        assert_eq!(back_off.dropped_sign_in_after, None);
        assert!(matches!(next(&mut chain, &clock), Step::Refresh { .. }));
    }

    #[test]
    fn a_failure_after_the_sign_in_reuses_its_tokens_instead_of_signing_in_again() {
        let mut clock = Clock::start();
        let mut chain = chain_with(Some("id-1"), true);
        next(&mut chain, &clock);
        chain.on_secret(read(secret(false), false));
        next(&mut chain, &clock);
        chain.on_signed_in(Ok(tokens("id")));
        next(&mut chain, &clock);
        chain.on_credentials(
            Err(failure("TooManyRequestsException")),
            clock.now,
            clock.wall,
        );
        let back_off = backed_off(next(&mut chain, &clock));
        assert!(matches!(back_off.error, IdentityError::Credentials(_)));
        clock.advance(back_off.delay);
        assert!(
            matches!(next(&mut chain, &clock), Step::Credentials { .. }),
            "no InitiateAuth for the retry"
        );
        chain.on_credentials(
            Err(failure("TooManyRequestsException")),
            clock.now,
            clock.wall,
        );
        backed_off(next(&mut chain, &clock));
        clock.advance(TOKEN_REUSE);
        assert!(
            matches!(next(&mut chain, &clock), Step::Refresh { .. }),
            "past the reuse window the tokens are refreshed"
        );
    }

    /// A retry after a throttled GetId uses the tokens it got again, for a bounded time
    /// counted from the first failure, instead of spending another InitiateAuth.
    #[test]
    fn tokens_of_a_failed_pass_are_reused_for_a_bounded_time() {
        let start = Instant::now();
        let fresh = SignedIn::new(secret(false), tokens("id"));
        assert!(
            !fresh.reusable(start),
            "a refreshed standing is refreshed again when due"
        );
        let kept = fresh.kept(start);
        assert!(kept.reusable(start));
        // A second failure does not extend the window.
        let kept = kept.kept(start + TOKEN_REUSE / 2);
        assert!(kept.reusable(start + TOKEN_REUSE / 2));
        assert!(!kept.reusable(start + TOKEN_REUSE));
    }

    #[test]
    fn a_cached_identity_the_pool_no_longer_knows_is_replaced_by_a_new_one() {
        let clock = Clock::start();
        let mut chain = chain_with(Some("id-old"), true);
        next(&mut chain, &clock);
        chain.on_secret(read(secret(false), false));
        next(&mut chain, &clock);
        chain.on_signed_in(Ok(tokens("id")));
        next(&mut chain, &clock);
        chain.on_credentials(
            Err(failure("ResourceNotFoundException")),
            clock.now,
            clock.wall,
        );
        match next(&mut chain, &clock) {
            Step::Credentials {
                identity_id, after, ..
            } => {
                assert_eq!(identity_id, None, "GetId for a new one");
                assert!(matches!(
                    after,
                    Some(Fallback::IdentityGone { identity_id, .. }) if identity_id == "id-old"
                ));
            }
            other => panic!("{other:?}"),
        }
        // The new identity has no policy yet.
        chain.on_credentials(found("id-new", &clock), clock.now, clock.wall);
        match next(&mut chain, &clock) {
            Step::AttachPolicy(attach) => {
                assert_eq!(attach.identity_id, "id-new");
                assert!(!attach.reattach);
            }
            other => panic!("{other:?}"),
        }
        chain.on_attached(Ok(()), clock.now);
        assert!(chain.take_cache_changed());
        assert_eq!(chain.cache().identity_id.as_deref(), Some("id-new"));
        assert_eq!(chain.cache().attached_policy.as_deref(), Some(POLICY));
    }

    #[test]
    fn a_new_identity_that_is_refused_too_is_refused_for_good() {
        let clock = Clock::start();
        let mut chain = chain_with(None, false);
        next(&mut chain, &clock);
        chain.on_secret(read(secret(false), false));
        next(&mut chain, &clock);
        chain.on_signed_in(Ok(tokens("id")));
        assert!(matches!(
            next(&mut chain, &clock),
            Step::Credentials {
                identity_id: None,
                ..
            }
        ));
        chain.on_credentials(
            Err(failure("NotAuthorizedException")),
            clock.now,
            clock.wall,
        );
        let back_off = backed_off(next(&mut chain, &clock));
        assert!(matches!(
            &back_off.error,
            IdentityError::Refused(text) if text.starts_with("authenticated Cognito credentials")
        ));
    }

    #[test]
    fn credentials_that_arrive_expired_are_refused_and_tried_again() {
        let clock = Clock::start();
        let mut chain = chain_with(Some("id-1"), true);
        next(&mut chain, &clock);
        chain.on_secret(read(secret(false), false));
        next(&mut chain, &clock);
        chain.on_signed_in(Ok(tokens("id")));
        next(&mut chain, &clock);
        let about_to_expire = credentials(clock.wall + MIN_USEFUL_VALIDITY);
        chain.on_credentials(Ok(("id-1".into(), about_to_expire)), clock.now, clock.wall);
        let back_off = backed_off(next(&mut chain, &clock));
        assert!(matches!(
            &back_off.error,
            IdentityError::Credentials(text) if text.contains("clock")
        ));
        assert!(matches!(next(&mut chain, &clock), Step::Credentials { .. }));
    }

    /// Credentials living 5 minutes are refreshed half their lifetime after they arrived,
    /// however long the policy attach took in between (under load it took seconds, and the
    /// lead shrank with it).
    #[test]
    fn a_slow_attach_does_not_shrink_the_refresh_lead() {
        let mut clock = Clock::start();
        let mut chain = chain_with(Some("id-1"), false);
        next(&mut chain, &clock);
        chain.on_secret(read(secret(false), false));
        next(&mut chain, &clock);
        chain.on_signed_in(Ok(tokens("id")));
        next(&mut chain, &clock);
        let arrived = clock.wall;
        let lifetime = Duration::from_secs(300);
        chain.on_credentials(
            Ok(("id-1".into(), credentials(arrived + lifetime))),
            clock.now,
            clock.wall,
        );
        assert!(matches!(next(&mut chain, &clock), Step::AttachPolicy(_)));
        clock.advance(Duration::from_secs(14));
        chain.on_attached(Ok(()), clock.now);
        let Step::Serve(serve) = next(&mut chain, &clock) else {
            panic!("expected the session");
        };
        assert_eq!(serve.refresh_at, arrived + lifetime / 2);
    }

    #[test]
    fn the_policy_is_attached_once_per_identity_and_again_for_another_policy() {
        let clock = Clock::start();
        let mut chain = chain_with(Some("id-1"), false);
        next(&mut chain, &clock);
        chain.on_secret(read(secret(false), false));
        next(&mut chain, &clock);
        chain.on_signed_in(Ok(tokens("id")));
        next(&mut chain, &clock);
        chain.on_credentials(found("id-1", &clock), clock.now, clock.wall);
        assert!(matches!(next(&mut chain, &clock), Step::AttachPolicy(_)));
        // A failed attach keeps the sign-in and tries again.
        chain.on_attached(
            Err(IdentityError::AttachPolicy("throttled".into())),
            clock.now,
        );
        backed_off(next(&mut chain, &clock));
        assert!(matches!(next(&mut chain, &clock), Step::Credentials { .. }));
        chain.on_credentials(found("id-1", &clock), clock.now, clock.wall);
        assert!(matches!(next(&mut chain, &clock), Step::AttachPolicy(_)));
        chain.on_attached(Ok(()), clock.now);
        assert!(matches!(next(&mut chain, &clock), Step::Serve(_)));
        // The refresh does not attach again...
        next(&mut chain, &clock);
        chain.on_refreshed(Ok(tokens("id")));
        next(&mut chain, &clock);
        chain.on_credentials(found("id-1", &clock), clock.now, clock.wall);
        assert!(matches!(next(&mut chain, &clock), Step::Serve(_)));
        // ...unless the secret names another policy.
        let mut renamed = secret(false);
        renamed.iot_policy = "relay-iot-policy-v2".into();
        next(&mut chain, &clock);
        chain.on_refreshed(Err(IdentityError::RefreshRejected("expired".into())));
        next(&mut chain, &clock);
        chain.on_signed_in(Err(IdentityError::PasswordRejected("rotated".into())));
        next(&mut chain, &clock);
        chain.on_secret(read(renamed, false));
        next(&mut chain, &clock);
        chain.on_signed_in(Ok(tokens("id")));
        next(&mut chain, &clock);
        chain.on_credentials(found("id-1", &clock), clock.now, clock.wall);
        assert!(matches!(next(&mut chain, &clock), Step::AttachPolicy(_)));
    }

    #[test]
    fn an_iot_refusal_reattaches_the_policy_at_most_every_five_minutes() {
        let mut clock = Clock::start();
        let mut chain = signed_in_chain(&clock, false);
        chain.take_cache_changed();
        chain.on_refused_by_iot(clock.now);
        assert!(chain.take_cache_changed(), "forgotten on disk too");
        assert_eq!(chain.cache().attached_policy, None);
        // The next pass refreshes and attaches again, counted as a re-attach.
        assert!(matches!(next(&mut chain, &clock), Step::Refresh { .. }));
        chain.on_refreshed(Ok(tokens("id")));
        next(&mut chain, &clock);
        chain.on_credentials(found("id-1", &clock), clock.now, clock.wall);
        assert!(matches!(next(&mut chain, &clock), Step::AttachPolicy(attach) if attach.reattach));
        chain.on_attached(Ok(()), clock.now);
        match next(&mut chain, &clock) {
            Step::Serve(serve) => {
                assert_eq!(serve.refusals_from, Some(clock.now + REATTACH_MIN_INTERVAL));
            }
            other => panic!("{other:?}"),
        }
        // A later attach for another reason is not a re-attach.
        clock.advance(HOUR);
        next(&mut chain, &clock);
        chain.on_refreshed(Ok(tokens("id")));
        next(&mut chain, &clock);
        chain.on_credentials(found("id-2", &clock), clock.now, clock.wall);
        assert!(matches!(next(&mut chain, &clock), Step::AttachPolicy(attach) if !attach.reattach));
    }

    #[test]
    fn backoff_delays_stay_bounded_and_start_over_after_a_success() {
        let clock = Clock::start();
        let mut chain = chain_with(None, false);
        let mut delays = Vec::new();
        for _ in 0..6 {
            assert!(matches!(next(&mut chain, &clock), Step::ReadSecret { .. }));
            chain.on_secret(Err(IdentityError::Secret("throttled".into())));
            let delay = backed_off(next(&mut chain, &clock)).delay;
            assert!(delay >= RETRY_FLOOR && delay <= RETRY_CAP);
            delays.push(delay);
        }
        assert!(delays[0] <= RETRY_BASE);
        // After a session went out, the first retry is short again.
        next(&mut chain, &clock);
        chain.on_secret(read(secret(false), false));
        next(&mut chain, &clock);
        chain.on_signed_in(Ok(tokens("id")));
        next(&mut chain, &clock);
        chain.on_credentials(found("id-1", &clock), clock.now, clock.wall);
        assert!(matches!(next(&mut chain, &clock), Step::AttachPolicy(_)));
        chain.on_attached(Ok(()), clock.now);
        assert!(matches!(next(&mut chain, &clock), Step::Serve(_)));
        next(&mut chain, &clock);
        chain.on_refreshed(Err(IdentityError::SignIn("throttled".into())));
        assert!(backed_off(next(&mut chain, &clock)).delay <= RETRY_BASE);
    }

    #[test]
    fn a_failed_refresh_keeps_the_sign_in_for_the_retry() {
        let clock = Clock::start();
        let mut chain = signed_in_chain(&clock, false);
        next(&mut chain, &clock);
        chain.on_refreshed(Err(IdentityError::SignIn(
            "TooManyRequestsException".into(),
        )));
        let back_off = backed_off(next(&mut chain, &clock));
        assert!(
            !back_off.withdraw_session,
            "the session in hand stays usable"
        );
        assert!(matches!(next(&mut chain, &clock), Step::Refresh { .. }));
    }

    #[test]
    fn the_refresh_is_due_margin_ahead_of_expiry() {
        let clock = Clock::start();
        let mut chain = chain_with(Some("id-1"), true);
        next(&mut chain, &clock);
        chain.on_secret(read(secret(false), false));
        next(&mut chain, &clock);
        chain.on_signed_in(Ok(tokens("id")));
        next(&mut chain, &clock);
        chain.on_credentials(found("id-1", &clock), clock.now, clock.wall);
        match next(&mut chain, &clock) {
            Step::Serve(serve) => assert_eq!(serve.refresh_at, clock.wall + HOUR - FIVE_MIN),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_report_that_answers_no_step_is_ignored() {
        let clock = Clock::start();
        let mut chain = chain_with(None, false);
        chain.on_refreshed(Ok(tokens("id")));
        assert!(matches!(next(&mut chain, &clock), Step::ReadSecret { .. }));
        chain.on_attached(Ok(()), clock.now);
        chain.on_signed_in(Err(IdentityError::PasswordRejected("stray".into())));
        // The step not reported yet is asked again, and still answers to its own report.
        assert!(matches!(next(&mut chain, &clock), Step::ReadSecret { .. }));
        chain.on_secret(read(secret(false), false));
        assert!(matches!(next(&mut chain, &clock), Step::SignIn { .. }));
    }

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
    }
}
