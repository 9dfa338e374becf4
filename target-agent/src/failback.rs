//! `target-agent failback`: after a failover, brings the old primary's PVCs to a point of the
//! standby, sending only the blocks that differ.
//!
//! The application runs on the standby and is replicated into this agent's store as a group of
//! its own (a ReplicationGroup on the standby cluster). This command, run beside the standby's
//! `serve`, takes a point of that group and, on the old primary's cluster, runs one basis writer
//! pod per volume on the old PVC (`target-agent write --basis`, protocol 7): the pod compares
//! each block of the point with the PVC by hash and fetches only those that differ, then reads
//! the whole point back from the device. A Filesystem PVC is written through a Block view of the
//! same CSI volume (a second PV, `Retain`, and a claim bound to it), removed afterwards.
//!
//! Nothing is written while the application uses a PVC: a claim mounted by a running pod is
//! refused before any writer starts. Everything the command makes is deleted when it ends,
//! whatever the outcome; a pass cut short leaves the PVCs half-updated, and running it again
//! sends only what still differs.

use crate::admin;
use crate::failover::PointSelector;
use crate::ticket::{TicketArgs, WriterTicket};
use crate::writer::WriteReport;
use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod, Secret};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use understudy_common::store::PointRecord;
use understudy_common::transport::grants::MAX_GRANT_MS;
use understudy_kube::agent_pods::{PodState, WorkerPod, create_once, delete_if_present, pod_state};

/// Label on everything a failback makes: the name of the claim it writes.
pub const FAILBACK_LABEL: &str = "understudy.io/failback";
const POLL: Duration = Duration::from_secs(1);

