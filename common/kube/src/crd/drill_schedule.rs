//! `DrillSchedule` (understudy.io/v1alpha1): drills on a schedule. Each run is a `Failover` in
//! `drill` mode made from the template, torn down after its `ttl`, kept with its report; the
//! schedule's status holds the last outcome, and a failed drill sets a condition, a Warning
//! event and the metrics an alert reads. A DR plan nobody tests does not work.

use super::Condition;
use super::failover::{FailoverPhase, FailoverSpec};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// When, and which drill.
// Each printcolumn repeats `type_`: clippy takes them for one attribute given twice.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "understudy.io",
    version = "v1alpha1",
    kind = "DrillSchedule",
    namespaced,
    status = "DrillScheduleStatus",
    shortname = "drills",
    category = "understudy",
    doc = "Drills on a schedule: each run is a Failover in drill mode made from the template, torn down after its ttl and kept with its report; a failed drill sets the LastDrillSucceeded condition to False, a Warning event and the understudy_drill_* metrics.",
    printcolumn(name = "Schedule", type_ = "string", json_path = ".spec.schedule"),
    printcolumn(
        name = "Last run",
        type_ = "string",
        json_path = ".status.lastRun.name"
    ),
    printcolumn(
        name = "Succeeded",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"LastDrillSucceeded\")].status"
    ),
    printcolumn(
        name = "Last success",
        type_ = "date",
        json_path = ".status.lastSuccessTime"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DrillScheduleSpec {
    /// When drills start, in UTC: a cron expression of five fields as a CronJob's
    /// (`0 3 * * 1`: Mondays at 03:00), or six with seconds first.
    pub schedule: String,
    /// The Failover each run makes. Its mode is always `drill` (every namespace of the
    /// application mapped to one that does not exist); its `ttl` defaults to `10m`.
    pub template: FailoverSpec,
    /// Runs that succeeded kept with their reports (older ones are deleted).
    #[serde(default = "three")]
    pub successful_runs_history_limit: u32,
    /// Runs that failed kept with their reports.
    #[serde(default = "three")]
    pub failed_runs_history_limit: u32,
    /// No new runs while true (a run under way goes on).
    #[serde(default)]
    pub suspend: bool,
}

fn three() -> u32 {
    3
}

/// What the schedule did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrillScheduleStatus {
    /// `Scheduled` (the schedule parses; the next run's time) and `LastDrillSucceeded` (the
    /// newest finished run's outcome).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The time of the last run started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<String>,
    /// The newest finished run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<DrillRun>,
    /// When the newest run that succeeded finished (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_time: Option<String>,
    /// Finished runs in a row that failed.
    #[serde(default)]
    pub consecutive_failures: u32,
    /// The spec generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One finished run, from its Failover's report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrillRun {
    /// The run's Failover.
    pub name: String,
    /// Its phase when it was recorded.
    pub phase: FailoverPhase,
    /// True when the application became ready and every volume's digest matched.
    pub succeeded: bool,
    /// When it finished (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_time: Option<String>,
    /// The point it ran from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point: Option<u64>,
    /// Seconds from the run's start to the workloads ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rto_seconds: Option<f64>,
    /// Volumes rebuilt and verified, of those the point holds.
    #[serde(default)]
    pub volumes_verified: u32,
    /// What failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
