//! The end-to-end benchmark harness: `cargo bench --bench e2e` (release build). It starts a
//! backend (the test bed's load tool), HAProxy in TCP mode (installed from Debian packages when
//! missing; one, and two in a row), rathole with its Noise transport (built from crates.io into
//! target/), and the real `privlink` relay and agent processes over QUIC and over TLS/TCP, and
//! measures each of them in the same run with the same load tool: bulk throughput (one and
//! eight streams, each way) and the forwarders' CPU per GB moved, 1 KiB request/response latency, new connections (sequential and
//! 64 concurrent workers), resident memory per idle connection, single-stream bulk beside ten
//! stalled transfers each way (and the memory they hold); then, in network namespaces
//! joined by the test bed's link emulator (25 ms each way, then 0.5 % loss), time to first byte
//! of a new TLS connection against the round trips it physically needs, single-stream bulk
//! against direct TCP over the same path, and 1 KiB exchanges beside a download that fills a
//! 4 Mbit/s link. It prints a Markdown report (every figure also as a
//! ratio to direct) and writes it to `target/e2e-report.md`; `docs/benchmarks.md` explains it.
//! Set `E2E_QUICK=1` for a short smoke run, `E2E_ONLY=quic,tcp` (any of direct, haproxy, haproxy2,
//! rathole, quic, tcp, wan; and quic-audit, tcp-audit — the audit trail on — which run only when
//! named; rathole, built from crates.io the first time, only when named in a quick run)
//! to run a subset and `E2E_MEASURES=connections` (any of memory, bulk, rr,
//! connections = sequential + concurrent, stalled, curves) to run only some measurements, e.g.
//! under a profiler. `curves` (memory and idle CPU at 1, 100, 1,000 and 5,000 connections
//! held, throughput at 1, 8 and 64 streams) is drawn in `target/e2e-curves.svg`, and the
//! sizing lines come from the figures. `E2E_STREAM_WINDOW=8MiB` (say) sets both sides'
//! `stream_window`.
//! Nothing here asserts on timing.

mod measures;
mod report;
mod targets;
mod wan;

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use privlink_testbed::load;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::measures::{Figures, measure};
use crate::report::{curves_svg, machine_line, write_curves, write_loopback_table, write_sizing};
use crate::targets::{PrivlinkTarget, start_haproxy, start_rathole};
use crate::wan::wan;

const IDLE_CONNECTIONS: usize = 5_000;

/// How long each measurement runs.
#[derive(Clone, Copy)]
pub(crate) struct Budget {
    pub(crate) bulk: Duration,
    pub(crate) latency: Duration,
    pub(crate) round_trips: usize,
    pub(crate) sequential: usize,
    pub(crate) concurrent: Duration,
    pub(crate) idle: usize,
    pub(crate) wan_bulk: Duration,
    pub(crate) ttfb_samples: usize,
}

impl Budget {
    fn from_env() -> Self {
        if std::env::var_os("E2E_QUICK").is_some() {
            Self {
                bulk: Duration::from_millis(500),
                latency: Duration::from_millis(500),
                round_trips: 2_000,
                sequential: 100,
                concurrent: Duration::from_millis(500),
                idle: 500,
                wan_bulk: Duration::from_secs(2),
                ttfb_samples: 3,
            }
        } else {
            Self {
                bulk: Duration::from_secs(3),
                latency: Duration::from_secs(3),
                round_trips: 50_000,
                sequential: 1_000,
                concurrent: Duration::from_secs(3),
                idle: IDLE_CONNECTIONS,
                wan_bulk: Duration::from_secs(8),
                ttfb_samples: 15,
            }
        }
    }
}

