//! `run`: wires the tasks together and drains them on shutdown.
//!
//! ```text
//! socket → ingest → spool → publisher → MQTT/WSS → IoT Core
//!                             ↑
//!        identity manager (credentials via watch)
//! ```

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::config::{Config, PublishConfig};
use crate::identity::IdentityManager;
use crate::ingest::raw::RawServer;
use crate::ingest::server::{self, BindError, IngestServer};
use crate::ops::heartbeat;
use crate::ops::logging::LogControl;
use crate::ops::notify;
use crate::ops::status::StatusSource;
use crate::publish::connection::Publisher;
use crate::publish::mqtt::{self, MqttSettings, TlsError};
use crate::spool::{self, Spool};
use crate::topic::TopicRules;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("state dir {path}: {source}")]
    StateDir {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "state dir {path} is writable by every user (mode {mode:04o}); refusing to use it (fix with chmod 700)"
    )]
    InsecureStateDir { path: String, mode: u32 },
    #[error(transparent)]
    Spool(#[from] spool::OpenError),
    #[error(transparent)]
    Socket(#[from] BindError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("the {0} stopped unexpectedly")]
    TaskFailed(&'static str),
    #[error(
        "another iot-cognito-relay is already running with state dir {0} (it holds daemon.lock); not starting a second one"
    )]
    AlreadyRunning(String),
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: String,
        source: std::io::Error,
    },
}

/// Held (flock, exclusive) by the one daemon that uses a state dir: two publishers sharing a
/// spool and a client id would knock each other off the broker.
pub const LOCK_FILE: &str = "daemon.lock";

impl DaemonError {
    /// A fault in the config or in what it names (state dir, socket path, CA bundle), which a
    /// restart cannot cure: `run` exits 2 for these, and the unit's `RestartPreventExitStatus=2`
    /// stops systemd's restart loop. Anything else exits 1 and is restarted.
    pub fn is_config_error(&self) -> bool {
        match self {
            DaemonError::StateDir { .. }
            | DaemonError::InsecureStateDir { .. }
            | DaemonError::Tls(_)
            | DaemonError::Socket(BindError::Io { .. })
            | DaemonError::Socket(BindError::NotSocket(_)) => true,
            DaemonError::Socket(BindError::InUse(_))
            | DaemonError::AlreadyRunning(_)
            | DaemonError::Lock { .. }
            | DaemonError::Spool(_)
            | DaemonError::TaskFailed(_) => false,
        }
    }
}

/// What the process around the daemon can do to it while it runs.
pub struct Controls {
    /// New configs to apply (SIGHUP): what can change live does, the rest waits for a restart.
    pub reloads: mpsc::Receiver<Config>,
    pub log: Option<LogControl>,
}

