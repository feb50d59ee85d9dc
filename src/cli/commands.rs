//! What each command does, from parsed arguments to an exit code.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use crate::cli::args::{Command, SocketArgs};
use crate::cli::exit::{EXIT_FAILURE, EXIT_USAGE, fail};
use crate::cli::{run, socket_client as client, stack_config as stack};
use crate::config;
use crate::identity::device;

/// Runs one command to its end and says how it went (its exit code).
pub fn dispatch(command: Command) -> ExitCode {
    match command {
        Command::Run { config } => run::run_daemon(&config),
        Command::CheckConfig { config } => check_config(&config),
        Command::Doctor { config, json } => doctor(&config, json),
        Command::ConfigFromStack { file } => config_from_stack(&file),
        Command::Send {
            socket,
            topic,
            qos,
            ttl,
            priority,
            conflate,
            json,
            payload,
            timeout,
        } => {
            let framing = match topic {
                Some(topic) if !json => client::Framing::Message {
                    topic,
                    qos,
                    options: client::MessageOptions {
                        ttl,
                        priority,
                        conflate,
                    },
                },
                _ => client::Framing::Json,
            };
            match socket_path(&socket) {
                Ok(path) => send(&path, framing, payload, timeout),
                Err(code) => code,
            }
        }
        Command::DeadLetters {
            action,
            socket,
            json,
            timeout,
        } => match socket_path(&socket) {
            Ok(path) => print_answer(
                client::dead_letters(&path, action.as_str(), timeout),
                json,
                client::format_dead_letters,
            ),
            Err(code) => code,
        },
        Command::Subscribe {
            socket,
            count,
            filters,
        } => match socket_path(&socket) {
            Ok(path) => subscribe(&path, &filters, count),
            Err(code) => code,
        },
        Command::Status {
            socket,
            json,
            timeout,
        } => match socket_path(&socket) {
            Ok(path) => print_answer(client::status(&path, timeout), json, client::format_status),
            Err(code) => code,
        },
    }
}

/// The socket a client command uses: `--socket`, else `socket.path` from the config. An
/// absent config means the default socket, and so does an unreadable one at the default path
/// (an app's user need not read it); a config named with `--config` that exists must load
/// (exit 2 otherwise).
fn socket_path(args: &SocketArgs) -> Result<PathBuf, ExitCode> {
    if let Some(socket) = &args.socket {
        return Ok(socket.clone());
    }
    let named = args.config != Path::new(config::DEFAULT_CONFIG_PATH) && args.config.exists();
    match run::load_config(&args.config) {
        Ok(config) => Ok(config.socket.path),
        Err(error) if named => Err(fail(EXIT_USAGE, error)),
        Err(_) => Ok(config::SocketConfig::default().path),
    }
}

/// Prints the effective config, secrets masked; exit 2 when it does not load, 1 when the
/// installed unit's sandbox would not let the daemon write a path it names.
fn check_config(path: &Path) -> ExitCode {
    match run::load_config(path) {
        Ok(config) => {
            print!("{}", config.to_redacted_toml());
            println!("{}", registration_note(&config.identity));
            let findings = installed_unit_sandbox()
                .map(|sandbox| sandbox.findings(&config))
                .unwrap_or_default();
            for finding in &findings {
                eprintln!("check-config: {finding}");
            }
            if findings.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILURE)
            }
        }
        Err(error) => fail(EXIT_USAGE, error),
    }
}

/// For `check-config`: the user name this device registers as on a self-register stack
/// (the mode itself is in the stack's secret, read at start; `status` shows it).
fn registration_note(identity: &config::IdentityConfig) -> String {
    match device::device_name(&identity.device_name, &identity.identity_pool_id) {
        Ok(name) if identity.device_name.is_empty() => format!(
            "# self-register stacks: this device registers as {name:?} (derived from {}); shared-user stacks ignore it",
            device::MACHINE_ID
        ),
        Ok(name) => format!(
            "# self-register stacks: this device registers as {name:?}; shared-user stacks ignore it"
        ),
        Err(error) => format!("# self-register stacks: {error}"),
    }
}

