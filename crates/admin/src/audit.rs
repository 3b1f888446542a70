//! The audit trail as both roles report it: `privlink_audit_records_total{code}`,
//! `privlink_audit_records_lost_total` and `privlink_audit_last_seq` (set at each scrape from
//! the trail's own counts), and the `audit` part of the status API — the last seq and hash, so
//! that an outside store can anchor the chain and notice a cut-off tail.

use privlink_protocol::audit::TrailStatus;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};

/// The trail's state in the status API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditView {
    /// The current file.
    pub path: String,
    /// The last record written.
    pub last_seq: u64,
    /// Its hash (hex).
    pub last_hash: String,
    /// Records lost since start (queue full, or the disk failed).
    pub lost: u64,
    /// Whether the last write failed.
    pub failing: bool,
    /// Whether new connections are refused while records cannot be written.
    pub require: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: &'static str,
}

impl From<&TrailStatus> for AuditView {
    fn from(trail: &TrailStatus) -> Self {
        Self {
            path: trail.path.display().to_string(),
            last_seq: trail.last_seq,
            last_hash: trail.last_hash.clone(),
            lost: trail.lost,
            failing: trail.failing,
            require: trail.require,
        }
    }
}

/// The audit metrics of one process.
#[derive(Debug)]
pub struct AuditMetrics {
    records: Family<CodeLabel, Counter>,
    lost: Counter,
    last_seq: Gauge,
}

impl AuditMetrics {
    /// Registers them in `registry`.
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self {
            records: Family::default(),
            lost: Counter::default(),
            last_seq: Gauge::default(),
        };
        registry.register(
            "audit_records",
            "Audit records written, by event code (docs/audit.md)",
            metrics.records.clone(),
        );
        registry.register(
            "audit_records_lost",
            "Audit records that could not be written (the writer's queue was full or the disk \
             failed); the trail itself says how many in a trail.lost record",
            metrics.lost.clone(),
        );
        registry.register(
            "audit_last_seq",
            "The seq of the last audit record written (0 without [audit]); its hash is in the \
             status API",
            metrics.last_seq.clone(),
        );
        metrics
    }

    /// Sets them from the trail's state before a scrape (the counters rise by what they lag).
    pub fn set(&self, trail: &TrailStatus) {
        for (code, total) in &trail.written {
            let counter = self.records.get_or_create(&CodeLabel { code: code.code() });
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        self.lost.inc_by(trail.lost.saturating_sub(self.lost.get()));
        self.last_seq.set(i64::try_from(trail.last_seq).unwrap_or(i64::MAX));
    }
}
