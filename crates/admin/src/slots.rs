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
    /// Its socket, to look at (never read) before it is chosen for eviction: a connection
    /// whose whole head has arrived but whose task has not run yet is spared.
    peek: Option<HeadPeek>,
}

/// A duplicate of a connection's descriptor, peeked at to see whether its whole request head
/// has arrived (std's `peek` is the safe one; the duplicate shares the socket and its
/// non-blocking mode, and reads nothing).
#[derive(Debug)]
pub(crate) struct HeadPeek(std::net::TcpStream);

impl HeadPeek {
    /// A peek handle on `socket` (`None` if its descriptor cannot be duplicated).
    pub(crate) fn of(socket: &tokio::net::TcpStream) -> Option<Self> {
        use std::os::fd::AsFd as _;
        let duplicate = socket.as_fd().try_clone_to_owned().ok()?;
        Some(Self(std::net::TcpStream::from(duplicate)))
    }

    /// Whether a whole request head is waiting.
    fn head_waiting(&self) -> bool {
        self.waiting() == Waiting::WholeHead
    }

    /// What has arrived and not been read yet.
    fn waiting(&self) -> Waiting {
        let mut peeked = [0u8; 2048];
        match self.0.peek(&mut peeked) {
            Ok(0) | Err(_) => Waiting::Nothing,
            Ok(n) if peeked[..n].windows(4).any(|w| w == b"\r\n\r\n") => Waiting::WholeHead,
            Ok(_) => Waiting::PartOfAHead,
        }
    }
}

/// What a connection's socket holds that its task has not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    Nothing,
    /// Bytes, but not a whole head: a client trickling its request.
    PartOfAHead,
    WholeHead,
}

impl Slots {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a connection from `source`, evicting the connection that has waited longest
    /// for its head if there is no room; `None` when every connection is being answered.
    /// `peek` looks at the new connection's socket: a connection whose whole head has arrived
    /// counts as answered even before its task has run, so a storm of reconnecting tricklers
    /// cannot evict a probe in the moment between its accept and its first read.
    pub(crate) fn take(self: &Arc<Self>, source: IpAddr, peek: Option<HeadPeek>) -> Option<Slot> {
        let mut table = self.lock();
        let from_source = table.open.values().filter(|e| e.source == source).count();
        let over_share = from_source >= MAX_PER_SOURCE;
        if over_share || table.open.len() >= MAX_CONNECTIONS {
            // At most the source's share (or all the slots) of peeks, and only when full. A
            // connection trickling its head goes first, the oldest of those; then the oldest
            // that has sent nothing yet (a probe whose head is still on its way, or a silent
            // one, which the head deadline cuts anyway).
            let mut trickling = None;
            let mut silent = None;
            for (id, entry) in &mut table.open {
                if entry.answering || (over_share && entry.source != source) {
                    continue;
                }
                match entry.peek.as_ref().map_or(Waiting::Nothing, HeadPeek::waiting) {
                    Waiting::WholeHead => entry.answering = true,
                    Waiting::PartOfAHead => {
                        trickling = Some(*id);
                        break;
                    }
                    Waiting::Nothing => {
                        silent = silent.or(Some(*id));
                    }
                }
            }
            let victim = trickling.or(silent)?;
            if let Some(evicted) = table.open.remove(&victim) {
                evicted.evict.cancel();
            }
        }
        let id = table.next_id;
        table.next_id += 1;
        let evict = CancellationToken::new();
        let answering = peek.as_ref().is_some_and(HeadPeek::head_waiting);
        table.open.insert(id, Entry { source, answering, evict: evict.clone(), peek });
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
                entry.peek = None; // its descriptor's duplicate is not needed any more
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
                slots.take(ip(&format!("10.0.{}.{}", i / 200, i % 200 + 1)), None).expect("room")
            })
            .collect();
        held[0].head_received()(); // the oldest is being answered
        let probe = slots.take(ip("192.0.2.1"), None).expect("room is made");
        assert_eq!(slots.len(), MAX_CONNECTIONS);
        assert!(!held[0].evict.is_cancelled(), "an answered connection is never evicted");
        assert!(held[1].evict.is_cancelled(), "the next oldest waiting one is");
        drop(probe);
        for slot in &held {
            slot.head_received()();
        }
        let second = slots.take(ip("192.0.2.2"), None).expect("the probe's place, freed");
        second.head_received()();
        assert!(
            slots.take(ip("192.0.2.3"), None).is_none(),
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
            (0..MAX_PER_SOURCE * 3).filter_map(|_| slots.take(attacker, None)).collect();
        assert_eq!(slots.len(), MAX_PER_SOURCE, "its own oldest made room each time");
        let evicted = held.iter().filter(|s| s.evict.is_cancelled()).count();
        assert_eq!(evicted, MAX_PER_SOURCE * 2);
        assert!(slots.take(ip("192.0.2.9"), None).is_some(), "others still have room");
    }

    #[tokio::test]
    async fn a_connection_whose_whole_head_has_arrived_is_never_evicted() {
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let slots = Arc::new(Slots::default());
        let source = ip("127.0.0.1");
        // Accepted before its head arrives; its task has not read it when the storm comes.
        let mut probe_client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (probe_socket, _) = listener.accept().await.expect("accept");
        let probe = slots.take(source, HeadPeek::of(&probe_socket)).expect("room");
        probe_client
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .expect("write");
        // Until the bytes are in the socket's buffer (a bounded wait on loopback).
        let peek = HeadPeek::of(&probe_socket).expect("peek");
        for _ in 0..1_000 {
            if peek.head_waiting() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(peek.head_waiting(), "the probe's head arrived");
        let tricklers: Vec<Slot> =
            (0..MAX_PER_SOURCE * 3).filter_map(|_| slots.take(source, None)).collect();
        assert!(!probe.evict.is_cancelled(), "the probe outlived a storm of newcomers");
        let evicted = tricklers.iter().filter(|s| s.evict.is_cancelled()).count();
        assert_eq!(evicted, MAX_PER_SOURCE * 2 + 1);
    }
}
