//! `ReplicationGroup` (understudy.io/v1alpha1): an application the source agent protects, its
//! volumes cut together on a schedule and shipped to a target agent.

use super::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What to protect, how often, how consistently, and where to.
// Each printcolumn repeats `type_`: clippy takes them for one attribute given twice.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "understudy.io",
    version = "v1alpha1",
    kind = "ReplicationGroup",
    namespaced,
    status = "ReplicationGroupStatus",
    shortname = "rg",
    category = "understudy",
    doc = "An application the source agent protects: every PVC in scope cut together on a schedule, with the application's objects, and shipped to a target agent as recovery points.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Synced",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Synced\")].status"
    ),
    printcolumn(
        name = "Point",
        type_ = "integer",
        json_path = ".status.lastPoint.sequence"
    ),
    printcolumn(
        name = "RPO",
        type_ = "integer",
        description = "seconds since the last point's snapshot",
        json_path = ".status.rpoSeconds"
    ),
    printcolumn(
        name = "Consistency",
        type_ = "string",
        json_path = ".spec.consistency",
        priority = 1
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Synced\")].reason",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationGroupSpec {
    /// Namespaces of the application (default: the ReplicationGroup's own). Every PVC in them
    /// that the selector matches is protected; the application's objects are captured from
    /// them as `capture` does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Labels the application's PVCs and objects carry (all objects in scope when empty).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    /// Time between cycle starts, e.g. `30s`, `5m` (at least 10s).
    pub interval: String,
    /// How the volumes are cut together.
    #[serde(default)]
    pub consistency: Consistency,
    /// Commands run in the application's pods around the snapshot instant.
    #[serde(default, skip_serializing_if = "Hooks::is_empty")]
    pub hooks: Hooks,
    /// The target agent.
    pub target: TargetRef,
    /// VolumeSnapshotClass of per-PVC snapshots (default: the driver's default class).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
    /// VolumeGroupSnapshotClass of group snapshots (default: the driver's default class).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_class_name: Option<String>,
    /// Cap on each mover's chunk data sent, in megabits per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_limit_mbit: Option<u32>,
    /// Movers of a cycle that run at once (default: one per volume, all in parallel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_parallel_movers: Option<u32>,
    /// How long snapshots may take to become ready to use, e.g. `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_timeout: Option<String>,
    /// No new cycle starts while true (one under way finishes).
    #[serde(default)]
    pub paused: bool,
}

/// How a group's volumes are cut at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Consistency {
    /// One VolumeGroupSnapshot of every PVC (write-order consistent across the volumes, as the
    /// CSI driver guarantees); hooks, when given, run around it.
    #[default]
    Group,
    /// Per-PVC VolumeSnapshots created together while the hooks hold the application quiet.
    Hooks,
    /// Per-PVC VolumeSnapshots created together, no hooks: each volume crash consistent.
    Crash,
}

/// Commands run in the application's pods: `pre` before the snapshot instant, `post` as soon
/// as it is taken (also when taking it failed).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Hooks {
    /// Run before the snapshot, in order (e.g. a freeze).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre: Vec<ExecHook>,
    /// Run after the snapshot instant, in order (e.g. a thaw).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub post: Vec<ExecHook>,
}

impl Hooks {
    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.pre.is_empty() && self.post.is_empty()
    }
}

/// A command run through `pods/exec` in every pod the selector matches.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecHook {
    /// Labels of the pods to run it in (in the application's namespaces).
    pub pod_selector: BTreeMap<String, String>,
    /// Container to run it in (default: the pod's first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The command and its arguments (no shell unless you call one).
    pub command: Vec<String>,
    /// Time limit, e.g. `30s` (default 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// What a failure (non-zero exit, timeout, no matching pod) does to the cycle.
    #[serde(default)]
    pub on_error: OnError,
}

/// What a failing hook does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OnError {
    /// The cycle fails: no point is made (post hooks still run).
    #[default]
    Fail,
    /// The failure is reported and the cycle goes on.
    Continue,
}

