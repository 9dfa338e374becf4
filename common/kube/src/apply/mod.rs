//! Apply: puts a transformed bundle on the standby cluster in dependency order, with server-side
//! apply, prunes what left the application since the last apply ([`applyset`]), and reports what
//! happened to each object.

pub mod applyset;
mod webhooks;

pub use applyset::ApplySet;

use crate::bundle::ObjectId;
use crate::client::{Resolver, api_message, is_namespaced};
use anyhow::Result;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::time::{Duration, Instant};

/// What to do with an object that already exists on the standby.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IfExists {
    /// Leave it as it is.
    Skip,
    /// Make it match the bundle (server-side apply, taking ownership of conflicting fields).
    #[default]
    Update,
    /// Report it as an error and leave it as it is.
    Fail,
}

/// Apply settings.
#[derive(Clone, Debug)]
pub struct ApplyOptions {
    /// Existing objects.
    pub if_exists: IfExists,
    /// Server-side apply field manager.
    pub field_manager: String,
    /// How long to wait for each CRD to be Established.
    pub crd_timeout: Duration,
    /// Prune what left the application since the last apply (see [`applyset`]).
    pub prune: bool,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            if_exists: IfExists::Update,
            field_manager: "understudy".into(),
            crd_timeout: Duration::from_secs(60),
            prune: false,
        }
    }
}

/// What happened to one object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// It did not exist and now does.
    Created,
    /// It existed and changed.
    Updated,
    /// It existed and already matched.
    Unchanged,
    /// It existed and the policy said to leave it.
    Skipped,
    /// The API server refused it, or it could not be applied.
    Rejected,
    /// An earlier apply created it and it is no longer in the bundle: deleted.
    Pruned,
}

/// The result for one object.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ObjectResult {
    /// The object (on the standby).
    pub object: ObjectId,
    /// What happened.
    pub outcome: Outcome,
    /// The API server's message, for rejections and skips.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl ObjectResult {
    fn new(object: ObjectId, outcome: Outcome, message: Option<String>) -> Self {
        ObjectResult {
            object,
            outcome,
            message,
        }
    }

    fn rejected(object: ObjectId, message: String) -> Self {
        Self::new(object, Outcome::Rejected, Some(message))
    }
}

/// Results in the order objects were applied.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ApplyReport {
    /// Per object, in apply order.
    pub results: Vec<ObjectResult>,
}

impl ApplyReport {
    /// True when nothing was rejected.
    pub fn ok(&self) -> bool {
        self.results.iter().all(|r| r.outcome != Outcome::Rejected)
    }

    /// Count of results with `outcome`.
    pub fn count(&self, outcome: Outcome) -> usize {
        self.results.iter().filter(|r| r.outcome == outcome).count()
    }

    /// The result for `id`.
    pub fn get(&self, id: &ObjectId) -> Option<&ObjectResult> {
        self.results.iter().find(|r| &r.object == id)
    }

    /// One line per object, then a summary.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for r in &self.results {
            let outcome = format!("{:?}", r.outcome).to_lowercase();
            let _ = write!(s, "{outcome:<10} {}", r.object);
            if let Some(m) = &r.message {
                let _ = write!(s, ": {m}");
            }
            s.push('\n');
        }
        let _ = writeln!(
            s,
            "{} created, {} updated, {} unchanged, {} skipped, {} rejected, {} pruned",
            self.count(Outcome::Created),
            self.count(Outcome::Updated),
            self.count(Outcome::Unchanged),
            self.count(Outcome::Skipped),
            self.count(Outcome::Rejected),
            self.count(Outcome::Pruned)
        );
        s
    }
}

