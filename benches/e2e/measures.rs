//! The loopback measurements, each made with the test bed's load tool against one target:
//! bulk throughput, request/response latency, new connections, memory per idle connection,
//! and single-stream bulk beside stalled transfers (with the memory those hold).

use std::net::SocketAddr;
use std::time::Duration;

use privlink_testbed::load::{self, Direction, Latencies};

use crate::{Budget, fail, selected};

/// Everything measured against one target (`None`: not measured in this run).
#[derive(Default)]
pub(crate) struct Figures {
    /// Gbit/s: one stream up, one down, eight up, eight down.
    pub(crate) bulk: Option<[f64; 4]>,
    pub(crate) rr: Option<Latencies>,
    pub(crate) sequential: Option<Latencies>,
    pub(crate) concurrent: Option<Latencies>,
    /// KiB of resident memory per idle connection (the forwarding processes together).
    pub(crate) idle_kib: Option<f64>,
    /// Gbit/s of one stream down and one up, each beside [`STALLED`] stalled transfers the
    /// same way.
    pub(crate) beside_stalled: Option<[f64; 2]>,
    /// MiB of resident memory the stalled transfers hold (the forwarding processes together).
    pub(crate) stalled_mib: Option<f64>,
}

/// Stalled transfers each way in the `stalled` measurement.
pub(crate) const STALLED: usize = 10;

/// Runs every loopback measurement against `addr`; `pids` are the processes whose memory the
/// idle-connection figure counts (none for the direct connection).
pub(crate) async fn measure(addr: SocketAddr, budget: Budget, pids: Option<&[u32]>) -> Figures {
    let mut figures = Figures::default();
    let wanted = |part: &str| selected("E2E_MEASURES", part);
    // Memory first, while the processes are fresh: a heap that already served bulk transfers
    // would hand its free space to the idle connections and hide their cost.
    if let Some(pids) = pids.filter(|_| wanted("memory")) {
        figures.idle_kib = idle_memory(addr, budget.idle, pids).await;
    }
    let bulk = |direction, streams| async move {
        let result = load::parallel_bulk(addr, direction, streams, budget.bulk).await;
        result.map(|t| t.gbit_per_s()).unwrap_or_else(|e| fail("bulk", &e))
    };
    if wanted("bulk") {
        // The first bulk transfer against a target runs well below the ones after it (direct
        // upload measured first: 8–20 Gbit/s, measured after a download: 30–33), so one short
        // transfer, not reported, warms every target up alike.
        let warm_up = load::bulk(addr, Direction::Download, budget.bulk / 4).await;
        warm_up.unwrap_or_else(|e| fail("bulk warm-up", &e));
        figures.bulk = Some([
            bulk(Direction::Upload, 1).await,
            bulk(Direction::Download, 1).await,
            bulk(Direction::Upload, 8).await,
            bulk(Direction::Download, 8).await,
        ]);
    }
    if wanted("rr") {
        let rr = load::request_response(addr, 1024, budget.round_trips, budget.latency).await;
        figures.rr = Some(rr.unwrap_or_else(|e| fail("request/response", &e)));
    }
    if wanted("connections") || wanted("sequential") {
        let sequential =
            load::sequential_connections(addr, budget.sequential, budget.latency).await;
        figures.sequential = Some(sequential.unwrap_or_else(|e| fail("sequential", &e)));
    }
    if wanted("connections") || wanted("concurrent") {
        let concurrent = load::concurrent_connections(addr, 64, budget.concurrent).await;
        figures.concurrent = Some(concurrent.unwrap_or_else(|e| fail("concurrent", &e)));
    }
    if wanted("stalled") {
        stalled(addr, budget, pids, &mut figures).await;
    }
    eprintln!("measured {addr}");
    figures
}

/// Resident memory of `pids` together, in KiB.
pub(crate) fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// Opens `count` connections (each with one 64-byte round trip, then idle) and returns the
/// growth of the processes' resident memory per connection, in KiB.
pub(crate) async fn idle_memory(addr: SocketAddr, count: usize, pids: &[u32]) -> Option<f64> {
    // Warm up: the first connections pay for one-time allocations (runtime, TLS, tables).
    drop(load::open_idle(addr, 50, Duration::from_secs(30)).await.ok()?);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pids);
    let open = load::open_idle(addr, count, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| fail("idle connections", &e));
    // Let the processes finish the work the last connections started (flow state, acks).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pids);
    drop(open);
    tokio::time::sleep(Duration::from_secs(1)).await;
    Some(after.saturating_sub(before) as f64 / count as f64)
}

/// One stream down beside [`STALLED`] stalled downloads, then one up beside as many stalled
/// uploads (the downloads still stalled): does a transfer whose reader stopped hold back the
/// others on the same path, and what memory do they hold?
async fn stalled(addr: SocketAddr, budget: Budget, pids: Option<&[u32]>, figures: &mut Figures) {
    let before = pids.map(rss_kib);
    let settle = Duration::from_secs(1);
    let downloads = load::stall(addr, Direction::Download, STALLED).await;
    let downloads = downloads.unwrap_or_else(|e| fail("stalled downloads", &e));
    // Let them back up as far as the path lets them before measuring beside them.
    tokio::time::sleep(settle).await;
    // A transfer that froze behind the stalled ones is a finding, not a harness failure.
    let frozen = |what: &str, e: std::io::Error| {
        eprintln!("bulk beside stalled {what}: {e} (reported as 0)");
        0.0
    };
    let down = load::bulk(addr, Direction::Download, budget.bulk).await;
    let down = down.map_or_else(|e| frozen("downloads", e), |t| t.gbit_per_s());
    // Setting the stalled uploads up can fail too when the path is already frozen.
    let uploads = load::stall(addr, Direction::Upload, STALLED).await;
    let up = match &uploads {
        Ok(_) => {
            tokio::time::sleep(settle).await;
            let up = load::bulk(addr, Direction::Upload, budget.bulk).await;
            up.map_or_else(|e| frozen("uploads", e), |t| t.gbit_per_s())
        }
        Err(e) => frozen(
            "uploads (setting the stalled ones up)",
            std::io::Error::new(e.kind(), e.to_string()),
        ),
    };
    if let (Some(pids), Some(before)) = (pids, before) {
        figures.stalled_mib = Some(rss_kib(pids).saturating_sub(before) as f64 / 1024.0);
    }
    drop((downloads, uploads));
    figures.beside_stalled = Some([down, up]);
}
