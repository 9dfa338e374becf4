//! Capture: every object of an application (its namespaces, optionally narrowed by a label
//! selector) plus the cluster-scoped objects it depends on, as a deterministic bundle.

use crate::bundle::{Bundle, ObjectId};
use crate::client::{Resolver, api_code, api_message, is_namespaced};
use crate::transform::SKIPPED_KINDS;
use anyhow::{Context, Result, bail};
use kube::Client;
use kube::api::{Api, DynamicObject, ListParams};
use kube::discovery::{ApiResource, Discovery, verbs};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeSet;

/// Which application to capture.
#[derive(Clone, Debug, Default)]
pub struct CaptureSpec {
    /// The application's namespaces.
    pub namespaces: Vec<String>,
    /// Optional label selector (`app=shop,tier!=cache`) narrowing the namespaced objects.
    pub label_selector: Option<String>,
}

/// What a capture produced.
#[derive(Clone, Debug)]
pub struct Capture {
    /// The bundle (one canonical file per object).
    pub bundle: Bundle,
    /// Objects captured.
    pub objects: Vec<ObjectId>,
    /// Objects seen but left out, with the reason.
    pub left_out: Vec<(ObjectId, String)>,
    /// Things the application refers to that were not found or could not be read.
    pub warnings: Vec<String>,
}

/// Summary printed by the CLI.
#[derive(Clone, Debug, Serialize)]
pub struct CaptureSummary {
    /// Bundle digest.
    pub digest: String,
    /// Objects captured.
    pub objects: usize,
    /// Objects left out.
    pub left_out: usize,
    /// Warnings.
    pub warnings: Vec<String>,
}

impl Capture {
    /// The summary.
    pub fn summary(&self) -> CaptureSummary {
        CaptureSummary {
            digest: self.bundle.digest(),
            objects: self.objects.len(),
            left_out: self.left_out.len(),
            warnings: self.warnings.clone(),
        }
    }
}

/// Groups whose kinds are built into Kubernetes (anything else is a custom resource).
pub(crate) fn is_builtin_group(group: &str) -> bool {
    group.is_empty()
        || group.ends_with("k8s.io")
        || matches!(
            group,
            "apps" | "batch" | "autoscaling" | "policy" | "extensions"
        )
}

/// Captures the application.
pub async fn capture(client: &Client, spec: &CaptureSpec) -> Result<Capture> {
    if spec.namespaces.is_empty() {
        bail!("nothing to capture: give at least one namespace");
    }
    let discovery = discover(client).await?;
    let mut c = Collector::default();
    for ns in &spec.namespaces {
        let api: Api<DynamicObject> =
            Api::all_with(client.clone(), &core("Namespace", "namespaces"));
        match api.get_opt(ns).await {
            Ok(Some(obj)) => c.keep(to_value(obj, "v1", "Namespace")),
            Ok(None) => {
                bail!("namespace {ns} does not exist on the source cluster: check --namespace")
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read namespace {ns}")),
        }
    }
    for ar in listable_namespaced(&discovery) {
        for ns in &spec.namespaces {
            let selector = spec.label_selector.as_deref();
            for obj in list_all(client, &ar, ns, selector, &mut c.warnings).await? {
                c.consider(obj);
            }
        }
    }
    add_dependencies(client, &mut c).await?;
    let bundle = Bundle::from_objects(&c.kept)?;
    let mut objects: Vec<ObjectId> = c.kept.iter().map(ObjectId::of).collect::<Result<_>>()?;
    objects.sort();
    c.left_out.sort();
    Ok(Capture {
        bundle,
        objects,
        left_out: c.left_out,
        warnings: c.warnings,
    })
}

async fn discover(client: &Client) -> Result<Discovery> {
    match Discovery::new(client.clone()).run_aggregated().await {
        Ok(d) => Ok(d),
        Err(_) => Discovery::new(client.clone())
            .run()
            .await
            .context("API discovery failed: check that the API server is reachable and the credentials may list API groups"),
    }
}

fn listable_namespaced(d: &Discovery) -> Vec<ApiResource> {
    let mut out: Vec<_> = d
        .groups()
        .flat_map(|g| g.recommended_resources())
        .filter(|(ar, caps)| {
            is_namespaced(caps)
                && caps.supports_operation(verbs::LIST)
                && caps.supports_operation(verbs::GET)
                && !SKIPPED_KINDS.contains(&(ar.group.as_str(), ar.kind.as_str()))
                && ar.group != "metrics.k8s.io"
        })
        .map(|(ar, _)| ar)
        .collect();
    out.sort_by(|a, b| (&a.group, &a.kind).cmp(&(&b.group, &b.kind)));
    out
}

fn core(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: String::new(),
        version: "v1".into(),
        api_version: "v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// Lists every object of one resource in a namespace, page by page.
async fn list_all(
    client: &Client,
    ar: &ApiResource,
    ns: &str,
    selector: Option<&str>,
    warnings: &mut Vec<String>,
) -> Result<Vec<Value>> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, ar);
    let mut lp = ListParams::default().limit(500);
    if let Some(s) = selector {
        lp = lp.labels(s);
    }
    let mut out = Vec::new();
    loop {
        let page = match api.list(&lp).await {
            Ok(p) => p,
            // An aggregated API that is down, or a kind removed since discovery: note and go on.
            Err(e) if matches!(api_code(&e), Some(404 | 503)) => {
                warnings.push(format!(
                    "cannot list {} in {ns}: {}",
                    ar.plural,
                    api_message(&e)
                ));
                return Ok(out);
            }
            Err(e) if api_code(&e) == Some(400) && selector.is_some() => {
                bail!(
                    "label selector `{}` is not valid: {}",
                    selector.unwrap_or(""),
                    api_message(&e)
                )
            }
            Err(e) => bail!(
                "cannot list {}.{} in namespace {ns}: {}; grant the agent list and get on it",
                ar.plural,
                if ar.group.is_empty() {
                    "core"
                } else {
                    &ar.group
                },
                api_message(&e)
            ),
        };
        let next = page.metadata.continue_.clone().filter(|c| !c.is_empty());
        out.extend(
            page.items
                .into_iter()
                .map(|o| to_value(o, &ar.api_version, &ar.kind)),
        );
        match next {
            Some(c) => lp.continue_token = Some(c),
            None => return Ok(out),
        }
    }
}

