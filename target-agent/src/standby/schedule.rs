//! Drills on a schedule (kube-rs style): a `DrillSchedule` makes a `Failover` in drill mode from
//! its template at each time of its cron schedule (one at a time: a run still under way, or
//! whose copy is not torn down yet, makes the next one skip), records the newest finished run's
//! outcome in its status, a condition, an event and the `understudy_drill_*` metrics, and keeps
//! the newest runs with their reports.

use anyhow::{Context as _, Result};
use croner::Cron;
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use std::sync::Arc;
use std::time::Duration;
use understudy_common::metrics::Metrics;
use understudy_kube::agent_pods::create_once;
use understudy_kube::controller::{ReconcileError, publish, shutdown_on};
use understudy_kube::crd::drill_schedule::*;
use understudy_kube::crd::failover::{Failover, FailoverMode, FailoverPhase, FailoverSpec};
use understudy_kube::crd::set_condition;

/// Label on every run, naming its schedule.
pub const SCHEDULE_LABEL: &str = "understudy.io/drill-schedule";
/// A scheduled drill's `ttl` when its template sets none.
pub const DEFAULT_TTL: &str = "10m";

struct Context {
    client: Client,
    recorder: Recorder,
    metrics: Arc<Metrics>,
}

/// Runs the DrillSchedule controller until `stop` completes.
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let schedules: Api<DrillSchedule> = Api::all(client.clone());
    schedules.list(&Default::default()).await.context(
        "cannot list DrillSchedules: is the CRD installed (`source-agent crds | kubectl apply -f -`) and may the agent list them?",
    )?;
    let reporter = Reporter {
        controller: "understudy-drill-schedule".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
        metrics,
    });
    Controller::new(schedules, watcher::Config::default())
        .owns(
            Api::<Failover>::all(client),
            watcher::Config::default().labels(SCHEDULE_LABEL),
        )
        .graceful_shutdown_on(shutdown_on(stop))
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "drill schedule reconcile");
            }
        })
        .await;
    Ok(())
}

fn error_policy(_: Arc<DrillSchedule>, e: &ReconcileError, _: Arc<Context>) -> Action {
    tracing::warn!(error = %e, "a DrillSchedule step failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile(ds: Arc<DrillSchedule>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    Schedule::new(&ctx, &ds)
        .step()
        .await
        .map_err(ReconcileError)
}

/// Parses a schedule: five fields as a CronJob's, or six with seconds first.
pub fn parse_schedule(text: &str) -> Result<Cron> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse(text)
        .map_err(|e| anyhow::anyhow!("schedule `{text}` is not a cron expression ({e}): use five fields as a CronJob's, e.g. `0 3 * * 1`"))
}

/// The time a run is due at, if one is: the newest time of the schedule at or before `now`
/// that is after `since` (runs missed while the agent was down collapse into one).
pub fn due(cron: &Cron, since: Timestamp, now: Timestamp) -> Option<Timestamp> {
    let at = cron
        .find_previous_occurrence(&now.to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC), true)
        .ok()?
        .timestamp();
    (at > since).then_some(at)
}

/// The schedule's next time after `now`.
pub fn next(cron: &Cron, now: Timestamp) -> Option<Timestamp> {
    cron.find_next_occurrence(&now.to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC), false)
        .ok()
        .map(|z| z.timestamp())
}

/// The run a finished Failover was, as the schedule records it; `None` while under way.
pub fn run_of(fo: &Failover) -> Option<DrillRun> {
    let status = fo.status.clone().unwrap_or_default();
    let succeeded = status.succeeded()?;
    let report = status.report.unwrap_or_default();
    Some(DrillRun {
        name: fo.name_any(),
        phase: status.phase,
        succeeded,
        finished_time: status.finished_time,
        point: report.point.map(|p| p.sequence),
        rto_seconds: report.rto_seconds,
        volumes_verified: report.volumes.iter().filter(|v| v.verified).count() as u32,
        error: report.error,
    })
}

