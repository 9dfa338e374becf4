//! Data movers over real QUIC, without a cluster (protocol 4): the source grants one key per
//! volume, `source-agent mover` processes stage their volumes in parallel on their own
//! connections, and the source commits them as one point. Checks bit-exact restores, that a
//! delta sends the changed blocks only, that nothing is visible before the commit, that a key
//! nobody granted gets nothing, and that a mover killed with SIGKILL and run again resends
//! nothing already durable.

use source_agent::mover::{MoverReport, MoverTicket};
use source_agent::staged::{self, MoverKey, StagedCut};
use source_agent::target::{Connector, TargetAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use understudy_common::cut::CapturedManifests;
use understudy_common::store::VolumeMeta;
use understudy_common::transport::{Identity, Peers};
use understudy_e2e::{Pair, Volumes, bin, s};

const GROUP: &str = "app";
const MIB: u64 = 1 << 20;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The source's connector, as the controller makes it from its Secret.
fn connector(p: &Pair) -> (Connector, TargetAddr, String) {
    let id = Identity::load(&p.source_dir).unwrap();
    let target_fp = Peers::load(&p.source_dir).unwrap().fingerprints().remove(0);
    let target: TargetAddr = p.addr.parse().unwrap();
    (
        Connector::new(id, vec![target_fp.clone()]),
        target,
        target_fp.to_string(),
    )
}

fn ticket(p: &Pair, stage: &str, key: &MoverKey) -> MoverTicket {
    let (_, target, fp) = connector(p);
    MoverTicket {
        group: GROUP.into(),
        stage: stage.into(),
        volume: key.volume.clone(),
        created_ms: 1_700_000_000_000,
        target: target.to_string(),
        target_fingerprint: fp,
        block_size: 64 << 10,
        zstd_level: 1,
        workers: 2,
        streams: 2,
        bandwidth_limit_mbit: None,
        cert_pem: key.cert_pem.clone(),
        key_pem: key.key_pem.clone(),
        cbt: None,
    }
}

/// Starts a mover process for `volume` at `device`.
fn spawn_mover(p: &Pair, t: &MoverTicket, device: &Path) -> std::process::Child {
    let dir = p.path(&format!("mover-{}-{}", t.stage, t.volume));
    std::fs::create_dir_all(&dir).unwrap();
    let tf = dir.join("ticket.json");
    std::fs::write(&tf, serde_json::to_vec(t).unwrap()).unwrap();
    Command::new(bin("source-agent"))
        .args(["mover", "--ticket", s(&tf), "--device", s(device)])
        .args(["--report", s(&dir.join("report.json"))])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(p: &Pair, mut child: std::process::Child, t: &MoverTicket) -> MoverReport {
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(
        status.success(),
        "mover of {} failed: {err}\ntarget:\n{}",
        t.volume,
        p.target_log()
    );
    let dir = p.path(&format!("mover-{}-{}", t.stage, t.volume));
    serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap()
}

/// One cycle through movers: grant, stage every volume in parallel, commit. Returns the seq
/// and the movers' reports.
fn cycle(p: &Pair, vols: &Volumes, stage: &str) -> (u64, Vec<MoverReport>) {
    let before = p.points(GROUP).len();
    let (conn, target, _) = connector(p);
    let names: Vec<String> = vols.0.iter().map(|(n, _)| n.to_string()).collect();
    let keys = staged::mover_keys(GROUP, &names).unwrap();
    let rt = rt();
    rt.block_on(staged::authorize(
        &conn,
        &target,
        GROUP,
        stage,
        &keys,
        Duration::from_secs(600),
    ))
    .unwrap();
    let tickets: Vec<MoverTicket> = keys.iter().map(|k| ticket(p, stage, k)).collect();
    let children: Vec<_> = tickets
        .iter()
        .zip(&vols.0)
        .map(|(t, (_, path))| spawn_mover(p, t, path))
        .collect();
    let reports: Vec<MoverReport> = children
        .into_iter()
        .zip(&tickets)
        .map(|(c, t)| finish(p, c, t))
        .collect();
    assert_eq!(
        p.points(GROUP).len(),
        before,
        "staged volumes are not a point before the commit"
    );
    let seq = commit(p, stage, &reports);
    (seq, reports)
}

fn commit(p: &Pair, stage: &str, reports: &[MoverReport]) -> u64 {
    let (conn, target, _) = connector(p);
    let manifests = CapturedManifests {
        encoded: b"kind: ConfigMap\n".to_vec(),
        files: 1,
    };
    let cut = StagedCut {
        group: GROUP,
        stage,
        created_ms: 1_700_000_000_000,
        block_size: 64 << 10,
        zstd_level: 1,
        volumes: reports
            .iter()
            .map(|r| VolumeMeta {
                name: r.volume.clone(),
                size: r.size,
                digest: r.digest.clone(),
            })
            .collect(),
        manifests: &manifests,
        final_for: None,
    };
    let spool = p.path("commit-spool");
    std::fs::create_dir_all(&spool).unwrap();
    rt().block_on(staged::commit(&conn, &target, cut, &spool, None))
        .unwrap()
        .seq
}

/// Writes `len` bytes of data that does not repeat (so no two blocks dedupe) at `offset`.
fn write(path: &Path, offset: u64, len: usize, seed: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut data = vec![0u8; len];
    blake3::Hasher::new()
        .update(&[seed])
        .update(&offset.to_le_bytes())
        .finalize_xof()
        .fill(&mut data);
    f.write_all_at(&data, offset).unwrap();
}

#[test]
fn movers_stage_volumes_in_parallel_and_one_commit_makes_the_point() {
    let mut p = Pair::new();
    p.start_target(&[]);
    let vols = Volumes::create(&p, &["a", "b"], 64 * MIB);
    write(vols.path(0), 0, 8 << 20, 1);
    write(vols.path(1), 20 << 20, 3 << 20, 2);
    let first = vols.digests();
    let (seq, reports) = cycle(&p, &vols, "s1");
    assert_eq!(seq, 1);
    assert_eq!(
        reports[0].chunks_sent, 128,
        "8 MiB of new data is 128 blocks"
    );
    let out = p.path("out1");
    p.failover(GROUP, "1", &out, &[]);
    vols.assert_restored(&out, &first, "point 1");

    // A delta: 3 blocks change in a, none in b; only those travel.
    write(vols.path(0), 40 << 20, 3 * (64 << 10), 7);
    let second = vols.digests();
    let (seq, reports) = cycle(&p, &vols, "s2");
    assert_eq!(seq, 2);
    assert_eq!((reports[0].chunks_sent, reports[1].chunks_sent), (3, 0));
    assert_eq!(reports[0].blocks_changed, 3);
    let out = p.path("out2");
    p.failover(GROUP, "2", &out, &[]);
    vols.assert_restored(&out, &second, "point 2");
    let out = p.path("out1b");
    p.failover(GROUP, "1", &out, &[]);
    vols.assert_restored(&out, &first, "point 1 after point 2");
}

#[test]
fn a_key_nobody_granted_gets_nothing() {
    let mut p = Pair::new();
    p.start_target(&[]);
    let vols = Volumes::create(&p, &["a"], 8 * MIB);
    write(vols.path(0), 0, MIB as usize, 3);
    let keys = staged::mover_keys(GROUP, &["a".to_string()]).unwrap();
    let t = ticket(&p, "s1", &keys[0]);
    let child = spawn_mover(&p, &t, vols.path(0));
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused this agent's certificate"), "{err}");
    assert!(
        p.target_log()
            .contains("refused a peer whose certificate is not pinned")
    );
    assert!(p.points(GROUP).is_empty());
}

#[test]
fn a_mover_killed_mid_transfer_resumes_without_resending_durable_chunks() {
    let mut p = Pair::new();
    p.start_target(&["--flush-every-mib", "1"]);
    let vols = Volumes::create(&p, &["a"], 256 * MIB);
    write(vols.path(0), 0, 192 << 20, 5);
    let want = vols.digests();
    let (conn, target, _) = connector(&p);
    let keys = staged::mover_keys(GROUP, &["a".to_string()]).unwrap();
    rt().block_on(staged::authorize(
        &conn,
        &target,
        GROUP,
        "s1",
        &keys,
        Duration::from_secs(600),
    ))
    .unwrap();
    let t = ticket(&p, "s1", &keys[0]);
    let mut child = spawn_mover(&p, &t, vols.path(0));
    // Kill it once some chunks are durable on the target.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while p.pack_bytes() < 24 * MIB {
        assert!(
            std::time::Instant::now() < deadline,
            "the mover stored nothing: {}",
            p.target_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let durable = p.pack_bytes();
    let again = spawn_mover(&p, &t, vols.path(0));
    let report = finish(&p, again, &t);
    assert!(
        report.chunks_held > 0 && report.chunks_sent + report.chunks_held == 3072,
        "the rerun sends what is missing only: {report:?} ({durable} bytes were durable)"
    );
    assert_eq!(commit(&p, "s1", &[report]), 1);
    let out = p.path("out");
    p.failover(GROUP, "1", &out, &[]);
    vols.assert_restored(&out, &want, "point 1");
}
