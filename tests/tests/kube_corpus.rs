//! Capture -> transform -> apply -> apply again on a corpus with the shapes real charts and
//! operators produce (tests/fixtures/corpus*.yaml): Jobs and CronJobs, legacy storage-class
//! annotations, a long-lived token Secret, an admission webhook and its Service, aggregated and
//! built-in roles, a finalizer-held object being deleted, a bare Pod with admission-injected
//! fields, a StatefulSet with claim templates, 150 ConfigMaps, odd strings, an application in
//! `default` beside the cluster's own objects. Two real API servers (tests/kube-testbed).

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use understudy_e2e::manifests::{
    apply, capture, eventually, files_under, outcome_of, pair, results,
};
use understudy_e2e::testbed::TestCluster;

const RULES: &str = r#"
namespaces: {corpus: corpus-dr}
storageClasses: {fast: standard}
images:
  - {from: registry.corpus.example, to: registry.dr.example}
namespacePaths:
  - match: {group: corpus.example.com, kind: Gadget}
    paths: [/spec/targetNamespace]
"#;

const WEBHOOK: &str = "apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata: {name: corpus-guard}
webhooks:
- name: gadgets.corpus.example.com
  failurePolicy: Fail
  timeoutSeconds: 2
  sideEffects: None
  admissionReviewVersions: [v1]
  clientConfig:
    service: {namespace: corpus, name: guard, path: /validate}
  rules:
  - {operations: [CREATE, UPDATE], apiGroups: [corpus.example.com], apiVersions: [v1], resources: [gadgets]}
";

/// Objects the test names, where they are on the standby.
const STANDBY: &str = "corpus-dr";

async fn deploy(primary: &TestCluster) -> Result<()> {
    primary
        .create_yaml(include_str!("../fixtures/corpus.yaml"))
        .await?;
    eventually("the corpus CRDs to be served", || async {
        Ok(primary
            .names("corpus.example.com/v1", "Gadget", "corpus")
            .await
            .is_ok()
            && primary
                .names("corpus.example.com/v1", "ClusterIssuer", "")
                .await
                .is_ok())
    })
    .await?;
    primary
        .create_yaml(include_str!("../fixtures/corpus-app.yaml"))
        .await?;
    let many: Vec<String> = (0..150)
        .map(|i| {
            format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm-{i:03}, namespace: corpus}}\ndata: {{n: \"{i}\"}}\n")
        })
        .collect();
    primary.create_yaml(&many.join("---\n")).await?;
    // Held by a finalizer, then deleted: it is on its way out.
    primary
        .create_yaml("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: leaving, namespace: corpus, finalizers: [corpus.example.com/hold]}\n")
        .await?;
    let cms: kube::Api<ConfigMap> = kube::Api::namespaced(primary.client().await?, "corpus");
    cms.delete("leaving", &Default::default()).await?;
    // Last, as charts order it: the webhook that guards the Gadgets, with no backend running.
    primary.create_yaml(WEBHOOK).await?;
    eventually(
        "the token controller and the aggregation controller",
        || async {
            let token = primary
                .get("v1", "Secret", "corpus", "builder-token")
                .await?;
            let all = primary
                .get(
                    "rbac.authorization.k8s.io/v1",
                    "ClusterRole",
                    "",
                    "corpus-all",
                )
                .await?;
            let pod = primary.get("v1", "Pod", "corpus", "toolbox").await?;
            Ok(token.is_some_and(|t| t.pointer("/data/token").is_some())
                && all.is_some_and(|r| r["rules"].as_array().is_some_and(|r| !r.is_empty()))
                && pod.is_some_and(|p| injected_token_volume(&p)))
        },
    )
    .await
}

