//! The command line: its arguments as data, and the commands that are not the daemon itself
//! (clients of a running daemon's socket, and `config-from-stack`).

pub mod args;
pub mod socket_client;
pub mod stack_config;
