//! The node test bed: real kubelet, containerd, CNI and CSI sidecars with the project's own test
//! CSI driver (see understudy_e2e::node). Each test starts its own cluster.

use std::time::Duration;
use understudy_e2e::node::{AGENTS_IMAGE, NodeCluster, TOOLS_IMAGE};

macro_rules! cluster {
    () => {
        match NodeCluster::start().await.expect("start the node test bed") {
            Some(c) => c,
            None => return,
        }
    };
}

#[tokio::test(flavor = "multi_thread")]
async fn block_and_filesystem_pvcs_are_provisioned_written_and_read() {
    let c = cluster!();
    c.create_yaml(&format!(
        r#"apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: fs, namespace: default}}
spec:
  accessModes: [ReadWriteOnce]
  resources: {{requests: {{storage: 64Mi}}}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: raw, namespace: default}}
spec:
  accessModes: [ReadWriteOnce]
  volumeMode: Block
  resources: {{requests: {{storage: 16Mi}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: user, namespace: default}}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 0
  containers:
  - name: main
    image: {TOOLS_IMAGE}
    imagePullPolicy: Never
    command: [sh, -c, "echo hello-fs > /data/f && printf hello-block | dd of=/dev/xvda bs=4096 conv=sync,fsync 2>/dev/null && sync && sleep 3600"]
    volumeMounts: [{{name: fs, mountPath: /data}}]
    volumeDevices: [{{name: raw, devicePath: /dev/xvda}}]
  volumes:
  - {{name: fs, persistentVolumeClaim: {{claimName: fs}}}}
  - {{name: raw, persistentVolumeClaim: {{claimName: raw}}}}
"#
    ))
    .await
    .unwrap();
    c.wait_pod("default", "user", "Running", Duration::from_secs(90))
        .await
        .unwrap();
    let fs = c
        .exec("default", "user", "main", &["cat", "/data/f"])
        .await
        .unwrap();
    assert_eq!((fs.stdout.trim(), fs.code), ("hello-fs", 0), "{fs:?}");
    let raw = c
        .exec(
            "default",
            "user",
            "main",
            &["sh", "-c", "head -c 11 /dev/xvda"],
        )
        .await
        .unwrap();
    assert_eq!(raw.stdout, "hello-block", "{raw:?}");
    let fails = c
        .exec(
            "default",
            "user",
            "main",
            &["sh", "-c", "echo oops >&2; exit 3"],
        )
        .await
        .unwrap();
    assert_eq!((fails.stderr.trim(), fails.code), ("oops", 3));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agents_run_from_their_locally_built_image() {
    let c = cluster!();
    c.import_agents().unwrap();
    let log = c
        .run_pod(
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: agents, namespace: default}}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: main\n    image: {AGENTS_IMAGE}\n    imagePullPolicy: Never\n    command: [/bin/source-agent, --version]\n  - name: target\n    image: {AGENTS_IMAGE}\n    imagePullPolicy: Never\n    command: [/bin/target-agent, --version]\n"
            ),
            "default",
            "agents",
        )
        .await
        .unwrap();
    assert!(log.contains(env!("CARGO_PKG_VERSION")), "{log}");
}
