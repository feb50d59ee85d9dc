//! Step 5: the stack's IoT policy on the device's identity. When the secret has the
//! `AttachFunction` tag, the stack's function attaches it server-side (docs/security.md,
//! "Which statement guards what"): devices of such stacks hold no `iot:AttachPolicy`, which cannot be
//! scoped to one policy or one target. Without the tag (older stacks) the device calls
//! `AttachPolicy` itself.

use serde::Deserialize;

use super::IdentityError;
use super::bootstrap::DeviceSecret;
use super::rest::{self, Call};
use crate::identity::aws::{Api, AwsCredentials};
use crate::secret::Secret;

/// How much of a function error's message is repeated in our error (it is the function's own
/// text, which names no token; the cap keeps a log line a line).
const MAX_ERROR_CHARS: usize = 200;

/// The function's answer (its handler is in cloudformation/cognito.yml).
#[derive(Debug, Deserialize)]
struct Answer {
    identity_id: String,
    policy: String,
}

/// What Lambda returns for a function error.
#[derive(Debug, Default, Deserialize)]
struct FunctionError {
    #[serde(default, rename = "errorType")]
    error_type: String,
    #[serde(default, rename = "errorMessage")]
    error_message: String,
}

/// Attaches `secret.iot_policy` to `identity_id`, through the stack's function when the secret
/// names one, otherwise with `AttachPolicy`.
pub async fn attach_policy(
    api: &Api,
    secret: &DeviceSecret,
    identity_id: &str,
    credentials: &AwsCredentials,
    id_token: &Secret<String>,
) -> Result<(), IdentityError> {
    match secret.attach_function.as_deref() {
        Some(function) => {
            invoke_function(api, function, secret, identity_id, credentials, id_token).await
        }
        None => attach_directly(api, secret, identity_id, credentials).await,
    }
}

/// `Invoke` (RequestResponse) with `{"IdToken": ...}`: the function derives the identity from
/// the token itself and attaches the stack's policy to it.
async fn invoke_function(
    api: &Api,
    function: &str,
    secret: &DeviceSecret,
    identity_id: &str,
    credentials: &AwsCredentials,
    id_token: &Secret<String>,
) -> Result<(), IdentityError> {
    let payload = serde_json::json!({ "IdToken": id_token.expose() }).to_string();
    let answer = rest::send(
        api,
        credentials,
        Call::invoke(function, payload.into_bytes()),
    )
    .await
    .map_err(|e| IdentityError::AttachPolicy(format!("invoking {function}: {e}")))?;
    let body = answer.body;
    if let Some(kind) = answer.headers.get("x-amz-function-error") {
        let error: FunctionError = serde_json::from_slice(&body).unwrap_or_default();
        let message: String = error.error_message.chars().take(MAX_ERROR_CHARS).collect();
        return Err(IdentityError::AttachPolicy(format!(
            "the attach function {function} failed ({kind}): {} {message}",
            error.error_type
        )));
    }
    let answer: Answer = serde_json::from_slice(&body).map_err(|_| {
        IdentityError::AttachPolicy(format!(
            "the attach function {function} answered something other than {{\"identity_id\", \"policy\"}}"
        ))
    })?;
    if answer.policy != secret.iot_policy {
        tracing::warn!(
            attached = %answer.policy,
            expected = %secret.iot_policy,
            "the attach function attached another policy than the secret's IoTPolicy tag names"
        );
    }
    if answer.identity_id != identity_id {
        // With AWS, GetId of the same token in the same pool is this identity; a difference
        // means the function serves another pool (or an emulator mints ids per call).
        tracing::warn!(
            identity_id = %identity_id,
            attached_to = %answer.identity_id,
            "the attach function attached the policy to another identity id"
        );
    }
    tracing::info!(
        identity_id = %identity_id,
        policy = %answer.policy,
        function = %function,
        "IoT policy attached by the stack's function"
    );
    Ok(())
}

/// Older stacks: the device's role holds `iot:AttachPolicy`.
async fn attach_directly(
    api: &Api,
    secret: &DeviceSecret,
    identity_id: &str,
    credentials: &AwsCredentials,
) -> Result<(), IdentityError> {
    let call = Call::attach_policy(&secret.iot_policy, identity_id);
    rest::send(api, credentials, call)
        .await
        .map_err(|e| IdentityError::AttachPolicy(e.message))?;
    tracing::info!(identity_id = %identity_id, policy = %secret.iot_policy, "attached IoT policy");
    Ok(())
}
