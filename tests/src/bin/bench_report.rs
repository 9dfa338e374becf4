//! Turns the JSON lines of `tests/bench/run.sh` into the markdown report (tables, ratios against
//! each peer, the targets with pass or miss) on stdout, and a PNG chart of wall times.

use anyhow::{Context, Result, bail};
use clap::Parser;
use plotters::prelude::*;
use serde_json::Value;
use std::path::PathBuf;

#[derive(Parser)]
struct Args {
    /// results.jsonl written by tests/bench/run.sh.
    results: PathBuf,
    /// Where to write the PNG chart.
    #[arg(long)]
    chart: PathBuf,
}

/// One measured case of one tool.
#[derive(Clone, Debug)]
struct Row {
    profile: String,
    tool: String,
    case: String,
    wall: f64,
    cpu_src: f64,
    cpu_tgt: f64,
    rss_src_kib: f64,
    rss_tgt_kib: f64,
    wire: f64,
}

/// Everything the run recorded.
struct Run {
    rows: Vec<Row>,
    limits: Vec<(String, f64, f64)>,
    machine: Value,
    volume: Value,
    mutations: Vec<(String, Value)>,
    dropped: String,
}

const CASES: [(&str, &str); 4] = [
    ("initial", "initial full sync"),
    ("incr1", "incremental, 1% changed"),
    ("incr10", "incremental, 10% changed"),
    ("rebuild", "rebuild (failover / restore)"),
];
const TOOLS: [&str; 5] = [
    "understudy",
    "rsync-inplace",
    "rsync-inplace-z",
    "rsync-volsync",
    "restic",
];
const MIB: f64 = 1024.0 * 1024.0;

fn main() -> Result<()> {
    let args = Args::parse();
    let run = load(&args.results)?;
    print!("{}", markdown(&run));
    chart(&run, &args.chart)?;
    Ok(())
}

fn load(path: &PathBuf) -> Result<Run> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read results {}", path.display()))?;
    let mut run = Run {
        rows: Vec::new(),
        limits: Vec::new(),
        machine: Value::Null,
        volume: Value::Null,
        mutations: Vec::new(),
        dropped: "unknown".into(),
    };
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", path.display(), n + 1))?;
        if let Some(tool) = v["tool"].as_str() {
            let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
            run.rows.push(Row {
                profile: v["profile"].as_str().unwrap_or("").into(),
                tool: tool.into(),
                case: v["case"].as_str().unwrap_or("").into(),
                wall: f("wall"),
                cpu_src: f("cpu_src"),
                cpu_tgt: f("cpu_tgt"),
                rss_src_kib: f("rss_src_kib"),
                rss_tgt_kib: f("rss_tgt_kib"),
                wire: f("wire"),
            });
        } else if let Some(l) = v["limit"].as_str() {
            let (b, s) = (v["bytes"].as_f64(), v["seconds"].as_f64());
            run.limits
                .push((l.into(), b.unwrap_or(0.0), s.unwrap_or(f64::NAN)));
        } else if !v["machine"].is_null() {
            run.machine = v["machine"].clone();
        } else if !v["volume"].is_null() {
            // The link profile makes the volume again from the same seed: the first one tells.
            if run.volume.is_null() {
                run.volume = v.clone();
            }
        } else if let Some(m) = v["mutation"].as_str() {
            run.mutations.push((m.into(), v["of"].clone()));
        } else if let Some(d) = v["page_cache_dropped"].as_str() {
            run.dropped = d.into();
        }
    }
    if run.rows.is_empty() {
        bail!("{} holds no measured case", path.display());
    }
    Ok(run)
}

impl Run {
    fn get(&self, profile: &str, tool: &str, case: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.profile == profile && r.tool == tool && r.case == case)
    }

    fn limit_rate(&self, name: &str) -> Option<f64> {
        self.limits
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, b, s)| b / s)
    }

    fn volume_bytes(&self) -> f64 {
        self.volume["size_gib"].as_f64().unwrap_or(0.0) * 1024.0 * MIB
    }
}

fn markdown(run: &Run) -> String {
    let mut out = String::new();
    let m = &run.machine;
    let v = &run.volume["volume"];
    out += &format!(
        "Machine: {} cores ({}), {} GiB RAM, Linux {}. Page cache dropped before each timed run: {}.\n\n",
        m["cpus"],
        m["model"].as_str().unwrap_or("?"),
        m["mem_gib"],
        m["kernel"].as_str().unwrap_or("?"),
        run.dropped
    );
    out += &format!(
        "Volume: {} GiB, {} blocks of 64 KiB: {} random, {} log text, {} zero; {:.0} MiB of data, {:.0} MiB compressed block by block with zstd -1.\n\n",
        run.volume["size_gib"],
        v["blocks"],
        v["random"],
        v["text"],
        v["zero"],
        v["data_bytes"].as_f64().unwrap_or(0.0) / MIB,
        v["compressed_bytes"].as_f64().unwrap_or(0.0) / MIB
    );
    out += "Physical limits, same run:\n\n| limit | GiB/s |\n| --- | --- |\n";
    for (name, label) in [
        (
            "dd_read_direct",
            "sequential read of the volume (dd, direct I/O)",
        ),
        (
            "dd_write_direct",
            "sequential write of non-zero data (dd, direct I/O)",
        ),
        ("tcp_loopback", "raw TCP over loopback (iperf3)"),
    ] {
        if let Some(r) = run.limit_rate(name) {
            out += &format!("| {label} | {:.2} |\n", r / 1024.0 / MIB);
        }
    }
    for (profile, title) in [("loopback", "Loopback"), ("1gbit", "1 Gbit/s link profile")] {
        if run.rows.iter().any(|r| r.profile == profile) {
            out += &format!("\n### {title}\n\n");
            out += &table(run, profile);
        }
    }
    if run.rows.iter().any(|r| r.profile == "sparse-1tib") {
        out += "\n### Cost against capacity: a 1 TiB sparse image holding 64 MiB\n\n";
        out += &tib_table(run);
    }
    out += "\n### Targets\n\n";
    out += &targets(run);
    out
}

