//! The volume populator on the node test bed (a real kubelet, containerd, the CSI sidecars and
//! the project's own test CSI driver, which is a test component; see understudy_e2e::node): a
//! Block PVC whose dataSourceRef names a PointVolume is bound only to a volume a writer pod
//! rebuilt from the point and verified; a verifier pod reads it back byte for byte; a
//! Filesystem PVC mounts the source's file system. A damaged
//! chunk leaves the claim unbound with the point, volume and offset named. The agent as users
//! deploy it, a pod with its store on a claim (understudy_e2e::target_pod): store commands
//! reach the store through it, and its process SIGKILLed mid-populate leaves the claim unbound
//! until the restarted container completes it.

use serde_json::Value;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};
use understudy_e2e::node::{NodeCluster, STORAGE_CLASS};
use understudy_e2e::standby::{self, Mount, read_in_pod, sha256_of};
use understudy_e2e::target_pod;
use understudy_e2e::*;

const MIB: u64 = 1 << 20;
const NS: &str = "dr";
/// The volume's size: 24 MiB, data at three places, the rest holes.
const SIZE: u64 = 24 * MIB;

/// The standby bed ([`standby::start`]) holding point 1 of group `app` (volume `db`).
async fn standby() -> Option<(NodeCluster, Pair, std::path::PathBuf)> {
    let (c, p) = standby::start().await?;
    let db = first_point(&c, &p).await;
    Some((c, p, db))
}

/// Namespace `dr`, and point 1 of group `app` from a new volume `db` (copied to `db.1.img`);
/// returns the volume's path.
async fn first_point(c: &NodeCluster, p: &Pair) -> std::path::PathBuf {
    c.create_yaml(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n"
    ))
    .await
    .unwrap();
    let db = p.path("db.img");
    sparse_image(&db, SIZE);
    let f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
    f.write_all_at(&pattern(300_000, 1), 0).unwrap();
    f.write_all_at(&pattern(70_000, 2), 5 * MIB).unwrap();
    f.write_all_at(&pattern(4096, 3), SIZE - 4096).unwrap();
    p.cycle("app", &[("db", &db)], &[]);
    snapshot_copy(&db, &p.path("db.1.img"));
    db
}

/// Bytes that differ block to block (no two blocks the same chunk).
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// A PointVolume `name` of volume `db` of group `app` and a Block PVC of the same name
/// populated from it.
async fn claim_from(c: &NodeCluster, name: &str, point: &str) {
    claim_of(c, name, ("app", point, "db"), "Block").await
}

/// A PointVolume `name` of (group, point, volume) and a PVC of the same name and `mode`
/// populated from it.
async fn claim_of(
    c: &NodeCluster,
    name: &str,
    (group, point, volume): (&str, &str, &str),
    mode: &str,
) {
    c.create_yaml(&format!(
        r#"apiVersion: understudy.io/v1alpha1
kind: PointVolume
metadata: {{name: {name}, namespace: {NS}}}
spec: {{group: {group}, point: "{point}", volume: {volume}}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: {name}, namespace: {NS}}}
spec:
  accessModes: [ReadWriteOnce]
  volumeMode: {mode}
  storageClassName: {STORAGE_CLASS}
  resources: {{requests: {{storage: 32Mi}}}}
  dataSourceRef: {{apiGroup: understudy.io, kind: PointVolume, name: {name}}}
"#
    ))
    .await
    .unwrap();
}

