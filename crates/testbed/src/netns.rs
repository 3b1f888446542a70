//! Network namespaces made and torn down by a test: separate networks on one machine, joined by
//! veth pairs (a plain cable) or by a [`LinkEmulator`] (a slow, lossy WAN), with optional
//! per-namespace hosts files (`ip netns exec` bind-mounts `/etc/netns/NAME/hosts`), commands
//! run inside a namespace, and threads that enter one so that in-process sockets live there.
//!
//! Needs root and iproute2 (nftables for tests that filter). Where namespaces cannot be made,
//! [`Topology::create`] says why so that the caller can skip loudly.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::linkemu::{LinkEmulator, LinkProfile};

/// Runs a command, returning whether it succeeded and its stderr.
pub fn sh(program: &str, args: &[&str]) -> (bool, String) {
    match Command::new(program).args(args).output() {
        Ok(out) => (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned()),
        Err(e) => (false, e.to_string()),
    }
}

/// Runs a command that must succeed (test set-up), panicking with its stderr otherwise.
pub fn must(program: &str, args: &[&str]) {
    let (ok, stderr) = sh(program, args);
    assert!(ok, "{program} {}: {stderr}", args.join(" "));
}

/// Name of the nftables table [`drop_outbound_udp`] adds.
pub const UDP_DROP_TABLE: &str = "plkdropudp";

/// Makes namespace `ns` drop every UDP datagram it sends (a network that passes only TCP);
/// [`allow_outbound_udp`] lifts it. Needs nftables.
pub fn drop_outbound_udp(ns: &str) {
    let nft = |rule: &str| must("ip", &["netns", "exec", ns, "nft", rule]);
    nft(&format!("add table inet {UDP_DROP_TABLE}"));
    nft(&format!(
        "add chain inet {UDP_DROP_TABLE} out {{ type filter hook output priority 0 ; policy accept ; }}"
    ));
    nft(&format!("add rule inet {UDP_DROP_TABLE} out meta l4proto udp drop"));
}

/// Undoes [`drop_outbound_udp`].
pub fn allow_outbound_udp(ns: &str) {
    must("ip", &["netns", "exec", ns, "nft", &format!("delete table inet {UDP_DROP_TABLE}")]);
}

/// Environment variable that makes the namespace tests skip, on purpose, where the machine
/// cannot run them.
pub const SKIP_ENV: &str = "PRIVLINK_SKIP_NETNS";

/// What a namespace test does when the machine cannot run it: fail, naming the reason, unless
/// [`SKIP_ENV`]`=1` says the skip is wanted — then it prints a loud notice and the test
/// returns. The build (the root package's build.rs) marks the namespace tests `#[ignore]`
/// before they run where the machine lacks root, `/dev/net/tun`, iproute2 or nftables, or with
/// [`SKIP_ENV`]`=1`, so a plain `cargo test` counts them as ignored; this is the fallback for a
/// machine that passed that look and still cannot make a namespace.
pub fn skip_notice(reason: &str) {
    skip_or_fail(reason, std::env::var(SKIP_ENV).ok().as_deref());
}

fn skip_or_fail(reason: &str, skip_env: Option<&str>) {
    if skip_env == Some("1") {
        eprintln!("\n*** SKIPPED ({SKIP_ENV}=1): network-namespace test not run: {reason} ***\n");
        return;
    }
    panic!(
        "network-namespace test cannot run on this machine: {reason}. It needs root, \
         /dev/net/tun, iproute2, nftables, curl, openssl and python3 (`.ci/run` installs the \
         packages); set {SKIP_ENV}=1 to skip the namespace tests on purpose."
    );
}

/// A link between namespaces `a` and `b` (indexes into the topology's names), with the
/// address each end gets (a /30 is assumed).
#[derive(Clone, Debug)]
pub struct Link {
    pub a: usize,
    pub b: usize,
    pub a_addr: String,
    pub b_addr: String,
    /// `None`: a veth pair. `Some`: a TUN pair through the userspace link emulator.
    pub emulated: Option<LinkProfile>,
}