/// The torn-down runs to delete, oldest first, so that the newest `keep.0` that succeeded and
/// `keep.1` that failed stay; `runs` are (name, succeeded) oldest first.
pub fn beyond_history(runs: &[(String, bool)], keep: (u32, u32)) -> Vec<String> {
    let mut kept = (0u32, 0u32);
    let mut out: Vec<String> = runs
        .iter()
        .rev()
        .filter(|(_, ok)| {
            let (n, limit) = if *ok {
                (&mut kept.0, keep.0)
            } else {
                (&mut kept.1, keep.1)
            };
            *n += 1;
            *n > limit
        })
        .map(|(name, _)| name.clone())
        .collect();
    out.reverse();
    out
}

/// The Failover a schedule makes for the run due at `at`.
pub fn run_for(ds: &DrillSchedule, at: Timestamp) -> Failover {
    let name = format!("{}-{}", ds.name_any(), at.as_second());
    let spec = FailoverSpec {
        mode: FailoverMode::Drill,
        ttl: ds.spec.template.ttl.clone().or(Some(DEFAULT_TTL.into())),
        ..ds.spec.template.clone()
    };
    let mut fo = Failover::new(&name, spec);
    fo.metadata.namespace = ds.namespace();
    fo.metadata.labels = Some([(SCHEDULE_LABEL.to_string(), ds.name_any())].into());
    fo.metadata.owner_references = ds.controller_owner_ref(&()).map(|o| vec![o]);
    fo
}

/// One DrillSchedule, for one reconcile.
struct Schedule<'a> {
    ctx: &'a Context,
    ds: &'a DrillSchedule,
    runs: Api<Failover>,
    /// `namespace/name`, as the metrics label it.
    label: String,
}

impl<'a> Schedule<'a> {
    fn new(ctx: &'a Context, ds: &'a DrillSchedule) -> Self {
        let ns = ds.namespace().unwrap_or_default();
        Schedule {
            ctx,
            ds,
            runs: Api::namespaced(ctx.client.clone(), &ns),
            label: format!("{ns}/{}", ds.name_any()),
        }
    }

    async fn step(&self) -> Result<Action> {
        let before = self.ds.status.clone().unwrap_or_default();
        let mut status = before.clone();
        status.observed_generation = self.ds.metadata.generation;
        let generation = self.ds.metadata.generation;
        let cron = match parse_schedule(&self.ds.spec.schedule) {
            Ok(c) => c,
            Err(e) => {
                let why = format!("{e:#}");
                if understudy_kube::crd::condition(&before.conditions, "Scheduled")
                    .is_none_or(|c| c.message != why)
                {
                    self.event(true, "InvalidSchedule", why.clone()).await;
                }
                set_condition(
                    &mut status.conditions,
                    "Scheduled",
                    false,
                    "InvalidSchedule",
                    why,
                    generation,
                );
                self.save(&before, &status).await?;
                return Ok(Action::await_change());
            }
        };
        let runs = self.list_runs().await?;
        self.record(&mut status, &runs).await;
        self.prune(&runs).await?;
        let now = Timestamp::now();
        self.start_due(&cron, &mut status, &runs, now).await?;
        let next = next(&cron, now);
        let said = match next {
            Some(t) => format!(
                "next drill at {}",
                understudy_common::format_ms(t.as_millisecond())
            ),
            None => "the schedule names no time to come".into(),
        };
        let reason = if self.ds.spec.suspend {
            "Suspended"
        } else {
            "Scheduled"
        };
        set_condition(
            &mut status.conditions,
            "Scheduled",
            true,
            reason,
            said,
            generation,
        );
        self.save(&before, &status).await?;
        Ok(match next {
            Some(t) => Action::requeue(Duration::from_millis(
                (t.as_millisecond() - now.as_millisecond()).max(500) as u64,
            )),
            None => Action::await_change(),
        })
    }

    /// The schedule's runs, oldest first.
    async fn list_runs(&self) -> Result<Vec<Failover>> {
        let lp = ListParams::default().labels(&format!("{SCHEDULE_LABEL}={}", self.ds.name_any()));
        let mut runs = self
            .runs
            .list(&lp)
            .await
            .with_context(|| format!("cannot list the runs of DrillSchedule {}", self.label))?
            .items;
        runs.sort_by_key(|r| (r.creation_timestamp().map(|t| t.0), r.name_any()));
        Ok(runs)
    }

