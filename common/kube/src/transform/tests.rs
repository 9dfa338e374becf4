use super::*;
use serde_json::json;

fn rules(yaml: &str) -> Rules {
    Rules::parse(yaml).unwrap()
}

fn err(yaml: &str) -> String {
    format!("{:#}", Rules::parse(yaml).unwrap_err())
}

fn out(r: &Rules, obj: Value) -> Value {
    match r.transform(&obj).unwrap() {
        Verdict::Apply(v) => v,
        Verdict::LeaveOut(why) => panic!("left out: {why}"),
    }
}

#[test]
fn strips_cluster_owned_fields_and_maps() {
    let r = rules("namespaces: {shop: shop-dr}\nstorageClasses: {fast: standard}\n");
    let pvc = json!({"apiVersion":"v1","kind":"PersistentVolumeClaim",
        "metadata":{"name":"data","namespace":"shop","uid":"u","resourceVersion":"9",
            "annotations":{"pv.kubernetes.io/bind-completed":"yes","keep":"me"}},
        "spec":{"storageClassName":"fast","volumeName":"pv-1"},"status":{"phase":"Bound"}});
    let o = out(&r, pvc);
    assert_eq!(o.pointer("/metadata/namespace"), Some(&json!("shop-dr")));
    assert_eq!(
        o.pointer("/spec/storageClassName"),
        Some(&json!("standard"))
    );
    assert!(o.pointer("/spec/volumeName").is_none() && o.get("status").is_none());
    assert!(o.pointer("/metadata/uid").is_none());
    assert_eq!(
        o.pointer("/metadata/annotations"),
        Some(&json!({"keep":"me"}))
    );
    let headless = json!({"apiVersion":"v1","kind":"Service","metadata":{"name":"db"},"spec":{"clusterIP":"None"}});
    assert_eq!(
        out(&r, headless).pointer("/spec/clusterIP"),
        Some(&json!("None"))
    );
    let ev = json!({"apiVersion":"v1","kind":"Event","metadata":{"name":"e"}});
    assert_eq!(
        r.transform(&ev).unwrap(),
        Verdict::LeaveOut("owned by the cluster".to_string())
    );
    let sc =
        json!({"apiVersion":"storage.k8s.io/v1","kind":"StorageClass","metadata":{"name":"fast"}});
    assert!(
        matches!(r.transform(&sc).unwrap(), Verdict::LeaveOut(why) if why.contains("standard"))
    );
}

#[test]
fn node_ports_stay_only_when_the_user_set_them() {
    let last = json!({"spec":{"ports":[{"port":80,"nodePort":30080}]}}).to_string();
    let svc = json!({"apiVersion":"v1","kind":"Service","metadata":{"name":"web",
            "annotations":{"kubectl.kubernetes.io/last-applied-configuration": last}},
        "spec":{"type":"NodePort","clusterIP":"10.0.0.7","clusterIPs":["10.0.0.7"],
            "ports":[{"port":80,"nodePort":30080},{"port":443,"nodePort":31443}]}});
    let o = out(&Rules::default(), svc);
    assert_eq!(o.pointer("/spec/ports/0/nodePort"), Some(&json!(30080)));
    assert!(o.pointer("/spec/ports/1/nodePort").is_none());
    assert!(o.pointer("/spec/clusterIP").is_none() && o.pointer("/spec/clusterIPs").is_none());
}

#[test]
fn stripping_leaves_no_empty_maps() {
    let bound = json!({"apiVersion":"v1","kind":"PersistentVolumeClaim",
        "metadata":{"name":"d","annotations":{"pv.kubernetes.io/bind-completed":"yes"}},"spec":{}});
    let o = out(&Rules::default(), bound);
    assert!(o.pointer("/metadata/annotations").is_none(), "{o}");
}