/// The object as JSON with its type filled in (list items come without it) and the fields that
/// change without the application changing removed, so an unchanged application captures
/// identically.
fn to_value(obj: DynamicObject, api_version: &str, kind: &str) -> Value {
    let mut v = serde_json::to_value(&obj).unwrap_or(Value::Null);
    if let Some(m) = v.as_object_mut() {
        m.insert("apiVersion".into(), api_version.into());
        m.insert("kind".into(), kind.into());
        m.remove("status");
        if let Some(Value::Object(meta)) = m.get_mut("metadata") {
            meta.remove("resourceVersion");
            meta.remove("managedFields");
        }
    }
    v
}

#[derive(Default)]
struct Collector {
    kept: Vec<Value>,
    left_out: Vec<(ObjectId, String)>,
    warnings: Vec<String>,
    seen: BTreeSet<ObjectId>,
}

impl Collector {
    fn keep(&mut self, obj: Value) {
        if let Ok(id) = ObjectId::of(&obj)
            && self.seen.insert(id)
        {
            self.kept.push(obj);
        }
    }

    fn consider(&mut self, obj: Value) {
        let Ok(id) = ObjectId::of(&obj) else {
            return;
        };
        match leave_out_reason(&id, &obj) {
            Some(reason) => self.left_out.push((id, reason.into())),
            None => self.keep(obj),
        }
    }

    fn kept_of(&self, group: &str, kind: &str) -> impl Iterator<Item = &Value> {
        self.kept
            .iter()
            .filter(move |o| ObjectId::of(o).is_ok_and(|id| id.group == group && id.kind == kind))
    }
}

/// Why a namespaced object is not part of the application's desired state, if it is not.
fn leave_out_reason(id: &ObjectId, obj: &Value) -> Option<&'static str> {
    let controlled = obj
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|refs| {
            refs.iter()
                .any(|r| r.get("controller") == Some(&Value::Bool(true)))
        });
    // Claims hold data: they stay even when a StatefulSet owns them.
    if controlled && id.kind != "PersistentVolumeClaim" {
        return Some("created by its controller, which re-creates it");
    }
    if id.group.is_empty() && id.kind == "ConfigMap" && id.name == "kube-root-ca.crt" {
        return Some("published by the cluster in every namespace");
    }
    if id.group.is_empty() && id.kind == "Secret" && is_auto_token(obj) {
        return Some("service-account token the cluster generates");
    }
    None
}

/// A legacy token secret generated for a service account: `<sa>-token-<suffix>`.
fn is_auto_token(obj: &Value) -> bool {
    let s = |p: &str| obj.pointer(p).and_then(Value::as_str);
    s("/type") == Some("kubernetes.io/service-account-token")
        && s("/metadata/annotations/kubernetes.io~1service-account.name").is_some_and(|sa| {
            s("/metadata/name").is_some_and(|n| n.starts_with(&format!("{sa}-token-")))
        })
}

