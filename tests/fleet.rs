//! A relay fleet behind one address, as an operator runs it: two or three relay processes with
//! `[fleet]`, HAProxy (the Debian package) in front of them twice — round-robin over the relays'
//! tunnel ports for agents (a TCP connect check), round-robin over their endpoint ports for
//! clients (an HTTP check of each relay's `/readyz`) — and agents given only the tunnel
//! balancer's address, on TLS/TCP (HAProxy balances TCP). Every agent comes to hold a link to
//! every relay; a relay no agent has reached is not ready, so the client balancer sends it
//! nobody; every client connection through the balancer is served, also while a relay joins
//! and after one dies.

#[macro_use]
mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use privlink_testbed::haproxy::{Check, Frontend, Haproxy, Server, all_up};
use privlink_testbed::process::free_fixed_port;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The destination's answer to a download.
const DOWNLOAD: usize = 4096;

/// One relay of the fleet: its files and ports, and its process while it runs.
struct FleetRelay {
    config: PathBuf,
    tunnel: SocketAddr,
    endpoint: SocketAddr,
    admin_addr: SocketAddr,
    admin: AdminProbe,
    process: Option<Running>,
}

/// Relays with `[fleet]` behind HAProxy, and the agent configuration that names only the
/// balancer.
struct RelayFleet {
    dir: tempfile::TempDir,
    relays: Vec<FleetRelay>,
    /// The base relay.toml the relays' files are made from.
    relay_text: String,
    tunnel_balancer: SocketAddr,
    client_balancer: SocketAddr,
    haproxy: Haproxy,
    agent_config: PathBuf,
    agents: Vec<(Running, AdminProbe)>,
    _destination: ChoosyServer,
}

impl RelayFleet {
    /// `count` relays' files, of which the first `running` are started, and HAProxy in front
    /// of all of them (a relay not started yet is down to it).
    async fn start(count: usize, running: usize) -> Self {
        let destination = choosy_server(DOWNLOAD).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let tunnel_balancer = loopback(free_fixed_port());
        let placeholder = (loopback(free_fixed_port()), loopback(free_fixed_port()));
        let endpoint_placeholder = loopback(free_fixed_port());
        let configs = write_tunnel_files(
            dir.path(),
            &TunnelFiles {
                tunnel_listen: &tunnel_balancer.to_string(),
                endpoint: "e",
                endpoint_listen: &endpoint_placeholder.to_string(),
                destination: &destination.addr.to_string(),
                endpoint_extra: "",
                agent_extra: "transport = \"tcp\"",
                allow: &destination.addr.to_string(),
                admin: placeholder,
            },
        );
        let relay_text = std::fs::read_to_string(&configs.relay)
            .expect("relay.toml")
            .replace(&tunnel_balancer.to_string(), "TUNNEL")
            .replace(&placeholder.0.to_string(), "ADMIN")
            .replace(&endpoint_placeholder.to_string(), "ENDPOINT");
        let relays: Vec<FleetRelay> = (0..count)
            .map(|i| {
                let admin_addr = loopback(free_fixed_port());
                FleetRelay {
                    config: dir.path().join(format!("relay-{i}.toml")),
                    tunnel: loopback(free_fixed_port()),
                    endpoint: loopback(free_fixed_port()),
                    admin_addr,
                    admin: AdminProbe::new(None, admin_addr),
                    process: None,
                }
            })
            .collect();
        let client_balancer = loopback(free_fixed_port());
        let haproxy = Haproxy::start(
            dir.path(),
            &[
                Frontend::new(
                    "tunnel",
                    tunnel_balancer,
                    relays.iter().map(|r| Server { addr: r.tunnel, admin: r.admin_addr }).collect(),
                    Check::Connect,
                ),
                Frontend::new(
                    "clients",
                    client_balancer,
                    relays
                        .iter()
                        .map(|r| Server { addr: r.endpoint, admin: r.admin_addr })
                        .collect(),
                    Check::Readyz,
                ),
            ],
        );
        let mut fleet = Self {
            dir,
            relays,
            relay_text,
            tunnel_balancer,
            client_balancer,
            haproxy,
            agent_config: PathBuf::from(configs.agent),
            agents: Vec::new(),
            _destination: destination,
        };
        let members: Vec<SocketAddr> = fleet.relays[..running].iter().map(|r| r.tunnel).collect();
        for i in 0..running {
            fleet.write_relay_config(i, &members);
            fleet.start_relay(i);
        }
        fleet
    }

