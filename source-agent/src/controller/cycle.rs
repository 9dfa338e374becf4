//! One ReplicationGroup's cycle as reconcile steps. Each step is idempotent and ends by writing
//! the next phase into `status.cycle`; a step that fails records why and hands the cycle to
//! cleanup, which deletes everything the cycle made (found by its labels) and ends it.

use super::Context;
use super::migration;
use super::objects::{self, MoverState, object_name};
use super::scope::{self, Member, Stages};
use crate::mover::{CbtBase, CbtTicket, MoverTicket};
use crate::staged::{self, MoverKey, StagedCut};
use crate::target::{Connector, TargetAddr};
use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use std::time::Duration;
use understudy_common::metrics::Metrics;
use understudy_common::store::VolumeMeta;
use understudy_common::transport::Identity;
use understudy_kube::crd::replication_group::{
    Consistency, CyclePhase, CycleStatus, ExecHook, MigrationPhase, MigrationStatus, OnError,
    PointStatus, ReplicationGroup, ReplicationGroupStatus, VolumeStatus,
};
use understudy_kube::crd::set_condition;
use understudy_kube::snapshot_metadata::Access;
use understudy_kube::snapshots::{self, GroupSnapshots, VolumeSnapshot, VolumeSnapshotContent};

/// Default time snapshots may take to become ready.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Default time limit of a hook.
const HOOK_TIMEOUT: Duration = Duration::from_secs(30);
/// Runs of a mover pod before the cycle fails.
const MOVER_ATTEMPTS: u32 = 3;
/// Annotation on a ticket Secret counting its mover's failed runs.
const ATTEMPTS: &str = "understudy.io/failed-runs";
/// How long movers' grants last.
const GRANT_TTL: Duration = Duration::from_secs(6 * 3600);
/// When the next step runs: after the status written by this one reached the controller's
/// cache (its watch event usually triggers the step sooner).
const NEXT_STEP: Duration = Duration::from_millis(300);
/// How often a cycle under way is looked at.
const POLL: Duration = Duration::from_secs(1);
/// How often the quiesce window looks whether the snapshots are cut.
const CUT_POLL: Duration = Duration::from_millis(100);

/// Reconciles a group that is not being deleted.
pub async fn apply(rg: &ReplicationGroup, ctx: &Context) -> Result<Action> {
    let mut status = rg.status.clone().unwrap_or_default();
    status.observed_generation = rg.metadata.generation;
    let Some(cycle) = status.cycle.clone() else {
        return maybe_start(rg, ctx, status).await;
    };
    let step = match cycle.phase {
        CyclePhase::Snapshotting => snapshot(rg, ctx, &mut status).await,
        CyclePhase::WaitingForSnapshots => wait_for_snapshots(rg, ctx, &mut status).await,
        CyclePhase::Moving => move_volumes(rg, ctx, &mut status).await,
        CyclePhase::Committing => commit(rg, ctx, &mut status).await,
        CyclePhase::CleaningUp => return clean_up(rg, ctx, status).await,
    };
    match step {
        Ok(action) => Ok(action),
        Err(e) => fail(rg, ctx, status, cycle.phase, e).await,
    }
}

/// The group is being deleted: remove every object of every cycle.
pub async fn delete(rg: &ReplicationGroup, ctx: &Context) -> Result<Action> {
    let left = remove_objects(rg, ctx, Stages::All).await?;
    if left > 0 {
        return Ok(Action::requeue(POLL));
    }
    Ok(Action::await_change())
}

/// Starts a cycle when one is due (and the group is not paused).
async fn maybe_start(
    rg: &ReplicationGroup,
    ctx: &Context,
    mut status: ReplicationGroupStatus,
) -> Result<Action> {
    let interval = match crate::schedule::parse_interval(&rg.spec.interval) {
        Ok(i) => i,
        Err(e) => {
            let msg = format!("spec.interval {:?} is not usable: {e:#}", rg.spec.interval);
            set_condition(
                &mut status.conditions,
                "Ready",
                false,
                "InvalidSpec",
                &msg,
                rg.metadata.generation,
            );
            status.last_error = Some(msg);
            ctx.set_status(rg, &status).await?;
            return Ok(Action::await_change());
        }
    };
    refresh_rpo(&mut status);
    let quiescing = status
        .migration
        .as_ref()
        .is_some_and(|m| m.phase == MigrationPhase::Quiescing);
    if quiescing && !rg.spec.paused {
        return quiesce(rg, ctx, status).await;
    }
    if rg.spec.paused {
        set_condition(
            &mut status.conditions,
            "Ready",
            false,
            "Paused",
            "spec.paused is true: no cycle starts",
            rg.metadata.generation,
        );
        ctx.set_status(rg, &status).await?;
        return Ok(Action::await_change());
    }
    let now = understudy_common::now_ms();
    let last = status
        .last_cycle_start
        .as_deref()
        .and_then(parse_time)
        .unwrap_or(0);
    let due = last + interval.as_millis() as i64;
    if now < due {
        return Ok(Action::requeue(Duration::from_millis((due - now) as u64)));
    }
    if let Err(e) = check_spec(rg) {
        let msg = format!("{e:#}");
        set_condition(
            &mut status.conditions,
            "Ready",
            false,
            "InvalidSpec",
            &msg,
            rg.metadata.generation,
        );
        status.last_error = Some(msg.clone());
        ctx.set_status(rg, &status).await?;
        ctx.event(rg, true, "InvalidSpec", msg).await;
        return Ok(Action::await_change());
    }
    set_condition(
        &mut status.conditions,
        "Ready",
        true,
        "Configured",
        "the group replicates on schedule",
        rg.metadata.generation,
    );
    start_cycle(rg, ctx, status).await
}

