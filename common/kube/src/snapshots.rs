//! The CSI snapshot APIs the source agent uses (external-snapshotter's CRDs; k8s-openapi has no
//! types for them): VolumeSnapshot and VolumeSnapshotContent (`snapshot.storage.k8s.io/v1`) and
//! VolumeGroupSnapshot (`groupsnapshot.storage.k8s.io`, v1 where the cluster serves it, else
//! v1beta2). Only the fields Understudy reads or writes are modelled; the rest is kept by the
//! API server.

use anyhow::{Context, Result, bail};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, CustomResource};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Annotation on a VolumeSnapshotContent that lets a Filesystem-mode snapshot be restored as a
/// Block PVC (the mover reads the file system's blocks raw).
pub const ALLOW_VOLUME_MODE_CHANGE: &str =
    "snapshot.storage.kubernetes.io/allow-volume-mode-change";

/// A snapshot of one PVC.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "snapshot.storage.k8s.io",
    version = "v1",
    kind = "VolumeSnapshot",
    namespaced,
    status = "VolumeSnapshotStatus"
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotSpec {
    /// What it is a snapshot of.
    pub source: SnapshotSource,
    /// Its class (`None`: the driver's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
}

/// Exactly one of the two.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSource {
    /// The PVC to snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim_name: Option<String>,
    /// An existing content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_content_name: Option<String>,
}

/// A VolumeSnapshot's status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotStatus {
    /// Its VolumeSnapshotContent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_volume_snapshot_content_name: Option<String>,
    /// When the driver cut it (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<String>,
    /// True once it can be restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    /// The size a restore needs (a quantity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<serde_json::Value>,
    /// The last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<SnapshotError>,
    /// The group snapshot it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_name: Option<String>,
}

/// An error a snapshot reports.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotError {
    /// What went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
}

/// The cluster-scoped object behind a VolumeSnapshot.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "snapshot.storage.k8s.io",
    version = "v1",
    kind = "VolumeSnapshotContent",
    status = "VolumeSnapshotContentStatus"
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContentSpec {
    /// The CSI driver.
    #[serde(default)]
    pub driver: String,
    /// Delete or Retain.
    #[serde(default)]
    pub deletion_policy: String,
    /// The volume mode of the snapshotted volume (`Filesystem` or `Block`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_volume_mode: Option<String>,
}

/// A VolumeSnapshotContent's status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContentStatus {
    /// The CSI snapshot id: the base of a later GetMetadataDelta.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_handle: Option<String>,
    /// When the driver cut it (ns since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<i64>,
    /// Its size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<i64>,
    /// True once it can be restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
}