/// Where a kind goes in the apply order (lower first). CRDs come first and are waited for; a
/// Service comes before the Ingress and workloads that use it; admission webhooks come last so
/// they cannot intercept the application's own objects before their backing Service exists.
pub fn apply_rank(id: &ObjectId) -> u8 {
    match (id.group.as_str(), id.kind.as_str()) {
        ("apiextensions.k8s.io", "CustomResourceDefinition") => 0,
        ("", "Namespace") => 1,
        ("storage.k8s.io", "StorageClass") => 2,
        ("snapshot.storage.k8s.io", "VolumeSnapshotClass") => 3,
        ("snapshot.storage.k8s.io", "VolumeSnapshotContent") => 4,
        ("snapshot.storage.k8s.io", "VolumeSnapshot") => 5,
        ("", "PersistentVolume") => 6,
        ("", "PersistentVolumeClaim") => 7,
        ("rbac.authorization.k8s.io", "ClusterRole" | "Role") => 8,
        ("", "ServiceAccount") => 9,
        ("rbac.authorization.k8s.io", "ClusterRoleBinding" | "RoleBinding") => 10,
        ("", "Secret" | "ConfigMap" | "LimitRange" | "ResourceQuota")
        | ("scheduling.k8s.io", "PriorityClass") => 11,
        ("", "Service") => 12,
        ("", "Pod" | "ReplicationController") | ("apps" | "batch", _) => 13,
        ("admissionregistration.k8s.io", _) => 17,
        (g, _) if super::capture::is_builtin_group(g) => 14,
        _ => 15,
    }
}

/// Sorts objects into apply order: by rank, then by identity (deterministic).
pub fn apply_order(objects: &mut [(ObjectId, Value)]) {
    objects.sort_by(|a, b| (apply_rank(&a.0), &a.0).cmp(&(apply_rank(&b.0), &b.0)));
}

/// Applies `objects` to the cluster in dependency order and reports each one; with
/// `opts.prune`, then deletes what an earlier apply created and the bundle no longer holds.
pub async fn apply(
    client: &Client,
    mut objects: Vec<(ObjectId, Value)>,
    opts: &ApplyOptions,
) -> ApplyReport {
    apply_order(&mut objects);
    let applyset = opts
        .prune
        .then(|| ApplySet::for_objects(&objects))
        .flatten();
    let members = applyset::Members::of(&objects);
    let keep: BTreeSet<ObjectId> = objects.iter().map(|(id, _)| id.clone()).collect();
    let mut applier = Applier {
        client: client.clone(),
        resolver: Resolver::new(client.clone()),
        opts: opts.clone(),
        unusable_crds: BTreeMap::new(),
        report: ApplyReport::default(),
        applyset: None,
        before_guard: webhooks::open(client, &objects, &opts.field_manager).await,
    };
    let mut recorded = None;
    let mut started = false;
    for (id, obj) in objects {
        // CRDs and namespaces first; then, before any member, the ApplySet record.
        if apply_rank(&id) > 1 && !started {
            applier.wait_for_crds().await;
            recorded = applier.open_applyset(applyset.as_ref(), &members).await;
            started = true;
        }
        applier.one(id, obj).await;
    }
    if !started {
        applier.wait_for_crds().await;
        recorded = applier.open_applyset(applyset.as_ref(), &members).await;
    }
    if let (Some(set), Some(recorded)) = (&applyset, recorded) {
        applier
            .report
            .results
            .extend(set.prune(client, &recorded, &keep).await);
        if let Err(e) = set.record(client, &members, &opts.field_manager).await {
            let parent = parent_id(set);
            applier
                .report
                .results
                .push(ObjectResult::rejected(parent, format!("{e:#}")));
        }
    }
    applier.report
}

fn parent_id(set: &ApplySet) -> ObjectId {
    ObjectId {
        group: String::new(),
        kind: "Secret".into(),
        namespace: set.namespace.clone(),
        name: set.name.clone(),
    }
}

