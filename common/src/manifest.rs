//! Application manifests: the bundle a recovery point stores (captured from a directory of YAML in
//! standalone mode) and the transforms failover applies to it.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// Manifest files by relative path, in a canonical order: two captures of the same directory give
/// identical bytes and digests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    /// Relative path -> file content.
    pub files: BTreeMap<String, Vec<u8>>,
}

/// Largest manifest file accepted.
const MAX_MANIFEST_FILE: u64 = 16 << 20;

impl Bundle {
    /// Reads every `.yaml`, `.yml` and `.json` file under `dir` (recursively) and checks that each
    /// document is a Kubernetes object (a mapping with apiVersion and kind).
    pub fn capture(dir: &Path) -> Result<Self> {
        let mut files = BTreeMap::new();
        collect(dir, dir, &mut files)?;
        for (path, data) in &files {
            parse_documents(data).with_context(|| {
                format!(
                    "manifest {}/{path} is not valid: fix or remove it",
                    dir.display()
                )
            })?;
        }
        Ok(Bundle { files })
    }

    /// Canonical encoding stored in a recovery point.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("a bundle always serialises")
    }

    /// Decodes a stored bundle.
    pub fn decode(b: &[u8]) -> Result<Self> {
        postcard::from_bytes(b).context("manifest bundle is unreadable")
    }
}

fn collect(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) -> Result<()> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read manifest directory {}", dir.display()))?;
    for e in entries {
        let e = e?;
        let path = e.path();
        let ft = e.file_type()?;
        if ft.is_dir() {
            collect(root, &path, out)?;
            continue;
        }
        let ext = path.extension().and_then(|x| x.to_str()).unwrap_or("");
        if !ft.is_file() || !matches!(ext, "yaml" | "yml" | "json") {
            continue;
        }
        let len = e.metadata()?.len();
        if len > MAX_MANIFEST_FILE {
            bail!(
                "manifest {} is {len} bytes, over the {MAX_MANIFEST_FILE}-byte limit",
                path.display()
            );
        }
        let rel = path
            .strip_prefix(root)
            .expect("under root")
            .to_string_lossy()
            .into_owned();
        out.insert(
            rel,
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?,
        );
    }
    Ok(())
}

/// Parses a YAML (or JSON) file into its Kubernetes objects; empty documents are skipped.
pub fn parse_documents(data: &[u8]) -> Result<Vec<Value>> {
    let text = std::str::from_utf8(data).context("not UTF-8")?;
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let v = Value::deserialize(doc)
            .with_context(|| format!("document {} is not valid YAML", i + 1))?;
        if v.is_null() {
            continue;
        }
        let ok = v.get("apiVersion").is_some_and(Value::is_string)
            && v.get("kind").is_some_and(Value::is_string);
        if !ok {
            bail!(
                "document {} is not a Kubernetes object (it needs string fields apiVersion and kind)",
                i + 1
            );
        }
        out.push(v);
    }
    Ok(out)
}

/// What failover changes in manifests (standalone subset; the Kubernetes control plane extends it).
#[derive(Clone, Debug, Default)]
pub struct Transform {
    /// Source namespace -> standby namespace.
    pub namespaces: BTreeMap<String, String>,
    /// Source storage class -> standby storage class.
    pub storage_classes: BTreeMap<String, String>,
}

/// Kinds the cluster owns or regenerates: never re-applied.
const SKIPPED_KINDS: &[&str] = &["Event", "Endpoints", "EndpointSlice", "Lease", "Node"];
/// Metadata fields the cluster sets.
const STRIPPED_METADATA: &[&str] = &[
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
    "managedFields",
    "ownerReferences",
];
/// PVC annotations written by the binder and provisioner.
const PVC_BIND_ANNOTATIONS: &[&str] = &[
    "pv.kubernetes.io/bind-completed",
    "pv.kubernetes.io/bound-by-controller",
    "volume.beta.kubernetes.io/storage-provisioner",
    "volume.kubernetes.io/storage-provisioner",
    "volume.kubernetes.io/selected-node",
];

impl Transform {
    /// Transforms one object; `None` when the object is not to be applied on the standby.
    pub fn apply(&self, mut obj: Value) -> Option<Value> {
        let kind = obj.get("kind")?.as_str()?.to_string();
        if SKIPPED_KINDS.contains(&kind.as_str()) {
            return None;
        }
        strip_metadata(&mut obj);
        if let Some(o) = obj.as_object_mut() {
            o.remove("status");
        }
        self.map_namespaces(&kind, &mut obj);
        match kind.as_str() {
            "Service" => strip_service(&mut obj),
            "PersistentVolumeClaim" => {
                remove_path(&mut obj, &["spec", "volumeName"]);
                for a in PVC_BIND_ANNOTATIONS {
                    remove_path(&mut obj, &["metadata", "annotations", a]);
                }
                self.map_storage_class(obj.pointer_mut("/spec/storageClassName"));
            }
            "PersistentVolume" => {
                remove_path(&mut obj, &["spec", "claimRef", "uid"]);
                remove_path(&mut obj, &["spec", "claimRef", "resourceVersion"]);
                self.map_storage_class(obj.pointer_mut("/spec/storageClassName"));
            }
            "StatefulSet" => {
                if let Some(Value::Array(ts)) = obj.pointer_mut("/spec/volumeClaimTemplates") {
                    for t in ts {
                        self.map_storage_class(t.pointer_mut("/spec/storageClassName"));
                    }
                }
            }
            "Pod" => remove_path(&mut obj, &["spec", "nodeName"]),
            _ => {}
        }
        drop_empty_metadata_maps(&mut obj);
        Some(obj)
    }