    /// Writes relay `i`'s file with `members` as its fleet's peers.
    fn write_relay_config(&self, i: usize, members: &[SocketAddr]) {
        let relay = &self.relays[i];
        let peers: Vec<String> = members.iter().map(|m| format!("\"{m}\"")).collect();
        let text = self
            .relay_text
            .replace("TUNNEL", &relay.tunnel.to_string())
            .replace("ADMIN", &relay.admin_addr.to_string())
            .replace("ENDPOINT", &relay.endpoint.to_string())
            + &format!("\n[fleet]\npeers = [{}]\n", peers.join(", "));
        std::fs::write(&relay.config, text).expect("relay config");
    }

    /// Starts relay `i` and waits until its admin listener answers (it is alive; whether it is
    /// ready is the test's business).
    fn start_relay(&mut self, i: usize) {
        let relay = &mut self.relays[i];
        let config = relay.config.to_str().expect("utf-8").to_owned();
        relay.process = Some(common::privlink(&["relay", "--config", &config]));
        relay.admin.wait("/healthz", |code, _| code == 200);
    }

    /// Starts an agent that knows only the tunnel balancer, on TLS/TCP.
    fn start_agent(&mut self) -> usize {
        self.start_agent_on("tcp")
    }

    /// Starts an agent that knows only the tunnel balancer, on `transport`.
    fn start_agent_on(&mut self, transport: &str) -> usize {
        let admin = loopback(free_fixed_port());
        let text = std::fs::read_to_string(&self.agent_config)
            .expect("agent.toml")
            .replace("transport = \"tcp\"", &format!("transport = \"{transport}\""));
        let at = text.find("[admin]").expect("an [admin] table");
        let text =
            format!("{}[admin]\nlisten = \"{admin}\"\n{}", &text[..at], after_listen(&text[at..]));
        let n = self.agents.len();
        let path = self.dir.path().join(format!("agent-{n}.toml"));
        std::fs::write(&path, text).expect("agent config");
        let process = common::privlink(&["agent", "--config", path.to_str().expect("utf-8")]);
        self.agents.push((process, AdminProbe::new(None, admin)));
        n
    }

    /// Waits until agent `n` holds a link to each of `relays` (by index) and to no other, and
    /// returns how long that took from `since`.
    fn wait_covered(&self, n: usize, relays: &[usize], since: Instant) -> Duration {
        let want: Vec<String> = relays.iter().map(|&i| self.relays[i].tunnel.to_string()).collect();
        let balancer = self.tunnel_balancer.to_string();
        self.agents[n].1.wait_agent_status(|status| {
            status
                .fleets
                .iter()
                .any(|fleet| fleet.relay == balancer && sorted(&fleet.reached) == sorted(&want))
                && {
                    let mut linked: Vec<&str> = status
                        .links
                        .iter()
                        .filter(|l| l.state == "connected")
                        .filter_map(|l| l.relay_id.as_deref())
                        .collect();
                    linked.sort_unstable();
                    linked == sorted(&want).iter().map(String::as_str).collect::<Vec<_>>()
                }
        });
        since.elapsed()
    }
}

/// The rest of an `[admin]` table after its `listen` line.
fn after_listen(table: &str) -> &str {
    let listen = table.find("listen").expect("listen");
    let end = table[listen..].find('\n').map_or(table.len(), |e| listen + e + 1);
    &table[end..]
}

fn sorted(items: &[String]) -> Vec<String> {
    let mut items = items.to_vec();
    items.sort();
    items
}

/// One client connection through `balancer`: whether it got the whole download.
async fn served(balancer: SocketAddr) -> Result<(), String> {
    let attempt = async {
        let mut socket = TcpStream::connect(balancer).await.map_err(|e| e.to_string())?;
        socket.write_all(&[ask::DOWNLOAD]).await.map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        socket.read_to_end(&mut got).await.map_err(|e| e.to_string())?;
        if got.len() == DOWNLOAD {
            Ok(())
        } else {
            Err(format!("{} of {DOWNLOAD} bytes", got.len()))
        }
    };
    tokio::time::timeout(WAIT, attempt).await.unwrap_or_else(|_| Err("no answer in time".into()))
}

/// `count` client connections one after another through `balancer`: the failures.
async fn clients(balancer: SocketAddr, count: usize) -> Vec<String> {
    let mut failures = Vec::new();
    for i in 0..count {
        if let Err(e) = served(balancer).await {
            failures.push(format!("client {i}: {e}"));
        }
    }
    failures
}

/// A relay's status, read now.
fn relay_status(relay: &FleetRelay) -> privlink_admin::snapshot::RelayStatus {
    tokio::task::block_in_place(|| relay.admin.relay_status())
}

