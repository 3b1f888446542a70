//! The last ten minutes of a role's traffic, for the status page's charts: connections (or
//! streams) ended per outcome, bytes moved each way and peers connected (agents on a relay,
//! relay links on an agent), in [`BUCKETS`] buckets of [`BUCKET`] each — a bounded ring the
//! role feeds where it already counts for its metrics, served as `/api/v1/history`. The ring
//! itself ([`Ring`]) takes its clock as an argument; [`History`] shares it between tasks.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

/// One bucket's span.
pub const BUCKET: Duration = Duration::from_secs(5);
/// Buckets kept (ten minutes' worth), the one being filled included.
pub const BUCKETS: usize = 120;
/// Most distinct outcomes one bucket counts apart; the rest are counted as `other` (outcomes
/// are a fixed vocabulary today: this only bounds a bucket should that change).
pub const MAX_OUTCOMES: usize = 32;

/// `/api/v1/history`: the buckets, oldest first; the last one is still being filled.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistorySnapshot {
    /// A full bucket's span, in seconds.
    pub bucket_seconds: u64,
    /// The buckets, oldest first.
    pub buckets: Vec<HistoryBucket>,
}

/// What happened in one bucket.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistoryBucket {
    /// When it began, in milliseconds since the Unix epoch.
    pub start_unix_ms: u64,
    /// How long it has run, in seconds: [`BUCKET`] except for the one being filled.
    pub seconds: f64,
    /// Connections (streams, on an agent) that ended in it, by outcome — refusals included.
    pub ended: BTreeMap<String, u64>,
    /// Bytes moved toward the destination in it.
    pub bytes_to_destination: u64,
    /// Bytes moved toward the client in it.
    pub bytes_to_client: u64,
    /// Peers connected at its end (or now): agents on a relay, relay links on an agent.
    pub peers: u64,
}

/// The ring, on a clock given to each call.
#[derive(Debug)]
pub struct Ring {
    /// The instant the first bucket began, and the same moment on the wall clock.
    origin: (Instant, SystemTime),
    /// Index (since the origin) of the bucket being filled.
    current: u64,
    /// Finished buckets, oldest first, then the one being filled (always last).
    buckets: VecDeque<HistoryBucket>,
}

impl Ring {
    /// An empty ring whose first bucket begins `now` (the same moment as `wall`).
    pub fn new(now: Instant, wall: SystemTime) -> Self {
        let mut ring = Self { origin: (now, wall), current: 0, buckets: VecDeque::new() };
        ring.buckets.push_back(ring.bucket(0, 0));
        ring
    }

    fn bucket(&self, index: u64, peers: u64) -> HistoryBucket {
        let offset = BUCKET * u32::try_from(index).unwrap_or(u32::MAX);
        let start = self.origin.1 + offset;
        let start_unix_ms = start
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        HistoryBucket { start_unix_ms, seconds: BUCKET.as_secs_f64(), peers, ..Default::default() }
    }

    /// The bucket `now` falls in, starting new ones (empty, with the peer count carried on)
    /// for the time that passed.
    fn at(&mut self, now: Instant) -> &mut HistoryBucket {
        let index = now.saturating_duration_since(self.origin.0).as_secs() / BUCKET.as_secs();
        if index > self.current {
            let peers = self.buckets.back().map_or(0, |b| b.peers);
            // Past a whole ring of silence only the last BUCKETS matter.
            let first = (self.current + 1).max(index.saturating_sub(BUCKETS as u64 - 1));
            for fresh in first..=index {
                self.buckets.push_back(self.bucket(fresh, peers));
                if self.buckets.len() > BUCKETS {
                    self.buckets.pop_front();
                }
            }
            self.current = index;
        }
        self.buckets.back_mut().expect("the ring always holds its current bucket")
    }

    /// A connection (stream) ended, or was refused, with `outcome`.
    pub fn ended(&mut self, now: Instant, outcome: &str) {
        let bucket = self.at(now);
        let key = if bucket.ended.contains_key(outcome) || bucket.ended.len() < MAX_OUTCOMES {
            outcome
        } else {
            "other"
        };
        match bucket.ended.get_mut(key) {
            Some(count) => *count += 1,
            None => {
                bucket.ended.insert(key.to_owned(), 1);
            }
        }
    }

    /// Bytes were moved.
    pub fn moved(&mut self, now: Instant, to_destination: u64, to_client: u64) {
        let bucket = self.at(now);
        bucket.bytes_to_destination = bucket.bytes_to_destination.saturating_add(to_destination);
        bucket.bytes_to_client = bucket.bytes_to_client.saturating_add(to_client);
    }

    /// `count` peers are connected now.
    pub fn peers(&mut self, now: Instant, count: u64) {
        self.at(now).peers = count;
    }

