//! Endpoint listeners: [`Listeners`], the one owner of the endpoints' accept loops — it starts
//! them, at start and on reload, into one task tracker with the client tasks they spawn, and
//! stops and drains them at shutdown — and the policy applied on accept, before a byte is
//! read ([`admit`]): the source-IP ACL, then the connection limit. An admitted connection gets
//! a task of its own (see [`crate::dispatch`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use privlink_protocol::client_hello::ACCESS_DENIED_ALERT;
use privlink_transport::budget::BufferBudget;
use privlink_transport::{drain, tcp};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, warn};

use crate::audit::{Place, RelayAudit};
use crate::config::EndpointSpec;
use crate::dispatch;
use crate::endpoint::{Endpoint, EndpointTable, Held};
use crate::metrics::RelayMetrics;
use crate::registry::Registry;
use crate::shared_port::SharedPort;
use crate::source_limits::SourceSlot;
use crate::{preread, refuse};

/// The owner of every endpoint accept loop and the client connections they accept.
#[derive(Debug)]
pub(crate) struct Listeners {
    /// Where admitted connections find their agents.
    registry: Arc<Registry>,
    /// Counters and histograms every endpoint reports into.
    metrics: Arc<RelayMetrics>,
    /// The audit trail every endpoint records its connections in.
    pub(crate) audit: Arc<RelayAudit>,
    /// What clients that do not read may make the relay hold, all endpoints together.
    pub(crate) budget: Arc<BufferBudget>,
    /// Cancelled when the relay stops accepting clients; each endpoint's stop is a child.
    stop: CancellationToken,
    /// Cancelled when the drain's grace is over; each endpoint's force is a child.
    force: CancellationToken,
    /// Every accept loop and every client task, drained together at shutdown.
    tasks: TaskTracker,
    /// Room for clients refused on accept (ACL, limits) to be told with a TLS alert: each
    /// takes a task and a socket for up to two [`refuse::ALERT_WAIT`]s, so a flood of them
    /// beyond this many at once is reset as before.
    courtesy: Arc<Semaphore>,
}

/// Most refused clients told with an alert at once (see [`Listeners`]).
pub(crate) const MAX_COURTEOUS_REFUSALS: usize = 256;

impl Listeners {
    pub(crate) fn new(
        registry: Arc<Registry>,
        (metrics, audit): (Arc<RelayMetrics>, Arc<RelayAudit>),
        budget: Arc<BufferBudget>,
    ) -> Self {
        Self {
            registry,
            metrics,
            audit,
            budget,
            stop: CancellationToken::new(),
            force: CancellationToken::new(),
            tasks: TaskTracker::new(),
            courtesy: Arc::new(Semaphore::new(MAX_COURTEOUS_REFUSALS)),
        }
    }

    /// Turns away a client refused on accept, before it has sent anything we read: with the
    /// `access_denied` alert if it speaks TLS and there is room for the courtesy, else with a
    /// reset.
    fn refuse_on_accept(
        tasks: &TaskTracker,
        courtesy: &Arc<Semaphore>,
        socket: tokio::net::TcpStream,
    ) {
        match Arc::clone(courtesy).try_acquire_owned() {
            Ok(permit) => {
                tasks.spawn(async move {
                    refuse::with_alert(socket, None, ACCESS_DENIED_ALERT).await;
                    drop(permit);
                });
            }
            Err(_) => tcp::abort(socket),
        }
    }

    /// A stop token for a shared listener: cancelled with every accept loop.
    pub(crate) fn child_stop(&self) -> CancellationToken {
        self.stop.child_token()
    }

    /// A new endpoint under these listeners' stop and force.
    pub(crate) fn endpoint(&self, spec: EndpointSpec) -> Arc<Endpoint> {
        Arc::new(Endpoint::new(
            spec,
            (Arc::clone(&self.metrics), Arc::clone(&self.audit)),
            Arc::new(BufferBudget::share_of(&self.budget)),
            self.stop.child_token(),
            self.force.child_token(),
        ))
    }

