//! The command line: its arguments as data, what each command does, and the commands that are
//! not the daemon itself (clients of a running daemon's socket, and `config-from-stack`).

pub mod args;
pub mod commands;
mod doctor;
mod exit;
mod run;
pub(crate) mod socket_client;
mod stack_config;