/// Adds the cluster-scoped objects the application depends on.
async fn add_dependencies(client: &Client, c: &mut Collector) -> Result<()> {
    let mut resolver = Resolver::new(client.clone());
    let mut wanted: BTreeSet<(String, String, String)> = BTreeSet::new(); // (apiVersion, kind, name)
    let s = |o: &Value, p: &str| o.pointer(p).and_then(Value::as_str).map(str::to_string);
    let custom: BTreeSet<(String, String, String)> = c
        .kept
        .iter()
        .filter_map(|o| {
            let id = ObjectId::of(o).ok()?;
            let api_version = s(o, "/apiVersion")?;
            (!is_builtin_group(&id.group)).then_some((api_version, id.kind, id.group))
        })
        .collect();
    for (api_version, kind, group) in custom {
        let (ar, _) = resolver.resolve(&api_version, &kind).await?;
        wanted.insert((
            "apiextensions.k8s.io/v1".into(),
            "CustomResourceDefinition".into(),
            format!("{}.{group}", ar.plural),
        ));
    }
    for pvc in c.kept_of("", "PersistentVolumeClaim") {
        if let Some(pv) = s(pvc, "/spec/volumeName") {
            wanted.insert(("v1".into(), "PersistentVolume".into(), pv));
        }
        if let Some(sc) = s(pvc, "/spec/storageClassName") {
            wanted.insert(("storage.k8s.io/v1".into(), "StorageClass".into(), sc));
        }
    }
    for rb in c.kept_of("rbac.authorization.k8s.io", "RoleBinding") {
        if s(rb, "/roleRef/kind").as_deref() == Some("ClusterRole")
            && let Some(name) = s(rb, "/roleRef/name")
        {
            wanted.insert((
                "rbac.authorization.k8s.io/v1".into(),
                "ClusterRole".into(),
                name,
            ));
        }
    }
    let mut fetched = Vec::new();
    for (api_version, kind, name) in &wanted {
        let got = get_cluster_object(
            &mut resolver,
            client,
            api_version,
            kind,
            name,
            &mut c.warnings,
        );
        fetched.extend(got.await?);
    }
    // A PV's storage class is a dependency too.
    let pv_classes: BTreeSet<String> = fetched
        .iter()
        .filter_map(|pv| s(pv, "/spec/storageClassName"))
        .filter(|sc| {
            !wanted.contains(&(
                "storage.k8s.io/v1".into(),
                "StorageClass".into(),
                sc.clone(),
            ))
        })
        .collect();
    for sc in pv_classes {
        let got = get_cluster_object(
            &mut resolver,
            client,
            "storage.k8s.io/v1",
            "StorageClass",
            &sc,
            &mut c.warnings,
        );
        fetched.extend(got.await?);
    }
    fetched.into_iter().for_each(|o| c.keep(o));
    Ok(())
}

async fn get_cluster_object(
    resolver: &mut Resolver,
    client: &Client,
    api_version: &str,
    kind: &str,
    name: &str,
    warnings: &mut Vec<String>,
) -> Result<Option<Value>> {
    let (ar, _) = resolver.resolve(api_version, kind).await?;
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    match api.get_opt(name).await {
        Ok(Some(o)) => Ok(Some(to_value(o, &ar.api_version, &ar.kind))),
        Ok(None) => {
            warnings.push(format!(
                "the application refers to {kind} {name}, which does not exist"
            ));
            Ok(None)
        }
        Err(e) => bail!(
            "cannot read {kind} {name}: {}; grant the agent get on it",
            api_message(&e)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn controller_owned_objects_are_left_out_but_claims_stay() {
        let owned = |kind: &str| {
            json!({"apiVersion":"v1","kind":kind,"metadata":{"name":"x","namespace":"shop",
                "ownerReferences":[{"kind":"StatefulSet","name":"db","uid":"u","controller":true}]}})
        };
        let id = |o: &Value| ObjectId::of(o).unwrap();
        let pod = owned("Pod");
        assert!(leave_out_reason(&id(&pod), &pod).is_some());
        let pvc = owned("PersistentVolumeClaim");
        assert!(leave_out_reason(&id(&pvc), &pvc).is_none());
        let token = json!({"apiVersion":"v1","kind":"Secret","type":"kubernetes.io/service-account-token",
            "metadata":{"name":"app-token-x7k2p","namespace":"shop",
                "annotations":{"kubernetes.io/service-account.name":"app"}}});
        assert!(leave_out_reason(&id(&token), &token).is_some());
        let mine = json!({"apiVersion":"v1","kind":"Secret","type":"kubernetes.io/service-account-token",
            "metadata":{"name":"ci-long-lived","namespace":"shop",
                "annotations":{"kubernetes.io/service-account.name":"app"}}});
        assert!(leave_out_reason(&id(&mine), &mine).is_none());
    }
}