/// A migration asked for: the application scaled to zero; once its pods are gone, the final
/// cycle starts at once.
async fn quiesce(
    rg: &ReplicationGroup,
    ctx: &Context,
    mut status: ReplicationGroupStatus,
) -> Result<Action> {
    let left = migration::quiesce(rg, ctx).await?;
    if left > 0 {
        return Ok(Action::requeue(POLL));
    }
    if let Some(m) = status.migration.as_mut() {
        m.phase = MigrationPhase::FinalCycle;
    }
    ctx.event(
        rg,
        false,
        "Quiesced",
        "the application is stopped (scaled to zero); the final cycle starts".into(),
    )
    .await;
    start_cycle(rg, ctx, status).await
}

/// Starts a cycle now.
async fn start_cycle(
    rg: &ReplicationGroup,
    ctx: &Context,
    mut status: ReplicationGroupStatus,
) -> Result<Action> {
    let now = understudy_common::now_ms();
    let stage = format!("{now}-{}", &blake3::hash(&now.to_le_bytes()).to_hex()[..6]);
    status.cycle = Some(CycleStatus {
        stage: stage.clone(),
        phase: CyclePhase::Snapshotting,
        started: understudy_common::format_ms(now),
        snapshot_ms: None,
        error: None,
    });
    ctx.set_status(rg, &status).await?;
    ctx.started(&stage);
    tracing::info!(group = %scope::group_name(rg), %stage, "cycle started");
    Ok(Action::requeue(NEXT_STEP))
}

/// What a cycle cannot work with, found before it makes anything.
fn check_spec(rg: &ReplicationGroup) -> Result<()> {
    rg.spec.target.address.parse::<TargetAddr>()?;
    let hooks = !rg.spec.hooks.is_empty();
    match rg.spec.consistency {
        Consistency::Crash if hooks => bail!(
            "consistency `crash` runs no hooks, but spec.hooks has some: remove them or use `hooks`"
        ),
        Consistency::Hooks if !hooks => bail!(
            "consistency `hooks` needs spec.hooks.pre (a quiesce command); or use `crash` or `group`"
        ),
        Consistency::Group if scope::namespaces(rg).len() > 1 => bail!(
            "consistency `group` takes one VolumeGroupSnapshot, which covers one namespace: protect one namespace per group, or use `hooks`"
        ),
        _ => Ok(()),
    }
}

