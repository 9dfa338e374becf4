//! Failovers on the standby (kube-rs style): a `Failover` runs the application from a recovery
//! point, one step per reconcile, each recorded in `status.phase` before the next:
//!
//! Pending (choose the point, the RPO guard) -> RestoringVolumes (per claim of the point's
//! manifests, a PointVolume and the claim pointing at it: the populator rebuilds and verifies
//! it) -> ApplyingObjects (every other object, transformed, by the apply engine, once every
//! claim is bound) -> WaitingReady (Deployments, StatefulSets and DaemonSets ready) ->
//! Succeeded, with the report (point, RPO, RTO, per-volume digests, per-object outcomes); or
//! Failed, with what failed. A failover needs nothing from the primary: the point and its
//! manifests are in the store.
//!
//! A drill runs in namespaces of its own (checked before anything is made); deleting it deletes
//! them (a finalizer), and replication into the store goes on meanwhile.

pub mod plan;
pub mod schedule;

use crate::session::SessionContext;
use anyhow::{Context as _, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PersistentVolumeClaim};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use plan::Plan;
use std::sync::Arc;
use std::time::Duration;
use understudy_common::store::PointRecord;
use understudy_kube::agent_pods::create_once;
use understudy_kube::apply::{ApplyOptions, Outcome, apply};
use understudy_kube::controller::{ReconcileError, publish, shutdown_on};
use understudy_kube::crd::failover::*;
use understudy_kube::crd::point_volume::{PointVolume, PopulatePhase};

/// Finalizer that tears a drill down before its Failover goes.
pub const FINALIZER: &str = "understudy.io/teardown";
/// Field manager of what a run applies.
pub const MANAGER: &str = "understudy-failover";
const POLL: Duration = Duration::from_secs(2);

/// What every reconcile shares.
pub struct Context {
    client: Client,
    sessions: Arc<SessionContext>,
    recorder: Recorder,
    /// Plans by (Failover uid, generation, point): a run polls every few seconds, and a plan
    /// reads and checks the point's manifests from the store.
    plans: std::sync::Mutex<std::collections::HashMap<(String, i64, u64), Arc<Plan>>>,
}

/// A decision that ends the run as Failed (no such point, the RPO guard, a drill's namespaces,
/// a claim not rebuilt, objects rejected, the timeout); any other error is retried.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(String);

fn refused(e: impl std::fmt::Display) -> anyhow::Error {
    Refused(e.to_string()).into()
}

/// Runs the Failover controller until `stop` completes.
pub async fn run(
    client: Client,
    sessions: Arc<SessionContext>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let runs: Api<Failover> = Api::all(client.clone());
    runs.list(&Default::default()).await.context(
        "cannot list Failovers: is the CRD installed (`source-agent crds | kubectl apply -f -`) and may the agent list them?",
    )?;
    let reporter = Reporter {
        controller: "understudy-failover".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        sessions,
        plans: Default::default(),
    });
    Controller::new(runs, watcher::Config::default())
        .graceful_shutdown_on(shutdown_on(stop))
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "failover reconcile");
            }
        })
        .await;
    Ok(())
}

fn error_policy(_: Arc<Failover>, e: &ReconcileError, _: Arc<Context>) -> Action {
    tracing::warn!(error = %e, "a Failover step failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile(fo: Arc<Failover>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let api: Api<Failover> =
        Api::namespaced(ctx.client.clone(), &fo.namespace().unwrap_or_default());
    finalizer(&api, FINALIZER, fo, |event| async {
        match event {
            Finalizer::Apply(fo) => Run::new(&ctx, &fo).step().await,
            Finalizer::Cleanup(fo) => Run::new(&ctx, &fo).tear_down().await,
        }
        .map_err(ReconcileError)
    })
    .await
    .map_err(|e| ReconcileError(anyhow::anyhow!("{e}")))
}

/// One Failover, for one reconcile.
struct Run<'a> {
    ctx: &'a Context,
    fo: &'a Failover,
    api: Api<Failover>,
}

impl<'a> Run<'a> {
    fn new(ctx: &'a Context, fo: &'a Failover) -> Self {
        let api = Api::namespaced(ctx.client.clone(), &fo.namespace().unwrap_or_default());
        Run { ctx, fo, api }
    }

    fn status(&self) -> FailoverStatus {
        self.fo.status.clone().unwrap_or_default()
    }