fn injected_token_volume(pod: &Value) -> bool {
    pod.pointer("/spec/volumes")
        .and_then(Value::as_array)
        .is_some_and(|vs| {
            vs.iter().any(|v| {
                v["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("kube-api-access-"))
            })
        })
}

/// (kind, namespace, name) of every object an apply report names, by outcome.
fn ids(report: &Value, outcome: &str) -> BTreeSet<(String, String, String)> {
    results(report)
        .iter()
        .filter(|r| r["outcome"] == outcome)
        .map(|r| {
            let o = &r["object"];
            let s = |k: &str| o[k].as_str().unwrap_or("").to_string();
            (s("kind"), s("namespace"), s("name"))
        })
        .collect()
}

fn all_unchanged(report: &Value) {
    let changed: Vec<&Value> = results(report)
        .iter()
        .filter(|r| r["outcome"] != "unchanged")
        .collect();
    assert!(changed.is_empty(), "a repeated apply changed: {changed:#?}");
}

/// True when a field manager called `understudy` has ever written the object.
fn written_by_us(obj: &Value) -> bool {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .is_some_and(|m| m.iter().any(|f| f["manager"] == "understudy"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corpus_of_real_shapes_arrives_whole_and_applies_again_unchanged() -> Result<()> {
    let Some((primary, standby)) = pair().await? else {
        return Ok(());
    };
    deploy(&primary).await?;
    standby
        .create_yaml("apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {name: standard}\nprovisioner: csi.dr.example\n")
        .await?;
    let tmp = tempfile::tempdir()?;
    let rules = tmp.path().join("rules.yaml");
    std::fs::write(&rules, RULES)?;
    let bundle = tmp.path().join("bundle");
    capture(&primary, &["corpus", "default"], &bundle, &[]);

    // What was captured, and what the clusters own was not.
    let files = files_under(&bundle);
    let has = |f: &str| files.iter().any(|x| x == f);
    for f in [
        "_cluster/ClusterIssuer.corpus.example.com/corpus-ca.json",
        "_cluster/CustomResourceDefinition.apiextensions.k8s.io/clusterissuers.corpus.example.com.json",
        "_cluster/ClusterRoleBinding.rbac.authorization.k8s.io/corpus-builder.json",
        "_cluster/ClusterRole.rbac.authorization.k8s.io/corpus-piece.json",
        "_cluster/ClusterRole.rbac.authorization.k8s.io/corpus-all.json",
        "_cluster/StorageClass.storage.k8s.io/fast.json",
        "_cluster/StorageClass.storage.k8s.io/slow.json",
        "_cluster/ValidatingWebhookConfiguration.admissionregistration.k8s.io/corpus-guard.json",
        "corpus/Secret/builder-token.json",
        "corpus/Job.batch/migrate.json",
        "corpus/Pod/toolbox.json",
        "corpus/ConfigMap/cm-149.json",
    ] {
        assert!(has(f), "{f} not captured: {files:#?}");
    }
    for f in [
        "_cluster/ClusterRole.rbac.authorization.k8s.io/view.json",
        "default/Service/kubernetes.json",
        "corpus/ConfigMap/leaving.json",
        "corpus/ConfigMap/kube-root-ca.crt.json",
    ] {
        assert!(!has(f), "{f} is the cluster's and was captured");
    }
    let odd = std::fs::read_to_string(bundle.join("corpus/ConfigMap/odd-strings.json"))?;
    for s in [
        "\"a\": \"yes\"",
        "\"c\": \"1_000\"",
        "\"d\": \"12:30\"",
        "\"j\": \"off\"",
    ] {
        assert!(odd.contains(s), "{s} in {odd}");
    }
    let kubernetes_before = standby
        .get("v1", "Service", "default", "kubernetes")
        .await?
        .context("the standby's kubernetes Service")?;

    // An inert standby copy: everything arrives, nothing runs.
    let (code, first) = apply(&standby, &bundle, &rules, &["--inert"]);
    assert_eq!(code, 0, "{first}");
    arrived_whole(&standby, &bundle, &first, &["Pod"]).await?;
    inert(&standby, true).await?;
    let (code, again) = apply(&standby, &bundle, &rules, &["--inert"]);
    assert_eq!(code, 0, "{again}");
    all_unchanged(&again);

    // Failover: the same bundle without inert runs the application; applied again, unchanged
    // (the webhook, failing closed with no backend, does not block its Gadgets).
    let (code, failover) = apply(&standby, &bundle, &rules, &[]);
    assert_eq!(code, 0, "{failover}");
    arrived_whole(&standby, &bundle, &failover, &[]).await?;
    inert(&standby, false).await?;
    let (code, again) = apply(&standby, &bundle, &rules, &[]);
    assert_eq!(code, 0, "{again}");
    all_unchanged(&again);

    transformed_as_expected(&primary, &standby).await?;
    // Nothing the standby owns was written.
    for (api, kind, ns, name) in [
        ("rbac.authorization.k8s.io/v1", "ClusterRole", "", "view"),
        ("v1", "Service", "default", "kubernetes"),
        ("v1", "Namespace", "", "default"),
    ] {
        let o = standby
            .get(api, kind, ns, name)
            .await?
            .context("built in")?;
        assert!(!written_by_us(&o), "{kind} {name} was written: {o}");
    }
    let kubernetes_after = standby
        .get("v1", "Service", "default", "kubernetes")
        .await?
        .context("kubernetes Service")?;
    assert_eq!(kubernetes_before["spec"], kubernetes_after["spec"]);

    pruned_when_gone(&primary, &standby, &bundle, &rules, tmp.path()).await
}

/// Every object of the bundle that the rules keep is on the standby, and the report names it.
async fn arrived_whole(
    standby: &TestCluster,
    bundle: &Path,
    report: &Value,
    inert_kinds: &[&str],
) -> Result<()> {
    let applied: BTreeSet<_> = ["created", "updated", "unchanged"]
        .iter()
        .flat_map(|o| ids(report, o))
        .collect();
    assert!(ids(report, "rejected").is_empty(), "{report}");
    // Left out by the rules: the standby's own namespace, the mapped storage class.
    let left_out = |kind: &str, name: &str| {
        inert_kinds.contains(&kind)
            || (kind == "Namespace" && name == "default")
            || (kind == "StorageClass" && name == "fast")
    };
    let mut expected = 0;
    for f in files_under(bundle) {
        let obj: Value = serde_json::from_slice(&std::fs::read(bundle.join(&f))?)?;
        let s = |p: &str| {
            obj.pointer(p)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let (kind, name) = (s("/kind"), s("/metadata/name"));
        let ns = match s("/metadata/namespace").as_str() {
            "corpus" => STANDBY.to_string(),
            other => other.to_string(),
        };
        let name = if kind == "Namespace" && name == "corpus" {
            STANDBY.to_string()
        } else {
            name
        };
        if left_out(&kind, &name) {
            continue;
        }
        expected += 1;
        assert!(
            applied.contains(&(kind.clone(), ns.clone(), name.clone())),
            "{kind} {ns}/{name} not in the report"
        );
        let there = standby.get(&s("/apiVersion"), &kind, &ns, &name).await?;
        assert!(there.is_some(), "{kind} {ns}/{name} is not on the standby");
    }
    assert_eq!(
        applied.len(),
        expected,
        "the report names objects the bundle does not"
    );
    Ok(())
}

/// The workloads as an inert standby copy has them, or as they run after failover.
async fn inert(standby: &TestCluster, inert: bool) -> Result<()> {
    let get = |api: &'static str, kind: &'static str, name: &'static str| {
        on(standby, api, kind, STANDBY, name)
    };
    let web = get("apps/v1", "Deployment", "web").await?;
    assert_eq!(web["spec"]["replicas"], if inert { 0 } else { 2 });
    let db = get("apps/v1", "StatefulSet", "db").await?;
    assert_eq!(db["spec"]["replicas"], if inert { 0 } else { 1 });
    for (kind, name) in [("CronJob", "nightly"), ("Job", "migrate")] {
        let o = get("batch/v1", kind, name).await?;
        assert_eq!(o["spec"]["suspend"], inert, "{kind} {name}: {o}");
    }
    let agent = get("apps/v1", "DaemonSet", "agent").await?;
    let selector = &agent["spec"]["template"]["spec"]["nodeSelector"];
    assert_eq!(
        selector.get("understudy.io/inert-standby").is_some(),
        inert,
        "{agent}"
    );
    let pod = standby.get("v1", "Pod", STANDBY, "toolbox").await?;
    assert_eq!(pod.is_none(), inert);
    let hook = standby
        .get(
            "admissionregistration.k8s.io/v1",
            "ValidatingWebhookConfiguration",
            "",
            "corpus-guard",
        )
        .await?
        .context("webhook")?;
    let policy = if inert { "Ignore" } else { "Fail" };
    assert_eq!(hook["webhooks"][0]["failurePolicy"], policy);
    Ok(())
}

/// An object that must exist.
async fn on(c: &TestCluster, api: &str, kind: &str, ns: &str, name: &str) -> Result<Value> {
    c.get(api, kind, ns, name)
        .await?
        .with_context(|| format!("{kind} {ns}/{name} does not exist"))
}

/// What each shape became on the standby.
async fn transformed_as_expected(primary: &TestCluster, standby: &TestCluster) -> Result<()> {
    // The Job's selector is the standby's own.
    let (src, dst) = (
        on(primary, "batch/v1", "Job", "corpus", "migrate").await?,
        on(standby, "batch/v1", "Job", STANDBY, "migrate").await?,
    );
    let uid = "/spec/selector/matchLabels/batch.kubernetes.io~1controller-uid";
    assert_eq!(dst.pointer(uid), dst.pointer("/metadata/uid"));
    assert_ne!(dst.pointer(uid), src.pointer(uid));
    // The token Secret carries a standby token.
    let src_token = on(primary, "v1", "Secret", "corpus", "builder-token").await?;
    let sa = on(standby, "v1", "ServiceAccount", STANDBY, "builder").await?;
    eventually(
        "the standby's token controller to fill the token",
        || async {
            let t = standby
                .get("v1", "Secret", STANDBY, "builder-token")
                .await?;
            Ok(t.is_some_and(|t| {
                t.pointer("/data/token").is_some()
                    && t.pointer("/data/token") != src_token.pointer("/data/token")
                    && t.pointer("/metadata/annotations/kubernetes.io~1service-account.uid")
                        == sa.pointer("/metadata/uid")
            }))
        },
    )
    .await?;
    // Legacy storage-class annotations are mapped, and the classes they name came along.
    let legacy = "/metadata/annotations/volume.beta.kubernetes.io~1storage-class";
    let pvc = on(standby, "v1", "PersistentVolumeClaim", STANDBY, "legacy").await?;
    assert_eq!(pvc.pointer(legacy), Some(&"standard".into()));
    let db = on(standby, "apps/v1", "StatefulSet", STANDBY, "db").await?;
    let template = &db["spec"]["volumeClaimTemplates"][0];
    assert_eq!(template.pointer(legacy), Some(&"slow".into()));
    assert!(
        standby
            .get("storage.k8s.io/v1", "StorageClass", "", "slow")
            .await?
            .is_some()
    );
    // Images: the registry moved, the same host on another port is another registry.
    let web = on(standby, "apps/v1", "Deployment", STANDBY, "web").await?;
    let containers = &web["spec"]["template"]["spec"]["containers"];
    assert_eq!(containers[0]["image"], "registry.dr.example/web:2");
    assert_eq!(
        containers[1]["image"],
        "registry.corpus.example:5000/sidecar:1"
    );
    // Namespace references: a policy's selector, the webhook's Service, a custom resource's path.
    let np = on(
        standby,
        "networking.k8s.io/v1",
        "NetworkPolicy",
        STANDBY,
        "from-own-namespace",
    )
    .await?;
    assert_eq!(
        np.pointer(
            "/spec/ingress/0/from/0/namespaceSelector/matchLabels/kubernetes.io~1metadata.name"
        ),
        Some(&STANDBY.into())
    );
    let hook = on(
        standby,
        "admissionregistration.k8s.io/v1",
        "ValidatingWebhookConfiguration",
        "",
        "corpus-guard",
    )
    .await?;
    assert_eq!(
        hook["webhooks"][0]["clientConfig"]["service"]["namespace"],
        STANDBY
    );
    let gadget = on(standby, "corpus.example.com/v1", "Gadget", STANDBY, "cert").await?;
    assert_eq!(gadget["spec"]["targetNamespace"], STANDBY);
    // The bare Pod has the standby's own token volume, not the primary's.
    let (src_pod, pod) = (
        on(primary, "v1", "Pod", "corpus", "toolbox").await?,
        on(standby, "v1", "Pod", STANDBY, "toolbox").await?,
    );
    assert!(injected_token_volume(&pod));
    assert_ne!(src_pod["spec"]["volumes"], pod["spec"]["volumes"]);
    // Odd strings are strings.
    let odd = on(standby, "v1", "ConfigMap", STANDBY, "odd-strings").await?;
    let src_odd = on(primary, "v1", "ConfigMap", "corpus", "odd-strings").await?;
    assert_eq!(odd["data"], src_odd["data"]);
    // The aggregated role's rules are the standby's aggregation controller's.
    let all = on(
        standby,
        "rbac.authorization.k8s.io/v1",
        "ClusterRole",
        "",
        "corpus-all",
    )
    .await?;
    assert!(
        all["rules"].as_array().is_some_and(|r| !r.is_empty()),
        "{all}"
    );
    Ok(())
}

/// What left the application leaves the standby; what the apply did not create stays.
async fn pruned_when_gone(
    primary: &TestCluster,
    standby: &TestCluster,
    bundle: &Path,
    rules: &Path,
    tmp: &Path,
) -> Result<()> {
    standby
        .create_yaml(&format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: standby-own, namespace: {STANDBY}}}\n"))
        .await?;
    let primary_client = primary.client().await?;
    let cms: kube::Api<ConfigMap> = kube::Api::namespaced(primary_client.clone(), "corpus");
    cms.delete("cm-000", &Default::default()).await?;
    let crons: kube::Api<k8s_openapi::api::batch::v1::CronJob> =
        kube::Api::namespaced(primary_client, "corpus");
    crons.delete("nightly", &Default::default()).await?;
    let second = tmp.join("bundle-2");
    capture(primary, &["corpus", "default"], &second, &[]);
    assert!(files_under(&second).len() < files_under(bundle).len());
    let (code, report) = apply(standby, &second, rules, &[]);
    assert_eq!(code, 0, "{report}");
    let pruned = ids(&report, "pruned");
    let expect: BTreeSet<_> = [
        ("ConfigMap", STANDBY, "cm-000"),
        ("CronJob", STANDBY, "nightly"),
    ]
    .iter()
    .map(|(k, n, m)| (k.to_string(), n.to_string(), m.to_string()))
    .collect();
    assert_eq!(pruned, expect, "{report}");
    assert!(
        standby
            .get("v1", "ConfigMap", STANDBY, "cm-000")
            .await?
            .is_none()
    );
    assert!(
        standby
            .get("v1", "ConfigMap", STANDBY, "standby-own")
            .await?
            .is_some()
    );
    // The `default` service account is the standby's controller's (the first apply may make it
    // before the controller does), and a claim holds data: neither is ever a member.
    for (kind, name) in [
        ("ServiceAccount", "default"),
        ("PersistentVolumeClaim", "legacy"),
    ] {
        let o = on(standby, "v1", kind, STANDBY, name).await?;
        assert!(
            o.pointer("/metadata/labels/applyset.kubernetes.io~1part-of")
                .is_none(),
            "{o}"
        );
    }
    let parent = standby
        .get("v1", "Secret", STANDBY, "understudy-applyset")
        .await?
        .context("the ApplySet parent")?;
    let kinds = parent
        .pointer("/metadata/annotations/applyset.kubernetes.io~1contains-group-kinds")
        .and_then(Value::as_str)
        .unwrap_or("");
    assert!(
        !kinds.contains("CronJob") && kinds.contains("Job.batch"),
        "{kinds}"
    );
    let (code, again) = apply(standby, &second, rules, &[]);
    assert_eq!(code, 0);
    all_unchanged(&again);
    let _ = outcome_of(&again, "ConfigMap", "cm-001");
    Ok(())
}
