//! How the publisher tells the identity manager what it needs: the manager acts when a
//! signal is raised, and clears it once it has. A signal stands until then, and several raises
//! before the manager looks count as one. Cloned into both tasks by the daemon.

use std::sync::Arc;

use tokio::sync::watch;

/// Two are in use: IoT Core refuses this identity (the policy may have been detached, or never
/// attached: the manager attaches it again; a connection let in clears it), and fresh
/// credentials are wanted for a connect (the manager refreshes now).
#[derive(Clone)]
pub struct Signal(Arc<watch::Sender<bool>>);

impl Default for Signal {
    fn default() -> Signal {
        Signal(Arc::new(watch::channel(false).0))
    }
}

impl Signal {
    pub fn raise(&self) {
        self.0.send_replace(true);
    }

    /// Taken, or cured (a refusal, once the identity is let in).
    pub fn clear(&self) {
        self.0
            .send_if_modified(|raised| std::mem::replace(raised, false));
    }

    /// Resolves once the signal stands (at once if it does).
    pub(super) async fn raised(&self) {
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = self.0.subscribe().wait_for(|raised| *raised).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A signal stands until the manager takes it (or a CONNACK cures a refusal): one raised
    /// while the manager held back is acted on later only if nothing cleared it since.
    #[tokio::test(start_paused = true)]
    async fn a_signal_stands_until_taken_or_cured() {
        let soon = |signal: &Signal| {
            let signal = signal.clone();
            async move {
                tokio::time::timeout(std::time::Duration::from_secs(1), signal.raised())
                    .await
                    .is_ok()
            }
        };
        let signal = Signal::default();
        assert!(!soon(&signal).await, "nothing raised yet");
        signal.raise();
        signal.raise();
        assert!(soon(&signal).await);
        assert!(soon(&signal).await, "still standing until taken");
        signal.clear();
        assert!(!soon(&signal).await, "cured by a CONNACK");
        let waiter = tokio::spawn({
            let signal = signal.clone();
            async move { signal.raised().await }
        });
        signal.raise();
        assert!(
            tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
                .await
                .is_ok(),
            "a waiting manager wakes"
        );
    }
}
