//! The source agent as a Kubernetes controller: it reconciles `ReplicationGroup`s (kube-rs
//! style: `reconcile(object, context) -> Action`, small steps, status through the status
//! subresource, cleanup through a finalizer).
//!
//! A cycle is a sequence of steps ([`cycle`]), each recorded in `status.cycle.phase` before its
//! effects, so a controller killed at any point resumes the cycle or cleans it up:
//! snapshot (pre hooks, the snapshot instant, post hooks) -> wait until the snapshots are ready
//! -> movers (one pod per volume, reading a PVC restored from its member snapshot, staging it
//! on the target) -> commit (the staged volumes and the captured manifests, one recovery point)
//! -> clean up (every object the cycle made, found by its labels).

pub mod cycle;
pub mod migration;
pub mod objects;
pub mod scope;

use anyhow::{Context as _, Result};
use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use understudy_common::metrics::Metrics;
pub use understudy_kube::controller::ReconcileError;
use understudy_kube::controller::{publish, shutdown_on};
use understudy_kube::crd::replication_group::{ReplicationGroup, ReplicationGroupStatus};

/// Finalizer that makes the controller delete a group's cycle objects before the group goes.
pub const FINALIZER: &str = "understudy.io/cleanup";
/// Field manager of the controller's writes.
pub const MANAGER: &str = "understudy-source";

/// What every reconcile shares.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Namespace of the agent (its identity Secrets live here).
    pub agent_namespace: String,
    /// Image of the mover pods (holds `/bin/source-agent`).
    pub mover_image: String,
    /// The agent's ServiceAccount: movers get tokens of it for the SnapshotMetadata API.
    pub service_account: String,
    /// Scratch space (the manifests' frames while a commit runs).
    pub state_dir: PathBuf,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Events.
    pub recorder: Recorder,
    /// Stages this process started (a stage in a cycle's first step that is not among them
    /// was left by a controller that was killed).
    fresh: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Namespace to watch (`None`: all).
    pub namespace: Option<String>,
    /// Namespace of the agent.
    pub agent_namespace: String,
    /// Image of the mover pods.
    pub mover_image: String,
    /// The agent's ServiceAccount (in the agent's namespace).
    pub service_account: String,
    /// Scratch directory.
    pub state_dir: PathBuf,
}

/// Runs the controller until `stop` completes.
pub async fn run(
    client: Client,
    cfg: ControllerConfig,
    metrics: Arc<Metrics>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let groups: Api<ReplicationGroup> = match &cfg.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    groups.list(&Default::default()).await.context(
        "cannot list ReplicationGroups: is the CRD installed (`source-agent crds | kubectl apply -f -`) and may the agent list them?",
    )?;
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("cannot create {}", cfg.state_dir.display()))?;
    let reporter = Reporter {
        controller: "understudy-source-agent".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        agent_namespace: cfg.agent_namespace,
        mover_image: cfg.mover_image,
        service_account: cfg.service_account,
        state_dir: cfg.state_dir,
        metrics,
        fresh: Default::default(),
    });
    Controller::new(groups, watcher::Config::default())
        .graceful_shutdown_on(shutdown_on(stop))
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "reconcile");
            }
        })
        .await;
    Ok(())
}

/// One reconcile: the finalizer first, then the group's cycle.
async fn reconcile(rg: Arc<ReplicationGroup>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let ns = rg.namespace().unwrap_or_default();
    let api: Api<ReplicationGroup> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, rg, |event| async {
        match event {
            Finalizer::Apply(rg) => cycle::apply(&rg, &ctx).await,
            Finalizer::Cleanup(rg) => cycle::delete(&rg, &ctx).await,
        }
        .map_err(ReconcileError)
    })
    .await
    .map_err(|e| ReconcileError(anyhow::anyhow!("{e}")))
}

/// A failed reconcile is retried soon; the cycle's own failures are handled in [`cycle`].
fn error_policy(rg: Arc<ReplicationGroup>, e: &ReconcileError, _: Arc<Context>) -> Action {
    tracing::warn!(group = %rg.name_any(), error = %e, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

impl Context {
    /// Records that this process started `stage`.
    pub fn started(&self, stage: &str) {
        self.fresh
            .lock()
            .expect("stages lock")
            .insert(stage.to_string());
    }

    /// True when this process started `stage`.
    pub fn is_fresh(&self, stage: &str) -> bool {
        self.fresh.lock().expect("stages lock").contains(stage)
    }

    /// Forgets `stage` (its cycle ended).
    pub fn finished(&self, stage: &str) {
        self.fresh.lock().expect("stages lock").remove(stage);
    }

    /// Writes the group's status (the whole object, merged).
    pub async fn set_status(
        &self,
        rg: &ReplicationGroup,
        status: &ReplicationGroupStatus,
    ) -> Result<()> {
        let api: Api<ReplicationGroup> =
            Api::namespaced(self.client.clone(), &rg.namespace().unwrap_or_default());
        // A merge patch leaves out what it does not name: what the new status no longer holds
        // (the cycle that ended, a last error cleared) is removed with explicit nulls.
        let mut new = serde_json::to_value(status)?;
        let old = serde_json::to_value(rg.status.clone().unwrap_or_default())?;
        if let (Some(new), Some(old)) = (new.as_object_mut(), old.as_object()) {
            for k in old.keys() {
                new.entry(k.clone()).or_insert(serde_json::Value::Null);
            }
        }
        let patch = serde_json::json!({"status": new});
        api.patch_status(
            &rg.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .with_context(|| {
            format!(
                "cannot update the status of ReplicationGroup {}",
                rg.name_any()
            )
        })?;
        Ok(())
    }

    /// Publishes an event on the group (a failure to do so is only logged).
    pub async fn event(&self, rg: &ReplicationGroup, warning: bool, reason: &str, note: String) {
        let group = rg.object_ref(&());
        publish(&self.recorder, &group, "Replicate", (warning, reason), note).await
    }
}