    /// The newest finished run's outcome: status, condition and metrics; counted and announced
    /// once.
    async fn record(&self, status: &mut DrillScheduleStatus, runs: &[Failover]) {
        let Some(run) = runs.iter().rev().find_map(run_of) else {
            return;
        };
        let new = status.last_run.as_ref().is_none_or(|r| r.name != run.name);
        if new {
            if run.succeeded {
                status.consecutive_failures = 0;
                status.last_success_time = run.finished_time.clone();
            } else {
                status.consecutive_failures += 1;
            }
            let said = summary(&run);
            let reason = if run.succeeded {
                "DrillSucceeded"
            } else {
                "DrillFailed"
            };
            self.event(!run.succeeded, reason, said.clone()).await;
            set_condition(
                &mut status.conditions,
                "LastDrillSucceeded",
                run.succeeded,
                reason,
                said,
                self.ds.metadata.generation,
            );
        }
        let last_success_ms = status
            .last_success_time
            .as_deref()
            .and_then(|t| t.parse::<Timestamp>().ok())
            .map(|t| t.as_millisecond());
        self.ctx
            .metrics
            .drill_outcome(&self.label, (run.succeeded, new), last_success_ms);
        status.last_run = Some(run);
    }

    /// Deletes torn-down runs beyond the history limits (their reports go with them).
    async fn prune(&self, runs: &[Failover]) -> Result<()> {
        let done: Vec<(String, bool)> = runs
            .iter()
            .filter_map(|r| {
                let s = r.status.as_ref()?;
                (s.phase == FailoverPhase::TornDown)
                    .then(|| (r.name_any(), s.succeeded() == Some(true)))
            })
            .collect();
        let keep = (
            self.ds.spec.successful_runs_history_limit,
            self.ds.spec.failed_runs_history_limit,
        );
        for name in beyond_history(&done, keep) {
            match self.runs.delete(&name, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e).with_context(|| format!("cannot delete old drill {name}")),
            }
        }
        Ok(())
    }

    /// Starts the run that is due, unless the last one is still under way or not torn down.
    async fn start_due(
        &self,
        cron: &Cron,
        status: &mut DrillScheduleStatus,
        runs: &[Failover],
        now: Timestamp,
    ) -> Result<()> {
        if self.ds.spec.suspend {
            return Ok(());
        }
        let since = status
            .last_schedule_time
            .as_deref()
            .and_then(|t| t.parse::<Timestamp>().ok())
            .or_else(|| self.ds.creation_timestamp().map(|t| t.0))
            .unwrap_or(now);
        let Some(at) = due(cron, since, now) else {
            return Ok(());
        };
        status.last_schedule_time = Some(understudy_common::format_ms(at.as_millisecond()));
        let busy = runs
            .iter()
            .find(|r| r.status.as_ref().map(|s| s.phase) != Some(FailoverPhase::TornDown));
        if let Some(b) = busy {
            let why = format!(
                "the drill due at {} was skipped: the previous one, {}, has not been torn down yet",
                understudy_common::format_ms(at.as_millisecond()),
                b.name_any()
            );
            self.event(true, "Skipped", why).await;
            return Ok(());
        }
        let run = run_for(self.ds, at);
        create_once(&self.runs, &run).await?;
        self.event(
            false,
            "DrillStarted",
            format!("started drill {}", run.name_any()),
        )
        .await;
        Ok(())
    }

    async fn save(&self, before: &DrillScheduleStatus, after: &DrillScheduleStatus) -> Result<()> {
        if before == after {
            return Ok(());
        }
        Api::<DrillSchedule>::namespaced(
            self.ctx.client.clone(),
            &self.ds.namespace().unwrap_or_default(),
        )
        .patch_status(
            &self.ds.name_any(),
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "status": after })),
        )
        .await
        .with_context(|| format!("cannot update DrillSchedule {}", self.label))?;
        Ok(())
    }

    async fn event(&self, warning: bool, reason: &str, note: String) {
        let object = self.ds.object_ref(&());
        publish(
            &self.ctx.recorder,
            &object,
            "DrillSchedule",
            (warning, reason),
            note,
        )
        .await
    }
}