/// `failback` arguments.
#[derive(clap::Args, Debug)]
pub struct FailbackArgs {
    /// Agent state directory (of the standby's running `serve`).
    #[arg(long, env = "UNDERSTUDY_DIR")]
    pub dir: PathBuf,
    /// The standby's group: the failed-over application, replicated into this agent's store.
    #[arg(long)]
    pub group: String,
    /// latest, a point number, or a time (the newest point at or before it).
    #[arg(long, default_value = "latest")]
    pub point: PointSelector,
    /// Kubeconfig of the old primary's cluster (default: in-cluster).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Map a namespace of the point's volumes (stored as `<namespace>.<pvc>`) to the old
    /// primary's (FROM=TO, repeatable; the failover's map the other way round).
    #[arg(long = "namespace-map", value_name = "FROM=TO")]
    pub namespace_map: Vec<String>,
    /// Where the writer pods on the old primary reach this agent, HOST:PORT.
    #[arg(long)]
    pub target: String,
    /// Image of the writer pods (holds /bin/target-agent: this agent's image).
    #[arg(long)]
    pub writer_image: String,
    /// How long the writers may take, together, e.g. `2h` (at most 24 h).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// One volume's outcome.
#[derive(Debug, Serialize)]
pub struct VolumeFailback {
    /// The old primary's claim, `namespace/name`.
    pub claim: String,
    /// What its writer reported (the volume, fetched blocks, blocks already there, digests).
    #[serde(flatten)]
    pub report: WriteReport,
}

/// What a failback did.
#[derive(Debug, Serialize)]
pub struct FailbackReport {
    /// The standby's group.
    pub group: String,
    /// The point written.
    pub seq: u64,
    /// Blocks fetched, over all volumes (the ones that differed).
    pub blocks_fetched: u64,
    /// Blocks the old primary held already.
    pub blocks_matched: u64,
    /// Every volume verified from the bytes read back.
    pub ok: bool,
    /// Per volume.
    pub volumes: Vec<VolumeFailback>,
}

/// Runs `failback`; exit code 0 when every volume was verified, 2 when one was not.
pub fn run(a: FailbackArgs) -> Result<ExitCode> {
    let ttl = a.timeout + Duration::from_secs(600);
    anyhow::ensure!(
        ttl.as_millis() as u64 <= MAX_GRANT_MS,
        "--timeout must be under 24 h"
    );
    let point = inspect(&a)?;
    let map = understudy_kube::bundle::parse_map(&a.namespace_map, "namespace")?;
    let mut plans = Vec::new();
    for v in &point.cut.volumes {
        let (ns, pvc) = v.name.split_once('.').with_context(|| {
            format!(
                "volume {} of point {} is not a PVC's (`<namespace>.<pvc>`): failback writes PVCs; standalone, run `target-agent write --basis` on the device",
                v.name, point.seq
            )
        })?;
        let ns = map.get(ns).map_or(ns, String::as_str);
        plans.push((v.name.clone(), ns.to_string(), pvc.to_string()));
    }
    let rt = tokio::runtime::Runtime::new()?;
    let report = rt.block_on(async {
        let client = understudy_kube::connect(a.kubeconfig.as_deref()).await?;
        let mut claims = Vec::new();
        for (volume, ns, pvc) in &plans {
            claims.push(Claim::load(&client, volume, ns, pvc).await?);
        }
        for c in &claims {
            c.refuse_if_in_use(&client).await?;
        }
        let outcome = write_all(&client, &a, &point, &claims, ttl).await;
        let cleaned = clean_up(&client, &claims).await;
        let volumes = outcome?;
        cleaned?;
        anyhow::Ok(FailbackReport {
            group: point.group.clone(),
            seq: point.seq,
            blocks_fetched: volumes.iter().map(|v| v.report.blocks).sum(),
            blocks_matched: volumes.iter().map(|v| v.report.blocks_matched).sum(),
            ok: volumes.iter().all(|v| v.report.ok),
            volumes,
        })
    })?;
    print!("{}", serde_json::to_string_pretty(&report)? + "\n");
    for v in report.volumes.iter().filter(|v| !v.report.ok) {
        eprintln!(
            "error: claim {} (volume {}) is not verified: {}; do not start the application on it: run failback again",
            v.claim,
            v.report.volume,
            v.report.error.as_deref().unwrap_or("no report")
        );
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// The point, from the running `serve`.
fn inspect(a: &FailbackArgs) -> Result<PointRecord> {
    use crate::commands::{InspectArgs, StoreArgs, StoreCommand};
    let conn = admin::connect(&a.dir).context(
        "failback reads from the running target agent: start `target-agent serve` on this directory first",
    )?;
    let cmd = StoreCommand::Inspect(InspectArgs {
        store: StoreArgs {
            dir: a.dir.clone(),
            json: true,
        },
        group: a.group.clone(),
        point: a.point.clone(),
    });
    let reply = admin::request(conn, &admin::AdminRequest::Store(cmd))?;
    anyhow::ensure!(reply.code == 0, "{}", reply.output.trim());
    serde_json::from_str(&reply.output).context("the running target agent described no point")
}

/// A writer's ticket from the running `serve`, for `volume` of point `seq`.
fn ticket(a: &FailbackArgs, seq: u64, volume: &str, ttl: Duration) -> Result<WriterTicket> {
    let conn = admin::connect(&a.dir)?;
    let req = admin::AdminRequest::Ticket(TicketArgs {
        dir: a.dir.clone(),
        group: a.group.clone(),
        point: PointSelector::Seq(seq),
        volume: volume.to_string(),
        target: a.target.clone(),
        ttl,
        out: PathBuf::new(),
    });
    let reply = admin::request(conn, &req)?;
    serde_json::from_str(&reply.output).context("the running target agent made no ticket")
}

/// One old PVC and what writes it.
struct Claim {
    volume: String,
    claim: PersistentVolumeClaim,
    pv: PersistentVolume,
    /// Pod, Secret and (for a Filesystem claim) the Block view's claim and PV.
    name: String,
}

impl Claim {
    async fn load(client: &Client, volume: &str, ns: &str, pvc: &str) -> Result<Claim> {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
        let claim = claims.get_opt(pvc).await?.with_context(|| {
            format!("the old primary has no claim {ns}/{pvc} for volume {volume}: map the namespace (--namespace-map) or create the claim")
        })?;
        let bound = claim.spec.as_ref().and_then(|s| s.volume_name.clone());
        let Some(pv_name) = bound else {
            bail!(
                "claim {ns}/{pvc} is not bound to a volume: failback writes over a volume the claim already has"
            );
        };
        let pv = Api::<PersistentVolume>::all(client.clone())
            .get(&pv_name)
            .await
            .with_context(|| format!("cannot read volume {pv_name} of claim {ns}/{pvc}"))?;
        Ok(Claim {
            volume: volume.to_string(),
            name: format!("understudy-failback-{}", claim.uid().unwrap_or_default()),
            claim,
            pv,
        })
    }

    fn ns(&self) -> String {
        self.claim.namespace().unwrap_or_default()
    }

    fn label(&self) -> String {
        format!("{}/{}", self.ns(), self.claim.name_any())
    }

    fn is_block(&self) -> bool {
        crate::populator::objects::is_block(&self.claim)
    }

    fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(FAILBACK_LABEL.to_string(), self.claim.name_any())])
    }

