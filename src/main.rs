//! `privlink`: the command-line front of the relay and the agent (see DESIGN.md for the
//! command contract). This file only parses arguments, sets up logging and signals, and maps
//! failures to exit codes: 0 ok, 64 bad usage or configuration, 69 a dependency unreachable,
//! 1 anything else. The work lives in the library crates and in the modules below.

mod demo;
mod setup;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use privlink_protocol::config::ConfigError;
use tokio_util::sync::CancellationToken;

/// Keeps glibc's malloc from handing freed memory back to the kernel at every turn.
///
/// rustls, h2 and quinn allocate a fresh buffer for each TLS record, HTTP/2 frame read and
/// datagram batch and free it soon after; with glibc's default trim threshold (128 KiB; worker
/// threads' arenas are trimmed the same way) the freed top of the heap went back to the kernel
/// and the next buffer was page-faulted in anew — the benchmark harness counted 60,000–120,000
/// page faults per GB forwarded over TLS/TCP. Keeping up to 8 MiB of free heap per arena brings
/// that under 1,000 and the relay's plus the agent's CPU per GB down by about a fifth on TLS/TCP
/// (less on QUIC), with no change in memory per idle connection (docs/benchmarks.md; mimalloc 3
/// did as well on CPU but nearly doubled the idle-connection memory, mimalloc 2 removed the
/// faults in some runs and not in others). Builds on other C libraries keep their allocator's
/// behaviour.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code, reason = "one call to mallopt, which no safe wrapper exposes")]
fn tune_malloc() {
    const TRIM_THRESHOLD: libc::c_int = 8 * 1024 * 1024;
    // SAFETY: mallopt only sets a malloc parameter; it is called first thing in `main`, before
    // any other thread exists, and a refusal (return value 0) leaves the default in place.
    let _ = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

/// Exit code for bad usage or configuration (BSD sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// Exit code for an unreachable dependency (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;

#[derive(Debug, Parser)]
#[command(
    name = "privlink",
    version,
    about = "Reach TCP/TLS destinations inside a private network through an outbound-only tunnel"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a relay: accept agents' tunnels and expose endpoints to clients.
    Relay {
        /// Path to relay.toml.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run an agent: dial relays and open allowed destinations for them.
    Agent {
        /// Path to agent.toml.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Run relay, agent and a demo TLS destination on loopback and send a request through.
    Demo {
        /// Port for the demo endpoint on 127.0.0.1 (0 picks a free one).
        #[arg(long, default_value_t = 8443)]
        port: u16,
    },
    /// Connector tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Certificates for first deployments and tests.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print a new connector token and the token_sha256 line for relay.toml.
    New,
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Write a private CA and a relay certificate signed by it.
    Init {
        /// Directory to write ca.crt, ca.key, relay.crt and relay.key into.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Extra names or addresses for the relay certificate (localhost, 127.0.0.1 and ::1
        /// are always included). Repeat for several.
        #[arg(long = "name", value_name = "NAME")]
        names: Vec<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    tune_malloc();
    let cli = Cli::parse();
    let default_filter = match cli.command {
        Command::Demo { .. } => "warn,privlink::flow=info",
        _ => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();

    let result = match cli.command {
        Command::Token { command: TokenCommand::New } => setup::token_new(),
        Command::Certs { command: CertsCommand::Init { dir, names, force } } => {
            setup::certs_init(&dir, &names, force)
        }
        command => runtime().and_then(|rt| rt.block_on(run_service(command))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("privlink: {error:#}");
            if error.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(EXIT_USAGE)
            } else if error.downcast_ref::<demo::Unavailable>().is_some() {
                ExitCode::from(EXIT_UNAVAILABLE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn run_service(command: Command) -> anyhow::Result<()> {
    let shutdown = shutdown_on_signal()?;
    match command {
        Command::Relay { config } => {
            // Parse and validate everything before binding anything.
            let config = privlink_relay::RelayConfig::load(&config)?;
            let relay = privlink_relay::Relay::bind(config).await.context("starting the relay")?;
            relay.run(shutdown).await;
            Ok(())
        }
        Command::Agent { config } => {
            let config = privlink_agent::AgentConfig::load(&config)?;
            let agent = privlink_agent::Agent::new(config).context("starting the agent")?;
            agent.run(shutdown).await;
            Ok(())
        }
        Command::Demo { port } => demo::run(port, shutdown).await,
        Command::Token { .. } | Command::Certs { .. } => unreachable!("handled without a runtime"),
    }
}

/// A token cancelled by the first SIGINT or SIGTERM; a second signal exits at once.
fn shutdown_on_signal() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::info!("signal received: shutting down gracefully (signal again to stop at once)");
        cancel.cancel();
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        eprintln!("privlink: second signal: stopping now");
        std::process::exit(1);
    });
    Ok(token)
}
