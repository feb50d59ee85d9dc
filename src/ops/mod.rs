//! What operators see and systemd needs: logs, the status report, readiness and the watchdog.

pub mod health;
pub mod logging;
pub mod notify;
pub mod status;