    /// A running pod that mounts the claim: writing under it would corrupt what it reads.
    async fn refuse_if_in_use(&self, client: &Client) -> Result<()> {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &self.ns());
        for p in pods.list(&ListParams::default()).await? {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            let live = !matches!(phase, Some("Succeeded") | Some("Failed"));
            let mounts = p
                .spec
                .iter()
                .flat_map(|s| s.volumes.iter().flatten())
                .any(|v| {
                    v.persistent_volume_claim
                        .as_ref()
                        .is_some_and(|c| c.claim_name == self.claim.name_any())
                });
            if live && mounts {
                bail!(
                    "claim {} is in use by pod {}: stop the application on the old primary first (scale it to zero), then run failback",
                    self.label(),
                    p.name_any()
                );
            }
        }
        Ok(())
    }

    /// The claim the writer gets as a block device: the claim itself, or for a Filesystem claim
    /// a Block view of the same CSI volume.
    async fn device_claim(&self, client: &Client) -> Result<String> {
        if self.is_block() {
            return Ok(self.claim.name_any());
        }
        let (pv, claim) = self.block_view()?;
        create_once(&Api::all(client.clone()), &pv).await?;
        create_once(&Api::namespaced(client.clone(), &self.ns()), &claim).await?;
        Ok(self.name.clone())
    }

    /// A Block PV of the claim's CSI volume (`Retain`: deleting it never deletes the volume),
    /// pre-bound to a Block claim of the same name.
    fn block_view(&self) -> Result<(PersistentVolume, PersistentVolumeClaim)> {
        let mut spec = self.pv.spec.clone().unwrap_or_default();
        anyhow::ensure!(
            spec.csi.is_some(),
            "volume {} of claim {} is not a CSI volume: failback writes a Filesystem claim through a Block view of its CSI volume",
            self.pv.name_any(),
            self.label()
        );
        spec.volume_mode = Some("Block".into());
        spec.persistent_volume_reclaim_policy = Some("Retain".into());
        spec.claim_ref = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "namespace": self.ns(), "name": self.name,
        }))?;
        let pv = PersistentVolume {
            metadata: kube::api::ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(self.labels()),
                ..Default::default()
            },
            spec: Some(spec.clone()),
            status: None,
        };
        let claim = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": self.name, "namespace": self.ns(), "labels": self.labels()},
            "spec": {
                "volumeMode": "Block", "volumeName": self.name,
                "storageClassName": spec.storage_class_name.clone().unwrap_or_default(),
                "accessModes": spec.access_modes.clone().unwrap_or_default(),
                "resources": {"requests": {"storage": spec.capacity.as_ref().and_then(|c| c.get("storage")).cloned()}},
            },
        }))?;
        Ok((pv, claim))
    }

    /// What the writer's pod is doing: `claim: reason` (its container's waiting reason, else the
    /// pod's phase).
    async fn writer_state(&self, client: &Client) -> String {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &self.ns());
        let state = match pods.get_opt(&self.name).await {
            Ok(Some(p)) => {
                let status = p.status.unwrap_or_default();
                let waiting = status
                    .container_statuses
                    .iter()
                    .flatten()
                    .find_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone());
                waiting
                    .or(status.phase)
                    .unwrap_or_else(|| "no status".into())
            }
            Ok(None) => "no pod".into(),
            Err(e) => format!("unreadable: {e}"),
        };
        format!("{}: {state}", self.label())
    }

    /// The writer's Secret and pod.
    async fn start_writer(&self, client: &Client, t: &WriterTicket, image: &str) -> Result<()> {
        let device = self.device_claim(client).await?;
        let ns = self.ns();
        let labels = self.labels();
        let secret = understudy_kube::agent_pods::ticket_secret(&ns, &self.name, t, &labels, None)?;
        create_once(&Api::<Secret>::namespaced(client.clone(), &ns), &secret).await?;
        let pod = WorkerPod {
            namespace: &ns,
            name: &self.name,
            role: "writer",
            image,
            command: crate::populator::objects::writer_command(true),
            claim: &device,
            secret: &self.name,
            labels: &labels,
            owners: None,
        }
        .build()?;
        create_once(&Api::<Pod>::namespaced(client.clone(), &ns), &pod).await
    }
}

