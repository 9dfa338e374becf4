//! A planned migration on the primary (protocol 6). The standby asks (a `migrate` Failover);
//! the controller learns of it in a session's Welcome, scales the application's Deployments and
//! StatefulSets to zero (keeping their replicas in an annotation), waits until their pods are
//! gone, runs one final cycle whose Commit names the migration, and once the target took that
//! point as final, pauses the group: the application stays stopped here, its data and objects
//! are on the standby. A request withdrawn before the final point brings the replicas back.

use super::Context;
use super::scope;
use anyhow::{Context as _, Result};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use understudy_common::protocol::MigrationState;
use understudy_kube::bundle::Bundle;
use understudy_kube::crd::replication_group::{MigrationPhase, MigrationStatus, ReplicationGroup};

/// Annotation on a workload scaled to zero for a migration: its replicas before.
pub const REPLICAS_BEFORE: &str = "understudy.io/replicas-before-migration";

/// What a commit's session tells the controller to do about a migration.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing.
    None,
    /// The standby asks for migration `id`: quiesce.
    Start(String),
    /// The point `seq` was taken as the final state.
    Done(u64),
    /// The request is gone (withdrawn or replaced): undo the quiesce.
    Withdrawn,
}

/// The change, from the controller's migration and the target's word on it after a commit.
pub fn after_commit(ours: Option<&MigrationStatus>, target: Option<&MigrationState>) -> Change {
    let under_way = ours.filter(|o| o.phase != MigrationPhase::Done);
    match (under_way, target) {
        (Some(o), Some(t)) if t.id == o.id => match (o.phase, t.final_seq) {
            (MigrationPhase::FinalCycle, Some(seq)) => Change::Done(seq),
            _ => Change::None,
        },
        (Some(_), _) => Change::Withdrawn,
        (None, Some(t)) if t.final_seq.is_none() && ours.is_none_or(|o| o.id != t.id) => {
            Change::Start(t.id.clone())
        }
        (None, _) => Change::None,
    }
}

/// The migration whose final point the next commit is.
pub fn final_for(status: Option<&MigrationStatus>) -> Option<&str> {
    status
        .filter(|m| m.phase == MigrationPhase::FinalCycle)
        .map(|m| m.id.as_str())
}

/// The application's Deployments and StatefulSets.
async fn workloads(
    rg: &ReplicationGroup,
    ctx: &Context,
) -> Result<Vec<(Api<DynamicObject>, DynamicObject)>> {
    let lp = ListParams::default().labels(&scope::app_selector(rg));
    let mut out = Vec::new();
    for ns in scope::namespaces(rg) {
        for ar in [
            ApiResource::erase::<Deployment>(&()),
            ApiResource::erase::<StatefulSet>(&()),
        ] {
            let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &ar);
            let list = api
                .list(&lp)
                .await
                .with_context(|| format!("cannot list the {}s of namespace {ns}", ar.kind))?;
            out.extend(list.items.into_iter().map(|o| (api.clone(), o)));
        }
    }
    Ok(out)
}

/// Scales every workload to zero (once, keeping its replicas); returns how many of their pods
/// are still there.
pub async fn quiesce(rg: &ReplicationGroup, ctx: &Context) -> Result<usize> {
    let mut left = 0;
    for (api, w) in workloads(rg, ctx).await? {
        let replicas = w
            .data
            .pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        if replicas > 0 && !w.annotations().contains_key(REPLICAS_BEFORE) {
            let patch = json!({
                "metadata": {"annotations": {REPLICAS_BEFORE: replicas.to_string()}},
                "spec": {"replicas": 0},
            });
            api.patch(
                &w.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .with_context(|| format!("cannot scale {} to zero for the migration", w.name_any()))?;
        }
        left += pods_of(ctx, &w).await?;
    }
    if left > 0 {
        return Ok(left);
    }
    flush(rg, ctx).await
}

/// Label of the flush pods of a group's migration.
const FLUSH: &str = "understudy.io/migration-flush";

/// Once the application is gone: a pod per Filesystem volume of the group mounts it and
/// flushes its file system (`source-agent flush`), since the kubelet may not have unmounted it
/// yet and the application's last writes may still be in the page cache rather than on the
/// device the snapshot copies. Returns how many have not succeeded yet; once all have, deletes
/// them and returns 0.
async fn flush(rg: &ReplicationGroup, ctx: &Context) -> Result<usize> {
    let members = scope::members(&ctx.client, rg).await?;
    let mut waiting = 0;
    let mut done = Vec::new();
    for m in members.iter().filter(|m| m.mode == "Filesystem") {
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &m.namespace);
        let name = flush_pod_name(&m.pvc);
        match pods.get_opt(&name).await? {
            None => {
                let pod = flush_pod(&name, &m.pvc, &ctx.mover_image, &scope::group_name(rg))?;
                pods.create(&Default::default(), &pod)
                    .await
                    .with_context(|| {
                        format!("cannot create the flush pod {}/{name}", m.namespace)
                    })?;
                waiting += 1;
            }
            Some(p) => match p.status.as_ref().and_then(|s| s.phase.as_deref()) {
                Some("Succeeded") => done.push((pods, name)),
                Some("Failed") => anyhow::bail!(
                    "the flush pod {}/{name} failed: `kubectl logs -n {} {name}` says why; delete it to try again",
                    m.namespace,
                    m.namespace
                ),
                _ => waiting += 1,
            },
        }
    }
    if waiting == 0 {
        for (pods, name) in done {
            let _ = pods.delete(&name, &Default::default()).await;
        }
    }
    Ok(waiting)
}

