//! The stack's bootstrap secret, read with unauthenticated Cognito credentials (the chain's
//! first two steps; docs/operations.md, "Diagnose", lists them all). It tells the two registration modes apart: a shared user's `{"<user>": "<password>"}`
//! or fleet mode's `{"registration_code": "<code>"}` (each device then registers its own user,
//! see `device.rs`).

use std::collections::HashMap;

use aws_config::SdkConfig;

use super::IdentityError;
use crate::identity::aws::{
    AwsCredentials, AwsFailure, credentials_for_identity, describe, error_code, get_id,
    to_system_time,
};
use crate::secret::Secret;

/// The secret's key that marks fleet mode.
pub const REGISTRATION_KEY: &str = "registration_code";

/// Everything the secret tells a device: who to sign in as, and where.
#[derive(Debug, Clone)]
pub struct DeviceSecret {
    /// Who to sign in as: the shared user, or in fleet mode the device's own user (filled in
    /// from `device.json` after the secret is read; empty until then).
    pub username: String,
    pub password: Secret<String>,
    /// Fleet mode: what `SignUp` needs. `None`: the shared-user mode.
    pub registration: Option<Registration>,
    pub client_id: String,
    pub user_pool_id: String,
    pub iot_endpoint: String,
    pub iot_policy: String,
    /// The `AttachFunction` tag: the stack's function that attaches `iot_policy` (newer stacks).
    pub attach_function: Option<String>,
}

/// Fleet mode's part of the secret.
#[derive(Debug, Clone)]
pub struct Registration {
    pub code: Secret<String>,
    /// The `EmailDomain` tag: the device's e-mail is `<device name>@<domain>`.
    pub email_domain: String,
}

impl DeviceSecret {
    /// The mode's name as the template's `RegistrationMode` spells it.
    pub fn mode(&self) -> &'static str {
        if self.registration.is_some() {
            "self-register"
        } else {
            "shared-user"
        }
    }
}

/// Step 1: credentials for the unauthenticated identity (`unauth_identity_id`, cached).
/// Classic flow when a role is configured, enhanced flow otherwise.
pub async fn unauthenticated_credentials(
    base: &SdkConfig,
    identity_pool_id: &str,
    unauth_identity_id: &mut Option<String>,
    unauth_role_arn: &str,
) -> Result<AwsCredentials, IdentityError> {
    let cached = unauth_identity_id.is_some();
    let cognito = aws_sdk_cognitoidentity::Client::new(base);
    match unauthenticated_once(
        base,
        &cognito,
        identity_pool_id,
        unauth_identity_id,
        unauth_role_arn,
    )
    .await
    {
        Err(error) if cached && error.is_one_of(&IDENTITY_GONE) => {
            tracing::warn!(%error, "cached unauthenticated identity rejected; asking for a new one");
            *unauth_identity_id = None;
            unauthenticated_once(
                base,
                &cognito,
                identity_pool_id,
                unauth_identity_id,
                unauth_role_arn,
            )
            .await
            .map_err(|error| IdentityError::Unauthenticated(error.message))
        }
        other => other.map_err(|error| IdentityError::Unauthenticated(error.message)),
    }
}

/// Step 1 for `doctor`: credentials for an existing guest identity only (never `GetId`, which
/// would create one).
pub async fn unauthenticated_existing(
    base: &SdkConfig,
    cognito: &aws_sdk_cognitoidentity::Client,
    identity_id: &str,
    unauth_role_arn: &str,
) -> Result<AwsCredentials, AwsFailure> {
    // With the id given, no GetId: the pool id is not asked for.
    let mut id = Some(identity_id.to_owned());
    unauthenticated_once(base, cognito, "", &mut id, unauth_role_arn).await
}

/// Service error codes meaning "this identity id is no longer valid in the pool".
pub const IDENTITY_GONE: [&str; 2] = ["ResourceNotFoundException", "NotAuthorizedException"];

