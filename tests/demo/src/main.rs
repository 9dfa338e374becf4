//! The quickstart demo: no cluster, one machine. Creates two sample volumes (sparse images) and a
//! directory of manifests, runs a target agent and a source agent paired over mutual-TLS QUIC on
//! loopback, changes data over three cycles, fails over to the latest point and prints the
//! verified report. Everything lives in a temporary directory unless --dir is given.

use anyhow::{Context, Result};
use clap::Parser;
use source_agent::cycle::{SourceAgent, SourceConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use target_agent::failover::{FailoverRequest, PointSelector, failover};
use target_agent::server::{Server, ServerConfig};
use understudy_common::cut::CutConfig;
use understudy_common::metrics::Metrics;
use understudy_common::store::retention::RetentionPolicy;
use understudy_common::transport::{Identity, Peers};
use understudy_common::volume::VolumeSpec;
use understudy_demo::sample::{digest, write_random, write_text};
use understudy_kube::DirectoryManifests;
use understudy_kube::transform::Rules;

/// Understudy demo: replicate two volumes and their manifests, then fail over.
#[derive(Parser)]
struct Args {
    /// Keep everything in this directory (default: a temporary one, removed at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Size of each sample volume, in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
}

const MANIFESTS: &[(&str, &str)] = &[
    (
        "deployment.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: shop\n  uid: 0b5a\n  resourceVersion: \"4711\"\nspec:\n  replicas: 2\n  selector:\n    matchLabels: {app: web}\n  template:\n    metadata:\n      labels: {app: web}\n    spec:\n      containers:\n      - name: web\n        image: registry.example/shop/web:1.4\n",
    ),
    (
        "service.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\nspec:\n  clusterIP: 10.96.0.17\n  ports:\n  - port: 80\n",
    ),
    (
        "pvc.yaml",
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: db-data\n  namespace: shop\n  annotations:\n    pv.kubernetes.io/bind-completed: \"yes\"\nspec:\n  storageClassName: fast\n  volumeName: pvc-93c1\n  accessModes: [ReadWriteOnce]\n  resources:\n    requests: {storage: 1Gi}\nstatus:\n  phase: Bound\n",
    ),
];

fn main() -> Result<()> {
    understudy_common::transport::install_crypto_provider();
    understudy_common::telemetry::init(understudy_common::telemetry::LogFormat::Human);
    let args = Args::parse();
    let tmp = tempfile::tempdir()?;
    let root = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&root)?;
    tokio::runtime::Runtime::new()?.block_on(demo(&root, args.size_mib << 20))
}

