//! The Kubernetes half of failover without volume data, on two real API servers (primary and
//! standby; tests/kube-testbed): capture the `shop` application, transform it, apply it to the
//! standby in dependency order, and check what arrived.

use anyhow::{Context, Result};
use serde_json::Value;
use std::path::Path;
use understudy_e2e::manifests::{self, apply, eventually, files_under, outcome_of, results};
use understudy_e2e::testbed::TestCluster;
use understudy_e2e::{run, s};

const GOOD_RULES: &str = r#"
namespaces: {shop: shop-dr}
storageClasses: {fast: standard}
images:
  - {from: registry.shop.example, to: registry.dr.example}
replicas:
  - replicas: 0
labels:
  - add: {understudy.io/restored-from: primary}
    match: {group: apps, kind: Deployment}
"#;

/// The good rules plus a patch the API server must reject (a port out of range).
fn bad_rules() -> String {
    format!(
        "{GOOD_RULES}patches:\n  - name: broken-port\n    match: {{kind: Service, name: web-public}}\n    ops: [{{op: replace, path: /spec/ports/0/port, value: 70000}}]\n"
    )
}

/// Creates `shop` on the primary and waits until its controllers have done their work (pods,
/// claims from the StatefulSet's templates, the deployment's revision), so captures are stable.
async fn deploy_shop(primary: &TestCluster) -> Result<()> {
    primary
        .create_yaml(include_str!("../fixtures/shop.yaml"))
        .await?;
    eventually("the Widget CRD to be served", || async {
        Ok(primary
            .names("shop.example.com/v1", "Widget", "shop")
            .await
            .is_ok())
    })
    .await?;
    primary
        .create_yaml(include_str!("../fixtures/shop-app.yaml"))
        .await?;
    eventually("shop's controllers to settle", || async {
        let pods = primary.names("v1", "Pod", "shop").await?.len();
        let pvcs = primary
            .names("v1", "PersistentVolumeClaim", "shop")
            .await?
            .len();
        let sas = primary.names("v1", "ServiceAccount", "shop").await?;
        let cms = primary.names("v1", "ConfigMap", "shop").await?;
        let dep = primary.get("apps/v1", "Deployment", "shop", "web").await?;
        let revised = dep.is_some_and(|d| {
            d.pointer("/metadata/annotations/deployment.kubernetes.io~1revision")
                .is_some()
        });
        Ok(pods == 5
            && pvcs == 3
            && revised
            && sas.iter().any(|n| n == "default")
            && cms.iter().any(|n| n == "kube-root-ca.crt"))
    })
    .await
}

