//! One supervised set for the daemon's long-running tasks. Each runs until shutdown, so one
//! that ends earlier has failed: the daemon stops and exits non-zero, and systemd restarts it.
//! At shutdown the publisher drains first, then every task is stopped, and `shut_down`
//! returns only once all of them have ended.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::{Id, JoinError, JoinSet};

/// The daemon's main tasks, by what they do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    IdentityManager,
    SocketServer,
    RawSocketServer,
    Publisher,
    /// Status line and systemd watchdog pings.
    Watchdog,
    /// `[health] interval`: makes the health reports the publisher sends.
    HealthReporter,
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::IdentityManager => "identity manager",
            Task::SocketServer => "socket server",
            Task::RawSocketServer => "raw socket server",
            Task::Publisher => "publisher",
            Task::Watchdog => "watchdog",
            Task::HealthReporter => "health reporter",
        }
    }
}

/// See the module docs.
#[derive(Default)]
pub struct Supervisor {
    tasks: JoinSet<()>,
    names: HashMap<Id, Task>,
}

impl Supervisor {
    pub fn spawn(&mut self, task: Task, future: impl Future<Output = ()> + Send + 'static) {
        let handle = self.tasks.spawn(future);
        self.names.insert(handle.id(), task);
    }

    /// The first task to end, and how (a panic shows in the `JoinError`). Pending while all
    /// run, and forever once none is left.
    pub async fn exited(&mut self) -> (Task, Result<(), JoinError>) {
        match self.tasks.join_next_with_id().await {
            Some(Ok((id, ()))) => (self.forget(id), Ok(())),
            Some(Err(error)) => (self.forget(error.id()), Err(error)),
            None => std::future::pending().await,
        }
    }

    /// Waits up to `drain_timeout` for the publisher to deliver what is pending (the other
    /// tasks keep serving it: credentials, watchdog), then stops every task and waits until
    /// each has ended.
    pub async fn shut_down(mut self, drain_timeout: Duration) {
        let publisher_running = self.names.values().any(|task| *task == Task::Publisher);
        if publisher_running {
            let drained = tokio::time::timeout(drain_timeout, async {
                while self.exited().await.0 != Task::Publisher {}
            })
            .await;
            if drained.is_err() {
                tracing::warn!("the drain timed out; what is left stays in the spool");
            }
        }
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }

    fn forget(&mut self, id: Id) -> Task {
        self.names
            .remove(&id)
            .expect("every task in the set was spawned through `spawn`, which names it")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn names_the_task_that_ended_first() {
        let mut supervisor = Supervisor::default();
        supervisor.spawn(Task::Publisher, std::future::pending());
        supervisor.spawn(Task::SocketServer, async {
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let (task, result) = supervisor.exited().await;
        assert_eq!(task, Task::SocketServer);
        assert!(result.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_reported_as_failed() {
        let mut supervisor = Supervisor::default();
        supervisor.spawn(Task::IdentityManager, async { panic!("boom") });
        let (task, result) = supervisor.exited().await;
        assert_eq!(task, Task::IdentityManager);
        assert!(result.is_err_and(|error| error.is_panic()));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_lets_the_publisher_drain_then_ends_every_task() {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let mut supervisor = Supervisor::default();
        supervisor.spawn(Task::Publisher, async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let _ = done_tx.send(());
        });
        let dropped = std::sync::Arc::new(());
        let held = dropped.clone();
        supervisor.spawn(Task::IdentityManager, async move {
            let _held = held;
            std::future::pending::<()>().await
        });
        let started = tokio::time::Instant::now();
        supervisor.shut_down(Duration::from_secs(10)).await;
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(3),
            "waited for the drain only"
        );
        assert!(done_rx.await.is_ok(), "the publisher finished its drain");
        assert_eq!(
            std::sync::Arc::strong_count(&dropped),
            1,
            "the other task ended"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_that_outlasts_its_timeout_is_cut() {
        let mut supervisor = Supervisor::default();
        supervisor.spawn(Task::Publisher, std::future::pending());
        let started = tokio::time::Instant::now();
        supervisor.shut_down(Duration::from_secs(5)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }
}