/// Step 1: pre hooks, the snapshot instant, post hooks (at once, also when it failed).
async fn snapshot(
    rg: &ReplicationGroup,
    ctx: &Context,
    status: &mut ReplicationGroupStatus,
) -> Result<Action> {
    let cycle = status.cycle.clone().expect("a cycle");
    if !ctx.is_fresh(&cycle.stage) {
        // Killed inside this step: a pre hook may have left the application quiesced, and some
        // snapshots may exist. Thaw, forget them, and take the instant again.
        let _ = run_hooks(rg, ctx, &rg.spec.hooks.post, true).await;
        remove_snapshots(rg, ctx, Stages::Only(&cycle.stage)).await?;
        ctx.started(&cycle.stage);
    }
    let members = scope::members(&ctx.client, rg).await?;
    let labels = scope::labels(rg, &cycle.stage);
    let taken = async {
        run_hooks(rg, ctx, &rg.spec.hooks.pre, false).await?;
        take_snapshots(rg, ctx, &cycle.stage, &members, &labels).await?;
        if !rg.spec.hooks.pre.is_empty() {
            wait_until_cut(rg, ctx, &cycle.stage, members.len()).await?;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let thawed = run_hooks(rg, ctx, &rg.spec.hooks.post, false).await;
    taken?;
    thawed?;
    understudy_common::failpoint::hit("controller.snapshots.taken");
    set_phase(status, CyclePhase::WaitingForSnapshots);
    status.cycle.as_mut().expect("a cycle").snapshot_ms = Some(understudy_common::now_ms());
    ctx.set_status(rg, status).await?;
    Ok(Action::requeue(POLL))
}

/// The instant itself: one VolumeGroupSnapshot, or one VolumeSnapshot per PVC created
/// back to back.
async fn take_snapshots(
    rg: &ReplicationGroup,
    ctx: &Context,
    stage: &str,
    members: &[Member],
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<()> {
    if rg.spec.consistency == Consistency::Group {
        let ns = &members[0].namespace;
        let resource = snapshots::group_snapshot_resource(&ctx.client).await?;
        let groups = GroupSnapshots::new(ctx.client.clone(), ns, resource);
        let class = rg.spec.volume_group_snapshot_class_name.as_deref();
        let selector = rg.spec.selector.clone();
        if selector.is_empty() {
            bail!(
                "consistency `group` needs spec.selector: a VolumeGroupSnapshot selects its PVCs by label"
            );
        }
        return groups
            .create(&object_name(stage, 0), &selector, class, labels)
            .await;
    }
    for (i, m) in members.iter().enumerate() {
        let api: Api<VolumeSnapshot> = Api::namespaced(ctx.client.clone(), &m.namespace);
        let class = rg.spec.volume_snapshot_class_name.as_deref();
        let mut vs = VolumeSnapshot::of_pvc(&object_name(stage, i), &m.pvc, class, labels);
        vs.metadata.owner_references = objects::owners(rg, &m.namespace);
        objects::create_once(&api, &vs).await?;
    }
    Ok(())
}

/// Holds the quiesce window open until the storage has cut every snapshot (each has its
/// `creationTime`): creating the objects only asks for the cut, which the CSI sidecars make
/// later. At most `spec.snapshotTimeout`, so an application is never left quiesced for long.
async fn wait_until_cut(
    rg: &ReplicationGroup,
    ctx: &Context,
    stage: &str,
    volumes: usize,
) -> Result<()> {
    let timeout = snapshot_timeout(rg)?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let snaps = cycle_snapshots(rg, ctx, stage).await?;
        snaps
            .iter()
            .try_for_each(|(m, vs)| no_snapshot_error(m, vs))?;
        let cut = snaps
            .iter()
            .filter(|(_, vs)| vs.created_ms().is_some())
            .count();
        if snaps.len() == volumes && cut == volumes {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "{cut} of {volumes} snapshots were cut within {timeout:?} while the application was quiesced (spec.snapshotTimeout): check the CSI driver and its csi-snapshotter (`kubectl describe volumesnapshot -A -l {}={stage}`)",
                scope::STAGE_LABEL
            );
        }
        tokio::time::sleep(CUT_POLL).await;
    }
}

/// Fails with the error a member's snapshot reports, naming it and its PVC.
fn no_snapshot_error(m: &Member, vs: &VolumeSnapshot) -> Result<()> {
    match vs.error() {
        Some(e) => bail!(
            "VolumeSnapshot {}/{} of PVC {} failed: {e}",
            m.namespace,
            vs.name_any(),
            m.pvc
        ),
        None => Ok(()),
    }
}

/// `spec.snapshotTimeout`, or the default.
fn snapshot_timeout(rg: &ReplicationGroup) -> Result<Duration> {
    Ok(rg
        .spec
        .snapshot_timeout
        .as_deref()
        .map(humantime::parse_duration)
        .transpose()
        .context("spec.snapshotTimeout is not a duration (e.g. `5m`)")?
        .unwrap_or(SNAPSHOT_TIMEOUT))
}

/// The cycle's snapshots with the PVC each is of, in the group's order.
async fn cycle_snapshots(
    rg: &ReplicationGroup,
    ctx: &Context,
    stage: &str,
) -> Result<Vec<(Member, VolumeSnapshot)>> {
    let members = scope::members(&ctx.client, rg).await?;
    let mut out = Vec::new();
    for ns in scope::namespaces(rg) {
        let api: Api<VolumeSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
        let all = api.list(&ListParams::default()).await.with_context(|| {
            format!("cannot list VolumeSnapshots in {ns}: the agent needs list on volumesnapshots")
        })?;
        let ours: Vec<VolumeSnapshot> = if rg.spec.consistency == Consistency::Group {
            let resource = snapshots::group_snapshot_resource(&ctx.client).await?;
            let groups = GroupSnapshots::new(ctx.client.clone(), &ns, resource);
            let Some((uid, _, _)) = groups.state(&object_name(stage, 0)).await? else {
                continue;
            };
            snapshots::members(&all.items, &uid)
                .into_iter()
                .cloned()
                .collect()
        } else {
            let prefix = format!("us-{stage}-");
            all.items
                .into_iter()
                .filter(|s| s.name_any().starts_with(&prefix))
                .collect()
        };
        for vs in ours {
            let m = members
                .iter()
                .find(|m| m.namespace == ns && Some(m.pvc.as_str()) == vs.pvc());
            if let Some(m) = m {
                out.push((m.clone(), vs));
            }
        }
    }
    out.sort_by(|a, b| a.0.volume.cmp(&b.0.volume));
    Ok(out)
}

/// Step 2: wait until every snapshot is ready; a Filesystem-mode one is allowed to be read as
/// Block; the cut's instant is the snapshots' creation time.
async fn wait_for_snapshots(
    rg: &ReplicationGroup,
    ctx: &Context,
    status: &mut ReplicationGroupStatus,
) -> Result<Action> {
    let cycle = status.cycle.clone().expect("a cycle");
    let timeout = snapshot_timeout(rg)?;
    let started = cycle.snapshot_ms.unwrap_or_else(understudy_common::now_ms);
    let late = understudy_common::now_ms() - started > timeout.as_millis() as i64;
    if rg.spec.consistency == Consistency::Group {
        let ns = scope::namespaces(rg).remove(0);
        let resource = snapshots::group_snapshot_resource(&ctx.client).await?;
        let state = GroupSnapshots::new(ctx.client.clone(), &ns, resource)
            .state(&object_name(&cycle.stage, 0))
            .await?;
        match state {
            None => bail!("the cycle's VolumeGroupSnapshot is gone"),
            Some((_, _, Some(e))) => bail!("the VolumeGroupSnapshot failed: {e}"),
            Some((_, false, None)) if late => bail!(
                "the VolumeGroupSnapshot was not ready after {timeout:?}: check the CSI driver and its csi-snapshotter (`kubectl describe volumegroupsnapshot -n {ns} {}`)",
                object_name(&cycle.stage, 0)
            ),
            Some((_, false, None)) => return Ok(Action::requeue(POLL)),
            Some((_, true, None)) => {}
        }
    }
    let snaps = cycle_snapshots(rg, ctx, &cycle.stage).await?;
    for (m, vs) in &snaps {
        no_snapshot_error(m, vs)?;
        if !vs.ready() {
            if late {
                bail!(
                    "VolumeSnapshot {}/{} of PVC {} was not ready after {timeout:?}: check the CSI driver and its csi-snapshotter",
                    m.namespace,
                    vs.name_any(),
                    m.pvc
                );
            }
            return Ok(Action::requeue(POLL));
        }
    }
    if snaps.is_empty() {
        bail!("the cycle's snapshots are gone");
    }
    for (m, vs) in &snaps {
        if m.mode != "Block" {
            let content = vs.content().context("a ready snapshot names its content")?;
            snapshots::allow_volume_mode_change(&ctx.client, content).await?;
        }
    }
    let instant = snaps.iter().filter_map(|(_, vs)| vs.created_ms()).min();
    let c = status.cycle.as_mut().expect("a cycle");
    c.snapshot_ms = instant.or(c.snapshot_ms);
    set_phase(status, CyclePhase::Moving);
    ctx.set_status(rg, status).await?;
    Ok(Action::requeue(NEXT_STEP))
}

/// Step 3: per volume a ticket, a restored PVC and a mover pod; done when every mover is.
async fn move_volumes(
    rg: &ReplicationGroup,
    ctx: &Context,
    status: &mut ReplicationGroupStatus,
) -> Result<Action> {
    let cycle = status.cycle.clone().expect("a cycle");
    let snaps = cycle_snapshots(rg, ctx, &cycle.stage).await?;
    let labels = scope::labels(rg, &cycle.stage);
    let (connector, target, target_fp) = connector(rg, ctx).await?;
    let mut to_start = Vec::new();
    let (mut done, mut running) = (0, 0);
    for (i, (m, vs)) in snaps.iter().enumerate() {
        let name = object_name(&cycle.stage, i);
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &m.namespace);
        match objects::mover_state(&pods, &name).await? {
            MoverState::Done(_) => done += 1,
            MoverState::Running => running += 1,
            MoverState::Failed(why) => {
                let runs = record_failed_run(ctx, &m.namespace, &name).await?;
                if runs >= MOVER_ATTEMPTS {
                    bail!(
                        "the mover of PVC {}/{} failed {runs} times, last: {why}",
                        m.namespace,
                        m.pvc
                    );
                }
                tracing::warn!(pod = %name, %why, runs, "a mover failed; running it again");
                let _ = pods.delete(&name, &Default::default()).await;
            }
            MoverState::Absent => to_start.push((i, m, vs)),
        }
    }
    if done == snaps.len() {
        set_phase(status, CyclePhase::Committing);
        ctx.set_status(rg, status).await?;
        return Ok(Action::requeue(NEXT_STEP));
    }
    let limit = rg
        .spec
        .max_parallel_movers
        .map_or(usize::MAX, |n| n.max(1) as usize);
    to_start.truncate(limit.saturating_sub(running));
    if to_start.is_empty() {
        return Ok(Action::requeue(POLL));
    }
    // Tickets first (their keys survive a restart in the Secrets), then the grants, then pods.
    let mut keys = Vec::new();
    for (i, m, vs) in &to_start {
        let name = object_name(&cycle.stage, *i);
        let cbt = cbt_ticket(ctx, status, m, vs).await;
        let ticket = ensure_ticket(
            rg,
            ctx,
            &cycle,
            (m, &name),
            (&target, &target_fp),
            cbt,
            &labels,
        )
        .await?;
        keys.push(MoverKey {
            volume: ticket.volume.clone(),
            fingerprint: Identity::from_pem(ticket.cert_pem.as_bytes(), ticket.key_pem.as_bytes())?
                .fingerprint
                .to_string(),
            cert_pem: ticket.cert_pem,
            key_pem: ticket.key_pem,
        });
    }
    staged::authorize(
        &connector,
        &target,
        &scope::group_name(rg),
        &cycle.stage,
        &keys,
        GRANT_TTL,
    )
    .await?;
    for (i, m, vs) in to_start {
        let name = object_name(&cycle.stage, i);
        let size = vs.restore_size().unwrap_or_else(|| m.size.clone());
        let owners = objects::owners(rg, &m.namespace);
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &m.namespace);
        let pvc = objects::restored_pvc(m, &name, &vs.name_any(), &size, &labels, owners.clone())?;
        objects::create_once(&pvcs, &pvc).await?;
        let mut pod_labels = labels.clone();
        pod_labels.insert("understudy.io/role".into(), "mover".into());
        let pod = objects::mover_pod(&m.namespace, &name, &ctx.mover_image, &pod_labels, owners)?;
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &m.namespace);
        objects::create_once(&pods, &pod).await?;
    }
    understudy_common::failpoint::hit("controller.movers.started");
    Ok(Action::requeue(POLL))
}