    async fn step(&self) -> Result<Action> {
        let status = self.status();
        let result = match status.phase {
            FailoverPhase::Succeeded | FailoverPhase::Failed => return self.expire().await,
            FailoverPhase::TornDown => return Ok(Action::await_change()),
            FailoverPhase::Pending if self.fo.spec.mode == FailoverMode::Migrate => {
                self.request_migration().await
            }
            FailoverPhase::Pending => self.choose(None).await,
            FailoverPhase::FinalSync => self.await_final_point().await,
            FailoverPhase::RestoringVolumes => self.restore().await,
            FailoverPhase::ApplyingObjects => self.apply_objects().await,
            FailoverPhase::WaitingReady => self.wait_ready().await,
        };
        match result {
            Err(e) if e.downcast_ref::<Refused>().is_some() => {
                self.fail(e.to_string()).await?;
                Ok(Action::await_change())
            }
            other => other,
        }
    }

    /// A migration: asks the primary's source agent (through the store: it learns at its next
    /// session) for a final point.
    async fn request_migration(&self) -> Result<Action> {
        self.ttl()?;
        let (store, group, id) = self.migration_key();
        tokio::task::spawn_blocking(move || {
            store.request_migration(&group, &id, understudy_common::now_ms())
        })
        .await??;
        self.event(
            false,
            "MigrationRequested",
            format!(
                "asked the primary for a final point of group {}: its source agent stops the application at its next cycle",
                self.fo.spec.group
            ),
        )
        .await;
        self.advance(FailoverPhase::FinalSync, |_| {}).await?;
        Ok(Action::requeue(POLL))
    }

    /// A migration: on once the primary's final point is in the store.
    async fn await_final_point(&self) -> Result<Action> {
        let (store, group, id) = self.migration_key();
        let m = tokio::task::spawn_blocking(move || store.migration(&group)).await??;
        match m {
            Some(m) if m.id == id => match m.final_seq {
                Some(seq) => self.choose(Some(seq)).await,
                None => self.before_timeout("the primary's final point did not arrive: is its source agent running and reaching this target? Without the primary, fail over with mode: failover").await,
            },
            _ => Err(refused(
                "another migration of the group replaced this one; make a new Failover",
            )),
        }
    }

    /// Requeues, or refuses with `why` once the run's timeout has passed.
    async fn before_timeout(&self, why: &str) -> Result<Action> {
        let limit = self.timeout()?;
        let elapsed_ms = understudy_common::now_ms() - self.requested_ms();
        if elapsed_ms as u128 >= limit.as_millis() {
            return Err(refused(format!(
                "not done after {}: {why}",
                humantime::format_duration(limit)
            )));
        }
        Ok(Action::requeue(POLL))
    }

    /// The store, group and id of this run's migration request.
    fn migration_key(&self) -> (Arc<understudy_common::store::Store>, String, String) {
        (
            self.ctx.sessions.store.clone(),
            self.fo.spec.group.clone(),
            self.fo.uid().unwrap_or_default(),
        )
    }

    /// Withdraws this run's migration request if the final point has not come (the primary's
    /// source brings its application back).
    async fn withdraw_migration(&self) -> Result<()> {
        if self.fo.spec.mode != FailoverMode::Migrate {
            return Ok(());
        }
        let (store, group, id) = self.migration_key();
        tokio::task::spawn_blocking(move || match store.migration(&group)? {
            Some(m) if m.id == id && m.pending() => store.cancel_migration(&group, &id),
            _ => Ok(()),
        })
        .await?
    }