/// One agent given the balancer's address covers every relay of the fleet; until an agent has
/// reached it a relay is not ready (503 with the reason) while the tunnel balancer still takes
/// agents to it; then all 40 client connections through the client balancer are served, and a
/// continuous load after them fails none.
async fn one_agent_covers_the_fleet_and_every_client_is_served(relays: usize) {
    let mut fleet = RelayFleet::start(relays, relays).await;
    let all: Vec<usize> = (0..relays).collect();
    for relay in &fleet.relays {
        let (code, body) = tokio::task::block_in_place(|| relay.admin.get("/readyz"));
        assert_eq!(code, 503, "a relay in a fleet with no agent is not ready: {body}");
        assert!(body.contains("no agent approves"), "{body}");
        let status = relay_status(relay);
        let view = status.fleet.expect("a fleet");
        assert_eq!(view.id, relay.tunnel.to_string());
        assert_eq!(view.members.len(), relays);
        assert!(status.not_ready_reason.is_some_and(|r| r.contains("no agent approves")));
    }
    tokio::task::block_in_place(|| {
        fleet.haproxy.wait_servers("clients", |servers| {
            servers.len() == relays && servers.iter().all(|(_, s)| s.starts_with("DOWN"))
        });
    });

    let started = Instant::now();
    let agent = fleet.start_agent();
    let took = tokio::task::block_in_place(|| fleet.wait_covered(agent, &all, started));
    eprintln!("{relays} relays: one agent covered the fleet {took:?} after it started");
    for relay in &fleet.relays {
        tokio::task::block_in_place(|| relay.admin.wait("/readyz", |code, _| code == 200));
    }
    tokio::task::block_in_place(|| fleet.haproxy.wait_servers("clients", all_up));
    let failures = clients(fleet.client_balancer, 40).await;
    assert!(failures.is_empty(), "{} of 40 clients failed: {failures:?}", failures.len());
    // Every relay served some of them (the balancer spread them).
    for relay in &fleet.relays {
        let status = relay_status(relay);
        let total = status.endpoint("e").expect("endpoint e").total_connections;
        assert!(total > 0, "relay {} served none of the 40", relay.tunnel);
    }

    // A continuous load: four clients at a time for 2 s.
    let failures = Arc::new(AtomicU64::new(0));
    let served_count = Arc::new(AtomicU64::new(0));
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (failures, served_count) = (Arc::clone(&failures), Arc::clone(&served_count));
            let balancer = fleet.client_balancer;
            tokio::spawn(async move {
                while tokio::time::Instant::now() < until {
                    match served(balancer).await {
                        Ok(()) => served_count.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failures.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("worker");
    }
    let (failed, done) = (failures.load(Ordering::Relaxed), served_count.load(Ordering::Relaxed));
    eprintln!("{relays} relays: continuous load: {done} served, {failed} failed");
    assert!(done > 0);
    assert_eq!(failed, 0, "{failed} client connections failed under continuous load");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_behind_one_balancer_one_agent_covers_both() {
    one_agent_covers_the_fleet_and_every_client_is_served(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_behind_one_balancer_one_agent_covers_all() {
    one_agent_covers_the_fleet_and_every_client_is_served(3).await;
}

/// Two agents, three relays: each agent covers the fleet, and every relay lists both agents as
/// approving its endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_each_cover_three_relays() {
    let mut fleet = RelayFleet::start(3, 3).await;
    let started = Instant::now();
    let (a, b) = (fleet.start_agent(), fleet.start_agent());
    for agent in [a, b] {
        let took = tokio::task::block_in_place(|| fleet.wait_covered(agent, &[0, 1, 2], started));
        eprintln!("agent {agent} covered 3 relays in {took:?}");
    }
    for relay in &fleet.relays {
        tokio::task::block_in_place(|| {
            relay.admin.wait_relay_status(|status| {
                status.endpoint("e").is_some_and(|e| e.approving_agents.len() == 2)
            })
        });
    }
    tokio::task::block_in_place(|| fleet.haproxy.wait_servers("clients", all_up));
    let failures = clients(fleet.client_balancer, 30).await;
    assert!(failures.is_empty(), "{failures:?}");
}

/// A relay joins while clients are being served: the running relays are told (a reload with
/// the longer peer list), the agent links to the newcomer, which turns ready and gets clients;
/// no client fails. Then a relay dies: the agent notices (its coverage shows it missing), and
/// once the balancer's check has taken it out, every client is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_joins_under_load_and_one_dies() {
    let mut fleet = RelayFleet::start(3, 2).await;
    let started = Instant::now();
    let agent = fleet.start_agent();
    tokio::task::block_in_place(|| fleet.wait_covered(agent, &[0, 1], started));
    tokio::task::block_in_place(|| {
        fleet.haproxy.wait_servers("clients", |servers| {
            servers.iter().filter(|(_, s)| s.starts_with("UP")).count() == 2
        });
    });

    // Clients one after another for as long as the join takes.
    let stop = tokio_util::sync::CancellationToken::new();
    let load = {
        let (stop, balancer) = (stop.clone(), fleet.client_balancer);
        tokio::spawn(async move {
            let (mut done, mut failures) = (0u64, Vec::new());
            while !stop.is_cancelled() {
                match served(balancer).await {
                    Ok(()) => done += 1,
                    Err(e) => failures.push(e),
                }
            }
            (done, failures)
        })
    };
    let members: Vec<SocketAddr> = fleet.relays.iter().map(|r| r.tunnel).collect();
    fleet.write_relay_config(2, &members);
    fleet.start_relay(2);
    for i in 0..2 {
        fleet.write_relay_config(i, &members);
        let pid = fleet.relays[i].process.as_ref().expect("running").pid().to_string();
        std::process::Command::new("kill").args(["-HUP", &pid]).status().expect("kill -HUP");
    }
    let joined = Instant::now();
    let took = tokio::task::block_in_place(|| fleet.wait_covered(agent, &[0, 1, 2], joined));
    eprintln!("the agent linked to the new relay {took:?} after the fleet was told");
    tokio::task::block_in_place(|| fleet.haproxy.wait_servers("clients", all_up));
    // Some clients through the newcomer.
    let newcomer = &fleet.relays[2];
    let before = relay_status(newcomer).endpoint("e").expect("e").total_connections;
    let failures = clients(fleet.client_balancer, 9).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert!(relay_status(newcomer).endpoint("e").expect("e").total_connections > before);
    stop.cancel();
    let (done, failures) = load.await.expect("load");
    eprintln!("during the join: {done} clients served, {} failed", failures.len());
    assert!(done > 0);
    assert!(failures.is_empty(), "clients failed while a relay joined: {failures:?}");

    // Relay 0 dies.
    fleet.relays[0].process.as_mut().expect("running").kill_hard();
    let dead = fleet.relays[0].tunnel.to_string();
    tokio::task::block_in_place(|| {
        fleet.agents[agent]
            .1
            .wait_agent_status(|status| status.fleets.iter().any(|f| f.missing == [dead.clone()]))
    });
    tokio::task::block_in_place(|| {
        fleet.haproxy.wait_servers("clients", |servers| {
            servers.first().is_some_and(|(_, s)| s.starts_with("DOWN"))
                && servers[1..].iter().all(|(_, s)| s.starts_with("UP"))
        });
    });
    let failures = clients(fleet.client_balancer, 20).await;
    assert!(failures.is_empty(), "after the balancer took the dead relay out: {failures:?}");
    // The agent's metrics say it too.
    let metrics = tokio::task::block_in_place(|| fleet.agents[agent].1.get("/metrics")).1;
    let series = format!(
        "privlink_agent_fleet_relays{{relay=\"{}\",state=\"missing\"}} 1",
        fleet.tunnel_balancer
    );
    assert!(metrics.contains(&series), "{series} not in:\n{metrics}");
}

/// QUIC: HAProxy balances no UDP, so a small UDP balancer of the test bed (each new flow to the
/// next relay, round-robin, as a network load balancer spreads flows) stands on the tunnel
/// balancer's port. Links that shared the agent's one UDP socket would be one flow, and all
/// land on one relay; each link in front of a fleet goes out from a socket of its own, so the
/// agent covers all three relays, and every client through the TCP client balancer is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_quic_through_a_udp_balancer_one_agent_covers_three_relays() {
    let mut fleet = RelayFleet::start(3, 3).await;
    let backends = fleet.relays.iter().map(|r| r.tunnel).collect();
    let _udp = privlink_testbed::udp_balancer::UdpBalancer::start(fleet.tunnel_balancer, backends)
        .await
        .expect("udp balancer");
    let started = Instant::now();
    let agent = fleet.start_agent_on("quic");
    let took = tokio::task::block_in_place(|| fleet.wait_covered(agent, &[0, 1, 2], started));
    eprintln!("QUIC: one agent covered 3 relays {took:?} after it started");
    let status = tokio::task::block_in_place(|| fleet.agents[agent].1.agent_status());
    assert!(
        status
            .links
            .iter()
            .filter(|l| l.state == "connected")
            .all(|l| l.transport.as_deref() == Some("quic")),
        "{:?}",
        status.links
    );
    tokio::task::block_in_place(|| fleet.haproxy.wait_servers("clients", all_up));
    let failures = clients(fleet.client_balancer, 30).await;
    assert!(failures.is_empty(), "{failures:?}");
}
