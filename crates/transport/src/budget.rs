//! The process-wide budget of bytes held for tunnel streams whose receiver is not keeping up.
//!
//! A tunnel stream's transport (quinn, h2) buffers what the peer sends until the copy loop
//! reads it, up to the stream's receive window; the copy loop reads only as fast as the socket
//! on the other side takes bytes. So a stream whose socket stops taking bytes (a client that
//! does not read its download, a destination that does not read its upload) soon holds a
//! whole window in this process. The copy loop charges such a stream here while its writer is
//! blocked ([`BudgetCharge`]) and releases the charge when the writer catches up or the copy
//! ends. The relay and the agent ask [`BufferBudget::has_room`] before they open a new stream:
//! past the budget new streams are refused (`over_budget`) and nothing open is disturbed.
//! Each endpoint draws on a share of at most three quarters of the budget.
//!
//! The budget is a hard bound too: a stream admitted while it was idle (its probation charge
//! given back) that backs up later is charged again without a look at the limit — nothing open
//! is disturbed — but only up to the budget's [ceiling](BufferBudget::ceiling), a quarter above
//! the limit. A stream whose receiver stops keeping up when its charge would pass the ceiling
//! is cut at once ([`BudgetCharge::try_take`]); the transport's buffers for it go with it. Past
//! the limit, below the ceiling, streams that stop taking bytes are cut after a short stall
//! timeout (see `copy`).
//!
//! What is charged is an upper bound per stream — the transport's stream window plus the copy
//! loop's own buffer — not a measurement: neither quinn nor h2 reports how much of a stream
//! they hold. A stream that is merely slow is charged as much as a stalled one; the stall
//! timeout ends the stalled ones and returns their charge.

use std::sync::Arc;

use crate::limits::{DEFAULT_BUFFER_SIZE, STREAM_RECEIVE_WINDOW, stalled_stream_cost};
use std::sync::atomic::{AtomicU64, Ordering};

/// A budget of buffered tunnel bytes, shared by every copy in the process.
///
/// A budget can be a share of another ([`BufferBudget::share_of`]): what is charged to the
/// share is charged to the whole as well, and a new stream needs room in both. Each endpoint
/// gets a share of three quarters of the whole, so that clients of one endpoint that stop reading cannot
/// take the budget every other endpoint needs.
#[derive(Debug)]
pub struct BufferBudget {
    limit: AtomicU64,
    held: AtomicU64,
    /// The budget this one is a share of.
    whole: Option<Arc<BufferBudget>>,
    /// What one new or stalled stream is charged ([`stream_charge`]).
    stream_charge: u64,
}

impl BufferBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Self {
        Self {
            limit: AtomicU64::new(limit),
            held: AtomicU64::new(0),
            whole: None,
            stream_charge: STREAM_CHARGE,
        }
    }

    /// This budget, for streams whose receive window is `window` bytes (`stream_window`; the
    /// default otherwise): each is charged what that window can cost ([`stream_charge`]).
    #[must_use]
    pub fn for_stream_window(mut self, window: u32) -> Self {
        self.stream_charge = stream_charge(window);
        self
    }

    /// A share of `whole`, of at most three quarters of it (following its limit as a reload changes
    /// it).
    pub fn share_of(whole: &Arc<BufferBudget>) -> Self {
        Self {
            limit: AtomicU64::new(0),
            held: AtomicU64::new(0),
            whole: Some(Arc::clone(whole)),
            stream_charge: whole.stream_charge,
        }
    }

    /// What one new or stalled stream is charged.
    pub fn stream_charge(&self) -> u64 {
        self.stream_charge
    }

    /// The most this process (or this share) means to hold.
    pub fn limit(&self) -> u64 {
        match &self.whole {
            Some(whole) => whole.limit() / 4 * 3,
            None => self.limit.load(Ordering::Relaxed),
        }
    }

    /// A reload changed the limit: streams open now keep their charges.
    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// What blocked streams are charged now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// The most this process (or this share) holds at any moment: a quarter above the limit.
    /// Between the limit and the ceiling are streams admitted under the limit that backed up
    /// only later; no charge passes it ([`BudgetCharge::try_take`]).
    pub fn ceiling(&self) -> u64 {
        let limit = self.limit();
        limit.saturating_add(limit / 4)
    }

    /// Whether a new stream may start: what is held now is under the limit (the share's and
    /// the whole's).
    pub fn has_room(&self) -> bool {
        self.held() < self.limit() && self.whole.as_ref().is_none_or(|whole| whole.has_room())
    }

    /// A new stream's charge, taken now (it is on probation until its copy shows that its
    /// receiver keeps up: see `copy`), if there is room; `None` over the budget. Taken at
    /// once so that a burst of new streams meets the budget as it will be, not as it was
    /// before any of them had backed up.
    pub fn admit_stream(&self) -> Option<BudgetCharge<'_>> {
        if !self.whole.as_ref().is_none_or(|whole| whole.has_room()) {
            return None;
        }
        // Looked at and taken in one step: streams admitted at the same moment cannot all
        // pass the look before any of them is charged.
        let limit = self.limit();
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                (held < limit).then_some(held + self.stream_charge)
            })
            .ok()?;
        if let Some(whole) = &self.whole {
            whole.add(self.stream_charge);
        }
        let charge = BudgetCharge::new(Some(self), self.stream_charge);
        charge.held.store(true, Ordering::Relaxed);
        Some(charge)
    }

    /// A new stream's charge, taken now whatever the budget holds (for a stream already
    /// admitted by [`has_room`](Self::has_room) a moment before).
    pub fn charge_stream(&self) -> BudgetCharge<'_> {
        let charge = BudgetCharge::new(Some(self), self.stream_charge);
        charge.take();
        charge
    }

    /// Charges `amount` if that keeps this budget (and the whole) at or under its ceiling.
    fn try_add(&self, amount: u64) -> bool {
        let ceiling = self.ceiling();
        let added = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                let after = held.checked_add(amount)?;
                (after <= ceiling).then_some(after)
            })
            .is_ok();
        if !added {
            return false;
        }
        match &self.whole {
            Some(whole) if !whole.try_add(amount) => {
                self.held.fetch_sub(amount, Ordering::Relaxed);
                false
            }
            _ => true,
        }
    }

    fn add(&self, amount: u64) {
        self.held.fetch_add(amount, Ordering::Relaxed);
        if let Some(whole) = &self.whole {
            whole.add(amount);
        }
    }

    fn sub(&self, amount: u64) {
        self.held.fetch_sub(amount, Ordering::Relaxed);
        if let Some(whole) = &self.whole {
            whole.sub(amount);
        }
    }
}

