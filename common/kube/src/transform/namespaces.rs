//! Namespace mapping: every place an object names a namespace, built-in kinds by rule of the
//! project and custom resources by the rules file's `namespacePaths`.

use super::{Rules, Scope, map_string};
use crate::bundle::ObjectId;
use anyhow::{Result, bail};
use serde_json::Value;

/// A rules-file entry naming where objects of some kinds hold namespace names.
#[derive(Clone, Debug)]
pub struct NamespacePathRule {
    /// Rule identity and conditions.
    pub scope: Scope,
    /// Paths: JSON pointers whose `*` segments stand for every element of a list or map.
    pub paths: Vec<Vec<String>>,
}

/// Where built-in kinds hold namespace names (besides `metadata.namespace`), as paths with `*`
/// segments ([`values_at`]).
pub fn namespace_paths_of(kind: &str) -> &'static [&'static str] {
    match kind {
        "PersistentVolume" => &["/spec/claimRef/namespace"],
        "RoleBinding" | "ClusterRoleBinding" => &["/subjects/*/namespace"],
        "ValidatingWebhookConfiguration" | "MutatingWebhookConfiguration" => {
            &["/webhooks/*/clientConfig/service/namespace"]
        }
        "CustomResourceDefinition" => &["/spec/conversion/webhook/clientConfig/service/namespace"],
        "APIService" => &["/spec/service/namespace"],
        "NetworkPolicy" => &[
            "/spec/ingress/*/from/*/namespaceSelector",
            "/spec/egress/*/to/*/namespaceSelector",
        ],
        _ => &[],
    }
}

/// Parses a `namespacePaths` path: a JSON pointer, `*` for every element.
pub(super) fn parse_path(label: &str, p: &str) -> Result<Vec<String>> {
    let Some(rest) = p.strip_prefix('/') else {
        bail!("rule {label}: path `{p}` is not a JSON pointer (it must start with /)");
    };
    Ok(rest
        .split('/')
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect())
}

impl Rules {
    /// Maps every namespace name `out` holds; `captured` (the object as captured) decides which
    /// `namespacePaths` rules apply.
    pub(super) fn map_namespaces(&self, id: &ObjectId, captured: &Value, out: &mut Value) {
        let map = |v: &mut Value| map_string(Some(v), &self.namespaces);
        if let Some(v) = out.pointer_mut("/metadata/namespace") {
            map(v);
        }
        if id.kind == "Namespace"
            && let Some(v) = out.pointer_mut("/metadata/name")
        {
            map(v);
        }
        for p in namespace_paths_of(&id.kind) {
            let segments: Vec<String> = p[1..].split('/').map(str::to_string).collect();
            if p.ends_with("namespaceSelector") {
                for_each_at(out, &segments, &mut |sel| self.map_selector(sel));
            } else {
                for_each_at(out, &segments, &mut |v| map(v));
            }
        }
        for r in self
            .namespace_paths
            .iter()
            .filter(|r| r.scope.matches.matches(id, captured))
        {
            for p in &r.paths {
                for_each_at(out, p, &mut |v| map(v));
            }
        }
    }

    /// A namespace selector that names namespaces by `kubernetes.io/metadata.name`.
    fn map_selector(&self, sel: &mut Value) {
        const KEY: &str = "kubernetes.io/metadata.name";
        if let Some(v) = sel.pointer_mut("/matchLabels/kubernetes.io~1metadata.name") {
            map_string(Some(v), &self.namespaces);
        }
        if let Some(Value::Array(exprs)) = sel.get_mut("matchExpressions") {
            for e in exprs
                .iter_mut()
                .filter(|e| e.get("key").and_then(Value::as_str) == Some(KEY))
            {
                if let Some(Value::Array(values)) = e.get_mut("values") {
                    values
                        .iter_mut()
                        .for_each(|v| map_string(Some(v), &self.namespaces));
                }
            }
        }
    }
}

/// The values at a path with `*` segments (`/webhooks/*/clientConfig/service/namespace`).
pub fn values_at(v: &Value, path: &str) -> Vec<Value> {
    let segments: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(str::to_string)
        .collect();
    let mut copy = v.clone();
    let mut out = Vec::new();
    for_each_at(&mut copy, &segments, &mut |found| out.push(found.clone()));
    out
}

/// Calls `f` on every value at `path` (`*` matches every element of a list or map).
fn for_each_at(v: &mut Value, path: &[String], f: &mut dyn FnMut(&mut Value)) {
    let Some((first, rest)) = path.split_first() else {
        f(v);
        return;
    };
    match (v, first.as_str()) {
        (Value::Array(items), "*") => items.iter_mut().for_each(|i| for_each_at(i, rest, f)),
        (Value::Object(m), "*") => m.values_mut().for_each(|i| for_each_at(i, rest, f)),
        (Value::Array(items), i) => {
            if let Some(item) = i.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                for_each_at(item, rest, f);
            }
        }
        (Value::Object(m), key) => {
            if let Some(next) = m.get_mut(key) {
                for_each_at(next, rest, f);
            }
        }
        _ => {}
    }
}