struct Applier {
    client: Client,
    resolver: Resolver,
    opts: ApplyOptions,
    /// CRD group -> why its custom resources cannot be applied.
    unusable_crds: BTreeMap<(String, String), String>,
    report: ApplyReport,
    /// The ApplySet whose members this apply creates, once its record is written.
    applyset: Option<ApplySet>,
    /// Webhook configurations as they were before [`webhooks::open`] made them fail open.
    before_guard: BTreeMap<ObjectId, DynamicObject>,
}

impl Applier {
    async fn one(&mut self, id: ObjectId, obj: Value) {
        let (outcome, message) = match self.try_one(&id, &obj).await {
            Ok(done) => done,
            Err(e) => (Outcome::Rejected, Some(format!("{e:#}"))),
        };
        self.report
            .results
            .push(ObjectResult::new(id, outcome, message));
    }

    /// Widens the ApplySet's record to this bundle before any member is applied; what it held
    /// before (with this bundle's kinds and namespaces) is what pruning looks through. `None`
    /// when there is nothing to prune or the record cannot be written (reported).
    async fn open_applyset(
        &mut self,
        set: Option<&ApplySet>,
        members: &applyset::Members,
    ) -> Option<applyset::Members> {
        let set = set?;
        let wider = async {
            let recorded = set.recorded(&self.client).await?.union(members);
            set.record(&self.client, &recorded, &self.opts.field_manager)
                .await?;
            anyhow::Ok(recorded)
        };
        match wider.await {
            Ok(recorded) => {
                self.applyset = Some(set.clone());
                Some(recorded)
            }
            Err(e) => {
                self.report
                    .results
                    .push(ObjectResult::rejected(parent_id(set), format!("{e:#}")));
                None
            }
        }
    }

    async fn try_one(&mut self, id: &ObjectId, obj: &Value) -> Result<(Outcome, Option<String>)> {
        if let Some(why) = self.unusable_crds.get(&(id.group.clone(), id.kind.clone())) {
            anyhow::bail!("{why}");
        }
        let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let (ar, caps) = self.resolver.resolve(api_version, &id.kind).await?;
        let api: Api<DynamicObject> = if is_namespaced(&caps) {
            let ns = if id.namespace.is_empty() {
                self.client.default_namespace()
            } else {
                &id.namespace
            };
            Api::namespaced_with(self.client.clone(), ns, &ar)
        } else {
            Api::all_with(self.client.clone(), &ar)
        };
        let before = match self.before_guard.remove(id) {
            Some(b) => Some(b),
            None => api
                .get_opt(&id.name)
                .await
                .map_err(|e| anyhow::anyhow!("cannot read it: {}", api_message(&e)))?,
        };
        match (&before, self.opts.if_exists) {
            (Some(_), IfExists::Skip) => {
                return Ok((Outcome::Skipped, Some("exists (--if-exists skip)".into())));
            }
            (Some(_), IfExists::Fail) => {
                anyhow::bail!("already exists on the standby and --if-exists is fail");
            }
            _ => {}
        }
        let obj = self.with_membership(obj, before.as_ref());
        let params = PatchParams::apply(&self.opts.field_manager).force();
        let after = api
            .patch(&id.name, &params, &Patch::Apply(&obj))
            .await
            .map_err(|e| anyhow::anyhow!("{}", api_message(&e)))?;
        let outcome = match before {
            None => Outcome::Created,
            Some(b) if content(&b) == content(&after) => Outcome::Unchanged,
            Some(_) => Outcome::Updated,
        };
        Ok((outcome, None))
    }