fn main() {
    let budget = Budget::from_env();
    // Held connections take two descriptors each here (client and backend ends).
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("open-file limit not raised: {e}");
    }
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
        let addr = listener.local_addr().expect("backend addr");
        tokio::spawn(load::serve_backend(listener, CancellationToken::new()));
        addr
    });
    eprintln!("backend on {backend}");

    let wanted = |part: &str| selected("E2E_ONLY", part);

    let mut columns: Vec<(&str, Option<Figures>)> = Vec::new();
    let direct = wanted("direct").then(|| runtime.block_on(measure(backend, budget, None)));
    columns.push(("direct", direct));

    let haproxy = wanted("haproxy").then(|| start_haproxy(dir.path(), backend)).flatten();
    columns.push((
        "HAProxy (tcp)",
        // Each process stops when the closure that measured it returns.
        haproxy
            .map(|(running, addr)| runtime.block_on(measure(addr, budget, Some(&[running.pid()])))),
    ));
    // Two HAProxy processes in a row: what two user-space hops without a tunnel cost here,
    // the reference for privlink's relay + agent.
    let chained = wanted("haproxy2")
        .then(|| {
            let (second, second_addr) = start_haproxy(dir.path(), backend)?;
            let (first, first_addr) = start_haproxy(dir.path(), second_addr)?;
            Some((first, second, first_addr))
        })
        .flatten();
    columns.push((
        "2 × HAProxy",
        chained.map(|(first, second, addr)| {
            runtime.block_on(measure(addr, budget, Some(&[first.pid(), second.pid()])))
        }),
    ));

    // rathole with its Noise transport: the encrypted tunnel peer. Built from crates.io the
    // first time (minutes), so a quick run leaves it out unless E2E_ONLY names it.
    let named = |part: &str| {
        std::env::var("E2E_ONLY").is_ok_and(|list| list.split(',').any(|p| p.trim() == part))
    };
    let quick = std::env::var_os("E2E_QUICK").is_some();
    let rathole = if wanted("rathole") && (!quick || named("rathole")) {
        start_rathole(dir.path(), backend)
    } else {
        if wanted("rathole") {
            eprintln!("rathole column left out of a quick run (E2E_ONLY=rathole runs it)");
        }
        None
    };
    columns.push((
        "rathole (noise)",
        rathole.map(|(server, client, addr)| {
            runtime.block_on(measure(addr, budget, Some(&[server.pid(), client.pid()])))
        }),
    ));

    // `quic-audit` and `tcp-audit` (not run unless named in E2E_ONLY): the same with the audit
    // trail on, to measure what it costs.
    for (part, transport, audit, label) in [
        ("quic", "quic", false, "privlink QUIC"),
        ("tcp", "tcp", false, "privlink TCP"),
        ("quic-audit", "quic", true, "privlink QUIC + audit"),
        ("tcp-audit", "tcp", true, "privlink TCP + audit"),
    ] {
        if !(wanted(part) && (!audit || named(part))) {
            if !audit {
                columns.push((label, None));
            }
            continue;
        }
        let kind = (transport, audit);
        let tunnel = PrivlinkTarget::start(dir.path(), "127.0.0.1", kind, backend, None);
        let pids = tunnel.pids();
        let figures = runtime.block_on(measure(tunnel.endpoint, budget, Some(&pids)));
        columns.push((label, Some(figures)));
        tunnel.stop();
    }

    let mut report = String::new();
    let _ = writeln!(report, "{}", machine_line());
    write_loopback_table(&mut report, &columns, budget);
    write_curves(&mut report, &columns);
    write_sizing(&mut report, &columns);
    if let Some(svg) = curves_svg(&columns) {
        let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/e2e-curves.svg");
        match std::fs::write(&out, svg) {
            Ok(()) => eprintln!("growth curves drawn in {}", out.display()),
            Err(e) => eprintln!("could not write {}: {e}", out.display()),
        }
    }
    if wanted("wan") {
        match wan(dir.path(), budget) {
            Ok(wan_report) => report.push_str(&wan_report),
            Err(reason) => {
                let _ = writeln!(report, "\nWAN part skipped: {reason}");
            }
        }
    }
    let _ = writeln!(report, "\nHarness wall time: {:.0?}", started.elapsed());
    println!("{report}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/e2e-report.md");
    if std::fs::write(&out, &report).is_ok() {
        eprintln!("report written to {}", out.display());
    }
}

/// Whether `part` is in the comma-separated list in environment variable `var` (unset: all).
pub(crate) fn selected(var: &str, part: &str) -> bool {
    std::env::var(var).map_or(true, |list| list.split(',').any(|p| p.trim() == part))
}

pub(crate) fn fail<T>(what: &str, error: &std::io::Error) -> T {
    panic!("{what} failed: {error}")
}