    fn map_namespaces(&self, kind: &str, obj: &mut Value) {
        let map = |v: Option<&mut Value>| {
            if let Some(Value::String(ns)) = v
                && let Some(to) = self.namespaces.get(ns.as_str())
            {
                *ns = to.clone();
            }
        };
        map(obj.pointer_mut("/metadata/namespace"));
        if kind == "Namespace" {
            map(obj.pointer_mut("/metadata/name"));
        }
        if matches!(kind, "RoleBinding" | "ClusterRoleBinding")
            && let Some(Value::Array(subjects)) = obj.pointer_mut("/subjects")
        {
            subjects
                .iter_mut()
                .for_each(|s| map(s.pointer_mut("/namespace")));
        }
    }

    fn map_storage_class(&self, v: Option<&mut Value>) {
        if let Some(Value::String(sc)) = v
            && let Some(to) = self.storage_classes.get(sc.as_str())
        {
            *sc = to.clone();
        }
    }

    /// Transforms a whole bundle into YAML files (same relative paths); skipped objects are counted.
    pub fn apply_bundle(&self, bundle: &Bundle) -> Result<(BTreeMap<String, String>, usize)> {
        let mut out = BTreeMap::new();
        let mut skipped = 0;
        for (path, data) in &bundle.files {
            let docs = parse_documents(data)
                .with_context(|| format!("stored manifest {path} is not valid"))?;
            let mut text = String::new();
            for d in docs {
                match self.apply(d) {
                    Some(v) => {
                        text.push_str("---\n");
                        text.push_str(&serde_yaml_ng::to_string(&v)?);
                    }
                    None => skipped += 1,
                }
            }
            out.insert(path.clone(), text);
        }
        Ok((out, skipped))
    }
}

fn strip_metadata(obj: &mut Value) {
    if let Some(Value::Object(m)) = obj.get_mut("metadata") {
        for f in STRIPPED_METADATA {
            m.remove(*f);
        }
    }
}

/// Stripping can leave `annotations: {}` or `labels: {}` behind; drop them.
fn drop_empty_metadata_maps(obj: &mut Value) {
    if let Some(Value::Object(m)) = obj.get_mut("metadata") {
        m.retain(|k, v| {
            !(matches!(k.as_str(), "annotations" | "labels")
                && v.as_object().is_some_and(|o| o.is_empty()))
        });
    }
}

fn strip_service(obj: &mut Value) {
    let headless = obj.pointer("/spec/clusterIP").and_then(Value::as_str) == Some("None");
    if !headless {
        remove_path(obj, &["spec", "clusterIP"]);
        remove_path(obj, &["spec", "clusterIPs"]);
    }
    remove_path(obj, &["spec", "healthCheckNodePort"]);
}

fn remove_path(obj: &mut Value, path: &[&str]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = obj;
    for p in parents {
        match cur.get_mut(*p) {
            Some(next) => cur = next,
            None => return,
        }
    }
    if let Some(m) = cur.as_object_mut() {
        m.remove(*last);
    }
}

/// Parses `from=to` pairs given on a command line.
pub fn parse_map(pairs: &[String], what: &str) -> Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|p| {
            let (a, b) = p
                .split_once('=')
                .with_context(|| format!("{what} map entry `{p}` is not FROM=TO"))?;
            Ok((a.to_string(), b.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strips_cluster_owned_fields_and_maps() {
        let t = Transform {
            namespaces: [("shop".into(), "shop-dr".into())].into(),
            storage_classes: [("fast".into(), "standard".into())].into(),
        };
        let pvc = json!({"apiVersion":"v1","kind":"PersistentVolumeClaim",
            "metadata":{"name":"data","namespace":"shop","uid":"u","resourceVersion":"9",
                "annotations":{"pv.kubernetes.io/bind-completed":"yes","keep":"me"}},
            "spec":{"storageClassName":"fast","volumeName":"pv-1"},"status":{"phase":"Bound"}});
        let out = t.apply(pvc).unwrap();
        assert_eq!(out.pointer("/metadata/namespace"), Some(&json!("shop-dr")));
        assert_eq!(
            out.pointer("/spec/storageClassName"),
            Some(&json!("standard"))
        );
        assert!(out.pointer("/spec/volumeName").is_none() && out.get("status").is_none());
        assert!(out.pointer("/metadata/uid").is_none());
        assert_eq!(
            out.pointer("/metadata/annotations"),
            Some(&json!({"keep":"me"}))
        );
        let svc = json!({"apiVersion":"v1","kind":"Service","metadata":{"name":"db"},"spec":{"clusterIP":"None"}});
        assert_eq!(
            t.apply(svc).unwrap().pointer("/spec/clusterIP"),
            Some(&json!("None"))
        );
        assert!(
            t.apply(json!({"apiVersion":"v1","kind":"Event","metadata":{}}))
                .is_none()
        );
    }

    #[test]
    fn stripping_leaves_no_empty_maps() {
        let bound = json!({"apiVersion":"v1","kind":"PersistentVolumeClaim",
            "metadata":{"name":"d","annotations":{"pv.kubernetes.io/bind-completed":"yes"}},"spec":{}});
        let out = Transform::default().apply(bound).unwrap();
        assert!(out.pointer("/metadata/annotations").is_none(), "{out}");
    }

    #[test]
    fn bad_documents_are_named() {
        let e = parse_documents(b"apiVersion: v1\nkind: ConfigMap\n---\nfoo: [\n").unwrap_err();
        assert!(format!("{e:#}").contains("document 2"), "{e:#}");
        let e = parse_documents(b"just: a map\n").unwrap_err();
        assert!(format!("{e:#}").contains("apiVersion"));
    }
}
