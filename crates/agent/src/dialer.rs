//! Dialling one relay address as the agent's configuration says: transport's [`Dialer`] with
//! the relay's name taken from its address, and a rejected certificate explained against
//! `relay_ca` (which file is trusted, what the relay presented, what to check).

use std::net::SocketAddr;
use std::time::Duration;

use privlink_transport::dialer::{Dialer, DialerError, QuicSource};
use privlink_transport::tls::CertificateSummary;
use privlink_transport::tunnel::{AgentConnection, CloseCode, DialError, TransportKind};

use crate::config::{AgentConfig, RelayAddress};

/// Dialling a relay as the configuration says — transport's [`Dialer`] (one QUIC endpoint,
/// the TLS settings for TLS over TCP) with the relay's name taken from its address and a
/// rejected certificate explained against `relay_ca` — shared by the agent's links and by
/// `privlink check`.
#[derive(Debug)]
pub(crate) struct RelayDialer {
    dialer: Dialer,
}

impl RelayDialer {
    /// Trusts `config`'s relay roots. Call it within a tokio runtime.
    pub(crate) fn new(config: &AgentConfig) -> Result<Self, DialerError> {
        let dialer =
            Dialer::new(&config.relay_roots, config.crypto.post_quantum, config.stream_window)?;
        Ok(Self { dialer })
    }

    /// Establishes a tunnel connection to `addr` (an address of `relay`, or of the HTTP proxy
    /// on the way to it) on one transport within `deadline`, a QUIC one from `source`; a
    /// rejected certificate is explained against `config`'s `relay_ca`.
    pub(crate) async fn dial(
        &self,
        kind: TransportKind,
        (relay, addr): (&RelayAddress, SocketAddr),
        config: &AgentConfig,
        deadline: Duration,
        source: QuicSource,
    ) -> Result<AgentConnection, DialError> {
        let server_name = relay.host.to_string();
        let server_name = server_name.trim_start_matches('[').trim_end_matches(']');
        let dialed = match config.proxy_for(relay) {
            // `addr` is the proxy's: it is asked to CONNECT to the relay by name.
            Some(proxy) if kind == TransportKind::Tcp => {
                let hop = proxy.hop_to(relay.destination());
                self.dialer.dial_through_proxy(addr, &hop, server_name, deadline).await
            }
            _ => self.dialer.dial_from(kind, addr, server_name, deadline, source).await,
        };
        dialed.map_err(|e| match e {
            DialError::Certificate(detail) => {
                DialError::Certificate(self.explain_untrusted(&detail, server_name, addr, config))
            }
            e => e,
        })
    }

    /// Closes every QUIC link with `reason`, and waits up to `wait` for the relays to hear it.
    pub(crate) async fn close(&self, reason: &str, wait: Duration) {
        self.dialer.close(CloseCode::Normal, reason);
        let _ = tokio::time::timeout(wait, self.dialer.wait_idle()).await;
    }

    /// Waits up to `wait` for closed QUIC links to reach their relays.
    pub(crate) async fn wait_idle(&self, wait: Duration) {
        let _ = tokio::time::timeout(wait, self.dialer.wait_idle()).await;
    }

    /// What an operator needs when the relay's certificate is rejected: which file the agent
    /// trusts, what the relay presented, and what to check.
    fn explain_untrusted(
        &self,
        detail: &str,
        server_name: &str,
        addr: SocketAddr,
        config: &AgentConfig,
    ) -> String {
        let relay_ca = config
            .relay_ca
            .as_ref()
            .map_or_else(|| "relay_ca".to_owned(), |p| format!("relay_ca ({})", p.display()));
        let trusted_cas: Vec<CertificateSummary> =
            config.relay_roots.iter().filter_map(CertificateSummary::of).collect();
        let trusted: Vec<String> = trusted_cas.iter().map(describe_ca).collect();
        let mut message = format!("the relay's certificate is not trusted ({detail}).");
        match self
            .dialer
            .rejected_certificate(server_name)
            .as_ref()
            .and_then(CertificateSummary::of)
        {
            Some(presented) => {
                let signer = presented
                    .issuer_key_id
                    .as_ref()
                    .map_or_else(String::new, |id| format!(" (the CA's key id {id})"));
                message.push_str(&format!(
                    " The relay at {addr} presented `{}` (fingerprint {}), issued by `{}`{signer}, \
                     for the names [{}]; {relay_ca} holds {}.",
                    presented.subject,
                    presented.fingerprint,
                    presented.issuer,
                    presented.names.join(", "),
                    if trusted.is_empty() {
                        "no readable certificate".to_owned()
                    } else {
                        trusted.join(", ")
                    }
                ));
                let signed_by_trusted = presented.issuer_key_id.is_some()
                    && trusted_cas.iter().any(|ca| ca.key_id == presented.issuer_key_id);
                if !signed_by_trusted && trusted_cas.iter().any(|ca| ca.subject == presented.issuer)
                {
                    message.push_str(
                        " The names match but the keys do not: this is another CA of the same \
                         name (a second `privlink certs init`).",
                    );
                }
                if !presented.names.iter().any(|n| n.eq_ignore_ascii_case(server_name)) {
                    message.push_str(&format!(
                        " The agent dials it as `{server_name}`, a name the certificate does \
                         not list: put one of its names in `relays`, or reissue the relay's \
                         certificate with `privlink certs init --name {server_name}`."
                    ));
                }
            }
            None => message.push_str(&format!(" {relay_ca} holds {}.", trusted.join(", "))),
        }
        message.push_str(&format!(
            " Check that {relay_ca} is the ca.crt that signed the relay's certificate (the one \
             `privlink certs init` wrote together with relay.crt)."
        ));
        message
    }
}

/// A trusted CA as an operator can compare it: its name, key id and fingerprint.
fn describe_ca(ca: &CertificateSummary) -> String {
    match &ca.key_id {
        Some(id) => format!("`{}` (key id {id}, fingerprint {})", ca.subject, ca.fingerprint),
        None => format!("`{}` (fingerprint {})", ca.subject, ca.fingerprint),
    }
}
