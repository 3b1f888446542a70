//! The command line, as clap types: the contract in DESIGN.md ("Command line"). Parsing only;
//! each command's work is in `cmd/`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "privlink",
    version,
    long_version = long_version(),
    about = "Reach TCP/TLS destinations inside a private network through an outbound-only tunnel"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// `privlink --version`: the version, and the build's cryptography — its provider, whether it
/// runs in FIPS mode, and the tunnel's key exchange by default.
fn long_version() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        use privlink_transport::crypto;
        format!(
            "{}\ncrypto: {} (FIPS mode: {})\ntunnel key exchange, in order of preference: {} \
             (post_quantum = \"prefer\", the default; \"require\" and \"off\" in relay.toml \
             [tunnel] and agent.toml)",
            env!("CARGO_PKG_VERSION"),
            crypto::PROVIDER,
            if crypto::fips_mode() { "yes" } else { "no" },
            crypto::group_names(crypto::PostQuantum::Prefer),
        )
    })
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run a relay: accept agents' tunnels and expose endpoints to clients.
    Relay {
        /// Path to relay.toml.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Validate the configuration as a start would (files, certificate and key, token),
        /// print a one-line summary and exit 0, or 64 naming file, line and key. Binds no
        /// port and dials nothing.
        #[arg(long)]
        check_config: bool,
        /// Log lines as text, or one JSON object each.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Run an agent: dial relays and open allowed destinations for them.
    Agent {
        /// Path to agent.toml.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Validate the configuration as a start would (files, certificate and key, token),
        /// print a one-line summary and exit 0, or 64 naming file, line and key. Binds no
        /// port and dials nothing.
        #[arg(long)]
        check_config: bool,
        /// Log lines as text, or one JSON object each.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Run relay, agent and a demo TLS destination on loopback and send a request through.
    Demo {
        /// Port for the demo endpoint on 127.0.0.1 (0 picks a free one).
        #[arg(long, default_value_t = 8443)]
        port: u16,
        /// Log lines as text, or one JSON object each.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Diagnose, where the agent runs, everything it needs (relays, proxy, destinations)
    ///
    /// Checks the agent's configuration, every relay (DNS, QUIC and TLS over TCP,
    /// authentication; the HTTP proxy on the way, if there is one) and every destination (DNS
    /// answer and whether it is private, TCP connect, the TLS certificate a client would see).
    /// Sends no request and no credential to a destination. Exit 0 when every check passed
    /// (warnings included), 69 when one failed, 64 for an invalid configuration.
    Check {
        /// Path to agent.toml (not needed with --endpoint alone).
        #[arg(long, value_name = "FILE", required_unless_present = "endpoints")]
        config: Option<PathBuf>,
        /// Check, from where a client runs, the endpoint it reaches by this name
        /// (`NAME:PORT`): DNS, TCP, whether a handshake asking for NAME is routed, and the
        /// certificate that comes back. Needs no agent configuration. Repeat for several.
        #[arg(long = "endpoint", value_name = "NAME:PORT")]
        endpoints: Vec<String>,
        /// With --endpoint: the CA the endpoint's certificate should chain to (default: the
        /// system's trusted roots).
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// With --endpoint: the relay's address or name, which NAME should resolve to.
        #[arg(long, value_name = "HOST")]
        relay: Option<String>,
        /// Also check this destination (`host:port`), whether or not an endpoint names it.
        /// Repeat for several.
        #[arg(long = "destination", value_name = "HOST:PORT")]
        destinations: Vec<String>,
        /// The destinations do not speak TLS (plain TCP services): connect, but skip the TLS
        /// handshake and the certificate checks.
        #[arg(long)]
        no_tls: bool,
        /// Print the results as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Ask a running relay or agent for its status (its admin listener's /api/v1/status).
    Status {
        /// The admin listener.
        #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:9090")]
        admin: String,
        /// A file holding the admin token (`[admin] token_file` of the relay or agent).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Print the status JSON as it came.
        #[arg(long)]
        json: bool,
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
    /// Audit trails.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Check an audit trail's hash chain: the first record that does not follow is named
    Verify {
        /// The trail's files, oldest first (a rotated trail's files in their order).
        #[arg(value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
        /// The trail's HMAC key (`[audit] key_file`), when it has one.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// The last hash an outside copy recorded: a trail that ends elsewhere was cut.
        #[arg(long, value_name = "HASH")]
        expect_last: Option<String>,
        /// The first file continues a trail whose earlier files are not given.
        #[arg(long)]
        continues: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line: timestamp, level, target, the message and the event's fields
    /// (a flow-log line's fields are JSON fields), and the spans it happened in.
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Print a new connector token and the token_sha256 line for relay.toml.
    New {
        /// Write only the token to this file (mode 0600) for the agent's token_file, and print
        /// just the token_sha256 line; the token itself is not printed.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// With --out: replace an existing file.
        #[arg(long, requires = "out")]
        force: bool,
    },
    /// Print the token_sha256 line for an existing token file (the agent's token_file).
    Hash {
        /// The token file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum CertsCommand {
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