    /// The point the spec names (or a migration's final point), checked against the RPO guard.
    async fn choose(&self, final_point: Option<u64>) -> Result<Action> {
        self.ttl()?;
        let point = match final_point {
            Some(seq) => self.point_seq(seq).await,
            None => self.point().await,
        }
        .map_err(|e| refused(format!("{e:#}")))?;
        let requested = self.requested_ms();
        let guard = match &self.fo.spec.max_point_age {
            Some(d) => Some(crate::failover::AgeGuard {
                max_age: humantime::parse_duration(d).map_err(|_| {
                    refused(format!("maxPointAge `{d}` is not a duration like 15m"))
                })?,
                on_older: match self.fo.spec.rpo_guard {
                    RpoGuardPolicy::Refuse => crate::failover::RpoGuard::Refuse,
                    RpoGuardPolicy::Warn => crate::failover::RpoGuard::Warn,
                },
                words: crate::failover::GuardWords::FAILOVER,
            }),
            None => None,
        };
        let warning = crate::failover::check_point_age(
            guard.as_ref(),
            point.seq,
            point.cut.created_ms,
            requested,
        )
        .map_err(|e| refused(format!("{e:#}")))?;
        let plan = self
            .plan(&point)
            .await
            .map_err(|e| refused(format!("{e:#}")))?;
        if self.fo.spec.mode == FailoverMode::Drill {
            plan::check_drill(&self.fo.spec, &plan).map_err(refused)?;
            for ns in &plan.namespaces {
                let api: Api<Namespace> = Api::all(self.ctx.client.clone());
                if api.get_opt(ns).await?.is_some() {
                    return Err(refused(format!(
                        "namespace {ns} exists already: a drill makes its own; map to a new name"
                    )));
                }
            }
        }
        let mut report = FailoverReport {
            point: Some(ChosenPoint {
                sequence: point.seq,
                snapshot_time: understudy_common::format_ms(point.cut.created_ms),
            }),
            rpo_seconds: Some((requested - point.cut.created_ms).max(0) / 1000),
            namespaces: plan.namespaces.iter().cloned().collect(),
            final_state: final_point.is_some(),
            ..Default::default()
        };
        if let Some(w) = warning {
            self.event(true, "OldPoint", w.clone()).await;
            report.warnings.push(w);
        }
        self.event(
            false,
            "PointChosen",
            format!(
                "point {} (cut {}), {} volumes, {} objects",
                point.seq,
                understudy_common::format_ms(point.cut.created_ms),
                plan.claims.len(),
                plan.objects.len()
            ),
        )
        .await;
        self.advance(FailoverPhase::RestoringVolumes, |s| s.report = Some(report))
            .await?;
        Ok(Action::requeue(POLL))
    }

