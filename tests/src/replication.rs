//! The two-cluster bed of the primary side's end-to-end tests and benchmarks: a primary and a
//! standby node cluster, a target agent on the standby's bridge, the source's identity Secret and
//! the CRDs on the primary, and the source agent's controller as a host process with the
//! primary's kubeconfig.

use crate::crash::sigkilled;
use crate::node::{AGENTS_IMAGE, CBT_CLIENT_ROLE, NodeCluster, PROGRAMS_IMAGE, STORAGE_CLASS};
use crate::{Pair, bin, free_port, s};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A minute.
pub const MIN: Duration = Duration::from_secs(60);
/// The application's namespace.
pub const NS: &str = "shop";
/// The source agent's namespace (its identity Secret, its ServiceAccount).
pub const AGENT_NS: &str = "understudy-system";

/// One bed (two node clusters) at a time in a process: tests take turns.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Both clusters, the target agent on the standby's bridge, the source's Secret and the CRDs on
/// the primary; the controller is started by [`Bed::start_controller`].
pub struct Bed {
    /// The primary cluster.
    pub primary: NodeCluster,
    /// The standby cluster (its bridge holds the target agent).
    pub standby: NodeCluster,
    /// The target agent and the source's directory.
    pub pair: Pair,
    controller: Option<Child>,
    /// A source agent's controller on the standby (failback), when one was started.
    standby_controller: Option<Child>,
    /// Where the controller serves its metrics.
    pub metrics: String,
    /// Held for the bed's life; dropped last.
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.kill_controller();
        self.kill_standby_controller();
    }
}

impl Bed {
    /// The bed, its target agent a store only (no controllers on the standby).
    pub async fn start() -> Option<Self> {
        Self::start_with(false).await
    }

    /// The bed with the standby's controllers too: the CRDs and the agents image on the standby,
    /// the target agent running the populator and the Failover controllers (`--kube`).
    pub async fn start_with_standby() -> Option<Self> {
        Self::start_with(true).await
    }

    async fn start_with(kube_standby: bool) -> Option<Self> {
        let turn = TURN.lock().await;
        let (primary, standby) = tokio::join!(NodeCluster::start(), NodeCluster::start());
        let (Some(primary), Some(standby)) = (primary.unwrap(), standby.unwrap()) else {
            return None;
        };
        primary.import_agents().unwrap();
        let mut pair = Pair::new();
        pair.addr = format!("{}:0", standby.bridge_ip);
        if kube_standby {
            standby.import_agents().unwrap();
            install_crds(&standby).await;
            crate::standby::start_target(&mut pair, &standby, &[]);
        } else {
            pair.start_target(&[]);
        }
        install_crds(&primary).await;
        prepare_source(
            &primary,
            &pair,
            &format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n---\n"),
        )
        .await;
        Some(Bed {
            primary,
            standby,
            pair,
            controller: None,
            standby_controller: None,
            metrics: format!("127.0.0.1:{}", free_port()),
            _turn: turn,
        })
    }

    pub fn start_controller(&mut self) {
        self.start_controller_env(&[]);
    }

    pub fn start_controller_env(&mut self, env: &[(&str, &str)]) {
        let child = self.spawn_controller(&self.primary, "controller", &self.metrics, env);
        self.controller = Some(child);
    }

    /// A source agent's controller on the standby (after a failover, replicating the
    /// application where it now runs into the same target agent), with the same identity.
    pub async fn start_standby_controller(&mut self) {
        prepare_source(&self.standby, &self.pair, "").await;
        let metrics = format!("127.0.0.1:{}", free_port());
        let child = self.spawn_controller(&self.standby, "standby-controller", &metrics, &[]);
        self.standby_controller = Some(child);
    }

