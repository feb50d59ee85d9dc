//! AWS SDK plumbing shared by the identity steps: one HTTP client (rustls with ring, the same
//! crypto as the MQTT side), region, endpoint overrides and timeouts.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use aws_config::{BehaviorVersion, Region, SdkConfig, timeout::TimeoutConfig};
use aws_smithy_http_client::proxy::ProxyConfig;
use aws_smithy_http_client::{Connector, tls};
use aws_smithy_runtime_api::client::http::{HttpConnectorSettings, SharedHttpConnector};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::display::DisplayErrorContext;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use crate::config::Proxy;
use crate::identity::api_roots;
use crate::secret::Secret;

/// A whole AWS call, retries included, gives up after this long.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How the identity steps reach AWS: the SDK's base config for the service crates, and an
/// HTTP connector with the same proxy, trust store and connect timeout for the calls made
/// without one (`rest`).
#[derive(Clone, Debug)]
pub struct Api {
    pub sdk: SdkConfig,
    pub http: SharedHttpConnector,
    /// `aws.endpoint_url`, when set (an emulator).
    pub endpoint_url: Option<String>,
}

impl Api {
    pub fn region(&self) -> String {
        self.sdk
            .region()
            .map(ToString::to_string)
            .unwrap_or_default()
    }
}

/// The SDK's base config without credentials: unsigned Cognito calls use it as is; calls that
/// need the Cognito credentials add them per client. With a `proxy`, every call goes through it
/// (HTTPS by CONNECT, Basic credentials sent with the first request) unless its `no_proxy`
/// names the host. TLS trusts the system's CA store, or the built-in Amazon roots where the
/// system has none (`api_roots`).
pub async fn base_config(
    region: &str,
    endpoint_url: &str,
    proxy: Option<&Proxy>,
) -> Result<Api, SdkSetupError> {
    let ring = || tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring);
    let tls_context = api_roots::tls_context(api_roots::api_roots())?;
    // The SDK's own parser: a URL it cannot read would silently mean no proxy.
    let proxy = match proxy {
        Some(proxy) => Some(
            ProxyConfig::all(proxy.sdk_url().expose().as_str())
                .map_err(|_| SdkSetupError::Proxy)?
                .no_proxy(proxy.sdk_no_proxy()),
        ),
        None => None,
    };
    let mut rest = Connector::builder().connector_settings(
        HttpConnectorSettings::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build(),
    );
    if let Some(config) = &proxy {
        rest = rest.proxy_config(config.clone());
    }
    let http = SharedHttpConnector::new(
        rest.tls_provider(ring())
            .tls_context(tls_context.clone())
            .build(),
    );
    let http_client = match proxy {
        None => aws_smithy_http_client::Builder::new()
            .tls_provider(ring())
            .tls_context(tls_context)
            .build_https(),
        Some(config) => {
            // The connector builder is the SDK's only way to a proxy; this keeps the SDK's
            // connector cache (one pool per timeout setting).
            aws_smithy_http_client::Builder::new().build_with_connector_fn(
                move |settings, components| {
                    let mut builder = Connector::builder().proxy_config(config.clone());
                    builder.set_connector_settings(settings.cloned());
                    if let Some(components) = components {
                        builder.set_sleep_impl(components.sleep_impl());
                    }
                    builder
                        .tls_provider(ring())
                        .tls_context(tls_context.clone())
                        .build()
                },
            )
        }
    };
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(region.to_owned()))
        .http_client(http_client)
        .timeout_config(
            TimeoutConfig::builder()
                .operation_timeout(OPERATION_TIMEOUT)
                .connect_timeout(CONNECT_TIMEOUT)
                .build(),
        )
        .no_credentials();
    if !endpoint_url.is_empty() {
        loader = loader.endpoint_url(endpoint_url);
    }
    Ok(Api {
        sdk: loader.load().await,
        http,
        endpoint_url: Some(endpoint_url.to_owned()).filter(|url| !url.is_empty()),
    })
}

/// Why the SDK's HTTP client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SdkSetupError {
    /// The AWS SDK refused the proxy URL that `network.proxy` accepted (never shown: it may
    /// hold credentials).
    #[error("the AWS SDK cannot use this proxy URL (check network.proxy or HTTPS_PROXY)")]
    Proxy,
    #[error(transparent)]
    Roots(#[from] api_roots::ApiRootsError),
}