/// The ticket of volume `m`'s mover: read back from its Secret, or made (with a new key) and
/// stored there.
async fn ensure_ticket(
    rg: &ReplicationGroup,
    ctx: &Context,
    cycle: &CycleStatus,
    (m, name): (&Member, &str),
    (target, target_fp): (&TargetAddr, &str),
    cbt: Option<CbtTicket>,
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<MoverTicket> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &m.namespace);
    if let Some(s) = secrets.get_opt(name).await? {
        // The ticket outlives its pod: a pod that is gone was deleted or evicted mid-run.
        tracing::warn!(pod = %format!("{}/{name}", m.namespace), "the mover pod is not there though its ticket is (deleted, evicted, or never started by a controller that stopped); starting it");
        return objects::ticket_of(&s);
    }
    let group = scope::group_name(rg);
    let key = staged::mover_keys(&group, std::slice::from_ref(&m.volume))?.remove(0);
    let ticket = MoverTicket {
        group,
        stage: cycle.stage.clone(),
        volume: m.volume.clone(),
        created_ms: cycle.snapshot_ms.unwrap_or_else(understudy_common::now_ms),
        target: target.to_string(),
        target_fingerprint: target_fp.to_string(),
        block_size: understudy_common::DEFAULT_BLOCK_SIZE,
        zstd_level: 1,
        workers: 2,
        streams: 4,
        bandwidth_limit_mbit: rg.spec.bandwidth_limit_mbit,
        cert_pem: key.cert_pem,
        key_pem: key.key_pem,
        cbt,
    };
    let secret = objects::ticket_secret(
        &m.namespace,
        name,
        &ticket,
        labels,
        objects::owners(rg, &m.namespace),
    )?;
    objects::create_once(&secrets, &secret).await?;
    // Another reconcile may have won the race: the Secret's ticket is the one in force.
    let stored = secrets.get(name).await?;
    objects::ticket_of(&stored)
}