    fn spawn_controller(
        &self,
        c: &NodeCluster,
        name: &str,
        metrics: &str,
        env: &[(&str, &str)],
    ) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.pair.path(&format!("{name}.log")))
            .unwrap();
        Command::new(bin("source-agent"))
            .args(["controller", "--kubeconfig", s(&c.kubeconfig)])
            .args(["--agent-namespace", AGENT_NS, "--mover-image", AGENTS_IMAGE])
            .args(["--state-dir", s(&self.pair.path(&format!("{name}-state")))])
            .args(["--metrics-addr", metrics])
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap()
    }

    pub fn kill_controller(&mut self) {
        stop(&mut self.controller);
    }

    pub fn kill_standby_controller(&mut self) {
        stop(&mut self.standby_controller);
    }

    /// Waits until the controller, armed with a crash point, has killed itself there.
    pub async fn wait_controller_crash(&mut self, point: &str) {
        let deadline = Instant::now() + 4 * MIN;
        let child = self.controller.as_mut().expect("a controller runs");
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "the controller did not reach crash point {point}:\n{}",
                tail(&self.controller_log())
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        self.controller = None;
        assert!(
            sigkilled(&status)
                && self
                    .controller_log()
                    .contains(&format!("crash point {point}")),
            "the controller ended with {status} instead of crashing at {point}:\n{}",
            tail(&self.controller_log())
        );
    }

    pub fn controller_log(&self) -> String {
        std::fs::read_to_string(self.pair.path("controller.log")).unwrap_or_default()
    }

    pub async fn group(&self, name: &str) -> serde_json::Value {
        self.primary
            .get("understudy.io/v1alpha1", "ReplicationGroup", NS, name)
            .await
            .unwrap()
            .expect("the group exists")
    }

    /// Waits until the group's last point is at least `seq`.
    pub async fn wait_point(&self, name: &str, seq: u64, timeout: Duration) -> serde_json::Value {
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
    pub async fn leftovers(&self) -> Vec<String> {
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
    pub async fn delete_group(&self, name: &str) {
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

    /// Pauses the group and waits until it has no cycle under way and its cycles left exactly
    /// the last point's snapshots (the next delta's base: one per volume, and their group
    /// snapshot with `group` consistency), counted; nothing else. The group stays paused.
    pub async fn wait_settled(
        &self,
        name: &str,
        volumes: usize,
        group_snapshots: usize,
    ) -> serde_json::Value {
        self.patch_spec(name, serde_json::json!({"paused": true}))
            .await;
        let deadline = Instant::now() + 2 * MIN;
        loop {
            let g = self.group(name).await;
            let left = self.leftovers().await;
            let count = |kind: &str| left.iter().filter(|l| l.starts_with(kind)).count();
            let snapshots = count("VolumeSnapshot/");
            let groups = count("VolumeGroupSnapshot/");
            if g["status"]["cycle"].is_null()
                && snapshots == volumes
                && groups == group_snapshots
                && left.len() == snapshots + groups
            {
                return g;
            }
            assert!(
                Instant::now() < deadline,
                "the group did not settle to its base snapshots: left {left:?}, status {}",
                serde_json::to_string_pretty(&g["status"]).unwrap()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Patches the group's spec (a JSON merge patch).
    pub async fn patch_spec(&self, name: &str, spec: serde_json::Value) {
        let api: kube::Api<understudy_kube::crd::ReplicationGroup> =
            kube::Api::namespaced(self.primary.client().await.unwrap(), NS);
        api.patch(
            name,
            &Default::default(),
            &kube::api::Patch::Merge(&serde_json::json!({ "spec": spec })),
        )
        .await
        .unwrap();
    }

    /// Waits until the group's Synced condition is False with `reason` and a message that
    /// contains `says`; returns the message.
    pub async fn wait_failed(&self, name: &str, reason: &str, says: &str) -> String {
        let deadline = Instant::now() + 3 * MIN;
        loop {
            let g = self.group(name).await;
            let synced = g["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Synced")
                .cloned();
            if let Some(c) = synced
                && c["status"] == "False"
                && c["reason"] == reason
                && c["message"].as_str().is_some_and(|m| m.contains(says))
            {
                return c["message"].as_str().unwrap_or_default().to_string();
            }
            assert!(
                Instant::now() < deadline,
                "the group did not fail with {reason} saying {says:?}: {}\ncontroller:\n{}",
                serde_json::to_string_pretty(&g["status"]).unwrap(),
                tail(&self.controller_log())
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn wait_clean(&self) {
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

/// Kills a child process, if there is one.
fn stop(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// What a source agent needs on `c`, and `more` objects: the agent's namespace, the source's
/// identity Secret, its ServiceAccount with the changed-block tracking client role (movers get
/// tokens of it); returns once ReplicationGroups serve.
async fn prepare_source(c: &NodeCluster, pair: &Pair, more: &str) {
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
    c.create_yaml(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {AGENT_NS}}}\n---\n{more}{}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: understudy-source, namespace: {AGENT_NS}}}\n---\n{CBT_CLIENT_ROLE}---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: understudy-source-cbt}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: external-snapshot-metadata-client-runner}}\nsubjects: [{{kind: ServiceAccount, name: understudy-source, namespace: {AGENT_NS}}}]\n",
        serde_json::to_string(&secret).unwrap()
    ))
    .await
    .unwrap();
    // The CRD serves once Established.
    for _ in 0..100 {
        if c.names("understudy.io/v1alpha1", "ReplicationGroup", NS)
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Installs the project's CRDs.
pub async fn install_crds(c: &NodeCluster) {
    let crds: kube::Api<
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    > = kube::Api::all(c.client().await.unwrap());
    for crd in understudy_kube::crd::all() {
        crds.create(&Default::default(), &crd)
            .await
            .expect("install a CRD");
    }
}

/// The last 40 lines of a log.
pub fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// A ReplicationGroup of the apps labelled `app: writer` in [`NS`], every 10 s.
pub fn group_yaml(name: &str, consistency: &str, target: &str, extra: &str) -> String {
    format!(
        "apiVersion: understudy.io/v1alpha1\nkind: ReplicationGroup\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n  selector: {{app: writer}}\n  interval: 10s\n  consistency: {consistency}\n  target: {{address: '{target}', secretName: standby}}\n{extra}"
    )
}

/// The writer application: its PVCs and a Deployment writing records round-robin to the two
/// Block PVCs and a file on the Filesystem PVC.
pub fn writer_app() -> String {
    let pvc = |name: &str, mode: &str| {
        format!(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: {name}, namespace: {NS}, labels: {{app: writer}}}}\nspec:\n  accessModes: [ReadWriteOnce]\n  volumeMode: {mode}\n  storageClassName: {STORAGE_CLASS}\n  resources: {{requests: {{storage: 32Mi}}}}\n---\n"
        )
    };
    pvc("data-a", "Block")
        + &pvc("data-b", "Block")
        + &pvc("logs", "Filesystem")
        + &format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: writer, namespace: {NS}, labels: {{app: writer}}}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: writer}}}}\n  template:\n    metadata: {{labels: {{app: writer}}}}\n    spec:\n      terminationGracePeriodSeconds: 0\n      containers:\n      - name: main\n        image: {PROGRAMS_IMAGE}\n        imagePullPolicy: Never\n        args: [write-records, /dev/v0, /dev/v1, /data/records, --pause-ms, '3', --quiesce-dir, /tmp/quiesce]\n        volumeDevices: [{{name: a, devicePath: /dev/v0}}, {{name: b, devicePath: /dev/v1}}]\n        volumeMounts: [{{name: logs, mountPath: /data}}]\n      volumes:\n      - {{name: a, persistentVolumeClaim: {{claimName: data-a}}}}\n      - {{name: b, persistentVolumeClaim: {{claimName: data-b}}}}\n      - {{name: logs, persistentVolumeClaim: {{claimName: logs}}}}\n"
        )
}