/// Runs the daemon until `shutdown` resolves, then drains for up to `shutdown.drain_timeout`.
pub async fn run(
    config: Config,
    mut controls: Controls,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    // Held until `run` returns; the kernel releases it if the process dies.
    let _instance_lock = prepare_state_dir(&config.state.dir)?;
    let spool = Spool::open_with_window(
        &config.state.dir,
        config.spool.max_bytes.0,
        config.spool.on_full,
        config.spool.commit_window,
    )?;
    let tls = mqtt::tls_config(&config.mqtt.ca_file)?;
    let listener = server::bind(&config.socket.path, config.socket.mode_bits()).await?;
    let mut raw_listeners = Vec::new();
    for raw in &config.socket.raw {
        raw_listeners.push((
            server::bind(&raw.path, config.socket.mode_bits()).await?,
            raw.clone(),
        ));
    }

    let base =
        crate::identity::aws::base_config(&config.aws.region, &config.aws.endpoint_url).await;
    let (identity, identity_watch) =
        IdentityManager::new(base, config.identity.clone(), config.state.dir.clone());
    let rules = Arc::new(TopicRules::new(
        &config.mqtt.topic_prefix,
        &config.identity.identity_pool_id,
        &config.aws.region,
    ));
    let settings = MqttSettings {
        config: config.mqtt.clone(),
        region: config.aws.region.clone(),
        tls,
        max_in_flight: config.publish.max_in_flight,
    };
    let (publish_limits, limits_rx) = watch::channel(config.publish.clone());
    let (publisher, link, counters) = Publisher::new(
        spool.clone(),
        identity_watch.sessions.clone(),
        identity_watch.refusals.clone(),
        settings,
        rules.clone(),
        limits_rx,
        &config.batch,
    );
    let (stopping_tx, stopping) = watch::channel(false);
    let status = StatusSource {
        link,
        stopping: stopping.clone(),
        identity: identity_watch,
        spool: spool.stats(),
        counters,
    };
    let limits = Arc::new(config.socket.clone());
    let mut pulses = Vec::new();
    let mut raw_tasks = tokio::task::JoinSet::new();
    for (listener, raw) in raw_listeners {
        let (heartbeat, pulse) = heartbeat::channel("raw socket server");
        pulses.push(pulse);
        raw_tasks.spawn(
            RawServer {
                listener,
                raw,
                limits: limits.clone(),
                spool: spool.clone(),
                stopping: stopping.clone(),
                heartbeat,
            }
            .run(),
        );
    }
    let (ingest_heartbeat, pulse) = heartbeat::channel("socket server");
    pulses.push(pulse);
    let (identity_heartbeat, pulse) = heartbeat::channel("identity manager");
    pulses.push(pulse);
    let (publisher_heartbeat, pulse) = heartbeat::channel("publisher");
    pulses.push(pulse);
    let server = IngestServer {
        listener,
        limits,
        spool: spool.clone(),
        rules,
        status: status.clone(),
        stopping: stopping.clone(),
        heartbeat: ingest_heartbeat,
    };

    let stats = *spool.stats().borrow();
    tracing::info!(
        socket = %config.socket.path.display(),
        spool_messages = stats.messages,
        identity_id = identity.cached_identity_id().as_deref().unwrap_or("(none yet)"),
        "ready"
    );
    let mut identity_task = tokio::spawn(identity.run(identity_heartbeat));
    let mut ingest_task = tokio::spawn(server.run());
    let mut publisher_task = tokio::spawn(publisher.run(stopping, publisher_heartbeat));
    notify::ready(&status);
    let supervisor = tokio::spawn(notify::supervise(status.clone(), spool.clone(), pulses));

    // Each task runs until shutdown; one that ends earlier has failed, and the daemon exits
    // non-zero so that systemd restarts it.
    tokio::pin!(shutdown);
    let mut running = config.clone();
    let failed = loop {
        tokio::select! {
            _ = &mut shutdown => break None,
            Some(new) = controls.reloads.recv() => {
                reload(&mut running, new, controls.log.as_ref(), &publish_limits, &spool).await;
                notify::ready(&status);
            }
            result = &mut publisher_task => break Some(("publisher", result)),
            result = &mut identity_task => break Some(("identity manager", result)),
            result = &mut ingest_task => break Some(("socket server", result)),
            // Like the others: a raw socket that stops serving is a failure, not a quiet loss.
            Some(result) = raw_tasks.join_next() => break Some(("raw socket server", result)),
        }
    };
    if let Some((task, result)) = &failed {
        tracing::error!(
            task,
            ?result,
            "a task stopped unexpectedly; stopping the daemon"
        );
    }

    let _ = stopping_tx.send(true);
    notify::stopping();
    let pending = spool.stats().borrow().messages;
    tracing::info!(
        state = "stopping",
        pending,
        drain_timeout = %humantime::format_duration(config.shutdown.drain_timeout),
        "stopping: new messages are refused; delivering what is pending"
    );
    if !publisher_task.is_finished()
        && tokio::time::timeout(config.shutdown.drain_timeout, &mut publisher_task)
            .await
            .is_err()
    {
        publisher_task.abort();
    }
    ingest_task.abort();
    identity_task.abort();
    supervisor.abort();
    raw_tasks.abort_all();
    // What is still held in memory (write-behind) goes to disk before the process ends.
    spool.flush().await;
    let _ = std::fs::remove_file(&config.socket.path);
    for raw in &config.socket.raw {
        let _ = std::fs::remove_file(&raw.path);
    }
    let left = spool.stats().borrow().messages;
    tracing::info!(left_in_spool = left, "stopped");
    match failed {
        Some((task, _)) => Err(DaemonError::TaskFailed(task)),
        None => Ok(()),
    }
}

