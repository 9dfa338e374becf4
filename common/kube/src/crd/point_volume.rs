//! `PointVolume` (understudy.io/v1alpha1): one volume of one recovery point, as the data source
//! of a PVC. A PVC whose `dataSourceRef` names a PointVolume is rebuilt from the point by the
//! target agent's volume populator, and bound only once what was written is verified.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Which volume of which point.
// Each printcolumn repeats `type_`: clippy takes them for one attribute given twice.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "understudy.io",
    version = "v1alpha1",
    kind = "PointVolume",
    namespaced,
    status = "PointVolumeStatus",
    shortname = "ptv",
    category = "understudy",
    doc = "One volume of one recovery point on the standby's target agent, as the data source (dataSourceRef) of a PVC: the target agent's populator writes the volume into a new volume, verifies it, and binds it to the PVC.",
    printcolumn(name = "Group", type_ = "string", json_path = ".spec.group"),
    printcolumn(name = "Volume", type_ = "string", json_path = ".spec.volume"),
    printcolumn(name = "Point", type_ = "integer", json_path = ".status.sequence"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PointVolumeSpec {
    /// The protection group, as the target agent stores it.
    pub group: String,
    /// `latest`, a point's sequence number, or an RFC 3339 time (the newest point cut at or
    /// before it); resolved once, into `status.sequence`.
    #[serde(default = "latest")]
    pub point: String,
    /// The volume's name in the point.
    pub volume: String,
}

fn latest() -> String {
    "latest".into()
}

/// Where populating stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PopulatePhase {
    /// Waiting for a PVC or a point.
    #[default]
    Pending,
    /// A writer is writing the volume.
    Writing,
    /// Written and verified; the PVC is bound (or being bound) to it.
    Bound,
    /// Refused: the status says why; the PVC stays unbound.
    Failed,
}

/// What the populator did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PointVolumeStatus {
    /// Where it stands.
    #[serde(default)]
    pub phase: PopulatePhase,
    /// The point `spec.point` resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    /// Bytes of data written (holes not counted).
    #[serde(default)]
    pub bytes_written: u64,
    /// The digest the source declared at the cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_digest: Option<String>,
    /// The digest of what was written, read back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_digest: Option<String>,
    /// Writers run so far (a failed one is run again, up to three).
    #[serde(default)]
    pub attempts: u32,
    /// What happened last, with what to do when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl PointVolumeStatus {
    /// The writer read back what it wrote and it matched the digest the source declared.
    pub fn verified(&self) -> bool {
        self.actual_digest.is_some() && self.actual_digest == self.expected_digest
    }
}
