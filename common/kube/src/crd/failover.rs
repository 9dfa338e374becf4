//! `Failover` (understudy.io/v1alpha1): a request, on the standby, to run an application from a
//! recovery point: rebuild its PVCs from the point and apply its objects, transformed. The same
//! request is a real failover or a drill (into namespaces of its own, torn down with it).

use super::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which point, how, and into what.
// Each printcolumn repeats `type_`: clippy takes them for one attribute given twice.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "understudy.io",
    version = "v1alpha1",
    kind = "Failover",
    namespaced,
    status = "FailoverStatus",
    shortname = "fo",
    category = "understudy",
    doc = "A request on the standby to run a protected application from a recovery point: its PVCs rebuilt from the point and verified, then its objects applied, transformed for the standby.",
    printcolumn(name = "Group", type_ = "string", json_path = ".spec.group"),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Point",
        type_ = "integer",
        json_path = ".status.report.point.sequence"
    ),
    printcolumn(
        name = "RPO",
        type_ = "integer",
        description = "seconds from the point's snapshot to the request",
        json_path = ".status.report.rpoSeconds"
    ),
    printcolumn(
        name = "RTO",
        type_ = "integer",
        description = "seconds from the request to the workloads ready",
        json_path = ".status.report.rtoSeconds"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct FailoverSpec {
    /// The protection group, as the target agent stores it (`<namespace>.<name>` of its
    /// ReplicationGroup on the primary).
    pub group: String,
    /// `latest`, a point's sequence number, or an RFC 3339 time (the newest point cut at or
    /// before it).
    #[serde(default = "latest")]
    pub point: String,
    /// What kind of run this is.
    #[serde(default)]
    pub mode: FailoverMode,
    /// Namespaces of the primary mapped to the standby's (`from: to`); a drill must map every
    /// namespace of the application to one that is not the application's own.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub namespace_map: BTreeMap<String, String>,
    /// Storage classes of the primary mapped to the standby's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub storage_class_map: BTreeMap<String, String>,
    /// Transform rules (the rules file's format), inline or from a ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<RulesSource>,
    /// Scale workloads up after the volumes are rebuilt and the objects applied (otherwise they
    /// are applied with zero replicas, as an inert copy).
    #[serde(default = "yes")]
    pub scale_up: bool,
    /// How long the whole run may take before it fails, e.g. `30m` (default `1h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// RPO guard: the point's cut may be at most this old, e.g. `15m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_point_age: Option<String>,
    /// What a point older than `maxPointAge` does.
    #[serde(default)]
    pub rpo_guard: RpoGuardPolicy,
    /// Drills only: how long the drill's copy stays once the drill has finished (succeeded or
    /// failed), e.g. `10m`; then its namespaces are deleted and the Failover stays, phase
    /// `TornDown`, with its report. Without it the copy stays until the Failover is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

fn latest() -> String {
    "latest".into()
}

fn yes() -> bool {
    true
}

/// What kind of run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum FailoverMode {
    /// Run the application on the standby from the point; needs nothing of the primary.
    #[default]
    Failover,
    /// Run a copy beside whatever the standby runs, in namespaces of its own (every namespace
    /// of the application mapped to one that does not exist yet), while replication goes on;
    /// deleting the Failover deletes those namespaces and everything in them.
    Drill,
    /// A planned move with no data lost: the primary's source agent, told at its next cycle,
    /// stops the application (scales it to zero), sends one final point and pauses its group;
    /// the run then fails over to that point. Needs the primary up.
    Migrate,
}

/// What the RPO guard does with a point older than the bound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RpoGuardPolicy {
    /// The run fails before anything is made.
    #[default]
    Refuse,
    /// The run goes on; the report and a Warning event say the point is old.
    Warn,
}

/// Transform rules.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RulesSource {
    /// The rules themselves (YAML).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<String>,
    /// A ConfigMap in the Failover's namespace whose key `rules.yaml` holds them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_name: Option<String>,
}

/// Steps of a run, in order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum FailoverPhase {
    /// Accepted; the point is being chosen and checked.
    #[default]
    Pending,
    /// A migration: waiting for the primary's final point.
    FinalSync,
    /// The PVCs are being rebuilt from the point (volume populator writers).
    RestoringVolumes,
    /// The application's objects are being applied, transformed.
    ApplyingObjects,
    /// Waiting for the workloads to be ready.
    WaitingReady,
    /// The application runs from the point.
    Succeeded,
    /// The run stopped; the report says where and why.
    Failed,
    /// A drill's copy was deleted after its `ttl`; the report stays.
    TornDown,
}

impl FailoverPhase {
    /// True once the run has stopped (its outcome known).
    pub fn finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::TornDown)
    }
}

/// What the run did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailoverStatus {
    /// The step reached.
    #[serde(default)]
    pub phase: FailoverPhase,
    /// `Ready`: True once the application runs from the point; False with the reason while
    /// it does not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Figures and per-volume, per-object results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<FailoverReport>,
    /// The spec generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the run stopped, succeeded or failed (RFC 3339): a drill's `ttl` counts from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_time: Option<String>,
}

impl FailoverStatus {
    /// Whether the run succeeded (the application ran from the point, every volume verified),
    /// once it has stopped; a drill keeps its outcome after it is torn down.
    pub fn succeeded(&self) -> Option<bool> {
        if !self.phase.finished() {
            return None;
        }
        let report = self.report.as_ref();
        Some(report.is_some_and(|r| {
            r.error.is_none() && r.rto_seconds.is_some() && r.volumes.iter().all(|v| v.verified)
        }))
    }
}

/// The report of a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailoverReport {
    /// The point chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<ChosenPoint>,
    /// Seconds from the point's snapshot to the request: the data the run gives up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo_seconds: Option<i64>,
    /// Seconds from the request to the workloads ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rto_seconds: Option<f64>,
    /// The namespaces the run put the application in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// One per rebuilt PVC.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<RestoredVolume>,
    /// One per object applied, as the apply engine reports it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub objects: Vec<AppliedObject>,
    /// A migration: the point is the primary's final state (its application was stopped for it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub final_state: bool,
    /// Warnings (an old point under `rpoGuard: warn`, an object left out).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// What failed, with what to do about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The recovery point a run uses.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChosenPoint {
    /// Its sequence number on the target.
    pub sequence: u64,
    /// When its snapshot was taken (RFC 3339).
    pub snapshot_time: String,
}

/// One rebuilt PVC.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoredVolume {
    /// The PVC on the standby (`namespace/name`).
    pub pvc: String,
    /// Bytes of data written (holes not counted).
    pub bytes_written: u64,
    /// The digest the source declared at the cut.
    pub expected_digest: String,
    /// The digest of what was written, read back.
    pub actual_digest: String,
    /// True when they match and the PVC was bound to the volume.
    pub verified: bool,
}

/// One object applied.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppliedObject {
    /// `Kind namespace/name`.
    pub object: String,
    /// `created`, `updated`, `unchanged`, `pruned` or `rejected`.
    pub outcome: String,
    /// Why, for a rejected one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
