//! Fleet coverage: which relays of a fleet this agent's links reach. A relay with a `[fleet]`
//! tells each link which relay it is and every relay of its fleet (`Control::Fleet`), before
//! its welcome. Behind a load balancer every link to the one configured address lands on some
//! relay; [`FleetCover`] keeps, for one configured relay address, which link holds which relay,
//! so that a link that lands on a relay another link holds closes before it judges anything
//! (and dials again, to land elsewhere), and so that the address gets as many links as the fleet
//! has relays ([`Link`] is one link as its task and session see it). The link tasks in `links`
//! act on what it says; status and metrics show it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use privlink_protocol::message::{FleetView, MAX_FLEET_MEMBERS};
use tokio::sync::watch;

use crate::config::RelayAddress;

/// One link of the agent: the address it dials and which of that address's links it is (an
/// address behind a balancer has one per relay of the fleet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LinkKey {
    /// The relay address dialled.
    pub address: SocketAddr,
    /// Which of the address's links (0 for the first).
    pub slot: u16,
}

impl fmt::Display for LinkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.slot {
            0 => write!(f, "{}", self.address),
            slot => write!(f, "{}#{slot}", self.address),
        }
    }
}

/// What a link that reached a relay should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reached {
    /// Keep it: it is the link to this relay.
    Held,
    /// Close it: another link holds this relay already.
    Duplicate {
        /// The link that holds it.
        holder: LinkKey,
    },
}

/// Which relays of a fleet the links of one configured relay address reach.
#[derive(Debug)]
pub(crate) struct FleetCover {
    state: Mutex<CoverState>,
    /// Bumped when the fleet's members change: the address may want more links.
    changed: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct CoverState {
    /// The fleet as the newest view told it; empty while no relay has told of one.
    members: BTreeSet<String>,
    /// Which link holds each relay reached.
    holders: BTreeMap<String, LinkKey>,
    /// Links that closed because they landed on a relay another link holds, with that relay.
    duplicates: BTreeMap<LinkKey, String>,
}

/// A fleet's coverage, for status and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Every relay of the fleet.
    pub members: Vec<String>,
    /// The relays a link holds.
    pub reached: Vec<String>,
    /// The relays no link holds.
    pub missing: Vec<String>,
}

impl Default for FleetCover {
    fn default() -> Self {
        Self { state: Mutex::default(), changed: watch::Sender::new(0) }
    }
}

impl FleetCover {
    fn lock(&self) -> MutexGuard<'_, CoverState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `link` reached the relay `view.relay` of the fleet `view.members`.
    pub(crate) fn reached(&self, link: LinkKey, view: &FleetView) -> Reached {
        let mut state = self.lock();
        self.learn(&mut state, view);
        if let Some(&holder) = state.holders.get(&view.relay) {
            if holder != link {
                state.duplicates.insert(link, view.relay.clone());
                return Reached::Duplicate { holder };
            }
        }
        // One relay per link: a link that re-dialled (or moved transport) and landed elsewhere
        // holds only its newest.
        state.holders.retain(|_, holder| *holder != link);
        state.holders.insert(view.relay.clone(), link);
        state.duplicates.remove(&link);
        Reached::Held
    }

    /// A relay told of a change of its fleet.
    pub(crate) fn updated(&self, view: &FleetView) {
        let mut state = self.lock();
        self.learn(&mut state, view);
    }

    fn learn(&self, state: &mut CoverState, view: &FleetView) {
        let members: BTreeSet<String> =
            view.members.iter().take(MAX_FLEET_MEMBERS).cloned().collect();
        if members != state.members {
            state.members = members;
            self.changed.send_modify(|generation| *generation += 1);
        }
    }

    /// `link` ended: it holds no relay any more. The relay it landed on when it closed as a
    /// duplicate, if it did.
    pub(crate) fn released(&self, link: LinkKey) -> Option<String> {
        let mut state = self.lock();
        state.holders.retain(|_, holder| *holder != link);
        state.duplicates.remove(&link)
    }

    /// How many links the address wants: one per relay of the fleet (one when no relay has told
    /// of a fleet).
    pub(crate) fn links_wanted(&self) -> usize {
        self.lock().members.len().max(1)
    }

    /// Whether `link` holds a relay now.
    pub(crate) fn holds(&self, link: LinkKey) -> bool {
        self.lock().holders.values().any(|holder| *holder == link)
    }

    /// Changes of the fleet's members.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The coverage now; `None` while no relay has told of a fleet.
    pub(crate) fn coverage(&self) -> Option<Coverage> {
        let state = self.lock();
        if state.members.is_empty() {
            return None;
        }
        let (reached, missing) =
            state.members.iter().cloned().partition(|id| state.holders.contains_key(id));
        Some(Coverage { members: state.members.iter().cloned().collect(), reached, missing })
    }
}

/// One link of a configured relay: what its task and session need to know of it.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    /// The relay as configured.
    pub(crate) relay: RelayAddress,
    /// The address it dials and its slot there.
    pub(crate) key: LinkKey,
    /// Which relays of the fleet the relay's links hold.
    pub(crate) cover: Arc<FleetCover>,
    /// How many links each address of the relay wants now.
    pub(crate) per_address: Arc<AtomicUsize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(slot: u16) -> LinkKey {
        LinkKey { address: "127.0.0.1:7443".parse().expect("addr"), slot }
    }

    fn view(relay: &str, members: &[&str]) -> FleetView {
        FleetView { relay: relay.into(), members: members.iter().map(|m| (*m).into()).collect() }
    }

    #[test]
    fn one_link_per_relay_and_a_duplicate_is_told_who_holds_it() {
        let cover = FleetCover::default();
        assert_eq!(cover.links_wanted(), 1, "no fleet told of yet: one link");
        assert_eq!(cover.coverage(), None);
        let changes = cover.subscribe();
        let fleet = ["a:1", "b:1", "c:1"];
        assert_eq!(cover.reached(key(0), &view("a:1", &fleet)), Reached::Held);
        assert!(changes.has_changed().expect("open"), "the fleet grew: more links wanted");
        assert_eq!(cover.links_wanted(), 3);
        assert_eq!(
            cover.reached(key(1), &view("a:1", &fleet)),
            Reached::Duplicate { holder: key(0) }
        );
        assert_eq!(cover.released(key(1)).as_deref(), Some("a:1"), "it closed as a duplicate");
        assert_eq!(cover.reached(key(1), &view("b:1", &fleet)), Reached::Held);
        assert_eq!(
            cover.coverage(),
            Some(Coverage {
                members: fleet.map(String::from).to_vec(),
                reached: vec!["a:1".into(), "b:1".into()],
                missing: vec!["c:1".into()],
            })
        );
        // The link to a ends; another lands there.
        assert_eq!(cover.released(key(0)), None);
        assert!(!cover.holds(key(0)));
        assert_eq!(cover.reached(key(2), &view("a:1", &fleet)), Reached::Held);
        assert!(cover.holds(key(2)));
        // A link that re-dialled and landed elsewhere holds only its newest relay.
        assert_eq!(cover.reached(key(2), &view("c:1", &fleet)), Reached::Held);
        let coverage = cover.coverage().expect("a fleet");
        assert_eq!(coverage.reached, vec!["b:1".to_owned(), "c:1".to_owned()]);
        // The fleet shrinks.
        cover.updated(&view("b:1", &["b:1", "c:1"]));
        assert_eq!(cover.links_wanted(), 2);
        assert!(cover.coverage().expect("a fleet").missing.is_empty());
    }
}
