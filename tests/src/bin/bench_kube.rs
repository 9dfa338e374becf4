//! `bench-kube`: the primary side's figures on the two-cluster test bed (docs/benchmarks.md,
//! "The primary side on the test bed"). Prints a markdown report; run it in release:
//! `cargo run --release -p understudy-e2e --bin bench-kube -- [--case cbt|parallel|rpo]...`
//! (needs root and `tests/kube-testbed/build.sh --node`).
//!
//! - `cbt`: one Block PVC (`--size-gib`, default 4) filled with random data; the first point
//!   (changed-block tracking: allocated ranges), then after 1% of its 64 KiB blocks change, a
//!   point with the driver's delta, then (SnapshotMetadataService removed) after another 1%, a
//!   point with hash-diff. Per point: cycle time, mover time, bytes read and sent; and the time
//!   to read the changed bytes once (as many random 64 KiB reads of the volume's file on the
//!   host, page cache dropped).
//! - `parallel`: `--volumes` (default 4) PVCs of `--volume-gib` (default 1), filled; the first
//!   point with one mover at a time (`maxParallelMovers: 1`), then a new group's first point
//!   with all movers at once.
//! - `rpo`: 10 PVCs of 256 MiB, a pod changing 1% of each per minute, a 30 s interval, for
//!   `--minutes` (default 5): the RPO sampled every second (now minus the last point's
//!   snapshot time), points committed, cycle times.
//! - `rto`: the standby's recovery time: one Block PVC of `--size-gib` (default 4) and then 10
//!   PVCs of `--rto-volume-mib` (default 256), filled, each set with a Deployment using it,
//!   replicated to a point; then a `Failover` on the standby: seconds from its creation to the
//!   Deployment ready (every PVC rebuilt by writer pods and verified, the objects applied).
//!
//! The CSI driver is the project's test driver: its snapshots and restores copy the volume's
//! file, which the cycle times include (a real array's snapshots are copy-on-write).

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use serde_json::Value;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};
use understudy_e2e::node::{NodeCluster, PROGRAMS_IMAGE, TOOLS_IMAGE};
use understudy_e2e::replication::{Bed, MIN, NS, group_yaml};

#[derive(Parser)]
struct Args {
    /// Cases to run (default: all).
    #[arg(long = "case", value_enum)]
    cases: Vec<Case>,
    /// Size of the `cbt` case's volume.
    #[arg(long, default_value_t = 4)]
    size_gib: u64,
    /// Volumes of the `parallel` case.
    #[arg(long, default_value_t = 4)]
    volumes: usize,
    /// Size of each of the `parallel` case's volumes.
    #[arg(long, default_value_t = 1)]
    volume_gib: u64,
    /// Length of the `rpo` case.
    #[arg(long, default_value_t = 5)]
    minutes: u64,
    /// Size of each of the `rto` case's 10 volumes.
    #[arg(long, default_value_t = 256)]
    rto_volume_mib: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Case {
    Cbt,
    Parallel,
    Rpo,
    Rto,
}

const BLOCK: u64 = 64 << 10;

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let cases = if args.cases.is_empty() {
        vec![Case::Cbt, Case::Parallel, Case::Rpo, Case::Rto]
    } else {
        args.cases.clone()
    };
    if cfg!(debug_assertions) {
        eprintln!(
            "warning: a debug build; the agents' figures mean little (use cargo run --release)"
        );
    }
    println!("# The primary side on the test bed\n");
    println!("{}\n", machine());
    for case in cases {
        let bed = if case == Case::Rto {
            Bed::start_with_standby().await
        } else {
            Bed::start().await
        };
        let Some(mut bed) = bed else {
            bail!(
                "the node test bed is not available: run tests/kube-testbed/build.sh --node, as root"
            );
        };
        match case {
            Case::Cbt => cbt(&mut bed, args.size_gib).await?,
            Case::Parallel => parallel(&mut bed, args.volumes, args.volume_gib).await?,
            Case::Rpo => rpo(&mut bed, args.minutes).await?,
            Case::Rto => rto(&mut bed, args.size_gib, args.rto_volume_mib).await?,
        }
    }
    Ok(())
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().map(str::to_string))
        .unwrap_or_default();
    format!(
        "Machine: {cpus} CPUs, {}; one node per cluster, the project's test CSI driver.",
        mem.split_whitespace().skip(1).collect::<Vec<_>>().join(" ")
    )
}

