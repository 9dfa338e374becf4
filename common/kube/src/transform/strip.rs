//! The default strip: fields the source cluster owns or generates, which must not travel to the
//! standby (peer practice, ../shared/k8s-apis.md).

use serde_json::Value;

/// Kinds the cluster owns or regenerates: never applied on the standby.
pub const SKIPPED_KINDS: &[(&str, &str)] = &[
    ("", "Event"),
    ("events.k8s.io", "Event"),
    ("", "Endpoints"),
    ("discovery.k8s.io", "EndpointSlice"),
    ("coordination.k8s.io", "Lease"),
    ("", "Node"),
    ("storage.k8s.io", "CSIStorageCapacity"),
];

/// Metadata fields the cluster sets.
const METADATA: &[&str] = &[
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
    "generateName",
    "managedFields",
    "ownerReferences",
    // Finalizers belong to the source's controllers; the standby's add their own.
    "finalizers",
];

/// Annotations controllers write.
const ANNOTATIONS: &[&str] = &[
    "deployment.kubernetes.io/revision",
    "pv.kubernetes.io/bind-completed",
    "pv.kubernetes.io/bound-by-controller",
    "pv.kubernetes.io/provisioned-by",
    "volume.beta.kubernetes.io/storage-provisioner",
    "volume.kubernetes.io/storage-provisioner",
    "volume.kubernetes.io/selected-node",
];

/// Labels the API server or controllers write.
const LABELS: &[&str] = &[
    "kubernetes.io/metadata.name",
    "controller-uid",
    "batch.kubernetes.io/controller-uid",
    // The source's apply tool's ApplySet membership; the standby's apply records its own.
    "applyset.kubernetes.io/part-of",
];

/// Labels the API server puts on a Job's pod template when it generates the Job's selector.
const JOB_TEMPLATE_LABELS: &[&str] = &[
    "controller-uid",
    "batch.kubernetes.io/controller-uid",
    "job-name",
    "batch.kubernetes.io/job-name",
];

/// Removes the cluster-owned fields of one object of kind `kind`.
pub fn strip_defaults(kind: &str, obj: &mut Value) {
    if let Some(Value::Object(m)) = obj.get_mut("metadata") {
        for f in METADATA {
            m.remove(*f);
        }
    }
    if let Some(o) = obj.as_object_mut() {
        o.remove("status");
    }
    for a in ANNOTATIONS {
        remove(obj, &["metadata", "annotations", a]);
    }
    for l in LABELS {
        remove(obj, &["metadata", "labels", l]);
    }
    match kind {
        "Service" => strip_service(obj),
        "PersistentVolumeClaim" => remove(obj, &["spec", "volumeName"]),
        "PersistentVolume" => {
            remove(obj, &["spec", "claimRef", "uid"]);
            remove(obj, &["spec", "claimRef", "resourceVersion"]);
        }
        "Pod" => strip_pod(obj),
        "Job" => strip_job(obj),
        "Secret" => strip_token_secret(obj),
        "ClusterRole" => strip_aggregated_rules(obj),
        _ => {}
    }
}

/// A Job's selector and the template labels that go with it are generated from the Job's uid
/// (unless the user chose them: `manualSelector: true`); the standby generates its own, and the
/// selector is immutable, so a copied one makes every later apply fail.
fn strip_job(obj: &mut Value) {
    if obj.pointer("/spec/manualSelector") == Some(&Value::Bool(true)) {
        return;
    }
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    remove(obj, &["spec", "selector"]);
    if let Some(Value::Object(labels)) = obj.pointer_mut("/spec/template/metadata/labels") {
        labels.retain(|k, v| {
            !(JOB_TEMPLATE_LABELS.contains(&k.as_str())
                && (k.ends_with("controller-uid") || v.as_str() == Some(name.as_str())))
        });
    }
}