    /// Starts accepting clients on `listener` for `endpoint`, until the relay stops or the
    /// endpoint is retired; its connections end early only when forced.
    pub(crate) fn start(&self, endpoint: Arc<Endpoint>, listener: TcpListener) {
        let span = tracing::info_span!("endpoint", endpoint = %endpoint.name);
        let registry = Arc::clone(&self.registry);
        let tasks = self.tasks.clone();
        let courtesy = Arc::clone(&self.courtesy);
        self.tasks.spawn(
            async move {
                let stop = endpoint.stop.clone();
                tcp::accept_until(
                    &listener,
                    &stop,
                    |socket, client| {
                        let span =
                            tracing::info_span!("client", endpoint = %endpoint.name, %client);
                        let trust = endpoint.spec().proxy_protocol.clone();
                        if trust.is_some_and(|trust| trust.trusts(client.ip())) {
                            // The client is named in the balancer's PROXY header: it is judged once
                            // that is read, in its own task.
                            let (endpoint, registry) =
                                (Arc::clone(&endpoint), Arc::clone(&registry));
                            tasks.spawn(
                                async move {
                                    behind_balancer(socket, client, &endpoint, &registry).await
                                }
                                .instrument(span),
                            );
                            return;
                        }
                        let Some((spec, slot)) = admit(&endpoint, (client, None)) else {
                            Self::refuse_on_accept(&tasks, &courtesy, socket);
                            return;
                        };
                        let endpoint = Arc::clone(&endpoint);
                        let registry = Arc::clone(&registry);
                        tasks.spawn(
                            async move {
                                let arrival = dispatch::Arrival::direct(client);
                                dispatch::forward(socket, arrival, &endpoint, spec, &registry)
                                    .await;
                                drop(slot);
                            }
                            .instrument(span),
                        );
                    },
                    |client| endpoint.refused_without_descriptors(client),
                )
                .await;
            }
            .instrument(span),
        );
    }

    /// Starts accepting clients on `listener` for the shared port `port`: the port's ACL on
    /// accept, then — in the client's own task — its ClientHello read within the port's
    /// `preread_timeout`, the endpoint that claims the name it asks for found in `endpoints`,
    /// and that endpoint's own policy ([`admit`]) before it is forwarded with the bytes read.
    pub(crate) fn start_shared(
        &self,
        port: Arc<SharedPort>,
        listener: TcpListener,
        endpoints: Arc<EndpointTable>,
    ) {
        let span = tracing::info_span!("listener", listener = %port.name);
        let registry = Arc::clone(&self.registry);
        let tasks = self.tasks.clone();
        let force = self.force.clone();
        let courtesy = Arc::clone(&self.courtesy);
        self.tasks.spawn(
            async move {
                let stop = port.stop.clone();
                tcp::accept_until(
                    &listener,
                    &stop,
                    |socket, client| {
                        let routing = port.routing();
                        let trusted = routing
                            .spec
                            .proxy_protocol
                            .as_ref()
                            .is_some_and(|t| t.trusts(client.ip()));
                        if !trusted && !routing.spec.acl.permits(client.ip()) {
                            port.refused(
                                client,
                                "acl_denied",
                                "the listener's ACL denies its source",
                            );
                            Self::refuse_on_accept(&tasks, &courtesy, socket);
                            return;
                        }
                        // A balancer's connections are judged by the client its header names, in
                        // the connection's task.
                        let source = if trusted {
                            SourceSlot::none()
                        } else {
                            let Some(source) = port.admit_source(client) else {
                                Self::refuse_on_accept(&tasks, &courtesy, socket);
                                return;
                            };
                            source
                        };
                        let span = tracing::info_span!("client", listener = %port.name, %client);
                        let (port, endpoints) = (Arc::clone(&port), Arc::clone(&endpoints));
                        let (registry, force) = (Arc::clone(&registry), force.clone());
                        tasks.spawn(
                            async move {
                                let peer = (client, source);
                                route(socket, peer, &port, &endpoints, &registry, &force).await;
                            }
                            .instrument(span),
                        );
                    },
                    |client| {
                        let detail = "the relay has no file descriptor left (raise its open-file \
                                  limit: LimitNOFILE, ulimit -n)";
                        port.refused(client, crate::endpoint::NO_DESCRIPTORS, detail);
                    },
                )
                .await;
            }
            .instrument(span),
        );
    }

    /// Stops every accept loop: new clients are refused from here on.
    pub(crate) fn stop_accepting(&self) {
        self.stop.cancel();
    }