#[test]
fn images_replicas_labels_and_patches() {
    let r = rules(
        r#"
images:
  - {from: registry.shop.example, to: mirror.dr.example/shop}
  - {from: docker.io/library, to: mirror.dr.example/hub}
replicas:
  - replicas: 0
  - replicas: 2
    match: {kind: Deployment, name: "api-*"}
labels:
  - add: {understudy.io/restored: "true"}
    remove: [tier]
annotations:
  - add: {note: drill}
    match: {labelSelector: {matchLabels: {app: shop}}}
patches:
  - name: smaller
    match: {group: apps, kind: Deployment, namespace: "sh*"}
    ops:
      - {op: replace, path: /spec/template/spec/containers/0/resources/limits/memory, value: 128Mi}
"#,
    );
    let dep = |name: &str| {
        json!({"apiVersion":"apps/v1","kind":"Deployment",
            "metadata":{"name":name,"namespace":"shop","labels":{"app":"shop","tier":"web"}},
            "spec":{"replicas":3,"template":{"spec":{
                "initContainers":[{"name":"i","image":"busybox:1.36"}],
                "containers":[{"name":"c","image":"registry.shop.example/web:1.2",
                    "resources":{"limits":{"memory":"1Gi"}}},
                    {"name":"d","image":"registry.shop.example.evil/x:1"}]}}}})
    };
    let o = out(&r, dep("web"));
    assert_eq!(o.pointer("/spec/replicas"), Some(&json!(0)));
    let c = "/spec/template/spec/containers";
    assert_eq!(
        o.pointer(&format!("{c}/0/image")),
        Some(&json!("mirror.dr.example/shop/web:1.2"))
    );
    assert_eq!(
        o.pointer(&format!("{c}/1/image")),
        Some(&json!("registry.shop.example.evil/x:1"))
    );
    assert_eq!(
        o.pointer("/spec/template/spec/initContainers/0/image"),
        Some(&json!("mirror.dr.example/hub/busybox:1.36"))
    );
    assert_eq!(
        o.pointer(&format!("{c}/0/resources/limits/memory")),
        Some(&json!("128Mi"))
    );
    assert_eq!(
        o.pointer("/metadata/labels"),
        Some(&json!({"app":"shop","understudy.io/restored":"true"}))
    );
    assert_eq!(
        o.pointer("/metadata/annotations/note"),
        Some(&json!("drill"))
    );
    assert_eq!(
        out(&r, dep("api-1")).pointer("/spec/replicas"),
        Some(&json!(2))
    );
    // A patch whose path does not exist on a matching object names the rule and the object.
    let bare = json!({"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"x","namespace":"shop"},"spec":{}});
    let e = format!("{:#}", r.transform(&bare).unwrap_err());
    assert!(
        e.contains("patches[0] (smaller)") && e.contains("Deployment.apps shop/x"),
        "{e}"
    );
}

#[test]
fn bad_rules_name_the_rule() {
    let e = err("patches:\n  - name: p\n    ops: [{op: repalce, path: /a, value: 1}]\n");
    assert!(e.contains("patches[0] (p)") && e.contains("repalce"), "{e}");
    let e = err("patches:\n  - ops: [{op: add, path: nope, value: 1}]\n");
    assert!(e.contains("patches[0]") && e.contains("ops[0]"), "{e}");
    let e = err(
        "replicas:\n  - replicas: 0\n    match: {labelSelector: {matchExpressions: [{key: a, operator: Sometimes}]}}\n",
    );
    assert!(
        e.contains("replicas[0]") && e.contains("label selector"),
        "{e}"
    );
    let e = err("images:\n  - {from: a, to: b, match: {name: \"[\"}}\n");
    assert!(e.contains("images[0]") && e.contains("glob"), "{e}");
    let e = err("namespaces: {a: b}\nstorageClass: {}\n");
    assert!(e.contains("unknown field `storageClass`"), "{e}");
    let e = err("strip: {paths: [spec/x]}\n");
    assert!(e.contains("strip.paths[0]"), "{e}");
}

#[test]
fn strip_paths_and_defaults_off() {
    let r = rules("strip:\n  defaults: false\n  paths: [/spec/x, /metadata/annotations/a~1b]\n");
    let o = out(
        &r,
        json!({"apiVersion":"v1","kind":"ConfigMap",
        "metadata":{"name":"c","uid":"u","annotations":{"a/b":"1"}},"spec":{"x":1,"y":2}}),
    );
    assert_eq!(
        o,
        json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c","uid":"u"},"spec":{"y":2}})
    );
}

#[test]
fn namespaces_map_everywhere_they_appear() {
    let r = rules("namespaces: {shop: shop-dr}\n");
    let ns = out(
        &r,
        json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name":"shop",
        "labels":{"kubernetes.io/metadata.name":"shop"}}}),
    );
    assert_eq!(
        ns,
        json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name":"shop-dr"}})
    );
    let rb = out(
        &r,
        json!({"apiVersion":"rbac.authorization.k8s.io/v1","kind":"RoleBinding",
        "metadata":{"name":"b","namespace":"shop"},"subjects":[{"kind":"ServiceAccount","name":"s","namespace":"shop"}]}),
    );
    assert_eq!(rb.pointer("/subjects/0/namespace"), Some(&json!("shop-dr")));
    let pv = out(
        &r,
        json!({"apiVersion":"v1","kind":"PersistentVolume","metadata":{"name":"pv"},
        "spec":{"claimRef":{"namespace":"shop","name":"d","uid":"x"}}}),
    );
    assert_eq!(
        pv.pointer("/spec/claimRef"),
        Some(&json!({"namespace":"shop-dr","name":"d"}))
    );
}

