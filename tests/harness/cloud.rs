//! The emulated cloud: moto provisioned like the CloudFormation template, in a namespace.

use super::*;

/// What provision.py created in moto.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Account {
    pub region: String,
    pub identity_pool_id: String,
    pub secret_id: String,
    pub unauth_role_arn: String,
    pub user_pool_id: String,
    pub client_id: String,
    pub username: String,
    pub password: String,
    pub iot_policy: String,
    pub iot_endpoint: String,
}

/// moto + mosquitto in a private namespace, with a provisioned account.
pub struct Cloud {
    pub dir: tempfile::TempDir,
    pub account: Account,
    pub ca_file: PathBuf,
    pub(super) broker: Option<Process>,
    pub(super) moto: Process,
    // Dropped last: the processes above must be gone before the namespace is deleted.
    pub namespace: Namespace,
}

impl Cloud {
    pub fn start() -> Cloud {
        Cloud::start_with(false)
    }

    /// `faketime`: moto runs under libfaketime, its clock offset set by [`Cloud::set_moto_clock`].
    pub fn start_with(faketime: bool) -> Cloud {
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
            account: Account {
                region: String::new(),
                identity_pool_id: String::new(),
                secret_id: String::new(),
                unauth_role_arn: String::new(),
                user_pool_id: String::new(),
                client_id: String::new(),
                username: String::new(),
                password: String::new(),
                iot_policy: String::new(),
                iot_endpoint: String::new(),
            },
            dir,
            broker: None,
            moto,
            namespace,
        };
        cloud.start_broker();
        cloud.account = cloud.provision();
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

    pub(super) fn provision(&self) -> Account {
        let script = repo_root().join("tests/support/provision.py");
        let code = format!(
            "import json, sys; sys.path.insert(0, {dir:?}); import provision; \
             print(json.dumps(provision.provision({endpoint:?}, 'us-east-1', 'relay-test')))",
            dir = script.parent().expect("dir").display().to_string(),
            endpoint = self.endpoint(),
        );
        serde_json::from_str(self.python(&code).trim()).expect("provision output")
    }

    /// Fails when any text holds a secret of this account: the user's password, moto's
    /// Cognito secret key and session token (fixed values), or a JWT (ID/refresh token).
    pub fn assert_no_secrets(&self, what: &str, text: &str) {
        for (name, secret) in [
            ("password", self.account.password.as_str()),
            ("secret access key", MOTO_SECRET_KEY),
            ("session token", MOTO_SESSION_TOKEN),
            ("JWT", "eyJ"),
        ] {
            assert!(!text.contains(secret), "{what} leaks the {name}");
        }
    }
}

/// A test CA and a server certificate for 127.0.0.1 / localhost.
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
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
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