/// Walks the onboarding chain (see `doctor.rs`); exit 0 all passed, 1 a step failed, 2 an
/// invalid config.
fn doctor(path: &Path, json: bool) -> ExitCode {
    let config = match run::load_config(path) {
        Ok(config) => config,
        Err(error) => return fail(EXIT_USAGE, error),
    };
    let proxy = match config::Proxy::resolve(&config.network, |name| std::env::var(name).ok()) {
        Ok(proxy) => proxy,
        Err(error) => return fail(EXIT_USAGE, error),
    };
    let findings = installed_unit_sandbox()
        .map(|sandbox| sandbox.findings(&config))
        .unwrap_or_default();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(EXIT_FAILURE, format!("cannot start the runtime: {error}")),
    };
    let report = runtime.block_on(crate::cli::doctor::diagnose(
        &config,
        path,
        &findings,
        proxy.as_ref(),
    ));
    if json {
        match serde_json::to_string(&report) {
            Ok(text) => println!("{text}"),
            Err(error) => return fail(EXIT_FAILURE, error),
        }
    } else {
        print!("{}", report.to_text());
    }
    if report.failed() {
        ExitCode::from(EXIT_FAILURE)
    } else {
        ExitCode::SUCCESS
    }
}

/// The installed unit's sandbox (its drop-ins included), when systemd knows the unit.
fn installed_unit_sandbox() -> Option<config::sandbox::UnitSandbox> {
    let output = std::process::Command::new("systemctl")
        .args(["show", "iot-cognito-relay.service", "-p", "LoadState"])
        .args([
            "-p",
            "StateDirectory",
            "-p",
            "RuntimeDirectory",
            "-p",
            "ReadWritePaths",
        ])
        .args(["-p", "PrivateTmp", "-p", "ProtectSystem"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || !text.lines().any(|line| line == "LoadState=loaded") {
        return None;
    }
    config::sandbox::UnitSandbox::from_show(&text)
}

/// Prints a config.toml built from `describe-stacks` output.
fn config_from_stack(file: &Path) -> ExitCode {
    let converted = std::fs::read_to_string(file)
        .map_err(|error| error.to_string())
        .and_then(|text| stack::config_from_stack(&text).map_err(|error| error.to_string()));
    match converted {
        Ok(config) => {
            print!("{config}");
            ExitCode::SUCCESS
        }
        Err(error) => fail(EXIT_USAGE, format!("{}: {error}", file.display())),
    }
}

/// Sends `payload`, or one message per stdin line, and waits for every answer.
fn send(
    socket: &Path,
    framing: client::Framing,
    payload: Option<String>,
    timeout: Duration,
) -> ExitCode {
    let payloads = match payload {
        Some(text) => client::Payloads::One(text),
        None => {
            if std::io::stdin().is_terminal() {
                eprintln!("reading one message per line from stdin (Ctrl-D ends)");
            }
            client::Payloads::Lines(Box::new(std::io::BufReader::new(std::io::stdin())))
        }
    };
    match client::send(socket, framing, payloads, timeout) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(refused) => fail(EXIT_FAILURE, format!("{refused} message(s) refused")),
        Err(error) => fail(EXIT_FAILURE, error),
    }
}

/// Prints messages matching `filters` and acks each after printing; a bad filter exits 2.
fn subscribe(socket: &Path, filters: &[String], count: Option<u64>) -> ExitCode {
    match client::subscribe(socket, filters, count, &mut std::io::stdout().lock()) {
        Ok(_) => ExitCode::SUCCESS,
        Err(client::SubscribeError::Refused { code, message }) if code == "invalid_topic" => {
            fail(EXIT_USAGE, format!("{code}: {message}"))
        }
        Err(error) => fail(EXIT_FAILURE, error),
    }
}

/// The daemon's answer as JSON (`--json`) or formatted for people.
fn print_answer(
    answer: Result<Value, client::SocketClientError>,
    json: bool,
    format: fn(&Value) -> String,
) -> ExitCode {
    match answer {
        Ok(answer) if json => {
            println!("{answer}");
            ExitCode::SUCCESS
        }
        Ok(answer) => {
            print!("{}", format(&answer));
            ExitCode::SUCCESS
        }
        Err(error) => fail(EXIT_FAILURE, error),
    }
}