#[test]
fn namespace_references_in_policies_webhooks_and_custom_resources_are_mapped() {
    let r = rules(
        r#"
namespaces: {shop: shop-dr, infra: infra-dr}
namespacePaths:
  - match: {group: example.com, kind: Backup}
    paths: [/spec/targetNamespace, /spec/sources/*/namespace]
"#,
    );
    let np = out(
        &r,
        json!({"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"p","namespace":"shop"},
        "spec":{"ingress":[{"from":[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"infra"}}},
            {"namespaceSelector":{"matchExpressions":[{"key":"kubernetes.io/metadata.name","operator":"In","values":["shop","other"]},
                {"key":"team","operator":"In","values":["shop"]}]}}]}],
            "egress":[{"to":[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"shop"}}}]}]}}),
    );
    let from = "/spec/ingress/0/from";
    assert_eq!(
        np.pointer(&format!(
            "{from}/0/namespaceSelector/matchLabels/kubernetes.io~1metadata.name"
        )),
        Some(&json!("infra-dr"))
    );
    assert_eq!(
        np.pointer(&format!(
            "{from}/1/namespaceSelector/matchExpressions/0/values"
        )),
        Some(&json!(["shop-dr", "other"]))
    );
    // Another label's values are not namespace names.
    assert_eq!(
        np.pointer(&format!(
            "{from}/1/namespaceSelector/matchExpressions/1/values"
        )),
        Some(&json!(["shop"]))
    );
    assert_eq!(
        np.pointer(
            "/spec/egress/0/to/0/namespaceSelector/matchLabels/kubernetes.io~1metadata.name"
        ),
        Some(&json!("shop-dr"))
    );
    let hook = out(
        &r,
        json!({"apiVersion":"admissionregistration.k8s.io/v1","kind":"ValidatingWebhookConfiguration",
        "metadata":{"name":"v"},"webhooks":[{"name":"a.example.com",
            "clientConfig":{"service":{"namespace":"shop","name":"hooks"}}}]}),
    );
    assert_eq!(
        hook.pointer("/webhooks/0/clientConfig/service/namespace"),
        Some(&json!("shop-dr"))
    );
    let crd = out(
        &r,
        json!({"apiVersion":"apiextensions.k8s.io/v1","kind":"CustomResourceDefinition","metadata":{"name":"x.example.com"},
        "spec":{"conversion":{"strategy":"Webhook","webhook":{"clientConfig":{"service":{"namespace":"infra","name":"conv"}}}}}}),
    );
    assert_eq!(
        crd.pointer("/spec/conversion/webhook/clientConfig/service/namespace"),
        Some(&json!("infra-dr"))
    );
    let backup = out(
        &r,
        json!({"apiVersion":"example.com/v1","kind":"Backup","metadata":{"name":"b","namespace":"shop"},
        "spec":{"targetNamespace":"shop","sources":[{"namespace":"infra"},{"namespace":"elsewhere"}]}}),
    );
    assert_eq!(
        backup.pointer("/spec/targetNamespace"),
        Some(&json!("shop-dr"))
    );
    assert_eq!(
        backup.pointer("/spec/sources"),
        Some(&json!([{"namespace":"infra-dr"},{"namespace":"elsewhere"}]))
    );
    assert!(
        err("namespacePaths: [{match: {kind: X}, paths: [spec/x]}]").contains("namespacePaths[0]")
    );
}

#[test]
fn generated_fields_of_jobs_tokens_roles_and_pods_are_stripped() {
    let r = Rules::default();
    let job = out(
        &r,
        json!({"apiVersion":"batch/v1","kind":"Job","metadata":{"name":"migrate","namespace":"shop",
            "labels":{"controller-uid":"u1","batch.kubernetes.io/controller-uid":"u1","job-name":"migrate","app":"shop"}},
        "spec":{"selector":{"matchLabels":{"batch.kubernetes.io/controller-uid":"u1"}},
            "template":{"metadata":{"labels":{"controller-uid":"u1","batch.kubernetes.io/controller-uid":"u1",
                "job-name":"migrate","batch.kubernetes.io/job-name":"migrate","app":"shop"}},"spec":{}}}}),
    );
    assert!(job.pointer("/spec/selector").is_none(), "{job}");
    assert_eq!(
        job.pointer("/spec/template/metadata/labels"),
        Some(&json!({"app":"shop"}))
    );
    let manual = json!({"apiVersion":"batch/v1","kind":"Job","metadata":{"name":"m"},
        "spec":{"manualSelector":true,"selector":{"matchLabels":{"job-name":"m"}},
            "template":{"metadata":{"labels":{"job-name":"m"}}}}});
    assert_eq!(
        out(&r, manual.clone()).pointer("/spec"),
        manual.pointer("/spec")
    );
    let token = out(
        &r,
        json!({"apiVersion":"v1","kind":"Secret","type":"kubernetes.io/service-account-token",
        "metadata":{"name":"ci","namespace":"shop","annotations":{"kubernetes.io/service-account.name":"app",
            "kubernetes.io/service-account.uid":"primary-uid"}},
        "data":{"token":"cHJpbWFyeQ==","ca.crt":"Y2E=","namespace":"c2hvcA=="}}),
    );
    assert!(token.get("data").is_none(), "{token}");
    assert_eq!(
        token.pointer("/metadata/annotations"),
        Some(&json!({"kubernetes.io/service-account.name":"app"}))
    );
    let aggregated = out(
        &r,
        json!({"apiVersion":"rbac.authorization.k8s.io/v1","kind":"ClusterRole","metadata":{"name":"shop-all"},
        "aggregationRule":{"clusterRoleSelectors":[{"matchLabels":{"shop/aggregate":"true"}}]},
        "rules":[{"verbs":["get"],"apiGroups":[""],"resources":["pods"]}]}),
    );
    assert!(aggregated.get("rules").is_none() && aggregated.get("aggregationRule").is_some());
    let pod = out(
        &r,
        json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","namespace":"shop"},
        "spec":{"nodeName":"n1","serviceAccount":"app","serviceAccountName":"app",
            "volumes":[{"name":"kube-api-access-x7k2p","projected":{}},{"name":"data","emptyDir":{}}],
            "containers":[{"name":"c","volumeMounts":[{"name":"kube-api-access-x7k2p","mountPath":"/var/run/secrets"},
                {"name":"data","mountPath":"/data"}]}]}}),
    );
    assert_eq!(
        pod.pointer("/spec"),
        Some(
            &json!({"serviceAccountName":"app","volumes":[{"name":"data","emptyDir":{}}],
            "containers":[{"name":"c","volumeMounts":[{"name":"data","mountPath":"/data"}]}]})
        )
    );
}

#[test]
fn legacy_storage_class_annotations_are_mapped() {
    let r = rules("storageClasses: {fast: standard}\n");
    let legacy = "volume.beta.kubernetes.io~1storage-class";
    let pvc = out(
        &r,
        json!({"apiVersion":"v1","kind":"PersistentVolumeClaim","metadata":{"name":"d",
        "annotations":{"volume.beta.kubernetes.io/storage-class":"fast"}},"spec":{}}),
    );
    assert_eq!(
        pvc.pointer(&format!("/metadata/annotations/{legacy}")),
        Some(&json!("standard"))
    );
    let sts = out(
        &r,
        json!({"apiVersion":"apps/v1","kind":"StatefulSet","metadata":{"name":"db"},
        "spec":{"volumeClaimTemplates":[{"metadata":{"name":"data",
            "annotations":{"volume.beta.kubernetes.io/storage-class":"fast"}},"spec":{}}]}}),
    );
    assert_eq!(
        sts.pointer(&format!(
            "/spec/volumeClaimTemplates/0/metadata/annotations/{legacy}"
        )),
        Some(&json!("standard"))
    );
}

#[test]
fn a_registry_rule_does_not_match_the_same_host_on_another_port() {
    let r = rules(
        "images: [{from: registry.shop.example, to: registry.dr.example}, {from: docker.io/library/nginx, to: mirror.dr/nginx}]\n",
    );
    let rewritten = |image: &str| r.images.iter().find_map(|rule| rewrite_image(image, rule));
    assert_eq!(
        rewritten("registry.shop.example/web:1"),
        Some("registry.dr.example/web:1".into())
    );
    assert_eq!(rewritten("registry.shop.example:5000/web:1"), None);
    assert_eq!(rewritten("nginx:1.27"), Some("mirror.dr/nginx:1.27".into()));
    assert_eq!(
        rewritten("nginx@sha256:00"),
        Some("mirror.dr/nginx@sha256:00".into())
    );
    assert_eq!(rewritten("nginx-unprivileged:1"), None);
}

#[test]
fn cluster_owned_objects_and_system_namespaces_are_left_out() {
    let r = rules("namespaces: {shop: default}\n");
    let left_out = |obj: Value| matches!(r.transform(&obj).unwrap(), Verdict::LeaveOut(_));
    assert!(left_out(
        json!({"apiVersion":"rbac.authorization.k8s.io/v1","kind":"ClusterRole",
        "metadata":{"name":"view","labels":{"kubernetes.io/bootstrapping":"rbac-defaults"}}})
    ));
    assert!(left_out(
        json!({"apiVersion":"v1","kind":"Service","metadata":{"name":"kubernetes","namespace":"default"}})
    ));
    assert!(left_out(
        json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name":"shop"}})
    ));
    assert!(left_out(
        json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name":"kube-system"}})
    ));
    assert!(left_out(
        json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c","namespace":"shop",
        "deletionTimestamp":"2026-12-01T00:00:00Z"}})
    ));
    assert!(!left_out(
        json!({"apiVersion":"v1","kind":"Namespace","metadata":{"name":"shop-2"}})
    ));
}

#[test]
fn inert_covers_every_workload_kind() {
    let r = rules("inert: true\nreplicas: [{replicas: 3}]\n");
    let spec = |api: &str, kind: &str, spec: Value| json!({"apiVersion":api,"kind":kind,"metadata":{"name":"w","namespace":"shop"},"spec":spec});
    let pod_template = json!({"template":{"spec":{"containers":[]}}});
    for kind in ["Deployment", "StatefulSet", "ReplicaSet"] {
        let o = out(&r, spec("apps/v1", kind, pod_template.clone()));
        assert_eq!(o.pointer("/spec/replicas"), Some(&json!(0)), "{kind}");
    }
    let cron = out(
        &r,
        spec(
            "batch/v1",
            "CronJob",
            json!({"schedule":"* * * * *","suspend":false}),
        ),
    );
    assert_eq!(cron.pointer("/spec/suspend"), Some(&json!(true)));
    let job = out(&r, spec("batch/v1", "Job", pod_template.clone()));
    assert_eq!(job.pointer("/spec/suspend"), Some(&json!(true)));
    let ds = out(&r, spec("apps/v1", "DaemonSet", pod_template.clone()));
    assert_eq!(
        ds.pointer("/spec/template/spec/nodeSelector"),
        Some(&json!({"understudy.io/inert-standby":"true"}))
    );
    let pod = json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","namespace":"shop"},"spec":{}});
    assert!(
        matches!(r.transform(&pod).unwrap(), Verdict::LeaveOut(why) if why.contains("failover"))
    );
    let hook = out(
        &r,
        json!({"apiVersion":"admissionregistration.k8s.io/v1","kind":"MutatingWebhookConfiguration",
        "metadata":{"name":"m"},"webhooks":[{"name":"a","failurePolicy":"Fail"},{"name":"b"}]}),
    );
    assert_eq!(
        hook.pointer("/webhooks/0/failurePolicy"),
        Some(&json!("Ignore"))
    );
    assert_eq!(
        hook.pointer("/webhooks/1/failurePolicy"),
        Some(&json!("Ignore"))
    );
    // Without inert the same objects run as captured.
    let live = rules("replicas: [{replicas: 3}]\n");
    let d = out(&live, spec("apps/v1", "Deployment", pod_template));
    assert_eq!(d.pointer("/spec/replicas"), Some(&json!(3)));
    assert!(matches!(live.transform(&pod).unwrap(), Verdict::Apply(_)));
}

#[test]
fn diff_shows_what_changes() {
    let r = rules("namespaces: {shop: shop-dr}\nreplicas: [{replicas: 0}]\n");
    let b = Bundle::from_objects(&[
        json!({"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"web","namespace":"shop","uid":"u"},"spec":{"replicas":3}}),
        json!({"apiVersion":"v1","kind":"Event","metadata":{"name":"e","namespace":"shop"}}),
        json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"}}),
    ])
    .unwrap();
    let d = render_diff(&b, &r).unwrap();
    assert!(
        d.contains("=== Deployment.apps shop/web -> Deployment.apps shop-dr/web"),
        "{d}"
    );
    assert!(d.contains("-  replicas: 3\n+  replicas: 0\n"), "{d}");
    assert!(d.contains("-  uid: u\n"), "{d}");
    assert!(
        d.contains("=== Event shop/e: left out (owned by the cluster)"),
        "{d}"
    );
    assert!(d.contains("=== ConfigMap c: unchanged"), "{d}");
}

proptest::proptest! {
    #[test]
    fn any_rules_text_is_accepted_or_refused_without_panic(text in "\\PC{0,400}") {
        let _ = Rules::parse(&text);
    }

    #[test]
    fn rules_shaped_text_never_panics(
        section in proptest::sample::select(vec!["patches", "replicas", "images", "labels", "strip", "namespaces"]),
        body in "[ -~\n]{0,200}",
    ) {
        let _ = Rules::parse(&format!("{section}:\n  - {body}\n"));
    }
}
