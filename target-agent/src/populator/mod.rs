//! The volume populator (KEP-1495): PVCs whose `dataSourceRef` names a [`PointVolume`] are
//! rebuilt from the point, in the target agent's process (it holds the store and the grants).
//!
//! Per claim, kube-rs style, each reconcile takes the next step and requeues:
//! resolve the point (once, into the PointVolume's status) -> make the prime PVC (the claim's
//! request in Block mode, no data source; the CSI driver provisions it) -> grant a writer the
//! volume and put its ticket in a Secret -> run the writer pod on the prime (it checks every
//! chunk and reads back what it wrote) -> when it reports the volume verified, hand the prime's
//! PV to the claim (its claimRef; the PV controller binds) -> once the claim is bound, delete
//! the prime, the pod and the Secret. A claim is never bound to a volume a writer did not
//! verify: a failed writer is run again (a new key, a new grant), up to [`MAX_ATTEMPTS`], then
//! the PointVolume is Failed with the writer's words and the claim stays unbound.
//!
//! Grants live in this process's memory: after a restart, a writer whose grant is gone is
//! replaced (its Secret and pod deleted, a new ticket made).

pub mod objects;

use crate::session::SessionContext;
use crate::ticket::{TicketArgs, WriterTicket, issue};
use crate::writer::WriteReport;
use anyhow::{Context as _, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod, Secret};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use std::sync::Arc;
use std::time::Duration;
use understudy_common::transport::grants::Permit;
use understudy_kube::agent_pods::{PodState, create_once, delete_if_present, pod_state, ticket_of};
use understudy_kube::controller::{ReconcileError, publish, shutdown_on};
use understudy_kube::crd::point_volume::{PointVolume, PointVolumeStatus, PopulatePhase};

/// Writers run for one claim before it is given up.
pub const MAX_ATTEMPTS: u32 = 3;
/// How long a writer's grant lasts.
const GRANT_TTL: Duration = Duration::from_secs(6 * 3600);
/// Requeue while a step is under way.
const POLL: Duration = Duration::from_secs(2);

/// How the populator runs.
#[derive(Clone, Debug)]
pub struct PopulatorConfig {
    /// The agents image (holds `/bin/target-agent`).
    pub writer_image: String,
    /// Where writer pods reach this agent's QUIC server, `host:port`.
    pub advertise: String,
}

/// What every reconcile shares.
pub struct Context {
    client: Client,
    sessions: Arc<SessionContext>,
    cfg: PopulatorConfig,
    recorder: Recorder,
}

/// Runs the populator until `stop` completes.
pub async fn run(
    client: Client,
    sessions: Arc<SessionContext>,
    cfg: PopulatorConfig,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let sources: Api<PointVolume> = Api::all(client.clone());
    sources.list(&Default::default()).await.context(
        "cannot list PointVolumes: is the CRD installed (`source-agent crds | kubectl apply -f -`) and may the agent list them?",
    )?;
    let reporter = Reporter {
        controller: "understudy-populator".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
        sessions,
        cfg,
    });
    let claims: Api<PersistentVolumeClaim> = Api::all(client);
    Controller::new(claims, watcher::Config::default())
        .graceful_shutdown_on(shutdown_on(stop))
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "populator reconcile");
            }
        })
        .await;
    Ok(())
}

fn error_policy(_: Arc<PersistentVolumeClaim>, e: &ReconcileError, _: Arc<Context>) -> Action {
    tracing::warn!(error = %e, "populating a claim failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// The PointVolume a claim is populated from, if it names one.
fn source_of(claim: &PersistentVolumeClaim) -> Option<String> {
    let r = claim.spec.as_ref()?.data_source_ref.as_ref()?;
    (r.api_group.as_deref() == Some("understudy.io") && r.kind == "PointVolume")
        .then(|| r.name.clone())
}

/// One step for one claim.
async fn reconcile(
    claim: Arc<PersistentVolumeClaim>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let Some(source) = source_of(&claim) else {
        return Ok(Action::await_change());
    };
    if claim.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change()); // its objects go with it (owner references)
    }
    let ns = claim.namespace().unwrap_or_default();
    let step = Step {
        ctx: &ctx,
        claim: &claim,
        sources: Api::namespaced(ctx.client.clone(), &ns),
        source,
        name: objects::name_for(&claim),
    };
    Ok(step.run().await?)
}