/// The budget when none is configured: a quarter of the memory this process may use (the
/// machine's, or its cgroup's limit when lower), at least 256 MiB and at most 4 GiB — about
/// 50 to 800 streams' worth of stalled windows, new streams on probation included.
pub fn default_limit() -> u64 {
    const MIN: u64 = 256 << 20;
    const MAX: u64 = privlink_protocol::config::MAX_BUFFER_BUDGET;
    let machine = std::fs::read_to_string("/proc/meminfo").ok().and_then(|info| {
        let kib = info.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
        kib.trim().trim_end_matches("kB").trim().parse::<u64>().ok().map(|kib| kib * 1024)
    });
    // cgroup v2; "max" (no limit) does not parse.
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|max| max.trim().parse::<u64>().ok());
    match machine.into_iter().chain(cgroup).min() {
        Some(memory) => (memory / 4).clamp(MIN, MAX),
        None => MIN,
    }
}

/// What a stream whose socket stopped taking bytes is charged with the default window: what
/// its window can cost the transport, and the copy loop's buffer.
pub const STREAM_CHARGE: u64 = stream_charge(STREAM_RECEIVE_WINDOW);

/// [`STREAM_CHARGE`] for a stream window of `window` bytes.
pub const fn stream_charge(window: u32) -> u64 {
    stalled_stream_cost(window) + DEFAULT_BUFFER_SIZE as u64
}

/// One direction's charge on a [`BufferBudget`]: taken while its writer cannot keep up (and a
/// new stream's from the start), returned when it drains and when the charge is dropped.
#[derive(Debug)]
pub struct BudgetCharge<'a> {
    budget: Option<&'a BufferBudget>,
    amount: u64,
    /// Whether `amount` is charged now.
    held: std::sync::atomic::AtomicBool,
}

impl<'a> BudgetCharge<'a> {
    /// A charge of `amount` on `budget` (none: charges nothing), not yet taken.
    pub(crate) fn new(budget: Option<&'a BufferBudget>, amount: u64) -> Self {
        Self { budget, amount, held: std::sync::atomic::AtomicBool::new(false) }
    }

    /// The budget charged.
    pub(crate) fn budget(&self) -> Option<&'a BufferBudget> {
        self.budget
    }

    /// The writer is blocked: charge, unless charged already.
    pub(crate) fn take(&self) {
        if let Some(budget) = self.budget {
            if !self.held.swap(true, Ordering::Relaxed) {
                budget.add(self.amount);
            }
        }
    }

    /// The writer is blocked and its stream must stay under the budget's ceiling: charge unless
    /// charged already, if that keeps the budget (and the whole) at or under the ceiling.
    /// `false`: it would not, and the stream is to be cut.
    pub(crate) fn try_take(&self) -> bool {
        let Some(budget) = self.budget else { return true };
        if self.held.load(Ordering::Relaxed) {
            return true;
        }
        if !budget.try_add(self.amount) {
            return false;
        }
        if self.held.swap(true, Ordering::Relaxed) {
            // Taken meanwhile by another call on the same charge: keep one.
            budget.sub(self.amount);
        }
        true
    }

    /// The writer caught up: return the charge, if taken.
    pub(crate) fn give_back(&self) {
        if let Some(budget) = self.budget {
            if self.held.swap(false, Ordering::Relaxed) {
                budget.sub(self.amount);
            }
        }
    }
}

