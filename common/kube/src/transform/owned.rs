//! Objects the cluster owns: built in, generated, or on their way out. They are never captured
//! and never written to the standby, whichever way a bundle was made (capture, a directory of
//! YAML, an older capture).

use super::strip::SKIPPED_KINDS;
use crate::bundle::ObjectId;
use serde_json::Value;

/// Namespaces every cluster has; the standby's own are never overwritten.
pub const SYSTEM_NAMESPACES: &[&str] =
    &["default", "kube-system", "kube-public", "kube-node-lease"];

/// The label Kubernetes puts on its bootstrap RBAC objects (`view`, `edit`, `system:*`, ...).
const BOOTSTRAP_LABEL: &str = "kubernetes.io/bootstrapping";

/// The label of an ApplySet parent (KEP-3659): one apply tool's record on its own cluster.
pub const APPLYSET_ID_LABEL: &str = "applyset.kubernetes.io/id";

/// Why `obj` (identity `id`) belongs to its cluster rather than to the application, if it does.
pub fn cluster_owned(id: &ObjectId, obj: &Value) -> Option<&'static str> {
    let s = |p: &str| obj.pointer(p).and_then(Value::as_str);
    if SKIPPED_KINDS.contains(&(id.group.as_str(), id.kind.as_str())) {
        return Some("owned by the cluster");
    }
    if obj.pointer("/metadata/deletionTimestamp").is_some() {
        return Some("being deleted on the source cluster");
    }
    if id.group == "rbac.authorization.k8s.io"
        && (s(&format!(
            "/metadata/labels/{}",
            pointer_key(BOOTSTRAP_LABEL)
        ))
        .is_some()
            || id.name.starts_with("system:"))
    {
        return Some("a built-in role of Kubernetes, which every cluster has");
    }
    if obj
        .pointer(&format!(
            "/metadata/labels/{}",
            pointer_key(APPLYSET_ID_LABEL)
        ))
        .is_some()
    {
        return Some("an ApplySet parent: the apply tool's record on its own cluster");
    }
    match (id.group.as_str(), id.kind.as_str(), id.name.as_str()) {
        ("", "Service", "kubernetes") if id.namespace == "default" => {
            Some("the cluster's own API server Service")
        }
        ("", "ConfigMap", "kube-root-ca.crt") => {
            Some("published by the cluster in every namespace")
        }
        ("", "Secret", _) if is_generated_token(obj) => {
            Some("service-account token the cluster generates")
        }
        _ => None,
    }
}

/// A legacy token Secret the cluster generated for a service account: `<sa>-token-<suffix>`.
fn is_generated_token(obj: &Value) -> bool {
    let s = |p: &str| obj.pointer(p).and_then(Value::as_str);
    s("/type") == Some("kubernetes.io/service-account-token")
        && s("/metadata/annotations/kubernetes.io~1service-account.name").is_some_and(|sa| {
            s("/metadata/name").is_some_and(|n| n.starts_with(&format!("{sa}-token-")))
        })
}

/// A map key as a JSON pointer segment (RFC 6901: `~` is `~0`, `/` is `~1`).
pub(crate) fn pointer_key(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn owned(obj: Value) -> Option<&'static str> {
        cluster_owned(&ObjectId::of(&obj).unwrap(), &obj)
    }

    #[test]
    fn built_in_generated_and_dying_objects_are_the_clusters() {
        let rbac = |kind: &str, name: &str, labels: Value| {
            json!({"apiVersion":"rbac.authorization.k8s.io/v1","kind":kind,
                "metadata":{"name":name,"labels":labels}})
        };
        let boot = json!({"kubernetes.io/bootstrapping":"rbac-defaults"});
        assert!(owned(rbac("ClusterRole", "view", boot.clone())).is_some());
        assert!(owned(rbac("ClusterRoleBinding", "system:basic-user", json!({}))).is_some());
        assert!(owned(rbac("ClusterRole", "shop-viewer", json!({"app":"shop"}))).is_none());
        let svc = |ns: &str| json!({"apiVersion":"v1","kind":"Service","metadata":{"name":"kubernetes","namespace":ns}});
        assert!(owned(svc("default")).is_some());
        assert!(owned(svc("shop")).is_none());
        let dying = json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c",
            "namespace":"shop","deletionTimestamp":"2026-01-01T00:00:00Z","finalizers":["x/y"]}});
        assert_eq!(owned(dying), Some("being deleted on the source cluster"));
        let parent = json!({"apiVersion":"v1","kind":"Secret","metadata":{"name":"p",
            "namespace":"shop","labels":{"applyset.kubernetes.io/id":"applyset-x-v1"}}});
        assert!(owned(parent).is_some());
        let token = json!({"apiVersion":"v1","kind":"Secret","type":"kubernetes.io/service-account-token",
            "metadata":{"name":"app-token-x7k2p","namespace":"shop",
                "annotations":{"kubernetes.io/service-account.name":"app"}}});
        assert!(owned(token).is_some());
        let mine = json!({"apiVersion":"v1","kind":"Secret","type":"kubernetes.io/service-account-token",
            "metadata":{"name":"ci-long-lived","namespace":"shop",
                "annotations":{"kubernetes.io/service-account.name":"app"}}});
        assert!(owned(mine).is_none());
    }
}