/// Temporary AWS credentials from Cognito or STS.
#[derive(Clone, Debug)]
pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: Secret<String>,
    pub session_token: Secret<String>,
    pub expires_at: SystemTime,
}

impl AwsCredentials {
    /// The SDK's form, for clients that sign with these credentials.
    pub fn to_sdk(&self) -> aws_credential_types::Credentials {
        aws_credential_types::Credentials::new(
            self.access_key_id.clone(),
            self.secret_access_key.expose().clone(),
            Some(self.session_token.expose().clone()),
            Some(self.expires_at),
            "cognito",
        )
    }

    /// Whether these credentials stay valid for at least `margin` from now.
    pub fn valid_for(&self, margin: Duration) -> bool {
        SystemTime::now()
            .checked_add(margin)
            .is_some_and(|deadline| self.expires_at > deadline)
    }
}

#[cfg(test)]
impl AwsCredentials {
    /// Credentials made up for a test.
    pub fn for_test(
        access_key_id: &str,
        secret_access_key: &str,
        session_token: &str,
        expires_at: SystemTime,
    ) -> AwsCredentials {
        AwsCredentials {
            access_key_id: access_key_id.to_owned(),
            secret_access_key: Secret::new(secret_access_key.to_owned()),
            session_token: Secret::new(session_token.to_owned()),
            expires_at,
        }
    }
}

impl AwsCredentials {
    /// Cognito Identity's credentials (`GetCredentialsForIdentity`); a missing field makes
    /// credentials AWS refuses, and a missing expiry counts as already expired.
    pub fn from_cognito(
        credentials: aws_sdk_cognitoidentity::types::Credentials,
    ) -> AwsCredentials {
        AwsCredentials {
            access_key_id: credentials.access_key_id.unwrap_or_default(),
            secret_access_key: Secret::new(credentials.secret_key.unwrap_or_default()),
            session_token: Secret::new(credentials.session_token.unwrap_or_default()),
            expires_at: to_system_time(credentials.expiration.as_ref()),
        }
    }
}

/// `GetCredentialsForIdentity` for `identity_id`: unauthenticated without `logins`,
/// authenticated with the user pool's ID token in them.
pub async fn credentials_for_identity(
    cognito: &aws_sdk_cognitoidentity::Client,
    identity_id: &str,
    logins: Option<HashMap<String, String>>,
) -> Result<AwsCredentials, AwsFailure> {
    let output = cognito
        .get_credentials_for_identity()
        .identity_id(identity_id)
        .set_logins(logins)
        .send()
        .await
        .map_err(|e| AwsFailure::from_sdk(&e))?;
    let credentials = output
        .credentials
        .ok_or_else(|| AwsFailure::empty_answer("GetCredentialsForIdentity"))?;
    Ok(AwsCredentials::from_cognito(credentials))
}

/// `GetId`: the identity pool's identity id, for the user pool's ID token in `logins` or, without
/// them, an unauthenticated one.
pub async fn get_id(
    cognito: &aws_sdk_cognitoidentity::Client,
    identity_pool_id: &str,
    logins: Option<HashMap<String, String>>,
) -> Result<String, AwsFailure> {
    cognito
        .get_id()
        .identity_pool_id(identity_pool_id)
        .set_logins(logins)
        .send()
        .await
        .map_err(|e| AwsFailure::from_sdk(&e))?
        .identity_id
        .ok_or_else(|| AwsFailure::empty_answer("GetId"))
}

/// Step 4: authenticated credentials for `identity_id`, or for a new identity id (`GetId`)
/// when there is none; with the id they are for.
pub async fn authenticated_credentials(
    base: &SdkConfig,
    identity_pool_id: &str,
    identity_id: Option<String>,
    logins: HashMap<String, String>,
) -> Result<(String, AwsCredentials), AwsFailure> {
    let cognito = aws_sdk_cognitoidentity::Client::new(base);
    let identity_id = match identity_id {
        Some(known) => known,
        None => get_id(&cognito, identity_pool_id, Some(logins.clone())).await?,
    };
    let credentials = credentials_for_identity(&cognito, &identity_id, Some(logins)).await?;
    Ok((identity_id, credentials))
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

/// A failed AWS call: the service's error code when it sent one (what decides between
/// retrying, starting over and giving up), and a secret-free description for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AwsFailure {
    pub code: Option<String>,
    pub message: String,
}

