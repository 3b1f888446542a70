//! The relay fleet this relay belongs to (`[fleet]` in relay.toml): its own id — the tunnel
//! address it advertises — and every member's, from a list or from a name that resolves to
//! every relay (a Kubernetes headless Service), resolved again every [`REFRESH`]. Agent
//! sessions tell their agents the fleet before the welcome and whenever it changes, so that an
//! agent given one balancer address keeps opening links through it until it holds one to every
//! relay. Also the relay's readiness for clients: a relay in a fleet with no approving agent is
//! not ready (`/readyz` 503) while agents can still reach it.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use privlink_protocol::config::{ConfigError, ConfigSource, Spanned};
use privlink_protocol::message::{FleetView, MAX_FLEET_MEMBERS, MAX_RELAY_ID_LEN};
use privlink_protocol::text;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often `peers_dns` is resolved again.
pub const REFRESH: Duration = Duration::from_secs(10);
/// The environment variable that overrides `advertise` (the pod IP from the downward API).
pub const ADVERTISE_ENV: &str = "PRIVLINK_FLEET_ADVERTISE";

/// `[fleet]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFleet {
    #[serde(default)]
    peers: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    peers_dns: Option<Spanned<String>>,
    #[serde(default)]
    advertise: Option<Spanned<String>>,
}

/// A validated `[fleet]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSpec {
    /// This relay's id: the tunnel address agents reach it at, as the fleet lists it.
    pub advertise: String,
    /// Where the members come from.
    pub members: Members,
}

/// Where a fleet's members come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Members {
    /// Every relay's id, as written (this relay's included).
    Listed(Vec<String>),
    /// A name that resolves to every relay's address, and the tunnel port they share.
    Dns {
        /// The name.
        host: String,
        /// The port.
        port: u16,
    },
}

impl RawFleet {
    /// Validates `[fleet]`; `tunnel_listen` is the default `advertise` when it is not
    /// unspecified. [`ADVERTISE_ENV`] overrides `advertise`.
    pub(crate) fn validate(
        self,
        source: &ConfigSource,
        tunnel_listen: SocketAddr,
    ) -> Result<FleetSpec, ConfigError> {
        let members = match (self.peers, self.peers_dns) {
            (Some(peers), None) => {
                if peers.get_ref().is_empty() || peers.get_ref().len() > MAX_FLEET_MEMBERS {
                    return Err(source.error_for(
                        &peers,
                        "fleet.peers",
                        format!("list 1 to {MAX_FLEET_MEMBERS} relays"),
                    ));
                }
                for (i, peer) in peers.get_ref().iter().enumerate() {
                    if let Err(problem) = host_and_port(peer) {
                        return Err(source.error_for(
                            &peers,
                            &format!("fleet.peers[{i}]"),
                            problem,
                        ));
                    }
                }
                Members::Listed(peers.into_inner())
            }
            (None, Some(name)) => match host_and_port(name.get_ref()) {
                Ok((host, port)) => Members::Dns { host: host.to_owned(), port },
                Err(problem) => return Err(source.error_for(&name, "fleet.peers_dns", problem)),
            },
            (Some(peers), Some(_)) => {
                return Err(source.error_for(
                    &peers,
                    "fleet.peers",
                    "give either peers or peers_dns, not both",
                ));
            }
            (None, None) => {
                return Err(source.error_at(
                    None,
                    "fleet",
                    "needs peers (every relay's tunnel address) or peers_dns (a name resolving \
                     to every relay)",
                ));
            }
        };
        let advertise = match std::env::var(ADVERTISE_ENV) {
            Ok(value) => {
                let value = advertise_from_env(&value, tunnel_listen.port());
                host_and_port(&value).map_err(|problem| {
                    source.error_at(None, "fleet.advertise", format!("{ADVERTISE_ENV}: {problem}"))
                })?;
                value
            }
            Err(_) => match self.advertise {
                Some(advertise) => {
                    host_and_port(advertise.get_ref()).map_err(|problem| {
                        source.error_for(&advertise, "fleet.advertise", problem)
                    })?;
                    advertise.into_inner()
                }
                None if !tunnel_listen.ip().is_unspecified() => tunnel_listen.to_string(),
                None => {
                    return Err(source.error_at(
                        None,
                        "fleet.advertise",
                        format!(
                            "required when tunnel.listen is {tunnel_listen}: the address other \
                             relays and agents know this relay by (or set {ADVERTISE_ENV})"
                        ),
                    ));
                }
            },
        };
        if let Members::Listed(peers) = &members {
            if !peers.contains(&advertise) {
                return Err(source.error_at(
                    None,
                    "fleet.advertise",
                    format!("this relay's id `{advertise}` is not one of fleet.peers"),
                ));
            }
        }
        Ok(FleetSpec { advertise, members })
    }
}