impl Link {
    /// A veth pair: a perfect cable.
    pub fn veth(a: usize, b: usize, a_addr: &str, b_addr: &str) -> Self {
        Self { a, b, a_addr: a_addr.to_owned(), b_addr: b_addr.to_owned(), emulated: None }
    }

    /// A path through the link emulator with `profile`.
    pub fn emulated(a: usize, b: usize, a_addr: &str, b_addr: &str, profile: LinkProfile) -> Self {
        Self { a, b, a_addr: a_addr.to_owned(), b_addr: b_addr.to_owned(), emulated: Some(profile) }
    }
}

/// Namespaces and the links between them; everything is deleted on drop.
#[derive(Debug)]
pub struct Topology {
    namespaces: Vec<String>,
    links: Vec<Link>,
    interfaces: Vec<(String, String)>,
    emulators: Vec<Option<LinkEmulator>>,
    hosts_dirs: Vec<PathBuf>,
}

impl Topology {
    /// Creates one namespace per name (made unique with `tag` and the process id) and the
    /// links. Errs, for a loud skip, where the machine cannot make namespaces.
    pub fn create(tag: &str, names: &[&str], links: &[Link]) -> Result<Self, String> {
        let (root, _) = sh("sh", &["-c", "[ \"$(id -u)\" = 0 ]"]);
        if !root {
            return Err("not running as root".into());
        }
        for tool in ["ip", "nft"] {
            if !sh("sh", &["-c", &format!("command -v {tool}")]).0 {
                return Err(format!("`{tool}` is not installed"));
            }
        }
        let id = std::process::id() % 100_000;
        let mut topology = Self {
            namespaces: Vec::new(),
            links: links.to_vec(),
            interfaces: Vec::new(),
            emulators: Vec::new(),
            hosts_dirs: Vec::new(),
        };
        for name in names {
            let ns = format!("plk-{tag}-{name}-{id}");
            let (ok, stderr) = sh("ip", &["netns", "add", &ns]);
            if !ok {
                return Err(format!("cannot create a network namespace: {stderr}"));
            }
            must("ip", &["-n", &ns, "link", "set", "lo", "up"]);
            topology.namespaces.push(ns);
        }
        for (n, link) in links.iter().enumerate() {
            // Interface names are limited to 15 bytes.
            let (a_if, b_if) = (format!("p{tag}{n}a{id}"), format!("p{tag}{n}b{id}"));
            let emulator = match &link.emulated {
                None => {
                    must("ip", &["link", "add", &a_if, "type", "veth", "peer", "name", &b_if]);
                    None
                }
                Some(profile) => Some(
                    LinkEmulator::start(&a_if, &b_if, profile.clone(), 0x5eed + n as u64)
                        .map_err(|e| format!("cannot start the link emulator: {e}"))?,
                ),
            };
            for (ns, ifname, addr) in [(link.a, &a_if, &link.a_addr), (link.b, &b_if, &link.b_addr)]
            {
                let ns = &topology.namespaces[ns];
                must("ip", &["link", "set", ifname, "netns", ns]);
                if emulator.is_some() {
                    // Keep IPv6 chatter (router solicitations) off the emulated path: the
                    // tests count packets.
                    must(
                        "ip",
                        &[
                            "netns",
                            "exec",
                            ns,
                            "sysctl",
                            "-qw",
                            &format!("net.ipv6.conf.{ifname}.disable_ipv6=1"),
                        ],
                    );
                }
                must("ip", &["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", ifname]);
                must("ip", &["-n", ns, "link", "set", ifname, "up"]);
            }
            topology.interfaces.push((a_if, b_if));
            topology.emulators.push(emulator);
        }
        Ok(topology)
    }

    /// The full name of namespace `index`.
    pub fn ns(&self, index: usize) -> &str {
        &self.namespaces[index]
    }