/// What a mover needs for changed-block tracking: the driver's SnapshotMetadata access (a
/// token of the agent's ServiceAccount with the service's audience), the snapshot it reads and
/// the kept base of the last point. `None` (the mover hashes every block) when the driver
/// serves no SnapshotMetadataService or it cannot be used; the mover's report says why.
async fn cbt_ticket(
    ctx: &Context,
    status: &ReplicationGroupStatus,
    m: &Member,
    vs: &VolumeSnapshot,
) -> Option<CbtTicket> {
    let content = vs.content()?;
    let contents: Api<VolumeSnapshotContent> = Api::all(ctx.client.clone());
    let driver = contents.get(content).await.ok()?.spec.driver;
    let access = match Access::discover(
        &ctx.client,
        &driver,
        &ctx.agent_namespace,
        &ctx.service_account,
    )
    .await
    {
        Ok(a) => a?,
        Err(e) => {
            tracing::warn!(%driver, error = %format!("{e:#}"), "changed-block tracking is not usable; the mover reads every block");
            return None;
        }
    };
    let pvc = format!("{}/{}", m.namespace, m.pvc);
    let base = status.volumes.iter().find(|v| v.pvc == pvc).and_then(|v| {
        Some(CbtBase {
            handle: v.base_snapshot_handle.clone()?,
            seq: v.base_sequence?,
        })
    });
    Some(CbtTicket {
        access,
        namespace: m.namespace.clone(),
        snapshot: vs.name_any(),
        base,
    })
}

/// Counts a failed mover run on its ticket Secret; returns the count.
async fn record_failed_run(ctx: &Context, namespace: &str, name: &str) -> Result<u32> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let s = secrets.get(name).await?;
    let runs = s
        .annotations()
        .get(ATTEMPTS)
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0)
        + 1;
    let patch = serde_json::json!({"metadata": {"annotations": {ATTEMPTS: runs.to_string()}}});
    secrets
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(runs)
}