/// An advertised address from the environment: an address with a port, or an IP alone (the
/// pod IP), which takes the tunnel's port.
fn advertise_from_env(value: &str, tunnel_port: u16) -> String {
    let value = value.trim();
    match value.parse::<std::net::IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, tunnel_port).to_string(),
        Err(_) => value.to_owned(),
    }
}

/// `host:port` (an IPv6 address in brackets), or why not.
fn host_and_port(written: &str) -> Result<(&str, u16), String> {
    if written.len() > MAX_RELAY_ID_LEN {
        return Err(format!("longer than {MAX_RELAY_ID_LEN} bytes"));
    }
    let explain = || format!("`{}` is not host:port", text::loggable(written));
    let (host, port) = written.rsplit_once(':').ok_or_else(explain)?;
    let port: u16 = port.parse().map_err(|_| explain())?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() || port == 0 {
        return Err(explain());
    }
    Ok((host, port))
}

/// The fleet as this relay sees it now, for agent sessions to announce.
#[derive(Debug)]
pub struct Fleet {
    view: watch::Sender<FleetView>,
}

impl Fleet {
    /// The fleet `spec` describes: a listed one as written; one found by name starts with this
    /// relay alone until [`Fleet::refresh`] resolves it.
    pub fn new(spec: &FleetSpec) -> Self {
        let members = match &spec.members {
            Members::Listed(peers) => peers.clone(),
            Members::Dns { .. } => Vec::new(),
        };
        Self { view: watch::Sender::new(view_of(&spec.advertise, members)) }
    }

    /// The view now.
    pub fn view(&self) -> FleetView {
        self.view.borrow().clone()
    }

    /// Changes of the view.
    pub fn subscribe(&self) -> watch::Receiver<FleetView> {
        self.view.subscribe()
    }

    /// Takes `spec` (a reload): a listed fleet as written now; one found by name resolved by
    /// the refresh.
    pub fn set_spec(&self, spec: &FleetSpec) {
        if let Members::Listed(peers) = &spec.members {
            self.set(view_of(&spec.advertise, peers.clone()));
        }
    }

    fn set(&self, view: FleetView) {
        self.view.send_if_modified(|current| {
            if *current == view {
                return false;
            }
            info!(members = ?view.members, "relay fleet");
            *current = view;
            true
        });
    }

    /// Resolves `peers_dns` now and every [`REFRESH`] until `stop`, if the fleet is found by
    /// name. A failed lookup keeps the view it had.
    pub async fn refresh(&self, spec: FleetSpec, stop: CancellationToken) {
        let Members::Dns { host, port } = &spec.members else { return };
        loop {
            match tokio::net::lookup_host((host.as_str(), *port)).await {
                Ok(addrs) => {
                    let members = addrs.map(|a| a.to_string()).collect();
                    self.set(view_of(&spec.advertise, members));
                }
                Err(e) => warn!(peers_dns = %host, "cannot resolve the relay fleet: {e}"),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(REFRESH) => {}
            }
        }
    }
}

