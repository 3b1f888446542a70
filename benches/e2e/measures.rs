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
    /// CPU seconds the forwarding processes spent per GB moved, for the same four transfers
    /// (`None` for the direct connection: nothing forwards).
    pub(crate) cpu_per_gb: Option<[f64; 4]>,
    /// CPU milliseconds the forwarding processes spent per new connection (64 workers).
    pub(crate) cpu_per_connection_ms: Option<f64>,
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
    /// Memory, idle CPU and throughput as load grows (`E2E_MEASURES` names `curves`).
    pub(crate) curves: Option<Curves>,
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
    // The memory curve is the idle-memory measurement in steps: its last step (`budget.idle`
    // connections) gives the figure per connection.
    let quick = std::env::var_os("E2E_QUICK").is_some();
    let steps = if wanted("curves") {
        held_steps(quick)
    } else if wanted("memory") {
        std::slice::from_ref(&budget.idle)
    } else {
        &[]
    };
    if let Some(pids) = pids.filter(|_| !steps.is_empty()) {
        let held = held_curve(addr, pids, steps, quick).await;
        figures.idle_kib = held
            .last()
            .filter(|(count, _, _)| *count == budget.idle)
            .map(|(count, mib, _)| mib * 1024.0 / *count as f64);
        if wanted("curves") {
            figures.curves = Some(Curves { held, streams: Vec::new() });
        }
    }
    // Gbit/s, and the forwarders' CPU seconds per GB moved.
    let bulk = |direction, streams| async move {
        let cpu_before = pids.map(cpu_seconds);
        let result = load::parallel_bulk(addr, direction, streams, budget.bulk).await;
        let moved = result.unwrap_or_else(|e| fail("bulk", &e));
        let cpu = pids.map(cpu_seconds).zip(cpu_before).map(|(after, before)| after - before);
        (moved.gbit_per_s(), cpu.map(|cpu| cpu / (moved.bytes as f64 / 1e9)))
    };
    if wanted("bulk") {
        // The first bulk transfer against a target runs well below the ones after it (direct
        // upload measured first: 8–20 Gbit/s, measured after a download: 30–33), so one short
        // transfer, not reported, warms every target up alike.
        let warm_up = load::bulk(addr, Direction::Download, budget.bulk / 4).await;
        warm_up.unwrap_or_else(|e| fail("bulk warm-up", &e));
        let measured = [
            bulk(Direction::Upload, 1).await,
            bulk(Direction::Download, 1).await,
            bulk(Direction::Upload, 8).await,
            bulk(Direction::Download, 8).await,
        ];
        figures.bulk = Some(measured.map(|(gbit, _)| gbit));
        figures.cpu_per_gb = pids.map(|_| measured.map(|(_, cpu)| cpu.unwrap_or(0.0)));
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
        let cpu_before = pids.map(cpu_seconds);
        let concurrent = load::concurrent_connections(addr, 64, budget.concurrent).await;
        let concurrent = concurrent.unwrap_or_else(|e| fail("concurrent", &e));
        if let (Some(pids), Some(before)) = (pids, cpu_before) {
            let per = (cpu_seconds(pids) - before) / concurrent.count().max(1) as f64;
            figures.cpu_per_connection_ms = Some(per * 1e3);
        }
        figures.concurrent = Some(concurrent);
    }
    if wanted("stalled") {
        stalled(addr, budget, pids, &mut figures).await;
    }
    if let Some(curves) = figures.curves.as_mut() {
        curves.streams = stream_curve(addr, budget).await;
    }
    eprintln!("measured {addr}");
    figures
}

/// CPU seconds (user and system) `pids` have used together since they started, from
/// `/proc/PID/stat` (in clock ticks: 100 per second on Linux).
pub(crate) fn cpu_seconds(pids: &[u32]) -> f64 {
    const TICKS_PER_SECOND: f64 = 100.0;
    let ticks: u64 = pids
        .iter()
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The fields after the command name (which may hold spaces) in parentheses:
            // state is field 3, utime 14, stime 15.
            let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            let fields: Vec<&str> = after_name.split_whitespace().collect();
            let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
            field(14).unwrap_or(0) + field(15).unwrap_or(0)
        })
        .sum();
    ticks as f64 / TICKS_PER_SECOND
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

/// How a target grows: memory and idle CPU with the connections it holds, throughput with the
/// streams it carries.
#[derive(Default)]
pub(crate) struct Curves {
    /// (connections held, MiB of resident memory grown, % of one core used while they idle).
    pub(crate) held: Vec<(usize, f64, f64)>,
    /// (streams, Gbit/s downloaded in all).
    pub(crate) streams: Vec<(usize, f64)>,
}

/// Connection counts of the memory and CPU curve. Not 10,000: this process holds both ends of
/// each (client and backend), and the machine's descriptor limit (20,000, which root cannot
/// raise here) leaves room for about 9,500; the sizing line scales the slope up instead.
pub(crate) fn held_steps(quick: bool) -> &'static [usize] {
    if quick { &[1, 10, 100, 500] } else { &[1, 100, 1_000, 5_000] }
}

/// Stream counts of the throughput curve.
pub(crate) const STREAM_STEPS: [usize; 3] = [1, 8, 64];

/// The memory and idle-CPU curve against `addr` served by `pids`, measured while the
/// processes are fresh (a heap that already served transfers hides growth): connections
/// opened in `steps` and held (each after one 64-byte round trip), the forwarders' memory growth
/// and their CPU over an idle second at each step.
pub(crate) async fn held_curve(
    addr: SocketAddr,
    pids: &[u32],
    steps: &[usize],
    quick: bool,
) -> Vec<(usize, f64, f64)> {
    let mut curve = Vec::new();
    // Warm up: the first connections pay for one-time allocations (runtime, TLS, tables).
    drop(load::open_idle(addr, 50, Duration::from_secs(30)).await.ok());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pids);
    let mut held = Vec::new();
    for &step in steps {
        match load::open_idle(addr, step - held.len(), Duration::from_secs(120)).await {
            Ok(more) => held.extend(more),
            Err(e) => {
                eprintln!("curve stopped before {step} connections held: {e}");
                break;
            }
        }
        // Let the processes settle (acks, flow state), then an idle second's CPU (a fifth of
        // each in a quick run).
        let pause = if quick { Duration::from_millis(200) } else { Duration::from_secs(1) };
        tokio::time::sleep(pause).await;
        let cpu_before = cpu_seconds(pids);
        tokio::time::sleep(pause).await;
        let cpu = (cpu_seconds(pids) - cpu_before) / pause.as_secs_f64() * 100.0;
        let grown = rss_kib(pids).saturating_sub(before) as f64 / 1024.0;
        curve.push((step, grown, cpu));
    }
    drop(held);
    tokio::time::sleep(Duration::from_secs(1)).await;
    curve
}

/// Gbit/s downloaded over 1, 8 and 64 streams together.
pub(crate) async fn stream_curve(addr: SocketAddr, budget: Budget) -> Vec<(usize, f64)> {
    let mut curve = Vec::new();
    for streams in STREAM_STEPS {
        let moved = load::parallel_bulk(addr, Direction::Download, streams, budget.bulk).await;
        let gbit = moved.map(|t| t.gbit_per_s()).unwrap_or_else(|e| fail("bulk", &e));
        curve.push((streams, gbit));
    }
    curve
}