/// One line about a finished run.
fn summary(run: &DrillRun) -> String {
    let point = run
        .point
        .map_or("no point".to_string(), |p| format!("point {p}"));
    if run.succeeded {
        format!(
            "drill {} from {point}: ready in {:.1} s, {} volumes verified",
            run.name,
            run.rto_seconds.unwrap_or_default(),
            run.volumes_verified
        )
    } else {
        format!(
            "drill {} from {point} failed: {}",
            run.name,
            run.error.as_deref().unwrap_or("see its Failover")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn schedules_of_five_and_six_fields_parse_and_nonsense_is_named() {
        assert!(parse_schedule("0 3 * * 1").is_ok());
        assert!(parse_schedule("*/20 * * * * *").is_ok());
        let e = parse_schedule("every day").unwrap_err().to_string();
        assert!(e.contains("every day") && e.contains("five fields"), "{e}");
    }

    #[test]
    fn a_run_is_due_once_per_time_and_missed_times_collapse_into_one() {
        let hourly = parse_schedule("0 * * * *").unwrap();
        let since = at("2026-12-04T10:00:00Z");
        assert_eq!(due(&hourly, since, at("2026-12-04T10:59:59Z")), None);
        assert_eq!(
            due(&hourly, since, at("2026-12-04T11:00:00Z")),
            Some(at("2026-12-04T11:00:00Z"))
        );
        // Down from 10:30 to 13:20: one run, for 13:00.
        assert_eq!(
            due(
                &hourly,
                at("2026-12-04T10:30:00Z"),
                at("2026-12-04T13:20:00Z")
            ),
            Some(at("2026-12-04T13:00:00Z"))
        );
        assert_eq!(
            next(&hourly, at("2026-12-04T13:20:00Z")),
            Some(at("2026-12-04T14:00:00Z"))
        );
    }

    #[test]
    fn history_keeps_the_newest_of_each_outcome() {
        let runs: Vec<(String, bool)> = [
            ("a", true),
            ("b", false),
            ("c", true),
            ("d", true),
            ("e", false),
        ]
        .iter()
        .map(|(n, ok)| (n.to_string(), *ok))
        .collect();
        assert_eq!(beyond_history(&runs, (2, 1)), vec!["a", "b"]);
        assert_eq!(beyond_history(&runs, (3, 3)), Vec::<String>::new());
        assert_eq!(beyond_history(&runs, (0, 0)), vec!["a", "b", "c", "d", "e"]);
    }

    #[test]
    fn a_run_is_a_drill_with_a_ttl_owned_by_its_schedule() {
        let mut ds = DrillSchedule::new(
            "nightly",
            DrillScheduleSpec {
                schedule: "0 3 * * *".into(),
                template: FailoverSpec {
                    group: "shop.app".into(),
                    mode: FailoverMode::Failover,
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        ds.metadata.namespace = Some("dr".into());
        ds.metadata.uid = Some("u1".into());
        let fo = run_for(&ds, at("2026-12-04T03:00:00Z"));
        assert_eq!(fo.spec.mode, FailoverMode::Drill);
        assert_eq!(fo.spec.ttl.as_deref(), Some(DEFAULT_TTL));
        assert_eq!(fo.spec.group, "shop.app");
        assert_eq!(fo.name_any(), "nightly-1796353200");
        assert_eq!(fo.labels()[SCHEDULE_LABEL], "nightly");
        assert_eq!(fo.owner_references()[0].name, "nightly");
    }

    #[test]
    fn a_finished_run_is_recorded_with_its_outcome() {
        use understudy_kube::crd::failover::*;
        let mut fo = Failover::new("d-1", FailoverSpec::default());
        assert!(run_of(&fo).is_none());
        fo.status = Some(FailoverStatus {
            phase: FailoverPhase::TornDown,
            finished_time: Some("2026-12-04T03:01:00Z".into()),
            report: Some(FailoverReport {
                point: Some(ChosenPoint {
                    sequence: 7,
                    snapshot_time: String::new(),
                }),
                rto_seconds: Some(12.5),
                volumes: vec![RestoredVolume {
                    verified: true,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        });
        let run = run_of(&fo).unwrap();
        assert!(run.succeeded && run.point == Some(7) && run.volumes_verified == 1);
        fo.status.as_mut().unwrap().report.as_mut().unwrap().volumes[0].verified = false;
        assert!(
            !run_of(&fo).unwrap().succeeded,
            "an unverified volume fails the drill"
        );
    }
}