/// Waits until the writer pod runs and has written records.
pub async fn start_writer(c: &NodeCluster) {
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

/// Records i went to volume i mod 3 only after record i-1 was durable: a cut at one instant
/// holds records 0..n, so the counts fall by at most one from each volume to the next.
pub fn assert_prefix(counts: &[u64], what: &str) {
    let (a, b, c) = (counts[0], counts[1], counts[2]);
    assert!(
        a >= b && b >= c && a <= c + 1 && a + b + c > 0,
        "{what} is not one instant of the writer: {counts:?}"
    );
}

/// How many of the writer's records each volume holds (data-a, data-b, logs), read from images
/// of them: the two Block ones, and the Filesystem one through debugfs (its file dumped into
/// `scratch`).
pub fn records_of([a, b, logs_fs]: [&std::path::Path; 3], scratch: &std::path::Path) -> Vec<u64> {
    let logs = scratch.join("records");
    let _ = std::fs::remove_file(&logs);
    let o = Command::new("debugfs")
        .args(["-R", &format!("dump /records {}", s(&logs)), s(logs_fs)])
        .output()
        .expect("debugfs (e2fsprogs)");
    assert!(
        logs.exists(),
        "no /records in the logs volume: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = Command::new(bin("understudy-testbed-tool"))
        .arg("check-records")
        .args([a, b, logs.as_path()])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "check-records: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    record_counts(&String::from_utf8_lossy(&o.stdout))
}

/// The per-volume counts `check-records` printed (`{"counts": [...]}`).
pub fn record_counts(out: &str) -> Vec<u64> {
    let v: serde_json::Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("check-records printed {out:?}: {e}"));
    v["counts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_u64)
        .collect()
}