/// A long-lived service-account token Secret: the token, CA and uid are the source cluster's;
/// the standby's token controller fills in its own when the Secret arrives without them.
fn strip_token_secret(obj: &mut Value) {
    if obj.get("type").and_then(Value::as_str) != Some("kubernetes.io/service-account-token") {
        return;
    }
    remove(obj, &["data"]);
    remove(obj, &["stringData"]);
    remove(
        obj,
        &[
            "metadata",
            "annotations",
            "kubernetes.io/service-account.uid",
        ],
    );
}

/// The rules of an aggregated ClusterRole are written by the cluster's aggregation controller.
fn strip_aggregated_rules(obj: &mut Value) {
    if obj.get("aggregationRule").is_some() {
        remove(obj, &["rules"]);
    }
}

/// A bare Pod: the node it ran on, and what admission injected: the service-account token volume
/// (`kube-api-access-*`) and its mounts, and the deprecated `serviceAccount` alias. The standby's
/// admission injects its own; a copied one makes every later apply fail (a Pod's volumes are
/// immutable).
fn strip_pod(obj: &mut Value) {
    remove(obj, &["spec", "nodeName"]);
    remove(obj, &["spec", "serviceAccount"]);
    let injected = |name: Option<&str>| name.is_some_and(|n| n.starts_with("kube-api-access-"));
    if let Some(Value::Array(volumes)) = obj.pointer_mut("/spec/volumes") {
        volumes.retain(|v| !injected(v.get("name").and_then(Value::as_str)));
    }
    for list in ["initContainers", "containers", "ephemeralContainers"] {
        let Some(Value::Array(cs)) = obj.pointer_mut(&format!("/spec/{list}")) else {
            continue;
        };
        for c in cs {
            if let Some(Value::Array(mounts)) = c.get_mut("volumeMounts") {
                mounts.retain(|m| !injected(m.get("name").and_then(Value::as_str)));
            }
        }
    }
}

/// Cluster IPs are allocated per cluster (headless `None` is kept); node ports are kept only when
/// the user set them (they appear in kubectl's last-applied configuration), as Velero does.
fn strip_service(obj: &mut Value) {
    let headless = obj.pointer("/spec/clusterIP").and_then(Value::as_str) == Some("None");
    if !headless {
        remove(obj, &["spec", "clusterIP"]);
        remove(obj, &["spec", "clusterIPs"]);
    }
    remove(obj, &["spec", "healthCheckNodePort"]);
    let explicit = explicit_node_ports(obj);
    if let Some(Value::Array(ports)) = obj.pointer_mut("/spec/ports") {
        for p in ports {
            let np = p.get("nodePort").and_then(Value::as_i64);
            if np.is_some_and(|np| !explicit.contains(&np))
                && let Some(m) = p.as_object_mut()
            {
                m.remove("nodePort");
            }
        }
    }
}

fn explicit_node_ports(obj: &Value) -> Vec<i64> {
    let Some(last) = obj
        .pointer("/metadata/annotations/kubectl.kubernetes.io~1last-applied-configuration")
        .and_then(Value::as_str)
        .and_then(|s| serde_json::from_str::<Value>(s).ok())
    else {
        return Vec::new();
    };
    last.pointer("/spec/ports")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p.get("nodePort")?.as_i64())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes `path` (map keys) from `obj` if present.
pub(super) fn remove(obj: &mut Value, path: &[&str]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = obj;
    for p in parents {
        match cur.get_mut(*p) {
            Some(next) => cur = next,
            None => return,
        }
    }
    if let Some(m) = cur.as_object_mut() {
        m.remove(*last);
    }
}

/// Stripping can leave `annotations: {}` or `labels: {}` behind; drop them.
pub(super) fn drop_empty_metadata_maps(obj: &mut Value) {
    if let Some(Value::Object(m)) = obj.get_mut("metadata") {
        m.retain(|k, v| {
            !(matches!(k.as_str(), "annotations" | "labels")
                && v.as_object().is_some_and(|o| o.is_empty()))
        });
    }
}