    /// Takes both ends of link `n` down or up (a cut cable).
    pub fn set_link_up(&self, n: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        let link = &self.links[n];
        let (a_if, b_if) = &self.interfaces[n];
        for (ns, ifname) in [(link.a, a_if), (link.b, b_if)] {
            must("ip", &["-n", &self.namespaces[ns], "link", "set", ifname, state]);
        }
    }

    /// The emulator of link `n`, if it is an emulated link.
    pub fn emulator(&self, n: usize) -> Option<&LinkEmulator> {
        self.emulators.get(n).and_then(Option::as_ref)
    }

    /// Gives a namespace its own /etc/hosts.
    pub fn set_hosts(&mut self, index: usize, hosts: &str) {
        let dir = Path::new("/etc/netns").join(&self.namespaces[index]);
        std::fs::create_dir_all(&dir).expect("create /etc/netns/NAME");
        std::fs::write(dir.join("hosts"), format!("127.0.0.1 localhost\n{hosts}\n"))
            .expect("hosts");
        self.hosts_dirs.push(dir);
    }

    /// Gives a namespace its own /etc/resolv.conf (`ip netns exec` bind-mounts it like the
    /// hosts file), for tests of how the agent's system resolver is used.
    pub fn set_resolver(&mut self, index: usize, resolv_conf: &str) {
        let dir = Path::new("/etc/netns").join(&self.namespaces[index]);
        std::fs::create_dir_all(&dir).expect("create /etc/netns/NAME");
        std::fs::write(dir.join("resolv.conf"), resolv_conf).expect("resolv.conf");
        self.hosts_dirs.push(dir);
    }

    /// A command that runs `program` inside namespace `ns` (a full name from [`Self::ns`]).
    pub fn exec(&self, ns: &str, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns, program]).args(args);
        command
    }

    /// Runs a program in a namespace to completion; returns success, stdout and stderr.
    pub fn run(&self, ns: &str, program: &str, args: &[&str]) -> (bool, String, String) {
        let out = self.exec(ns, program, args).output().expect("run in namespace");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs `work` on a new thread that has entered namespace `ns`, with a current-thread
    /// tokio runtime of its own: every socket it opens lives in that namespace.
    pub fn run_in<T, F, Fut>(&self, ns: &str, work: F) -> std::io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
    {
        run_in_namespace(ns, work)
    }
}

/// Runs `work` on a new thread inside namespace `ns` and waits for it (see
/// [`Topology::run_in`]).
pub fn run_in_namespace<T, F, Fut>(ns: &str, work: F) -> std::io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    spawn_in_namespace(ns, work)
        .join()
        .map_err(|_| std::io::Error::other("the namespace thread panicked"))?
}

/// Starts `work` on a new thread that enters namespace `ns` and runs it on a current-thread
/// tokio runtime of its own; join the handle for its result.
pub fn spawn_in_namespace<T, F, Fut>(
    ns: &str,
    work: F,
) -> std::thread::JoinHandle<std::io::Result<T>>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    let path = Path::new("/run/netns").join(ns);
    std::thread::spawn(move || -> std::io::Result<T> {
        let handle = File::open(&path)?;
        nix::sched::setns(handle, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        Ok(runtime.block_on(work()))
    })
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting a namespace removes its interfaces (veth pairs go with either end); the
        // emulators stop when their interfaces vanish or when dropped here.
        for ns in &self.namespaces {
            let _ = sh("ip", &["netns", "del", ns]);
        }
        self.emulators.clear();
        for dir in &self.hosts_dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skip_is_a_failure_unless_asked_for() {
        skip_or_fail("no /dev/net/tun", Some("1"));
        let failed = std::panic::catch_unwind(|| skip_or_fail("no /dev/net/tun", None));
        let message = failed.expect_err("an unrequested skip fails");
        let text = message.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(text.contains("no /dev/net/tun") && text.contains(SKIP_ENV), "{text}");
        assert!(std::panic::catch_unwind(|| skip_or_fail("x", Some("0"))).is_err());
    }
}
