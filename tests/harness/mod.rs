//! The emulated cloud for integration tests: moto (AWS) and mosquitto (IoT Core's broker),
//! provisioned like the CloudFormation template, plus the real daemon binary.
//!
//! Every `Cloud` lives in its own network namespace with only loopback up, so the brokers'
//! listeners (mosquitto's websockets listener binds every interface) are unreachable from
//! outside, and fixed ports cannot collide between tests. Processes join the namespace through
//! `ip netns exec`; the test talks to them through Unix sockets (not network-scoped), files and
//! child processes. Everything is torn down on drop, also when a test panics.
//!
//! Needs root (network namespaces), `ip`, `openssl`, mosquitto + mosquitto-clients, and a
//! Python with moto[server] and boto3 (`.venv`, see README).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const MOTO_PORT: u16 = 5000;
pub const WSS_PORT: u16 = 8443;
pub const MQTT_PORT: u16 = 1883;
pub const FAULT_PROXY_PORT: u16 = 5001;
pub const WS_PROXY_PORT: u16 = 8444;
pub const ATTACH_PROXY_PORT: u16 = 5002;
const START_TIMEOUT: Duration = Duration::from_secs(30);
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
/// What moto's GetCredentialsForIdentity always returns.
pub const MOTO_SECRET_KEY: &str = "ABCSECRETKEY";
pub const MOTO_SESSION_TOKEN: &str = "ABC12345";

static NAMESPACE_COUNTER: AtomicU32 = AtomicU32::new(0);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python that has moto and boto3: `$RELAY_TEST_PYTHON`, else the repo's `.venv`.
pub fn python() -> PathBuf {
    if let Ok(path) = std::env::var("RELAY_TEST_PYTHON") {
        return path.into();
    }
    let venv = repo_root().join(".venv/bin/python3");
    if venv.exists() {
        venv
    } else {
        "python3".into()
    }
}

fn moto_server() -> PathBuf {
    let sibling = python().with_file_name("moto_server");
    if sibling.exists() {
        sibling
    } else {
        "moto_server".into()
    }
}

/// A child process killed (and reaped) on drop.
pub struct Process {
    pub name: &'static str,
    child: Option<Child>,
}

impl Process {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn signal(&self, signal: i32) {
        if self.pid() > 0 {
            unsafe { libc::kill(self.pid(), signal) };
        }
    }

