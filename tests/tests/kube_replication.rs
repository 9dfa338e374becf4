//! The primary side end to end on the two-cluster test bed: the source agent's controller
//! (a host process with the primary's kubeconfig) reconciles a ReplicationGroup that protects a
//! writer application (two Block PVCs and one Filesystem PVC written round-robin with
//! sequence-numbered records, without pausing); mover pods on the primary's node stage the
//! volumes on a target agent listening on the standby's bridge; every point fails over
//! (standalone) to volumes holding exactly a prefix of the sequence. The CSI driver is the
//! project's test driver (no reference driver is served here); everything else is real.

use std::path::Path;
use std::time::{Duration, Instant};
use understudy_e2e::crash::{CONTROLLER_POINTS, crash_at};
use understudy_e2e::node::{NodeCluster, TOOLS_IMAGE};
use understudy_e2e::replication::{
    Bed, MIN, NS, assert_prefix, group_yaml, records_of, start_writer, tail,
};
use understudy_e2e::{s, scrape};

/// Per volume of a failed-over point, how many records it holds (a, b, logs), read from the
/// rebuilt images.
fn records(out: &Path) -> Vec<u64> {
    let vols = out.join("volumes");
    let img = |n: &str| vols.join(format!("{NS}.{n}.img"));
    records_of([&img("data-a"), &img("data-b"), &img("logs")], out)
}

/// Fails every point of the group over (standalone) and checks each holds a prefix; returns
/// the record totals in point order.
fn check_every_point(bed: &Bed, group: &str) -> Vec<u64> {
    let points = bed.pair.points(group);
    assert!(!points.is_empty());
    let mut totals = Vec::new();
    for seq in points {
        let out = bed.pair.path(&format!("failover-{group}-{seq}"));
        let report = bed.pair.failover(group, &seq.to_string(), &out, &[]);
        assert!(
            report["volumes"].as_array().is_some_and(|v| v.len() == 3),
            "{report}"
        );
        let counts = records(&out);
        assert_prefix(&counts, &format!("point {seq}"));
        totals.push(counts.iter().sum());
        let _ = std::fs::remove_dir_all(&out);
    }
    totals
}

