//! The inert standby (`inert: true`, `--inert`): the application's objects exist on the standby
//! but nothing of it runs, and nothing of it blocks the standby, until a failover applies the same
//! bundle without it. With server-side apply that undoes every change below: the fields were set
//! by the same field manager, so an apply that no longer sets them restores the captured values
//! (and drops the node selector key).
//!
//! | kind | inert |
//! |---|---|
//! | Deployment, StatefulSet, ReplicaSet, ReplicationController | `spec.replicas: 0` |
//! | CronJob, Job | `spec.suspend: true` |
//! | DaemonSet | a node selector no node matches ([`INERT_NODE_LABEL`]) |
//! | bare Pod | left out (a Pod runs as soon as it exists) |
//! | admission webhooks | `failurePolicy: Ignore` (their backends do not run) |

use crate::bundle::ObjectId;
use serde_json::Value;

/// The node label an inert DaemonSet's pods require; no node has it.
pub const INERT_NODE_LABEL: &str = "understudy.io/inert-standby";

/// Makes one (transformed) object inert; objects of other kinds are left as they are.
pub(super) fn make_inert(id: &ObjectId, obj: &mut Value) {
    let set = |obj: &mut Value, path: &str, key: &str, v: Value| {
        if let Some(Value::Object(m)) = obj.pointer_mut(path) {
            m.insert(key.into(), v);
        }
    };
    match (id.group.as_str(), id.kind.as_str()) {
        ("apps", "Deployment" | "StatefulSet" | "ReplicaSet") | ("", "ReplicationController") => {
            set(obj, "/spec", "replicas", Value::from(0))
        }
        ("batch", "CronJob" | "Job") => set(obj, "/spec", "suspend", Value::Bool(true)),
        ("apps", "DaemonSet") => {
            if let Some(Value::Object(pod)) = obj.pointer_mut("/spec/template/spec") {
                let selector = pod
                    .entry("nodeSelector")
                    .or_insert_with(|| Value::Object(Default::default()));
                if let Some(m) = selector.as_object_mut() {
                    m.insert(INERT_NODE_LABEL.into(), "true".into());
                }
            }
        }
        (
            "admissionregistration.k8s.io",
            "ValidatingWebhookConfiguration" | "MutatingWebhookConfiguration",
        ) => {
            if let Some(Value::Array(hooks)) = obj.pointer_mut("/webhooks") {
                for h in hooks {
                    set(h, "", "failurePolicy", "Ignore".into());
                }
            }
        }
        _ => {}
    }
}