/// One attempt; errors carry the service error code so the caller can tell a stale id apart.
async fn unauthenticated_once(
    base: &SdkConfig,
    cognito: &aws_sdk_cognitoidentity::Client,
    identity_pool_id: &str,
    unauth_identity_id: &mut Option<String>,
    unauth_role_arn: &str,
) -> Result<AwsCredentials, AwsFailure> {
    let identity_id = match unauth_identity_id {
        Some(id) => id.clone(),
        None => {
            let id = get_id(cognito, identity_pool_id, None).await?;
            *unauth_identity_id = Some(id.clone());
            id
        }
    };
    if unauth_role_arn.is_empty() {
        return credentials_for_identity(cognito, &identity_id, None).await;
    }
    let token = cognito
        .get_open_id_token()
        .identity_id(&identity_id)
        .send()
        .await
        .map_err(|e| AwsFailure::from_sdk(&e))?
        .token
        .ok_or_else(|| AwsFailure::empty_answer("GetOpenIdToken"))?;
    let sts = aws_sdk_sts::Client::new(base);
    let output = sts
        .assume_role_with_web_identity()
        .role_arn(unauth_role_arn)
        .role_session_name("iot-cognito-relay")
        .web_identity_token(token)
        .send()
        .await
        .map_err(|e| AwsFailure::from_sdk(&e))?;
    let credentials = output
        .credentials
        .ok_or_else(|| AwsFailure::empty_answer("AssumeRoleWithWebIdentity"))?;
    Ok(AwsCredentials {
        access_key_id: credentials.access_key_id,
        secret_access_key: Secret::new(credentials.secret_access_key),
        session_token: Secret::new(credentials.session_token),
        expires_at: to_system_time(Some(&credentials.expiration)),
    })
}

/// Step 2: the secret's value and tags.
pub async fn fetch_device_secret(
    base: &SdkConfig,
    credentials: &AwsCredentials,
    secret_id: &str,
) -> Result<DeviceSecret, IdentityError> {
    let config = aws_sdk_secretsmanager::config::Builder::from(base)
        .credentials_provider(credentials.to_sdk())
        .build();
    let client = aws_sdk_secretsmanager::Client::from_conf(config);
    let value = client
        .get_secret_value()
        .secret_id(secret_id)
        .send()
        .await
        .map_err(|e| secret_error(&e))?;
    let described = client
        .describe_secret()
        .secret_id(secret_id)
        .send()
        .await
        .map_err(|e| secret_error(&e))?;
    let tags: HashMap<String, String> = described
        .tags
        .unwrap_or_default()
        .into_iter()
        .filter_map(|tag| Some((tag.key?, tag.value?)))
        .collect();
    let text = value
        .secret_string
        .ok_or_else(|| IdentityError::SecretFormat("the secret has no SecretString".into()))?;
    parse_secret(Secret::new(text), &tags)
}

/// A refused secret read, told apart by the service's error code.
fn secret_error<E, R>(error: &aws_sdk_secretsmanager::error::SdkError<E, R>) -> IdentityError
where
    E: aws_sdk_secretsmanager::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match error_code(error) {
        Some("AccessDeniedException") => IdentityError::SecretDenied(describe(error)),
        Some("ResourceNotFoundException") => IdentityError::SecretNotFound(describe(error)),
        _ => IdentityError::Secret(describe(error)),
    }
}