    /// The buckets as of `now`.
    pub fn snapshot(&mut self, now: Instant) -> HistorySnapshot {
        let since_origin = now.saturating_duration_since(self.origin.0);
        self.at(now);
        let mut buckets: Vec<HistoryBucket> = self.buckets.iter().cloned().collect();
        if let Some(last) = buckets.last_mut() {
            let started = BUCKET * u32::try_from(self.current).unwrap_or(u32::MAX);
            last.seconds = since_origin.saturating_sub(started).as_secs_f64();
        }
        HistorySnapshot { bucket_seconds: BUCKET.as_secs(), buckets }
    }
}

/// The ring behind a lock, on the real clocks: one per role, fed by its metrics.
#[derive(Debug)]
pub struct History {
    ring: Mutex<Ring>,
}

impl Default for History {
    fn default() -> Self {
        Self { ring: Mutex::new(Ring::new(Instant::now(), SystemTime::now())) }
    }
}

impl History {
    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A connection (stream) ended, or was refused, with `outcome`.
    pub fn ended(&self, outcome: &str) {
        self.ring().ended(Instant::now(), outcome);
    }

    /// Bytes were moved (counted once: when a connection ends, or as the role samples its
    /// open ones).
    pub fn moved(&self, to_destination: u64, to_client: u64) {
        if to_destination != 0 || to_client != 0 {
            self.ring().moved(Instant::now(), to_destination, to_client);
        }
    }

    /// `count` peers are connected now.
    pub fn peers(&self, count: usize) {
        self.ring().peers(Instant::now(), u64::try_from(count).unwrap_or(u64::MAX));
    }

    /// The buckets now, for `/api/v1/history`.
    pub fn snapshot(&self) -> HistorySnapshot {
        self.ring().snapshot(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> (Ring, Instant) {
        let now = Instant::now();
        (Ring::new(now, SystemTime::UNIX_EPOCH + Duration::from_secs(1_000)), now)
    }

    #[test]
    fn events_land_in_the_bucket_of_their_time_and_peers_carry_on() {
        let (mut ring, t0) = ring();
        ring.peers(t0, 2);
        ring.ended(t0, "completed");
        ring.ended(t0 + Duration::from_secs(1), "acl_denied");
        ring.moved(t0 + Duration::from_secs(4), 10, 20);
        ring.ended(t0 + Duration::from_secs(6), "completed");
        let snapshot = ring.snapshot(t0 + Duration::from_millis(7_500));
        assert_eq!(snapshot.bucket_seconds, 5);
        let [first, second] = snapshot.buckets.as_slice() else { panic!("{snapshot:?}") };
        assert_eq!(first.start_unix_ms, 1_000_000);
        assert_eq!(first.seconds, 5.0);
        assert_eq!(
            first.ended,
            BTreeMap::from([("acl_denied".into(), 1), ("completed".into(), 1)])
        );
        assert_eq!((first.bytes_to_destination, first.bytes_to_client), (10, 20));
        assert_eq!(second.start_unix_ms, 1_005_000);
        assert_eq!(second.seconds, 2.5, "the bucket being filled says how long it has run");
        assert_eq!(second.ended, BTreeMap::from([("completed".into(), 1)]));
        assert_eq!(second.peers, 2, "a level, carried into the next bucket");
    }

    #[test]
    fn quiet_time_makes_empty_buckets_and_the_ring_keeps_ten_minutes() {
        let (mut ring, t0) = ring();
        ring.ended(t0, "completed");
        let quiet = ring.snapshot(t0 + Duration::from_secs(22));
        assert_eq!(quiet.buckets.len(), 5, "0-5, 5-10, 10-15, 15-20 and 20-22");
        assert!(quiet.buckets[1..].iter().all(|b| b.ended.is_empty()));
        for second in 0..2_000 {
            ring.ended(t0 + Duration::from_secs(second), "completed");
        }
        let full = ring.snapshot(t0 + Duration::from_secs(2_000));
        assert_eq!(full.buckets.len(), BUCKETS);
        assert_eq!(full.buckets.last().expect("current").start_unix_ms, 1_000_000 + 2_000_000);
        let after_a_day = ring.snapshot(t0 + Duration::from_secs(86_400));
        assert_eq!(after_a_day.buckets.len(), BUCKETS, "bounded however long the silence");
        assert!(after_a_day.buckets.iter().all(|b| b.ended.is_empty()));
        let starts: Vec<u64> = after_a_day.buckets.iter().map(|b| b.start_unix_ms).collect();
        assert!(starts.windows(2).all(|w| w[1] == w[0] + 5_000), "contiguous: {starts:?}");
    }

    #[test]
    fn a_bucket_counts_a_bounded_number_of_outcomes() {
        let (mut ring, t0) = ring();
        for i in 0..100 {
            ring.ended(t0, &format!("outcome-{i}"));
        }
        let snapshot = ring.snapshot(t0);
        let bucket = &snapshot.buckets[0];
        assert_eq!(bucket.ended.len(), MAX_OUTCOMES + 1);
        assert_eq!(bucket.ended["other"], 100 - MAX_OUTCOMES as u64);
    }
}
