//! `config-from-stack`: turns the outputs of the CloudFormation stack into a config.toml.

use std::collections::HashMap;

use serde_json::Value;

/// Outputs the daemon cannot work without.
const REQUIRED: [&str; 2] = ["CognitoIdentityPoolID", "SecretName"];

/// Why the stack description could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error(
        "no stack outputs found (expected the JSON of `aws cloudformation describe-stacks` or its Outputs list)"
    )]
    NoOutputs,
    #[error("the stack has {0} stacks; pass one (e.g. describe-stacks --stack-name NAME)")]
    SeveralStacks(usize),
    #[error("stack output {0} is missing; is this the iot-cognito-relay stack?")]
    Missing(&'static str),
}

/// Reads `describe-stacks` JSON (or just its Outputs list) and renders config.toml.
pub fn config_from_stack(json: &str) -> Result<String, StackError> {
    let document: Value = serde_json::from_str(json)?;
    let (stack_name, outputs) = find_outputs(&document)?;
    let outputs: HashMap<&str, &str> = outputs
        .iter()
        .filter_map(|o| {
            Some((
                o.get("OutputKey")?.as_str()?,
                o.get("OutputValue")?.as_str()?,
            ))
        })
        .collect();
    for key in REQUIRED {
        if outputs.get(key).is_none_or(|v| v.is_empty()) {
            return Err(StackError::Missing(key));
        }
    }
    let get = |key: &str| outputs.get(key).copied().unwrap_or_default().to_owned();
    let mut aws = toml::Table::new();
    if !get("Region").is_empty() {
        aws.insert("region".into(), get("Region").into());
    }
    let mut identity = toml::Table::new();
    identity.insert(
        "identity_pool_id".into(),
        get("CognitoIdentityPoolID").into(),
    );
    identity.insert("secret_id".into(), get("SecretName").into());
    // Always the basic (classic) flow for the guest step: enhanced-flow guest credentials are
    // scoped down to a session policy without Secrets Manager, so they cannot read the secret.
    if !get("CognitoUnAuthRole").is_empty() {
        identity.insert("unauth_role_arn".into(), get("CognitoUnAuthRole").into());
    }
    let mut root = toml::Table::new();
    root.insert("aws".into(), aws.into());
    root.insert("identity".into(), identity.into());
    if !get("IoTEndpoint").is_empty() {
        let mut mqtt = toml::Table::new();
        mqtt.insert("endpoint".into(), get("IoTEndpoint").into());
        root.insert("mqtt".into(), mqtt.into());
    }
    let body = toml::to_string(&root).unwrap_or_default();
    let origin = stack_name.map(|n| format!(" {n}")).unwrap_or_default();
    Ok(format!(
        "# iot-cognito-relay config, generated from the outputs of stack{origin}.\n\
         # Every other key has a default; see `iot-cognito-relay check-config`.\n{}{}\n{body}",
        mode_note(outputs.get("RegistrationMode").copied()),
        flow_note(outputs.get("ClassicFlow").copied()),
    ))
}

/// A stack whose identity pool refuses the basic flow cannot onboard devices: say so where the
/// user reads the config.
fn flow_note(classic_flow: Option<&str>) -> &'static str {
    match classic_flow {
        Some("false") => {
            "\n# WARNING: this stack's identity pool does not allow the basic (classic) flow, which\n\
             # devices need to read the bootstrap secret: update the stack with the current\n\
             # template (docs/operations.md, \"Updating the stack\"), then start the daemon."
        }
        _ => "",
    }
}

/// What the stack's `RegistrationMode` output means for the devices (stacks from before that
/// output are shared-user).
fn mode_note(mode: Option<&str>) -> &'static str {
    match mode {
        Some("self-register") => {
            "# RegistrationMode self-register: every device registers its own user on first start,\n\
             # named by identity.device_name (default: derived from /etc/machine-id). The same file\n\
             # serves the whole fleet.\n"
        }
        _ => {
            "# RegistrationMode shared-user: all devices share one user, so only one device can be\n\
             # online at a time (one MQTT client id). See cloudformation/README.md for a fleet.\n"
        }
    }
}

