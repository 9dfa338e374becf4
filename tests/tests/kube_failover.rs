//! Failovers on the node test bed (a real kubelet, containerd, the CSI sidecars and the
//! project's own test CSI driver, a test component; see understudy_e2e::node): a point of an
//! application (a Deployment on a Block PVC, a ConfigMap) made by a standalone source, then
//! a `Failover` into a mapped namespace (the claim rebuilt and verified, the objects applied,
//! the Deployment ready and reading the point's bytes), a drill beside it while points keep
//! committing (torn down with its Failover, the failover's copy untouched), a second failover
//! onto the first one's claim and a Failover to a point that does not exist (both Failed, saying
//! so). Nothing of the primary is needed: there is no
//! primary cluster here at all.

use serde_json::Value;
use std::os::unix::fs::FileExt;
use std::time::Duration;
use understudy_e2e::node::{NodeCluster, STORAGE_CLASS, TOOLS_IMAGE};
use understudy_e2e::standby::{self, sha256_of};
use understudy_e2e::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
const FAILOVER: (&str, &str) = ("understudy.io/v1alpha1", "Failover");

/// The application's manifests, as a standalone source ships them.
fn manifests(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("app.yaml"),
        format!(
            r#"apiVersion: v1
kind: Namespace
metadata: {{name: shop}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: data, namespace: shop}}
spec:
  accessModes: [ReadWriteOnce]
  volumeMode: Block
  storageClassName: {STORAGE_CLASS}
  resources: {{requests: {{storage: 32Mi}}}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: settings, namespace: shop}}
data: {{mode: standby-ready}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: app, namespace: shop}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: shop}}}}
  template:
    metadata: {{labels: {{app: shop}}}}
    spec:
      terminationGracePeriodSeconds: 0
      containers:
      - name: main
        image: {TOOLS_IMAGE}
        imagePullPolicy: Never
        command: [sleep, "3600"]
        volumeDevices: [{{name: data, devicePath: /dev/xvda}}]
      volumes: [{{name: data, persistentVolumeClaim: {{claimName: data}}}}]
"#
        ),
    )
    .unwrap();
}

fn failover_yaml(name: &str, mode: &str, to: &str, point: &str) -> String {
    format!(
        "apiVersion: understudy.io/v1alpha1\nkind: Failover\nmetadata: {{name: {name}, namespace: default}}\nspec: {{group: shop, point: \"{point}\", mode: {mode}, namespaceMap: {{shop: {to}}}, timeout: 3m}}\n"
    )
}

