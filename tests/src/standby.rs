//! The standby's Kubernetes side on the node test bed: one cluster with the project's CRDs and
//! the agents image, a target agent on its bridge running the volume populator and the Failover
//! controller, and pods that read what they rebuilt.

use crate::node::{AGENTS_IMAGE, NodeCluster, TOOLS_IMAGE};
use crate::{Pair, s};

/// The cluster (CRDs installed, agents imported) and the pair, its target agent on the bridge
/// with `--kube`; `None` when the node test bed cannot run here (not CI).
pub async fn start() -> Option<(NodeCluster, Pair)> {
    start_with(&[]).await
}

/// [`start`], with more arguments for the target agent's `serve`.
pub async fn start_with(extra: &[&str]) -> Option<(NodeCluster, Pair)> {
    let c = cluster().await?;
    let mut p = Pair::new();
    p.addr = format!("{}:0", c.bridge_ip);
    start_target(&mut p, &c, extra);
    Some((c, p))
}

/// The cluster with the project's CRDs and the agents image; `None` when the node test bed
/// cannot run here (not CI).
pub async fn cluster() -> Option<NodeCluster> {
    let c = NodeCluster::start()
        .await
        .expect("start the node test bed")?;
    c.import_agents().expect("import the agents image");
    crate::replication::install_crds(&c).await;
    Some(c)
}

/// Starts (or restarts, on the same address) the target agent with the standby's controllers;
/// `extra` are more arguments for `serve`.
pub fn start_target(p: &mut Pair, c: &NodeCluster, extra: &[&str]) {
    let mut args = vec![
        "--kube",
        "--kubeconfig",
        s(&c.kubeconfig),
        "--writer-image",
        AGENTS_IMAGE,
    ];
    args.extend_from_slice(extra);
    p.start_target(&args);
}

/// The Failover `default/name` once it has finished (Succeeded or Failed), within `timeout`.
pub async fn finished(
    c: &NodeCluster,
    name: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<serde_json::Value> {
    c.wait_for(
        ("understudy.io/v1alpha1", "Failover"),
        "default",
        name,
        timeout,
        |o| {
            matches!(
                o.pointer("/status/phase")
                    .and_then(serde_json::Value::as_str),
                Some("Succeeded" | "Failed")
            )
        },
    )
    .await
}

/// How a reading pod gets its claim.
pub enum Mount {
    /// As a block device at /dev/xvda.
    Block,
    /// Mounted at /data.
    Filesystem,
}

/// Runs pod `pod` in `ns` with claim `claim` and the tools image's shell running `script`;
/// returns its output, trimmed.
pub async fn read_in_pod(
    c: &NodeCluster,
    ns: &str,
    (pod, claim): (&str, &str),
    mount: Mount,
    script: &str,
) -> String {
    let attach = match mount {
        Mount::Block => "volumeDevices: [{name: v, devicePath: /dev/xvda}]",
        Mount::Filesystem => "volumeMounts: [{name: v, mountPath: /data}]",
    };
    let yaml = format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {pod}, namespace: {ns}}}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: {TOOLS_IMAGE}
    imagePullPolicy: Never
    command: [sh, -c, "{script}"]
    {attach}
  volumes: [{{name: v, persistentVolumeClaim: {{claimName: {claim}}}}}]
"#
    );
    c.run_pod(&yaml, ns, pod)
        .await
        .unwrap_or_else(|e| panic!("pod {ns}/{pod}: {e:#}"))
        .trim()
        .to_string()
}

/// SHA-256 (hex) of a file, as `sha256sum` prints it.
pub fn sha256_of(path: &std::path::Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).expect("read")))
}
