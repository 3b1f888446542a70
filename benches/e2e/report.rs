//! The Markdown report: the machine, and every figure with its ratio to the direct connection.

use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

use crate::Budget;
use privlink_testbed::load::Latencies;

use crate::measures::Figures;

pub(crate) fn machine_line() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("Machine: {cores} cores ({cpu}), Linux {kernel}.")
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

pub(crate) fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

/// One table row: a formatted value per column, each with its ratio to the first column.
pub(crate) fn row(
    report: &mut String,
    label: &str,
    values: &[Option<f64>],
    show: impl Fn(f64) -> String,
) {
    let direct = values.first().copied().flatten();
    let _ = write!(report, "| {label} |");
    for value in values {
        match (value, direct) {
            (Some(v), Some(d)) if d > 0.0 => {
                let _ = write!(report, " {} ({:.2}×) |", show(*v), v / d);
            }
            (Some(v), _) => {
                let _ = write!(report, " {} |", show(*v));
            }
            (None, _) => report.push_str(" — |"),
        }
    }
    report.push('\n');
}

pub(crate) fn write_loopback_table(
    report: &mut String,
    columns: &[(&str, Option<Figures>)],
    budget: Budget,
) {
    let _ = writeln!(
        report,
        "\n### Loopback (all processes on this machine; ratios are to `direct`)\n"
    );
    let _ = write!(report, "| measure |");
    for (name, _) in columns {
        let _ = write!(report, " {name} |");
    }
    let _ = write!(report, "\n|---|");
    for _ in columns {
        report.push_str("---|");
    }
    report.push('\n');
    let pick = |f: &dyn Fn(&Figures) -> Option<f64>| -> Vec<Option<f64>> {
        columns.iter().map(|(_, figures)| figures.as_ref().and_then(f)).collect()
    };
    let gbit = |v: f64| format!("{v:.2} Gbit/s");
    let secs = |v: f64| ms(Duration::from_secs_f64(v));
    let micros = |v: f64| us(Duration::from_secs_f64(v));
    let count = |v: f64| format!("{v:.0}");
    for (i, label) in
        ["1 stream, upload", "1 stream, download", "8 streams, upload", "8 streams, download"]
            .into_iter()
            .enumerate()
    {
        row(report, &format!("bulk {label}"), &pick(&|f| f.bulk.map(|b| b[i])), gbit);
    }
    for (label, q) in [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)] {
        let quantile = |f: &Figures| f.rr.as_ref().map(|l| l.quantile(q).as_secs_f64());
        row(report, &format!("1 KiB req/resp {label}"), &pick(&quantile), micros);
    }
    row(report, "1 KiB round trips/s", &pick(&|f| f.rr.as_ref().map(Latencies::rate)), count);
    let mean = |f: &Figures| f.sequential.as_ref().map(|l| l.mean().as_secs_f64());
    row(report, "new conn, sequential, mean", &pick(&mean), secs);
    let p99 = |f: &Figures| f.sequential.as_ref().map(|l| l.quantile(0.99).as_secs_f64());
    row(report, "new conn, sequential, p99", &pick(&p99), secs);
    let rate = |f: &Figures| f.concurrent.as_ref().map(Latencies::rate);
    row(report, "new conn, 64 workers, conn/s", &pick(&rate), count);
    let memory_label =
        format!("idle conn memory (forwarders' RSS growth / conn, {} conns)", budget.idle);
    row(report, &memory_label, &pick(&|f| f.idle_kib), |k| format!("{k:.1} KiB"));
    let stalled = crate::measures::STALLED;
    for (i, way) in ["download", "upload"].into_iter().enumerate() {
        let label = format!("bulk 1 stream, {way}, beside {stalled} stalled {way}s");
        row(report, &label, &pick(&|f| f.beside_stalled.map(|b| b[i])), gbit);
    }
    let label = format!("memory held by {stalled} + {stalled} stalled transfers (RSS growth)");
    row(report, &label, &pick(&|f| f.stalled_mib), |m| format!("{m:.0} MiB"));
    let samples: Vec<String> = columns
        .iter()
        .filter_map(|(n, f)| {
            let f = f.as_ref()?;
            let len = |l: &Option<Latencies>| l.as_ref().map_or(0, Latencies::count);
            Some(format!(
                "{n}: {} round trips, {} sequential, {} concurrent",
                len(&f.rr),
                len(&f.sequential),
                len(&f.concurrent)
            ))
        })
        .collect();
    let _ = writeln!(report, "\nSamples: {}.", samples.join("; "));
}
