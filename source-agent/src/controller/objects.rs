//! The objects a cycle makes besides snapshots: per volume, a PVC restored from its snapshot in
//! Block mode, the Secret holding its mover's ticket, and the mover pod. All carry the cycle's
//! labels ([`super::scope::labels`]), and an owner reference to the group where they share
//! its namespace, so that cleanup finds them and nothing outlives the group.

use super::scope::Member;
use crate::mover::MoverReport;
use anyhow::Result;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::Api;
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;
use understudy_kube::crd::replication_group::ReplicationGroup;

pub use understudy_kube::agent_pods::{
    DEVICE_PATH, PodState, TICKET_PATH, create_once, delete_matching, ticket_of, ticket_secret,
};
use understudy_kube::agent_pods::{WorkerPod, pod_state};

/// Name of a cycle's object for volume `i`: `us-<stage>-<i>` (a DNS label).
pub fn object_name(stage: &str, i: usize) -> String {
    format!("us-{stage}-{i}")
}

/// Owner references to the group for an object in `namespace` (none in another namespace:
/// Kubernetes allows owners in the same namespace only; cleanup finds those by label).
pub fn owners(rg: &ReplicationGroup, namespace: &str) -> Option<Vec<OwnerReference>> {
    (rg.namespace().as_deref() == Some(namespace))
        .then(|| rg.controller_owner_ref(&()).into_iter().collect())
}

/// The PVC a mover reads: restored from `snapshot`, in Block mode, at least `size` big.
pub fn restored_pvc(
    m: &Member,
    name: &str,
    snapshot: &str,
    size: &str,
    labels: &BTreeMap<String, String>,
    owners: Option<Vec<OwnerReference>>,
) -> Result<PersistentVolumeClaim> {
    let v = serde_json::json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": m.namespace, "labels": labels, "ownerReferences": owners},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "volumeMode": "Block",
            "storageClassName": m.storage_class,
            "resources": {"requests": {"storage": size}},
            "dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": snapshot},
        }
    });
    Ok(serde_json::from_value(v)?)
}

/// The mover pod ([`WorkerPod`]): it reads its PVC (restored from the snapshot, same name) and
/// stages it as its ticket says.
pub fn mover_pod(
    namespace: &str,
    name: &str,
    image: &str,
    labels: &BTreeMap<String, String>,
    owners: Option<Vec<OwnerReference>>,
) -> Result<Pod> {
    let command = [
        "/bin/source-agent",
        "mover",
        "--ticket",
        TICKET_PATH,
        "--device",
        DEVICE_PATH,
        "--report",
        "/dev/termination-log",
    ];
    WorkerPod {
        namespace,
        name,
        role: "mover",
        image,
        command: command.map(String::from).to_vec(),
        claim: name,
        secret: name,
        labels,
        owners,
    }
    .build()
}

/// Where a mover pod is.
pub type MoverState = PodState<MoverReport>;

/// The state of mover pod `name`.
pub async fn mover_state(pods: &Api<Pod>, name: &str) -> Result<MoverState> {
    pod_state(pods, name).await
}