    /// Every claim with its PointVolume; on once every claim is bound.
    async fn restore(&self) -> Result<Action> {
        let point = self.chosen_point().await?;
        let plan = self.plan(&point).await?;
        let mut volumes = Vec::new();
        for ns in &plan.namespaces {
            let ns_obj: Namespace = serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}
            }))?;
            create_once(&Api::all(self.ctx.client.clone()), &ns_obj).await?;
        }
        for c in &plan.claims {
            let sources: Api<PointVolume> = Api::namespaced(self.ctx.client.clone(), &c.namespace);
            let source: PointVolume = serde_json::from_value(serde_json::json!({
                "apiVersion": "understudy.io/v1alpha1", "kind": "PointVolume",
                "metadata": {"name": c.name, "namespace": c.namespace},
                "spec": {"group": self.fo.spec.group, "point": point.seq.to_string(), "volume": c.volume},
            }))?;
            create_once(&sources, &source).await?;
            let claims: Api<PersistentVolumeClaim> =
                Api::namespaced(self.ctx.client.clone(), &c.namespace);
            create_once(&claims, &serde_json::from_value(c.object.clone())?).await?;
            let made = sources.get(&c.name).await?;
            self.check_ours(c, &made, &claims.get(&c.name).await?, point.seq)?;
            let status = made.status.unwrap_or_default();
            if status.phase == PopulatePhase::Failed {
                return Err(refused(format!(
                    "claim {}/{} (volume {} of point {}) was not rebuilt: {}",
                    c.namespace,
                    c.name,
                    c.volume,
                    point.seq,
                    status.message.unwrap_or_default()
                )));
            }
            let bound = claims
                .get(&c.name)
                .await?
                .status
                .and_then(|s| s.phase)
                .as_deref()
                == Some("Bound");
            volumes.push(RestoredVolume {
                pvc: format!("{}/{}", c.namespace, c.name),
                bytes_written: status.bytes_written,
                verified: bound && status.phase == PopulatePhase::Bound && status.verified(),
                expected_digest: status.expected_digest.unwrap_or_default(),
                actual_digest: status.actual_digest.unwrap_or_default(),
            });
        }
        // The populator marks its PointVolume Bound after the hand-over, so a claim can be seen
        // bound a moment before: on only when both say so.
        if volumes.iter().any(|v| !v.verified) {
            return Ok(Action::requeue(POLL));
        }
        let n = volumes.len();
        self.advance(FailoverPhase::ApplyingObjects, |s| {
            let r = s.report.get_or_insert_with(Default::default);
            r.volumes = volumes;
        })
        .await?;
        self.event(
            false,
            "VolumesRestored",
            format!("{n} claims rebuilt, verified and bound"),
        )
        .await;
        Ok(Action::requeue(POLL))
    }

    /// A claim (or PointVolume) of that name that was there before is never taken for this
    /// run's: it may hold other data, or another point's.
    fn check_ours(
        &self,
        c: &plan::Claim,
        source: &PointVolume,
        claim: &PersistentVolumeClaim,
        seq: u64,
    ) -> Result<()> {
        let wanted = (
            self.fo.spec.group.as_str(),
            seq.to_string(),
            c.volume.as_str(),
        );
        let has = (
            source.spec.group.as_str(),
            source.spec.point.clone(),
            source.spec.volume.as_str(),
        );
        let source_ref = claim.spec.as_ref().and_then(|s| s.data_source_ref.as_ref());
        let points_at_it = source_ref.is_some_and(|r| r.kind == "PointVolume" && r.name == c.name);
        if has != wanted || !points_at_it {
            return Err(refused(format!(
                "claim {}/{} exists already and is not this run's rebuild of volume {} of point {seq}: a run rebuilds claims that do not exist yet; delete it, or map the namespace to a new one",
                c.namespace, c.name, c.volume
            )));
        }
        Ok(())
    }

    /// Every other object, through the apply engine.
    async fn apply_objects(&self) -> Result<Action> {
        let point = self.chosen_point().await?;
        let plan = self.plan(&point).await?;
        let opts = ApplyOptions {
            field_manager: MANAGER.into(),
            ..ApplyOptions::default()
        };
        let report = apply(&self.ctx.client, plan.objects.clone(), &opts).await;
        let objects: Vec<AppliedObject> = report
            .results
            .iter()
            .map(|r| AppliedObject {
                object: r.object.to_string(),
                outcome: format!("{:?}", r.outcome).to_lowercase(),
                message: r.message.clone(),
            })
            .collect();
        let rejected: Vec<String> = report
            .results
            .iter()
            .filter(|r| r.outcome == Outcome::Rejected)
            .map(|r| format!("{}: {}", r.object, r.message.clone().unwrap_or_default()))
            .collect();
        self.advance(FailoverPhase::WaitingReady, |s| {
            s.report.get_or_insert_with(Default::default).objects = objects;
        })
        .await?;
        if !rejected.is_empty() {
            return Err(refused(format!(
                "the standby rejected {} objects: {}",
                rejected.len(),
                rejected.join("; ")
            )));
        }
        Ok(Action::requeue(POLL))
    }

    /// The workloads ready, or the timeout.
    async fn wait_ready(&self) -> Result<Action> {
        let point = self.chosen_point().await?;
        let plan = self.plan(&point).await?;
        let mut waiting = Vec::new();
        let mut resolver = understudy_kube::Resolver::new(self.ctx.client.clone());
        for (id, obj) in &plan.objects {
            if let Some(why) = self.not_ready(&mut resolver, id, obj).await? {
                waiting.push(why);
            }
        }
        if !waiting.is_empty() {
            return self
                .before_timeout(&format!("not ready: {}", waiting.join("; ")))
                .await;
        }
        let elapsed_ms = understudy_common::now_ms() - self.requested_ms();
        let rto = elapsed_ms as f64 / 1000.0;
        self.advance(FailoverPhase::Succeeded, |s| {
            s.report.get_or_insert_with(Default::default).rto_seconds = Some(rto);
            understudy_kube::crd::set_condition(
                &mut s.conditions,
                "Ready",
                true,
                "Succeeded",
                format!("the application runs from point {}", point.seq),
                self.fo.metadata.generation,
            );
        })
        .await?;
        self.event(
            false,
            "Succeeded",
            format!("the application runs from point {} ({rto:.1} s)", point.seq),
        )
        .await;
        Ok(Action::await_change())
    }

    /// Why a workload is not ready yet, if it is one and is not.
    async fn not_ready(
        &self,
        resolver: &mut understudy_kube::Resolver,
        id: &understudy_kube::bundle::ObjectId,
        obj: &serde_json::Value,
    ) -> Result<Option<String>> {
        let (want, have) = match (id.group.as_str(), id.kind.as_str()) {
            ("apps", "Deployment" | "StatefulSet") => ("/spec/replicas", "/status/readyReplicas"),
            ("apps", "DaemonSet") => ("/status/desiredNumberScheduled", "/status/numberReady"),
            _ => return Ok(None),
        };
        let api_version = obj
            .get("apiVersion")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("apps/v1");
        let (ar, _) = resolver.resolve(api_version, &id.kind).await?;
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.ctx.client.clone(), &id.namespace, &ar);
        let Some(live) = api.get_opt(&id.name).await? else {
            return Ok(Some(format!("{id} is missing")));
        };
        let live = serde_json::to_value(live)?;
        let n = |p: &str| live.pointer(p).and_then(serde_json::Value::as_i64);
        let want = n(want).unwrap_or(1);
        let have = n(have).unwrap_or(0);
        Ok((have < want).then(|| format!("{id}: {have} of {want} ready")))
    }

    /// A drill's namespaces go with it (a failover's application stays).
    async fn tear_down(&self) -> Result<Action> {
        self.withdraw_migration().await?;
        if self.fo.spec.mode != FailoverMode::Drill {
            return Ok(Action::await_change());
        }
        let left = self.delete_namespaces().await?;
        if left > 0 {
            // The finalizer holds until they are gone.
            anyhow::bail!("waiting for {left} drill namespaces to be deleted");
        }
        if self.status().phase != FailoverPhase::TornDown {
            self.torn_down_event().await;
        }
        Ok(Action::await_change())
    }

    /// A finished drill with a `ttl`: its copy deleted once the ttl has passed, then TornDown
    /// (the Failover and its report stay).
    async fn expire(&self) -> Result<Action> {
        // A bad ttl failed the run in Pending already; it is not refused twice.
        let Ok(Some(ttl)) = self.ttl() else {
            return Ok(Action::await_change());
        };
        let finished = self
            .status()
            .finished_time
            .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
            .map_or_else(understudy_common::now_ms, |t| t.as_millisecond());
        let left_ms = finished + ttl.as_millis() as i64 - understudy_common::now_ms();
        if left_ms > 0 {
            return Ok(Action::requeue(Duration::from_millis(left_ms as u64)));
        }
        if self.delete_namespaces().await? > 0 {
            return Ok(Action::requeue(POLL));
        }
        self.advance(FailoverPhase::TornDown, |_| {}).await?;
        self.torn_down_event().await;
        Ok(Action::await_change())
    }

    /// Deletes the run's namespaces; returns how many are still there (being deleted).
    async fn delete_namespaces(&self) -> Result<usize> {
        let api: Api<Namespace> = Api::all(self.ctx.client.clone());
        let mut left = 0;
        for ns in self.namespaces() {
            match api.delete(&ns, &DeleteParams::background()).await {
                Ok(_) => left += 1,
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e).with_context(|| format!("cannot delete namespace {ns}")),
            }
        }
        Ok(left)
    }

    fn namespaces(&self) -> Vec<String> {
        self.status()
            .report
            .map(|r| r.namespaces)
            .unwrap_or_default()
    }

    async fn torn_down_event(&self) {
        let namespaces = self.namespaces().join(", ");
        self.event(
            false,
            "TornDown",
            format!("drill namespaces {namespaces} deleted"),
        )
        .await;
    }

    /// The drill's `ttl`; refused on a run that is not a drill.
    fn ttl(&self) -> Result<Option<Duration>> {
        let Some(t) = &self.fo.spec.ttl else {
            return Ok(None);
        };
        if self.fo.spec.mode != FailoverMode::Drill {
            return Err(refused(
                "ttl is for drills (a failover's application stays): remove it, or set mode: drill",
            ));
        }
        humantime::parse_duration(t)
            .map(Some)
            .map_err(|_| refused(format!("ttl `{t}` is not a duration like 10m")))
    }

    /// The point the spec names.
    async fn point(&self) -> Result<PointRecord> {
        let sel: crate::failover::PointSelector = self.fo.spec.point.parse()?;
        let store = self.ctx.sessions.store.clone();
        let group = self.fo.spec.group.clone();
        tokio::task::spawn_blocking(move || crate::failover::select_point(&store, &group, &sel))
            .await?
    }

    /// The point chosen in Pending.
    async fn chosen_point(&self) -> Result<PointRecord> {
        let seq = self
            .status()
            .report
            .and_then(|r| r.point)
            .map(|p| p.sequence)
            .context("no point chosen")?;
        self.point_seq(seq).await
    }

    /// Point `seq` of the group.
    async fn point_seq(&self, seq: u64) -> Result<PointRecord> {
        let store = self.ctx.sessions.store.clone();
        let group = self.fo.spec.group.clone();
        tokio::task::spawn_blocking(move || {
            crate::failover::select_point(&store, &group, &crate::failover::PointSelector::Seq(seq))
        })
        .await?
    }

    /// The plan for `point` with the Failover's rules, made once per run, generation and point.
    async fn plan(&self, point: &PointRecord) -> Result<Arc<Plan>> {
        let key = (
            self.fo.uid().unwrap_or_default(),
            self.fo.metadata.generation.unwrap_or(0),
            point.seq,
        );
        if let Some(p) = self.ctx.plans.lock().expect("plans lock").get(&key) {
            return Ok(p.clone());
        }
        let text = self.rules_text().await?;
        let rules = plan::rules(&self.fo.spec, text.as_deref())?;
        let store = self.ctx.sessions.store.clone();
        let p = point.clone();
        let made =
            Arc::new(tokio::task::spawn_blocking(move || plan::plan(&store, &p, &rules)).await??);
        let mut plans = self.ctx.plans.lock().expect("plans lock");
        // Only runs under way keep theirs; a finished run's plan is never asked for again.
        if plans.len() > 64 {
            plans.clear();
        }
        plans.insert(key, made.clone());
        Ok(made)
    }

    /// The rules text: inline, or the `rules.yaml` of a ConfigMap in the Failover's namespace.
    async fn rules_text(&self) -> Result<Option<String>> {
        let Some(src) = &self.fo.spec.rules else {
            return Ok(None);
        };
        if let Some(t) = &src.inline {
            return Ok(Some(t.clone()));
        }
        let Some(name) = &src.config_map_name else {
            return Ok(None);
        };
        let cms: Api<ConfigMap> = Api::namespaced(
            self.ctx.client.clone(),
            &self.fo.namespace().unwrap_or_default(),
        );
        let cm = cms
            .get(name)
            .await
            .with_context(|| format!("rules ConfigMap {name}"))?;
        cm.data
            .and_then(|d| d.get("rules.yaml").cloned())
            .map(Some)
            .with_context(|| format!("ConfigMap {name} has no key rules.yaml"))
    }

    /// When the Failover was made (ms since the Unix epoch): RPO and RTO are measured from it.
    fn requested_ms(&self) -> i64 {
        self.fo
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or_else(understudy_common::now_ms, |t| t.0.as_millisecond())
    }

    fn timeout(&self) -> Result<Duration> {
        match &self.fo.spec.timeout {
            Some(t) => humantime::parse_duration(t)
                .map_err(|_| refused(format!("timeout `{t}` is not a duration like 30m"))),
            None => Ok(Duration::from_secs(3600)),
        }
    }

    /// Moves to `phase` with `change` applied to the status.
    async fn advance(
        &self,
        phase: FailoverPhase,
        change: impl FnOnce(&mut FailoverStatus),
    ) -> Result<()> {
        let mut status = self.status();
        status.phase = phase;
        status.observed_generation = self.fo.metadata.generation;
        if phase.finished() && status.finished_time.is_none() {
            status.finished_time = Some(understudy_common::format_ms(understudy_common::now_ms()));
        }
        change(&mut status);
        self.api
            .patch_status(
                &self.fo.name_any(),
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"status": status})),
            )
            .await
            .with_context(|| format!("cannot update Failover {}", self.fo.name_any()))?;
        Ok(())
    }

    /// Failed, with what failed (a migration's request withdrawn).
    async fn fail(&self, why: String) -> Result<()> {
        self.withdraw_migration().await?;
        self.event(true, "Failed", why.clone()).await;
        let generation = self.fo.metadata.generation;
        self.advance(FailoverPhase::Failed, |s| {
            s.report.get_or_insert_with(Default::default).error = Some(why.clone());
            understudy_kube::crd::set_condition(
                &mut s.conditions,
                "Ready",
                false,
                "Failed",
                why,
                generation,
            );
        })
        .await
    }

    /// Publishes an event on the Failover.
    async fn event(&self, warning: bool, reason: &str, note: String) {
        let run = self.fo.object_ref(&());
        publish(
            &self.ctx.recorder,
            &run,
            "Failover",
            (warning, reason),
            note,
        )
        .await
    }
}
