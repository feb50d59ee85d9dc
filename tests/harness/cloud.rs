//! The emulated cloud: moto provisioned like the CloudFormation template, in a namespace.

use super::*;

/// What provision.py created in moto.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct Account {
    pub region: String,
    pub identity_pool_id: String,
    pub secret_id: String,
    pub unauth_role_arn: String,
    pub user_pool_id: String,
    pub client_id: String,
    /// The shared user; empty in self-register mode.
    #[serde(deserialize_with = "null_as_empty")]
    pub username: String,
    #[serde(deserialize_with = "null_as_empty")]
    pub password: String,
    pub iot_policy: String,
    pub iot_endpoint: String,
    /// `shared-user` or `self-register` (the template's RegistrationMode).
    #[serde(default)]
    pub registration_mode: String,
    /// Self-register mode: the secret's code; empty otherwise.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub registration_code: String,
    #[serde(default)]
    pub email_domain: String,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    use serde::Deserialize;
    Option::<String>::deserialize(d).map(Option::unwrap_or_default)
}

/// moto + mosquitto in a private namespace, with a provisioned account.
pub struct Cloud {
    pub dir: tempfile::TempDir,
    pub account: Account,
    pub ca_file: PathBuf,
    pub(super) broker: Option<Process>,
    /// Self-register mode: Cognito's trigger and quotas in front of moto; daemons go through it.
    pub(super) cognito: Option<CognitoProxy>,
    /// AWS's authorization in front of moto and mosquitto ([`Cloud::start_enforced`]).
    pub(super) gate: Option<Gate>,
    pub(super) moto: Process,
    // Dropped last: the processes above must be gone before the namespace is deleted.
    pub namespace: Namespace,
}

impl Cloud {
    /// A shared-user cloud whose emulators daemons reach directly. The onboarding and heal
    /// tests of e2e, downlink, fleet and credential rotation use [`Cloud::start_enforced`];
    /// the data-path tests and benches (spool, protocol, publish, throughput) stay direct: a
    /// Python gate in the MQTT path would be their bottleneck, and their fault proxies rewrite
    /// what the gate would have to trust.
    pub fn start() -> Cloud {
        Cloud::start_with(false)
    }

    /// `faketime`: moto runs under libfaketime, its clock offset set by [`Cloud::set_moto_clock`].
    pub fn start_with(faketime: bool) -> Cloud {
        Cloud::start_in_mode(faketime, "shared-user")
    }

    /// A self-register (fleet mode) account; every daemon's AWS calls go through
    /// tests/support/cognito_proxy.py, which plays the template's pre-sign-up trigger and
    /// answers TooManyRequestsException beyond `rates` (e.g. "SignUp=2,GetId=5"; "" = none).
    /// AWS's authorization is enforced (tests/harness/gate.rs) in front of both.
    pub fn start_fleet(rates: &str) -> Cloud {
        let mut cloud = Cloud::start_in_mode(false, "self-register");
        cloud.cognito = Some(cloud.start_cognito_proxy(rates));
        cloud.enforce(0);
        cloud
    }

    fn start_in_mode(faketime: bool, mode: &str) -> Cloud {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "integration tests need root for network namespaces (run `make test` as root)"
        );
        let namespace = Namespace::create();
        let dir = tempfile::tempdir().expect("tempdir");
        make_certificates(dir.path());
        let moto_log = std::fs::File::create(dir.path().join("moto.log")).expect("moto log");
        let mut moto_command = namespace.command(moto_server());
        if faketime {
            std::fs::write(dir.path().join("faketime"), "+0\n").expect("faketime file");
            moto_command
                .env("LD_PRELOAD", LIBFAKETIME)
                .env("FAKETIME_TIMESTAMP_FILE", dir.path().join("faketime"))
                .env("FAKETIME_CACHE_DURATION", "1")
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        let moto = Process {
            name: "moto_server",
            child: Some(
                moto_command
                    .args(["-H", "127.0.0.1", "-p", &MOTO_PORT.to_string()])
                    .stdout(moto_log.try_clone().expect("log"))
                    .stderr(moto_log)
                    .spawn()
                    .expect("start moto_server (is the .venv set up? see README)"),
            ),
        };
        let mut cloud = Cloud {
            ca_file: dir.path().join("ca.crt"),
            account: Account::default(),
            dir,
            broker: None,
            cognito: None,
            gate: None,
            moto,
            namespace,
        };
        cloud.start_broker();
        cloud.account = cloud.provision(mode);
        cloud
    }

