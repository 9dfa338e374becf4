//! Match conditions of a transform rule: which objects a rule applies to.

use crate::bundle::ObjectId;
use anyhow::{Context, Result};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Selector, SelectorExt};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

/// A rule's match conditions as written in the rules file. Every condition given must hold.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MatchSpec {
    /// API group ("" or "core" for the core group, "apps", ...).
    pub group: Option<String>,
    /// Kind, e.g. Deployment.
    pub kind: Option<String>,
    /// Object name, a glob (`web-*`).
    pub name: Option<String>,
    /// Namespace as captured (before namespace mapping), a glob.
    pub namespace: Option<String>,
    /// Kubernetes label selector (matchLabels / matchExpressions).
    pub label_selector: Option<LabelSelector>,
}

/// Compiled match conditions.
#[derive(Clone, Debug, Default)]
pub struct Match {
    group: Option<String>,
    kind: Option<String>,
    name: Option<globset::GlobMatcher>,
    namespace: Option<globset::GlobMatcher>,
    labels: Option<Selector>,
}

impl Match {
    /// Compiles the conditions; errors name the condition that is wrong.
    pub fn compile(spec: &MatchSpec) -> Result<Self> {
        let glob = |what: &str, p: &Option<String>| -> Result<Option<globset::GlobMatcher>> {
            p.as_deref()
                .map(|p| {
                    globset::Glob::new(p)
                        .map(|g| g.compile_matcher())
                        .with_context(|| format!("match.{what} `{p}` is not a valid glob"))
                })
                .transpose()
        };
        let labels = spec
            .label_selector
            .clone()
            .map(|s| {
                Selector::try_from(s).map_err(|e| {
                    anyhow::anyhow!("match.labelSelector is not a valid label selector: {}", e.0)
                })
            })
            .transpose()?;
        Ok(Match {
            group: spec.group.as_ref().map(|g| {
                if g == "core" {
                    String::new()
                } else {
                    g.clone()
                }
            }),
            kind: spec.kind.clone(),
            name: glob("name", &spec.name)?,
            namespace: glob("namespace", &spec.namespace)?,
            labels,
        })
    }

    /// True when `obj` (with identity `id`, as captured) meets every condition.
    pub fn matches(&self, id: &ObjectId, obj: &Value) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        let glob = |g: &Option<globset::GlobMatcher>, have: &str| {
            g.as_ref().is_none_or(|g| g.is_match(have))
        };
        eq(&self.group, &id.group)
            && eq(&self.kind, &id.kind)
            && glob(&self.name, &id.name)
            && glob(&self.namespace, &id.namespace)
            && self
                .labels
                .as_ref()
                .is_none_or(|s| s.matches(&labels_of(obj)))
    }
}

/// The object's labels (empty when it has none).
pub fn labels_of(obj: &Value) -> BTreeMap<String, String> {
    obj.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}
