//! The admin listener's connection slots: at most [`MAX_CONNECTIONS`] at once, at most
//! [`MAX_PER_SOURCE`] from one address. When a new connection finds no room, the connection
//! still waiting longest for its request head — the one a slowloris client holds — is evicted
//! to make room (from the new connection's own source when that source is over its share).
//! A connection whose head has arrived is being answered and is never evicted, so a client
//! that trickles request heads can delay a probe by at most one eviction, not starve it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio_util::sync::CancellationToken;

use crate::MAX_CONNECTIONS;

/// Connections one address may hold at once: a quarter of the slots.
pub(crate) const MAX_PER_SOURCE: usize = MAX_CONNECTIONS / 4;

/// The open admin connections.
#[derive(Debug, Default)]
pub(crate) struct Slots {
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    /// By id, which grows with each accept: the first entry is the oldest.
    open: BTreeMap<u64, Entry>,
    next_id: u64,
}

#[derive(Debug)]
struct Entry {
    source: IpAddr,
    /// Whether its request head has arrived (it is being answered: never evicted).
    answering: bool,
    /// Cancelled to evict it.
    evict: CancellationToken,
}

impl Slots {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a connection from `source`, evicting the connection that has waited longest
    /// for its head if there is no room; `None` when every connection is being answered.
    /// `head_arrived`: its whole request head was waiting at accept already (it is answered
    /// from the start, so a storm of reconnecting tricklers cannot evict it before its task
    /// has run).
    pub(crate) fn take(self: &Arc<Self>, source: IpAddr, head_arrived: bool) -> Option<Slot> {
        let mut table = self.lock();
        let from_source = table.open.values().filter(|e| e.source == source).count();
        let over_share = from_source >= MAX_PER_SOURCE;
        if over_share || table.open.len() >= MAX_CONNECTIONS {
            let victim = table
                .open
                .iter()
                .find(|(_, e)| !e.answering && (!over_share || e.source == source))
                .map(|(id, _)| *id)?;
            if let Some(evicted) = table.open.remove(&victim) {
                evicted.evict.cancel();
            }
        }
        let id = table.next_id;
        table.next_id += 1;
        let evict = CancellationToken::new();
        table.open.insert(id, Entry { source, answering: head_arrived, evict: evict.clone() });
        Some(Slot { slots: Arc::clone(self), id, evict })
    }

    /// Connections open now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().open.len()
    }
}

/// One connection's place, released when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    slots: Arc<Slots>,
    id: u64,
    evict: CancellationToken,
}

impl Slot {
    /// Resolves when another connection evicted this one.
    pub(crate) fn evicted(&self) -> impl Future<Output = ()> + Send + 'static {
        self.evict.clone().cancelled_owned()
    }

    /// A callback for when the request head has arrived: from then on it is not evicted.
    pub(crate) fn head_received(&self) -> impl Fn() + Send + Sync + 'static {
        let slots = Arc::clone(&self.slots);
        let id = self.id;
        move || {
            if let Some(entry) = slots.lock().open.get_mut(&id) {
                entry.answering = true;
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.lock().open.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[test]
    fn the_longest_waiting_head_makes_room_and_answered_ones_stay() {
        let slots = Arc::new(Slots::default());
        let mut held: Vec<Slot> = (0..MAX_CONNECTIONS)
            .map(|i| {
                slots.take(ip(&format!("10.0.{}.{}", i / 200, i % 200 + 1)), false).expect("room")
            })
            .collect();
        held[0].head_received()(); // the oldest is being answered
        let probe = slots.take(ip("192.0.2.1"), false).expect("room is made");
        assert_eq!(slots.len(), MAX_CONNECTIONS);
        assert!(!held[0].evict.is_cancelled(), "an answered connection is never evicted");
        assert!(held[1].evict.is_cancelled(), "the next oldest waiting one is");
        drop(probe);
        for slot in &held {
            slot.head_received()();
        }
        let second = slots.take(ip("192.0.2.2"), false).expect("the probe's place, freed");
        second.head_received()();
        assert!(
            slots.take(ip("192.0.2.3"), false).is_none(),
            "all answering: the newcomer is closed"
        );
        held.clear();
        drop(second);
        assert_eq!(slots.len(), 0, "every place is given back");
    }

    #[test]
    fn one_source_is_held_to_its_share() {
        let slots = Arc::new(Slots::default());
        let attacker = ip("127.0.0.1");
        let held: Vec<Slot> =
            (0..MAX_PER_SOURCE * 3).filter_map(|_| slots.take(attacker, false)).collect();
        assert_eq!(slots.len(), MAX_PER_SOURCE, "its own oldest made room each time");
        let evicted = held.iter().filter(|s| s.evict.is_cancelled()).count();
        assert_eq!(evicted, MAX_PER_SOURCE * 2);
        assert!(slots.take(ip("192.0.2.9"), false).is_some(), "others still have room");
    }

    #[test]
    fn a_connection_whose_head_was_waiting_at_accept_is_never_evicted() {
        let slots = Arc::new(Slots::default());
        let source = ip("127.0.0.1");
        let probe = slots.take(source, true).expect("room");
        let tricklers: Vec<Slot> =
            (0..MAX_PER_SOURCE * 3).filter_map(|_| slots.take(source, false)).collect();
        assert!(!probe.evict.is_cancelled(), "the probe outlived a storm of newcomers");
        assert_eq!(
            tricklers.iter().filter(|s| s.evict.is_cancelled()).count(),
            MAX_PER_SOURCE * 2 + 1
        );
    }
}