async fn finished(c: &NodeCluster, p: &Pair, name: &str) -> Value {
    c.wait_for(FAILOVER, "default", name, Duration::from_secs(300), |o| {
        matches!(
            o.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        )
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\ntarget log:\n{}", tail(&p.target_log())))
}

fn tail(s: &str) -> String {
    s.lines()
        .rev()
        .take(60)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n")
}

/// SHA-256 of the first SIZE bytes of the claim as the application's pod in `ns` reads it.
async fn digest_in_app(c: &NodeCluster, ns: &str) -> String {
    let pods = c.names("v1", "Pod", ns).await.unwrap();
    let pod = pods.first().expect("the application's pod");
    let script = format!("head -c {SIZE} /dev/xvda | sha256sum");
    let out = c
        .exec(ns, pod, "main", &["sh", "-c", &script])
        .await
        .unwrap();
    out.stdout
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failover_runs_the_application_from_its_point_and_a_drill_beside_it_is_torn_down() {
    let Some((c, p)) = standby::start().await else {
        return;
    };
    let (dir, img) = (p.path("manifests"), p.path("data.img"));
    manifests(&dir);
    sparse_image(&img, SIZE);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&[5u8; 200_000], MIB).unwrap();
    let cycle_args = ["--manifests", s(&dir)];
    p.cycle("shop", &[("shop.data", &img)], &cycle_args);
    let at_point_1 = sha256_of(&img);

    // The failover: the claim rebuilt from point 1, the objects applied, the workload ready.
    c.create_yaml(&failover_yaml("real", "failover", "shop-dr", "latest"))
        .await
        .unwrap();
    let fo = finished(&c, &p, "real").await;
    assert_eq!(fo["status"]["phase"], "Succeeded", "{fo}");
    let report = &fo["status"]["report"];
    assert_eq!(report["point"]["sequence"], 1);
    let v = &report["volumes"][0];
    assert_eq!(
        (v["pvc"].as_str(), &v["verified"]),
        (Some("shop-dr/data"), &Value::Bool(true)),
        "{report}"
    );
    assert_eq!(v["expectedDigest"], v["actualDigest"]);
    assert!(report["rtoSeconds"].as_f64().unwrap() > 0.0);
    let objects = report["objects"].as_array().unwrap();
    assert!(
        objects.iter().any(|o| o["object"]
            .as_str()
            .unwrap_or_default()
            .contains("Deployment")
            && o["outcome"] == "created"),
        "{report}"
    );
    eprintln!(
        "failover RTO {} s for one 16 MiB volume",
        report["rtoSeconds"]
    );
    let cm = c
        .get("v1", "ConfigMap", "shop-dr", "settings")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cm["data"]["mode"], "standby-ready");
    assert_eq!(
        digest_in_app(&c, "shop-dr").await,
        at_point_1,
        "the application reads point 1"
    );

    // A drill beside it, while replication goes on: point 2 commits during the drill.
    c.create_yaml(&failover_yaml("drill", "drill", "shop-drill", "1"))
        .await
        .unwrap();
    f.write_all_at(&[6u8; 65536], 3 * MIB).unwrap();
    p.cycle("shop", &[("shop.data", &img)], &cycle_args);
    let drill = finished(&c, &p, "drill").await;
    assert_eq!(drill["status"]["phase"], "Succeeded", "{drill}");
    assert_eq!(digest_in_app(&c, "shop-drill").await, at_point_1);
    assert_eq!(
        p.points("shop"),
        vec![1, 2],
        "points kept committing during the drill"
    );
    let api: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
        c.client().await.unwrap(),
        "default",
        &kube::api::ApiResource::erase::<understudy_kube::crd::Failover>(&()),
    );
    api.delete("drill", &Default::default()).await.unwrap();
    manifests::eventually("the drill's namespace to go", || async {
        Ok(c.get("v1", "Namespace", "", "shop-drill").await?.is_none()
            && c.get(FAILOVER.0, FAILOVER.1, "default", "drill")
                .await?
                .is_none())
    })
    .await
    .unwrap();
    assert_eq!(
        digest_in_app(&c, "shop-dr").await,
        at_point_1,
        "the failover's copy is untouched"
    );

    // A drill into the application's own namespace, and a point that does not exist: refused.
    c.create_yaml(&failover_yaml("bad-drill", "drill", "shop-dr", "latest"))
        .await
        .unwrap();
    let bad = finished(&c, &p, "bad-drill").await;
    assert_eq!(bad["status"]["phase"], "Failed");
    let e = bad["status"]["report"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(e.contains("namespace shop-dr exists already"), "{e}");
    // Another failover into shop-dr, of point 2: the claim there is point 1's, never reused.
    c.create_yaml(&failover_yaml("again", "failover", "shop-dr", "2"))
        .await
        .unwrap();
    let again = finished(&c, &p, "again").await;
    assert_eq!(again["status"]["phase"], "Failed", "{again}");
    let e = again["status"]["report"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(e.contains("claim shop-dr/data exists already"), "{e}");
    assert_eq!(digest_in_app(&c, "shop-dr").await, at_point_1);
    c.create_yaml(&failover_yaml("nine", "failover", "shop-nine", "9"))
        .await
        .unwrap();
    let nine = finished(&c, &p, "nine").await;
    assert_eq!(nine["status"]["phase"], "Failed");
    let e = nine["status"]["report"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(e.contains("no point 9 in group shop"), "{e}");
    assert!(
        c.get("v1", "Namespace", "", "shop-nine")
            .await
            .unwrap()
            .is_none(),
        "nothing made"
    );
}