    /// Shifts moto's clock (e.g. "-200s"); needs `start_with(true)`. Takes effect within 1 s.
    pub fn set_moto_clock(&self, offset: &str) {
        std::fs::write(self.dir.path().join("faketime"), format!("{offset}\n")).expect("faketime");
        std::thread::sleep(Duration::from_millis(1500));
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{MOTO_PORT}")
    }

    /// Where daemons send their AWS calls: the gate of an enforced cloud, the Cognito proxy
    /// in fleet mode, moto otherwise.
    pub fn daemon_endpoint(&self) -> String {
        match (&self.gate, &self.cognito) {
            (Some(_), _) => format!("http://127.0.0.1:{GATE_HTTP_PORT}"),
            (None, Some(proxy)) => proxy.endpoint(),
            (None, None) => self.endpoint(),
        }
    }

    /// Where daemons connect for MQTT: the gate of an enforced cloud, else the broker.
    pub fn mqtt_url(&self) -> String {
        let port = if self.gate.is_some() {
            GATE_WSS_PORT
        } else {
            WSS_PORT
        };
        format!("wss://127.0.0.1:{port}/mqtt")
    }

    /// The Cognito proxy of [`Cloud::start_fleet`].
    pub fn cognito(&self) -> &CognitoProxy {
        self.cognito
            .as_ref()
            .expect("a fleet cloud (Cloud::start_fleet)")
    }

    /// Runs a Python snippet in the namespace with boto3 pointed at moto; returns stdout.
    pub fn python(&self, code: &str) -> String {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let output = self
                .namespace
                .command(python())
                .args(["-c", code])
                .env("AWS_ENDPOINT_URL", self.endpoint())
                .env("AWS_ACCESS_KEY_ID", "testing")
                .env("AWS_SECRET_ACCESS_KEY", "testing")
                .env("AWS_DEFAULT_REGION", "us-east-1")
                .output()
                .expect("run python");
            if output.status.success() {
                return String::from_utf8_lossy(&output.stdout).into_owned();
            }
            let stderr = String::from_utf8_lossy(&output.stderr);
            // moto may still be starting.
            if stderr.contains("Could not connect") && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            panic!("python failed: {stderr}");
        }
    }

    pub(super) fn provision(&self, mode: &str) -> Account {
        let script = repo_root().join("tests/support/provision.py");
        let code = format!(
            "import json, sys; sys.path.insert(0, {dir:?}); import provision; \
             print(json.dumps(provision.provision({endpoint:?}, 'us-east-1', 'relay-test', \
             mode={mode:?})))",
            dir = script.parent().expect("dir").display().to_string(),
            endpoint = self.endpoint(),
        );
        let output = self.python(&code);
        // The gate reads what was provisioned (tests/harness/gate.rs).
        std::fs::write(self.dir.path().join("account.json"), output.trim()).expect("account");
        serde_json::from_str(output.trim()).expect("provision output")
    }

    /// Fails when any text holds a secret of this account: the shared user's password or the
    /// registration code, moto's Cognito secret key and session token (fixed values), or a JWT
    /// (ID/refresh token).
    pub fn assert_no_secrets(&self, what: &str, text: &str) {
        self.assert_none_of(what, text, &[]);
    }

    /// [`Cloud::assert_no_secrets`] plus `more` (e.g. a device's own password).
    pub fn assert_none_of(&self, what: &str, text: &str, more: &[(&str, &str)]) {
        let known = [
            ("password", self.account.password.as_str()),
            ("registration code", self.account.registration_code.as_str()),
            ("secret access key", MOTO_SECRET_KEY),
            ("session token", MOTO_SESSION_TOKEN),
            ("JWT", "eyJ"),
        ];
        // An empty value is a secret this mode does not have.
        for (name, secret) in known.iter().chain(more).filter(|(_, s)| !s.is_empty()) {
            assert!(!text.contains(secret), "{what} leaks the {name}");
        }
    }
}

/// A test CA and a server certificate for 127.0.0.1 / localhost, and for [`CLOUD_LINK_IP`],
/// where devices in their own namespaces reach the cloud (benches/wire.rs).
pub(super) fn make_certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run_ok(
        Command::new("openssl")
            .current_dir(dir)
            .args(["req", "-x509"])
            .args(ec)
            .args([
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=relay-test-ca",
            ])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]),
    );
    run_ok(
        Command::new("openssl")
            .current_dir(dir)
            .arg("req")
            .args(ec)
            .args([
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ]),
    );
    std::fs::write(
        dir.join("server.ext"),
        format!(
            "subjectAltName=IP:127.0.0.1,IP:{CLOUD_LINK_IP},DNS:localhost\n\
             basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
        ),
    )
    .expect("ext");
    run_ok(Command::new("openssl").current_dir(dir).args([
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]));
}
