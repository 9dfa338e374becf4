//! Snapshots on the node test bed, through the real sidecars and the project's test CSI driver:
//! point-in-time VolumeSnapshots and group snapshots taken while a pod writes, a Filesystem
//! snapshot read as a Block volume, and changed-block tracking through the Kubernetes
//! SnapshotMetadata API.

use std::time::Duration;
use understudy_e2e::node::{CBT_CLIENT_ROLE, DRIVER, NodeCluster, PROGRAMS_IMAGE, TOOLS_IMAGE};
use understudy_e2e::replication::record_counts;
use understudy_kube::snapshot_metadata::{Extent, SnapshotMetadata, extents};

macro_rules! cluster {
    () => {
        match NodeCluster::start().await.expect("start the node test bed") {
            Some(c) => c,
            None => return,
        }
    };
}

const MIN: Duration = Duration::from_secs(60);

fn block_pvc(name: &str, labels: &str, extra: &str) -> String {
    sized_block_pvc(name, "16Mi", labels, extra)
}

fn sized_block_pvc(name: &str, size: &str, labels: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: {name}, namespace: default, labels: {{{labels}}}}}\nspec:\n  accessModes: [ReadWriteOnce]\n  volumeMode: Block\n  resources: {{requests: {{storage: {size}}}}}\n{extra}---\n"
    )
}

fn from_snapshot(snapshot: &str) -> String {
    format!(
        "  dataSource: {{apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: {snapshot}}}\n"
    )
}

/// A pod with the programs image and the given Block PVCs at /dev/v0, /dev/v1, ...
fn program_pod(name: &str, pvcs: &[&str], args: &[&str], restart: &str) -> String {
    let devices: String = pvcs
        .iter()
        .enumerate()
        .map(|(i, p)| format!("    - {{name: {p}, devicePath: /dev/v{i}}}\n"))
        .collect();
    let volumes: String = pvcs
        .iter()
        .map(|p| format!("  - {{name: {p}, persistentVolumeClaim: {{claimName: {p}}}}}\n"))
        .collect();
    let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  restartPolicy: {restart}\n  terminationGracePeriodSeconds: 0\n  containers:\n  - name: main\n    image: {PROGRAMS_IMAGE}\n    imagePullPolicy: Never\n    args: [{}]\n    volumeDevices:\n{devices}  volumes:\n{volumes}",
        args.join(", ")
    )
}

fn is_ready(o: &serde_json::Value) -> bool {
    o["status"]["readyToUse"] == true
}