/// Block PVCs `names` of `mib` MiB each, filled with random data by one pod.
async fn filled_pvcs(c: &NodeCluster, names: &[String], mib: u64, app: &str) -> Result<()> {
    for n in names {
        c.create_yaml(&format!(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: {n}, namespace: {NS}, labels: {{app: {app}}}}}\nspec:\n  accessModes: [ReadWriteOnce]\n  volumeMode: Block\n  resources: {{requests: {{storage: {mib}Mi}}}}\n"
        ))
        .await?;
    }
    let dd: Vec<String> = (0..names.len())
        .map(|i| format!("dd if=/dev/urandom of=/dev/v{i} bs=1048576 count={mib} oflag=direct"))
        .collect();
    run_on(
        c,
        &format!("fill-{app}"),
        TOOLS_IMAGE,
        &["sh", "-c", &format!("{} && sync", dd.join(" && "))],
        names,
        Duration::from_secs(900),
    )
    .await
}

/// Runs a pod to completion with the PVCs `pvcs` as /dev/v0, /dev/v1, ...
async fn run_on(
    c: &NodeCluster,
    name: &str,
    image: &str,
    command: &[&str],
    pvcs: &[String],
    timeout: Duration,
) -> Result<()> {
    let yaml = pod_yaml(name, image, command, pvcs, "Never");
    c.create_yaml(&yaml).await?;
    c.wait_pod(NS, name, "Succeeded", timeout).await?;
    Ok(())
}

fn pod_yaml(name: &str, image: &str, command: &[&str], pvcs: &[String], restart: &str) -> String {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": pod_spec(image, command, pvcs, restart),
    })
    .to_string()
}

/// A pod's spec: one container running `command` with the PVCs `pvcs` as /dev/v0, /dev/v1, ...
fn pod_spec(image: &str, command: &[&str], pvcs: &[String], restart: &str) -> Value {
    let devices: Vec<Value> = (0..pvcs.len())
        .map(|i| serde_json::json!({"name": format!("v{i}"), "devicePath": format!("/dev/v{i}")}))
        .collect();
    let volumes: Vec<Value> = pvcs
        .iter()
        .enumerate()
        .map(|(i, p)| serde_json::json!({"name": format!("v{i}"), "persistentVolumeClaim": {"claimName": p}}))
        .collect();
    serde_json::json!({
        "restartPolicy": restart,
        "terminationGracePeriodSeconds": 0,
        "containers": [{
            "name": "main", "image": image, "imagePullPolicy": "Never",
            "command": command, "volumeDevices": devices,
        }],
        "volumes": volumes,
    })
}

/// Changes `fraction` of each PVC's blocks (the scribbler, seeded).
async fn scribble(
    c: &NodeCluster,
    name: &str,
    pvcs: &[String],
    fraction: f64,
    seed: u64,
) -> Result<()> {
    let mut cmd = vec![
        "/bin/understudy-testbed-tool".to_string(),
        "scribble".into(),
    ];
    cmd.extend((0..pvcs.len()).map(|i| format!("/dev/v{i}")));
    cmd.extend([
        "--fraction".into(),
        fraction.to_string(),
        "--seed".into(),
        seed.to_string(),
    ]);
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    run_on(
        c,
        name,
        PROGRAMS_IMAGE,
        &cmd,
        pvcs,
        Duration::from_secs(300),
    )
    .await
}

/// One point's figures, from the group's status.
struct Figures {
    seq: u64,
    cycle_s: f64,
    read: u64,
    sent: u64,
    mover_ms: Vec<u64>,
    source: String,
}

