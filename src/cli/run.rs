//! `run`: the daemon in the foreground, as systemd starts it: the runtime, signal handlers
//! (SIGTERM/SIGINT stop, SIGHUP reloads) and the exit code of a failed start.

use std::path::Path;
use std::process::ExitCode;

use crate::cli::exit::{EXIT_FAILURE, EXIT_USAGE, fail};
use crate::config::{Config, ConfigError};
use crate::daemon;
use crate::ops::logging;
use crate::publish::tls::tls_config;

/// The config as `run` uses it, for every command that reads it: loaded and validated, and
/// its CA bundle readable. The bundle is the TLS side's to load, not config validation's; a
/// broken one is reported like any invalid key (exit 2), before anything starts.
pub(super) fn load_config(path: &Path) -> Result<Config, ConfigError> {
    let config = Config::load(path)?;
    if !config.mqtt.ca_file.is_empty()
        && let Err(error) = tls_config(&config.mqtt.ca_file)
    {
        return Err(ConfigError::Invalid {
            path: path.to_owned(),
            key: "mqtt.ca_file",
            reason: error.to_string(),
        });
    }
    Ok(config)
}

/// Loads the config, runs the daemon until a signal stops it, and maps a failure to an exit
/// code (2 for what a restart cannot cure).
pub fn run_daemon(path: &Path) -> ExitCode {
    let config = match load_config(path) {
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
    reloads: tokio::sync::mpsc::Sender<Config>,
) {
    let Ok(mut hup) = hangup else {
        tracing::warn!("cannot handle SIGHUP; reload needs a restart");
        return;
    };
    while hup.recv().await.is_some() {
        match load_config(&path) {
            Ok(config) => {
                if reloads.send(config).await.is_err() {
                    return;
                }
            }
            Err(error) => tracing::error!(%error, "reload failed; keeping the running config"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_ca_bundle_is_a_config_error_of_its_key_found_at_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "no certificate here\n").expect("write ca");
        let path = dir.path().join("config.toml");
        let identity = "[identity]\nidentity_pool_id = \"eu-west-1:0b7c5a57-6a4f-4a62-9d36-3f1c0e3b6a11\"\nsecret_id = \"s\"\n";
        let with_ca = format!(
            "{identity}[mqtt]\nca_file = {:?}\n",
            ca.display().to_string()
        );
        std::fs::write(&path, with_ca).expect("write config");
        assert!(
            Config::load(&path).is_ok(),
            "config validation does not read the bundle"
        );
        let error = load_config(&path).expect_err("a bundle without a certificate");
        assert!(
            matches!(
                &error,
                ConfigError::Invalid {
                    key: "mqtt.ca_file",
                    ..
                }
            ),
            "{error}"
        );
        assert!(error.to_string().contains("ca.pem"), "{error}");
        std::fs::write(&path, identity).expect("write config");
        assert!(load_config(&path).is_ok(), "the built-in roots");
    }
}
