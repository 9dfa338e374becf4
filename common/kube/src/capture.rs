//! Capture: every object of an application (its namespaces, optionally narrowed by a label
//! selector) plus the cluster-scoped objects it depends on, as a deterministic bundle.

use crate::bundle::{Bundle, ObjectId};
use crate::client::{Resolver, api_code, api_message, is_namespaced};
use crate::transform::{SKIPPED_KINDS, cluster_owned, namespace_paths_of, values_at};
use anyhow::{Context, Result, bail};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
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
            Api::all_with(client.clone(), &ApiResource::erase::<Namespace>(&()));
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
    add_dependencies(client, &discovery, &spec.namespaces, &mut c).await?;
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

/// Lists every object of one resource in a namespace, page by page.
async fn list_all(
    client: &Client,
    ar: &ApiResource,
    ns: &str,
    selector: Option<&str>,
    warnings: &mut Vec<String>,
) -> Result<Vec<Value>> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, ar);
    list_pages(&api, ar, selector, &format!("namespace {ns}"), warnings).await
}

/// Every object `api` lists (`where_` names its scope in messages), page by page.
async fn list_pages(
    api: &Api<DynamicObject>,
    ar: &ApiResource,
    selector: Option<&str>,
    where_: &str,
    warnings: &mut Vec<String>,
) -> Result<Vec<Value>> {
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
                    "cannot list {} in {where_}: {}",
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
                "cannot list {}.{} in {where_}: {}; grant the agent list and get on it",
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
    if let Some(reason) = cluster_owned(id, obj) {
        return Some(reason);
    }
    let controlled = obj
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|refs| {
            refs.iter()
                .any(|r| r.get("controller") == Some(&Value::Bool(true)))
        });
    // Claims hold data: they stay even when a StatefulSet owns them.
    (controlled && id.kind != "PersistentVolumeClaim")
        .then_some("created by its controller, which re-creates it")
}

/// A cluster-scoped object wanted by the application: (apiVersion, kind, name).
type Wanted = BTreeSet<(String, String, String)>;

fn text(o: &Value, p: &str) -> Option<String> {
    o.pointer(p).and_then(Value::as_str).map(str::to_string)
}

/// Adds the cluster-scoped objects the application depends on: custom resources its objects name,
/// bindings of its service accounts, webhooks and API services its Services serve, then the CRDs,
/// volumes, storage classes and cluster roles of everything kept.
async fn add_dependencies(
    client: &Client,
    discovery: &Discovery,
    namespaces: &[String],
    c: &mut Collector,
) -> Result<()> {
    let mut resolver = Resolver::new(client.clone());
    let named = named_cluster_resources(discovery, &c.kept);
    fetch_into(client, &mut resolver, &named, c).await?;
    for crb in bindings_of_service_accounts(client, c).await? {
        c.consider(crb);
    }
    for obj in served_by_the_application(client, namespaces, &mut c.warnings).await? {
        c.consider(obj);
    }
    let mut wanted = Wanted::new();
    wanted.extend(crds_of(&mut resolver, &c.kept).await?);
    for pvc in c.kept_of("", "PersistentVolumeClaim") {
        if let Some(pv) = text(pvc, "/spec/volumeName") {
            wanted.insert(("v1".into(), "PersistentVolume".into(), pv));
        }
    }
    wanted.extend(storage_classes_of(&c.kept));
    for rb in c
        .kept_of("rbac.authorization.k8s.io", "RoleBinding")
        .chain(c.kept_of("rbac.authorization.k8s.io", "ClusterRoleBinding"))
    {
        if text(rb, "/roleRef/kind").as_deref() == Some("ClusterRole")
            && let Some(name) = text(rb, "/roleRef/name")
        {
            wanted.insert((
                "rbac.authorization.k8s.io/v1".into(),
                "ClusterRole".into(),
                name,
            ));
        }
    }
    fetch_into(client, &mut resolver, &wanted, c).await?;
    // A PV's storage class is a dependency too.
    let pv_classes: Wanted = storage_classes_of(&c.kept)
        .into_iter()
        .filter(|sc| !wanted.contains(sc))
        .collect();
    fetch_into(client, &mut resolver, &pv_classes, c).await
}