impl VolumeSnapshot {
    /// A snapshot of PVC `pvc` named `name`, with `labels`.
    pub fn of_pvc(
        name: &str,
        pvc: &str,
        class: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Self {
        let mut s = VolumeSnapshot::new(
            name,
            VolumeSnapshotSpec {
                source: SnapshotSource {
                    persistent_volume_claim_name: Some(pvc.to_string()),
                    volume_snapshot_content_name: None,
                },
                volume_snapshot_class_name: class.map(str::to_string),
            },
        );
        s.metadata.labels = Some(labels.clone());
        s
    }

    /// The PVC it is a snapshot of.
    pub fn pvc(&self) -> Option<&str> {
        self.spec.source.persistent_volume_claim_name.as_deref()
    }

    /// True once it can be restored.
    pub fn ready(&self) -> bool {
        self.status.as_ref().and_then(|s| s.ready_to_use) == Some(true)
    }

    /// The error it reports, if any.
    pub fn error(&self) -> Option<String> {
        self.status
            .as_ref()
            .and_then(|s| s.error.as_ref())
            .and_then(|e| e.message.clone())
    }

    /// Its content's name, once bound.
    pub fn content(&self) -> Option<&str> {
        self.status
            .as_ref()
            .and_then(|s| s.bound_volume_snapshot_content_name.as_deref())
    }

    /// The name of its content: the bound one, or before it is bound the name the
    /// snapshot-controller gives the content it creates (`snapcontent-<snapshot uid>`).
    pub fn content_name(&self) -> Option<String> {
        match self.content() {
            Some(c) => Some(c.to_string()),
            None => Some(format!("snapcontent-{}", self.metadata.uid.as_deref()?)),
        }
    }

    /// When it was cut, in ms since the Unix epoch.
    pub fn created_ms(&self) -> Option<i64> {
        let t = self.status.as_ref()?.creation_time.as_deref()?;
        let ts: k8s_openapi::jiff::Timestamp = t.parse().ok()?;
        Some(ts.as_millisecond())
    }

    /// The size a restore needs, as a quantity string (e.g. `1Gi`).
    pub fn restore_size(&self) -> Option<String> {
        match self.status.as_ref()?.restore_size.as_ref()? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
}

/// The served version of VolumeGroupSnapshot: v1 where served, else v1beta2.
pub async fn group_snapshot_resource(client: &Client) -> Result<ApiResource> {
    let group = "groupsnapshot.storage.k8s.io";
    let discovered = kube::discovery::group(client, group)
        .await
        .with_context(|| format!("the cluster serves no {group} API: install the external-snapshotter's group-snapshot CRDs, or use consistency `hooks` or `crash`"))?;
    for version in ["v1", "v1beta2"] {
        if let Some((ar, _)) = discovered
            .versioned_resources(version)
            .into_iter()
            .find(|(ar, _)| ar.kind == "VolumeGroupSnapshot")
        {
            return Ok(ar);
        }
    }
    bail!(
        "the cluster serves {group} but neither v1 nor v1beta2 of VolumeGroupSnapshot: upgrade the external-snapshotter CRDs to v8.2 or later"
    )
}

/// A group snapshot, as the served version's objects.
pub struct GroupSnapshots {
    api: Api<DynamicObject>,
    resource: ApiResource,
}

impl GroupSnapshots {
    /// Group snapshots in `namespace`.
    pub fn new(client: Client, namespace: &str, resource: ApiResource) -> Self {
        GroupSnapshots {
            api: Api::namespaced_with(client, namespace, &resource),
            resource,
        }
    }

    /// Creates a group snapshot of the PVCs `selector` matches (idempotent: an existing one of
    /// that name is kept).
    pub async fn create(
        &self,
        name: &str,
        selector: &BTreeMap<String, String>,
        class: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Result<()> {
        let mut spec = serde_json::json!({"source": {"selector": {"matchLabels": selector}}});
        if let Some(c) = class {
            spec["volumeGroupSnapshotClassName"] = c.into();
        }
        let mut obj =
            DynamicObject::new(name, &self.resource).data(serde_json::json!({"spec": spec}));
        obj.metadata.labels = Some(labels.clone());
        match self.api.create(&PostParams::default(), &obj).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot create VolumeGroupSnapshot {name}")),
        }
    }

    /// The group snapshot, if it exists: (uid, ready, error).
    pub async fn state(&self, name: &str) -> Result<Option<(String, bool, Option<String>)>> {
        let Some(obj) = self.api.get_opt(name).await? else {
            return Ok(None);
        };
        let status = &obj.data["status"];
        let ready = status["readyToUse"].as_bool() == Some(true);
        let error = status["error"]["message"].as_str().map(str::to_string);
        Ok(Some((obj.metadata.uid.unwrap_or_default(), ready, error)))
    }

    /// Deletes it (its member snapshots go with it); absent is fine.
    pub async fn delete(&self, name: &str) -> Result<()> {
        match self.api.delete(name, &DeleteParams::background()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot delete VolumeGroupSnapshot {name}")),
        }
    }
}

/// The member snapshots of the group snapshot with `uid` (owned by it), in `snapshots`.
pub fn members<'a>(snapshots: &'a [VolumeSnapshot], uid: &str) -> Vec<&'a VolumeSnapshot> {
    snapshots
        .iter()
        .filter(|s| {
            s.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.kind == "VolumeGroupSnapshot" && o.uid == uid)
        })
        .collect()
}

/// Lets a Filesystem-mode snapshot's content be restored as Block (see
/// [`ALLOW_VOLUME_MODE_CHANGE`]).
pub async fn allow_volume_mode_change(client: &Client, content: &str) -> Result<()> {
    let api: Api<VolumeSnapshotContent> = Api::all(client.clone());
    let patch =
        serde_json::json!({"metadata": {"annotations": {ALLOW_VOLUME_MODE_CHANGE: "true"}}});
    api.patch(content, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("cannot annotate VolumeSnapshotContent {content} to allow restoring it as Block: the agent needs patch on volumesnapshotcontents"))?;
    Ok(())
}

/// Makes a snapshot content go with its VolumeSnapshot: its deletion policy becomes `Delete`
/// (a cycle's snapshots are transient, also under a class that retains). A content already
/// gone is fine.
pub async fn delete_with_snapshot(client: &Client, content: &str) -> Result<()> {
    let api: Api<VolumeSnapshotContent> = Api::all(client.clone());
    let patch = serde_json::json!({"spec": {"deletionPolicy": "Delete"}});
    match api
        .patch(content, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("cannot set VolumeSnapshotContent {content} to be deleted with its snapshot: the agent needs patch on volumesnapshotcontents"))),
    }
}
