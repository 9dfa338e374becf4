//! What the populator makes for one claim, all in the claim's namespace, named after its uid and
//! owned by it (so nothing outlives a claim deleted half-way): the prime PVC (the same request,
//! in Block mode, without the data source: the CSI driver provisions it as any volume), the
//! Secret with the writer's ticket, and the writer pod.

use crate::ticket::WriterTicket;
use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;
use understudy_kube::agent_pods::{DEVICE_PATH, TICKET_PATH, WorkerPod};

/// Label on every object the populator makes: the uid of the claim it populates.
pub const CLAIM_LABEL: &str = "understudy.io/populates";

/// Name of every object made for the claim: `understudy-populate-<uid>`.
pub fn name_for(claim: &PersistentVolumeClaim) -> String {
    format!("understudy-populate-{}", claim.uid().unwrap_or_default())
}

/// The labels of those objects.
pub fn labels(claim: &PersistentVolumeClaim) -> BTreeMap<String, String> {
    BTreeMap::from([(CLAIM_LABEL.to_string(), claim.uid().unwrap_or_default())])
}

/// Owner reference to the claim.
fn owners(claim: &PersistentVolumeClaim) -> Option<Vec<OwnerReference>> {
    claim.controller_owner_ref(&()).map(|o| vec![o])
}

/// The prime PVC: the claim's class, access modes and size, in Block mode (the writer writes
/// the raw volume), with no data source.
pub fn prime_claim(claim: &PersistentVolumeClaim) -> Result<PersistentVolumeClaim> {
    let spec = claim.spec.clone().unwrap_or_default();
    let mut annotations = BTreeMap::new();
    // A WaitForFirstConsumer class: the scheduler chose the claim's node; the prime follows it.
    if let Some(node) = claim
        .annotations()
        .get("volume.kubernetes.io/selected-node")
    {
        annotations.insert(
            "volume.kubernetes.io/selected-node".to_string(),
            node.clone(),
        );
    }
    let v = serde_json::json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": name_for(claim),
            "namespace": claim.namespace(),
            "labels": labels(claim),
            "annotations": annotations,
            "ownerReferences": owners(claim),
        },
        "spec": {
            "accessModes": spec.access_modes,
            "volumeMode": "Block",
            "storageClassName": spec.storage_class_name,
            "resources": spec.resources,
        }
    });
    serde_json::from_value(v).context("cannot build the prime PVC")
}

/// The writer pod: `target-agent write` with the prime PVC as its device, on the claim's node
/// when the class waits for one.
pub fn writer_pod(claim: &PersistentVolumeClaim, image: &str) -> Result<Pod> {
    let name = name_for(claim);
    let ns = claim.namespace().unwrap_or_default();
    let mut pod = WorkerPod {
        namespace: &ns,
        name: &name,
        role: "writer",
        image,
        command: writer_command(false),
        claim: &name,
        secret: &name,
        labels: &labels(claim),
        owners: owners(claim),
    }
    .build()?;
    if let (Some(node), Some(spec)) = (
        claim
            .annotations()
            .get("volume.kubernetes.io/selected-node"),
        pod.spec.as_mut(),
    ) {
        spec.node_name = Some(node.clone());
    }
    Ok(pod)
}

/// A writer pod's command: `target-agent write` onto the pod's device with its ticket, the
/// report as the termination message; `basis` for a failback's writer (only differing blocks).
pub fn writer_command(basis: bool) -> Vec<String> {
    let mut c = vec!["/bin/target-agent", "write", "--ticket", TICKET_PATH];
    c.extend(["--device", DEVICE_PATH, "--report", "/dev/termination-log"]);
    if basis {
        c.push("--basis");
    }
    c.into_iter().map(String::from).collect()
}

/// The ticket's Secret.
pub fn ticket_secret(
    claim: &PersistentVolumeClaim,
    ticket: &WriterTicket,
) -> Result<k8s_openapi::api::core::v1::Secret> {
    understudy_kube::agent_pods::ticket_secret(
        &claim.namespace().unwrap_or_default(),
        &name_for(claim),
        ticket,
        &labels(claim),
        owners(claim),
    )
}

/// Annotation on a Filesystem claim's PV: the prime's Block PV of the same volume.
pub const BLOCK_VIEW: &str = "understudy.io/block-view";

/// True for a Block claim.
pub fn is_block(claim: &PersistentVolumeClaim) -> bool {
    claim.spec.as_ref().and_then(|s| s.volume_mode.as_deref()) == Some("Block")
}

/// The claim's volume mode when it is neither Block nor Filesystem (the default).
pub fn unsupported_mode(claim: &PersistentVolumeClaim) -> Option<String> {
    match claim.spec.as_ref().and_then(|s| s.volume_mode.as_deref()) {
        None | Some("Block") | Some("Filesystem") => None,
        Some(other) => Some(other.to_string()),
    }
}

