//! The real daemon binary under test: its config, process and logs.

use super::*;

impl Cloud {
    /// A config for a daemon in `dir`. `classic` chooses the onboarding flow.
    pub fn config(&self, dir: &Path, classic: bool, extra: &str) -> PathBuf {
        self.config_via(dir, classic, &self.daemon_endpoint(), extra)
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
             [mqtt]\nurl = {mqtt:?}\nca_file = {ca:?}\n\n\
             [socket]\npath = {socket:?}\n\n[state]\ndir = {state:?}\n\n\
             [publish]\nmax_publishes_per_second = 0\nmax_bytes_per_second = \"0\"\n\n\
             [log]\nlevel = \"debug\"\n{extra}",
            pool = self.account.identity_pool_id,
            secret = self.account.secret_id,
            mqtt = self.mqtt_url(),
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
        let mut command = self.namespace.command(daemon_binary());
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

/// The binary under test: this build's, or `IOT_COGNITO_RELAY_TEST_BINARY` (`make fleet-sim`
/// runs a release build this way without rebuilding the test profile in release).
pub fn daemon_binary() -> PathBuf {
    std::env::var_os("IOT_COGNITO_RELAY_TEST_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_iot-cognito-relay")))
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

    pub fn connect(&self) -> LocalApp {
        LocalApp::connect(&self.socket)
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