/// Fetches `wanted` and keeps what is the application's (a built-in role it binds is not).
async fn fetch_into(
    client: &Client,
    resolver: &mut Resolver,
    wanted: &Wanted,
    c: &mut Collector,
) -> Result<()> {
    for (api_version, kind, name) in wanted {
        let got =
            get_cluster_object(resolver, client, api_version, kind, name, &mut c.warnings).await?;
        if let Some(obj) = got {
            c.consider(obj);
        }
    }
    Ok(())
}

/// The CRDs of the custom resources kept.
async fn crds_of(resolver: &mut Resolver, kept: &[Value]) -> Result<Wanted> {
    let custom: BTreeSet<(String, String, String)> = kept
        .iter()
        .filter_map(|o| {
            let id = ObjectId::of(o).ok()?;
            let api_version = text(o, "/apiVersion")?;
            (!is_builtin_group(&id.group)).then_some((api_version, id.kind, id.group))
        })
        .collect();
    let mut out = Wanted::new();
    for (api_version, kind, group) in custom {
        let (ar, _) = resolver.resolve(&api_version, &kind).await?;
        out.insert((
            "apiextensions.k8s.io/v1".into(),
            "CustomResourceDefinition".into(),
            format!("{}.{group}", ar.plural),
        ));
    }
    Ok(out)
}

/// Storage classes named by claims, claim templates and volumes, by field or by the legacy
/// `volume.beta.kubernetes.io/storage-class` annotation.
fn storage_classes_of(kept: &[Value]) -> Wanted {
    let class = |o: &Value, spec: &str, meta: &str| {
        text(o, &format!("{spec}/storageClassName")).or_else(|| {
            text(
                o,
                &format!("{meta}/annotations/volume.beta.kubernetes.io~1storage-class"),
            )
        })
    };
    let mut out = Wanted::new();
    for o in kept {
        let kind = o.get("kind").and_then(Value::as_str).unwrap_or("");
        let names: Vec<String> = match kind {
            "PersistentVolumeClaim" | "PersistentVolume" => {
                class(o, "/spec", "/metadata").into_iter().collect()
            }
            "StatefulSet" => o
                .pointer("/spec/volumeClaimTemplates")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|t| class(t, "/spec", "/metadata"))
                .collect(),
            _ => Vec::new(),
        };
        for sc in names.into_iter().filter(|n| !n.is_empty()) {
            out.insert(("storage.k8s.io/v1".into(), "StorageClass".into(), sc));
        }
    }
    out
}

/// ClusterRoleBindings with a subject that is one of the captured service accounts.
async fn bindings_of_service_accounts(client: &Client, c: &mut Collector) -> Result<Vec<Value>> {
    let accounts: BTreeSet<(String, String)> = c
        .kept_of("", "ServiceAccount")
        .filter_map(|sa| {
            Some((
                text(sa, "/metadata/namespace")?,
                text(sa, "/metadata/name")?,
            ))
        })
        .collect();
    if accounts.is_empty() {
        return Ok(Vec::new());
    }
    let ar = ApiResource::erase::<ClusterRoleBinding>(&());
    let all = list_pages(
        &Api::all_with(client.clone(), &ar),
        &ar,
        None,
        "the cluster",
        &mut c.warnings,
    )
    .await?;
    Ok(all
        .into_iter()
        .filter(|crb| {
            crb.pointer("/subjects")
                .and_then(Value::as_array)
                .is_some_and(|subjects| {
                    subjects.iter().any(|s| {
                        text(s, "/kind").as_deref() == Some("ServiceAccount")
                            && text(s, "/namespace")
                                .zip(text(s, "/name"))
                                .is_some_and(|k| accounts.contains(&k))
                    })
                })
        })
        .collect())
}

/// Admission webhook configurations and API services that call a Service in one of `namespaces`
/// (the application's own webhook, say): they go with the Service.
async fn served_by_the_application(
    client: &Client,
    namespaces: &[String],
    warnings: &mut Vec<String>,
) -> Result<Vec<Value>> {
    let kinds = [
        ApiResource::erase::<ValidatingWebhookConfiguration>(&()),
        ApiResource::erase::<MutatingWebhookConfiguration>(&()),
        ApiResource::erase::<APIService>(&()),
    ];
    let mut out = Vec::new();
    for ar in kinds {
        let api = Api::all_with(client.clone(), &ar);
        let all = list_pages(&api, &ar, None, "the cluster", warnings).await?;
        // Their only namespace references are their Services'.
        let paths = namespace_paths_of(&ar.kind);
        out.extend(all.into_iter().filter(|o| {
            paths.iter().flat_map(|p| values_at(o, p)).any(|ns| {
                ns.as_str()
                    .is_some_and(|ns| namespaces.iter().any(|n| n == ns))
            })
        }));
    }
    Ok(out)
}