/// The 1 TiB sparse case: Understudy alone, with the figures its targets name.
fn tib_table(run: &Run) -> String {
    let mut out = String::from(
        "| case | wall s | CPU s (source / target) | peak RSS MiB (source / target) | wire MB |\n| --- | --- | --- | --- | --- |\n",
    );
    for (case, label) in [
        ("initial", "first sync"),
        ("incr1mib", "after 1 MiB changed"),
    ] {
        if let Some(r) = run.get("sparse-1tib", "understudy", case) {
            out += &format!(
                "| {label} | {:.2} | {:.2} / {:.2} | {:.0} / {:.0} | {:.1} |\n",
                r.wall,
                r.cpu_src,
                r.cpu_tgt,
                r.rss_src_kib / 1024.0,
                r.rss_tgt_kib / 1024.0,
                r.wire / 1e6
            );
        }
    }
    out
}

fn table(run: &Run, profile: &str) -> String {
    let mut out = String::from(
        "| case | tool | wall s | Understudy faster by | wire MB | wire vs Understudy | CPU s (source / target) | peak RSS MiB (source / target) |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for (case, label) in CASES {
        let Some(us) = run.get(profile, "understudy", case) else {
            continue;
        };
        for tool in TOOLS {
            let Some(r) = run.get(profile, tool, case) else {
                continue;
            };
            let (speed, wire_ratio) = if tool == "understudy" {
                ("-".to_string(), "-".to_string())
            } else {
                (format!("{:.2}x", r.wall / us.wall), ratio(r.wire, us.wire))
            };
            let wire = if r.wire > 0.0 {
                format!("{:.1}", r.wire / 1e6)
            } else {
                "-".into()
            };
            out += &format!(
                "| {label} | {tool} | {:.2} | {speed} | {wire} | {wire_ratio} | {:.2} / {:.2} | {:.0} / {:.0} |\n",
                r.wall,
                r.cpu_src,
                r.cpu_tgt,
                r.rss_src_kib / 1024.0,
                r.rss_tgt_kib / 1024.0
            );
        }
    }
    out
}

fn ratio(a: f64, b: f64) -> String {
    if a > 0.0 && b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}

/// One target of the issue: what it asks, what was measured, whether it holds.
fn target(
    out: &mut String,
    what: &str,
    measured: Option<(f64, String)>,
    pass: impl Fn(f64) -> bool,
) {
    match measured {
        Some((x, shown)) => {
            let mark = if pass(x) { "met" } else { "**missed**" };
            *out += &format!("| {what} | {shown} | {mark} |\n");
        }
        None => *out += &format!("| {what} | not measured | - |\n"),
    }
}

