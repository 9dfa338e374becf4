//! The standby's Kubernetes side on the node test bed: one cluster with the project's CRDs and
//! the agents image, a target agent on its bridge running the volume populator and the Failover
//! controller, and pods that read what they rebuilt.

use crate::node::{AGENTS_IMAGE, NodeCluster, TOOLS_IMAGE};
use crate::{Pair, s};

/// The cluster (CRDs installed, agents imported) and the pair, its target agent on the bridge
/// with `--kube`; `None` when the node test bed cannot run here (not CI).
pub async fn start() -> Option<(NodeCluster, Pair)> {
    let c = NodeCluster::start()
        .await
        .expect("start the node test bed")?;
    c.import_agents().expect("import the agents image");
    let crds: kube::Api<
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    > = kube::Api::all(c.client().await.expect("client"));
    for crd in understudy_kube::crd::all() {
        crds.create(&Default::default(), &crd)
            .await
            .expect("install a CRD");
    }
    let mut p = Pair::new();
    p.addr = format!("{}:0", c.bridge_ip);
    start_target(&mut p, &c);
    Some((c, p))
}

/// Starts (or restarts, on the same address) the target agent with the standby's controllers.
pub fn start_target(p: &mut Pair, c: &NodeCluster) {
    p.start_target(&[
        "--kube",
        "--kubeconfig",
        s(&c.kubeconfig),
        "--writer-image",
        AGENTS_IMAGE,
    ]);
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
