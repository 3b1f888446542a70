//! One module per command: each turns its arguments into a running service or a printed
//! result, on top of the library crates.

pub(crate) mod agent;
pub(crate) mod certs;
pub(crate) mod demo;
pub(crate) mod relay;
pub(crate) mod token;