fn find_outputs(document: &Value) -> Result<(Option<String>, &Vec<Value>), StackError> {
    if let Some(stacks) = document.get("Stacks").and_then(Value::as_array) {
        return match stacks.as_slice() {
            [stack] => {
                let outputs = stack
                    .get("Outputs")
                    .and_then(Value::as_array)
                    .ok_or(StackError::NoOutputs)?;
                let name = stack
                    .get("StackName")
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                Ok((name, outputs))
            }
            [] => Err(StackError::NoOutputs),
            many => Err(StackError::SeveralStacks(many.len())),
        };
    }
    if let Some(outputs) = document.get("Outputs").and_then(Value::as_array) {
        return Ok((None, outputs));
    }
    document
        .as_array()
        .map(|o| (None, o))
        .ok_or(StackError::NoOutputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = include_str!("../../tests/data/describe-stacks.json");

    #[test]
    fn renders_a_config_the_loader_accepts() {
        let text = config_from_stack(SAMPLE).expect("config");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, &text).expect("write");
        let config = crate::config::Config::load(&path).expect("check-config accepts it");
        assert_eq!(
            config.identity.secret_id,
            "us-east-1_AbCdEfGhI_demo-app-user"
        );
        assert!(
            config
                .identity
                .unauth_role_arn
                .ends_with("demo-cognito-unauth-role")
        );
        assert_eq!(
            config.mqtt.endpoint,
            "a1b2c3d4e5f6g7-ats.iot.us-east-1.amazonaws.com"
        );
        assert!(text.starts_with(
            "# iot-cognito-relay config, generated from the outputs of stack demo-cognito-iot-setup"
        ));
    }

    /// The file says which mode the stack is in and what that means for the fleet.
    #[test]
    fn names_the_registration_mode() {
        let text = config_from_stack(SAMPLE).expect("config");
        assert!(text.contains("RegistrationMode self-register"), "{text}");
        let shared = SAMPLE.replace("\"self-register\"", "\"shared-user\"");
        let text = config_from_stack(&shared).expect("config");
        assert!(text.contains("RegistrationMode shared-user"), "{text}");
        assert!(text.contains("only one device"), "{text}");
    }

    /// The guest step always takes the basic flow: enhanced-flow guests cannot read the secret.
    #[test]
    fn unauth_role_always_and_a_warning_for_a_stack_without_the_basic_flow() {
        let render = |classic: Option<&str>| {
            let mut outputs = vec![
                serde_json::json!({"OutputKey": "CognitoIdentityPoolID", "OutputValue": "us-east-1:p"}),
                serde_json::json!({"OutputKey": "SecretName", "OutputValue": "s"}),
                serde_json::json!({"OutputKey": "CognitoUnAuthRole", "OutputValue": "arn:aws:iam::1:role/guest"}),
            ];
            if let Some(value) = classic {
                outputs.push(serde_json::json!({"OutputKey": "ClassicFlow", "OutputValue": value}));
            }
            config_from_stack(&serde_json::Value::Array(outputs).to_string()).expect("config")
        };
        for classic in [Some("false"), Some("true"), None] {
            let text = render(classic);
            assert!(
                text.contains("unauth_role_arn = \"arn:aws:iam::1:role/guest\""),
                "{text}"
            );
            assert_eq!(
                text.contains("WARNING"),
                classic == Some("false"),
                "{classic:?}: {text}"
            );
        }
        // The warning stays a comment: the config still parses.
        let text = render(Some("false"));
        assert!(text.parse::<toml::Table>().is_ok(), "{text}");
    }

    #[test]
    fn missing_output_is_named() {
        let outputs = r#"[{"OutputKey":"SecretName","OutputValue":"s"}]"#;
        let err = config_from_stack(outputs).expect_err("missing pool");
        assert!(err.to_string().contains("CognitoIdentityPoolID"), "{err}");
        assert!(config_from_stack("{}").is_err());
        assert!(config_from_stack("not json").is_err());
    }
}