/// The SecretString is `{"<username>": "<password>"}` or `{"registration_code": "<code>"}`;
/// the tags name the cloud resources.
fn parse_secret(
    text: Secret<String>,
    tags: &HashMap<String, String>,
) -> Result<DeviceSecret, IdentityError> {
    // serde's error text could quote the password, so only the shape is reported.
    let mut users: HashMap<String, String> = serde_json::from_str(text.expose()).map_err(|_| {
        IdentityError::SecretFormat(
            "SecretString is not a JSON object {\"<username>\": \"<password>\"} or {\"registration_code\": \"<code>\"}".into(),
        )
    })?;
    let tag = |key: &str| {
        tags.get(key)
            .filter(|value| !value.is_empty())
            .cloned()
            .ok_or_else(|| IdentityError::SecretFormat(format!("the secret has no {key} tag")))
    };
    let registration = match users.remove(REGISTRATION_KEY) {
        Some(code) if code.is_empty() => {
            return Err(IdentityError::SecretFormat(
                "the registration_code is empty".into(),
            ));
        }
        Some(code) => Some(Registration {
            code: Secret::new(code),
            email_domain: tag("EmailDomain")?,
        }),
        None => None,
    };
    // Fleet mode: no user in the secret; the device's own is filled in later.
    if registration.is_some() {
        if !users.is_empty() {
            return Err(IdentityError::SecretFormat(
                "SecretString holds a registration_code and users; expected one or the other"
                    .into(),
            ));
        }
        users.insert(String::new(), String::new());
    }
    if users.len() != 1 {
        return Err(IdentityError::SecretFormat(format!(
            "SecretString holds {} users; expected exactly one",
            users.len()
        )));
    }
    let Some((username, password)) = users.into_iter().next() else {
        return Err(IdentityError::SecretFormat("SecretString is empty".into()));
    };
    // Required like the others (the template tags the secret with it), though the config
    // names the pool already.
    tag("IdentityPoolId")?;
    Ok(DeviceSecret {
        username,
        password: Secret::new(password),
        registration,
        client_id: tag("ClientId")?,
        user_pool_id: tag("UserPoolId")?,
        iot_endpoint: tag("IoTEndpoint")?,
        iot_policy: tag("IoTPolicy")?,
        attach_function: tags
            .get("AttachFunction")
            .filter(|value| !value.is_empty())
            .cloned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags() -> HashMap<String, String> {
        [
            "ClientId",
            "UserPoolId",
            "IdentityPoolId",
            "IoTEndpoint",
            "IoTPolicy",
        ]
        .into_iter()
        .map(|k| (k.to_owned(), format!("{k}-value")))
        .collect()
    }

    #[test]
    fn parses_user_and_tags() {
        let secret = parse_secret(Secret::new(r#"{"dev-user":"pw"}"#.into()), &tags()).expect("ok");
        assert_eq!(secret.username, "dev-user");
        assert_eq!(secret.password.expose(), "pw");
        assert_eq!(secret.iot_policy, "IoTPolicy-value");
        assert_eq!(secret.attach_function, None);
        let mut newer = tags();
        newer.insert("AttachFunction".into(), "arn:aws:lambda:f".into());
        let secret = parse_secret(Secret::new(r#"{"dev-user":"pw"}"#.into()), &newer).expect("ok");
        assert_eq!(secret.attach_function.as_deref(), Some("arn:aws:lambda:f"));
    }

    #[test]
    fn a_registration_code_means_fleet_mode() {
        let mut fleet = tags();
        fleet.insert("EmailDomain".into(), "devices.example.com".into());
        let secret = parse_secret(
            Secret::new(r#"{"registration_code":"c0de"}"#.into()),
            &fleet,
        )
        .expect("ok");
        let registration = secret.registration.as_ref().expect("fleet mode");
        assert_eq!(registration.code.expose(), "c0de");
        assert_eq!(registration.email_domain, "devices.example.com");
        assert_eq!(secret.mode(), "self-register");
        assert_eq!(secret.username, "");
        let shared = parse_secret(Secret::new(r#"{"u":"pw"}"#.into()), &fleet).expect("ok");
        assert_eq!(shared.mode(), "shared-user");
        // Fleet mode needs the domain; a code next to a user is neither mode.
        let err = parse_secret(
            Secret::new(r#"{"registration_code":"c0de"}"#.into()),
            &tags(),
        )
        .expect_err("no EmailDomain");
        assert!(err.to_string().contains("EmailDomain") && !err.to_string().contains("c0de"));
        let err = parse_secret(
            Secret::new(r#"{"registration_code":"c0de","u":"pw"}"#.into()),
            &fleet,
        )
        .expect_err("both");
        assert!(!err.to_string().contains("c0de") && !err.to_string().contains("pw"));
        assert!(parse_secret(Secret::new(r#"{"registration_code":""}"#.into()), &fleet).is_err());
    }

    #[test]
    fn errors_never_quote_the_password() {
        let err = parse_secret(Secret::new(r#"{"u": "hunter2"#.into()), &tags()).expect_err("bad");
        assert!(!err.to_string().contains("hunter2"));
        let mut missing = tags();
        missing.remove("IoTPolicy");
        let err =
            parse_secret(Secret::new(r#"{"u":"hunter2"}"#.into()), &missing).expect_err("bad");
        assert!(err.to_string().contains("IoTPolicy"));
        assert!(!err.to_string().contains("hunter2"));
    }
}