/// A Filesystem PV of the same CSI volume as the prime's Block PV (the raw image written holds
/// the source's file system), pre-bound to the claim, with the prime's original reclaim policy
/// and provisioner (so the volume is deleted with the claim when the class says so).
pub fn filesystem_volume(
    block: &k8s_openapi::api::core::v1::PersistentVolume,
    claim: &PersistentVolumeClaim,
    reclaim: &str,
) -> Result<k8s_openapi::api::core::v1::PersistentVolume> {
    let mut spec = block.spec.clone().context("the prime's PV has no spec")?;
    anyhow::ensure!(
        spec.csi.is_some(),
        "the prime's PV {} is not a CSI volume: only CSI volumes can be handed to a Filesystem claim",
        block.name_any()
    );
    spec.volume_mode = Some("Filesystem".into());
    spec.claim_ref = serde_json::from_value(claim_ref_patch(claim)["spec"]["claimRef"].clone())?;
    spec.persistent_volume_reclaim_policy = Some(reclaim.to_string());
    let mut annotations = BTreeMap::from([(BLOCK_VIEW.to_string(), block.name_any())]);
    if let Some(by) = block.annotations().get("pv.kubernetes.io/provisioned-by") {
        annotations.insert("pv.kubernetes.io/provisioned-by".into(), by.clone());
    }
    Ok(k8s_openapi::api::core::v1::PersistentVolume {
        metadata: kube::api::ObjectMeta {
            name: Some(format!("understudy-fs-{}", claim.uid().unwrap_or_default())),
            labels: Some(labels(claim)),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    })
}

/// Annotation on the prime's PV: its reclaim policy before the populator set it to Retain.
pub const RECLAIM: &str = "understudy.io/reclaim-policy";

/// The patch that hands the prime's volume to the claim: the PV controller then binds them.
pub fn claim_ref_patch(claim: &PersistentVolumeClaim) -> serde_json::Value {
    serde_json::json!({
        "spec": {"claimRef": {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "namespace": claim.namespace(),
            "name": claim.name_any(),
            "uid": claim.uid(),
            "resourceVersion": null,
        }}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim() -> PersistentVolumeClaim {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "db", "namespace": "shop", "uid": "u-1",
                         "annotations": {"volume.kubernetes.io/selected-node": "node-a"}},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                     "volumeMode": "Filesystem",
                     "resources": {"requests": {"storage": "1Gi"}},
                     "dataSourceRef": {"apiGroup": "understudy.io", "kind": "PointVolume", "name": "p"}},
        }))
        .unwrap()
    }

    #[test]
    fn the_prime_is_the_claims_request_in_block_mode_without_the_source() {
        let p = prime_claim(&claim()).unwrap();
        assert_eq!(p.name_any(), "understudy-populate-u-1");
        assert_eq!(p.namespace().as_deref(), Some("shop"));
        let spec = p.spec.unwrap();
        assert_eq!(spec.volume_mode.as_deref(), Some("Block"));
        assert_eq!(spec.storage_class_name.as_deref(), Some("fast"));
        assert!(spec.data_source_ref.is_none() && spec.data_source.is_none());
        assert_eq!(p.metadata.owner_references.unwrap()[0].name, "db");
        assert_eq!(
            p.metadata.annotations.unwrap()["volume.kubernetes.io/selected-node"],
            "node-a"
        );
    }

    #[test]
    fn a_filesystem_claim_gets_the_same_csi_volume_in_filesystem_mode() {
        let block: k8s_openapi::api::core::v1::PersistentVolume =
            serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": "pvc-prime",
                             "annotations": {"pv.kubernetes.io/provisioned-by": "csi.x"}},
                "spec": {"volumeMode": "Block", "persistentVolumeReclaimPolicy": "Retain",
                         "storageClassName": "fast", "accessModes": ["ReadWriteOnce"],
                         "capacity": {"storage": "1Gi"},
                         "csi": {"driver": "csi.x", "volumeHandle": "vol-7"},
                         "claimRef": {"name": "understudy-populate-u-1", "namespace": "shop"}},
            }))
            .unwrap();
        let fs = filesystem_volume(&block, &claim(), "Delete").unwrap();
        let spec = fs.spec.as_ref().unwrap();
        assert_eq!(spec.volume_mode.as_deref(), Some("Filesystem"));
        assert_eq!(spec.csi.as_ref().unwrap().volume_handle, "vol-7");
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Delete")
        );
        let claim_ref = spec.claim_ref.as_ref().unwrap();
        assert_eq!(
            (claim_ref.name.as_deref(), claim_ref.uid.as_deref()),
            (Some("db"), Some("u-1"))
        );
        assert_eq!(fs.annotations()[BLOCK_VIEW], "pvc-prime");
        assert_eq!(fs.annotations()["pv.kubernetes.io/provisioned-by"], "csi.x");
    }

    #[test]
    fn the_writer_runs_on_the_claims_node_unprivileged() {
        let pod = writer_pod(&claim(), "agents:1").unwrap();
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-a"));
        let c = &spec.containers[0];
        assert_eq!(c.command.as_ref().unwrap()[1], "write");
        assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(false));
        let patch = claim_ref_patch(&claim());
        assert_eq!(patch["spec"]["claimRef"]["uid"], "u-1");
    }
}
