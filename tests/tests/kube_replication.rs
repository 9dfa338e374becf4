//! The primary side end to end on the two-cluster test bed: the source agent's controller
//! (a host process with the primary's kubeconfig) reconciles a ReplicationGroup that protects a
//! writer application (two Block PVCs and one Filesystem PVC written round-robin with
//! sequence-numbered records, without pausing); mover pods on the primary's node stage the
//! volumes on a target agent listening on the standby's bridge; every point fails over
//! (standalone) to volumes holding exactly a prefix of the sequence. The CSI driver is the
//! project's test driver (no reference driver is served here); everything else is real.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use understudy_e2e::node::{AGENTS_IMAGE, CBT_CLIENT_ROLE, NodeCluster, PROGRAMS_IMAGE};
use understudy_e2e::{Pair, bin, s};

const MIN: Duration = Duration::from_secs(60);
const NS: &str = "shop";
const AGENT_NS: &str = "understudy-system";

/// Both clusters, the target agent on the standby's bridge, the source's Secret and the CRDs on
/// the primary; the controller is started by [`Bed::start_controller`].
struct Bed {
    primary: NodeCluster,
    _standby: NodeCluster,
    pair: Pair,
    controller: Option<Child>,
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.kill_controller();
    }
}

impl Bed {
    async fn start() -> Option<Self> {
        let (primary, standby) = tokio::join!(NodeCluster::start(), NodeCluster::start());
        let (Some(primary), Some(standby)) = (primary.unwrap(), standby.unwrap()) else {
            return None;
        };
        primary.import_agents().unwrap();
        let mut pair = Pair::new();
        pair.addr = format!("{}:0", standby.bridge_ip);
        pair.start_target(&[]);
        let client = primary.client().await.unwrap();
        let crds: kube::Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
            kube::Api::all(client.clone());
        for crd in understudy_kube::crd::all() {
            crds.create(&Default::default(), &crd).await.unwrap();
        }
        let ident =
            |f: &str| std::fs::read_to_string(pair.source_dir.join("identity").join(f)).unwrap();
        let target_fp = understudy_common::transport::Peers::load(&pair.source_dir)
            .unwrap()
            .fingerprints()
            .remove(0);
        let secret = serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "standby", "namespace": AGENT_NS},
            "stringData": {"cert.pem": ident("cert.pem"), "key.pem": ident("key.pem"), "target-fingerprint": target_fp.to_string()},
        });
        // The agent's namespace: its Secret, and its ServiceAccount with the changed-block
        // tracking client role (movers get tokens of it).
        primary
            .create_yaml(&format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {AGENT_NS}}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n---\n{}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: understudy-source, namespace: {AGENT_NS}}}\n---\n{CBT_CLIENT_ROLE}---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: understudy-source-cbt}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: external-snapshot-metadata-client-runner}}\nsubjects: [{{kind: ServiceAccount, name: understudy-source, namespace: {AGENT_NS}}}]\n",
                serde_json::to_string(&secret).unwrap()
            ))
            .await
            .unwrap();
        // The CRD serves once Established.
        for _ in 0..100 {
            if primary
                .names("understudy.io/v1alpha1", "ReplicationGroup", NS)
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Some(Bed {
            primary,
            _standby: standby,
            pair,
            controller: None,
        })
    }

    fn start_controller(&mut self) {
        self.start_controller_env(&[]);
    }

    fn start_controller_env(&mut self, env: &[(&str, &str)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.pair.path("controller.log"))
            .unwrap();
        let child = Command::new(bin("source-agent"))
            .args(["controller", "--kubeconfig", s(&self.primary.kubeconfig)])
            .args(["--agent-namespace", AGENT_NS, "--mover-image", AGENTS_IMAGE])
            .args(["--state-dir", s(&self.pair.path("controller-state"))])
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.controller = Some(child);
    }

    fn kill_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn controller_log(&self) -> String {
        std::fs::read_to_string(self.pair.path("controller.log")).unwrap_or_default()
    }

    async fn group(&self, name: &str) -> serde_json::Value {
        self.primary
            .get("understudy.io/v1alpha1", "ReplicationGroup", NS, name)
            .await
            .unwrap()
            .expect("the group exists")
    }

    /// Waits until the group's last point is at least `seq`.
    async fn wait_point(&self, name: &str, seq: u64, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let g = self.group(name).await;
            if g["status"]["lastPoint"]["sequence"].as_u64().unwrap_or(0) >= seq {
                return g;
            }
            assert!(
                Instant::now() < deadline,
                "no point {seq} after {timeout:?}: {}\ncontroller:\n{}\ntarget:\n{}",
                serde_json::to_string_pretty(&g["status"]).unwrap(),
                tail(&self.controller_log()),
                tail(&self.pair.target_log())
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Objects the cycles made that still exist: every snapshot and group snapshot (the
    /// application takes none itself), and the cycles' pods, Secrets and PVCs.
    async fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (av, kind, all) in [
            ("v1", "Pod", false),
            ("v1", "Secret", false),
            ("v1", "PersistentVolumeClaim", false),
            ("snapshot.storage.k8s.io/v1", "VolumeSnapshot", true),
            (
                "groupsnapshot.storage.k8s.io/v1",
                "VolumeGroupSnapshot",
                true,
            ),
        ] {
            for n in self.primary.names(av, kind, NS).await.unwrap() {
                if all || n.starts_with("us-") {
                    out.push(format!("{kind}/{n}"));
                }
            }
        }
        out
    }

    /// Deletes the group (the controller runs) and waits until it and everything its cycles
    /// made are gone.
    async fn delete_group(&self, name: &str) {
        let api: kube::Api<understudy_kube::crd::ReplicationGroup> =
            kube::Api::namespaced(self.primary.client().await.unwrap(), NS);
        api.delete(name, &Default::default()).await.unwrap();
        let deadline = Instant::now() + MIN;
        while api.get_opt(name).await.unwrap().is_some() {
            assert!(
                Instant::now() < deadline,
                "the group was not deleted: {}",
                tail(&self.controller_log())
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        self.wait_clean().await;
    }

    async fn wait_clean(&self) {
        let deadline = Instant::now() + MIN;
        loop {
            let left = self.leftovers().await;
            if left.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "left behind: {left:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The writer application: its PVCs and a Deployment writing records round-robin to the two
/// Block PVCs and a file on the Filesystem PVC.
fn writer_app() -> String {
    let pvc = |name: &str, mode: &str| {
        format!(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: {name}, namespace: {NS}, labels: {{app: writer}}}}\nspec:\n  accessModes: [ReadWriteOnce]\n  volumeMode: {mode}\n  resources: {{requests: {{storage: 32Mi}}}}\n---\n"
        )
    };
    pvc("data-a", "Block")
        + &pvc("data-b", "Block")
        + &pvc("logs", "Filesystem")
        + &format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: writer, namespace: {NS}, labels: {{app: writer}}}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: writer}}}}\n  template:\n    metadata: {{labels: {{app: writer}}}}\n    spec:\n      terminationGracePeriodSeconds: 0\n      containers:\n      - name: main\n        image: {PROGRAMS_IMAGE}\n        imagePullPolicy: Never\n        args: [write-records, /dev/v0, /dev/v1, /data/records, --pause-ms, '3', --quiesce-dir, /tmp/quiesce]\n        volumeDevices: [{{name: a, devicePath: /dev/v0}}, {{name: b, devicePath: /dev/v1}}]\n        volumeMounts: [{{name: logs, mountPath: /data}}]\n      volumes:\n      - {{name: a, persistentVolumeClaim: {{claimName: data-a}}}}\n      - {{name: b, persistentVolumeClaim: {{claimName: data-b}}}}\n      - {{name: logs, persistentVolumeClaim: {{claimName: logs}}}}\n"
        )
}

