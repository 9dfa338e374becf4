//! Transform: what failover changes in an application's objects for the standby cluster.
//!
//! Rules come from a YAML file (docs/operations.md, "Transform rules"). Every match condition is
//! evaluated against the object as captured; the changes are then made in a fixed order:
//! leave out what the cluster owns, strip, labels, annotations, replicas, inert, images, storage
//! classes, patches (in file order), namespaces last. The result is deterministic.

mod diff;
mod inert;
mod namespaces;
mod owned;
mod rules;
mod select;
mod strip;

pub use diff::render_diff;
pub use inert::INERT_NODE_LABEL;
pub use namespaces::{NamespacePathRule, namespace_paths_of, values_at};
pub use owned::{APPLYSET_ID_LABEL, SYSTEM_NAMESPACES, cluster_owned};
pub use rules::{ImageRule, MetadataRule, PatchRule, ReplicaRule, RulesFile, Scope};
pub use select::{Match, MatchSpec, labels_of};
pub use strip::{SKIPPED_KINDS, strip_defaults};

use crate::bundle::{Bundle, ObjectId};
use anyhow::{Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;

/// Validated transform rules ([`Rules::load`], [`Rules::parse`]; the default strips only).
#[derive(Clone, Debug)]
pub struct Rules {
    /// Remove the default set of cluster-owned fields.
    pub strip_defaults: bool,
    /// More JSON pointers removed from every object.
    pub strip_paths: Vec<String>,
    /// Source namespace -> standby namespace.
    pub namespaces: BTreeMap<String, String>,
    /// Source storage class -> standby storage class.
    pub storage_classes: BTreeMap<String, String>,
    /// Image registry rewrites (first match wins per image).
    pub images: Vec<ImageRule>,
    /// Replica overrides (the last matching rule wins).
    pub replicas: Vec<ReplicaRule>,
    /// Label changes.
    pub labels: Vec<MetadataRule>,
    /// Annotation changes.
    pub annotations: Vec<MetadataRule>,
    /// JSON patches.
    pub patches: Vec<PatchRule>,
    /// Make the standby copy inert: nothing of the application runs until a failover applies it
    /// without this ([`inert`]).
    pub inert: bool,
    /// More places, per kind, that hold a namespace name (custom resources' references).
    pub namespace_paths: Vec<NamespacePathRule>,
}

impl Default for Rules {
    fn default() -> Self {
        Rules::compile(RulesFile::default()).expect("the empty rules file is valid")
    }
}

/// What the rules make of one object.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Apply this (transformed) object on the standby.
    Apply(Value),
    /// Leave the object out, for this reason.
    LeaveOut(String),
}

/// The outcome of transforming a set of objects.
#[derive(Clone, Debug, Default)]
pub struct Transformed {
    /// Objects to apply, with their identity on the standby, in input order.
    pub objects: Vec<(ObjectId, Value)>,
    /// Objects left out, with the reason.
    pub skipped: Vec<(ObjectId, String)>,
}

/// Kinds whose `spec.replicas` a replica rule sets even when the field is absent.
const SCALABLE: &[(&str, &str)] = &[
    ("apps", "Deployment"),
    ("apps", "StatefulSet"),
    ("apps", "ReplicaSet"),
    ("", "ReplicationController"),
];

impl Rules {
    /// Transforms one object: the object for the standby, or why it is left out.
    pub fn transform(&self, obj: &Value) -> Result<Verdict> {
        let id = ObjectId::of(obj)?;
        if let Some(reason) = self.skip_reason(&id, obj) {
            return Ok(Verdict::LeaveOut(reason));
        }
        let mut out = obj.clone();
        if self.strip_defaults {
            strip_defaults(&id.kind, &mut out);
        }
        for p in &self.strip_paths {
            remove_pointer(&mut out, p);
        }
        let applies = |s: &Scope| s.matches.matches(&id, obj);
        for r in self.labels.iter().filter(|r| applies(&r.scope)) {
            edit_metadata_map(&mut out, "labels", r);
        }
        for r in self.annotations.iter().filter(|r| applies(&r.scope)) {
            edit_metadata_map(&mut out, "annotations", r);
        }
        if let Some(r) = self.replicas.iter().rev().find(|r| applies(&r.scope)) {
            set_replicas(&id, &mut out, r.replicas);
        }
        if self.inert {
            inert::make_inert(&id, &mut out);
        }
        let images: Vec<&ImageRule> = self.images.iter().filter(|r| applies(&r.scope)).collect();
        rewrite_images(&id.kind, &mut out, &images);
        self.map_storage_classes(&id.kind, &mut out);
        for r in self.patches.iter().filter(|r| applies(&r.scope)) {
            json_patch::patch(&mut out, &r.patch)
                .with_context(|| format!("rule {} cannot be applied to {id}", r.scope.label))?;
        }
        self.map_namespaces(&id, obj, &mut out);
        strip::drop_empty_metadata_maps(&mut out);
        Ok(Verdict::Apply(out))
    }

    fn skip_reason(&self, id: &ObjectId, obj: &Value) -> Option<String> {
        if let Some(reason) = cluster_owned(id, obj) {
            return Some(reason.into());
        }
        if id.group == "storage.k8s.io"
            && id.kind == "StorageClass"
            && let Some(to) = self.storage_classes.get(&id.name)
        {
            return Some(format!("mapped to the standby's storage class {to}"));
        }
        if id.group.is_empty() && id.kind == "Namespace" {
            let standby = self.namespaces.get(&id.name).unwrap_or(&id.name);
            if SYSTEM_NAMESPACES.contains(&standby.as_str()) {
                return Some(format!("namespace {standby} exists on every cluster"));
            }
        }
        if self.inert && id.group.is_empty() && id.kind == "Pod" {
            return Some(
                "a bare Pod runs as soon as it exists: a failover (without inert) applies it"
                    .into(),
            );
        }
        None
    }