/// Starts every writer, then waits for each one's report.
async fn write_all(
    client: &Client,
    a: &FailbackArgs,
    point: &PointRecord,
    claims: &[Claim],
    ttl: Duration,
) -> Result<Vec<VolumeFailback>> {
    for c in claims {
        let t = tokio::task::block_in_place(|| ticket(a, point.seq, &c.volume, ttl))?;
        c.start_writer(client, &t, &a.writer_image).await?;
    }
    let deadline = Instant::now() + a.timeout;
    let mut done: Vec<Option<WriteReport>> = claims.iter().map(|_| None).collect();
    while done.iter().any(Option::is_none) {
        for (c, slot) in claims.iter().zip(done.iter_mut()) {
            if slot.is_some() {
                continue;
            }
            let pods: Api<Pod> = Api::namespaced(client.clone(), &c.ns());
            *slot = match pod_state::<WriteReport>(&pods, &c.name).await? {
                PodState::Done(r) => Some(*r),
                PodState::Failed(why) => Some(failed_report(c, point, why)),
                PodState::Absent | PodState::Running => None,
            };
        }
        if Instant::now() > deadline {
            let mut states = Vec::new();
            for (c, _) in claims.iter().zip(&done).filter(|(_, d)| d.is_none()) {
                states.push(c.writer_state(client).await);
            }
            bail!(
                "the writers were not done after {} ({}): check the image, the claims' attachment and that the agent is reachable at --target from the old primary's pods, then run failback again",
                humantime::format_duration(a.timeout),
                states.join("; ")
            );
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(claims
        .iter()
        .zip(done)
        .map(|(c, r)| VolumeFailback {
            claim: c.label(),
            report: r.expect("every writer reported"),
        })
        .collect())
}

/// A writer that failed: its own report when it left one, else its words.
fn failed_report(c: &Claim, point: &PointRecord, why: String) -> WriteReport {
    serde_json::from_str(why.trim()).unwrap_or_else(|_| WriteReport {
        group: point.group.clone(),
        seq: point.seq,
        volume: c.volume.clone(),
        error: Some(why),
        ..WriteReport::default()
    })
}

/// Deletes what the failback made (pods, Secrets, Block views) and waits until it is gone.
async fn clean_up(client: &Client, claims: &[Claim]) -> Result<()> {
    for c in claims {
        let ns = c.ns();
        delete_if_present(&Api::<Pod>::namespaced(client.clone(), &ns), &c.name).await?;
        delete_if_present(&Api::<Secret>::namespaced(client.clone(), &ns), &c.name).await?;
        if !c.is_block() {
            let views: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
            delete_if_present(&views, &c.name).await?;
            delete_if_present(&Api::<PersistentVolume>::all(client.clone()), &c.name).await?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    for c in claims {
        let ns = c.ns();
        loop {
            let left = Api::<Pod>::namespaced(client.clone(), &ns)
                .get_opt(&c.name)
                .await?
                .is_some()
                || Api::<PersistentVolume>::all(client.clone())
                    .get_opt(&c.name)
                    .await?
                    .is_some();
            if !left {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the failback's pod or Block view {} in {ns} is still there after 120 s: delete it by hand (label {FAILBACK_LABEL}); the claim's own volume is kept (the view is Retain)",
                    c.name
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }
    Ok(())
}
