//! `privlink`: the command-line front of the relay and the agent (see DESIGN.md for the
//! command contract). This file only parses arguments, sets up logging and signals, and maps
//! failures to exit codes: 0 ok, 64 bad usage or configuration, 69 a dependency unreachable,
//! 1 anything else. The work lives in the library crates and in the modules below.

mod cli;
mod cmd;
mod notify;
mod signals;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use privlink_protocol::config::ConfigError;

use crate::cli::{AuditCommand, CertsCommand, Cli, Command, LogFormat, TokenCommand};

/// Keeps glibc's malloc from handing freed memory back to the kernel at every turn: rustls,
/// h2 and quinn allocate and free a buffer per record, frame and datagram batch, and with the
/// default 128 KiB trim threshold each one was page-faulted in anew. 8 MiB of free heap per
/// arena cut the page faults per GB forwarded from ~100k to <1k and CPU per GB on TLS/TCP by
/// about a fifth, with no change in idle memory (docs/benchmarks.md, "Allocator").
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

/// Raises the open-file soft limit to the hard limit. Every client connection costs the relay
/// two descriptors and every pending tunnel connection one; the common soft limit of 1,024
/// ran out at a few thousand connections while the hard limit (often 524,288) was unused.
/// The limit is logged, since it bounds the connections the process can hold.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "open-file limit (each client connection takes two)"),
        Err(e) => tracing::warn!("could not raise the open-file limit: {e}"),
    }
}

/// Set by [`take_token_from_env`] on the process it re-executes: the token waits on stdin.
const TOKEN_ON_STDIN: &str = "PRIVLINK_TOKEN_ON_STDIN";
/// Most bytes read from stdin for a token handed over that way.
const MAX_TOKEN_ON_STDIN: u64 = 4096;

/// Takes `PRIVLINK_TOKEN` out of the process for good and returns it. Removing a variable
/// does not remove it from `/proc/PID/environ`, which shows the environment the process
/// *started* with (to its user and root) for as long as it runs; so a process started with the
/// variable writes the token into a pipe, and re-executes itself — the same PID, the same
/// arguments — without it, the pipe on its stdin, where this function reads it back. The pipe
/// is empty once read and never named in the environment. If the re-execution fails, the
/// variable is removed as before and a warning says that `/proc` still shows it.
fn take_token_from_env() -> Option<String> {
    use std::io::Read as _;
    if std::env::var_os(TOKEN_ON_STDIN).is_some() {
        let mut token = String::new();
        let read = std::io::stdin().take(MAX_TOKEN_ON_STDIN).read_to_string(&mut token);
        // A token is ASCII; anything else is reported by the config check as invalid.
        return read.ok().map(|_| token);
    }
    let token = std::env::var_os(privlink_agent::config::TOKEN_ENV)?;
    let error = reexec_without_token(&token);
    eprintln!(
        "warning: PRIVLINK_TOKEN could not be moved out of the process environment ({error}); \
         it stays readable in /proc/{}/environ: prefer token_file",
        std::process::id()
    );
    remove_token_variable();
    Some(token.to_string_lossy().into_owned())
}

/// Replaces this process with itself, minus `PRIVLINK_TOKEN`, the token on a pipe on stdin.
/// Returns only if that failed.
fn reexec_without_token(token: &std::ffi::OsStr) -> std::io::Error {
    use std::io::Write as _;
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::process::CommandExt as _;
    let result = (|| {
        let exe = std::env::current_exe()?;
        let (reader, mut writer) = std::io::pipe()?;
        // A token is far below a pipe's capacity: the write completes without a reader.
        writer.write_all(token.as_bytes())?;
        drop(writer);
        Ok(std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env_remove(privlink_agent::config::TOKEN_ENV)
            .env(TOKEN_ON_STDIN, "1")
            .stdin(reader)
            .exec())
    })();
    match result {
        Ok(error) | Err(error) => error,
    }
}

#[allow(
    unsafe_code,
    reason = "std::env::remove_var is unsafe in edition 2024 because another thread might read \
              the environment meanwhile; it is called before any other thread exists"
)]
fn remove_token_variable() {
    // SAFETY: called from `main` before the runtime (or anything else) starts a thread, so no
    // other thread can be reading the environment.
    unsafe { std::env::remove_var(privlink_agent::config::TOKEN_ENV) };
}

/// How long leftover blocking tasks may delay the exit once a service has stopped.
const RUNTIME_SHUTDOWN: std::time::Duration = std::time::Duration::from_millis(100);