    /// Waits for the process to exit on its own.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A named network namespace with loopback up, deleted on drop.
pub struct Namespace {
    pub name: String,
}

impl Namespace {
    fn create() -> Namespace {
        remove_stale_namespaces();
        let name = format!(
            "icr-test-{}-{}",
            std::process::id(),
            NAMESPACE_COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let namespace = Namespace { name };
        run_ok(Command::new("ip").args(["-n", &namespace.name, "link", "set", "lo", "up"]));
        namespace
    }

    /// Moves the calling thread into the namespace; threads it starts afterwards are in it too
    /// (benchmarks measure from inside, next to the broker).
    pub fn enter(&self) {
        let path = format!("/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let entered =
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(
            entered,
            0,
            "setns {path}: {}",
            std::io::Error::last_os_error()
        );
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }
}

/// Deletes namespaces left by test processes that were killed before they could clean up.
fn remove_stale_namespaces() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name
            .strip_prefix("icr-test-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "delete", name]).status();
        }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

fn run_ok(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

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
    broker: Option<Process>,
    moto: Process,
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

    /// A fault-injecting proxy in front of moto (tests/support/fault_proxy.py).
    pub fn start_fault_proxy(&self) -> FaultProxy {
        let control = self.dir.path().join("fault-mode");
        let log = self.dir.path().join("fault-proxy.log");
        let process = Process {
            name: "fault_proxy",
            child: Some(
                self.namespace
                    .command(python())
                    .arg(repo_root().join("tests/support/fault_proxy.py"))
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
        let control = self.dir.path().join("ws-proxy-mode");
        let log = self.dir.path().join("ws-proxy.log");
        let process = Process {
            name: "ws_proxy",
            child: Some(
                self.namespace
                    .command(python())
                    .arg(repo_root().join("tests/support/ws_proxy.py"))
                    .args([
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

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{MOTO_PORT}")
    }

    /// Makes the account a current stack's: the secret gets the `AttachFunction` tag (as
    /// provision.py --attach-function and the template do), and tests/support/attach_proxy.py
    /// plays Lambda for that function, running the template's handler against moto. Start the
    /// daemon with [`AttachProxy::config`] and [`AttachProxy::env`].
    pub fn enable_attach_function(&self) -> AttachProxy {
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

    fn provision(&self) -> Account {
        let script = repo_root().join("tests/support/provision.py");
        let code = format!(
            "import json, sys; sys.path.insert(0, {dir:?}); import provision; \
             print(json.dumps(provision.provision({endpoint:?}, 'us-east-1', 'relay-test')))",
            dir = script.parent().expect("dir").display().to_string(),
            endpoint = self.endpoint(),
        );
        serde_json::from_str(self.python(&code).trim()).expect("provision output")
    }

    /// Starts (or restarts) mosquitto and waits until both listeners are up. It logs every
    /// packet (tests read the log).
    pub fn start_broker(&mut self) {
        self.start_broker_logging("all");
    }

    /// Like [`Cloud::start_broker`], logging only these `log_type`s (benchmarks keep it quiet).
    pub fn start_broker_logging(&mut self, log_types: &str) {
        self.start_broker_with(log_types, true);
    }

    /// (Re)starts mosquitto refusing every client without a user name with CONNACK 5 "not
    /// authorized": what IoT Core answers an identity without the policy, as near as mosquitto
    /// plays it.
    pub fn start_broker_refusing(&mut self) {
        self.start_broker_with("all", false);
    }

    fn start_broker_with(&mut self, log_types: &str, anonymous: bool) {
        self.kill_broker();
        let log_types: String = log_types
            .split_whitespace()
            .map(|kind| format!("log_type {kind}\n"))
            .collect();
        let dir = self.dir.path();
        let log = dir.join("mosquitto.log");
        let config = format!(
            "per_listener_settings false\nallow_anonymous {anonymous}\nuser root\n\
             persistence true\npersistence_location {dir}/\nautosave_interval 1\nmax_queued_messages 0\n\
             log_dest file {log}\n{log_types}connection_messages true\n\
             listener {MQTT_PORT} 127.0.0.1\nprotocol mqtt\n\
             listener {WSS_PORT} 127.0.0.1\nprotocol websockets\nwebsockets_headers_size 8192\n\
             cafile {dir}/ca.crt\ncertfile {dir}/server.crt\nkeyfile {dir}/server.key\n",
            log = log.display(),
            dir = dir.display(),
        );
        std::fs::write(dir.join("mosquitto.conf"), config).expect("broker config");
        let before = std::fs::read_to_string(&log).map(|t| t.len()).unwrap_or(0);
        let broker = Process {
            name: "mosquitto",
            child: Some(
                self.namespace
                    .command("mosquitto")
                    .arg("-c")
                    .arg(dir.join("mosquitto.conf"))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start mosquitto"),
            ),
        };
        self.broker = Some(broker);
        wait_for("mosquitto to start", START_TIMEOUT, || {
            std::fs::read_to_string(&log)
                .map(|t| t.get(before..).unwrap_or("").contains(" running"))
                .unwrap_or(false)
        });
    }

    /// SIGKILLs the broker (an outage).
    pub fn kill_broker(&mut self) {
        if let Some(mut broker) = self.broker.take() {
            broker.kill();
        }
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

    pub fn broker_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// A subscriber to every topic on the plain listener, ready when this returns.
    pub fn subscribe(&self) -> Subscriber {
        let mut child = self
            .namespace
            .command("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &MQTT_PORT.to_string()])
            // A persistent session (-c): across broker restarts the broker keeps its
            // subscription and queues for it, so nothing is missed while it reconnects.
            .args(["-t", "#", "-q", "1", "-F", "%j", "-c"])
            .args(["-i", "relay-test-subscriber"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto_sub");
        let stdout = child.stdout.take().expect("stdout");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(message) = serde_json::from_str::<Value>(&line)
                    && sender.send(message).is_err()
                {
                    break;
                }
            }
        });
        let mut subscriber = Subscriber {
            _process: Process {
                name: "mosquitto_sub",
                child: Some(child),
            },
            lines,
        };
        // Ready once a probe published after it started comes back.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            run_ok(self.namespace.command("mosquitto_pub").args([
                "-h",
                "127.0.0.1",
                "-p",
                &MQTT_PORT.to_string(),
                "-t",
                "relay-test/probe",
                "-m",
                "probe",
            ]));
            if subscriber
                .next_message(Duration::from_millis(500))
                .is_some_and(|m| m.topic == "relay-test/probe")
            {
                // The subscription must be on disk before a test kills the broker, or the
                // restarted broker forgets it; mosquitto autosaves every second.
                let subscribed = std::time::SystemTime::now();
                let db = self.dir.path().join("mosquitto.db");
                wait_for("the subscription to be saved", START_TIMEOUT, || {
                    std::fs::metadata(&db)
                        .and_then(|m| m.modified())
                        .is_ok_and(|saved| saved > subscribed)
                });
                return subscriber;
            }
            assert!(Instant::now() < deadline, "subscriber never became ready");
        }
    }

    /// A config for a daemon in `dir`. `classic` chooses the onboarding flow.
    pub fn config(&self, dir: &Path, classic: bool, extra: &str) -> PathBuf {
        self.config_via(dir, classic, &self.endpoint(), extra)
    }

    /// Like [`Cloud::config`], with the AWS calls sent to `endpoint` (e.g. a fault proxy).
    pub fn config_via(&self, dir: &Path, classic: bool, endpoint: &str, extra: &str) -> PathBuf {
        let unauth = if classic {
            format!("unauth_role_arn = {:?}\n", self.account.unauth_role_arn)
        } else {
            String::new()
        };
        let text = format!(
            "[aws]\nendpoint_url = {endpoint:?}\n\n\
             [identity]\nidentity_pool_id = {pool:?}\nsecret_id = {secret:?}\n{unauth}\n\
             [mqtt]\nurl = \"wss://127.0.0.1:{WSS_PORT}/mqtt\"\nca_file = {ca:?}\n\n\
             [socket]\npath = {socket:?}\n\n[state]\ndir = {state:?}\n\n\
             [publish]\nmax_publishes_per_second = 0\nmax_bytes_per_second = \"0\"\n\n\
             [log]\nlevel = \"debug\"\n{extra}",
            pool = self.account.identity_pool_id,
            secret = self.account.secret_id,
            ca = self.ca_file.display().to_string(),
            socket = dir.join("relay.sock").display().to_string(),
            state = dir.join("state").display().to_string(),
        );
        let path = dir.join("config.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    /// Starts the real daemon in the namespace and waits until its socket answers.
    pub fn start_daemon(&self, config: &Path) -> Daemon {
        self.start_daemon_env(config, &[])
    }

    /// Like [`Cloud::start_daemon`], with extra environment variables.
    pub fn start_daemon_env(&self, config: &Path, env: &[(String, String)]) -> Daemon {
        let dir = config.parent().expect("config dir").to_owned();
        let log_path = dir.join(format!(
            "daemon-{}.log",
            NAMESPACE_COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let log = std::fs::File::create(&log_path).expect("daemon log");
        let mut command = self
            .namespace
            .command(env!("CARGO_BIN_EXE_iot-cognito-relay"));
        command
            .arg("run")
            .arg("--config")
            .arg(config)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &dir)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let process = Process {
            name: "iot-cognito-relay",
            child: Some(command.spawn().expect("start daemon")),
        };
        let mut daemon = Daemon {
            process,
            socket: dir.join("relay.sock"),
            state_dir: dir.join("state"),
            log: log_path,
        };
        let socket = daemon.socket.clone();
        let deadline = Instant::now() + START_TIMEOUT;
        while UnixStream::connect(&socket).is_err() {
            assert!(
                daemon.process.is_running(),
                "daemon exited at start:\n{}",
                daemon.log_text()
            );
            assert!(
                Instant::now() < deadline,
                "daemon socket never appeared:\n{}",
                daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon
    }
}

/// tests/support/attach_proxy.py: Lambda for the template's attach function.
pub struct AttachProxy {
    _process: Process,
    log: PathBuf,
    pub function: String,
    moto: String,
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
    _process: Process,
    control: PathBuf,
    log: PathBuf,
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
    _process: Process,
    control: PathBuf,
    log: PathBuf,
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

/// Messages as the broker delivered them.
pub struct Subscriber {
    _process: Process,
    lines: mpsc::Receiver<Value>,
}

/// One message the subscriber received.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: String,
}

impl Subscriber {
    pub fn next_message(&mut self, timeout: Duration) -> Option<Received> {
        let value = self.lines.recv_timeout(timeout).ok()?;
        Some(Received {
            topic: value["topic"].as_str().unwrap_or_default().to_owned(),
            payload: match &value["payload"] {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            },
        })
    }

    /// Waits until every `{"n": id}` in `acked` arrived (failing the test with the missing
    /// ids otherwise); returns the arrival order and the number of duplicates.
    pub fn expect_all(&mut self, acked: &[u64], timeout: Duration) -> (Vec<u64>, usize) {
        let wanted: std::collections::BTreeSet<u64> = acked.iter().copied().collect();
        let mut seen = std::collections::BTreeSet::new();
        let received = self.collect_until(timeout, |received| {
            if let Some(last) = received.last() {
                seen.extend(numbers(std::slice::from_ref(last)));
            }
            wanted.is_subset(&seen)
        });
        let arrivals = numbers(&received);
        let missing: Vec<&u64> = wanted.difference(&seen).collect();
        assert!(
            missing.is_empty(),
            "{} acked messages lost: {missing:?}",
            missing.len()
        );
        let duplicates = arrivals.len() - seen.len();
        (arrivals, duplicates)
    }

    /// Collects messages until `done` says so or `timeout` passes.
    pub fn collect_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        let mut received = Vec::new();
        while !done(&received) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if let Some(message) = self.next_message(left.min(Duration::from_millis(200)))
                && message.topic != "relay-test/probe"
            {
                received.push(message);
            }
        }
        received
    }
}

/// The daemon under test.
pub struct Daemon {
    pub process: Process,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.process.pid() as u32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn connect(&self) -> Client {
        Client::connect(&self.socket)
    }

    /// The `status` object.
    pub fn status(&self) -> Value {
        let mut client = self.connect();
        client.send_line(r#"{"op":"status"}"#);
        let answer = client
            .read_answer(Duration::from_secs(5))
            .expect("status answer");
        answer["status"].clone()
    }

    /// Waits until `status` satisfies `check`.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            if check(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last status {status}\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.process.signal(libc::SIGTERM);
        self.process
            .wait_timeout(Duration::from_secs(30))
            .unwrap_or_else(|| panic!("daemon did not stop:\n{}", self.log_text()))
    }
}

/// A local app on the daemon's socket.
pub struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path).expect("connect to daemon socket");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        Client { stream, reader }
    }

    pub fn send_line(&mut self, line: &str) {
        self.stream.write_all(line.as_bytes()).expect("write");
        self.stream.write_all(b"\n").expect("write");
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    pub fn read_answer(&mut self, timeout: Duration) -> Option<Value> {
        self.stream
            .set_read_timeout(Some(timeout))
            .expect("timeout");
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => serde_json::from_str(&line).ok(),
        }
    }

    pub fn read_to_end(mut self) -> String {
        let mut text = String::new();
        let _ = self.reader.read_to_string(&mut text);
        text
    }
}

/// A test CA and a server certificate for 127.0.0.1 / localhost.
fn make_certificates(dir: &Path) {
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

/// The message numbers in payloads of the form `{"n": <number>}`, in arrival order.
/// The `n` of every reading received, in order; a batch (a JSON array) counts element by element.
pub fn numbers(received: &[Received]) -> Vec<u64> {
    let mut numbers = Vec::new();
    for payload in received
        .iter()
        .filter_map(|r| serde_json::from_str::<Value>(&r.payload).ok())
    {
        match payload {
            Value::Array(readings) => {
                numbers.extend(readings.iter().filter_map(|reading| reading["n"].as_u64()))
            }
            reading => numbers.extend(reading["n"].as_u64()),
        }
    }
    numbers
}

/// A local app that keeps writing `{"n": i}` messages (with `id` = i) at a steady rate, one
/// request and answer at a time, reconnecting whenever the daemon is gone. It records the ids
/// the daemon answered `ok`: the ones that must arrive.
pub struct Streamer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<Vec<u64>>>,
}

impl Streamer {
    pub fn start(socket: PathBuf, topic: &str, per_second: u32) -> Streamer {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let topic = topic.to_owned();
        let pause = Duration::from_secs(1) / per_second.max(1);
        let handle = std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut client: Option<Client> = None;
            let mut n = 0u64;
            while !stopped.load(Ordering::SeqCst) {
                let Some(connected) = client.as_mut() else {
                    client = UnixStream::connect(&socket).ok().map(|stream| Client {
                        reader: BufReader::new(stream.try_clone().expect("clone")),
                        stream,
                    });
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                let line = format!(r#"{{"topic":{topic:?},"payload":{{"n":{n}}},"id":{n}}}"#);
                let sent = connected
                    .stream
                    .write_all(format!("{line}\n").as_bytes())
                    .is_ok();
                match sent
                    .then(|| connected.read_answer(Duration::from_secs(10)))
                    .flatten()
                {
                    Some(answer) if answer["ok"] == true && answer["id"] == n => acked.push(n),
                    Some(_) => {}
                    None => client = None,
                }
                n += 1;
                std::thread::sleep(pause);
            }
            acked
        });
        Streamer {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops writing; returns the acknowledged ids.
    pub fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Writes `{"n": i}` for every i in `range` on one connection without waiting in between (a
/// writer thread), and returns the ids answered `ok` once every answer is in.
pub fn send_many(socket: &Path, topic: &str, range: std::ops::Range<u64>) -> Vec<u64> {
    let stream = UnixStream::connect(socket).expect("connect");
    let mut writer = stream.try_clone().expect("clone");
    let topic = topic.to_owned();
    let lines = range.clone();
    let sender = std::thread::spawn(move || {
        let mut buffer = Vec::new();
        for n in lines {
            buffer.extend_from_slice(
                format!("{{\"topic\":{topic:?},\"payload\":{{\"n\":{n}}},\"id\":{n}}}\n")
                    .as_bytes(),
            );
            if buffer.len() > 64 * 1024 {
                writer.write_all(&buffer).expect("write");
                buffer.clear();
            }
        }
        writer.write_all(&buffer).expect("write");
    });
    let mut reader = BufReader::new(stream);
    let mut acked = Vec::new();
    for _ in range {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        let answer: Value = serde_json::from_str(&line).expect("answer json");
        if answer["ok"] == true {
            acked.push(answer["id"].as_u64().expect("id"));
        }
    }
    sender.join().expect("writer");
    acked
}

/// A config for a daemon without any cloud (AWS unreachable): it runs offline and keeps
/// accepting into its spool. `extra` is appended (e.g. a `[spool]` or `[log]` section).
pub fn offline_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("config.toml");
    let text = format!(
        "[aws]\nendpoint_url = \"http://127.0.0.1:1\"\n[identity]\n\
         identity_pool_id = \"us-east-1:00000000-0000-0000-0000-000000000000\"\n\
         secret_id = \"offline\"\n[socket]\npath = {:?}\n[state]\ndir = {:?}\n{extra}",
        dir.join("relay.sock"),
        dir.join("state"),
    );
    std::fs::write(&path, text).expect("write config");
    path
}

/// Edits a config written by [`Cloud::config`] in place, e.g. to set the publish quotas that
/// the harness lifts (`("max_publishes_per_second = 0", "max_publishes_per_second = 50")`).
pub fn rewrite_config(config: &Path, replacements: &[(&str, &str)]) {
    let mut text = std::fs::read_to_string(config).expect("read config");
    for (from, to) in replacements {
        assert!(text.contains(from), "{from:?} not in {}", config.display());
        text = text.replace(from, to);
    }
    std::fs::write(config, text).expect("write config");
}

/// The PUBLISH packets that relays (client ids are Cognito identity ids) sent on topics ending
/// in `topic`, per epoch second of the broker's log, as (publishes, payload bytes): counted
/// where IoT Core would count them. `log` is `broker_log()` or a tail of it.
pub fn publishes_per_second(log: &str, topic: &str) -> std::collections::BTreeMap<u64, (u64, u64)> {
    let topic = format!("/{topic}'");
    let mut per_second = std::collections::BTreeMap::<u64, (u64, u64)>::new();
    for line in log.lines() {
        if !line.contains("Received PUBLISH from us-east-1:") || !line.contains(&topic) {
            continue;
        }
        let second = line
            .split(':')
            .next()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        // "... (123 bytes))"
        let bytes: u64 = line
            .rsplit('(')
            .next()
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let entry = per_second.entry(second).or_default();
        entry.0 += 1;
        entry.1 += bytes;
    }
    per_second
}

/// A process's peak resident memory (`VmHWM`), in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A test proxy's log: one JSON object per line (a line being written is skipped).
fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// A child process (a daemon started by hand) killed if the test ends before it stops it.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