async fn phase_of(c: &NodeCluster, kind: (&str, &str), name: &str) -> String {
    c.get(kind.0, kind.1, NS, name)
        .await
        .unwrap()
        .and_then(|o| {
            o.pointer("/status/phase")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .unwrap_or_default()
}

const PVC: (&str, &str) = ("v1", "PersistentVolumeClaim");
const SOURCE: (&str, &str) = ("understudy.io/v1alpha1", "PointVolume");

/// SHA-256 of the claim's first `SIZE` bytes, read by a pod.
async fn digest_in_pod(c: &NodeCluster, claim: &str) -> String {
    let script = format!("head -c {SIZE} /dev/xvda | sha256sum");
    let out = read_in_pod(
        c,
        NS,
        (&format!("read-{claim}"), claim),
        Mount::Block,
        &script,
    )
    .await;
    out.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A Filesystem claim gets the raw image through a Filesystem PV of the same volume: the
/// source's ext4, its file, and no Block PV left over.
async fn a_filesystem_claim_mounts_the_sources_file_system(c: &NodeCluster, p: &Pair) {
    let tree = p.path("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("hello.txt"), "from point 1 of files\n").unwrap();
    let img = p.path("files.img");
    let mkfs = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d", s(&tree), s(&img), "16M"])
        .status()
        .unwrap();
    assert!(mkfs.success());
    p.cycle("files", &[("data", &img)], &[]);
    claim_of(c, "files", ("files", "latest", "data"), "Filesystem").await;
    c.wait_for(PVC, NS, "files", Duration::from_secs(180), |o| {
        o.pointer("/status/phase") == Some(&"Bound".into())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\ntarget log:\n{}", p.target_log()));
    assert_eq!(read_file(c, "read-files").await, "from point 1 of files");
    manifests::eventually("the Block view of the volume to go", || async {
        let pvs = c.names("v1", "PersistentVolume", "").await?;
        let mut released = Vec::new();
        for n in pvs {
            let pv = c
                .get("v1", "PersistentVolume", "", &n)
                .await?
                .unwrap_or_default();
            if pv.pointer("/status/phase") != Some(&"Bound".into()) {
                released.push(n);
            }
        }
        Ok(released.is_empty() && leftovers(c).await.is_empty())
    })
    .await
    .unwrap();
    // The volume outlived its Block view.
    assert_eq!(
        read_file(c, "read-files-again").await,
        "from point 1 of files"
    );
}

/// `hello.txt` of claim `files`, read by pod `pod`.
async fn read_file(c: &NodeCluster, pod: &str) -> String {
    read_in_pod(
        c,
        NS,
        (pod, "files"),
        Mount::Filesystem,
        "cat /data/hello.txt",
    )
    .await
}

/// Names of what the populator made that is still there.
async fn leftovers(c: &NodeCluster) -> Vec<String> {
    let mut out = Vec::new();
    for (api, kind) in [("v1", "Pod"), ("v1", "Secret"), PVC] {
        for n in c.names(api, kind, NS).await.unwrap() {
            if n.starts_with("understudy-populate-") {
                out.push(format!("{kind}/{n}"));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn claims_from_points_are_bound_to_verified_volumes_and_a_damaged_chunk_to_none() {
    let Some((c, p, db)) = standby().await else {
        return;
    };
    let t0 = Instant::now();
    claim_from(&c, "db", "latest").await;
    c.wait_for(PVC, NS, "db", Duration::from_secs(180), |o| {
        o.pointer("/status/phase") == Some(&"Bound".into())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\ntarget log:\n{}", p.target_log()));
    eprintln!("populated and bound in {:.1} s", t0.elapsed().as_secs_f64());
    let src = c.get(SOURCE.0, SOURCE.1, NS, "db").await.unwrap().unwrap();
    assert_eq!(src["status"]["phase"], "Bound", "{src}");
    assert_eq!(src["status"]["sequence"], 1);
    assert_eq!(
        src["status"]["expectedDigest"],
        src["status"]["actualDigest"]
    );
    assert_eq!(
        digest_in_pod(&c, "db").await,
        sha256_of(&db),
        "the claim holds point 1, byte for byte"
    );
    manifests::eventually("the populator's objects to go", || async {
        Ok(leftovers(&c).await.is_empty())
    })
    .await
    .unwrap();

    a_filesystem_claim_mounts_the_sources_file_system(&c, &p).await;

    // Point 2 changes a block; its chunk is damaged in the store. The writers refuse it, three
    // times, and the claim is never bound.
    let f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
    let changed = pattern(65536, 9);
    f.write_all_at(&changed, 10 * MIB).unwrap();
    p.cycle("app", &[("db", &db)], &[]);
    damage_chunk(&p, blake3::hash(&changed).as_bytes());
    claim_from(&c, "bad", "2").await;
    let failed = c
        .wait_for(SOURCE, NS, "bad", Duration::from_secs(240), |o| {
            o.pointer("/status/phase") == Some(&"Failed".into())
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\ntarget log:\n{}", p.target_log()));
    let msg = failed["status"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&format!("volume db of point 2, block at byte {}", 10 * MIB)),
        "{msg}"
    );
    assert_eq!(failed["status"]["attempts"], 3);
    assert_ne!(phase_of(&c, PVC, "bad").await, "Bound");
}

/// Sequence numbers of the points `target-agent points` lists, run in the agent's pod.
async fn points_in_pod(c: &NodeCluster) -> Vec<u64> {
    let out = target_pod::exec(c, &["/bin/target-agent", "points", "--json"])
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    json(&out)
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["seq"].as_u64())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_pod_keeps_its_store_on_a_claim_and_a_kill_mid_populate_leaves_the_claim_unbound()
{
    let Some(c) = standby::cluster().await else {
        return;
    };
    let mut p = Pair::new();
    p.addr = target_pod::deploy(&c, &p)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let db = first_point(&c, &p).await;
    // Store commands in the pod reach the store through the running server.
    assert_eq!(points_in_pod(&c).await, [1]);

    // SIGKILL the agent (and its populator) as a writer starts: the claim stays unbound; the
    // kubelet restarts the container, whose populator makes a new ticket and completes it.
    claim_from(&c, "again", "1").await;
    c.wait_for(SOURCE, NS, "again", Duration::from_secs(120), |o| {
        o.pointer("/status/phase") == Some(&"Writing".into())
    })
    .await
    .unwrap();
    target_pod::kill(&c).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_ne!(
        phase_of(&c, PVC, "again").await,
        "Bound",
        "bound without the populator"
    );
    let agent_log = || async { target_pod::logs(&c).await.unwrap_or_default() };
    c.wait_for(PVC, NS, "again", Duration::from_secs(240), |o| {
        o.pointer("/status/phase") == Some(&"Bound".into())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        target_pod::restarts(&c).await.unwrap() >= 1,
        "{}",
        agent_log().await
    );
    assert_eq!(digest_in_pod(&c, "again").await, sha256_of(&db));
    // The store outlived its process: it is on the claim.
    assert_eq!(points_in_pod(&c).await, [1]);
}
