//! The objects an agent's worker pods need, for the source's movers and the target's writers
//! alike: the Secret holding a worker's ticket (its key for one task among it), the pod that
//! runs it unprivileged with its volume as a block device, and the pod's outcome, read from its
//! termination message.

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;

/// Where a worker finds its volume.
pub const DEVICE_PATH: &str = "/dev/understudy-volume";
/// Key of the ticket in its Secret.
pub const TICKET_KEY: &str = "ticket.json";
/// Where a worker finds its ticket.
pub const TICKET_PATH: &str = "/ticket/ticket.json";

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

/// Deletes `name` (in the background); one that is not there is fine.
pub async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot delete {name}")),
    }
}

/// The Secret holding a worker's ticket.
pub fn ticket_secret<T: Serialize>(
    namespace: &str,
    name: &str,
    ticket: &T,
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
pub fn ticket_of<T: DeserializeOwned>(secret: &Secret) -> Result<T> {
    let raw = secret
        .data
        .as_ref()
        .and_then(|d| d.get(TICKET_KEY))
        .with_context(|| format!("Secret {} holds no {TICKET_KEY}", secret.name_any()))?;
    serde_json::from_slice(&raw.0)
        .with_context(|| format!("Secret {} holds no ticket of this agent", secret.name_any()))
}

/// A worker pod: its container's command, the claim it gets as [`DEVICE_PATH`] and the Secret
/// whose ticket it reads at [`TICKET_PATH`].
pub struct WorkerPod<'a> {
    /// Namespace (the claim's and the Secret's).
    pub namespace: &'a str,
    /// Pod name.
    pub name: &'a str,
    /// Container name (`mover`, `writer`).
    pub role: &'a str,
    /// The agents image.
    pub image: &'a str,
    /// Command and arguments.
    pub command: Vec<String>,
    /// The PVC attached as a block device.
    pub claim: &'a str,
    /// The ticket's Secret.
    pub secret: &'a str,
    /// Labels.
    pub labels: &'a BTreeMap<String, String>,
    /// Owner references.
    pub owners: Option<Vec<OwnerReference>>,
}

impl WorkerPod<'_> {
    /// The pod: not privileged (a privileged container would ignore the device path), running
    /// as root for the device's permissions, no service account token, its report as the
    /// termination message.
    pub fn build(&self) -> Result<Pod> {
        let v = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": self.labels, "ownerReferences": self.owners},
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": false,
                "containers": [{
                    "name": self.role,
                    "image": self.image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": self.command,
                    "volumeDevices": [{"name": "data", "devicePath": DEVICE_PATH}],
                    "volumeMounts": [{"name": "ticket", "mountPath": "/ticket", "readOnly": true}],
                    "securityContext": {"runAsUser": 0, "allowPrivilegeEscalation": false, "privileged": false},
                    "terminationMessagePolicy": "File",
                }],
                "volumes": [
                    {"name": "data", "persistentVolumeClaim": {"claimName": self.claim}},
                    {"name": "ticket", "secret": {"secretName": self.secret}}
                ],
            }
        });
        Ok(serde_json::from_value(v)?)
    }
}

/// Where a worker pod is.
#[derive(Debug)]
pub enum PodState<R> {
    /// Not created yet.
    Absent,
    /// Created, not ended.
    Running,
    /// Ended well, with its report.
    Done(Box<R>),
    /// Failed, with what it said (its report when it left one).
    Failed(String),
}

/// The state of worker pod `name`, its report of type `R` read from its termination message.
pub async fn pod_state<R: DeserializeOwned>(pods: &Api<Pod>, name: &str) -> Result<PodState<R>> {
    let Some(pod) = pods.get_opt(name).await? else {
        return Ok(PodState::Absent);
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
            let report: R = serde_json::from_str(message.trim()).with_context(|| {
                format!("pod {name} ended without a report (termination message {message:?})")
            })?;
            Ok(PodState::Done(Box::new(report)))
        }
        Some("Failed") => {
            let why = if message.is_empty() {
                status.message.unwrap_or_else(|| "no message".into())
            } else {
                message
            };
            Ok(PodState::Failed(why))
        }
        _ => Ok(PodState::Running),
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