impl Drop for BudgetCharge<'_> {
    fn drop(&mut self) {
        self.give_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_charged_for_the_window_it_was_given() {
        let budget = Arc::new(BufferBudget::new(1 << 30).for_stream_window(8 << 20));
        assert_eq!(budget.stream_charge(), 20 * (1 << 20) + DEFAULT_BUFFER_SIZE as u64);
        let share = BufferBudget::share_of(&budget);
        let charge = share.admit_stream().expect("room");
        assert_eq!((share.held(), budget.held()), (budget.stream_charge(), budget.stream_charge()));
        drop(charge);
        assert_eq!(budget.held(), 0);
        assert_eq!(BufferBudget::new(1).stream_charge(), STREAM_CHARGE, "the default window's");
    }

    #[test]
    fn a_charge_is_taken_once_and_always_given_back() {
        let budget = BufferBudget::new(100);
        let charge = BudgetCharge::new(Some(&budget), 60);
        assert!(budget.has_room());
        charge.take();
        charge.take(); // blocked again while blocked: no second charge
        assert_eq!(budget.held(), 60);
        assert!(budget.has_room(), "60 of 100 held");
        let other = BudgetCharge::new(Some(&budget), 60);
        other.take();
        assert_eq!(budget.held(), 120);
        assert!(!budget.has_room(), "over the limit: new streams are refused");
        charge.give_back();
        charge.give_back();
        assert_eq!(budget.held(), 60);
        drop(other); // a copy that ends while blocked returns its charge
        assert_eq!(budget.held(), 0);
        assert!(budget.has_room());
    }

    #[test]
    fn a_share_takes_at_most_three_quarters_and_charges_the_whole_too() {
        let whole = Arc::new(BufferBudget::new(100));
        let (e, f) = (BufferBudget::share_of(&whole), BufferBudget::share_of(&whole));
        assert_eq!(e.limit(), 75);
        let first = BudgetCharge::new(Some(&e), 80);
        first.take();
        assert_eq!((e.held(), whole.held()), (80, 80));
        assert!(!e.has_room(), "e holds more than its three quarters");
        assert!(f.has_room(), "f still gets in");
        let second = BudgetCharge::new(Some(&f), 25);
        second.take();
        assert!(f.held() < f.limit(), "25 of f's 75");
        assert!(!whole.has_room() && !f.has_room(), "the whole is spent: f waits too");
        whole.set_limit(400);
        assert_eq!(e.limit(), 300, "a share follows the whole's limit");
        assert!(e.has_room() && f.has_room());
        drop((first, second));
        assert_eq!((e.held(), f.held(), whole.held()), (0, 0, 0));
        assert!(e.admit_stream().is_some(), "admitted with room");
        let full = BufferBudget::share_of(&Arc::new(BufferBudget::new(0)));
        assert!(full.admit_stream().is_none(), "refused without");
    }

    #[test]
    fn no_charge_passes_the_ceiling_a_quarter_above_the_limit() {
        let whole = Arc::new(BufferBudget::new(400));
        assert_eq!(whole.ceiling(), 500);
        let share = BufferBudget::share_of(&whole);
        assert_eq!((share.limit(), share.ceiling()), (300, 375));
        // Charged past the limit (streams let in while idle that back up later) up to the
        // share's ceiling.
        let charges: Vec<_> = (0..4).map(|_| BudgetCharge::new(Some(&share), 90)).collect();
        assert!(charges.iter().all(BudgetCharge::try_take), "4 × 90 = 360 ≤ 375");
        assert!(charges[0].try_take(), "a charge already taken stays");
        assert_eq!((share.held(), whole.held()), (360, 360));
        let fifth = BudgetCharge::new(Some(&share), 90);
        assert!(!fifth.try_take(), "450 would pass the share's ceiling");
        drop(fifth);
        assert_eq!(share.held(), 360, "a refused charge gives nothing back");
        // The whole's ceiling binds a share that still has room.
        let other = BufferBudget::share_of(&whole);
        let big = BudgetCharge::new(Some(&other), 200);
        assert!(!big.try_take(), "360 + 200 passes the whole's 500");
        assert_eq!((other.held(), whole.held()), (0, 360), "the share's part was taken back");
        let small = BudgetCharge::new(Some(&other), 140);
        assert!(small.try_take(), "360 + 140 = 500, the ceiling itself");
        drop((charges, small));
        assert_eq!(whole.held(), 0);
        assert!(BudgetCharge::new(None, 1 << 40).try_take(), "no budget, no ceiling");
    }

    #[test]
    fn the_default_is_a_quarter_of_memory_within_bounds() {
        let limit = default_limit();
        assert!(((256 << 20)..=(4 << 30)).contains(&limit), "{limit}");
    }

    #[test]
    fn without_a_budget_nothing_is_charged() {
        let charge = BudgetCharge::new(None, 60);
        charge.take();
        charge.give_back();
    }
}