impl Figures {
    fn of(g: &Value) -> Self {
        let st = &g["status"];
        let vols = st["volumes"].as_array().cloned().unwrap_or_default();
        Figures {
            seq: st["lastPoint"]["sequence"].as_u64().unwrap_or(0),
            cycle_s: st["lastPoint"]["cycleSeconds"].as_f64().unwrap_or(0.0),
            read: vols.iter().filter_map(|v| v["bytesRead"].as_u64()).sum(),
            sent: vols.iter().filter_map(|v| v["bytesSent"].as_u64()).sum(),
            mover_ms: vols.iter().filter_map(|v| v["moverMs"].as_u64()).collect(),
            source: vols
                .first()
                .and_then(|v| v["changeSource"].as_str())
                .unwrap_or("")
                .to_string(),
        }
    }

    fn row(&self, case: &str) -> String {
        let mover = self.mover_ms.iter().max().copied().unwrap_or(0) as f64 / 1000.0;
        format!(
            "| {case} | {} | {:.1} | {mover:.1} | {} | {} |",
            self.source,
            self.cycle_s,
            mib(self.read),
            mib(self.sent)
        )
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

/// Waits for the group's next point after `seq`, pauses the group and lets the cycle end. The
/// figures are that point's; `seq` is the last point once settled (a cycle in flight when the
/// group was paused still commits), for the next call to wait after.
async fn next_point(bed: &Bed, group: &str, seq: u64, volumes: usize, groups: usize) -> Figures {
    let g = bed.wait_point(group, seq + 1, 30 * MIN).await;
    let settled = bed.wait_settled(group, volumes, groups).await;
    Figures {
        seq: Figures::of(&settled).seq,
        ..Figures::of(&g)
    }
}

async fn resume(bed: &Bed, group: &str) {
    bed.patch_spec(group, serde_json::json!({"paused": false}))
        .await;
}

async fn cbt(bed: &mut Bed, gib: u64) -> Result<()> {
    let pvc = vec!["disk".to_string()];
    filled_pvcs(&bed.primary, &pvc, gib << 10, "bench").await?;
    let target = bed.pair.addr.clone();
    bed.primary
        .create_yaml(
            &group_yaml("bench", "crash", &target, "").replace("{app: writer}", "{app: bench}"),
        )
        .await?;
    bed.start_controller();
    let first = next_point(bed, "bench", 0, 1, 0).await;
    scribble(&bed.primary, "change-1", &pvc, 0.01, 2).await?;
    let read_once = read_once_s(bed, "disk", (gib << 30) / BLOCK / 100).await?;
    resume(bed, "bench").await;
    let delta = next_point(bed, "bench", first.seq, 1, 0).await;
    bed.primary.remove_snapshot_metadata_services().await?;
    scribble(&bed.primary, "change-2", &pvc, 0.01, 3).await?;
    resume(bed, "bench").await;
    let hashed = next_point(bed, "bench", delta.seq, 1, 0).await;
    println!("## One {gib} GiB Block PVC, 1% of its blocks changed\n");
    println!("| point | change source | cycle s | mover s | read | sent |");
    println!("|---|---|---|---|---|---|");
    println!("{}", first.row("first (all data)"));
    println!("{}", delta.row("after 1% change, CBT"));
    println!("{}", hashed.row("after 1% change, no CBT"));
    let mover = delta.mover_ms.first().copied().unwrap_or(0) as f64 / 1000.0;
    println!(
        "\nReading the changed bytes once ({} random 64 KiB reads of the volume's file, cold): {read_once:.2} s; the CBT mover took {mover:.1} s ({:.1}x).\n",
        (gib << 30) / BLOCK / 100,
        mover / read_once.max(1e-6)
    );
    bed.kill_controller();
    Ok(())
}

/// Seconds to read `blocks` random 64 KiB blocks of the PVC's file on the host, cold.
async fn read_once_s(bed: &Bed, pvc: &str, blocks: u64) -> Result<f64> {
    let path = bed.primary.claim_image(NS, pvc).await?;
    let f = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len();
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)?;
    let mut buf = vec![0u8; BLOCK as usize];
    let total = len / BLOCK;
    let start = Instant::now();
    // A fixed stride walk (coprime with the block count) touches distinct blocks.
    let stride = 7919 % total.max(1);
    let mut b = 0;
    for _ in 0..blocks {
        f.read_exact_at(&mut buf, b * BLOCK)?;
        b = (b + stride.max(1)) % total.max(1);
    }
    Ok(start.elapsed().as_secs_f64())
}

async fn parallel(bed: &mut Bed, volumes: usize, gib: u64) -> Result<()> {
    let pvcs: Vec<String> = (0..volumes).map(|i| format!("par-{i}")).collect();
    filled_pvcs(&bed.primary, &pvcs, gib << 10, "bench").await?;
    let target = bed.pair.addr.clone();
    bed.start_controller();
    let mut rows = Vec::new();
    for (name, limit) in [("one", Some(1)), ("all", None)] {
        let extra = limit.map_or(String::new(), |n| format!("  maxParallelMovers: {n}\n"));
        bed.primary
            .create_yaml(
                &group_yaml(name, "crash", &target, &extra)
                    .replace("{app: writer}", "{app: bench}"),
            )
            .await?;
        let f = next_point(bed, name, 0, volumes, 0).await;
        bed.delete_group(name).await;
        rows.push((name, f));
    }
    println!("## {volumes} Block PVCs of {gib} GiB, first point\n");
    println!("| movers at once | cycle s | slowest mover s | sum of mover s | read | sent |");
    println!("|---|---|---|---|---|---|");
    for (name, f) in &rows {
        let max = f.mover_ms.iter().max().copied().unwrap_or(0) as f64 / 1000.0;
        let sum = f.mover_ms.iter().sum::<u64>() as f64 / 1000.0;
        let label = if *name == "one" {
            "1".to_string()
        } else {
            volumes.to_string()
        };
        println!(
            "| {label} | {:.1} | {max:.1} | {sum:.1} | {} | {} |",
            f.cycle_s,
            mib(f.read),
            mib(f.sent)
        );
    }
    println!();
    bed.kill_controller();
    Ok(())
}

async fn rpo(bed: &mut Bed, minutes: u64) -> Result<()> {
    let pvcs: Vec<String> = (0..10).map(|i| format!("rpo-{i}")).collect();
    for n in &pvcs {
        bed.primary
            .create_yaml(&format!(
                "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: {n}, namespace: {NS}, labels: {{app: bench}}}}\nspec:\n  accessModes: [ReadWriteOnce]\n  volumeMode: Block\n  resources: {{requests: {{storage: 256Mi}}}}\n"
            ))
            .await?;
    }
    let dd: Vec<String> = (0..pvcs.len())
        .map(|i| format!("dd if=/dev/urandom of=/dev/v{i} bs=1048576 count=256"))
        .collect();
    run_on(
        &bed.primary,
        "fill",
        TOOLS_IMAGE,
        &["sh", "-c", &format!("{} && sync", dd.join(" && "))],
        &pvcs,
        Duration::from_secs(900),
    )
    .await?;
    let mut cmd = vec![
        "/bin/understudy-testbed-tool".to_string(),
        "scribble".into(),
    ];
    cmd.extend((0..pvcs.len()).map(|i| format!("/dev/v{i}")));
    cmd.extend(["--fraction", "0.01", "--every-ms", "60000"].map(String::from));
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    bed.primary
        .create_yaml(&pod_yaml("changer", PROGRAMS_IMAGE, &cmd, &pvcs, "Always"))
        .await?;
    bed.primary.wait_pod(NS, "changer", "Running", MIN).await?;
    let target = bed.pair.addr.clone();
    bed.primary
        .create_yaml(
            &group_yaml("rpo", "group", &target, "")
                .replace("{app: writer}", "{app: bench}")
                .replace("interval: 10s", "interval: 30s"),
        )
        .await?;
    bed.start_controller();
    bed.wait_point("rpo", 1, 30 * MIN).await;
    let end = Instant::now() + Duration::from_secs(minutes * 60);
    let (mut samples, mut cycles, mut first_seq, mut last_seq) = (Vec::new(), Vec::new(), None, 0);
    while Instant::now() < end {
        let g = bed.group("rpo").await;
        let p = &g["status"]["lastPoint"];
        if let Some(t) = p["snapshotTime"]
            .as_str()
            .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        {
            let now = understudy_common::now_ms();
            samples.push((now - t.as_millisecond()) as f64 / 1000.0);
        }
        let seq = p["sequence"].as_u64().unwrap_or(0);
        first_seq.get_or_insert(seq);
        if seq != last_seq {
            cycles.push(p["cycleSeconds"].as_f64().unwrap_or(0.0));
            last_seq = seq;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    samples.sort_by(f64::total_cmp);
    cycles.sort_by(f64::total_cmp);
    let pct = |v: &[f64], q: f64| {
        v.get(((v.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    println!(
        "## Sustained RPO: 10 Block PVCs of 256 MiB, 1% of each changed per minute, 30 s interval, {minutes} min\n"
    );
    println!("| RPO p50 s | RPO p95 s | RPO max s | points | cycle p50 s | cycle max s |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {:.0} | {:.0} | {:.0} | {} | {:.1} | {:.1} |\n",
        pct(&samples, 0.5),
        pct(&samples, 0.95),
        samples.last().copied().unwrap_or(0.0),
        last_seq - first_seq.unwrap_or(last_seq),
        pct(&cycles, 0.5),
        cycles.last().copied().unwrap_or(0.0)
    );
    bed.kill_controller();
    Ok(())
}

/// The `rto` case: per set of volumes, the time from a Failover's creation on the standby to
/// its application ready.
async fn rto(bed: &mut Bed, gib: u64, volume_mib: u64) -> Result<()> {
    let target = bed.pair.addr.clone();
    bed.start_controller();
    let mut rows = Vec::new();
    for (app, count, size_mib) in [("rto-one", 1usize, gib << 10), ("rto-ten", 10, volume_mib)] {
        let pvcs: Vec<String> = (0..count).map(|i| format!("{app}-{i}")).collect();
        filled_pvcs(&bed.primary, &pvcs, size_mib, app)
            .await
            .with_context(|| format!("filling the PVCs of {app}"))?;
        let deployment = serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": app, "namespace": NS, "labels": {"app": app}},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": app}},
                "template": {
                    "metadata": {"labels": {"app": app}},
                    "spec": pod_spec(TOOLS_IMAGE, &["sleep", "3600"], &pvcs, "Always"),
                },
            },
        });
        bed.primary
            .create_yaml(&deployment.to_string())
            .await
            .context("creating the Deployment")?;
        bed.primary
            .create_yaml(
                &group_yaml(app, "group", &target, "")
                    .replace("{app: writer}", &format!("{{app: {app}}}")),
            )
            .await?;
        bed.wait_point(app, 1, 30 * MIN).await;
        bed.patch_spec(app, serde_json::json!({"paused": true}))
            .await;
        let name = format!("{app}-now");
        bed.standby
            .create_yaml(&format!(
                "apiVersion: understudy.io/v1alpha1\nkind: Failover\nmetadata: {{name: {name}, namespace: default}}\nspec: {{group: {NS}.{app}, namespaceMap: {{{NS}: {app}}}, timeout: 30m}}\n"
            ))
            .await?;
        let fo = understudy_e2e::standby::finished(&bed.standby, &name, 30 * MIN)
            .await
            .with_context(|| format!("waiting for Failover {name}"))?;
        let report = &fo["status"]["report"];
        if fo["status"]["phase"] != "Succeeded" {
            bail!("the failover of {app} failed: {report}");
        }
        let written: u64 = report["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["bytesWritten"].as_u64())
            .sum();
        rows.push((
            count,
            size_mib,
            report["rtoSeconds"].as_f64().unwrap_or(0.0),
            written,
        ));
    }
    println!("## Recovery time on the standby (Failover created -> Deployment ready)\n");
    println!("| volumes | each | RTO s | written | written per s |");
    println!("|---|---|---|---|---|");
    for (count, each, rto, written) in rows {
        println!(
            "| {count} | {} | {rto:.1} | {} | {}/s |",
            mib(each << 20),
            mib(written),
            mib((written as f64 / rto.max(0.001)) as u64)
        );
    }
    println!();
    bed.kill_controller();
    Ok(())
}
