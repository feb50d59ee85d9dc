//! Stage 1: local apps write to Unix sockets; each record is parsed, validated and handed to
//! the spool, and the app is answered once the spool has it.

pub mod protocol;
pub(crate) mod raw;
pub(crate) mod records;
pub(crate) mod server;