#[tokio::test(flavor = "multi_thread")]
async fn group_consistency_replicates_a_live_writer_and_every_point_is_a_prefix() {
    let Some(mut bed) = Bed::start().await else {
        return;
    };
    start_writer(&bed.primary).await;
    let target = bed.pair.addr.clone();
    bed.primary
        .create_yaml(&group_yaml("writer", "group", &target, ""))
        .await
        .unwrap();
    bed.start_controller();
    let g = bed.wait_point("writer", 3, Duration::from_secs(240)).await;
    let status = &g["status"];
    let ready = status["conditions"].as_array().unwrap();
    assert!(
        ready
            .iter()
            .any(|c| c["type"] == "Synced" && c["status"] == "True"),
        "{status}"
    );
    assert!(status["rpoSeconds"].as_i64().is_some());
    assert!(status["bytesRead"].as_u64().unwrap() > 0);
    let volumes = status["volumes"].as_array().unwrap();
    assert_eq!(volumes.len(), 3);
    // After the first point, the kept base snapshots let the driver name the changed blocks.
    for v in volumes {
        assert_eq!(v["changeSource"], "csi-delta", "{v}");
        assert!(v["baseSnapshotHandle"].is_string(), "{v}");
    }
    bed.kill_controller();
    let group = format!("{NS}.writer");
    let totals = check_every_point(&bed, &group);
    assert!(
        totals.windows(2).all(|w| w[0] < w[1]),
        "each point holds more of the writer's records than the one before: {totals:?}"
    );
    // The manifests travel with the point: the Deployment and the PVCs, not the cycle's objects.
    let out = bed.pair.path("manifests");
    bed.pair.failover(&group, "latest", &out, &[]);
    let root = out.join("manifests");
    let listing: Vec<String> = walk(&root)
        .into_iter()
        .map(|f| f.trim_start_matches(s(&root)).to_string())
        .collect();
    assert!(
        listing
            .iter()
            .any(|f| f.contains("Deployment") && f.contains("writer")),
        "{listing:?}"
    );
    assert!(
        !listing.iter().any(|f| f.contains("us-")),
        "cycle objects captured: {listing:?}"
    );
    // Deleting the group removes every snapshot, PVC, Secret and pod its cycles made.
    bed.start_controller();
    bed.delete_group("writer").await;
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

/// Waits for a mover pod of the group's cycle that runs, and deletes it at once (no grace:
/// its process is killed mid-transfer); returns its name.
async fn delete_a_running_mover(c: &NodeCluster) -> String {
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(c.client().await.unwrap(), NS);
    let deadline = Instant::now() + 3 * MIN;
    loop {
        let movers = pods
            .list(&kube::api::ListParams::default().labels("understudy.io/role=mover"))
            .await
            .unwrap();
        let running = movers
            .items
            .iter()
            .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"));
        if let Some(p) = running {
            let name = kube::ResourceExt::name_any(p);
            let now = kube::api::DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            };
            pods.delete(&name, &now).await.unwrap();
            return name;
        }
        assert!(Instant::now() < deadline, "no mover pod ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The controller SIGKILLed at each of its steps (each crash point in turn), and a mover pod
/// deleted while it runs: every cycle completes or is redone, the target lists complete
/// points only (each fails over to a prefix of the writer), and after each cycle exactly the
/// base snapshots are left (counted). That a mover run again resends no chunk the target
/// already holds durably is `movers.rs`'s `a_killed_mover_run_again_resends_nothing_durable`.
#[tokio::test(flavor = "multi_thread")]
async fn the_controller_killed_at_each_step_and_a_deleted_mover_leave_complete_points_only() {
    let Some(mut bed) = Bed::start().await else {
        return;
    };
    start_writer(&bed.primary).await;
    let target = bed.pair.addr.clone();
    // Movers capped at 16 Mbit/s so the first one is still sending when it is deleted.
    bed.primary
        .create_yaml(&group_yaml(
            "writer",
            "group",
            &target,
            "  bandwidthLimitMbit: 16\n",
        ))
        .await
        .unwrap();
    let group = format!("{NS}.writer");
    bed.start_controller();
    let deleted = delete_a_running_mover(&bed.primary).await;
    bed.wait_point("writer", 1, 4 * MIN).await;
    // A cycle in flight when the group is paused still commits: read the point after it.
    let g = bed.wait_settled("writer", 3, 1).await;
    let mut seq = g["status"]["lastPoint"]["sequence"].as_u64().unwrap();
    bed.kill_controller();
    assert!(
        bed.controller_log().contains(&deleted),
        "the controller did not notice {deleted} had gone:\n{}",
        tail(&bed.controller_log())
    );
    for point in CONTROLLER_POINTS {
        bed.patch_spec("writer", serde_json::json!({"paused": false}))
            .await;
        bed.start_controller_env(&[("FAILPOINTS", &crash_at(point, 1))]);
        bed.wait_controller_crash(point).await;
        let listed = bed.pair.points(&group);
        assert!(
            listed.iter().all(|&p| p <= seq + 1),
            "after a crash at {point}: points {listed:?}, the last committed was {seq}"
        );
        bed.start_controller();
        bed.wait_point("writer", seq + 1, 4 * MIN).await;
        let g = bed.wait_settled("writer", 3, 1).await;
        seq = g["status"]["lastPoint"]["sequence"].as_u64().unwrap();
        bed.kill_controller();
    }
    let totals = check_every_point(&bed, &group);
    assert!(totals.len() > CONTROLLER_POINTS.len(), "{totals:?}");
    bed.start_controller();
    bed.delete_group("writer").await;
}

/// The quiesce hooks of the writer: `quiesce` asks it to stop and waits until it holds still,
/// `resume` lets it go on.
fn writer_hooks(pre: &[&str]) -> serde_json::Value {
    let hook = |cmd: &[&str]| {
        serde_json::json!({
            "podSelector": {"app": "writer"},
            "container": "main",
            "command": cmd,
            "timeout": "20s",
        })
    };
    serde_json::json!({
        "pre": [hook(pre)],
        "post": [hook(&["/bin/understudy-testbed-tool", "resume", "--dir", "/tmp/quiesce"])],
    })
}

/// `hooks` consistency: per-PVC snapshots taken while the hook holds the writer still, so every
/// point is a prefix. Then a pre hook that fails (on-error fail) gives no point, a
/// `SnapshotFailed` condition naming the hook, and nothing left of its cycle; then a snapshot
/// class whose driver does not exist gives snapshots that are never cut: the quiesce window
/// closes after `snapshotTimeout` (the writer resumes), the cycle fails with `SnapshotFailed`,
/// its snapshots are deleted and their contents set to go with them; with `crash` consistency
/// the same snapshots time out waiting to be ready (`SnapshotNotReady`).
#[tokio::test(flavor = "multi_thread")]
async fn hooks_consistency_quiesces_the_writer_and_failed_cycles_say_why_and_leave_nothing() {
    let Some(mut bed) = Bed::start().await else {
        return;
    };
    start_writer(&bed.primary).await;
    let target = bed.pair.addr.clone();
    let quiesce = [
        "/bin/understudy-testbed-tool",
        "quiesce",
        "--dir",
        "/tmp/quiesce",
    ];
    let hooks = serde_json::to_string(&writer_hooks(&quiesce)).unwrap();
    bed.primary
        .create_yaml(&group_yaml(
            "writer",
            "hooks",
            &target,
            &format!("  hooks: {hooks}\n"),
        ))
        .await
        .unwrap();
    bed.start_controller();
    bed.wait_point("writer", 2, 4 * MIN).await;
    // A cycle in flight when the group is paused still commits: read the point after it.
    let g = bed.wait_settled("writer", 3, 0).await;
    let seq = g["status"]["lastPoint"]["sequence"].as_u64().unwrap();
    let group = format!("{NS}.writer");
    let totals = check_every_point(&bed, &group);
    assert!(totals.windows(2).all(|w| w[0] < w[1]), "{totals:?}");

    // A pre hook that fails: no snapshot is taken, the condition names the hook.
    bed.patch_spec(
        "writer",
        serde_json::json!({"paused": false, "hooks": writer_hooks(&["/bin/understudy-testbed-tool", "no-such-command"])}),
    )
    .await;
    let msg = bed
        .wait_failed("writer", "SnapshotFailed", "no-such-command")
        .await;
    assert!(msg.contains("exited with"), "{msg}");
    bed.wait_settled("writer", 3, 0).await;
    assert_eq!(
        bed.group("writer").await["status"]["lastPoint"]["sequence"],
        seq
    );

    // Snapshots that are never cut: a class of a driver no node runs, retaining its contents.
    // The cycle's snapshots go, and their contents are no longer retained: each is being
    // deleted with policy Delete, which its driver's csi-snapshotter would finish (Kubernetes
    // keeps a content until its driver has deleted the snapshot; this driver does not exist).
    let contents_api: kube::Api<understudy_kube::snapshots::VolumeSnapshotContent> =
        kube::Api::all(bed.primary.client().await.unwrap());
    let before = contents_api
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .len();
    bed.primary
        .create_yaml("apiVersion: snapshot.storage.k8s.io/v1\nkind: VolumeSnapshotClass\nmetadata: {name: nowhere}\ndriver: nowhere.understudy.io\ndeletionPolicy: Retain\n")
        .await
        .unwrap();
    bed.patch_spec(
        "writer",
        serde_json::json!({"paused": false, "hooks": writer_hooks(&quiesce), "volumeSnapshotClassName": "nowhere", "snapshotTimeout": "5s"}),
    )
    .await;
    // Not cut while the writer is held: the window closes after snapshotTimeout.
    bed.wait_failed(
        "writer",
        "SnapshotFailed",
        "0 of 3 snapshots were cut within 5s while the application was quiesced",
    )
    .await;
    bed.wait_settled("writer", 3, 0).await;
    assert_eq!(
        bed.group("writer").await["status"]["lastPoint"]["sequence"],
        seq
    );
    let deadline = Instant::now() + MIN;
    loop {
        let all = contents_api.list(&Default::default()).await.unwrap().items;
        let (nowhere, others): (Vec<_>, Vec<_>) = all
            .iter()
            .partition(|c| c.spec.driver == "nowhere.understudy.io");
        let retained: Vec<_> = nowhere
            .into_iter()
            .filter(|c| {
                c.metadata.deletion_timestamp.is_none() || c.spec.deletion_policy != "Delete"
            })
            .collect();
        if retained.is_empty() && others.len() == before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the failed cycle's snapshot contents are retained (of {before} before):\n{}",
            serde_json::to_string_pretty(&retained).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Without hooks (`crash`) nothing waits for the cut: the snapshots that never become
    // ready time out in WaitingForSnapshots.
    bed.patch_spec(
        "writer",
        serde_json::json!({"paused": false, "consistency": "crash", "hooks": null}),
    )
    .await;
    let msg = bed
        .wait_failed("writer", "SnapshotNotReady", "was not ready after 5s")
        .await;
    assert!(msg.contains("check the CSI driver"), "{msg}");
    bed.wait_settled("writer", 3, 0).await;
    assert_eq!(
        bed.group("writer").await["status"]["lastPoint"]["sequence"],
        seq
    );
    bed.delete_group("writer").await;
}

const KIB64: u64 = 64 << 10;

/// Runs a pod that writes random 64 KiB blocks at the given block indexes of the `disk` PVC.
async fn write_blocks(c: &NodeCluster, pod: &str, blocks: &[u64]) {
    let dd: Vec<String> = blocks
        .iter()
        .map(|b| format!("dd if=/dev/urandom of=/dev/disk bs=65536 seek={b} count=1 conv=notrunc"))
        .collect();
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {NS}}}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: dd\n    image: {TOOLS_IMAGE}\n    imagePullPolicy: Never\n    command: [sh, -c, '{} && sync']\n    volumeDevices: [{{name: d, devicePath: /dev/disk}}]\n  volumes: [{{name: d, persistentVolumeClaim: {{claimName: disk}}}}]\n",
        dd.join(" && ")
    );
    c.run_pod(&yaml, NS, pod).await.unwrap();
}

/// The one volume's status of the group's last point, with the point.
async fn last_volume(bed: &Bed, name: &str, seq: u64) -> (u64, serde_json::Value) {
    let g = bed.wait_point(name, seq, 3 * MIN).await;
    let v = g["status"]["volumes"][0].clone();
    (g["status"]["lastPoint"]["sequence"].as_u64().unwrap(), v)
}

/// Fails point `seq` over and checks the volume is bit-exact with the PVC's data now (the
/// application writes nothing between cycles here).
async fn assert_exact(bed: &Bed, seq: u64) {
    let live = bed.primary.claim_image(NS, "disk").await.unwrap();
    let out = bed.pair.path(&format!("failover-{seq}"));
    bed.pair
        .failover(&format!("{NS}.blocks"), &seq.to_string(), &out, &[]);
    let restored = out.join("volumes").join(format!("{NS}.disk.img"));
    assert!(
        std::fs::read(&restored).unwrap() == std::fs::read(&live).unwrap(),
        "point {seq} is not the volume's data"
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// Changed-block tracking through the driver's SnapshotMetadata service: the first point reads
/// only the allocated ranges; after N blocks change, the next cycle reads and sends only those
/// N (the mover's counts in status); with the SnapshotMetadataService removed, the mover hashes
/// every block instead and status says why; every point is bit-exact.
#[tokio::test(flavor = "multi_thread")]
async fn changed_block_tracking_reads_only_changed_blocks_and_falls_back_to_hash_diff() {
    let Some(mut bed) = Bed::start().await else {
        return;
    };
    bed.primary
        .create_yaml(&format!(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: disk, namespace: {NS}, labels: {{app: blocks}}}}\nspec:\n  accessModes: [ReadWriteOnce]\n  volumeMode: Block\n  resources: {{requests: {{storage: 64Mi}}}}\n"
        ))
        .await
        .unwrap();
    write_blocks(&bed.primary, "fill-0", &(0..64).collect::<Vec<_>>()).await;
    let target = bed.pair.addr.clone();
    bed.primary
        .create_yaml(
            &group_yaml("blocks", "crash", &target, "")
                .replace("selector: {app: writer}", "selector: {app: blocks}"),
        )
        .await
        .unwrap();
    bed.start_controller();
    let (seq, v) = last_volume(&bed, "blocks", 1).await;
    assert_eq!(v["changeSource"], "csi-allocated", "{v}");
    assert_eq!(
        v["bytesRead"],
        64 * KIB64,
        "the first point reads the 4 MiB written: {v}"
    );
    bed.wait_settled("blocks", 1, 0).await;
    assert_exact(&bed, seq).await;

    // N blocks change (one inside the first 4 MiB, the others in holes): the delta names them.
    let changed = [3, 100, 250, 500, 1000];
    write_blocks(&bed.primary, "change-1", &changed).await;
    bed.patch_spec("blocks", serde_json::json!({"paused": false}))
        .await;
    let (seq, v) = last_volume(&bed, "blocks", seq + 1).await;
    let n = changed.len() as u64;
    assert_eq!(v["changeSource"], "csi-delta", "{v}");
    assert_eq!(
        v["bytesRead"],
        n * KIB64,
        "only the changed blocks are read: {v}"
    );
    let sent = v["bytesSent"].as_u64().unwrap();
    assert!(
        (n * KIB64..(n + 1) * KIB64).contains(&sent),
        "only the changed blocks are sent (random data: about {n} x 64 KiB of frames): {v}"
    );
    bed.wait_settled("blocks", 1, 0).await;
    assert_exact(&bed, seq).await;

    // No SnapshotMetadataService: hash-diff, said in status, and still only the change is sent.
    bed.primary
        .remove_snapshot_metadata_services()
        .await
        .unwrap();
    write_blocks(&bed.primary, "change-2", &[7, 600]).await;
    bed.patch_spec("blocks", serde_json::json!({"paused": false}))
        .await;
    let (seq, v) = last_volume(&bed, "blocks", seq + 1).await;
    assert_eq!(v["changeSource"], "hash-diff", "{v}");
    assert!(
        v["reason"]
            .as_str()
            .is_some_and(|r| r.contains("SnapshotMetadata")),
        "status says why every block is read: {v}"
    );
    let sent = v["bytesSent"].as_u64().unwrap();
    assert!((2 * KIB64..3 * KIB64).contains(&sent), "{v}");
    bed.wait_settled("blocks", 1, 0).await;
    assert_exact(&bed, seq).await;
    // The controller's metrics count the reads by change source, with the group's RPO.
    let text = scrape(&bed.metrics);
    let group = format!("{NS}.blocks");
    for line in [
        format!("understudy_volume_reads_total{{group=\"{group}\",source=\"csi-allocated\"}} 1"),
        format!("understudy_volume_reads_total{{group=\"{group}\",source=\"csi-delta\"}} 1"),
        format!("understudy_volume_reads_total{{group=\"{group}\",source=\"hash-diff\"}} 1"),
        format!("understudy_points_committed_total{{group=\"{group}\"}} 3"),
        format!("understudy_rpo_seconds{{group=\"{group}\"}}"),
        format!("understudy_cycle_duration_seconds_count{{group=\"{group}\"}} 3"),
    ] {
        assert!(text.contains(&line), "missing {line} in:\n{text}");
    }
    bed.patch_spec("blocks", serde_json::json!({"paused": false}))
        .await;
    bed.delete_group("blocks").await;
}
