//! The objects a cycle makes besides snapshots: per volume, a PVC restored from its snapshot in
//! Block mode, the Secret holding its mover's ticket, and the mover pod. All carry the cycle's
//! labels ([`super::scope::labels`]), and an owner reference to the group where they share
//! its namespace, so that cleanup finds them and nothing outlives the group.

use super::scope::Member;
use crate::mover::{MoverReport, MoverTicket};
use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use std::collections::BTreeMap;
use understudy_kube::crd::replication_group::ReplicationGroup;

/// Where the mover reads its volume.
pub const DEVICE_PATH: &str = "/dev/understudy-volume";
/// Key of the ticket in its Secret.
pub const TICKET_KEY: &str = "ticket.json";

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

/// Creates `obj` unless one of its name exists.
pub async fn create_once<K>(api: &Api<K>, obj: &K) -> Result<()>
where
    K: Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
    <K as Resource>::DynamicType: Default,
{
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e).with_context(|| {
            format!(
                "cannot create {} {}",
                K::kind(&Default::default()),
                obj.meta().name.clone().unwrap_or_default()
            )
        }),
    }
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

/// The Secret holding a mover's ticket (its key for this cut among it).
pub fn ticket_secret(
    namespace: &str,
    name: &str,
    ticket: &MoverTicket,
    labels: &BTreeMap<String, String>,
    owners: Option<Vec<OwnerReference>>,
) -> Result<Secret> {
    let v = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "ownerReferences": owners},
        "type": "Opaque",
        "stringData": {TICKET_KEY: serde_json::to_string(ticket)?},
    });
    Ok(serde_json::from_value(v)?)
}

/// Reads the ticket back from its Secret.
pub fn ticket_of(secret: &Secret) -> Result<MoverTicket> {
    let raw = secret
        .data
        .as_ref()
        .and_then(|d| d.get(TICKET_KEY))
        .with_context(|| format!("Secret {} holds no {TICKET_KEY}", secret.name_any()))?;
    serde_json::from_slice(&raw.0)
        .with_context(|| format!("Secret {} holds no mover ticket", secret.name_any()))
}

/// The mover pod: not privileged; the volume as a block device, the ticket as a file, scratch
/// space for the frames it sends; its report as the termination message.
pub fn mover_pod(
    namespace: &str,
    name: &str,
    image: &str,
    labels: &BTreeMap<String, String>,
    owners: Option<Vec<OwnerReference>>,
) -> Result<Pod> {
    let v = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "ownerReferences": owners},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "containers": [{
                "name": "mover",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["/bin/source-agent", "mover", "--ticket", "/ticket/ticket.json",
                            "--device", DEVICE_PATH, "--report", "/dev/termination-log"],
                "volumeDevices": [{"name": "data", "devicePath": DEVICE_PATH}],
                "volumeMounts": [{"name": "ticket", "mountPath": "/ticket", "readOnly": true}],
                "securityContext": {"runAsUser": 0, "allowPrivilegeEscalation": false, "privileged": false},
                "terminationMessagePolicy": "File",
            }],
            "volumes": [
                {"name": "data", "persistentVolumeClaim": {"claimName": name}},
                {"name": "ticket", "secret": {"secretName": name}}
            ],
        }
    });
    Ok(serde_json::from_value(v)?)
}

/// Where a mover pod is.
#[derive(Debug)]
pub enum MoverState {
    /// Not created yet.
    Absent,
    /// Created, not ended.
    Running,
    /// Ended well, with its report.
    Done(Box<MoverReport>),
    /// Failed, with what it said.
    Failed(String),
}

/// The state of mover pod `name`.
pub async fn mover_state(pods: &Api<Pod>, name: &str) -> Result<MoverState> {
    let Some(pod) = pods.get_opt(name).await? else {
        return Ok(MoverState::Absent);
    };
    let status = pod.status.unwrap_or_default();
    let terminated = status
        .container_statuses
        .iter()
        .flatten()
        .find_map(|c| c.state.as_ref().and_then(|s| s.terminated.clone()));
    let message = terminated
        .as_ref()
        .and_then(|t| t.message.clone())
        .unwrap_or_default();
    match status.phase.as_deref() {
        Some("Succeeded") => {
            let report: MoverReport = serde_json::from_str(message.trim()).with_context(|| {
                format!("mover pod {name} ended without a report (termination message {message:?})")
            })?;
            Ok(MoverState::Done(Box::new(report)))
        }
        Some("Failed") => {
            let why = if message.is_empty() {
                status.message.unwrap_or_else(|| "no message".into())
            } else {
                message
            };
            Ok(MoverState::Failed(why))
        }
        _ => Ok(MoverState::Running),
    }
}

/// Deletes every object of kind `K` in `namespace` that `selector` matches; returns how many
/// were still there.
pub async fn delete_matching<K>(client: &Client, namespace: &str, selector: &str) -> Result<usize>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    <K as Resource>::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let list = api
        .list(&ListParams::default().labels(selector))
        .await
        .with_context(|| {
            format!(
                "cannot list {} in {namespace}",
                K::kind(&Default::default())
            )
        })?;
    let n = list.items.len();
    for o in list.items {
        let name = o.name_any();
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => bail!(
                "cannot delete {} {namespace}/{name}: {e}",
                K::kind(&Default::default())
            ),
        }
    }
    Ok(n)
}