/// A view from this relay's id and the members found: sorted, each once, this relay always
/// among them, at most [`MAX_FLEET_MEMBERS`] (this relay kept).
fn view_of(advertise: &str, members: Vec<String>) -> FleetView {
    let mut members: BTreeSet<String> = members.into_iter().collect();
    members.insert(advertise.to_owned());
    let mut members: Vec<String> = members.into_iter().collect();
    if members.len() > MAX_FLEET_MEMBERS {
        let others = members.iter().filter(|m| *m != advertise).take(MAX_FLEET_MEMBERS - 1);
        let mut kept: Vec<String> = others.cloned().chain([advertise.to_owned()]).collect();
        kept.sort();
        members = kept;
    }
    FleetView { relay: advertise.to_owned(), members }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(text: &str, listen: &str) -> Result<FleetSpec, ConfigError> {
        #[derive(Deserialize)]
        struct Doc {
            fleet: RawFleet,
        }
        let source = ConfigSource::from_text("relay.toml", text);
        let doc: Doc = source.parse()?;
        doc.fleet.validate(&source, listen.parse().expect("listen"))
    }

    #[test]
    fn a_listed_fleet_must_name_this_relay_and_valid_addresses() {
        let spec = validate(
            "[fleet]\npeers = [\"10.0.0.11:7443\", \"10.0.0.12:7443\"]\n",
            "10.0.0.12:7443",
        )
        .expect("valid");
        assert_eq!(spec.advertise, "10.0.0.12:7443", "the tunnel address by default");
        let fleet = Fleet::new(&spec);
        assert_eq!(fleet.view().members, vec!["10.0.0.11:7443", "10.0.0.12:7443"]);
        assert!(fleet.view().problem().is_none());

        let error = validate("[fleet]\npeers = [\"10.0.0.11:7443\"]\n", "10.0.0.12:7443")
            .expect_err("not a member");
        assert_eq!((error.key.as_str(), error.line), ("fleet.advertise", None));
        let error =
            validate("[fleet]\npeers = [\"10.0.0.11\"]\n", "0.0.0.0:7443").expect_err("no port");
        assert_eq!((error.key.as_str(), error.line), ("fleet.peers[0]", Some(2)));
        let error =
            validate("[fleet]\npeers_dns = \"relays\"\n", "0.0.0.0:7443").expect_err("no port");
        assert_eq!(error.key, "fleet.peers_dns");
        let error = validate("[fleet]\npeers_dns = \"relays:7443\"\n", "0.0.0.0:7443")
            .expect_err("unspecified listen, no advertise");
        assert_eq!(error.key, "fleet.advertise");
        let error =
            validate("[fleet]\nadvertise = \"a:1\"\n", "0.0.0.0:7443").expect_err("no peers");
        assert_eq!(error.key, "fleet");
        let spec = validate(
            "[fleet]\npeers_dns = \"relays.svc:7443\"\nadvertise = \"[fd00::1]:7443\"\n",
            "[::]:7443",
        )
        .expect("valid");
        assert_eq!(spec.members, Members::Dns { host: "relays.svc".into(), port: 7443 });
        assert_eq!(
            Fleet::new(&spec).view().members,
            vec!["[fd00::1]:7443"],
            "alone until resolved"
        );
    }

    #[tokio::test]
    async fn a_fleet_found_by_name_is_resolved_with_the_system_resolver() {
        let spec = FleetSpec {
            advertise: "10.9.9.9:7443".into(),
            members: Members::Dns { host: "localhost".into(), port: 7443 },
        };
        let fleet = std::sync::Arc::new(Fleet::new(&spec));
        let mut changes = fleet.subscribe();
        let stop = CancellationToken::new();
        let refreshing = tokio::spawn({
            let (fleet, stop) = (std::sync::Arc::clone(&fleet), stop.clone());
            async move { fleet.refresh(spec, stop).await }
        });
        tokio::time::timeout(Duration::from_secs(10), changes.changed())
            .await
            .expect("resolved in time")
            .expect("open");
        let members = fleet.view().members;
        assert!(members.contains(&"127.0.0.1:7443".to_owned()), "{members:?}");
        assert!(members.contains(&"10.9.9.9:7443".to_owned()), "this relay stays: {members:?}");
        stop.cancel();
        refreshing.await.expect("refresh ends when stopped");
    }

    #[test]
    fn an_ip_from_the_environment_takes_the_tunnel_port() {
        assert_eq!(advertise_from_env("10.1.2.3", 7443), "10.1.2.3:7443");
        assert_eq!(advertise_from_env("fd00::5", 7443), "[fd00::5]:7443");
        assert_eq!(advertise_from_env("relay-0.relays:7000", 7443), "relay-0.relays:7000");
    }

    #[test]
    fn a_view_keeps_this_relay_and_at_most_the_limit() {
        let many: Vec<String> = (0..100).map(|i| format!("10.0.0.{i}:7443")).collect();
        let view = view_of("10.9.9.9:7443", many);
        assert_eq!(view.members.len(), MAX_FLEET_MEMBERS);
        assert!(view.members.contains(&"10.9.9.9:7443".to_owned()));
        assert!(view.problem().is_none());
    }
}
