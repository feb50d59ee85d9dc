//! Step 3 (and its refresh): signing in to the Cognito user pool.

use aws_config::SdkConfig;
use aws_sdk_cognitoidentityprovider::types::AuthFlowType;

use super::IdentityError;
use super::bootstrap::DeviceSecret;
use crate::identity::aws::{describe, error_code, is_transient};
use crate::secret::Secret;

/// Tokens from the user pool. The ID token opens the authenticated identity; the refresh token
/// gets new ID tokens without the password.
#[derive(Debug, Clone)]
pub struct UserPoolTokens {
    pub id_token: Secret<String>,
    pub refresh_token: Secret<String>,
}

/// `USER_PASSWORD_AUTH` with the secret's user.
pub async fn sign_in(
    base: &SdkConfig,
    secret: &DeviceSecret,
) -> Result<UserPoolTokens, IdentityError> {
    let client = aws_sdk_cognitoidentityprovider::Client::new(base);
    let output = client
        .initiate_auth()
        .auth_flow(AuthFlowType::UserPasswordAuth)
        .client_id(&secret.client_id)
        .auth_parameters("USERNAME", &secret.username)
        .auth_parameters("PASSWORD", secret.password.expose())
        .send()
        .await
        .map_err(|e| match error_code(&e) {
            Some("NotAuthorizedException") => IdentityError::PasswordRejected(describe(&e)),
            _ => IdentityError::SignIn(describe(&e)),
        })?;
    let result = output
        .authentication_result
        .ok_or_else(|| IdentityError::SignIn("InitiateAuth asked for a challenge; the app user must be confirmed with a permanent password".into()))?;
    Ok(UserPoolTokens {
        id_token: Secret::new(result.id_token.unwrap_or_default()),
        refresh_token: Secret::new(result.refresh_token.unwrap_or_default()),
    })
}

/// `REFRESH_TOKEN_AUTH`: a new ID token; the refresh token stays the same.
pub async fn refresh(
    base: &SdkConfig,
    secret: &DeviceSecret,
    tokens: &UserPoolTokens,
) -> Result<UserPoolTokens, IdentityError> {
    let client = aws_sdk_cognitoidentityprovider::Client::new(base);
    let output = client
        .initiate_auth()
        .auth_flow(AuthFlowType::RefreshTokenAuth)
        .client_id(&secret.client_id)
        .auth_parameters("REFRESH_TOKEN", tokens.refresh_token.expose())
        .send()
        .await
        .map_err(|e| match error_code(&e) {
            Some("NotAuthorizedException") => IdentityError::RefreshRejected(describe(&e)),
            // E.g. ResourceNotFoundException: the app client was replaced.
            _ if !is_transient(&e) => IdentityError::Refused(describe(&e)),
            _ => IdentityError::SignIn(describe(&e)),
        })?;
    let result = output
        .authentication_result
        .ok_or_else(|| IdentityError::RefreshRejected("no authentication result".into()))?;
    Ok(UserPoolTokens {
        id_token: Secret::new(result.id_token.unwrap_or_default()),
        refresh_token: result
            .refresh_token
            .map(Secret::new)
            .unwrap_or_else(|| tokens.refresh_token.clone()),
    })
}
