//! Proxies in front of moto or the broker that inject the faults the field has.

use super::*;

impl Cloud {
    /// A fault-injecting proxy in front of moto (tests/support/fault_proxy.py).
    pub fn start_fault_proxy(&self) -> FaultProxy {
        self.start_fault_proxy_on("127.0.0.1")
    }

    /// Like [`Cloud::start_fault_proxy`], listening on `host` (`0.0.0.0`: also for devices
    /// on [`DeviceLink`]s; the namespace keeps it private either way).
    pub fn start_fault_proxy_on(&self, host: &str) -> FaultProxy {
        let control = self.dir.path().join("fault-mode");
        let log = self.dir.path().join("fault-proxy.log");
        let process = Process {
            name: "fault_proxy",
            child: Some(
                self.namespace
                    .command(python())
                    .arg(repo_root().join("tests/support/fault_proxy.py"))
                    .args(["--host", host])
                    .args([
                        "--port",
                        &FAULT_PROXY_PORT.to_string(),
                        "--target",
                        &self.endpoint(),
                    ])
                    .arg("--control")
                    .arg(&control)
                    .arg("--log")
                    .arg(&log)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start fault proxy"),
            ),
        };
        let proxy = FaultProxy {
            _process: process,
            control,
            log,
        };
        // Ready once a request through it reaches moto.
        self.python(&format!(
            "import urllib.request, time\nfor _ in range(100):\n    try:\n        urllib.request.urlopen('{}/moto-api/'); break\n    except Exception: time.sleep(0.1)",
            proxy.endpoint()
        ));
        proxy
    }

    /// A TLS proxy in front of the broker's wss listener that logs each websocket upgrade's
    /// signature fields and can cut connections or answer 403 (tests/support/ws_proxy.py).
    pub fn start_ws_proxy(&self) -> WsProxy {
        self.start_ws_proxy_on("127.0.0.1", false)
    }

    /// Like [`Cloud::start_ws_proxy`], listening on `host`; with `answer_broker_pings` it
    /// answers the broker's websocket pings itself instead of passing them to the client
    /// (see tests/support/ws_proxy.py).
    pub fn start_ws_proxy_on(&self, host: &str, answer_broker_pings: bool) -> WsProxy {
        let control = self.dir.path().join("ws-proxy-mode");
        let log = self.dir.path().join("ws-proxy.log");
        let process = Process {
            name: "ws_proxy",
            child: Some(
                self.namespace
                    .command(python())
                    .arg(repo_root().join("tests/support/ws_proxy.py"))
                    .args(answer_broker_pings.then_some("--answer-broker-pings"))
                    .args([
                        "--host",
                        host,
                        "--port",
                        &WS_PROXY_PORT.to_string(),
                        "--target-port",
                        &WSS_PORT.to_string(),
                    ])
                    .arg("--cert")
                    .arg(self.dir.path().join("server.crt"))
                    .arg("--key")
                    .arg(self.dir.path().join("server.key"))
                    .arg("--control")
                    .arg(&control)
                    .arg("--log")
                    .arg(&log)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start ws proxy"),
            ),
        };
        self.python(&format!(
            "import socket, time\nfor _ in range(100):\n    try:\n        socket.create_connection(('127.0.0.1', {WS_PROXY_PORT})).close(); break\n    except OSError: time.sleep(0.1)"
        ));
        WsProxy {
            _process: process,
            control,
            log,
        }
    }

    /// Makes the account a current stack's: the secret gets the `AttachFunction` tag (as
    /// provision.py --attach-function and the template do), and tests/support/attach_proxy.py
    /// plays Lambda for that function, running the template's handler against moto. Start the
    /// daemon with [`AttachProxy::config`] and [`AttachProxy::env`].
    pub fn enable_attach_function(&self) -> AttachProxy {
        self.enable_attach_function_with(&[])
    }

    /// Like [`Cloud::enable_attach_function`], with extra environment for the function.
    pub(super) fn enable_attach_function_with(&self, env: &[(&str, String)]) -> AttachProxy {
        let function = "arn:aws:lambda:us-east-1:123456789012:function:relay-test-attach-policy";
        self.python(&format!(
            "import boto3; boto3.client('secretsmanager').tag_resource(SecretId={secret:?}, \
             Tags=[{{'Key': 'AttachFunction', 'Value': {function:?}}}])",
            secret = self.account.secret_id,
        ));
        let log = self.dir.path().join("attach-proxy.log");
        let process = Process {
            name: "attach_proxy",
            child: Some(
                self.namespace
                    .command(python())
                    .arg(repo_root().join("tests/support/attach_proxy.py"))
                    .args(["--port", &ATTACH_PROXY_PORT.to_string()])
                    .args(["--moto", &self.endpoint()])
                    .args(["--identity-pool-id", &self.account.identity_pool_id])
                    .args(["--user-pool-id", &self.account.user_pool_id])
                    .args(["--policy", &self.account.iot_policy])
                    .arg("--log")
                    .arg(&log)
                    .envs(env.iter().map(|(key, value)| (key, value)))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start attach proxy"),
            ),
        };
        let proxy = AttachProxy {
            _process: process,
            log,
            function: function.to_owned(),
            moto: self.endpoint(),
        };
        self.python(&format!(
            "import urllib.request, time\nfor _ in range(100):\n    try:\n        urllib.request.urlopen('{}/'); break\n    except Exception: time.sleep(0.1)",
            proxy.endpoint()
        ));
        proxy
    }
}

