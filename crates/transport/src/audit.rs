//! The audit trail's file writer. Records are handed over through a bounded queue — never
//! waited on: a full queue loses the record, counts it and says so — and one writer thread
//! seals them into the chain (`privlink_protocol::audit`), appends them in batches, fsyncs at
//! most a second after the first unsynced write, and rotates the file by size (`<path>.000001`,
//! … oldest first; the chain goes on across files). A restarted process continues the chain of
//! the file it finds; a torn last line (a crash mid-write) is cut off first. Records that were
//! lost are themselves recorded (`trail.lost`, with the count) as soon as writing works again.
//!
//! A thread, not a task: file writes and fsync block, and a thread with a blocking queue does
//! this with no `spawn_blocking` per batch.
//!
//! Every trail, written or [`off`](AuditTrail::off), also keeps its last [`RECENT_RECORDS`]
//! records in memory (not the per-connection `connection.opened` and `connection.progress`,
//! which the open-connection list shows better) for the status page's event list
//! (`/api/v1/events`).

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

pub use privlink_protocol::audit::TrailStatus;
use privlink_protocol::audit::record::{Code, Record};

use self::file::TrailFile;
use privlink_protocol::audit::settings::AuditSettings;
use privlink_protocol::audit::{Break, ChainHead, Digest, Sealer};
use tracing::{info, warn};

/// Records waiting for the writer at most; past this they are lost (and counted).
pub const QUEUE_CAPACITY: usize = 8192;
/// Written records reach the disk (fsync) at most this long after they were written.
pub const SYNC_WITHIN: Duration = Duration::from_secs(1);
/// Most bytes gathered into one write.
const BATCH_BYTES: usize = 256 * 1024;
/// How long the writer lets records gather after the first of a batch arrives: under load it
/// then wakes and writes at most a hundred times a second, instead of once or twice per
/// connection (each wake-up a context switch on a busy machine, each write a system call).
/// Records still reach the file within this and the disk within [`SYNC_WITHIN`].
const GATHER: Duration = Duration::from_millis(10);
/// How long closing waits for the writer to write what is queued.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// Records kept in memory for the status page.
pub const RECENT_RECORDS: usize = 100;

/// Why a trail could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TrailError {
    /// The file could not be opened, read or written.
    #[error("audit trail {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// The last record found does not check: edited, or sealed with another key.
    #[error(
        "audit trail {path}: its last record does not check ({why}); the trail cannot be \
         continued — verify it with `privlink audit verify`, and move it aside (or restore the \
         key it was written with) before starting again"
    )]
    Unfollowable {
        /// The file.
        path: PathBuf,
        /// Why.
        why: Break,
    },
}

enum Message {
    Record(Record),
    Close,
}

struct Shared {
    path: PathBuf,
    require: bool,
    queued: AtomicUsize,
    last: Mutex<(u64, Digest)>,
    written: Vec<AtomicU64>,
    lost: AtomicU64,
    /// Lost and not yet told by a `trail.lost` record.
    untold: AtomicU64,
    failing: AtomicBool,
}

/// A handle on a trail: cheap to clone, shared by every task that records. A trail that is
/// [`off`](AuditTrail::off) takes every record and writes nothing.
#[derive(Clone, Default)]
pub struct AuditTrail {
    inner: Option<Arc<Inner>>,
    recent: Arc<Mutex<VecDeque<Record>>>,
}

struct Inner {
    shared: Arc<Shared>,
    sender: SyncSender<Message>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for AuditTrail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Some(inner) => write!(f, "AuditTrail({})", inner.shared.path.display()),
            None => f.write_str("AuditTrail(off)"),
        }
    }
}

impl AuditTrail {
    /// No trail: records go nowhere.
    pub fn off() -> Self {
        Self::default()
    }