/// Step 4: capture the application and commit the staged volumes with it as one point.
async fn commit(
    rg: &ReplicationGroup,
    ctx: &Context,
    status: &mut ReplicationGroupStatus,
) -> Result<Action> {
    let cycle = status.cycle.clone().expect("a cycle");
    let snaps = cycle_snapshots(rg, ctx, &cycle.stage).await?;
    let mut reports = Vec::new();
    for (i, (m, _)) in snaps.iter().enumerate() {
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &m.namespace);
        match objects::mover_state(&pods, &object_name(&cycle.stage, i)).await? {
            MoverState::Done(r) => reports.push((m.clone(), *r)),
            other => bail!(
                "the mover of PVC {}/{} is {other:?} at commit",
                m.namespace,
                m.pvc
            ),
        }
    }
    let spec = understudy_kube::capture::CaptureSpec {
        namespaces: scope::namespaces(rg),
        label_selector: Some(scope::app_selector(rg)),
    };
    let captured = understudy_kube::capture::capture(&ctx.client, &spec)
        .await
        .context("capturing the application's objects failed")?;
    let final_for = migration::final_for(status.migration.as_ref()).map(str::to_string);
    let manifests = migration::as_running(captured.bundle)?.captured();
    let (connector, target, _) = connector(rg, ctx).await?;
    let group = scope::group_name(rg);
    let snapshot_ms = cycle.snapshot_ms.unwrap_or_else(understudy_common::now_ms);
    let cut = StagedCut {
        group: &group,
        stage: &cycle.stage,
        created_ms: snapshot_ms,
        block_size: understudy_common::DEFAULT_BLOCK_SIZE,
        zstd_level: 1,
        volumes: reports
            .iter()
            .map(|(_, r)| VolumeMeta {
                name: r.volume.clone(),
                size: r.size,
                digest: r.digest.clone(),
            })
            .collect(),
        manifests: &manifests,
        final_for: final_for.as_deref(),
    };
    let dir = ctx.state_dir.join(&group);
    std::fs::create_dir_all(&dir)?;
    let done = staged::commit(&connector, &target, cut, &dir, None).await?;
    understudy_common::failpoint::hit("controller.point.committed");
    let contents: Api<VolumeSnapshotContent> = Api::all(ctx.client.clone());
    let mut handles = Vec::new();
    for (_, vs) in &snaps {
        let handle = match vs.content() {
            Some(c) => contents
                .get(c)
                .await
                .ok()
                .and_then(|c| c.status?.snapshot_handle),
            None => None,
        };
        handles.push((vs.name_any(), handle));
    }
    let started = parse_time(&cycle.started).unwrap_or(snapshot_ms);
    let seconds = (understudy_common::now_ms() - started) as f64 / 1000.0;
    let (read, sent): (u64, u64) = reports.iter().fold((0, done.sent.bytes), |(r, s), (_, x)| {
        (r + x.bytes_read, s + x.bytes_sent)
    });
    status.bytes_read += read;
    status.bytes_sent += sent;
    status.volumes = reports
        .iter()
        .zip(handles)
        .map(|((m, r), (snapshot, handle))| VolumeStatus {
            pvc: format!("{}/{}", m.namespace, m.pvc),
            change_source: r.change_source.clone(),
            reason: r.change_reason.clone(),
            bytes_read: r.bytes_read,
            bytes_sent: r.bytes_sent,
            mover_ms: r.elapsed_ms,
            base_snapshot: Some(snapshot),
            base_snapshot_handle: handle,
            base_sequence: Some(done.seq),
        })
        .collect();
    status.last_point = Some(PointStatus {
        sequence: done.seq,
        cut_id: cycle.stage.clone(),
        snapshot_time: understudy_common::format_ms(snapshot_ms),
        cycle_seconds: seconds,
    });
    status.last_error = None;
    refresh_rpo(status);
    let msg = format!(
        "point {} committed ({} volumes, {read} bytes read, {sent} sent)",
        done.seq,
        reports.len()
    );
    set_condition(
        &mut status.conditions,
        "Synced",
        true,
        "PointCommitted",
        &msg,
        rg.metadata.generation,
    );
    set_condition(
        &mut status.conditions,
        "Degraded",
        false,
        "PointCommitted",
        "",
        rg.metadata.generation,
    );
    set_phase(status, CyclePhase::CleaningUp);
    let change = migration::after_commit(status.migration.as_ref(), done.sent.migration.as_ref());
    migrate(rg, ctx, status, change).await?;
    let label = Metrics::group(&group);
    ctx.metrics.point_committed(&group, snapshot_ms);
    ctx.metrics.bytes_read.get_or_create(&label).inc_by(read);
    ctx.metrics.bytes_sent.get_or_create(&label).inc_by(sent);
    ctx.metrics
        .cycle_seconds
        .get_or_create(&label)
        .observe(seconds);
    for (_, r) in &reports {
        let source = understudy_common::metrics::ChangeSourceLabel {
            group: group.clone(),
            source: r.change_source.clone(),
        };
        ctx.metrics.volume_reads.get_or_create(&source).inc();
    }
    tracing::info!(%group, seq = done.seq, read, sent, seconds, "recovery point committed");
    ctx.event(rg, false, "PointCommitted", msg).await;
    Ok(Action::requeue(NEXT_STEP))
}