fn group_yaml(name: &str, consistency: &str, target: &str, extra: &str) -> String {
    format!(
        "apiVersion: understudy.io/v1alpha1\nkind: ReplicationGroup\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n  selector: {{app: writer}}\n  interval: 10s\n  consistency: {consistency}\n  target: {{address: '{target}', secretName: standby}}\n{extra}"
    )
}

/// Waits until the writer pod runs and has written records.
async fn start_writer(c: &NodeCluster) {
    c.create_yaml(&writer_app()).await.unwrap();
    let deadline = Instant::now() + MIN;
    loop {
        let pods = c.names("v1", "Pod", NS).await.unwrap();
        if let Some(p) = pods.iter().find(|p| p.starts_with("writer-"))
            && c.wait_pod(NS, p, "Running", MIN).await.is_ok()
            && c.pod_logs(NS, p)
                .await
                .unwrap_or_default()
                .contains("wrote 301")
        {
            return;
        }
        assert!(Instant::now() < deadline, "the writer did not start");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Per volume of a failed-over point, how many records it holds (a, b, logs), read from the
/// rebuilt images (the Filesystem one through debugfs).
fn records(out: &Path) -> Vec<u64> {
    let vols = out.join("volumes");
    let logs = out.join("records");
    let o = Command::new("debugfs")
        .args([
            "-R",
            &format!("dump /records {}", s(&logs)),
            s(&vols.join(format!("{NS}.logs.img"))),
        ])
        .output()
        .expect("debugfs (e2fsprogs)");
    assert!(
        logs.exists(),
        "no /records in the logs volume: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let args: Vec<PathBuf> = vec![
        vols.join(format!("{NS}.data-a.img")),
        vols.join(format!("{NS}.data-b.img")),
        logs,
    ];
    let o = Command::new(bin("understudy-testbed-tool"))
        .arg("check-records")
        .args(&args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "check-records: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .collect()
}

/// Records i went to volume i mod 3 only after record i-1 was durable: a cut at one instant
/// holds records 0..n, so the counts fall by at most one from each volume to the next.
fn assert_prefix(counts: &[u64], what: &str) {
    let (a, b, c) = (counts[0], counts[1], counts[2]);
    assert!(
        a >= b && b >= c && a <= c + 1 && a + b + c > 0,
        "{what} is not one instant of the writer: {counts:?}"
    );
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