fn targets(run: &Run) -> String {
    let mut out = String::from("| target | measured | |\n| --- | --- | --- |\n");
    let speedup = |profile: &str, peer: &str, case: &str| {
        let us = run.get(profile, "understudy", case)?;
        let p = run.get(profile, peer, case)?;
        Some((
            p.wall / us.wall,
            format!(
                "{:.2}x ({:.2} s vs {:.2} s)",
                p.wall / us.wall,
                us.wall,
                p.wall
            ),
        ))
    };
    for (case, pct) in [("incr1", "1%"), ("incr10", "10%")] {
        for peer in ["rsync-inplace", "restic"] {
            target(
                &mut out,
                &format!("incremental after {pct}: at least 3x faster than {peer}"),
                speedup("loopback", peer, case),
                |x| x >= 3.0,
            );
        }
        let reference = run
            .mutations
            .iter()
            .find(|(m, _)| m == case)
            .and_then(|(_, v)| v["compressed_bytes"].as_f64());
        let wire = run.get("loopback", "understudy", case).map(|r| r.wire);
        let measured = reference.zip(wire).map(|(c, w)| {
            (
                w / c,
                format!(
                    "{:.3}x ({:.1} MB on the wire, {:.1} MB of changed blocks compressed)",
                    w / c,
                    w / 1e6,
                    c / 1e6
                ),
            )
        });
        target(
            &mut out,
            &format!(
                "incremental after {pct}: bytes on the wire at most 1.1x the compressed changed blocks"
            ),
            measured,
            |x| x <= 1.1,
        );
    }
    target(
        &mut out,
        "initial on loopback: at least 0.75x the speed of plaintext rsync --inplace",
        speedup("loopback", "rsync-inplace", "initial"),
        |x| x >= 0.75,
    );
    target(
        &mut out,
        "initial at 1 Gbit/s: at least 1.8x faster than rsync --inplace",
        speedup("1gbit", "rsync-inplace", "initial"),
        |x| x >= 1.8,
    );
    let tib = |case: &str| run.get("sparse-1tib", "understudy", case);
    type Rss = fn(&Row) -> f64;
    let sides: [(&str, Rss, f64); 2] = [
        ("source", |r| r.rss_src_kib, 128.0),
        ("target", |r| r.rss_tgt_kib, 256.0),
    ];
    for case in ["initial", "incr1mib"] {
        for (side, kib, limit) in sides {
            target(
                &mut out,
                &format!("1 TiB sparse, {case}: {side} peak RSS at most {limit:.0} MiB"),
                tib(case).map(|r| (kib(r) / 1024.0, format!("{:.0} MiB", kib(r) / 1024.0))),
                move |x| x <= limit,
            );
        }
    }
    target(
        &mut out,
        "1 TiB sparse, 1 MiB changed: the cycle in under 2 s",
        tib("incr1mib").map(|r| (r.wall, format!("{:.2} s", r.wall))),
        |x| x < 2.0,
    );
    let write = run.limit_rate("dd_write_direct");
    target(
        &mut out,
        "rebuild: at least 0.8x the sequential write rate of non-zero data",
        run.get("loopback", "understudy", "rebuild")
            .zip(write)
            .map(|(u, w)| {
                let rate = run.volume_bytes() / u.wall;
                (
                    rate / w,
                    format!(
                        "{:.2}x ({:.2} GiB/s of volume vs dd {:.2} GiB/s)",
                        rate / w,
                        rate / 1024.0 / MIB,
                        w / 1024.0 / MIB
                    ),
                )
            }),
        |x| x >= 0.8,
    );
    let us: Vec<&Row> = run.rows.iter().filter(|r| r.tool == "understudy").collect();
    let peak = |f: fn(&Row) -> f64| us.iter().map(|r| f(r)).fold(0.0, f64::max) / 1024.0;
    let src = peak(|r| r.rss_src_kib);
    target(
        &mut out,
        "source agent peak RSS under 128 MiB",
        Some((src, format!("{src:.0} MiB"))),
        |x| x < 128.0,
    );
    let tgt = peak(|r| r.rss_tgt_kib);
    target(
        &mut out,
        "target agent peak RSS under 256 MiB",
        Some((tgt, format!("{tgt:.0} MiB"))),
        |x| x < 256.0,
    );
    out
}

fn chart(run: &Run, path: &PathBuf) -> Result<()> {
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
        .context("the chart needs DejaVuSans.ttf (Debian package fonts-dejavu-core)")?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("DejaVuSans.ttf is not a usable font"))?;
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 2));
    for (area, (profile, title)) in panels.iter().zip([
        ("loopback", "Loopback: wall seconds (lower is better)"),
        ("1gbit", "1 Gbit/s link: wall seconds (lower is better)"),
    ]) {
        panel(run, area, profile, title)?;
    }
    root.present()
        .with_context(|| format!("cannot write chart {}", path.display()))?;
    Ok(())
}

fn panel(
    run: &Run,
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    profile: &str,
    title: &str,
) -> Result<()> {
    let cases: Vec<(&str, &str)> = CASES
        .iter()
        .copied()
        .filter(|(c, _)| run.get(profile, "understudy", c).is_some())
        .collect();
    let top = run
        .rows
        .iter()
        .filter(|r| r.profile == profile)
        .map(|r| r.wall)
        .fold(1.0, f64::max)
        * 1.1;
    let slots = (TOOLS.len() + 1) as f64;
    let mut c = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..(cases.len() as f64 * slots), 0.0..top)?;
    let labels: Vec<String> = cases.iter().map(|(c, _)| c.to_string()).collect();
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(cases.len() * (TOOLS.len() + 1) + 1)
        .x_label_formatter(&|x| {
            let i = (x / slots).floor() as usize;
            let centre = (x - i as f64 * slots - slots / 2.0).abs() < 0.6;
            match labels.get(i) {
                Some(l) if centre => l.clone(),
                _ => String::new(),
            }
        })
        .y_desc("seconds")
        .draw()?;
    for (t, tool) in TOOLS.iter().enumerate() {
        let colour = Palette99::pick(t).to_rgba();
        let bars: Vec<Rectangle<(f64, f64)>> = cases
            .iter()
            .enumerate()
            .filter_map(|(i, (case, _))| {
                let r = run.get(profile, tool, case)?;
                let x = i as f64 * slots + 0.5 + t as f64;
                Some(Rectangle::new(
                    [(x, 0.0), (x + 0.9, r.wall)],
                    colour.filled(),
                ))
            })
            .collect();
        if bars.is_empty() {
            continue;
        }
        c.draw_series(bars)?
            .label(*tool)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
