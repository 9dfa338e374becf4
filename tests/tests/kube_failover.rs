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
    standby::finished(c, name, Duration::from_secs(300))
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

const SCHEDULE: (&str, &str) = ("understudy.io/v1alpha1", "DrillSchedule");

/// The value of metric `name` with `labels` (as the exposition prints them), if exported.
fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    let key = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
}

/// The schedule, once `check` holds for it.
async fn schedule_when(
    c: &NodeCluster,
    p: &Pair,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    c.wait_for(
        SCHEDULE,
        "default",
        "nightly",
        Duration::from_secs(240),
        check,
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: {e:#}\ntarget log:\n{}", tail(&p.target_log())))
}

/// A DrillSchedule (every 20 s here) runs drills that tear themselves down after their ttl and
/// keep their reports; the schedule records the outcome, the metrics say when a drill last
/// succeeded; a drill that fails turns the condition False with a Warning event and the
/// failing gauge to 1; old runs go by the history limits, and deleting the schedule removes its
/// runs and whatever they made. A ttl on a failover (not a drill) is refused.
#[tokio::test(flavor = "multi_thread")]
async fn scheduled_drills_tear_down_keep_their_reports_and_a_failed_one_raises_the_alarm() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let Some((c, p)) = standby::start_with(&["--metrics-addr", &metrics]).await else {
        return;
    };
    let (dir, img) = (p.path("manifests"), p.path("data.img"));
    manifests(&dir);
    sparse_image(&img, SIZE);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&[7u8; 100_000], MIB)
        .unwrap();
    p.cycle("shop", &[("shop.data", &img)], &["--manifests", s(&dir)]);

    c.create_yaml("apiVersion: understudy.io/v1alpha1\nkind: Failover\nmetadata: {name: kept, namespace: default}\nspec: {group: shop, ttl: 1m, namespaceMap: {shop: shop-kept}}\n")
        .await
        .unwrap();
    let kept = finished(&c, &p, "kept").await;
    let e = kept["status"]["report"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(e.contains("ttl is for drills"), "{kept}");

    c.create_yaml("apiVersion: understudy.io/v1alpha1\nkind: DrillSchedule\nmetadata: {name: nightly, namespace: default}\nspec:\n  schedule: '*/20 * * * * *'\n  successfulRunsHistoryLimit: 1\n  failedRunsHistoryLimit: 1\n  template: {group: shop, namespaceMap: {shop: shop-drill}, ttl: 2s, timeout: 3m}\n")
        .await
        .unwrap();
    let ok = schedule_when(&c, &p, "a drill that succeeded and was torn down", |d| {
        d.pointer("/status/lastRun/phase") == Some(&"TornDown".into())
            && d.pointer("/status/lastRun/succeeded") == Some(&Value::Bool(true))
    })
    .await;
    let run = &ok["status"]["lastRun"];
    assert_eq!(
        (&run["point"], &run["volumesVerified"]),
        (&Value::from(1), &Value::from(1)),
        "{ok}"
    );
    let cond = |d: &Value| {
        d["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "LastDrillSucceeded")
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(cond(&ok)["status"], "True", "{ok}");
    assert!(ok["status"]["lastSuccessTime"].is_string(), "{ok}");
    let name = run["name"].as_str().unwrap();
    let fo = c
        .get(FAILOVER.0, FAILOVER.1, "default", name)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fo["spec"]["mode"], "drill");
    assert_eq!(
        fo["status"]["report"]["volumes"][0]["verified"], true,
        "the report stays: {fo}"
    );
    assert!(
        c.get("v1", "Namespace", "", "shop-drill")
            .await
            .unwrap()
            .is_none(),
        "a torn-down drill leaves no namespace"
    );
    let label = "schedule=\"default/nightly\"";
    let text = scrape(&metrics);
    assert!(
        metric(
            &text,
            "understudy_drill_last_success_timestamp_seconds",
            label
        )
        .unwrap_or(0.0)
            > 0.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "understudy_drill_failing", label),
        Some(0.0),
        "{text}"
    );

    // The template now names a point that does not exist: the next drill fails, and says so.
    let schedules: kube::Api<understudy_kube::crd::DrillSchedule> =
        kube::Api::namespaced(c.client().await.unwrap(), "default");
    schedules
        .patch(
            "nightly",
            &Default::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"template": {"point": "9"}}})),
        )
        .await
        .unwrap();
    let bad = schedule_when(&c, &p, "a failed drill", |d| cond(d)["status"] == "False").await;
    let c2 = cond(&bad);
    assert_eq!(c2["reason"], "DrillFailed");
    assert!(
        c2["message"].as_str().unwrap().contains("no point 9"),
        "{bad}"
    );
    assert!(bad["status"]["consecutiveFailures"].as_u64() >= Some(1));
    let text = scrape(&metrics);
    assert_eq!(
        metric(&text, "understudy_drill_failing", label),
        Some(1.0),
        "{text}"
    );
    assert!(
        metric(
            &text,
            "understudy_drill_runs_total",
            &format!("{label},result=\"failed\"")
        ) >= Some(1.0),
        "{text}"
    );
    let warned = c
        .client()
        .await
        .map(|cl| kube::Api::<k8s_openapi::api::events::v1::Event>::namespaced(cl, "default"))
        .unwrap()
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .any(|e| {
            e.reason.as_deref() == Some("DrillFailed") && e.type_.as_deref() == Some("Warning")
        });
    assert!(warned, "a Warning event DrillFailed");

    // History: one torn-down run of each outcome at most, once the failed one is torn down.
    let runs_of = || async {
        let api: kube::Api<understudy_kube::crd::Failover> =
            kube::Api::namespaced(c.client().await.unwrap(), "default");
        api.list(&kube::api::ListParams::default().labels("understudy.io/drill-schedule=nightly"))
            .await
            .unwrap()
            .items
    };
    manifests::eventually("the history limits to hold", || async {
        let runs = runs_of().await;
        let torn = |ok: bool| {
            runs.iter()
                .filter(|r| {
                    let s = r.status.clone().unwrap_or_default();
                    s.phase == understudy_kube::crd::failover::FailoverPhase::TornDown
                        && s.succeeded() == Some(ok)
                })
                .count()
        };
        Ok(torn(true) <= 1 && torn(false) == 1)
    })
    .await
    .unwrap();

    // Deleting the schedule deletes its runs (garbage collection), and they their copies.
    schedules
        .delete("nightly", &Default::default())
        .await
        .unwrap();
    manifests::eventually("the schedule's runs and copies to go", || async {
        Ok(runs_of().await.is_empty()
            && c.get("v1", "Namespace", "", "shop-drill").await?.is_none())
    })
    .await
    .unwrap();
}
