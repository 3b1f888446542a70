//! One module per command: each turns its arguments into a running service or a printed
//! result, on top of the library crates.

pub(crate) mod agent;
pub(crate) mod certs;
pub(crate) mod demo;
pub(crate) mod relay;
pub(crate) mod status;
pub(crate) mod token;

/// Something the command needs could not be reached (exit code 69).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Unavailable(pub(crate) String);