async fn demo(root: &Path, size: u64) -> Result<()> {
    step("1. sample application: two volumes and three manifests");
    let (db, logs) = (root.join("db.img"), root.join("logs.img"));
    for v in [&db, &logs] {
        std::fs::File::create(v)?.set_len(size)?;
    }
    write_random(&db, 0, 32 << 20, 1);
    write_text(&logs, 0, 16 << 20, 1);
    let manifests = root.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    for (name, text) in MANIFESTS {
        std::fs::write(manifests.join(name), text)?;
    }
    println!(
        "   {} and {} ({} MiB each, sparse), manifests in {}",
        db.display(),
        logs.display(),
        size >> 20,
        manifests.display()
    );

    step("2. identities and pairing (each side pins the other's certificate fingerprint)");
    let (tdir, sdir) = (root.join("target-agent"), root.join("source-agent"));
    let (tid, sid) = (identity(&tdir, "target")?, identity(&sdir, "source")?);
    Peers::pair(&tdir, "source", sid.fingerprint.clone())?;
    Peers::pair(&sdir, "target", tid.fingerprint.clone())?;
    println!(
        "   target {}\n   source {}",
        tid.fingerprint, sid.fingerprint
    );

    step("3. target agent listening on loopback (QUIC, TLS 1.3, mutual auth)");
    let cfg = ServerConfig {
        dir: tdir.clone(),
        identity: None,
        listen: "127.0.0.1:0".parse()?,
        retention: RetentionPolicy::default(),
        flush_bytes: understudy_common::protocol::target_session::FLUSH_BYTES,
    };
    let server = Server::bind(&cfg, Arc::new(Metrics::new()))?;
    let addr = server.local_addr()?;
    let serving = tokio::spawn(server.run(std::future::pending()));
    println!("   {addr}");

    step("4. three replication cycles, changing data in between");
    let source = SourceAgent::new(
        source_config(&sdir, addr, &db, &logs, &manifests),
        Arc::new(Metrics::new()),
        source_agent::stop::Stop::new(),
    )?;
    for cycle in 1..=3u64 {
        if cycle > 1 {
            // About 1% of the db volume and a little log growth.
            for i in 0..(size / (64 << 10) / 100) {
                write_random(
                    &db,
                    ((i * 7919 + cycle * 13) % (size / (64 << 10))) * (64 << 10),
                    64 << 10,
                    cycle * 1000 + i,
                );
            }
            write_text(&logs, (16 << 20) + cycle * (1 << 20), 1 << 20, cycle);
        }
        let r = source.run_cycle().await?;
        println!(
            "   cycle {cycle}: point {} read {:>6.1} MiB, sent {:>5} chunks / {:>6.1} MiB on the wire, target already held {}, {:.2} s",
            r.seq,
            mib(r.bytes_read),
            r.chunks_sent,
            mib(r.bytes_sent),
            r.chunks_held,
            r.seconds
        );
    }
    source.shutdown().await;
    serving.abort();
    let _ = serving.await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    step("5. failover to the latest point: rebuild volumes, verify digests, transform manifests");
    let store = understudy_common::store::Store::open(&tdir.join("store"))?;
    let out = root.join("failover");
    let req = FailoverRequest {
        group: "shop".into(),
        point: PointSelector::Latest,
        out: out.clone(),
        devices: Default::default(),
        rules: Rules::parse(
            "namespaces: {shop: shop-dr}\nstorageClasses: {fast: standard}\nimages:\n  - {from: registry.example, to: registry.dr.example}\n",
        )?,
        dry_run: false,
        read_back: true,
        age_guard: None,
    };
    let report = tokio::task::block_in_place(|| failover(&store, &req, &|_, _, _| {}))?;
    print!("{}", report.render());
    let same = digest(&db) == digest(&out.join("volumes/db.img"))
        && digest(&logs) == digest(&out.join("volumes/logs.img"));
    println!(
        "   byte-for-byte comparison with the source volumes: {}",
        if same { "identical" } else { "DIFFERENT" }
    );
    println!(
        "   transformed PVC (manifests/shop-dr/PersistentVolumeClaim/db-data.json):\n{}",
        indent(&std::fs::read_to_string(
            out.join("manifests/shop-dr/PersistentVolumeClaim/db-data.json")
        )?)
    );
    anyhow::ensure!(report.ok && same, "the demo failover did not verify");
    Ok(())
}

fn source_config(
    dir: &Path,
    target: std::net::SocketAddr,
    db: &Path,
    logs: &Path,
    manifests: &Path,
) -> SourceConfig {
    SourceConfig {
        bandwidth_limit_mbit: None,
        dir: dir.to_path_buf(),
        group: "shop".into(),
        target: source_agent::target::TargetAddr {
            host: target.ip().to_string(),
            port: target.port(),
        },
        streams: 4,
        cut: CutConfig {
            volumes: vec![
                VolumeSpec {
                    name: "db".into(),
                    path: db.to_path_buf(),
                },
                VolumeSpec {
                    name: "logs".into(),
                    path: logs.to_path_buf(),
                },
            ],
            manifests: std::sync::Arc::new(DirectoryManifests(manifests.to_path_buf())),
            block_size: understudy_common::DEFAULT_BLOCK_SIZE,
            zstd_level: 1,
            workers: 2,
            pre_hook: None,
            post_hook: None,
            source_id: String::new(),
        },
    }
}

fn identity(dir: &Path, name: &str) -> Result<Identity> {
    Identity::load(dir)
        .or_else(|_| Identity::init(dir, name))
        .with_context(|| format!("identity in {}", dir.display()))
}

fn step(s: &str) {
    println!("\n== {s}");
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("      {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
