//! Every socket client takes a file descriptor: with `socket.max_clients` per socket the
//! clients alone can pass `RLIMIT_NOFILE`, and then the daemon's own files and AWS connections
//! fail (EMFILE) while the sockets keep accepting. Checked once at start.

use crate::config::SocketConfig;

/// Descriptors the daemon takes besides its clients: listeners, the spool and inbox (db,
/// WAL, shm), the journal, the MQTT and AWS connections, the runtime's own.
const OWN_DESCRIPTORS: u64 = 256;

/// The limit is too low for the configured clients.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "socket.max_clients over {sockets} socket(s) needs {needed} file descriptors with the daemon's own, but the limit is {hard} (LimitNOFILE= in the unit, ulimit -n outside it); lower socket.max_clients or raise the limit"
)]
pub struct FileLimitError {
    pub sockets: u64,
    pub needed: u64,
    pub hard: u64,
}

/// What to do with the soft limit.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    Keep,
    Raise(u64),
    TooLow,
}

fn plan(needed: u64, soft: u64, hard: u64) -> Plan {
    if soft >= needed {
        Plan::Keep
    } else if hard >= needed {
        Plan::Raise(needed)
    } else {
        Plan::TooLow
    }
}

/// Sockets, and descriptors needed for all their clients and the daemon's own.
fn needed(sockets: &SocketConfig) -> (u64, u64) {
    let count = 1 + sockets.raw.len() as u64;
    (
        count,
        count * u64::from(sockets.max_clients) + OWN_DESCRIPTORS,
    )
}

/// Raises the soft `RLIMIT_NOFILE` to what the config needs, within the hard limit; an error
/// when even the hard limit is too low.
pub fn ensure(config: &SocketConfig) -> Result<(), FileLimitError> {
    let (sockets, needed) = needed(config);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Ok(());
    }
    // rlim_t is 32 bits on armhf: the casts are not no-ops everywhere.
    #[allow(clippy::unnecessary_cast)]
    let (soft, hard) = (limit.rlim_cur as u64, limit.rlim_max as u64);
    match plan(needed, soft, hard) {
        Plan::Keep => Ok(()),
        Plan::Raise(to) => {
            let raised = libc::rlimit {
                rlim_cur: to as libc::rlim_t,
                rlim_max: limit.rlim_max,
            };
            // SAFETY: setrlimit reads one rlimit from the struct it is given.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                tracing::info!(
                    from = soft,
                    to,
                    "raised the file descriptor limit for socket.max_clients"
                );
                Ok(())
            } else {
                // A syscall filter may forbid it: then the soft limit is what counts.
                Err(FileLimitError {
                    sockets,
                    needed,
                    hard: soft,
                })
            }
        }
        Plan::TooLow => Err(FileLimitError {
            sockets,
            needed,
            hard,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_within_the_hard_one() {
        for (needed, soft, hard, expected) in [
            (1024, 1024, 4096, Plan::Keep),
            (1024, 65536, 65536, Plan::Keep),
            (1280, 1024, 524_288, Plan::Raise(1280)),
            (1280, 1024, 1280, Plan::Raise(1280)),
            (1280, 1024, 1024, Plan::TooLow),
        ] {
            assert_eq!(plan(needed, soft, hard), expected, "{needed} {soft} {hard}");
        }
    }

    #[test]
    fn every_socket_counts_its_clients() {
        let mut config = SocketConfig {
            max_clients: 1000,
            ..SocketConfig::default()
        };
        assert_eq!(needed(&config), (1, 1000 + OWN_DESCRIPTORS));
        let raw = crate::config::RawSocketConfig {
            path: "/run/sensors/raw.sock".into(),
            topic: "raw".into(),
            delimiter: crate::config::Delimiter(b'\n'),
            qos: crate::message::Qos::AtLeastOnce,
        };
        config.raw = vec![raw.clone(), raw];
        assert_eq!(needed(&config), (3, 3000 + OWN_DESCRIPTORS));
    }
}
