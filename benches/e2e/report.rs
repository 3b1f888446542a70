//! The Markdown report: the machine, and every figure with its ratio to the direct connection.

use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

use crate::Budget;
use privlink_testbed::load::Latencies;

use crate::measures::{Curves, Figures};

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
    row_against(report, label, values, 0, show);
}

/// [`row`] with the ratios to the column at `reference`.
pub(crate) fn row_against(
    report: &mut String,
    label: &str,
    values: &[Option<f64>],
    reference: usize,
    show: impl Fn(f64) -> String,
) {
    let direct = values.get(reference).copied().flatten();
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

/// The column of two HAProxy processes in a row (after direct and one HAProxy): the reference
/// for what forwarding costs in CPU.
const TWO_HAPROXY: usize = 2;

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
    for (i, label) in
        ["1 stream, upload", "1 stream, download", "8 streams, upload", "8 streams, download"]
            .into_iter()
            .enumerate()
    {
        let cpu = |f: &Figures| f.cpu_per_gb.map(|c| c[i]);
        let label = format!("CPU per GB moved, {label} (ratios to 2 × HAProxy)");
        row_against(report, &label, &pick(&cpu), TWO_HAPROXY, |c| format!("{c:.2} core·s"));
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
    let cpu = |f: &Figures| f.cpu_per_connection_ms;
    let label = "CPU per new conn, 64 workers (ratios to 2 × HAProxy)";
    row_against(report, label, &pick(&cpu), TWO_HAPROXY, |c| format!("{:.0} µs", c * 1e3));
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

/// The growth table — memory and idle CPU with connections held, throughput with streams —
/// for every column that measured it, and the sizing line each privlink column gives.
pub(crate) fn write_curves(report: &mut String, columns: &[(&str, Option<Figures>)]) {
    let measured: Vec<(&str, &Curves)> = columns
        .iter()
        .filter_map(|(name, figures)| Some((*name, figures.as_ref()?.curves.as_ref()?)))
        .collect();
    let Some((_, first)) = measured.first() else { return };
    let _ = writeln!(report, "\n### Growth (`target/e2e-curves.svg` draws it)\n");
    let _ = write!(report, "| target |");
    for (held, _, _) in &first.held {
        let _ = write!(report, " MiB at {held} conns |");
    }
    for (held, _, _) in &first.held {
        let _ = write!(report, " idle CPU at {held} |");
    }
    for (streams, _) in &first.streams {
        let _ = write!(report, " {streams} streams |");
    }
    let _ = writeln!(report);
    let cells = first.held.len() * 2 + first.streams.len();
    let _ = writeln!(report, "|---|{}", "---|".repeat(cells));
    for (name, curves) in &measured {
        let _ = write!(report, "| {name} |");
        for (_, mib, _) in &curves.held {
            let _ = write!(report, " {mib:.1} |");
        }
        for (_, _, cpu) in &curves.held {
            let _ = write!(report, " {cpu:.1} % |");
        }
        for (_, gbit) in &curves.streams {
            let _ = write!(report, " {gbit:.2} Gbit/s |");
        }
        let _ = writeln!(report);
    }
}

/// Sizing, as operators of other tunnels read it, for each privlink column: per core, new
/// connections per second and Gbit/s; memory per 10,000 idle connections; all measured above.
pub(crate) fn write_sizing(report: &mut String, columns: &[(&str, Option<Figures>)]) {
    let mut lines = Vec::new();
    for (name, figures) in columns {
        let Some(figures) = figures.as_ref().filter(|_| name.starts_with("privlink")) else {
            continue;
        };
        let per_core_conn = figures.cpu_per_connection_ms.map(|ms| 1e3 / ms);
        // The best of one and eight streams down: core·s per GB → Gbit/s per core.
        let per_core_gbit = figures.cpu_per_gb.map(|c| 8.0 / c[1].min(c[3]).max(f64::MIN_POSITIVE));
        let per_10k = figures.idle_kib.map(|kib| kib * 10_000.0 / 1024.0);
        let show = |v: Option<f64>, unit: &str, digits: usize| {
            v.map_or_else(|| "—".to_owned(), |v| format!("{v:.digits$} {unit}"))
        };
        lines.push(format!(
            "* {name} (relay + agent together): {} and {} per core; {} per 10,000 idle \
             connections",
            show(per_core_conn, "new conn/s", 0),
            show(per_core_gbit, "Gbit/s", 1),
            show(per_10k, "MiB", 0),
        ));
    }
    if !lines.is_empty() {
        let _ = writeln!(report, "\n### Sizing (from the figures above)\n\n{}", lines.join("\n"));
    }
}

/// The growth curves as an SVG of two charts — memory against connections held (log scale),
/// Gbit/s against streams — one line per target. Drawn here: no plotting library or service.
pub(crate) fn curves_svg(columns: &[(&str, Option<Figures>)]) -> Option<String> {
    const COLOURS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];
    let measured: Vec<(&str, &Curves)> = columns
        .iter()
        .filter_map(|(name, figures)| Some((*name, figures.as_ref()?.curves.as_ref()?)))
        .collect();
    if measured.is_empty() {
        return None;
    }
    let (width, height, pad) = (380.0, 240.0, 64.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" \
         font-family=\"sans-serif\" font-size=\"11\">\n",
        width * 2.0 + 40.0,
        height + 30.0 + 16.0 * measured.len() as f64
    );
    // One chart: points (x, y) per target, x on a log scale.
    let mut chart = |left: f64, title: &str, unit: &str, series: Vec<Vec<(f64, f64)>>| {
        let xs: Vec<f64> = series.iter().flatten().map(|p| p.0.log10()).collect();
        let (x_min, x_max) =
            xs.iter().fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
        let y_max = series.iter().flatten().map(|p| p.1).fold(0.0_f64, f64::max).max(1e-9) * 1.1;
        let x_of = |x: f64| {
            left + pad + (x.log10() - x_min) / (x_max - x_min).max(1e-9) * (width - pad - 10.0)
        };
        let y_of = |y: f64| height - pad + 10.0 - y / y_max * (height - pad - 10.0);
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"14\" font-weight=\"bold\">{title}</text>\n\
             <line x1=\"{l}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"#444\"/>\n\
             <line x1=\"{l}\" y1=\"20\" x2=\"{l}\" y2=\"{b}\" stroke=\"#444\"/>\n\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{y_max:.1} {unit}</text>",
            left + pad,
            left + pad - 4.0,
            y_of(y_max) + 4.0,
            l = left + pad,
            r = left + width - 10.0,
            b = height - pad + 10.0,
        );
        let mut ticks: Vec<f64> = series.iter().flatten().map(|p| p.0).collect();
        ticks.sort_by(f64::total_cmp);
        ticks.dedup();
        for x in ticks {
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{x}</text>",
                x_of(x),
                height - pad + 24.0
            );
        }
        for (i, points) in series.iter().enumerate() {
            let path: Vec<String> =
                points.iter().map(|(x, y)| format!("{:.1},{:.1}", x_of(*x), y_of(*y))).collect();
            let colour = COLOURS[i % COLOURS.len()];
            let _ = writeln!(
                svg,
                "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
                path.join(" ")
            );
        }
    };
    let memory = measured
        .iter()
        .map(|(_, c)| c.held.iter().map(|(n, mib, _)| (*n as f64, *mib)).collect())
        .collect();
    chart(0.0, "Memory (MiB) by connections held", "MiB", memory);
    let throughput = measured
        .iter()
        .map(|(_, c)| c.streams.iter().map(|(n, gbit)| (*n as f64, *gbit)).collect())
        .collect();
    chart(width + 40.0, "Throughput (Gbit/s) by streams", "Gbit/s", throughput);
    for (i, (name, _)) in measured.iter().enumerate() {
        let y = height + 26.0 + 16.0 * i as f64;
        let colour = COLOURS[i % COLOURS.len()];
        let _ = writeln!(
            svg,
            "<rect x=\"48\" y=\"{}\" width=\"12\" height=\"4\" fill=\"{colour}\"/>\
             <text x=\"66\" y=\"{y}\">{name}</text>",
            y - 6.0
        );
    }
    svg.push_str("</svg>\n");
    Some(svg)
}