    /// `obj` labelled as a member of the ApplySet when this apply creates it or an earlier one
    /// did; an object that was there before and is not a member stays unlabelled (never pruned),
    /// and so do the kinds pruning must never delete ([`applyset::never_pruned`]).
    fn with_membership(&self, obj: &Value, before: Option<&DynamicObject>) -> Value {
        let mut obj = obj.clone();
        let Some(set) = &self.applyset else {
            return obj;
        };
        if applyset::never_pruned(&obj) {
            return obj;
        }
        let member = before.is_none_or(|b| {
            b.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(applyset::PART_OF))
                == Some(&set.id)
        });
        if member && let Some(Value::Object(meta)) = obj.get_mut("metadata") {
            let labels = meta
                .entry("labels")
                .or_insert_with(|| Value::Object(Default::default()));
            if let Some(l) = labels.as_object_mut() {
                l.insert(applyset::PART_OF.into(), set.id.clone().into());
            }
        }
        obj
    }

    /// Waits until every CRD applied so far is Established; the custom resources of one that is
    /// not are rejected with the reason.
    async fn wait_for_crds(&mut self) {
        let crds: Vec<ObjectId> = self
            .report
            .results
            .iter()
            .filter(|r| {
                r.object.kind == "CustomResourceDefinition" && r.outcome != Outcome::Rejected
            })
            .map(|r| r.object.clone())
            .collect();
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        for id in crds {
            let deadline = Instant::now() + self.opts.crd_timeout;
            loop {
                let crd = api.get_opt(&id.name).await.ok().flatten();
                if let Some(crd) = &crd
                    && established(crd)
                {
                    break;
                }
                if Instant::now() >= deadline {
                    let (group, kind) = crd
                        .map(|c| (c.spec.group, c.spec.names.kind))
                        .unwrap_or_default();
                    self.unusable_crds.insert(
                        (group, kind),
                        format!(
                            "its CRD {} was not Established within {:?}",
                            id.name, self.opts.crd_timeout
                        ),
                    );
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What an object holds, without the bookkeeping that changes when nothing else does: the
/// resource version (the API server can write a new version of an unchanged object, e.g. on the
/// first update of a claim), the generation (it counts writes, and any write that changed
/// anything shows in the rest), field ownership, and status (controllers' business).
fn content(obj: &DynamicObject) -> Value {
    let mut v = serde_json::to_value(obj).unwrap_or(Value::Null);
    if let Some(m) = v.as_object_mut() {
        m.remove("status");
    }
    if let Some(Value::Object(meta)) = v.get_mut("metadata") {
        meta.remove("resourceVersion");
        meta.remove("generation");
        meta.remove("managedFields");
    }
    v
}

fn established(crd: &CustomResourceDefinition) -> bool {
    crd.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(group: &str, kind: &str, name: &str) -> ObjectId {
        ObjectId {
            group: group.into(),
            kind: kind.into(),
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    #[test]
    fn dependencies_come_first() {
        let mut objs: Vec<(ObjectId, Value)> = [
            id("networking.k8s.io", "Ingress", "web"),
            id("shop.example.com", "Widget", "w"),
            id(
                "admissionregistration.k8s.io",
                "ValidatingWebhookConfiguration",
                "v",
            ),
            id("apps", "Deployment", "web"),
            id("", "Service", "web"),
            id("", "ConfigMap", "c"),
            id("rbac.authorization.k8s.io", "RoleBinding", "rb"),
            id("", "ServiceAccount", "sa"),
            id("rbac.authorization.k8s.io", "Role", "r"),
            id("", "PersistentVolumeClaim", "d"),
            id("storage.k8s.io", "StorageClass", "fast"),
            id("", "Namespace", "shop"),
            id(
                "apiextensions.k8s.io",
                "CustomResourceDefinition",
                "widgets.shop.example.com",
            ),
        ]
        .into_iter()
        .map(|i| (i, Value::Null))
        .collect();
        apply_order(&mut objs);
        let kinds: Vec<&str> = objs.iter().map(|(i, _)| i.kind.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "CustomResourceDefinition",
                "Namespace",
                "StorageClass",
                "PersistentVolumeClaim",
                "Role",
                "ServiceAccount",
                "RoleBinding",
                "ConfigMap",
                "Service",
                "Deployment",
                "Ingress",
                "Widget",
                "ValidatingWebhookConfiguration"
            ]
        );
    }
}