    /// Opens the trail of `settings` (continuing the chain found there), writes and syncs
    /// `opening` (a `trail.opened` record) as its first record now, and starts the writer.
    pub fn open(settings: &AuditSettings, opening: Record) -> Result<Self, TrailError> {
        let io_error = |source| TrailError::Io { path: settings.path.clone(), source };
        let sealer = settings.sealer();
        let (mut file, head) = TrailFile::open(settings, &sealer)?;
        let shared = Arc::new(Shared {
            path: settings.path.clone(),
            require: settings.require,
            queued: AtomicUsize::new(0),
            last: Mutex::new((head.seq - 1, head.prev)),
            written: Code::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            lost: AtomicU64::new(0),
            untold: AtomicU64::new(0),
            failing: AtomicBool::new(false),
        });
        let mut writer =
            Writer { file: &mut file, head, sealer, shared: Arc::clone(&shared), telling: 0 };
        let mut batch = Vec::new();
        writer.seal_into(&mut batch, &opening);
        writer.file.append(&batch).map_err(io_error)?;
        writer.file.file.sync_data().map_err(io_error)?;
        writer.confirm(&[opening.code], writer.head);
        let head = writer.head;
        let sealer = std::mem::replace(&mut writer.sealer, Sealer::Sha256);
        let (sender, receiver) = std::sync::mpsc::sync_channel(QUEUE_CAPACITY);
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                let mut file = file;
                let writer =
                    Writer { file: &mut file, head, sealer, shared: thread_shared, telling: 0 };
                writer.run(&receiver);
            })
            .map_err(io_error)?;
        info!(path = %settings.path.display(), seq = head.seq - 1, "audit trail open");
        let trail = Self {
            inner: Some(Arc::new(Inner { shared, sender, writer: Mutex::new(Some(thread)) })),
            recent: Arc::default(),
        };
        trail.keep(&opening);
        Ok(trail)
    }

    /// Whether a trail is written at all.
    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// Hands `record` to the writer without waiting. `false` when it was lost (the queue is
    /// full or the writer is gone); it is counted, and told in the trail when writing resumes.
    pub fn record(&self, record: Record) -> bool {
        self.keep(&record);
        let Some(inner) = &self.inner else { return true };
        let shared = &inner.shared;
        shared.queued.fetch_add(1, Ordering::Relaxed);
        match inner.sender.try_send(Message::Record(record)) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                shared.queued.fetch_sub(1, Ordering::Relaxed);
                shared.lose(1);
                false
            }
        }
    }

    /// The last records, oldest first, each as one JSON object (`time` and its fields, without
    /// the chain's `seq`, `prev` and `hash`).
    pub fn recent(&self) -> Vec<String> {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        recent
            .iter()
            .map(|record| format!("{{\"time\":\"{}\",{}}}", rfc3339(record.time), record.fields()))
            .collect()
    }

    fn keep(&self, record: &Record) {
        if matches!(record.code, Code::ConnectionOpened | Code::ConnectionProgress) {
            return;
        }
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if recent.len() == RECENT_RECORDS {
            recent.pop_front();
        }
        recent.push_back(record.clone());
    }

    /// Whether records are being written now: the queue has room and the last write worked.
    /// With `require`, the relay refuses new connections while this is false.
    pub fn is_writing(&self) -> bool {
        self.inner.as_ref().is_none_or(|inner| {
            !inner.shared.failing.load(Ordering::Relaxed)
                && inner.shared.queued.load(Ordering::Relaxed) < QUEUE_CAPACITY
        })
    }

    /// Whether new connections must be refused when records cannot be written.
    pub fn required(&self) -> bool {
        self.inner.as_ref().is_some_and(|inner| inner.shared.require)
    }

    /// The trail's state, when one is written.
    pub fn status(&self) -> Option<TrailStatus> {
        let shared = &self.inner.as_ref()?.shared;
        let (last_seq, last_hash) = *shared.last.lock().unwrap_or_else(PoisonError::into_inner);
        Some(TrailStatus {
            path: shared.path.clone(),
            last_seq,
            last_hash: last_hash.to_string(),
            written: Code::ALL
                .iter()
                .map(|code| (*code, shared.written[code.index()].load(Ordering::Relaxed)))
                .collect(),
            lost: shared.lost.load(Ordering::Relaxed),
            failing: shared.failing.load(Ordering::Relaxed),
            require: shared.require,
        })
    }

    /// Writes `closing` (a `trail.closed` record) after everything queued, syncs, and stops
    /// the writer (waiting at most a few seconds). Records handed over later are lost.
    pub async fn close(&self, closing: Record) {
        let Some(inner) = self.inner.clone() else { return };
        let wait = tokio::task::spawn_blocking(move || {
            // Blocking sends: the closing record must not be lost to a full queue.
            let _ = inner.sender.send(Message::Record(closing));
            let _ = inner.sender.send(Message::Close);
            let thread = inner.writer.lock().unwrap_or_else(PoisonError::into_inner).take();
            if let Some(thread) = thread {
                let _ = thread.join();
            }
        });
        if tokio::time::timeout(CLOSE_WAIT, wait).await.is_err() {
            warn!("audit trail: the writer did not finish within {CLOSE_WAIT:?}");
        }
    }
}

impl Shared {
    fn lose(&self, count: u64) {
        let before = self.lost.fetch_add(count, Ordering::Relaxed);
        self.untold.fetch_add(count, Ordering::Relaxed);
        // The first loss and then one line per 1,000 (a full queue loses many at once).
        if before == 0 || (before + count) / 1000 > before / 1000 {
            warn!(
                lost = before + count,
                "audit records lost (the writer is behind or cannot write); counted in \
                 privlink_audit_records_lost_total, told in the trail as trail.lost"
            );
        }
    }
}

/// The thread's side: the chain head and the file.
struct Writer<'a> {
    file: &'a mut TrailFile,
    head: ChainHead,
    sealer: Sealer,
    shared: Arc<Shared>,
    /// The lost count the `trail.lost` record of the batch being written tells.
    telling: u64,
}