/// Exit code for bad usage or configuration (BSD sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// Exit code for an unreachable dependency (EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: u8 = 69;

fn main() -> ExitCode {
    tune_malloc();
    let cli = Cli::parse();
    let env_token = if matches!(cli.command, Command::Agent { .. } | Command::Check { .. }) {
        take_token_from_env()
    } else {
        None
    };
    let default_filter = match cli.command {
        Command::Demo { .. } => "warn,privlink::flow=info",
        // The report is the output; the library's own logs would interleave with it.
        Command::Check { .. } => "error",
        Command::Relay { check_config: true, .. } | Command::Agent { check_config: true, .. } => {
            "warn"
        }
        _ => "info",
    };
    let log_format = match cli.command {
        Command::Relay { log_format, .. }
        | Command::Agent { log_format, .. }
        | Command::Demo { log_format, .. } => log_format,
        Command::Token { .. }
        | Command::Certs { .. }
        | Command::Audit { .. }
        | Command::Status { .. }
        | Command::Check { .. } => LogFormat::Text,
    };
    init_logging(default_filter, log_format);

    let result = match cli.command {
        Command::Token { command: TokenCommand::New { out, force } } => {
            cmd::token::new(out.as_deref(), force)
        }
        Command::Token { command: TokenCommand::Hash { file } } => cmd::token::hash(&file),
        Command::Audit {
            command: AuditCommand::Verify { files, key_file, expect_last, continues, json },
        } => cmd::audit::verify(&cmd::audit::VerifyArgs {
            files: &files,
            key_file: key_file.as_deref(),
            expect_last: expect_last.as_deref(),
            continues,
            json,
        }),
        Command::Certs { command: CertsCommand::Init { dir, names, force } } => {
            cmd::certs::init(&dir, &names, force)
        }
        Command::Relay { config, check_config: true, .. } => cmd::relay::check_config(&config),
        Command::Agent { config, check_config: true, .. } => {
            cmd::agent::check_config(&config, env_token)
        }
        command => runtime().and_then(|rt| {
            // Only the services hold many connections; `status` and `check` need no more.
            if matches!(
                command,
                Command::Relay { .. } | Command::Agent { .. } | Command::Demo { .. }
            ) {
                raise_open_file_limit();
            }
            let result = rt.block_on(run_service(command, env_token));
            // The services have drained and said "stopped"; a blocking task still running (a
            // DNS lookup of an unreachable relay name, say) must not hold the exit up.
            rt.shutdown_timeout(RUNTIME_SHUTDOWN);
            result
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.downcast_ref::<cmd::ConfigShown>().is_some() => {
            ExitCode::from(EXIT_USAGE)
        }
        Err(error) => {
            eprintln!("privlink: {error:#}");
            if error.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(EXIT_USAGE)
            } else if error.downcast_ref::<cmd::Unavailable>().is_some() {
                ExitCode::from(EXIT_UNAVAILABLE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (else `default_filter`), as text or JSON lines.
fn init_logging(default_filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            builder.with_ansi(ansi).init();
        }
        // The event's fields (the flow log's among them) at the top level of each object, next
        // to timestamp, level, target and message; the spans it happened in under `spans`.
        LogFormat::Json => builder.json().flatten_event(true).with_span_list(true).init(),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn run_service(command: Command, env_token: Option<String>) -> anyhow::Result<()> {
    let shutdown = signals::shutdown_on_signal()?;
    match command {
        Command::Relay { config, .. } => cmd::relay::run(&config, shutdown).await,
        Command::Agent { config, .. } => cmd::agent::run(&config, env_token, shutdown).await,
        Command::Demo { port, .. } => cmd::demo::run(port, shutdown).await,
        Command::Status { admin, token_file, json } => {
            cmd::status::run(&admin, token_file.as_deref(), json).await
        }
        Command::Check { config, destinations, no_tls, json, endpoints, ca, relay } => {
            let options = privlink_agent::check::CheckOptions { destinations, tls: !no_tls };
            let endpoints = endpoints
                .into_iter()
                .map(|endpoint| privlink_agent::check::endpoint::EndpointCheck {
                    endpoint,
                    ca: ca.clone(),
                    relay: relay.clone(),
                })
                .collect();
            cmd::check::run(config.as_deref(), env_token, options, endpoints, json).await
        }
        Command::Token { .. } | Command::Certs { .. } | Command::Audit { .. } => {
            unreachable!("handled without a runtime")
        }
    }
}
