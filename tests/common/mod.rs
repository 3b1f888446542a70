//! Shared pieces of the end-to-end tests, one harness per file: [`inproc`] (relay and agents
//! in the test's own runtime), [`servers`] (destinations and client helpers), [`gate`] (a
//! network that drops UDP), [`peers`] (agents played by hand), and the real-process harness of the test bed
//! (`privlink_testbed::process`), bound here to this build's binary.
#![allow(
    dead_code,
    unused_imports,
    unused_macros,
    unreachable_pub,
    reason = "each test binary uses a different subset"
)]

/// Runs each scenario — an `async fn(TransportChoice)` of the calling file, which imports
/// `TransportChoice` — once per transport, as `over_quic::<name>` and `over_tcp::<name>`.
macro_rules! on_both_transports {
    ($($scenario:ident),* $(,)?) => {
        mod over_quic {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::TransportChoice::Quic).await;
                }
            )*
        }
        mod over_tcp {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(super::TransportChoice::Tcp).await;
                }
            )*
        }
    };
}

pub mod gate;
pub mod inproc;
pub mod peers;
pub mod servers;
pub mod vault;

pub use gate::*;
pub use inproc::*;
pub use peers::*;
pub use privlink_testbed::process::{
    AdminProbe, PROCESS_WAIT, Placement, Running, Tunnel, TunnelConfigs, TunnelFiles,
};
pub use servers::*;

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

/// The `privlink` binary of this build.
pub const BIN: &str = env!("CARGO_BIN_EXE_privlink");

/// Runs `privlink ARGS`.
pub fn privlink(args: &[&str]) -> Running {
    let mut command = std::process::Command::new(BIN);
    command.args(args);
    Running::spawn(command)
}

/// [`privlink_testbed::process::write_tunnel_files`] with this build's binary.
pub fn write_tunnel_files(dir: &std::path::Path, files: &TunnelFiles<'_>) -> TunnelConfigs {
    privlink_testbed::process::write_tunnel_files(BIN, dir, files)
}

/// Asks the admin listener at `admin` for `path` with curl: the status code and the body
/// (code 0 when nothing answered).
pub fn admin_get(admin: std::net::SocketAddr, path: &str) -> (u16, String) {
    privlink_testbed::process::AdminProbe::new(None, admin).get(path)
}

/// Polls `path` on the admin listener until its answer satisfies `want`, failing the test
/// after [`PROCESS_WAIT`] with the last answer.
pub fn wait_admin(admin: std::net::SocketAddr, path: &str, want: impl Fn(u16, &str) -> bool) {
    privlink_testbed::process::AdminProbe::new(None, admin).wait(path, want);
}

/// Waits until the relay's admin listener is ready and reports `endpoint` as `status`.
pub fn wait_endpoint_status(admin: std::net::SocketAddr, endpoint: &str, status: &str) {
    wait_admin(admin, "/readyz", |code, _| code == 200);
    wait_admin(admin, "/api/v1/status", |code, body| {
        code == 200
            && serde_json::from_str::<privlink_admin::snapshot::StatusSnapshot>(body).is_ok_and(
                |s| {
                    s.relay()
                        .and_then(|relay| relay.endpoint(endpoint))
                        .is_some_and(|e| e.status == status)
                },
            )
    });
}

/// Runs `privlink audit verify FILES… ARGS…`: exit code, stdout, stderr.
pub fn audit_verify(files: &[std::path::PathBuf], args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(BIN)
        .args(["audit", "verify"])
        .args(files)
        .args(args)
        .output()
        .expect("run privlink");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}