fn capture(cluster: &TestCluster, out: &Path, extra: &[&str]) -> Value {
    manifests::capture(cluster, &["shop"], out, extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shop_is_captured_transformed_and_applied_to_the_standby() -> Result<()> {
    let Some((primary, standby)) = manifests::pair().await? else {
        return Ok(());
    };
    // The test bed installed the real snapshot CRDs on both servers.
    for crd in [
        "volumesnapshots.snapshot.storage.k8s.io",
        "volumesnapshotcontents.snapshot.storage.k8s.io",
        "volumesnapshotclasses.snapshot.storage.k8s.io",
        "volumegroupsnapshots.groupsnapshot.storage.k8s.io",
    ] {
        for cluster in [&primary, &standby] {
            let c = cluster
                .get(
                    "apiextensions.k8s.io/v1",
                    "CustomResourceDefinition",
                    "",
                    crd,
                )
                .await?;
            assert!(c.is_some(), "{crd} not installed");
        }
    }
    deploy_shop(&primary).await?;
    standby
        .create_yaml("apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {name: standard}\nprovisioner: csi.dr.example\n")
        .await?;
    let tmp = tempfile::tempdir()?;
    let (one, two) = (tmp.path().join("capture-1"), tmp.path().join("capture-2"));

    // Two captures of the unchanged application are identical.
    let c1 = capture(&primary, &one, &[]);
    let c2 = capture(&primary, &two, &[]);
    assert_eq!(c1["digest"], c2["digest"], "{c1} vs {c2}");
    let files = files_under(&one);
    assert_eq!(files, files_under(&two));
    for f in files.iter() {
        assert_eq!(
            std::fs::read(one.join(f))?,
            std::fs::read(two.join(f))?,
            "{f} differs"
        );
    }
    for expected in [
        "_cluster/Namespace/shop.json",
        "_cluster/CustomResourceDefinition.apiextensions.k8s.io/widgets.shop.example.com.json",
        "_cluster/PersistentVolume/pv-uploads.json",
        "_cluster/StorageClass.storage.k8s.io/fast.json",
        "_cluster/ClusterRole.rbac.authorization.k8s.io/shop-viewer.json",
        "shop/Widget.shop.example.com/banner.json",
        "shop/Deployment.apps/web.json",
        "shop/StatefulSet.apps/db.json",
        "shop/PersistentVolumeClaim/data-db-0.json",
        "shop/PersistentVolumeClaim/data-db-1.json",
        "shop/PersistentVolumeClaim/uploads.json",
        "shop/Service/web-public.json",
        "shop/Ingress.networking.k8s.io/web.json",
        "shop/Secret/db-credentials.json",
        "shop/RoleBinding.rbac.authorization.k8s.io/widget-viewer.json",
        "shop/ServiceAccount/shop-api.json",
    ] {
        assert!(
            files.contains(&expected.to_string()),
            "{expected} missing from {files:#?}"
        );
    }
    for f in &files {
        for owned in [
            "/Pod/",
            "/ReplicaSet.apps/",
            "/ControllerRevision.apps/",
            "/Event",
            "/Endpoint",
            "kube-root-ca.crt",
        ] {
            assert!(
                !f.contains(owned),
                "{f} is cluster-owned and must not be captured"
            );
        }
    }
    let dep = std::fs::read_to_string(one.join("shop/Deployment.apps/web.json"))?;
    assert!(
        !dep.contains("resourceVersion")
            && !dep.contains("managedFields")
            && !dep.contains("status:"),
        "{dep}"
    );

    // A label selector narrows the namespaced objects.
    let narrow = tmp.path().join("narrow");
    capture(
        &primary,
        &narrow,
        &["--selector", "app.kubernetes.io/part-of=shop"],
    );
    let nf = files_under(&narrow);
    assert!(nf.contains(&"shop/ConfigMap/settings.json".to_string()));
    assert!(
        !nf.iter().any(|f| f.contains("scratch")) && files.iter().any(|f| f.contains("scratch"))
    );

    // A malformed selector is refused with the API server's reason.
    let o = run(
        "source-agent",
        &[
            "capture",
            "--kubeconfig",
            s(&primary.kubeconfig),
            "--namespace",
            "shop",
            "--selector",
            "tier in (web",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("label selector `tier in (web` is not valid"),
        "{err}"
    );

    let good = tmp.path().join("good.yaml");
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(&good, GOOD_RULES)?;
    std::fs::write(&bad, bad_rules())?;

    // Dry run: a readable diff and the order; nothing reaches the standby.
    let o = run(
        "target-agent",
        &[
            "apply",
            "--bundle",
            s(&one),
            "--rules",
            s(&good),
            "--dry-run",
        ],
    );
    let plan = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{plan}");
    assert!(
        plan.contains("+        image: registry.dr.example/web:1.4"),
        "{plan}"
    );
    assert!(plan.contains("=== StorageClass.storage.k8s.io fast: left out (mapped to the standby's storage class standard)"), "{plan}");
    assert!(plan.contains("apply order:"));
    assert!(
        standby
            .get("v1", "Namespace", "", "shop-dr")
            .await?
            .is_none()
    );

    // First apply, with a rule that breaks one Service: that one is rejected with the API
    // server's reason, everything else lands, and the exit code says something failed.
    let (code, first) = apply(&standby, &one, &bad, &[]);
    assert_eq!(code, 2, "{first}");
    let rejected = outcome_of(&first, "Service", "web-public");
    assert_eq!(rejected["outcome"], "rejected");
    assert!(
        rejected["message"].as_str().unwrap_or("").contains("65535"),
        "{rejected}"
    );
    for r in results(&first) {
        if r["object"]["name"] != "web-public" {
            assert_ne!(r["outcome"], "rejected", "{r}");
        }
    }
    // Everything is new on the standby but the namespace's `default` service account, which the
    // standby's controller made as soon as the namespace existed.
    for (kind, name) in [
        ("Namespace", "shop-dr"),
        ("Deployment", "web"),
        ("Widget", "banner"),
        ("CustomResourceDefinition", "widgets.shop.example.com"),
    ] {
        assert_eq!(
            outcome_of(&first, kind, name)["outcome"],
            "created",
            "{kind} {name}"
        );
    }
    let pos = |kind: &str| {
        results(&first)
            .iter()
            .position(|r| r["object"]["kind"] == kind)
            .unwrap()
    };
    assert!(pos("CustomResourceDefinition") < pos("Widget"));
    assert!(pos("Namespace") < pos("ServiceAccount") && pos("Service") < pos("Ingress"));

    // What arrived: mapped, rewritten, scaled to zero, stripped of the primary's fields.
    let src_dep = primary
        .get("apps/v1", "Deployment", "shop", "web")
        .await?
        .context("source")?;
    let d = standby
        .get("apps/v1", "Deployment", "shop-dr", "web")
        .await?
        .context("web on standby")?;
    assert_eq!(d["spec"]["replicas"], 0);
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.dr.example/web:1.4"
    );
    assert_eq!(
        d["metadata"]["labels"]["understudy.io/restored-from"],
        "primary"
    );
    assert_ne!(d["metadata"]["uid"], src_dep["metadata"]["uid"]);
    assert!(d["metadata"].get("ownerReferences").is_none());
    let sts = standby
        .get("apps/v1", "StatefulSet", "shop-dr", "db")
        .await?
        .context("db")?;
    assert_eq!(sts["spec"]["replicas"], 0);
    assert_eq!(
        sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"],
        "standard"
    );
    assert_eq!(
        sts["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.dr.example/postgres:16"
    );
    let pvc = standby
        .get("v1", "PersistentVolumeClaim", "shop-dr", "uploads")
        .await?
        .context("pvc")?;
    assert_eq!(pvc["spec"]["storageClassName"], "standard");
    assert!(pvc["spec"].get("volumeName").is_none(), "{pvc}");
    for claim in ["data-db-0", "data-db-1"] {
        assert!(
            standby
                .get("v1", "PersistentVolumeClaim", "shop-dr", claim)
                .await?
                .is_some()
        );
    }
    let pv = standby
        .get("v1", "PersistentVolume", "", "pv-uploads")
        .await?
        .context("pv")?;
    assert_eq!(pv["spec"]["claimRef"]["namespace"], "shop-dr");
    assert!(pv["spec"]["claimRef"].get("uid").is_none());
    assert!(
        standby
            .get("storage.k8s.io/v1", "StorageClass", "", "fast")
            .await?
            .is_none()
    );
    let secret = standby
        .get("v1", "Secret", "shop-dr", "db-credentials")
        .await?
        .context("secret")?;
    let src_secret = primary
        .get("v1", "Secret", "shop", "db-credentials")
        .await?
        .context("secret")?;
    assert_eq!(secret["data"], src_secret["data"]);
    let rb = standby
        .get(
            "rbac.authorization.k8s.io/v1",
            "RoleBinding",
            "shop-dr",
            "widget-viewer",
        )
        .await?
        .context("rb")?;
    assert_eq!(rb["subjects"][0]["namespace"], "shop-dr");
    assert!(
        standby
            .get(
                "rbac.authorization.k8s.io/v1",
                "ClusterRole",
                "",
                "shop-viewer"
            )
            .await?
            .is_some()
    );
    let db_svc = standby
        .get("v1", "Service", "shop-dr", "db")
        .await?
        .context("db svc")?;
    assert_eq!(db_svc["spec"]["clusterIP"], "None");
    let widget = standby
        .get("shop.example.com/v1", "Widget", "shop-dr", "banner")
        .await?
        .context("widget")?;
    assert_eq!(widget["spec"]["color"], "teal");
    assert!(
        standby
            .get("networking.k8s.io/v1", "Ingress", "shop-dr", "web")
            .await?
            .is_some()
    );

    // With the rules fixed, the rejected Service is created and nothing else changes...
    let (code, second) = apply(&standby, &one, &good, &[]);
    assert_eq!(code, 0, "{second}");
    assert_eq!(
        outcome_of(&second, "Service", "web-public")["outcome"],
        "created"
    );
    let public = standby
        .get("v1", "Service", "shop-dr", "web-public")
        .await?
        .context("svc")?;
    assert_eq!(public["spec"]["type"], "NodePort");
    for r in results(&second) {
        if r["object"]["name"] != "web-public" {
            assert_eq!(r["outcome"], "unchanged", "{r}");
        }
    }
    // ...and a third run changes nothing at all.
    let (code, third) = apply(&standby, &one, &good, &[]);
    assert_eq!(code, 0);
    assert!(
        results(&third).iter().all(|r| r["outcome"] == "unchanged"),
        "{third}"
    );
    // --if-exists skip leaves everything; fail reports every existing object.
    let (code, skip) = apply(&standby, &one, &good, &["--if-exists", "skip"]);
    assert!(
        code == 0 && results(&skip).iter().all(|r| r["outcome"] == "skipped"),
        "{skip}"
    );
    let (code, fail) = apply(&standby, &one, &good, &["--if-exists", "fail"]);
    assert_eq!(code, 2);
    assert!(
        results(&fail).iter().all(|r| r["outcome"] == "rejected"
            && r["message"]
                .as_str()
                .unwrap_or("")
                .contains("already exists")),
        "{fail}"
    );
    Ok(())
}

/// The source agent captures `shop` at every cut; the recovery point carries that bundle, failover
/// writes it transformed, and `apply` puts it on the standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_point_carries_the_application_to_the_standby() -> Result<()> {
    let Some((primary, standby)) = manifests::pair().await? else {
        return Ok(());
    };
    deploy_shop(&primary).await?;
    let mut pair = understudy_e2e::Pair::new();
    pair.start_target(&[]);
    let volume = pair.path("data.img");
    understudy_e2e::sparse_image(&volume, 8 << 20);
    understudy_e2e::write_random(&volume, 1 << 20, 2 << 20, 7);
    let report = pair.cycle(
        "shop",
        &[("data", &volume)],
        &[
            "--kube-namespace",
            "shop",
            "--kubeconfig",
            s(&primary.kubeconfig),
        ],
    );
    assert_eq!(report["seq"], 1, "{report}");
    pair.kill_target();

    let rules = pair.path("rules.yaml");
    std::fs::write(&rules, GOOD_RULES)?;
    let out = pair.path("failover");
    let f = pair.failover("shop", "latest", &out, &["--rules", s(&rules)]);
    assert_eq!(f["ok"], true, "{f}");
    assert_eq!(
        understudy_e2e::digest(&volume),
        understudy_e2e::digest(&out.join("volumes/data.img"))
    );
    let manifests = out.join("manifests");
    let web = std::fs::read_to_string(manifests.join("shop-dr/Deployment.apps/web.json"))?;
    assert!(
        web.contains("\"replicas\": 0") && web.contains("registry.dr.example/web:1.4"),
        "{web}"
    );
    assert!(
        !manifests
            .join("_cluster/StorageClass.storage.k8s.io/fast.json")
            .exists()
    );

    // failover's manifests are already transformed: apply them as they are.
    let o = run(
        "target-agent",
        &[
            "apply",
            "--bundle",
            s(&manifests),
            "--kubeconfig",
            s(&standby.kubeconfig),
        ],
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(text.contains("0 rejected"), "{text}");
    let d = standby
        .get("apps/v1", "Deployment", "shop-dr", "web")
        .await?
        .context("web")?;
    assert_eq!(d["spec"]["replicas"], 0);
    let w = standby
        .get("shop.example.com/v1", "Widget", "shop-dr", "banner")
        .await?;
    assert!(w.is_some());
    Ok(())
}