fn flush_pod_name(pvc: &str) -> String {
    let h = blake3::hash(pvc.as_bytes()).to_hex();
    format!("understudy-flush-{}", &h[..16])
}

fn flush_pod(name: &str, pvc: &str, image: &str, group: &str) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {FLUSH: scope::label_value(group)}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "flush",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["/bin/source-agent", "flush", "--path", "/data"],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            }],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": pvc}}],
        },
    }))?)
}

/// Pods of workload `w` that still exist. A pod whose containers ended is counted until it is
/// gone: the kubelet deletes it only once it has unmounted its volumes, and a file system still
/// mounted may hold the application's last writes in the page cache, not yet on the device
/// the final snapshot copies.
async fn pods_of(ctx: &Context, w: &DynamicObject) -> Result<usize> {
    let Some(labels) = w
        .data
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
    else {
        return Ok(0);
    };
    let selector: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &w.namespace().unwrap_or_default());
    let list = pods
        .list(&ListParams::default().labels(&selector.join(",")))
        .await
        .context("cannot list the application's pods")?;
    Ok(list.items.len())
}

/// Brings back the replicas of every workload the migration scaled to zero.
pub async fn resume(rg: &ReplicationGroup, ctx: &Context) -> Result<()> {
    for (api, w) in workloads(rg, ctx).await? {
        let Some(n) = w
            .annotations()
            .get(REPLICAS_BEFORE)
            .and_then(|n| n.parse::<i64>().ok())
        else {
            continue;
        };
        let patch = json!({
            "metadata": {"annotations": {REPLICAS_BEFORE: null}},
            "spec": {"replicas": n},
        });
        api.patch(
            &w.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .with_context(|| format!("cannot scale {} back to {n}", w.name_any()))?;
    }
    Ok(())
}

/// The captured objects as the application ran: a workload the migration scaled to zero gets
/// its replicas back (the standby runs it as the primary did).
pub fn as_running(bundle: Bundle) -> Result<Bundle> {
    let mut objects = bundle.objects()?;
    for o in &mut objects {
        let before = o
            .pointer(&format!(
                "/metadata/annotations/{}",
                REPLICAS_BEFORE.replace('/', "~1")
            ))
            .and_then(Value::as_str)
            .and_then(|n| n.parse::<i64>().ok());
        let Some(n) = before else { continue };
        if let Some(a) = o
            .pointer_mut("/metadata/annotations")
            .and_then(Value::as_object_mut)
        {
            a.remove(REPLICAS_BEFORE);
        }
        o["spec"]["replicas"] = json!(n);
    }
    Bundle::from_objects(&objects)
}

/// Pauses the group: the migration is done.
pub async fn pause(rg: &ReplicationGroup, ctx: &Context) -> Result<()> {
    let api: Api<ReplicationGroup> =
        Api::namespaced(ctx.client.clone(), &rg.namespace().unwrap_or_default());
    api.patch(
        &rg.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"paused": true}})),
    )
    .await
    .with_context(|| {
        format!(
            "cannot pause ReplicationGroup {} after the migration",
            rg.name_any()
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(id: &str, phase: MigrationPhase) -> MigrationStatus {
        MigrationStatus {
            id: id.into(),
            phase,
            final_point: None,
        }
    }

    fn target(id: &str, final_seq: Option<u64>) -> MigrationState {
        MigrationState {
            id: id.into(),
            final_seq,
        }
    }

    #[test]
    fn a_request_starts_once_ends_at_the_final_cycle_and_withdrawn_undoes() {
        use MigrationPhase::*;
        assert_eq!(after_commit(None, None), Change::None);
        assert_eq!(
            after_commit(None, Some(&target("m", None))),
            Change::Start("m".into())
        );
        assert_eq!(
            after_commit(None, Some(&target("m", Some(4)))),
            Change::None,
            "an old, finished one"
        );
        let q = ours("m", Quiescing);
        assert_eq!(
            after_commit(Some(&q), Some(&target("m", None))),
            Change::None
        );
        let f = ours("m", FinalCycle);
        assert_eq!(
            after_commit(Some(&f), Some(&target("m", Some(7)))),
            Change::Done(7)
        );
        assert_eq!(after_commit(Some(&f), None), Change::Withdrawn);
        assert_eq!(
            after_commit(Some(&q), Some(&target("n", None))),
            Change::Withdrawn
        );
        let d = ours("m", Done);
        assert_eq!(
            after_commit(Some(&d), Some(&target("m", Some(7)))),
            Change::None
        );
        assert_eq!(
            after_commit(Some(&d), Some(&target("n", None))),
            Change::Start("n".into())
        );
        assert_eq!(final_for(Some(&f)), Some("m"));
        assert_eq!(final_for(Some(&q)), None);
    }

    #[test]
    fn the_final_capture_runs_the_workloads_with_their_replicas() {
        let d = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "w", "namespace": "shop", "annotations": {REPLICAS_BEFORE: "3", "x": "y"}},
            "spec": {"replicas": 0}});
        let b = as_running(Bundle::from_objects(&[d]).unwrap()).unwrap();
        let o = &b.objects().unwrap()[0];
        assert_eq!(o["spec"]["replicas"], 3);
        assert_eq!(o["metadata"]["annotations"], json!({"x": "y"}));
    }
}