impl AwsFailure {
    pub fn from_sdk<E, R>(error: &SdkError<E, R>) -> AwsFailure
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        AwsFailure {
            code: error_code(error).map(str::to_owned),
            message: describe(error),
        }
    }

    /// A call that succeeded but left out what it exists to return.
    pub fn empty_answer(what: &str) -> AwsFailure {
        AwsFailure {
            code: None,
            message: format!("{what} returned nothing usable"),
        }
    }

    /// Whether the service answered with one of `codes`.
    pub fn is_one_of(&self, codes: &[&str]) -> bool {
        self.code
            .as_deref()
            .is_some_and(|code| codes.contains(&code))
    }

    /// Whether retrying may help: see [`is_transient_code`].
    pub fn is_transient(&self) -> bool {
        is_transient_code(self.code.as_deref())
    }
}

/// No AWS credential lives longer than this; a later expiry is treated as this.
const LONGEST_EXPIRY: Duration = Duration::from_secs(36 * 3600);

/// Converts an SDK timestamp. A missing or pre-1970 expiry counts as already expired (the
/// epoch itself); one absurdly far ahead is capped, so every later computation stays in range.
pub fn to_system_time(time: Option<&aws_smithy_types::DateTime>) -> SystemTime {
    let earliest = SystemTime::UNIX_EPOCH + Duration::from_secs(1);
    let latest = SystemTime::now() + LONGEST_EXPIRY;
    time.and_then(|t| SystemTime::try_from(*t).ok())
        .unwrap_or(earliest)
        .clamp(earliest, latest)
}

/// A short, secret-free description of an SDK error, with its service error code when any.
pub fn describe<E, R>(error: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match (error.code(), error.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => DisplayErrorContext(error).to_string(),
    }
}

/// The service error code (`NotAuthorizedException`, …) of an SDK error, if it has one.
pub fn error_code<E: ProvideErrorMetadata, R>(error: &SdkError<E, R>) -> Option<&str> {
    error.code()
}

/// Service error codes that mean "try again later": throttling and the services' own failures.
const TRANSIENT_CODES: [&str; 9] = [
    "ThrottlingException",
    "TooManyRequestsException",
    "LimitExceededException",
    "RequestLimitExceeded",
    "ProvisionedThroughputExceededException",
    "InternalErrorException",
    "InternalFailure",
    "InternalServerError",
    "ServiceUnavailable",
];

/// Whether an error with this service error code may go away by retrying: no code (network,
/// timeout, an unparsable answer), throttling or a service-side failure.
pub fn is_transient_code(code: Option<&str>) -> bool {
    code.is_none_or(|code| TRANSIENT_CODES.contains(&code))
}

/// Whether an SDK error may go away by retrying: see [`is_transient_code`]; any 5xx answer also is.
pub fn is_transient<E: ProvideErrorMetadata>(error: &SdkError<E, HttpResponse>) -> bool {
    match error {
        SdkError::ServiceError(context) => {
            context.raw().status().is_server_error() || is_transient_code(error.code())
        }
        SdkError::ConstructionFailure(_) => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_and_unknown_failures_are_transient_refusals_are_not() {
        assert!(is_transient_code(None));
        assert!(is_transient_code(Some("TooManyRequestsException")));
        assert!(is_transient_code(Some("InternalFailure")));
        assert!(!is_transient_code(Some("ResourceNotFoundException")));
        assert!(!is_transient_code(Some("InvalidParameterException")));
    }

    #[test]
    fn a_failure_is_sorted_by_its_service_code() {
        let gone = AwsFailure {
            code: Some("ResourceNotFoundException".into()),
            message: "ResourceNotFoundException: identity not found".into(),
        };
        assert!(gone.is_one_of(&["NotAuthorizedException", "ResourceNotFoundException"]));
        assert!(!gone.is_transient());
        let empty = AwsFailure::empty_answer("GetId");
        assert!(!empty.is_one_of(&["ResourceNotFoundException"]));
        assert!(empty.is_transient(), "no code: worth another try");
        assert_eq!(empty.to_string(), "GetId returned nothing usable");
    }
}