/// Acts on what the commit's session said about a migration, and writes the status.
async fn migrate(
    rg: &ReplicationGroup,
    ctx: &Context,
    status: &mut ReplicationGroupStatus,
    change: migration::Change,
) -> Result<()> {
    let generation = rg.metadata.generation;
    let note = match &change {
        migration::Change::None => None,
        migration::Change::Start(id) => {
            status.migration = Some(MigrationStatus {
                id: id.clone(),
                phase: MigrationPhase::Quiescing,
                final_point: None,
            });
            Some(("MigrationRequested", "the standby asks for a planned migration: the application is stopped for a final cycle".to_string()))
        }
        migration::Change::Done(seq) => {
            if let Some(m) = status.migration.as_mut() {
                m.phase = MigrationPhase::Done;
                m.final_point = Some(*seq);
            }
            let msg = format!(
                "point {seq} is the application's final state here; the standby runs it from that point; the group is paused and the application stays stopped"
            );
            set_condition(
                &mut status.conditions,
                "Migrated",
                true,
                "FinalPointCommitted",
                &msg,
                generation,
            );
            Some(("Migrated", msg))
        }
        migration::Change::Withdrawn => {
            migration::resume(rg, ctx).await?;
            status.migration = None;
            Some((
                "MigrationWithdrawn",
                "the standby withdrew the migration: the application's replicas are back"
                    .to_string(),
            ))
        }
    };
    ctx.set_status(rg, status).await?;
    if matches!(change, migration::Change::Done(_)) {
        migration::pause(rg, ctx).await?;
    }
    if let Some((reason, msg)) = note {
        ctx.event(rg, false, reason, msg).await;
    }
    Ok(())
}

/// A step failed: say why (condition, last error, event, metric) and clean the cycle up.
async fn fail(
    rg: &ReplicationGroup,
    ctx: &Context,
    mut status: ReplicationGroupStatus,
    phase: CyclePhase,
    e: anyhow::Error,
) -> Result<Action> {
    let reason = match phase {
        CyclePhase::Snapshotting => "SnapshotFailed",
        CyclePhase::WaitingForSnapshots => "SnapshotNotReady",
        CyclePhase::Moving => "MoverFailed",
        CyclePhase::Committing => "CommitFailed",
        CyclePhase::CleaningUp => "CleanupFailed",
    };
    let msg = format!("{e:#}");
    tracing::warn!(group = %scope::group_name(rg), reason, error = %msg, "cycle failed");
    set_condition(
        &mut status.conditions,
        "Synced",
        false,
        reason,
        &msg,
        rg.metadata.generation,
    );
    set_condition(
        &mut status.conditions,
        "Degraded",
        true,
        reason,
        &msg,
        rg.metadata.generation,
    );
    status.last_error = Some(format!(
        "{msg} (the cycle is cleaned up and made again at the next interval)"
    ));
    if let Some(c) = status.cycle.as_mut() {
        c.error = Some(msg.clone());
    }
    set_phase(&mut status, CyclePhase::CleaningUp);
    ctx.set_status(rg, &status).await?;
    ctx.metrics
        .failures
        .get_or_create(&Metrics::group(&scope::group_name(rg)))
        .inc();
    ctx.event(rg, true, reason, msg).await;
    Ok(Action::requeue(NEXT_STEP))
}

/// Step 5: delete what the cycle made, then end it. A cycle that committed keeps its snapshots
/// as the next delta's base and drops the older ones; a failed one drops its own.
async fn clean_up(
    rg: &ReplicationGroup,
    ctx: &Context,
    mut status: ReplicationGroupStatus,
) -> Result<Action> {
    let cycle = status.cycle.clone().expect("a cycle");
    remove_cycle_objects(rg, ctx, Stages::Only(&cycle.stage)).await?;
    understudy_common::failpoint::hit("controller.cleanup.deleting");
    let committed = cycle.error.is_none()
        && status
            .last_point
            .as_ref()
            .is_some_and(|p| p.cut_id == cycle.stage);
    let old = if committed {
        Stages::AllBut(&cycle.stage)
    } else {
        Stages::Only(&cycle.stage)
    };
    remove_snapshots(rg, ctx, old).await?;
    status.last_cycle_start = Some(cycle.started.clone());
    status.cycle = None;
    refresh_rpo(&mut status);
    ctx.set_status(rg, &status).await?;
    ctx.finished(&cycle.stage);
    Ok(Action::requeue(NEXT_STEP))
}

/// Every object of `stages`, snapshots included; returns how many were still there.
async fn remove_objects(rg: &ReplicationGroup, ctx: &Context, stages: Stages<'_>) -> Result<usize> {
    Ok(remove_cycle_objects(rg, ctx, stages).await? + remove_snapshots(rg, ctx, stages).await?)
}

/// Deletes the mover pods, tickets and restored PVCs of `stages`; returns how many were still
/// there.
async fn remove_cycle_objects(
    rg: &ReplicationGroup,
    ctx: &Context,
    stages: Stages<'_>,
) -> Result<usize> {
    let selector = scope::selector(rg, stages);
    let mut left = 0;
    for ns in scope::namespaces(rg) {
        left += objects::delete_matching::<Pod>(&ctx.client, &ns, &selector).await?;
        left += objects::delete_matching::<Secret>(&ctx.client, &ns, &selector).await?;
        left +=
            objects::delete_matching::<PersistentVolumeClaim>(&ctx.client, &ns, &selector).await?;
    }
    Ok(left)
}