async fn wait_written(c: &NodeCluster, pod: &str, at_least: u64) -> u64 {
    for _ in 0..600 {
        let logs = c.pod_logs("default", pod).await.unwrap_or_default();
        let n = logs
            .lines()
            .filter_map(|l| l.strip_prefix("wrote ")?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        if n >= at_least {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "the writer never wrote {at_least} records: {}",
        c.pod_logs("default", pod).await.unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_and_group_snapshots_hold_one_instant_while_a_pod_writes() {
    let c = cluster!();
    let mut yaml = block_pvc("a", "app: records", "") + &block_pvc("b", "app: records", "");
    yaml += &program_pod(
        "writer",
        &["a", "b"],
        &["write-records", "/dev/v0", "/dev/v1"],
        "Never",
    );
    c.create_yaml(&yaml).await.unwrap();
    c.wait_pod("default", "writer", "Running", MIN)
        .await
        .unwrap();
    wait_written(&c, "writer", 201).await;
    c.create_yaml(
        "apiVersion: snapshot.storage.k8s.io/v1\nkind: VolumeSnapshot\nmetadata: {name: single, namespace: default}\nspec:\n  source: {persistentVolumeClaimName: a}\n---\napiVersion: groupsnapshot.storage.k8s.io/v1\nkind: VolumeGroupSnapshot\nmetadata: {name: both, namespace: default}\nspec:\n  source:\n    selector: {matchLabels: {app: records}}\n",
    )
    .await
    .unwrap();
    c.wait_for(
        ("snapshot.storage.k8s.io/v1", "VolumeSnapshot"),
        "default",
        "single",
        MIN,
        is_ready,
    )
    .await
    .unwrap();
    c.wait_for(
        ("groupsnapshot.storage.k8s.io/v1", "VolumeGroupSnapshot"),
        "default",
        "both",
        MIN,
        is_ready,
    )
    .await
    .unwrap();
    // The group's members: one VolumeSnapshot per PVC, owned by the group.
    let mut members = std::collections::BTreeMap::new();
    for name in c
        .names("snapshot.storage.k8s.io/v1", "VolumeSnapshot", "default")
        .await
        .unwrap()
    {
        let vs = c
            .get(
                "snapshot.storage.k8s.io/v1",
                "VolumeSnapshot",
                "default",
                &name,
            )
            .await
            .unwrap()
            .unwrap();
        let owned = vs["metadata"]["ownerReferences"]
            .as_array()
            .is_some_and(|o| {
                o.iter()
                    .any(|r| r["kind"] == "VolumeGroupSnapshot" && r["name"] == "both")
            });
        if owned {
            let pvc = member_pvc(&c, &vs).await;
            members.insert(pvc, name);
        }
    }
    assert_eq!(
        members.keys().map(String::as_str).collect::<Vec<_>>(),
        ["a", "b"],
        "one member per PVC: {members:?}"
    );
    let written_after = wait_written(&c, "writer", 401).await;
    let mut yaml = block_pvc("ra", "", &from_snapshot(&members["a"]));
    yaml += &block_pvc("rb", "", &from_snapshot(&members["b"]));
    yaml += &block_pvc("rs", "", &from_snapshot("single"));
    yaml += &program_pod(
        "check-group",
        &["ra", "rb"],
        &["check-records", "/dev/v0", "/dev/v1"],
        "Never",
    );
    let yaml = yaml
        + "---\n"
        + &program_pod(
            "check-single",
            &["rs"],
            &["check-records", "--writer-devices", "2", "/dev/v0"],
            "Never",
        );
    c.create_yaml(&yaml).await.unwrap();
    let group = record_counts(&c.wait_and_log("check-group").await);
    let single = record_counts(&c.wait_and_log("check-single").await);
    // Record i went to volume i mod 2 only after record i-1 was durable: a cut at one instant
    // holds records 0..n on both volumes, so a's count is b's or one more.
    let (na, nb) = (group[0], group[1]);
    assert!(
        na == nb || na == nb + 1,
        "the group members are not of one instant: a holds {na} records, b {nb}"
    );
    assert!(
        na + nb >= 201,
        "the snapshot missed records written before it: {na} + {nb}"
    );
    assert!(
        na + nb < written_after,
        "the snapshot holds records written after it ({na} + {nb} of {written_after})"
    );
    assert!(
        single[0] >= 101,
        "the single snapshot lost records: {}",
        single[0]
    );
}

/// The PVC a member VolumeSnapshot was cut from: its content's volume handle, through the PV.
async fn member_pvc(c: &NodeCluster, vs: &serde_json::Value) -> String {
    let content_name = vs["status"]["boundVolumeSnapshotContentName"]
        .as_str()
        .expect("bound member");
    let content = c
        .get(
            "snapshot.storage.k8s.io/v1",
            "VolumeSnapshotContent",
            "",
            content_name,
        )
        .await
        .unwrap()
        .unwrap();
    let handle = content["spec"]["source"]["volumeHandle"]
        .as_str()
        .map(str::to_string);
    let group_content = content["status"]["volumeGroupSnapshotHandle"]
        .as_str()
        .map(str::to_string);
    let handle = match handle {
        Some(h) => h,
        None => panic!(
            "cannot tell the volume of member content {content_name} (group {group_content:?}): {content}"
        ),
    };
    for pv in c.names("v1", "PersistentVolume", "").await.unwrap() {
        let pv = c
            .get("v1", "PersistentVolume", "", &pv)
            .await
            .unwrap()
            .unwrap();
        if pv["spec"]["csi"]["volumeHandle"] == handle.as_str() {
            return pv["spec"]["claimRef"]["name"].as_str().unwrap().to_string();
        }
    }
    panic!("no PV with volume handle {handle}");
}

trait WaitAndLog {
    async fn wait_and_log(&self, pod: &str) -> String;
}

impl WaitAndLog for NodeCluster {
    async fn wait_and_log(&self, pod: &str) -> String {
        self.wait_pod("default", pod, "Succeeded", Duration::from_secs(120))
            .await
            .unwrap();
        self.pod_logs("default", pod).await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_filesystem_snapshot_read_as_a_block_volume_is_the_raw_ext4_image() {
    let c = cluster!();
    c.create_yaml(&format!(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: fs, namespace: default}}\nspec:\n  accessModes: [ReadWriteOnce]\n  resources: {{requests: {{storage: 64Mi}}}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: writer, namespace: default}}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: {TOOLS_IMAGE}\n    imagePullPolicy: Never\n    command: [sh, -c, 'echo kept-in-ext4 > /data/hello.txt && sync']\n    volumeMounts: [{{name: fs, mountPath: /data}}]\n  volumes: [{{name: fs, persistentVolumeClaim: {{claimName: fs}}}}]\n"
    ))
    .await
    .unwrap();
    c.wait_pod("default", "writer", "Succeeded", MIN)
        .await
        .unwrap();
    c.create_yaml("apiVersion: snapshot.storage.k8s.io/v1\nkind: VolumeSnapshot\nmetadata: {name: fs-snap, namespace: default}\nspec:\n  source: {persistentVolumeClaimName: fs}\n").await.unwrap();
    let vs = c
        .wait_for(
            ("snapshot.storage.k8s.io/v1", "VolumeSnapshot"),
            "default",
            "fs-snap",
            MIN,
            is_ready,
        )
        .await
        .unwrap();
    // A Filesystem snapshot becomes a Block volume only when its content allows the mode change
    // (the provisioner refuses it otherwise: a guard against reading a file system raw).
    let content = vs["status"]["boundVolumeSnapshotContentName"]
        .as_str()
        .unwrap();
    let client = c.client().await.unwrap();
    let gvk =
        kube::api::GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshotContent");
    let contents: kube::Api<kube::api::DynamicObject> =
        kube::Api::all_with(client, &kube::api::ApiResource::from_gvk(&gvk));
    let patch = serde_json::json!({"metadata": {"annotations": {"snapshot.storage.kubernetes.io/allow-volume-mode-change": "true"}}});
    contents
        .patch(
            content,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    let mut yaml = sized_block_pvc("raw", "64Mi", "", &from_snapshot("fs-snap"));
    yaml += &format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: reader, namespace: default}}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: {TOOLS_IMAGE}\n    imagePullPolicy: Never\n    securityContext: {{privileged: true}}\n    command: [sh, -c, 'dd if=/dev/v0 bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 && mkdir -p /mnt/fs && mount -t ext4 -o ro /dev/v0 /mnt/fs && cat /mnt/fs/hello.txt && umount /mnt/fs']\n    volumeDevices: [{{name: raw, devicePath: /dev/v0}}]\n  volumes: [{{name: raw, persistentVolumeClaim: {{claimName: raw}}}}]\n"
    );
    let log = c.run_pod(&yaml, "default", "reader").await.unwrap();
    let lines: Vec<&str> = log.lines().map(str::trim).collect();
    assert_eq!(
        lines,
        ["53 ef", "kept-in-ext4"],
        "the ext4 superblock magic, then the file: {log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn changed_block_tracking_through_the_kubernetes_api() {
    let c = cluster!();
    let rbac = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: cbt-client, namespace: default}}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: nobody, namespace: default}}\n---\n{}---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: cbt-client}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: external-snapshot-metadata-client-runner}}\nsubjects: [{{kind: ServiceAccount, name: cbt-client, namespace: default}}]\n",
        CBT_CLIENT_ROLE
    );
    c.create_yaml(&rbac).await.unwrap();
    let yaml = block_pvc("vol", "", "")
        + &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: writer, namespace: default}}\nspec:\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 0\n  containers:\n  - name: main\n    image: {TOOLS_IMAGE}\n    imagePullPolicy: Never\n    command: [sleep, '3600']\n    volumeDevices: [{{name: vol, devicePath: /dev/v0}}]\n  volumes: [{{name: vol, persistentVolumeClaim: {{claimName: vol}}}}]\n"
        );
    c.create_yaml(&yaml).await.unwrap();
    c.wait_pod("default", "writer", "Running", MIN)
        .await
        .unwrap();
    let write = async |blocks: &[u32]| {
        let cmd = blocks.iter().map(|b| format!("dd if=/dev/urandom of=/dev/v0 bs=4096 seek={b} count=1 conv=notrunc,fsync 2>/dev/null")).collect::<Vec<_>>().join(" && ");
        let out = c
            .exec("default", "writer", "main", &["sh", "-c", &cmd])
            .await
            .unwrap();
        assert_eq!(out.code, 0, "{out:?}");
    };
    let snapshot = |name: &str| {
        format!(
            "apiVersion: snapshot.storage.k8s.io/v1\nkind: VolumeSnapshot\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  source: {{persistentVolumeClaimName: vol}}\n"
        )
    };
    // Blocks 0, 10 and 2000 written before the first snapshot; 10, 11 and 3000 after it.
    write(&[0, 10, 2000]).await;
    c.create_yaml(&snapshot("s1")).await.unwrap();
    let s1 = c
        .wait_for(
            ("snapshot.storage.k8s.io/v1", "VolumeSnapshot"),
            "default",
            "s1",
            MIN,
            is_ready,
        )
        .await
        .unwrap();
    write(&[10, 11, 3000]).await;
    c.create_yaml(&snapshot("s2")).await.unwrap();
    c.wait_for(
        ("snapshot.storage.k8s.io/v1", "VolumeSnapshot"),
        "default",
        "s2",
        MIN,
        is_ready,
    )
    .await
    .unwrap();
    let content = s1["status"]["boundVolumeSnapshotContentName"]
        .as_str()
        .unwrap();
    let content = c
        .get(
            "snapshot.storage.k8s.io/v1",
            "VolumeSnapshotContent",
            "",
            content,
        )
        .await
        .unwrap()
        .unwrap();
    let base = content["status"]["snapshotHandle"]
        .as_str()
        .unwrap()
        .to_string();

    let kube = c.client().await.unwrap();
    let cbt = SnapshotMetadata::connect(&kube, DRIVER, "default", "cbt-client")
        .await
        .unwrap();
    let changed = cbt
        .changed_extents("default", &base, "s2", 3)
        .await
        .unwrap();
    let ext = |b: u64, n: u64| Extent {
        offset: b * 4096,
        length: n * 4096,
    };
    assert_eq!(
        changed,
        vec![ext(10, 2), ext(3000, 1)],
        "exactly the blocks written between the snapshots"
    );
    let mut all = Vec::new();
    let mut stream = cbt.allocated("default", "s1", 0, 0).await.unwrap();
    while let Some(m) = stream.message().await.unwrap() {
        all.extend(extents(&m.block_metadata));
    }
    assert_eq!(
        all,
        vec![ext(0, 1), ext(10, 1), ext(2000, 1)],
        "the blocks written before the first snapshot"
    );

    // A stream broken after its first page resumes from the end of the last range received.
    let mut first = cbt.delta("default", &base, "s2", 0, 1).await.unwrap();
    let page = first.message().await.unwrap().unwrap();
    let got: Vec<Extent> = extents(&page.block_metadata).collect();
    assert_eq!(got, vec![ext(10, 2)]);
    drop(first);
    let mut rest = cbt
        .delta("default", &base, "s2", got[0].end(), 0)
        .await
        .unwrap();
    let mut tail = Vec::new();
    while let Some(m) = rest.message().await.unwrap() {
        tail.extend(extents(&m.block_metadata));
    }
    assert_eq!(tail, vec![ext(3000, 1)]);

    // A ServiceAccount without the client role is refused.
    let nobody = SnapshotMetadata::connect(&kube, DRIVER, "default", "nobody")
        .await
        .unwrap();
    let refused = nobody.delta("default", &base, "s2", 0, 0).await;
    let code = match refused {
        Err(s) => s.code(),
        Ok(mut s) => s
            .message()
            .await
            .map(|_| tonic::Code::Ok)
            .unwrap_or_else(|e| e.code()),
    };
    assert_eq!(code, tonic::Code::PermissionDenied);
}
