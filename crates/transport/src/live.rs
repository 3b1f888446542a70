//! The connections open right now, as the admin API lists them: a [`LiveTable`] the relay
//! keeps per endpoint and the agent keeps for its streams. Each entry carries what the role
//! wants to show (`T`), when it started, and the [`ByteCounts`] its copy loop adds to as
//! bytes move — so `/api/v1/connections` and the byte counters of `/metrics` see a long
//! transfer grow while it runs, not only when it ends. Inserting returns a [`LiveGuard`] that
//! removes the entry when the connection's task drops it.
//!
//! One mutex per table, held only to insert, remove or copy out the entry list — never across
//! an await or while bytes move: a busy connection touches only its own atomics.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use crate::copy::ByteCounts;

/// The open connections of one endpoint (relay) or of the agent.
#[derive(Debug)]
pub struct LiveTable<T> {
    next_id: AtomicU64,
    entries: Mutex<HashMap<u64, Arc<Live<T>>>>,
}

impl<T> Default for LiveTable<T> {
    fn default() -> Self {
        Self { next_id: AtomicU64::new(1), entries: Mutex::new(HashMap::new()) }
    }
}

/// One open connection.
#[derive(Debug)]
pub struct Live<T> {
    /// Unique within its table for the process's life.
    pub id: u64,
    /// When it was accepted (wall clock, for display).
    pub started: SystemTime,
    /// What the role shows of it.
    pub info: T,
    /// Bytes each way so far; the copy loop adds to them.
    pub bytes: ByteCounts,
    /// How much of `bytes` has been handed to a metrics counter (see [`Live::unreported`]).
    reported: [AtomicU64; 2],
}

impl<T> Live<T> {
    /// The bytes moved each way (socket → tunnel, tunnel → socket) since the last call, for a
    /// metrics counter that must rise while the connection is open and never count a byte
    /// twice. Safe to call from several places at once (a scrape, the connection's own end):
    /// each call claims the span between the highest mark handed out so far and what it
    /// reads now, so the claims never overlap.
    pub fn unreported(&self) -> (u64, u64) {
        let (now_in, now_out) = self.bytes.get();
        let before_in = self.reported[0].fetch_max(now_in, Ordering::Relaxed);
        let before_out = self.reported[1].fetch_max(now_out, Ordering::Relaxed);
        (now_in.saturating_sub(before_in), now_out.saturating_sub(before_out))
    }
}

impl<T> LiveTable<T> {
    /// Adds a connection; it stays listed until the guard is dropped.
    pub fn insert(&self, info: T) -> LiveGuard<'_, T> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Live {
            id,
            started: SystemTime::now(),
            info,
            bytes: ByteCounts::default(),
            reported: [AtomicU64::new(0), AtomicU64::new(0)],
        });
        self.lock().insert(id, Arc::clone(&entry));
        LiveGuard { table: self, entry }
    }

    /// The connections open now, in no particular order.
    pub fn snapshot(&self) -> Vec<Arc<Live<T>>> {
        self.lock().values().cloned().collect()
    }

    /// How many are open now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Live<T>>>> {
        // The map holds no invariant a panicking holder could break.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Keeps a connection listed in its [`LiveTable`]; dropping it removes the entry.
#[derive(Debug)]
pub struct LiveGuard<'a, T> {
    table: &'a LiveTable<T>,
    entry: Arc<Live<T>>,
}

impl<T> Deref for LiveGuard<'_, T> {
    type Target = Live<T>;

    fn deref(&self) -> &Live<T> {
        &self.entry
    }
}

impl<T> Drop for LiveGuard<'_, T> {
    fn drop(&mut self) {
        self.table.lock().remove(&self.entry.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_listed_until_its_guard_drops() {
        let table = LiveTable::default();
        let first = table.insert("a");
        let second = table.insert("b");
        assert_ne!(first.id, second.id);
        assert_eq!(table.len(), 2);
        drop(first);
        let left: Vec<&str> = table.snapshot().iter().map(|live| live.info).collect();
        assert_eq!(left, ["b"]);
        drop(second);
        assert!(table.is_empty());
    }

    #[test]
    fn unreported_bytes_are_handed_out_once() {
        let table = LiveTable::default();
        let live = table.insert(());
        live.bytes.add_socket_to_tunnel(100);
        live.bytes.add_tunnel_to_socket(7);
        assert_eq!(live.unreported(), (100, 7));
        assert_eq!(live.unreported(), (0, 0), "nothing new moved");
        live.bytes.add_socket_to_tunnel(50);
        assert_eq!(live.unreported(), (50, 0));
    }

    #[test]
    fn concurrent_claims_add_up_to_the_bytes_moved() {
        let table = LiveTable::default();
        let live = table.insert(());
        let claimed = AtomicU64::new(0);
        let written = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for _ in 0..10_000 {
                    live.bytes.add_socket_to_tunnel(3);
                }
                written.store(true, Ordering::Relaxed);
            });
            for _ in 0..2 {
                scope.spawn(|| {
                    while !written.load(Ordering::Relaxed) {
                        claimed.fetch_add(live.unreported().0, Ordering::Relaxed);
                    }
                });
            }
        });
        claimed.fetch_add(live.unreported().0, Ordering::Relaxed);
        assert_eq!(claimed.load(Ordering::Relaxed), 30_000);
    }
}
