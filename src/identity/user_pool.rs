//! Step 3 (and its refresh): signing in to the Cognito user pool.

use aws_config::SdkConfig;
use aws_sdk_cognitoidentityprovider::types::{AttributeType, AuthFlowType};

use super::IdentityError;
use super::bootstrap::{DeviceSecret, REGISTRATION_KEY, Registration};
use crate::identity::aws::{AwsFailure, describe, error_code, is_transient};
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

/// `SignUp` errors that mean "refused", not "try again".
const REGISTRATION_REFUSALS: [&str; 4] = [
    "UserLambdaValidationException",
    "NotAuthorizedException",
    "InvalidParameterException",
    "InvalidPasswordException",
];

/// What `SignUp` answered, where the caller must decide.
#[derive(Debug, PartialEq, Eq)]
pub enum SignUpOutcome {
    /// The user exists and is confirmed.
    Registered,
    /// `UsernameExistsException`: the name is registered already (by this device earlier, or
    /// by another).
    NameTaken,
}

/// Fleet mode: `SignUp` of the device's own user (`secret.username` / `secret.password`) with
/// the e-mail `<name>@<EmailDomain>` and the registration code in the client metadata, which
/// the stack's pre-sign-up trigger checks.
pub async fn sign_up(
    base: &SdkConfig,
    secret: &DeviceSecret,
    registration: &Registration,
) -> Result<SignUpOutcome, IdentityError> {
    let client = aws_sdk_cognitoidentityprovider::Client::new(base);
    let email = AttributeType::builder()
        .name("email")
        .value(format!("{}@{}", secret.username, registration.email_domain))
        .build()
        .map_err(|e| IdentityError::Registration(e.to_string()))?;
    let answer = client
        .sign_up()
        .client_id(&secret.client_id)
        .username(&secret.username)
        .password(secret.password.expose())
        .user_attributes(email)
        .client_metadata(REGISTRATION_KEY, registration.code.expose())
        .send()
        .await;
    let output = match answer {
        Ok(output) => output,
        Err(e) => {
            let failure = AwsFailure::from_sdk(&e);
            if failure.is_one_of(&["UsernameExistsException"]) {
                return Ok(SignUpOutcome::NameTaken);
            }
            // The trigger refused (its message names the rule, never the code), or the pool
            // takes no sign-ups: retrying with the same answer will not help until an operator
            // acts (or rotates the code, re-read at the next attempt).
            return Err(if failure.is_one_of(&REGISTRATION_REFUSALS) {
                IdentityError::RegistrationRefused(failure.message)
            } else {
                IdentityError::Registration(failure.message)
            });
        }
    };
    if !output.user_confirmed {
        return Err(IdentityError::RegistrationRefused(
            "the user pool registered the device but did not confirm it: is the stack's pre-sign-up trigger attached?".into(),
        ));
    }
    Ok(SignUpOutcome::Registered)
}