/// Cluster-scoped custom resources the kept objects name with a `{kind, name}` reference (a
/// cert-manager `issuerRef` to a ClusterIssuer, say), matched by kind, and by group when the
/// reference gives one (`group`, `apiGroup` or `apiVersion`).
fn named_cluster_resources(d: &Discovery, kept: &[Value]) -> Wanted {
    let cluster_custom: Vec<ApiResource> = d
        .groups()
        .flat_map(|g| g.recommended_resources())
        .filter(|(ar, caps)| !is_namespaced(caps) && !is_builtin_group(&ar.group))
        .map(|(ar, _)| ar)
        .collect();
    let mut out = Wanted::new();
    for obj in kept {
        let Some(body) = obj.as_object() else {
            continue;
        };
        for (field, v) in body {
            if field != "metadata" {
                references(v, &cluster_custom, &mut out);
            }
        }
    }
    out
}

fn references(v: &Value, kinds: &[ApiResource], out: &mut Wanted) {
    match v {
        Value::Object(m) => {
            if let (Some(Value::String(kind)), Some(Value::String(name))) =
                (m.get("kind"), m.get("name"))
            {
                let group = ["group", "apiGroup"]
                    .iter()
                    .find_map(|k| m.get(*k).and_then(Value::as_str))
                    .map(str::to_string)
                    .or_else(|| {
                        let av = m.get("apiVersion").and_then(Value::as_str)?;
                        Some(av.rsplit_once('/').map_or("", |(g, _)| g).to_string())
                    });
                for ar in kinds
                    .iter()
                    .filter(|ar| &ar.kind == kind && group.as_ref().is_none_or(|g| g == &ar.group))
                {
                    out.insert((ar.api_version.clone(), ar.kind.clone(), name.clone()));
                }
            }
            m.values().for_each(|v| references(v, kinds, out));
        }
        Value::Array(items) => items.iter().for_each(|v| references(v, kinds, out)),
        _ => {}
    }
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
    }

    #[test]
    fn references_to_cluster_scoped_custom_resources_are_found() {
        let ar = |group: &str, kind: &str| ApiResource {
            group: group.into(),
            version: "v1".into(),
            api_version: format!("{group}/v1"),
            kind: kind.into(),
            plural: format!("{}s", kind.to_lowercase()),
        };
        let kinds = [
            ar("cert-manager.io", "ClusterIssuer"),
            ar("other.io", "ClusterIssuer"),
        ];
        let cert = json!({"spec":{"issuerRef":{"kind":"ClusterIssuer","name":"letsencrypt","group":"cert-manager.io"},
            "list":[{"kind":"ClusterIssuer","name":"any"}],"x":{"kind":"Issuer","name":"ns-scoped"}}});
        let mut out = Wanted::new();
        references(&cert, &kinds, &mut out);
        let names: Vec<_> = out.iter().map(|(av, _, n)| format!("{av} {n}")).collect();
        assert_eq!(
            names,
            [
                "cert-manager.io/v1 any",
                "cert-manager.io/v1 letsencrypt",
                "other.io/v1 any"
            ]
        );
    }

    #[test]
    fn legacy_storage_class_annotations_are_followed() {
        let pvc = json!({"apiVersion":"v1","kind":"PersistentVolumeClaim","metadata":{"name":"d",
            "annotations":{"volume.beta.kubernetes.io/storage-class":"old"}}});
        let sts = json!({"apiVersion":"apps/v1","kind":"StatefulSet","metadata":{"name":"db"},
            "spec":{"volumeClaimTemplates":[{"metadata":{"name":"data",
                "annotations":{"volume.beta.kubernetes.io/storage-class":"tmpl"}}},
                {"metadata":{"name":"logs"},"spec":{"storageClassName":"fast"}}]}});
        let got: Vec<String> = storage_classes_of(&[pvc, sts])
            .into_iter()
            .map(|(_, _, n)| n)
            .collect();
        assert_eq!(got, ["fast", "old", "tmpl"]);
    }
}
