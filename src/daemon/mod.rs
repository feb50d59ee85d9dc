//! `run`: opens what the daemon uses, starts its tasks under one supervisor, applies reloads,
//! and drains on shutdown.
//!
//! ```text
//! socket → ingest → spool → publisher → MQTT/WSS → IoT Core
//!                             ↑
//!        identity manager (credentials via watch)
//! ```

mod file_limit;
mod reload;
mod state_dir;
mod supervisor;

use std::future::Future;
use std::sync::Arc;

use crate::identity::aws::Api;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};

use crate::config::{Config, Proxy, PublishConfig, RawSocketConfig, SpoolConfig};
use crate::downlink::Downlink;
use crate::heartbeat;
use crate::identity::IdentityManager;
use crate::identity::aws::SdkSetupError;
use crate::ingest::raw::RawServer;
use crate::ingest::server::{self, BindError, IngestServer};
use crate::ops::health::{HEALTH_QUEUE, HealthReporter};
use crate::ops::logging::LogControl;
use crate::ops::notify;
use crate::ops::status::StatusSource;
use crate::publish::inbound::Inbound;
use crate::publish::mqtt::MqttSettings;
use crate::publish::publisher::Publisher;
use crate::publish::tls::{TlsError, proxy_tls_config, tls_config};
use crate::spool::{self, Spool};
use crate::topic::TopicRules;
use reload::{Live, reload};
use state_dir::prepare_state_dir;
use supervisor::{Supervisor, Task};

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
    Inbox(#[from] crate::downlink::inbox::InboxError),
    #[error(transparent)]
    Socket(#[from] BindError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Proxy(#[from] crate::config::ProxyError),
    #[error(transparent)]
    Sdk(#[from] SdkSetupError),
    #[error(transparent)]
    FileLimit(#[from] file_limit::FileLimitError),
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
            | DaemonError::Proxy(_)
            | DaemonError::Sdk(SdkSetupError::Proxy)
            | DaemonError::FileLimit(_)
            | DaemonError::Socket(BindError::Io { .. })
            | DaemonError::Socket(BindError::NotSocket(_)) => true,
            DaemonError::Socket(BindError::InUse(_))
            | DaemonError::AlreadyRunning(_)
            | DaemonError::Lock { .. }
            | DaemonError::Spool(_)
            | DaemonError::Inbox(_)
            | DaemonError::Sdk(SdkSetupError::Roots(_))
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
    controls: Controls,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    Daemon::start(config).await?.serve(controls, shutdown).await
}

/// A started daemon: what it uses is open, and its tasks run under one supervisor.
struct Daemon {
    config: Config,
    spool: Spool,
    status: StatusSource,
    tasks: Supervisor,
    stopping: watch::Sender<bool>,
    publish_limits: watch::Sender<PublishConfig>,
    /// Held until the daemon is gone; the kernel releases it if the process dies.
    _instance_lock: std::fs::File,
}

/// The sockets, bound before any task starts: a bad path is a startup error, not a task's.
struct Listeners {
    main: UnixListener,
    raw: Vec<(UnixListener, RawSocketConfig)>,
}

impl Daemon {
    /// Opens the state dir, the spool, the TLS roots and the sockets, then starts the tasks.
    async fn start(config: Config) -> Result<Daemon, DaemonError> {
        let Opened {
            instance_lock,
            spool,
            downlink,
            listeners,
            mqtt,
            api,
        } = Opened::open(&config).await?;
        let (identity, identity_watch) =
            IdentityManager::new(api, config.identity.clone(), config.state.dir.clone());
        let rules = Arc::new(TopicRules::new(
            &config.mqtt.topic_prefix,
            &config.identity.identity_pool_id,
            &config.aws.region,
        ));
        let (publish_limits, limits) = watch::channel(config.publish.clone());
        let wire = mqtt.wire.clone();
        let (publisher, link, counters) = Publisher::new(
            spool.clone(),
            &identity_watch,
            mqtt,
            rules.clone(),
            limits,
            &config.batch,
        );
        let publisher = publisher.with_downlink(
            downlink.clone(),
            Inbound::new(rules.clone(), config.downlink.topics.clone()),
            &config.state.dir,
        );
        let refused_filters = publisher.refused_filters();
        let mqtt = publisher.link_report();
        let (stopping_tx, stopping) = watch::channel(false);
        let status = StatusSource {
            link,
            stopping: stopping.clone(),
            identity: identity_watch,
            spool: spool.stats(),
            counters,
            inbox: downlink.stats(),
            refused_filters,
            mqtt,
            wire,
            region: config.aws.region.clone(),
            started: std::time::Instant::now(),
        };
        log_ready(&config, &spool, &identity);
        let parts = Parts {
            listeners,
            identity,
            publisher,
            rules,
            spool: spool.clone(),
            status: status.clone(),
            stopping,
            downlink,
        };
        let tasks = spawn_tasks(&config, parts);
        Ok(Daemon {
            config,
            spool,
            status,
            tasks,
            stopping: stopping_tx,
            publish_limits,
            _instance_lock: instance_lock,
        })
    }

    /// Serves until `shutdown` or until a task ends (a failure), then stops.
    async fn serve(
        mut self,
        mut controls: Controls,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), DaemonError> {
        tokio::pin!(shutdown);
        let failed = loop {
            tokio::select! {
                _ = &mut shutdown => break None,
                Some(new) = controls.reloads.recv() => {
                    let live = Live {
                        log: controls.log.as_ref(),
                        publish_limits: &self.publish_limits,
                        spool: &self.spool,
                    };
                    reload(&mut self.config, new, live).await;
                    notify::ready(&self.status);
                }
                (task, result) = self.tasks.exited() => {
                    tracing::error!(
                        task = task.name(),
                        ?result,
                        "a task stopped unexpectedly; stopping the daemon"
                    );
                    break Some(task);
                }
            }
        };
        self.stop().await;
        match failed {
            Some(task) => Err(DaemonError::TaskFailed(task.name())),
            None => Ok(()),
        }
    }

    /// Refuses new messages, lets the publisher deliver what is pending for up to
    /// `drain_timeout`, ends every task and removes the sockets.
    async fn stop(self) {
        let _ = self.stopping.send(true);
        notify::stopping();
        tracing::info!(
            state = "stopping",
            pending = self.spool.stats().borrow().messages,
            drain_timeout = %humantime::format_duration(self.config.shutdown.drain_timeout),
            "stopping: new messages are refused; delivering what is pending"
        );
        self.tasks
            .shut_down(self.config.shutdown.drain_timeout)
            .await;
        // What is still held in memory (write-behind) goes to disk before the process ends.
        self.spool.flush().await;
        let _ = std::fs::remove_file(&self.config.socket.path);
        for raw in &self.config.socket.raw {
            let _ = std::fs::remove_file(&raw.path);
        }
        let left = self.spool.stats().borrow().messages;
        tracing::info!(left_in_spool = left, "stopped");
    }
}

/// What `Daemon::start` opens before building anything, in the order its faults are reported.
struct Opened {
    /// Held until the daemon is gone; the kernel releases it if the process dies.
    instance_lock: std::fs::File,
    spool: Spool,
    downlink: Downlink,
    listeners: Listeners,
    mqtt: MqttSettings,
    /// How the identity steps reach AWS, through the proxy when there is one.
    api: Api,
}

impl Opened {
    async fn open(config: &Config) -> Result<Opened, DaemonError> {
        file_limit::ensure(&config.socket)?;
        let instance_lock = prepare_state_dir(&config.state.dir)?;
        let spool = Spool::open_with(&config.state.dir, spool_settings(&config.spool))?;
        let downlink = Downlink::open(&config.state.dir, config.downlink.max_bytes.0)?;
        let tls = tls_config(&config.mqtt.ca_file)?;
        let listeners = bind_sockets(config).await?;
        let proxy = Proxy::resolve(&config.network, |name| std::env::var(name).ok())?;
        let proxy_tls = match &proxy {
            Some(proxy) if proxy.tls => Some(proxy_tls_config()?),
            _ => None,
        };
        if let Some(proxy) = &proxy {
            tracing::info!(proxy = ?proxy, no_proxy = %proxy.sdk_no_proxy(), "outbound connections go through a proxy");
        }
        let api = crate::identity::aws::base_config(
            &config.aws.region,
            &config.aws.endpoint_url,
            proxy.as_ref(),
        )
        .await?;
        let mqtt = MqttSettings {
            config: config.mqtt.clone(),
            region: config.aws.region.clone(),
            tls,
            max_in_flight: config.publish.max_in_flight,
            persistent_session: !config.downlink.topics.is_empty(),
            proxy: proxy.map(|proxy| (proxy, proxy_tls)),
            wire: Arc::default(),
        };
        Ok(Opened {
            instance_lock,
            spool,
            downlink,
            listeners,
            mqtt,
            api,
        })
    }
}

/// The one line that says the daemon is up, and who it is.
fn log_ready(config: &Config, spool: &Spool, identity: &IdentityManager) {
    // The name a self-register stack knows this device by (the revocation runbook's).
    let device_name = crate::identity::device::device_name(
        &config.identity.device_name,
        &config.identity.identity_pool_id,
    )
    .unwrap_or_else(|error| error.to_string());
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        socket = %config.socket.path.display(),
        spool_messages = spool.stats().borrow().messages,
        identity_id = identity.cached_identity_id().as_deref().unwrap_or("(none yet)"),
        device_name,
        "ready"
    );
}

/// What the tasks are made of, built by `Daemon::start`.
struct Parts {
    listeners: Listeners,
    identity: IdentityManager,
    publisher: Publisher,
    rules: Arc<TopicRules>,
    spool: Spool,
    status: StatusSource,
    stopping: watch::Receiver<bool>,
    downlink: Downlink,
}

/// The spool's settings from its config section.
pub(crate) fn spool_settings(config: &SpoolConfig) -> spool::Settings {
    spool::Settings {
        max_bytes: config.max_bytes.0,
        on_full: config.on_full,
        commit_window: config.commit_window,
        max_age: config.max_age,
    }
}

/// Starts every main task under one supervisor, each with its heartbeat for the watchdog.
fn spawn_tasks(config: &Config, parts: Parts) -> Supervisor {
    let Parts {
        listeners,
        identity,
        publisher,
        rules,
        spool,
        status,
        stopping,
        downlink,
    } = parts;
    let mut tasks = Supervisor::default();
    let mut pulses = Vec::new();
    let mut heartbeat = |task: Task| {
        let (heartbeat, pulse) = heartbeat::channel(task.name());
        pulses.push(pulse);
        heartbeat
    };
    let limits = Arc::new(config.socket.clone());
    for (listener, raw) in listeners.raw {
        let server = RawServer {
            listener,
            raw,
            limits: limits.clone(),
            spool: spool.clone(),
            stopping: stopping.clone(),
            heartbeat: heartbeat(Task::RawSocketServer),
        };
        tasks.spawn(Task::RawSocketServer, server.run());
    }
    let server = IngestServer {
        listener: listeners.main,
        limits,
        spool: spool.clone(),
        rules,
        status: Arc::new(status.clone()),
        stopping: stopping.clone(),
        heartbeat: heartbeat(Task::SocketServer),
        downlink: downlink.clone(),
    };
    tasks.spawn(Task::SocketServer, server.run());
    let identity_heartbeat = heartbeat(Task::IdentityManager);
    tasks.spawn(Task::IdentityManager, identity.run(identity_heartbeat));
    let publisher = match health_reporter(config, &status, &downlink) {
        Some((reporter, reports)) => {
            tasks.spawn(Task::HealthReporter, reporter.run());
            publisher.with_health(reports, config.health.topic.clone())
        }
        None => publisher,
    };
    let publisher_heartbeat = heartbeat(Task::Publisher);
    tasks.spawn(
        Task::Publisher,
        publisher.run(stopping, publisher_heartbeat),
    );
    notify::ready(&status);
    tasks.spawn(
        Task::Watchdog,
        notify::supervise(status.clone(), spool.clone(), pulses),
    );
    tasks
}

/// With `[health] interval` set: the reporter, and the reports it hands the publisher.
fn health_reporter(
    config: &Config,
    status: &StatusSource,
    downlink: &Downlink,
) -> Option<(HealthReporter, mpsc::Receiver<Vec<u8>>)> {
    if config.health.interval.is_zero() {
        return None;
    }
    let (reports, receiver) = mpsc::channel(HEALTH_QUEUE);
    let reporter = HealthReporter {
        interval: config.health.interval,
        status: status.clone(),
        inbox: downlink.stats(),
        reports,
    };
    Some((reporter, receiver))
}

async fn bind_sockets(config: &Config) -> Result<Listeners, DaemonError> {
    let main = server::bind(&config.socket.path, config.socket.mode.0).await?;
    let mut raw = Vec::new();
    for socket in &config.socket.raw {
        let listener = server::bind(&socket.path, config.socket.mode.0).await?;
        raw.push((listener, socket.clone()));
    }
    Ok(Listeners { main, raw })
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
