//! Where the device's user-pool credentials come from: today the stack's shared bootstrap
//! secret, read with unauthenticated Cognito credentials (SPEC.md steps 1 and 2). Fleet mode
//! (each device registering its own user) replaces this module and nothing else.

use std::collections::HashMap;

use aws_config::SdkConfig;

use super::IdentityError;
use crate::identity::aws::{AwsCredentials, describe, error_code, to_system_time};
use crate::secret::Secret;

/// Everything the secret tells a device: who to sign in as, and where.
#[derive(Debug, Clone)]
pub struct DeviceSecret {
    pub username: String,
    pub password: Secret<String>,
    pub client_id: String,
    pub user_pool_id: String,
    pub identity_pool_id: String,
    pub iot_endpoint: String,
    pub iot_policy: String,
    /// The `AttachFunction` tag: the stack's function that attaches `iot_policy` (newer stacks).
    pub attach_function: Option<String>,
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
    match unauthenticated_once(base, identity_pool_id, unauth_identity_id, unauth_role_arn).await {
        Err((Some(code), error)) if cached && IDENTITY_GONE.contains(&code.as_str()) => {
            tracing::warn!(%error, "cached unauthenticated identity rejected; asking for a new one");
            *unauth_identity_id = None;
            unauthenticated_once(base, identity_pool_id, unauth_identity_id, unauth_role_arn)
                .await
                .map_err(|(_, error)| IdentityError::Unauthenticated(error))
        }
        other => other.map_err(|(_, error)| IdentityError::Unauthenticated(error)),
    }
}

/// Service error codes meaning "this identity id is no longer valid in the pool".
pub const IDENTITY_GONE: [&str; 2] = ["ResourceNotFoundException", "NotAuthorizedException"];

/// One attempt; errors carry the service error code so the caller can tell a stale id apart.
async fn unauthenticated_once(
    base: &SdkConfig,
    identity_pool_id: &str,
    unauth_identity_id: &mut Option<String>,
    unauth_role_arn: &str,
) -> Result<AwsCredentials, (Option<String>, String)> {
    let fail = |error: String| (None, error);
    let cognito = aws_sdk_cognitoidentity::Client::new(base);
    let identity_id = match unauth_identity_id {
        Some(id) => id.clone(),
        None => {
            let id = cognito
                .get_id()
                .identity_pool_id(identity_pool_id)
                .send()
                .await
                .map_err(|e| (error_code(&e).map(str::to_owned), describe(&e)))?
                .identity_id
                .ok_or_else(|| fail("GetId returned no id".into()))?;
            *unauth_identity_id = Some(id.clone());
            id
        }
    };
    if unauth_role_arn.is_empty() {
        let output = cognito
            .get_credentials_for_identity()
            .identity_id(&identity_id)
            .send()
            .await
            .map_err(|e| (error_code(&e).map(str::to_owned), describe(&e)))?;
        let credentials = output
            .credentials
            .ok_or_else(|| fail("GetCredentialsForIdentity returned no credentials".into()))?;
        return Ok(AwsCredentials {
            access_key_id: credentials.access_key_id.unwrap_or_default(),
            secret_access_key: Secret::new(credentials.secret_key.unwrap_or_default()),
            session_token: Secret::new(credentials.session_token.unwrap_or_default()),
            expires_at: to_system_time(credentials.expiration.as_ref()),
        });
    }
    let token = cognito
        .get_open_id_token()
        .identity_id(&identity_id)
        .send()
        .await
        .map_err(|e| (error_code(&e).map(str::to_owned), describe(&e)))?
        .token
        .ok_or_else(|| fail("GetOpenIdToken returned no token".into()))?;
    let sts = aws_sdk_sts::Client::new(base);
    let output = sts
        .assume_role_with_web_identity()
        .role_arn(unauth_role_arn)
        .role_session_name("iot-cognito-relay")
        .web_identity_token(token)
        .send()
        .await
        .map_err(|e| (error_code(&e).map(str::to_owned), describe(&e)))?;
    let credentials = output
        .credentials
        .ok_or_else(|| fail("AssumeRoleWithWebIdentity returned no credentials".into()))?;
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
        .map_err(|e| IdentityError::Secret(describe(&e)))?;
    let described = client
        .describe_secret()
        .secret_id(secret_id)
        .send()
        .await
        .map_err(|e| IdentityError::Secret(describe(&e)))?;
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

/// The SecretString is `{"<username>": "<password>"}`; the tags name the cloud resources.
fn parse_secret(
    text: Secret<String>,
    tags: &HashMap<String, String>,
) -> Result<DeviceSecret, IdentityError> {
    // serde's error text could quote the password, so only the shape is reported.
    let users: HashMap<String, String> = serde_json::from_str(text.expose()).map_err(|_| {
        IdentityError::SecretFormat(
            "SecretString is not a JSON object {\"<username>\": \"<password>\"}".into(),
        )
    })?;
    if users.len() != 1 {
        return Err(IdentityError::SecretFormat(format!(
            "SecretString holds {} users; expected exactly one",
            users.len()
        )));
    }
    let Some((username, password)) = users.into_iter().next() else {
        return Err(IdentityError::SecretFormat("SecretString is empty".into()));
    };
    let tag = |key: &str| {
        tags.get(key)
            .filter(|value| !value.is_empty())
            .cloned()
            .ok_or_else(|| IdentityError::SecretFormat(format!("the secret has no {key} tag")))
    };
    Ok(DeviceSecret {
        username,
        password: Secret::new(password),
        client_id: tag("ClientId")?,
        user_pool_id: tag("UserPoolId")?,
        identity_pool_id: tag("IdentityPoolId")?,
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
