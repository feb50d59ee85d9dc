//! The command line: parses arguments and dispatches into the library.

use std::process::ExitCode;

use clap::Parser;
use iot_cognito_relay::cli::args::Cli;
use iot_cognito_relay::cli::commands::dispatch;

fn main() -> ExitCode {
    dispatch(Cli::parse().command)
}