    /// Waits up to `grace` for the open connections, then forces the rest closed.
    pub(crate) async fn drain(&self, grace: Duration) {
        drain::drain(&self.tasks, grace, &self.force, "connections").await;
    }
}

/// A connection to a dedicated endpoint from its trusted load balancer: the PROXY header read,
/// the client it names judged by the endpoint's policy, forwarded (a `LOCAL` header — the
/// balancer's health check — is answered by the close).
async fn behind_balancer(
    mut socket: tokio::net::TcpStream,
    balancer: SocketAddr,
    endpoint: &Endpoint,
    registry: &Registry,
) {
    let timeout = endpoint.spec().preread_timeout;
    let arrival = match read_proxy_header(&mut socket, balancer, timeout, &endpoint.force).await {
        Ok(Some(arrival)) => arrival,
        Ok(None) => return,
        Err(why) => {
            endpoint.metrics.connection_refused(&endpoint.name, "proxy_header_invalid");
            let place = Place::Endpoint(&endpoint.name);
            endpoint.audit.denied((balancer, None), place, "proxy_header_invalid", Some(&why));
            if let Some(left_out) = endpoint.over_limit_log.admit(std::time::Instant::now()) {
                warn!(%balancer, left_out, "connection refused: {why} (left_out: refusals since the last such line)");
            }
            tcp::abort(socket);
            return;
        }
    };
    let Some((spec, slot)) = admit(endpoint, (arrival.client, arrival.via)) else {
        // In the client's own task already: the bytes after the header say whether it speaks TLS.
        let first = arrival.read.first().copied();
        refuse::with_alert(socket, first, ACCESS_DENIED_ALERT).await;
        return;
    };
    dispatch::forward(socket, arrival, endpoint, spec, registry).await;
    drop(slot);
}

