//! How a command ends: its exit code, and the one stderr line that says why it failed.

use std::process::ExitCode;

/// Exit codes: 0 success, 2 usage or config error, 1 anything else.
pub(crate) const EXIT_FAILURE: u8 = 1;
pub(crate) const EXIT_USAGE: u8 = 2;

/// One line on stderr naming the program, and the exit code.
pub(crate) fn fail(code: u8, error: impl std::fmt::Display) -> ExitCode {
    eprintln!("iot-cognito-relay: {error}");
    ExitCode::from(code)
}