impl Writer<'_> {
    fn run(mut self, receiver: &Receiver<Message>) {
        let mut unsynced: Option<Instant> = None;
        let mut batch = Vec::with_capacity(BATCH_BYTES);
        let mut codes = Vec::new();
        loop {
            let first = match unsynced {
                Some(since) => {
                    let left = (since + SYNC_WITHIN).saturating_duration_since(Instant::now());
                    receiver.recv_timeout(left)
                }
                None => receiver.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            let mut closing = false;
            match first {
                Ok(Message::Record(record)) => {
                    std::thread::sleep(GATHER);
                    self.batch(record, receiver, &mut batch, &mut codes, &mut closing);
                }
                Ok(Message::Close) | Err(RecvTimeoutError::Disconnected) => closing = true,
                Err(RecvTimeoutError::Timeout) => {}
            }
            if !batch.is_empty() {
                self.write(&batch, &codes);
                unsynced.get_or_insert_with(Instant::now);
                batch.clear();
                codes.clear();
            }
            let due = unsynced.is_some_and(|since| since.elapsed() >= SYNC_WITHIN);
            if due || closing {
                if let Err(e) = self.file.file.sync_data() {
                    warn!("audit trail: cannot sync {}: {e}", self.shared.path.display());
                }
                unsynced = None;
            }
            if closing {
                return;
            }
        }
    }

    /// Seals `first` and whatever else is queued (up to a batch's size) into `batch`.
    fn batch(
        &mut self,
        first: Record,
        receiver: &Receiver<Message>,
        batch: &mut Vec<u8>,
        codes: &mut Vec<Code>,
        closing: &mut bool,
    ) {
        let untold = self.shared.untold.swap(0, Ordering::Relaxed);
        self.telling = untold;
        if untold > 0 {
            let lost = Record::new(Code::TrailLost, SystemTime::now()).number("count", untold);
            codes.push(lost.code);
            self.seal_into(batch, &lost);
        }
        let mut next = Some(first);
        while let Some(record) = next.take() {
            self.shared.queued.fetch_sub(1, Ordering::Relaxed);
            codes.push(record.code);
            self.seal_into(batch, &record);
            if batch.len() >= BATCH_BYTES {
                break;
            }
            match receiver.try_recv() {
                Ok(Message::Record(record)) => next = Some(record),
                Ok(Message::Close) => *closing = true,
                Err(_) => {}
            }
        }
    }

    fn seal_into(&mut self, batch: &mut Vec<u8>, record: &Record) {
        let time = rfc3339(record.time);
        let line = self.head.seal(&self.sealer, &time, record.fields());
        batch.extend_from_slice(line.as_bytes());
        batch.push(b'\n');
    }

    /// Appends a sealed batch; on failure, cuts what was written of it, counts its records as
    /// lost and rewinds the chain to the last record on disk.
    fn write(&mut self, batch: &[u8], codes: &[Code]) {
        let written_head = self.head;
        match self.file.append(batch) {
            Ok(()) => {
                if self.shared.failing.swap(false, Ordering::Relaxed) {
                    info!(path = %self.shared.path.display(), "audit trail writing again");
                }
                self.confirm(codes, written_head);
                if self.file.len >= self.file.rotate_size {
                    if let Err(e) = self.file.rotate() {
                        warn!("audit trail: cannot rotate {}: {e}", self.shared.path.display());
                    }
                }
            }
            Err(e) => {
                if !self.shared.failing.swap(true, Ordering::Relaxed) {
                    warn!("audit trail: cannot write {}: {e}", self.shared.path.display());
                }
                let (seq, prev) = *self.shared.last.lock().unwrap_or_else(PoisonError::into_inner);
                self.head = ChainHead { seq: seq + 1, prev };
                let told = codes.iter().filter(|c| **c == Code::TrailLost).count();
                // What a `trail.lost` record in this batch would have told is untold again.
                self.shared.untold.fetch_add(std::mem::take(&mut self.telling), Ordering::Relaxed);
                self.shared.lose((codes.len() - told) as u64);
            }
        }
    }

    fn confirm(&self, codes: &[Code], head: ChainHead) {
        for code in codes {
            self.shared.written[code.index()].fetch_add(1, Ordering::Relaxed);
        }
        *self.shared.last.lock().unwrap_or_else(PoisonError::into_inner) =
            (head.seq - 1, head.prev);
    }
}

/// `2026-12-07T11:00:00.123456Z`: UTC, microseconds.
pub fn rfc3339(time: SystemTime) -> String {
    let time = time::OffsetDateTime::from(time);
    let time = time.replace_nanosecond(time.nanosecond() / 1000 * 1000).unwrap_or(time);
    time.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

mod file;
#[cfg(test)]
mod tests;