    /// Transforms every object of a bundle.
    pub fn transform_bundle(&self, bundle: &Bundle) -> Result<Transformed> {
        let mut out = Transformed::default();
        for obj in bundle.objects()? {
            match self.transform(&obj)? {
                Verdict::Apply(v) => out.objects.push((ObjectId::of(&v)?, v)),
                Verdict::LeaveOut(reason) => out.skipped.push((ObjectId::of(&obj)?, reason)),
            }
        }
        Ok(out)
    }

    fn map_storage_classes(&self, kind: &str, obj: &mut Value) {
        let map = |v: Option<&mut Value>| map_string(v, &self.storage_classes);
        const LEGACY: &str = "volume.beta.kubernetes.io~1storage-class";
        match kind {
            "PersistentVolumeClaim" | "PersistentVolume" => {
                map(obj.pointer_mut("/spec/storageClassName"));
                map(obj.pointer_mut(&format!("/metadata/annotations/{LEGACY}")));
            }
            "StatefulSet" => {
                if let Some(Value::Array(ts)) = obj.pointer_mut("/spec/volumeClaimTemplates") {
                    for t in ts {
                        map(t.pointer_mut("/spec/storageClassName"));
                        map(t.pointer_mut(&format!("/metadata/annotations/{LEGACY}")));
                    }
                }
            }
            _ => {}
        }
    }
}

fn map_string(v: Option<&mut Value>, map: &BTreeMap<String, String>) {
    if let Some(Value::String(s)) = v
        && let Some(to) = map.get(s.as_str())
    {
        *s = to.clone();
    }
}

/// Removes the value at a JSON pointer, if present.
fn remove_pointer(obj: &mut Value, pointer: &str) {
    let Some((parent, last)) = pointer.rsplit_once('/') else {
        return;
    };
    let key = last.replace("~1", "/").replace("~0", "~");
    match obj.pointer_mut(parent) {
        Some(Value::Object(m)) => {
            m.remove(&key);
        }
        Some(Value::Array(a)) => {
            if let Ok(i) = key.parse::<usize>()
                && i < a.len()
            {
                a.remove(i);
            }
        }
        _ => {}
    }
}

fn edit_metadata_map(obj: &mut Value, field: &str, r: &MetadataRule) {
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    let map = meta
        .entry(field)
        .or_insert_with(|| Value::Object(Default::default()));
    if let Some(m) = map.as_object_mut() {
        for k in &r.remove {
            m.remove(k);
        }
        for (k, v) in &r.add {
            m.insert(k.clone(), Value::String(v.clone()));
        }
    }
}

fn set_replicas(id: &ObjectId, obj: &mut Value, n: i64) {
    let scalable = SCALABLE.contains(&(id.group.as_str(), id.kind.as_str()));
    match obj.get_mut("spec").and_then(Value::as_object_mut) {
        Some(spec) if scalable || spec.contains_key("replicas") => {
            spec.insert("replicas".into(), Value::from(n));
        }
        _ => {}
    }
}

/// Where a kind keeps its pod spec.
fn pod_spec_pointer(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "Pod" => "/spec",
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => "/spec/template/spec",
        "CronJob" => "/spec/jobTemplate/spec/template/spec",
        _ => return None,
    })
}

fn rewrite_images(kind: &str, obj: &mut Value, rules: &[&ImageRule]) {
    if rules.is_empty() {
        return;
    }
    let Some(spec) = pod_spec_pointer(kind).and_then(|p| obj.pointer_mut(p)) else {
        return;
    };
    for list in ["initContainers", "containers", "ephemeralContainers"] {
        let Some(Value::Array(cs)) = spec.get_mut(list) else {
            continue;
        };
        for c in cs {
            if let Some(Value::String(image)) = c.get_mut("image")
                && let Some(new) = rules.iter().find_map(|r| rewrite_image(image, r))
            {
                *image = new;
            }
        }
    }
}

/// Rewrites `image` when it lies under `rule.from` (at a `/` boundary, or at a tag or digest when
/// `from` names a repository). Images without a registry host are Docker Hub's: `nginx:1` is
/// `docker.io/library/nginx:1`. A rule for registry `R` does not match `R:5000/...`: a port makes
/// another registry.
pub fn rewrite_image(image: &str, rule: &ImageRule) -> Option<String> {
    let full = normalize_image(image);
    let rest = full.strip_prefix(&rule.from)?;
    let repository = rule.from.contains('/');
    let at_boundary = rest.is_empty()
        || rest.starts_with('/')
        || (repository && (rest.starts_with(':') || rest.starts_with('@')));
    at_boundary.then(|| format!("{}{rest}", rule.to))
}

fn normalize_image(image: &str) -> String {
    let first = image.split('/').next().unwrap_or("");
    let has_host =
        image.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    if has_host {
        image.to_string()
    } else if image.contains('/') {
        format!("docker.io/{image}")
    } else {
        format!("docker.io/library/{image}")
    }
}

#[cfg(test)]
mod tests;
