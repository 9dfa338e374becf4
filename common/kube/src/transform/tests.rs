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
