//! Shared pieces of the end-to-end tests, one harness per file: [`inproc`] (relay and agents
//! in the test's own runtime), [`servers`] (destinations and client helpers), [`gate`] (a
//! network that drops UDP), and the real-process harness of the test bed
//! (`privlink_testbed::process`), bound here to this build's binary.
#![allow(
    dead_code,
    unused_imports,
    unreachable_pub,
    reason = "each test binary uses a different subset"
)]

pub mod gate;
pub mod inproc;
pub mod servers;

pub use gate::*;
pub use inproc::*;
pub use privlink_testbed::process::{PROCESS_WAIT, Placement, Running, Tunnel, TunnelFiles};
pub use servers::*;

/// The `privlink` binary of this build.
pub const BIN: &str = env!("CARGO_BIN_EXE_privlink");

/// Runs `privlink ARGS`.
pub fn privlink(args: &[&str]) -> Running {
    let mut command = std::process::Command::new(BIN);
    command.args(args);
    Running::spawn(command)
}

/// [`privlink_testbed::process::write_tunnel_files`] with this build's binary.
pub fn write_tunnel_files(dir: &std::path::Path, files: &TunnelFiles<'_>) -> (String, String) {
    privlink_testbed::process::write_tunnel_files(BIN, dir, files)
}