/// Deletes the snapshots of `stages` (a group snapshot takes its members with it).
async fn remove_snapshots(
    rg: &ReplicationGroup,
    ctx: &Context,
    stages: Stages<'_>,
) -> Result<usize> {
    let selector = scope::selector(rg, stages);
    let mut left = 0;
    for ns in scope::namespaces(rg) {
        let api: Api<VolumeSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
        for vs in api
            .list(&ListParams::default().labels(&selector))
            .await?
            .items
        {
            // Also before the snapshot is bound: a content made while its status lags
            // (a throttled snapshot-controller) would otherwise be retained.
            if let Some(content) = vs.content_name() {
                snapshots::delete_with_snapshot(&ctx.client, &content).await?;
            }
        }
        left += objects::delete_matching::<VolumeSnapshot>(&ctx.client, &ns, &selector).await?;
        if rg.spec.consistency == Consistency::Group {
            let resource = snapshots::group_snapshot_resource(&ctx.client).await?;
            let api: Api<kube::api::DynamicObject> =
                Api::namespaced_with(ctx.client.clone(), &ns, &resource);
            let list = api.list(&ListParams::default().labels(&selector)).await?;
            left += list.items.len();
            let groups = GroupSnapshots::new(ctx.client.clone(), &ns, resource);
            for g in list.items {
                groups.delete(&g.name_any()).await?;
            }
        }
    }
    Ok(left)
}

/// Runs hooks in order; with `quiet`, failures are only logged. A hook with on-error
/// `continue` reports its failure and lets the cycle go on.
async fn run_hooks(
    rg: &ReplicationGroup,
    ctx: &Context,
    hooks: &[ExecHook],
    quiet: bool,
) -> Result<()> {
    for hook in hooks {
        match run_hook(rg, ctx, hook).await {
            Ok(()) => {}
            Err(e) if quiet => tracing::warn!(error = %format!("{e:#}"), "hook failed"),
            Err(e) if hook.on_error == OnError::Continue => {
                ctx.event(
                    rg,
                    true,
                    "HookFailed",
                    format!("{e:#} (on-error continue: the cycle goes on)"),
                )
                .await;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Runs one hook in every running pod it selects, in the group's namespaces.
async fn run_hook(rg: &ReplicationGroup, ctx: &Context, hook: &ExecHook) -> Result<()> {
    let timeout = hook
        .timeout
        .as_deref()
        .map(humantime::parse_duration)
        .transpose()
        .context("a hook's timeout is not a duration (e.g. `30s`)")?
        .unwrap_or(HOOK_TIMEOUT);
    let mut ran = 0;
    for ns in scope::namespaces(rg) {
        for pod in understudy_kube::exec::running_pods(&ctx.client, &ns, &hook.pod_selector).await?
        {
            let out = understudy_kube::exec::exec(
                &ctx.client,
                &ns,
                &pod,
                hook.container.as_deref(),
                &hook.command,
                timeout,
            )
            .await?;
            if out.code != 0 {
                bail!(
                    "hook {:?} in pod {ns}/{pod} exited with {}: {}",
                    hook.command,
                    out.code,
                    out.stderr.trim()
                );
            }
            ran += 1;
        }
    }
    if ran == 0 {
        bail!(
            "hook {:?}: no running pod matches {:?}",
            hook.command,
            hook.pod_selector
        );
    }
    Ok(())
}

/// The source's identity and the target, from the group's Secret in the agent's namespace.
async fn connector(
    rg: &ReplicationGroup,
    ctx: &Context,
) -> Result<(Connector, TargetAddr, String)> {
    let name = &rg.spec.target.secret_name;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.agent_namespace);
    let s = secrets.get(name).await.with_context(|| {
        format!("cannot read Secret {}/{name} (spec.target.secretName): it holds the source's identity and the target's fingerprint", ctx.agent_namespace)
    })?;
    let field = |k: &str| -> Result<Vec<u8>> {
        s.data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|b| b.0.clone())
            .with_context(|| format!("Secret {}/{name} has no key {k}", ctx.agent_namespace))
    };
    let identity = Identity::from_pem(&field("cert.pem")?, &field("key.pem")?)?;
    let target_fp = String::from_utf8(field("target-fingerprint")?)?
        .trim()
        .to_string();
    let fp = target_fp.parse()?;
    let target: TargetAddr = rg.spec.target.address.parse()?;
    Ok((Connector::new(identity, vec![fp]), target, target_fp))
}

fn set_phase(status: &mut ReplicationGroupStatus, phase: CyclePhase) {
    if let Some(c) = status.cycle.as_mut() {
        c.phase = phase;
    }
}

/// RPO: seconds since the last point's snapshot.
fn refresh_rpo(status: &mut ReplicationGroupStatus) {
    if let Some(p) = &status.last_point
        && let Some(t) = parse_time(&p.snapshot_time)
    {
        status.rpo_seconds = Some((understudy_common::now_ms() - t) / 1000);
    }
}

fn parse_time(s: &str) -> Option<i64> {
    s.parse::<k8s_openapi::jiff::Timestamp>()
        .ok()
        .map(|t| t.as_millisecond())
}
