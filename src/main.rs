//! The command line: parses arguments and dispatches into the library.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use iot_cognito_relay::cli::args::{Cli, Command};
use iot_cognito_relay::cli::{socket_client as client, stack_config as stack};
use iot_cognito_relay::ops::logging;
use iot_cognito_relay::{config, daemon};

/// Exit codes of SPEC.md.
const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(&config),
        Command::CheckConfig { config } => match config::Config::load(&config) {
            Ok(config) => {
                print!("{}", config.to_redacted_toml());
                println!("{}", config.registration_note());
                ExitCode::SUCCESS
            }
            Err(error) => fail(EXIT_USAGE, error),
        },
        Command::ConfigFromStack { file } => {
            let text = match std::fs::read_to_string(&file) {
                Ok(text) => text,
                Err(error) => return fail(EXIT_USAGE, format!("{}: {error}", file.display())),
            };
            match stack::config_from_stack(&text) {
                Ok(config) => {
                    print!("{config}");
                    ExitCode::SUCCESS
                }
                Err(error) => fail(EXIT_USAGE, format!("{}: {error}", file.display())),
            }
        }
        Command::Send {
            socket,
            topic,
            qos,
            json,
            payload,
            timeout,
        } => {
            let framing = match topic {
                Some(topic) if !json => client::Framing::Message { topic, qos },
                _ => client::Framing::Json,
            };
            let payloads = match &payload {
                Some(text) => client::Payloads::One(text.clone()),
                None => {
                    if std::io::stdin().is_terminal() {
                        eprintln!("reading one message per line from stdin (Ctrl-D ends)");
                    }
                    client::Payloads::Lines(Box::new(std::io::BufReader::new(std::io::stdin())))
                }
            };
            match client::send(&socket, framing, payloads, timeout) {
                Ok(0) => ExitCode::SUCCESS,
                Ok(refused) => fail(EXIT_FAILURE, format!("{refused} message(s) refused")),
                Err(error) => fail(EXIT_FAILURE, error),
            }
        }
        Command::DeadLetters {
            action,
            socket,
            json,
            timeout,
        } => match client::dead_letters(&socket, action.as_str(), timeout) {
            Ok(answer) if json => {
                println!("{answer}");
                ExitCode::SUCCESS
            }
            Ok(answer) => {
                print!("{}", client::format_dead_letters(&answer));
                ExitCode::SUCCESS
            }
            Err(error) => fail(EXIT_FAILURE, error),
        },
        Command::Status {
            socket,
            json,
            timeout,
        } => match client::status(&socket, timeout) {
            Ok(status) if json => {
                println!("{status}");
                ExitCode::SUCCESS
            }
            Ok(status) => {
                print!("{}", client::format_status(&status));
                ExitCode::SUCCESS
            }
            Err(error) => fail(EXIT_FAILURE, error),
        },
    }
}

fn run(path: &std::path::Path) -> ExitCode {
    let config = match config::Config::load(path) {
        Ok(config) => config,
        Err(error) => return fail(EXIT_USAGE, error),
    };
    let log = logging::init(&config.log.level);
    daemon::limit_allocator_arenas();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(EXIT_FAILURE, format!("cannot start the runtime: {error}")),
    };
    let daemon = async {
        // Every handler is in place before the daemon binds its socket (see shutdown_signal).
        let shutdown = shutdown_signal();
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        let (reload_tx, reloads) = tokio::sync::mpsc::channel(4);
        tokio::spawn(reload_on_sighup(hangup, path.to_owned(), reload_tx));
        let controls = daemon::Controls {
            reloads,
            log: Some(log),
        };
        daemon::run(config, controls, shutdown).await
    };
    let Err(error) = runtime.block_on(daemon) else {
        return ExitCode::SUCCESS;
    };
    let code = if error.is_config_error() {
        EXIT_USAGE
    } else {
        EXIT_FAILURE
    };
    // One line: a structured journal entry under systemd, else the plain stderr line (the log
    // also goes to stderr then, and would say it twice).
    if logging::stderr_is_journal() {
        tracing::error!(%error, "cannot start");
        ExitCode::from(code)
    } else {
        fail(code, error)
    }
}

/// Resolves on SIGTERM or SIGINT.
/// The handlers are installed at the call, before the daemon binds its socket: a SIGTERM that
/// arrives during start-up is then a clean stop, not the default action's kill.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            // Without signal handlers the daemon can still be killed; it just cannot drain.
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}

/// On SIGHUP (systemd's `reload`), reads the config file again and hands it to the daemon;
/// a config that does not load is logged and the running one kept.
async fn reload_on_sighup(
    hangup: std::io::Result<tokio::signal::unix::Signal>,
    path: std::path::PathBuf,
    reloads: tokio::sync::mpsc::Sender<config::Config>,
) {
    let Ok(mut hup) = hangup else {
        tracing::warn!("cannot handle SIGHUP; reload needs a restart");
        return;
    };
    while hup.recv().await.is_some() {
        match config::Config::load(&path) {
            Ok(config) => {
                if reloads.send(config).await.is_err() {
                    return;
                }
            }
            Err(error) => tracing::error!(%error, "reload failed; keeping the running config"),
        }
    }
}

fn fail(code: u8, error: impl std::fmt::Display) -> ExitCode {
    eprintln!("iot-cognito-relay: {error}");
    ExitCode::from(code)
}
