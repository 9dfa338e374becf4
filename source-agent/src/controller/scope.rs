//! What a ReplicationGroup protects: its namespaces, its PVCs (in a stable order, each with
//! the volume name the group stores it under), and the names and labels of what a cycle makes.

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use std::collections::BTreeMap;
use understudy_kube::crd::replication_group::ReplicationGroup;

/// Label on everything a cycle makes: the group (`<namespace>.<name>`).
pub const GROUP_LABEL: &str = "understudy.io/group";
/// Label on everything a cycle makes: its stage id.
pub const STAGE_LABEL: &str = "understudy.io/stage";

/// The group's name on the target: `<namespace>.<name>`.
pub fn group_name(rg: &ReplicationGroup) -> String {
    format!("{}.{}", rg.namespace().unwrap_or_default(), rg.name_any())
}

/// The namespaces the group protects (its own when the spec names none).
pub fn namespaces(rg: &ReplicationGroup) -> Vec<String> {
    if rg.spec.namespaces.is_empty() {
        vec![rg.namespace().unwrap_or_default()]
    } else {
        rg.spec.namespaces.clone()
    }
}

/// Labels of the objects a cycle makes. Group names hold a `.`, which label values allow.
pub fn labels(rg: &ReplicationGroup, stage: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (GROUP_LABEL.to_string(), label_value(&group_name(rg))),
        (STAGE_LABEL.to_string(), stage.to_string()),
    ])
}

/// Which stages of a group a selection covers.
#[derive(Clone, Copy, Debug)]
pub enum Stages<'a> {
    /// Every stage.
    All,
    /// This one.
    Only(&'a str),
    /// Every one but this (the kept base).
    AllBut(&'a str),
}

/// A label selector for the objects of the group's `stages`.
pub fn selector(rg: &ReplicationGroup, stages: Stages<'_>) -> String {
    let group = format!("{GROUP_LABEL}={}", label_value(&group_name(rg)));
    match stages {
        Stages::All => group,
        Stages::Only(s) => format!("{group},{STAGE_LABEL}={s}"),
        Stages::AllBut(s) => format!("{group},{STAGE_LABEL}!={s}"),
    }
}

/// Label values are at most 63 characters: long group names are shortened with a hash.
pub(crate) fn label_value(v: &str) -> String {
    if v.len() <= 63 {
        return v.to_string();
    }
    let h = blake3::hash(v.as_bytes()).to_hex();
    format!("{}-{}", &v[..50], &h[..12])
}

/// A protected PVC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub pvc: String,
    /// The volume's name in the group: `<namespace>.<pvc>`.
    pub volume: String,
    /// `Block` or `Filesystem`.
    pub mode: String,
    /// Its storage class.
    pub storage_class: Option<String>,
    /// Its requested size (a quantity).
    pub size: String,
}

/// The PVCs the group protects, by namespace then name; the cycle's own PVCs are never among
/// them. A PVC that is not bound yet is an error: it has no data to snapshot.
pub async fn members(client: &Client, rg: &ReplicationGroup) -> Result<Vec<Member>> {
    let mut out = Vec::new();
    for ns in namespaces(rg) {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
        let mut lp = ListParams::default().labels(&app_selector(rg));
        lp.limit = Some(500);
        let list = api.list(&lp).await.with_context(|| {
            format!(
                "cannot list PVCs in namespace {ns}: the agent needs list on persistentvolumeclaims"
            )
        })?;
        for pvc in list.items {
            let name = pvc.name_any();
            let spec = pvc.spec.clone().unwrap_or_default();
            let phase = pvc
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default();
            if phase != "Bound" {
                bail!("PVC {ns}/{name} is {phase:?}, not Bound: it has no volume to snapshot yet");
            }
            let size = spec
                .resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get("storage"))
                .map(|q| q.0.clone())
                .unwrap_or_default();
            out.push(Member {
                volume: format!("{ns}.{name}"),
                namespace: ns.clone(),
                pvc: name,
                mode: spec.volume_mode.unwrap_or_else(|| "Filesystem".into()),
                storage_class: spec.storage_class_name,
                size,
            });
        }
    }
    out.sort_by(|a, b| (&a.namespace, &a.pvc).cmp(&(&b.namespace, &b.pvc)));
    if out.is_empty() {
        bail!(
            "no PVC in namespaces {:?} matches the group's selector {:?}: nothing to protect",
            namespaces(rg),
            rg.spec.selector
        );
    }
    Ok(out)
}

/// The application's label selector, excluding every object a cycle made.
pub fn app_selector(rg: &ReplicationGroup) -> String {
    let mut parts: Vec<String> = rg
        .spec
        .selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    parts.push(format!("!{STAGE_LABEL}"));
    parts.join(",")
}