/// Where the points go.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// The target agent's QUIC address, `host:port`.
    pub address: String,
    /// Secret (in the agent's namespace) holding the source's identity (`cert.pem`, `key.pem`)
    /// and the target's fingerprint (`target-fingerprint`).
    pub secret_name: String,
}

/// What the controller last saw and did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationGroupStatus {
    /// `Ready` (the group can replicate), `Synced` (the last cycle committed a point) and
    /// `Degraded` (something needs a person), each with a reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The newest point on the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_point: Option<PointStatus>,
    /// Seconds from the last point's snapshot to the last status update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo_seconds: Option<i64>,
    /// Bytes the movers read, over every cycle.
    #[serde(default)]
    pub bytes_read: u64,
    /// Chunk bytes sent, over every cycle.
    #[serde(default)]
    pub bytes_sent: u64,
    /// Per volume of the last cycle: how its changed blocks were found.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeStatus>,
    /// The last error, with what to do about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The cycle under way, recorded before each step's effects so that a restarted
    /// controller resumes it or cleans it up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cycle: Option<CycleStatus>,
    /// When the last cycle started (RFC 3339): the next starts one interval later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_cycle_start: Option<String>,
    /// A planned migration the standby asked for (a `migrate` Failover), once the controller
    /// learnt of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationStatus>,
    /// The spec generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A committed recovery point.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PointStatus {
    /// The point's sequence number on the target.
    pub sequence: u64,
    /// The cut id (also the cycle's stage id).
    pub cut_id: String,
    /// When its snapshot was taken (RFC 3339): RPO is measured from here.
    pub snapshot_time: String,
    /// Seconds the cycle took.
    pub cycle_seconds: f64,
}

/// One volume of the last cycle.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStatus {
    /// The PVC (`namespace/name`).
    pub pvc: String,
    /// `csi-delta`, `csi-allocated` or `hash-diff`.
    pub change_source: String,
    /// Why hash-diff, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Bytes read.
    pub bytes_read: u64,
    /// Chunk bytes sent.
    pub bytes_sent: u64,
    /// How long its mover took (connect, read, send, stage), in ms.
    #[serde(default)]
    pub mover_ms: u64,
    /// The snapshot kept as the base of the next cycle's changed-block delta (the last point's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_snapshot: Option<String>,
    /// Its CSI handle: the driver can diff against it even after the VolumeSnapshot is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_snapshot_handle: Option<String>,
    /// The point it is the snapshot of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_sequence: Option<u64>,
}

/// A planned migration, on the primary.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    /// The standby's request (its Failover's uid).
    pub id: String,
    /// The step reached.
    pub phase: MigrationPhase,
    /// The point committed as the application's final state here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_point: Option<u64>,
}

/// Steps of a migration on the primary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MigrationPhase {
    /// The application's Deployments and StatefulSets are scaled to zero (their replicas kept
    /// in an annotation); the final cycle starts once their pods are gone.
    #[default]
    Quiescing,
    /// The final cycle is under way.
    FinalCycle,
    /// The final point is on the standby; the group is paused and the application stays
    /// stopped here.
    Done,
}

/// The cycle under way.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CycleStatus {
    /// Stage id: names every object the cycle makes, and becomes the point's cut id.
    pub stage: String,
    /// The step reached.
    pub phase: CyclePhase,
    /// When the cycle started (RFC 3339).
    pub started: String,
    /// When the snapshot was taken (ms since the Unix epoch), once it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_ms: Option<i64>,
    /// Why the cycle failed (it is being cleaned up), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Steps of a cycle, in order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum CyclePhase {
    /// Pre hooks, then the snapshot(s), then post hooks.
    #[default]
    Snapshotting,
    /// Waiting for the snapshots to be ready to use.
    WaitingForSnapshots,
    /// Movers reading the snapshots and staging them on the target.
    Moving,
    /// Committing the staged volumes with the manifests.
    Committing,
    /// Deleting what the cycle made (all of it but the snapshots the next delta needs).
    CleaningUp,
}
