//! AWS's authorization in front of the emulators (tests/support/aws_gate.py): moto and
//! mosquitto enforce no IAM, session, resource or IoT policy, so every AWS call and MQTT packet
//! of an enforced cloud goes through the gate, which decides the way AWS does from the
//! template's own policies.

use super::*;

pub const GATE_HTTP_PORT: u16 = 5004;
pub const GATE_WSS_PORT: u16 = 8445;

/// The running gate and its decision log.
pub struct Gate {
    pub(super) _process: Process,
    pub(super) log: PathBuf,
    pub(super) control: PathBuf,
    /// Plays Lambda for the template's attach function behind the gate.
    pub attach: AttachProxy,
}

impl Cloud {
    /// A shared-user cloud as the template builds a `RegistrationMode=shared-user` stack, with
    /// AWS's authorization
    /// enforced (see the module docs). Daemons made by [`Cloud::config`] go through it.
    pub fn start_enforced() -> Cloud {
        Cloud::start_enforced_with(0)
    }

    /// Like [`Cloud::start_enforced`]; an attachment counts only `policy_delay_s` seconds after
    /// the gate first sees it (IoT Core applies policy changes within minutes).
    pub fn start_enforced_with(policy_delay_s: u64) -> Cloud {
        let mut cloud = Cloud::start();
        cloud.enforce(policy_delay_s);
        cloud
    }

    pub(super) fn enforce(&mut self, policy_delay_s: u64) {
        let log = self.dir.path().join("gate.log");
        let control = self.dir.path().join("gate-mode");
        let stderr = std::fs::File::create(self.dir.path().join("gate.err")).expect("log");
        let dir = self.dir.path();
        let process = Process {
            name: "aws_gate",
            child: Some(
                self.namespace
                    .command(python())
                    .arg(repo_root().join("tests/support/aws_gate.py"))
                    .arg("--account")
                    .arg(dir.join("account.json"))
                    .args(["--upstream", &self.daemon_endpoint()])
                    .args(["--lambda", &format!("http://127.0.0.1:{ATTACH_PROXY_PORT}")])
                    .args(["--http-port", &GATE_HTTP_PORT.to_string()])
                    .args(["--wss-port", &GATE_WSS_PORT.to_string()])
                    .args(["--broker-port", &WSS_PORT.to_string()])
                    .arg("--cert")
                    .arg(dir.join("server.crt"))
                    .arg("--key")
                    .arg(dir.join("server.key"))
                    .arg("--cafile")
                    .arg(&self.ca_file)
                    .arg("--log")
                    .arg(&log)
                    .arg("--control")
                    .arg(&control)
                    .args(["--device-cidrs", "127.0.0.0/8,::1/128"])
                    .args(["--policy-delay", &policy_delay_s.to_string()])
                    .stdout(Stdio::null())
                    .stderr(stderr)
                    .spawn()
                    .expect("start the AWS gate"),
            ),
        };
        wait_for("the AWS gate to listen", START_TIMEOUT, || {
            json_lines(&log).iter().any(|line| line["ready"] == true)
        });
        // The template's stacks name the attach function in the secret: devices hold no
        // iot:AttachPolicy. The function's GetId goes through the gate, which answers the
        // identity linked to the login as Cognito does (moto mints a new one per call).
        let attach = self.enable_attach_function_with(&[(
            "AWS_ENDPOINT_URL_COGNITO_IDENTITY",
            format!("http://127.0.0.1:{GATE_HTTP_PORT}"),
        )]);
        self.gate = Some(Gate {
            _process: process,
            log,
            control,
            attach,
        });
    }

    /// The gate of [`Cloud::start_enforced`].
    pub fn gate(&self) -> &Gate {
        self.gate
            .as_ref()
            .expect("an enforced cloud (Cloud::start_enforced)")
    }

    /// Detaches the account's IoT policy from `identity_id`, as an operator (or a lost
    /// attachment) would.
    pub fn detach_policy(&self, identity_id: &str) {
        self.python(&format!(
            "import boto3; boto3.client('iot').detach_policy(policyName={policy:?}, target={identity_id:?})",
            policy = self.account.iot_policy,
        ));
    }
}

impl Gate {
    /// Every decision so far (one JSON object per request or MQTT packet).
    pub fn decisions(&self) -> Vec<Value> {
        json_lines(&self.log)
    }

    /// "pass", or "refuse": the MQTT listener refuses new TCP connections (a network cut).
    pub fn set_mode(&self, mode: &str) {
        std::fs::write(&self.control, mode).expect("gate mode");
    }
}
