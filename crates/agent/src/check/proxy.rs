//! The HTTP proxy hop, checked on its own before the relay behind it (which is then checked
//! through it, TLS over TCP only): the proxy's name resolved and a TCP connection to it (a
//! `proxy` step), then its answer to `CONNECT relay:port` (a `proxy-connect` step) — so that a
//! proxy that wants credentials or refuses the relay is told apart from a relay that fails.

use std::net::SocketAddr;

use privlink_protocol::control::Timers;
use privlink_transport::http_proxy::connect_through;
use tokio::net::TcpStream;

use super::{Outcome, Report, Step, timed};
use crate::config::{AgentConfig, RelayAddress};
use crate::proxy::{ProxyOrigin, ProxySettings};

/// Checks the proxy on the way to `relay`; returns the proxy address the relay is checked
/// through, when the proxy opened the way.
pub(super) async fn check_proxy(
    proxy: &ProxySettings,
    relay: &RelayAddress,
    config: &AgentConfig,
    report: &mut Report,
) -> Option<Vec<SocketAddr>> {
    let origin = match &proxy.origin {
        ProxyOrigin::Config => "proxy in agent.toml".to_owned(),
        ProxyOrigin::Environment(name) => format!("the environment's {name}"),
    };
    let subject = format!("{} ({origin})", proxy.address);
    let proxy_address = RelayAddress::of(&proxy.address);
    let ((reached, addr), took) = timed(async {
        let resolved =
            tokio::time::timeout(config.dns_timeout, crate::links::resolve(&proxy_address));
        let addrs = match resolved.await {
            Ok(Ok(addrs)) if !addrs.is_empty() => addrs,
            Ok(Ok(_)) => return (Err("the proxy's name resolves to no address".to_owned()), None),
            Ok(Err(e)) => return (Err(format!("the proxy's name does not resolve: {e}")), None),
            Err(_) => {
                return (
                    Err(format!("no DNS answer for the proxy within {:?}", config.dns_timeout)),
                    None,
                );
            }
        };
        let addr = addrs[0];
        match tokio::time::timeout(config.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(socket)) => (Ok(socket), Some(addr)),
            Ok(Err(e)) => (Err(format!("TCP to the proxy at {addr}: {e}")), Some(addr)),
            Err(_) => (
                Err(format!(
                    "TCP to the proxy at {addr}: no answer within {:?}",
                    config.connect_timeout
                )),
                Some(addr),
            ),
        }
    })
    .await;
    let mut socket = match reached {
        Ok(socket) => {
            let addr = addr.map_or_else(String::new, |a| a.to_string());
            let mut step =
                Step::new("proxy", subject, Outcome::Pass, took, format!("reachable at {addr}"));
            step.detail.push_str("; QUIC is not tried: it cannot cross an HTTP proxy");
            report.push(step);
            socket
        }
        Err(reason) => {
            report.push(Step::new("proxy", subject, Outcome::Fail, took, reason));
            return None;
        }
    };
    let hop = proxy.hop_to(relay.destination());
    let (answered, took) =
        timed(tokio::time::timeout(Timers::HANDSHAKE, connect_through(&mut socket, &hop))).await;
    let subject = format!("CONNECT {} via {}", hop.target, proxy.address);
    let credentials = match &proxy.credentials {
        Some(credentials) => format!("Basic credentials of `{}`", credentials.user()),
        None => "no credentials".to_owned(),
    };
    let step = match answered {
        Ok(Ok(())) => Step::new(
            "proxy-connect",
            subject,
            Outcome::Pass,
            took,
            format!("the proxy opened the way to the relay ({credentials})"),
        ),
        Ok(Err(refused)) => {
            report.push(Step::new(
                "proxy-connect",
                subject,
                Outcome::Fail,
                took,
                refused.to_string(),
            ));
            return None;
        }
        Err(_) => {
            let reason =
                format!("the proxy did not answer the CONNECT within {:?}", Timers::HANDSHAKE);
            report.push(Step::new("proxy-connect", subject, Outcome::Fail, took, reason));
            return None;
        }
    };
    report.push(step);
    addr.map(|addr| vec![addr])
}