impl Cloud {
    /// tests/support/cognito_proxy.py in front of moto (see [`Cloud::start_fleet`]).
    pub(super) fn start_cognito_proxy(&self, rates: &str) -> CognitoProxy {
        let log = self.dir.path().join("cognito-proxy.log");
        let stderr = std::fs::File::create(self.dir.path().join("cognito-proxy.err")).expect("log");
        let process = Process {
            name: "cognito_proxy",
            child: Some(
                self.namespace
                    .command(python())
                    .arg(repo_root().join("tests/support/cognito_proxy.py"))
                    .args(["--port", &COGNITO_PROXY_PORT.to_string()])
                    .args(["--target", &self.endpoint()])
                    .args(["--rates", rates])
                    .args(["--user-pool-id", &self.account.user_pool_id])
                    .args(["--domain", &self.account.email_domain])
                    .arg("--log")
                    .arg(&log)
                    .stdout(Stdio::null())
                    .stderr(stderr)
                    .spawn()
                    .expect("start cognito proxy"),
            ),
        };
        let proxy = CognitoProxy {
            _process: process,
            log,
        };
        self.python(&format!(
            "import urllib.request, time\nfor _ in range(100):\n    try:\n        urllib.request.urlopen('{}/moto-api/'); break\n    except Exception: time.sleep(0.1)",
            proxy.endpoint()
        ));
        proxy
    }

    /// What an operator does to revoke one device (docs/operations.md): disable its user and
    /// sign it out everywhere (its refresh tokens stop working).
    pub fn revoke_device(&self, device_name: &str) {
        self.python(&format!(
            "import boto3; c = boto3.client('cognito-idp'); \
             c.admin_disable_user(UserPoolId={pool:?}, Username={device_name:?}); \
             c.admin_user_global_sign_out(UserPoolId={pool:?}, Username={device_name:?})",
            pool = self.account.user_pool_id,
        ));
    }

    /// The recovery command for a re-flashed device (docs/operations.md).
    pub fn delete_device_user(&self, device_name: &str) {
        self.python(&format!(
            "import boto3; boto3.client('cognito-idp').admin_delete_user(\
             UserPoolId={pool:?}, Username={device_name:?})",
            pool = self.account.user_pool_id,
        ));
    }
}

/// tests/support/cognito_proxy.py: the pre-sign-up trigger and Cognito's rate quotas.
pub struct CognitoProxy {
    pub(super) _process: Process,
    pub(super) log: PathBuf,
}

impl CognitoProxy {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{COGNITO_PROXY_PORT}")
    }

    /// Every call so far: {"t", "op", "result", "user"}.
    pub fn calls(&self) -> Vec<Value> {
        json_lines(&self.log)
    }

    /// How many `op` calls had `result` (e.g. "SignUp", "ok").
    pub fn count(&self, op: &str, result: &str) -> usize {
        self.calls()
            .iter()
            .filter(|c| c["op"] == op && c["result"] == result)
            .count()
    }
}

/// tests/support/attach_proxy.py: Lambda for the template's attach function.
pub struct AttachProxy {
    pub(super) _process: Process,
    pub(super) log: PathBuf,
    pub function: String,
    pub(super) moto: String,
}

impl AttachProxy {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{ATTACH_PROXY_PORT}")
    }

    /// A daemon config in `dir` without `aws.endpoint_url`: an endpoint set in the config wins
    /// over the SDK's per-service variables, so the endpoints come from [`AttachProxy::env`].
    pub fn config(&self, cloud: &Cloud, dir: &Path) -> PathBuf {
        let config = cloud.config(dir, false, "");
        rewrite_config(
            &config,
            &[(&format!("endpoint_url = {:?}\n", self.moto), "")],
        );
        config
    }

    /// The environment that sends the daemon's Lambda calls here and every other AWS call to
    /// moto (the SDK's `AWS_ENDPOINT_URL_<SERVICE>` and `AWS_ENDPOINT_URL`).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL".to_owned(), self.moto.clone()),
            ("AWS_ENDPOINT_URL_LAMBDA".to_owned(), self.endpoint()),
        ]
    }

    /// Every invocation so far: function, payload keys, answer or error.
    pub fn invocations(&self) -> Vec<Value> {
        json_lines(&self.log)
    }
}

/// The fault proxy's switch and its request log.
pub struct FaultProxy {
    pub(super) _process: Process,
    pub(super) control: PathBuf,
    pub(super) log: PathBuf,
}

impl FaultProxy {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{FAULT_PROXY_PORT}")
    }

    /// "pass", "throttle" or "error500".
    pub fn set_mode(&self, mode: &str) {
        std::fs::write(&self.control, mode).expect("fault mode");
    }

    /// Every request seen: `{"t": epoch seconds, "target": …, "fault": code or null}`.
    pub fn requests(&self) -> Vec<Value> {
        json_lines(&self.log)
    }
}

/// The websocket proxy's switch and its log of upgrades.
pub struct WsProxy {
    pub(super) _process: Process,
    pub(super) control: PathBuf,
    pub(super) log: PathBuf,
}

impl WsProxy {
    /// The `mqtt.url` that goes through the proxy.
    pub fn url(&self) -> String {
        format!("wss://127.0.0.1:{WS_PROXY_PORT}/mqtt")
    }

    /// "pass", "cut" or "refuse403 <skew seconds>".
    pub fn set_mode(&self, mode: &str) {
        std::fs::write(&self.control, mode).expect("ws proxy mode");
    }

    /// Every upgrade seen: `{"t", "amz_date", "amz_expires", "access_key", "action"}`.
    pub fn upgrades(&self) -> Vec<Value> {
        json_lines(&self.log)
    }
}