/// Reads a trusted balancer's PROXY header: the client it names and what followed it; `None`
/// for a `LOCAL` header or one that names no addresses (the balancer's own connection).
async fn read_proxy_header(
    socket: &mut tokio::net::TcpStream,
    balancer: SocketAddr,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<Option<dispatch::Arrival>, String> {
    let (header, read) = preread::proxy_header(socket, timeout, cancel).await?;
    Ok(header.addresses.filter(|_| !header.local).map(|(client, _)| dispatch::Arrival {
        client,
        via: Some(balancer),
        read,
        routed: false,
        max_duration: None,
    }))
}

/// One connection to a shared port: the PROXY header of a trusted balancer, then its
/// ClientHello read, routed by the name it asks for, admitted by that endpoint's policy,
/// forwarded.
async fn route(
    mut socket: tokio::net::TcpStream,
    (peer, mut source): (SocketAddr, SourceSlot),
    port: &SharedPort,
    endpoints: &EndpointTable,
    registry: &Registry,
    force: &CancellationToken,
) {
    let Some(waiting) = port.start_preread() else {
        port.refused(peer, "over_limit", "too many connections wait for their ClientHello");
        tcp::abort(socket);
        return;
    };
    let routing = port.routing();
    let timeout = routing.spec.preread_timeout;
    let trusted = routing.spec.proxy_protocol.as_ref().is_some_and(|t| t.trusts(peer.ip()));
    let (client, via, first) = if trusted {
        match read_proxy_header(&mut socket, peer, timeout, force).await {
            Ok(Some(arrival)) => (arrival.client, arrival.via, arrival.read),
            Ok(None) => return,
            Err(why) => {
                port.refused(peer, "proxy_header_invalid", &why);
                tcp::abort(socket);
                return;
            }
        }
    } else {
        (peer, None, Vec::new())
    };
    if via.is_some() {
        if !routing.spec.acl.permits(client.ip()) {
            port.refused(client, "acl_denied", "the listener's ACL denies its source");
            refuse::with_alert(socket, first.first().copied(), ACCESS_DENIED_ALERT).await;
            return;
        }
        let Some(admitted) = port.admit_source(client) else {
            refuse::with_alert(socket, first.first().copied(), ACCESS_DENIED_ALERT).await;
            return;
        };
        source = admitted;
    }
    let read = preread::server_name(&mut socket, first, timeout, force).await;
    drop(waiting);
    if routing.spec.proxy_protocol.is_some() && via.is_none() {
        let forged = match &read {
            Ok((bytes, _)) | Err((bytes, _)) => preread::looks_like_proxy_header(bytes),
        };
        if forged {
            port.refused(
                client,
                "proxy_header_invalid",
                "a PROXY header from a source not trusted to send one",
            );
            tcp::abort(socket);
            return;
        }
    }
    let endpoint = match &read {
        Ok((_, Some(name))) => routing.names.route(name).and_then(|name| endpoints.get(name)),
        _ => None,
    };
    let (Some(endpoint), Ok((bytes, _))) = (endpoint, read.as_ref()) else {
        let asked = preread::refuse(socket, read).await;
        port.refused(client, "sni_unmatched", &asked);
        return;
    };
    let arrival = dispatch::Arrival {
        client,
        via,
        read: bytes.clone(),
        routed: true,
        max_duration: routing.spec.max_duration,
    };
    let Some((spec, slot)) = admit(&endpoint, (client, via)) else {
        // Its ClientHello was read to route it.
        refuse::with_alert(socket, bytes.first().copied(), ACCESS_DENIED_ALERT).await;
        return;
    };
    dispatch::forward(socket, arrival, &endpoint, spec, registry).await;
    drop((slot, source));
}

/// The policy on accept: the ACL, then the source's own limits, then `max_connections`, then
/// the buffer budget. An admitted connection gets the spec in force now and what it holds
/// until it ends; a refused one is counted by reason.
pub(crate) fn admit(
    endpoint: &Endpoint,
    peer: (SocketAddr, Option<SocketAddr>),
) -> Option<(Arc<EndpointSpec>, Held)> {
    let client = peer.0;
    let spec = endpoint.spec();
    let place = Place::Endpoint(&endpoint.name);
    if !spec.acl.permits(client.ip()) {
        endpoint.counters.denied.fetch_add(1, Ordering::Relaxed);
        endpoint.metrics.connection_refused(&endpoint.name, "acl_denied");
        endpoint.audit.denied(peer, place, "acl_denied", None);
        debug!(%client, "connection denied by ACL");
        return None;
    }
    let now = std::time::Instant::now();
    let source = match endpoint.sources.admit(client.ip(), &spec.per_source, now) {
        Ok(source) => source,
        Err(refusal) => {
            endpoint.counters.over_limit.fetch_add(1, Ordering::Relaxed);
            endpoint.metrics.connection_refused(&endpoint.name, refusal.label());
            endpoint.audit.denied(peer, place, refusal.label(), None);
            if let Some(left_out) = endpoint.over_limit_log.admit(now) {
                warn!(
                    %client,
                    limit = refusal.label(),
                    left_out,
                    "connection refused: its source is over the endpoint's per-source limit \
                     (left_out: refusals since the last such line; all are counted in \
                     privlink_relay_connections_total)"
                );
            }
            return None;
        }
    };
    let Some(slot) = endpoint.admit(spec.max_connections) else {
        endpoint.counters.over_limit.fetch_add(1, Ordering::Relaxed);
        endpoint.metrics.connection_refused(&endpoint.name, "over_limit");
        endpoint.audit.denied(peer, place, "over_limit", None);
        if let Some(left_out) = endpoint.over_limit_log.admit(std::time::Instant::now()) {
            warn!(
                %client,
                max_connections = spec.max_connections,
                left_out,
                "connection refused: endpoint at max_connections (left_out: refusals since \
                 the last such line; all are counted in privlink_relay_connections_total)"
            );
        }
        return None;
    };
    if !endpoint.budget.has_room() {
        endpoint.refused_over_budget(peer);
        return None;
    }
    endpoint.counters.accepted.fetch_add(1, Ordering::Relaxed);
    Some((spec, Held::new(slot, source)))
}

#[cfg(test)]
mod tests {
    use privlink_protocol::acl::Acl;

    use super::*;
    use crate::config::OpenRetry;

    fn endpoint(acl: Acl, max_connections: usize) -> Arc<Endpoint> {
        endpoint_within(acl, max_connections, Arc::new(BufferBudget::new(1 << 20)))
    }

    fn endpoint_within(
        acl: Acl,
        max_connections: usize,
        budget: Arc<BufferBudget>,
    ) -> Arc<Endpoint> {
        let spec = EndpointSpec {
            name: "kv".into(),
            connector: "azure".into(),
            destination: "contoso-kv.privatelink.vaultcore.azure.net:443".parse().expect("dest"),
            listen: "127.0.0.1:0".parse().expect("addr"),
            inactivity_timeout: Duration::from_secs(60),
            stall_timeout: Duration::from_secs(30),
            max_connections,
            per_source: Default::default(),
            max_duration: None,
            acl,
            open: OpenRetry::default(),
            server_names: Vec::new(),
            listener: None,
            proxy_protocol: None,
            send_proxy_protocol: None,
            preread_timeout: crate::config::DEFAULT_PREREAD_TIMEOUT,
        };
        let listeners = Listeners::new(Arc::default(), Default::default(), budget);
        listeners.endpoint(spec)
    }

    fn client(ip: &str) -> (SocketAddr, Option<SocketAddr>) {
        (SocketAddr::new(ip.parse().expect("ip"), 40000), None)
    }

    #[test]
    fn the_acl_is_applied_before_the_limit_and_counted() {
        let acl = Acl {
            allow: vec!["10.0.0.0/8".parse().expect("net")],
            deny: vec!["10.9.0.0/16".parse().expect("net")],
        };
        let endpoint = endpoint(acl, 1);
        assert!(admit(&endpoint, client("192.0.2.1")).is_none(), "not in the allow list");
        assert!(admit(&endpoint, client("10.9.1.1")).is_none(), "deny wins over allow");
        // An IPv4 client seen on a dual-stack socket is judged as IPv4.
        assert!(admit(&endpoint, client("::ffff:10.9.1.1")).is_none());
        let admitted = admit(&endpoint, client("10.1.1.1")).expect("allowed");
        assert_eq!(admitted.0.name, "kv");
        assert_eq!(endpoint.counters.denied.load(Ordering::Relaxed), 3);
        assert_eq!(endpoint.counters.over_limit.load(Ordering::Relaxed), 0);
        assert_eq!(endpoint.counters.accepted.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_limit_counts_open_connections_and_frees_a_slot_when_one_ends() {
        let endpoint = endpoint(Acl::default(), 2);
        let first = admit(&endpoint, client("192.0.2.1")).expect("first");
        let second = admit(&endpoint, client("192.0.2.2")).expect("second");
        assert_eq!(endpoint.active(), 2);
        assert!(admit(&endpoint, client("192.0.2.3")).is_none(), "over max_connections");
        assert_eq!(endpoint.counters.over_limit.load(Ordering::Relaxed), 1);
        drop(first);
        assert_eq!(endpoint.active(), 1);
        let third = admit(&endpoint, client("192.0.2.3")).expect("a slot was freed");
        drop((second, third));
        assert_eq!(endpoint.active(), 0);
    }

    #[test]
    fn over_the_buffer_budget_connections_are_refused_after_the_acl_and_the_limit() {
        let whole = Arc::new(BufferBudget::new(0));
        let endpoint = endpoint_within(Acl::default(), 1, Arc::clone(&whole));
        assert!(admit(&endpoint, client("192.0.2.1")).is_none(), "no room in the budget");
        assert_eq!(endpoint.counters.over_budget.load(Ordering::Relaxed), 1);
        whole.set_limit(4); // the endpoint's share: 3
        let admitted = admit(&endpoint, client("192.0.2.1")).expect("room again");
        assert!(admit(&endpoint, client("192.0.2.2")).is_none(), "max_connections first");
        assert_eq!(endpoint.counters.over_limit.load(Ordering::Relaxed), 1);
        assert_eq!(endpoint.counters.over_budget.load(Ordering::Relaxed), 1);
        drop(admitted);
    }

    #[test]
    fn a_reloaded_policy_applies_to_connections_accepted_after_it() {
        let endpoint = endpoint(Acl::default(), 1);
        let before = admit(&endpoint, client("192.0.2.1")).expect("admitted");
        let mut spec = (*endpoint.spec()).clone();
        spec.max_connections = 2;
        spec.acl.deny = vec!["192.0.2.9/32".parse().expect("net")];
        endpoint.set_spec(spec);
        assert_eq!(before.0.max_connections, 1, "an open connection keeps its spec");
        assert!(admit(&endpoint, client("192.0.2.9")).is_none(), "the new deny entry");
        assert!(admit(&endpoint, client("192.0.2.2")).is_some(), "the new limit");
    }
}