/// The objects one reconcile works on.
struct Step<'a> {
    ctx: &'a Context,
    claim: &'a PersistentVolumeClaim,
    sources: Api<PointVolume>,
    source: String,
    name: String,
}

impl Step<'_> {
    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(
            self.ctx.client.clone(),
            &self.claim.namespace().unwrap_or_default(),
        )
    }

    async fn run(&self) -> Result<Action> {
        let bound = self.claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
        if bound {
            self.confirm_bound().await?;
            return Ok(if self.clean_up().await? {
                Action::await_change()
            } else {
                Action::requeue(POLL)
            });
        }
        let Some(pv) = self.sources.get_opt(&self.source).await? else {
            self.event(
                true,
                "NoSource",
                format!(
                    "PointVolume {} does not exist: create it, or fix the claim's dataSourceRef",
                    self.source
                ),
            )
            .await;
            return Ok(Action::requeue(Duration::from_secs(10)));
        };
        let status = pv.status.clone().unwrap_or_default();
        match status.phase {
            PopulatePhase::Failed => return Ok(Action::await_change()),
            // Handed over: waiting for the PV controller to bind the claim.
            PopulatePhase::Bound => return Ok(Action::requeue(POLL)),
            _ => {}
        }
        if let Some(mode) = objects::unsupported_mode(self.claim) {
            let msg = format!(
                "claim {} asks for volumeMode {mode}: the populator writes Block and Filesystem claims",
                self.claim.name_any()
            );
            self.set_status(PopulatePhase::Failed, |s| s.message = Some(msg.clone()))
                .await?;
            self.event(true, "UnsupportedMode", msg).await;
            return Ok(Action::await_change());
        }
        let seq = match status.sequence {
            Some(s) => s,
            None => self.resolve(&pv).await?,
        };
        create_once(&self.api(), &objects::prime_claim(self.claim)?).await?;
        let Some(ticket) = self.ticket(&pv, seq).await? else {
            return Ok(Action::requeue(POLL));
        };
        let pods: Api<Pod> = self.api();
        match pod_state::<WriteReport>(&pods, &self.name).await? {
            PodState::Absent => {
                let pod = objects::writer_pod(self.claim, &self.ctx.cfg.writer_image)?;
                create_once(&pods, &pod).await?;
                self.set_status(PopulatePhase::Writing, |s| {
                    s.attempts += 1;
                    s.expected_digest = Some(ticket.digest.clone());
                    s.message = Some(format!("writer {} started", self.name));
                })
                .await?;
                Ok(Action::requeue(POLL))
            }
            PodState::Running => Ok(Action::requeue(POLL)),
            PodState::Done(report) => self.bind(&report).await,
            PodState::Failed(why) => self.writer_failed(&pv, why).await,
        }
    }

    /// Resolves the PointVolume's point into its status.
    async fn resolve(&self, pv: &PointVolume) -> Result<u64> {
        let sel: crate::failover::PointSelector = pv.spec.point.parse()?;
        let store = self.ctx.sessions.store.clone();
        let group = pv.spec.group.clone();
        let point = tokio::task::spawn_blocking(move || {
            crate::failover::select_point(&store, &group, &sel)
        })
        .await??;
        self.set_status(PopulatePhase::Pending, |s| s.sequence = Some(point.seq))
            .await?;
        Ok(point.seq)
    }

    /// The writer's ticket: made (with its grant) when absent; when its grant is gone (this
    /// agent restarted), the Secret and any pod are deleted and `None` says to come back.
    async fn ticket(&self, pv: &PointVolume, seq: u64) -> Result<Option<WriterTicket>> {
        let secrets: Api<Secret> = self.api();
        if let Some(s) = secrets.get_opt(&self.name).await? {
            let t: WriterTicket = ticket_of(&s)?;
            let fp = understudy_common::transport::Identity::from_pem(
                t.cert_pem.as_bytes(),
                t.key_pem.as_bytes(),
            )?
            .fingerprint;
            let now = understudy_common::now_ms();
            if matches!(
                self.ctx.sessions.grants.get(&fp, now),
                Some(Permit::Fetch(_))
            ) {
                return Ok(Some(t));
            }
            tracing::info!(claim = %self.claim.name_any(), "a writer's grant is gone (the agent restarted): making a new ticket");
            self.delete_writer().await?;
            return Ok(None);
        }
        let args = TicketArgs {
            dir: Default::default(),
            group: pv.spec.group.clone(),
            point: crate::failover::PointSelector::Seq(seq),
            volume: pv.spec.volume.clone(),
            target: self.ctx.cfg.advertise.clone(),
            ttl: GRANT_TTL,
            out: Default::default(),
        };
        let t = issue(&self.ctx.sessions, &args, understudy_common::now_ms())?;
        create_once(&secrets, &objects::ticket_secret(self.claim, &t)?).await?;
        Ok(Some(t))
    }

    /// The writer verified the volume: hand the prime's PV to the claim.
    async fn bind(&self, report: &WriteReport) -> Result<Action> {
        anyhow::ensure!(
            report.ok,
            "writer {} ended without verifying the volume",
            self.name
        );
        let primes: Api<PersistentVolumeClaim> = self.api();
        let prime = primes
            .get(&self.name)
            .await
            .context("the prime PVC is gone")?;
        let Some(volume) = prime.spec.and_then(|s| s.volume_name) else {
            return Ok(Action::requeue(POLL));
        };
        // Recorded before the hand-over, so that the claim is never bound to a volume whose
        // verification is not on record (an agent killed right after it finishes the job).
        self.set_status(PopulatePhase::Writing, |s| {
            s.bytes_written = report.bytes_written;
            s.actual_digest = Some(report.actual_digest.clone());
            s.message = Some(format!(
                "written and verified; handing volume {volume} to the claim"
            ));
        })
        .await?;
        let pvs: Api<PersistentVolume> = Api::all(self.ctx.client.clone());
        let volume = if objects::is_block(self.claim) {
            pvs.patch(
                &volume,
                &PatchParams::default(),
                &Patch::Merge(objects::claim_ref_patch(self.claim)),
            )
            .await
            .with_context(|| format!("cannot hand volume {volume} to the claim"))?;
            volume
        } else {
            self.hand_over_as_filesystem(&pvs, &volume).await?
        };
        self.set_status(PopulatePhase::Bound, |s| {
            s.message = Some(format!(
                "written and verified; volume {volume} bound to the claim"
            ));
        })
        .await?;
        self.event(
            false,
            "Populated",
            format!(
                "volume {} of point {} written ({} bytes), verified (digest {}), bound as {volume}",
                report.volume, report.seq, report.bytes_written, report.actual_digest
            ),
        )
        .await;
        Ok(Action::requeue(POLL))
    }

    /// The claim is bound: a verified PointVolume whose hand-over was cut short (the agent
    /// stopped between the two) is marked Bound. One without a verification on record stays as
    /// it is, so that nothing reads it as rebuilt.
    async fn confirm_bound(&self) -> Result<()> {
        let Some(pv) = self.sources.get_opt(&self.source).await? else {
            return Ok(());
        };
        let status = pv.status.unwrap_or_default();
        if status.phase == PopulatePhase::Writing && status.verified() {
            self.set_status(PopulatePhase::Bound, |s| {
                s.message = Some("written and verified; bound to the claim".into());
            })
            .await?;
        }
        Ok(())
    }

    /// A Filesystem claim gets the written volume through a second PV of the same CSI volume
    /// in Filesystem mode, pre-bound to it. The prime's Block PV is set to Retain first, so that
    /// removing it (at clean-up) never deletes the volume. Returns the new PV's name.
    async fn hand_over_as_filesystem(
        &self,
        pvs: &Api<PersistentVolume>,
        block: &str,
    ) -> Result<String> {
        let current = pvs.get(block).await?;
        // Recorded once: a rerun after a crash finds the PV already at Retain.
        let reclaim = current
            .annotations()
            .get(objects::RECLAIM)
            .cloned()
            .or_else(|| {
                current
                    .spec
                    .as_ref()?
                    .persistent_volume_reclaim_policy
                    .clone()
            })
            .unwrap_or_else(|| "Delete".into());
        let retain = serde_json::json!({
            "metadata": {"annotations": {objects::RECLAIM: reclaim}},
            "spec": {"persistentVolumeReclaimPolicy": "Retain"},
        });
        let prime = pvs
            .patch(block, &PatchParams::default(), &Patch::Merge(retain))
            .await
            .with_context(|| format!("cannot set volume {block} to Retain"))?;
        let fs = objects::filesystem_volume(&prime, self.claim, &reclaim)?;
        create_once(pvs, &fs).await?;
        Ok(fs.name_any())
    }

    /// A writer failed: run another, or give up with its words.
    async fn writer_failed(&self, pv: &PointVolume, why: String) -> Result<Action> {
        let attempts = pv.status.as_ref().map_or(0, |s| s.attempts);
        let why = serde_json::from_str::<WriteReport>(why.trim())
            .ok()
            .and_then(|r| r.error)
            .unwrap_or(why);
        self.delete_writer().await?;
        if attempts < MAX_ATTEMPTS {
            self.event(
                true,
                "WriterFailed",
                format!("writer {attempts} of {MAX_ATTEMPTS} failed, running another: {why}"),
            )
            .await;
            return Ok(Action::requeue(POLL));
        }
        let msg = format!("{MAX_ATTEMPTS} writers failed; the claim stays unbound. Last: {why}");
        self.set_status(PopulatePhase::Failed, |s| s.message = Some(msg.clone()))
            .await?;
        self.event(true, "PopulateFailed", msg).await;
        Ok(Action::await_change())
    }

    /// Deletes the writer's pod and Secret (a new ticket replaces them).
    async fn delete_writer(&self) -> Result<()> {
        delete_if_present(&self.api::<Pod>(), &self.name).await?;
        delete_if_present(&self.api::<Secret>(), &self.name).await
    }

    /// The claim is bound: what was made for it goes.
    /// Returns true once everything is gone.
    async fn clean_up(&self) -> Result<bool> {
        self.delete_writer().await?;
        delete_if_present(&self.api::<PersistentVolumeClaim>(), &self.name).await?;
        self.remove_block_view().await
    }

    /// For a Filesystem claim: the prime's Block PV, once Released, goes (its volume stays: the
    /// claim's PV holds it). A PV not set to Retain is never deleted here. True once it is gone
    /// (or there is none).
    async fn remove_block_view(&self) -> Result<bool> {
        let pvs: Api<PersistentVolume> = Api::all(self.ctx.client.clone());
        let Some(mine) = self.claim.spec.as_ref().and_then(|s| s.volume_name.clone()) else {
            return Ok(true);
        };
        let Some(block) = pvs
            .get_opt(&mine)
            .await?
            .and_then(|pv| pv.annotations().get(objects::BLOCK_VIEW).cloned())
        else {
            return Ok(true);
        };
        let Some(pv) = pvs.get_opt(&block).await? else {
            return Ok(true);
        };
        let spec = pv.spec.unwrap_or_default();
        let released = pv.status.and_then(|s| s.phase).as_deref() != Some("Bound");
        if spec.persistent_volume_reclaim_policy.as_deref() == Some("Retain") && released {
            delete_if_present(&pvs, &block).await?;
        }
        Ok(false)
    }

    /// Updates the PointVolume's status through the status subresource.
    async fn set_status(
        &self,
        phase: PopulatePhase,
        change: impl FnOnce(&mut PointVolumeStatus),
    ) -> Result<()> {
        let pv = self.sources.get(&self.source).await?;
        let mut status = pv.status.unwrap_or_default();
        status.phase = phase;
        change(&mut status);
        self.sources
            .patch_status(
                &self.source,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"status": status})),
            )
            .await
            .with_context(|| format!("cannot update PointVolume {}", self.source))?;
        Ok(())
    }

    /// Publishes an event on the claim.
    async fn event(&self, warning: bool, reason: &str, note: String) {
        let claim = self.claim.object_ref(&());
        publish(
            &self.ctx.recorder,
            &claim,
            "Populate",
            (warning, reason),
            note,
        )
        .await
    }
}