/// glibc gives each thread that meets contention its own malloc arena (up to 8 per core) and
/// keeps freed memory in each: a busy multi-threaded daemon's RSS grows by megabytes for
/// nothing. Two arenas are plenty for this daemon's few threads. Call before starting them.
pub fn limit_allocator_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator tunable; it is called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Applies what can change live (log level, publish quotas) and names what waits for a restart.
async fn reload(
    running: &mut Config,
    new: Config,
    log: Option<&LogControl>,
    publish_limits: &watch::Sender<PublishConfig>,
    spool: &Spool,
) {
    notify::reloading();
    let mut applied = Vec::new();
    if new.log.level != running.log.level {
        match log.map(|log| log.set_level(&new.log.level)) {
            Some(Err(reason)) => tracing::warn!(%reason, "log.level not changed"),
            _ => applied.push(format!(
                "log.level {:?} -> {:?}",
                running.log.level, new.log.level
            )),
        }
    }
    let (old, fresh) = (&running.publish, &new.publish);
    if old.max_publishes_per_second != fresh.max_publishes_per_second
        || old.max_bytes_per_second != fresh.max_bytes_per_second
    {
        applied.push(format!(
            "publish.max_publishes_per_second {} -> {}, publish.max_bytes_per_second {} -> {}",
            old.max_publishes_per_second,
            fresh.max_publishes_per_second,
            old.max_bytes_per_second,
            fresh.max_bytes_per_second
        ));
        publish_limits.send_replace(fresh.clone());
    }
    let (old, fresh) = (&running.spool, &new.spool);
    if old.max_bytes != fresh.max_bytes
        || old.on_full != fresh.on_full
        || old.commit_window != fresh.commit_window
    {
        applied.push(format!(
            "spool.max_bytes {} -> {}, spool.on_full {:?} -> {:?}, spool.commit_window {} -> {}",
            old.max_bytes,
            fresh.max_bytes,
            old.on_full,
            fresh.on_full,
            humantime::format_duration(old.commit_window),
            humantime::format_duration(fresh.commit_window)
        ));
        spool
            .set_limits(fresh.max_bytes.0, fresh.on_full, fresh.commit_window)
            .await;
    }
    // Everything else is compared with the live parts taken out.
    let without_live = |config: &Config| {
        let mut rest = config.clone();
        rest.log = Default::default();
        rest.spool = Default::default();
        rest.publish.max_publishes_per_second = 0;
        rest.publish.max_bytes_per_second = crate::config::ByteSize(0);
        rest.to_redacted_toml()
    };
    let needs_restart = without_live(&new) != without_live(running);
    tracing::info!(
        changed = %if applied.is_empty() { "nothing live".to_owned() } else { applied.join("; ") },
        needs_restart,
        "configuration reloaded{}",
        if needs_restart { "; other changes take effect at the next restart" } else { "" }
    );
    running.log = new.log.clone();
    running.publish.max_publishes_per_second = new.publish.max_publishes_per_second;
    running.publish.max_bytes_per_second = new.publish.max_bytes_per_second;
    running.spool = new.spool.clone();
}

/// Creates the state dir (mode 0700): it holds the spool and the identity cache. One that every
/// user could write to is refused: someone may have planted a spool or an identity there.
/// Returns the instance lock; a second daemon on the same dir fails here, before it changes
/// anything (the lock file already exists then).
fn prepare_state_dir(dir: &Path) -> Result<std::fs::File, DaemonError> {
    use std::os::unix::fs::MetadataExt;
    let error = |source| DaemonError::StateDir {
        path: dir.display().to_string(),
        source,
    };
    if let Ok(meta) = std::fs::metadata(dir)
        && meta.mode() & 0o002 != 0
    {
        return Err(DaemonError::InsecureStateDir {
            path: dir.display().to_string(),
            mode: meta.mode() & 0o7777,
        });
    }
    std::fs::create_dir_all(dir).map_err(error)?;
    let lock = lock_instance(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(error)?;
    Ok(lock)
}

/// Takes the exclusive, non-blocking `flock` on `<dir>/daemon.lock`.
fn lock_instance(dir: &Path) -> Result<std::fs::File, DaemonError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(LOCK_FILE);
    let lock_error = |source| DaemonError::Lock {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(lock_error)?;
    // SAFETY: flock on a file descriptor this function owns; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let error = std::io::Error::last_os_error();
        return Err(match error.raw_os_error() {
            Some(libc::EWOULDBLOCK) => DaemonError::AlreadyRunning(dir.display().to_string()),
            _ => lock_error(error),
        });
    }
    Ok(file)
}
