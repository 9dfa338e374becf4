//! Pruning: what left the application since the last apply leaves the standby too, by the
//! ecosystem's convention for it, ApplySets (KEP-3659, the scheme `kubectl apply --prune
//! --applyset` uses).
//!
//! The parent is a Secret, [`PARENT_NAME`] in the first (sorted) namespace of the applied
//! objects, labelled `applyset.kubernetes.io/id`. It records which kinds and namespaces members
//! may be in. An object the apply creates is labelled `applyset.kubernetes.io/part-of`; one that
//! existed already keeps the label only if an earlier apply created it, so an object the apply
//! did not create is never labelled and never pruned. An apply first widens the record to the
//! kinds and namespaces of this bundle (an apply killed half-way leaves no member unrecorded),
//! applies, deletes the members no longer in the bundle, then narrows the record.

use super::{ObjectResult, Outcome};
use crate::bundle::ObjectId;
use crate::client::{api_code, api_message, is_namespaced};
use crate::transform::APPLYSET_ID_LABEL;
use anyhow::{Context, Result};
use base64::Engine;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::error::DiscoveryError;
use serde_json::{Value, json};
use sha2::Digest;
use std::collections::{BTreeMap, BTreeSet};

/// Label of a member: the id of its ApplySet.
pub const PART_OF: &str = "applyset.kubernetes.io/part-of";
const TOOLING: &str = "applyset.kubernetes.io/tooling";
const GROUP_KINDS: &str = "applyset.kubernetes.io/contains-group-kinds";
const NAMESPACES: &str = "applyset.kubernetes.io/additional-namespaces";
/// Name of the parent Secret.
pub const PARENT_NAME: &str = "understudy-applyset";

/// Objects an apply never makes members, so never prunes: what deleting would delete data with
/// (claims, volumes) or everything in it (namespaces, CRDs), and a namespace's `default`
/// ServiceAccount, which the standby's controller makes in every namespace (whether it or the
/// apply made it first is a race; deleting it would only see it made again). What left the
/// application of these stays on the standby for a person to remove.
pub fn never_pruned(obj: &Value) -> bool {
    let str_at = |p: &str| obj.pointer(p).and_then(Value::as_str);
    match (str_at("/apiVersion"), str_at("/kind")) {
        (Some("v1"), Some("PersistentVolumeClaim" | "PersistentVolume" | "Namespace")) => true,
        (Some("apiextensions.k8s.io/v1"), Some("CustomResourceDefinition")) => true,
        (Some("v1"), Some("ServiceAccount")) => str_at("/metadata/name") == Some("default"),
        _ => false,
    }
}

/// One ApplySet: its parent Secret and id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplySet {
    /// Namespace of the parent.
    pub namespace: String,
    /// Name of the parent.
    pub name: String,
    /// `applyset-<base64url(sha256(<name>.<namespace>.Secret.))>-v1`, as KEP-3659 defines it.
    pub id: String,
}

/// What an ApplySet's members may be: `Kind.group` (`Kind` for core) and namespaces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Members {
    /// Group-kinds.
    pub group_kinds: BTreeSet<String>,
    /// Namespaces (the parent's included).
    pub namespaces: BTreeSet<String>,
}

impl Members {
    /// The group-kinds and namespaces of `objects`.
    pub fn of(objects: &[(ObjectId, Value)]) -> Self {
        Members {
            group_kinds: objects.iter().map(|(id, _)| id.kind_group()).collect(),
            namespaces: objects
                .iter()
                .filter(|(id, _)| !id.namespace.is_empty())
                .map(|(id, _)| id.namespace.clone())
                .collect(),
        }
    }

    /// Both sets joined.
    pub fn union(&self, other: &Members) -> Members {
        Members {
            group_kinds: self
                .group_kinds
                .union(&other.group_kinds)
                .cloned()
                .collect(),
            namespaces: self.namespaces.union(&other.namespaces).cloned().collect(),
        }
    }
}

impl ApplySet {
    /// The ApplySet whose parent is Secret `namespace/name`.
    pub fn new(namespace: &str, name: &str) -> Self {
        let hash = sha2::Sha256::digest(format!("{name}.{namespace}.Secret.").as_bytes());
        ApplySet {
            namespace: namespace.into(),
            name: name.into(),
            id: format!(
                "applyset-{}-v1",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(hash)
            ),
        }
    }

    /// The ApplySet for a bundle: its parent in the first namespace of its objects; `None` for a
    /// bundle of cluster-scoped objects only (nothing is pruned then).
    pub fn for_objects(objects: &[(ObjectId, Value)]) -> Option<Self> {
        let ns = Members::of(objects).namespaces.into_iter().next()?;
        Some(ApplySet::new(&ns, PARENT_NAME))
    }

    fn parent_api(&self, client: &Client) -> Api<DynamicObject> {
        Api::namespaced_with(
            client.clone(),
            &self.namespace,
            &kube::discovery::ApiResource::erase::<k8s_openapi::api::core::v1::Secret>(&()),
        )
    }

    /// What the parent records (empty when there is no parent yet).
    pub async fn recorded(&self, client: &Client) -> Result<Members> {
        let parent = self
            .parent_api(client)
            .get_opt(&self.name)
            .await
            .map_err(|e| anyhow::anyhow!("{}", api_message(&e)))
            .with_context(|| self.what())?;
        let annotation = |key: &str| -> BTreeSet<String> {
            parent
                .as_ref()
                .and_then(|p| p.metadata.annotations.as_ref()?.get(key).cloned())
                .map(|v| {
                    v.split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut namespaces = annotation(NAMESPACES);
        namespaces.insert(self.namespace.clone());
        Ok(Members {
            group_kinds: annotation(GROUP_KINDS),
            namespaces,
        })
    }

    /// Writes the parent with `members` recorded.
    pub async fn record(&self, client: &Client, members: &Members, manager: &str) -> Result<()> {
        let join = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(",");
        let others: BTreeSet<String> = members
            .namespaces
            .iter()
            .filter(|n| **n != self.namespace)
            .cloned()
            .collect();
        let parent = json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {APPLYSET_ID_LABEL: self.id},
                "annotations": {
                    TOOLING: "understudy/v1",
                    GROUP_KINDS: join(&members.group_kinds),
                    NAMESPACES: join(&others),
                },
            },
            "type": "Opaque",
        });
        self.parent_api(client)
            .patch(
                &self.name,
                &PatchParams::apply(manager).force(),
                &Patch::Apply(&parent),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{}", api_message(&e)))
            .with_context(|| self.what())?;
        Ok(())
    }

    fn what(&self) -> String {
        format!(
            "cannot read or write the ApplySet parent Secret {}/{}; nothing was pruned",
            self.namespace, self.name
        )
    }

    /// Deletes the members of kinds and namespaces `recorded` that are not in `keep`.
    pub async fn prune(
        &self,
        client: &Client,
        recorded: &Members,
        keep: &BTreeSet<ObjectId>,
    ) -> Vec<ObjectResult> {
        let mut by_group: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for gk in &recorded.group_kinds {
            let (kind, group) = gk.split_once('.').unwrap_or((gk, ""));
            by_group.entry(group).or_default().push(kind);
        }
        let mut out = Vec::new();
        for (group, kinds) in by_group {
            // One discovery per group; a group no longer served holds nothing to prune.
            let served = match kube::discovery::group(client, group).await {
                Ok(g) => g,
                Err(kube::Error::Discovery(DiscoveryError::MissingApiGroup(_))) => continue,
                Err(e) => {
                    let object = member(group, kinds[0], "", "");
                    let message = format!(
                        "cannot discover API group `{group}` to prune its members ({e}); nothing of it was pruned, the next apply tries again"
                    );
                    out.push(ObjectResult::rejected(object, message));
                    continue;
                }
            };
            for kind in kinds {
                let Some((ar, caps)) = served.recommended_kind(kind) else {
                    continue; // no longer served: nothing of it can be left
                };
                let namespaces: Vec<Option<&str>> = if is_namespaced(&caps) {
                    recorded
                        .namespaces
                        .iter()
                        .map(|n| Some(n.as_str()))
                        .collect()
                } else {
                    vec![None]
                };
                for ns in namespaces {
                    let api = match ns {
                        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
                        None => Api::all_with(client.clone(), &ar),
                    };
                    out.extend(self.prune_one(&api, group, kind, ns, keep).await);
                }
            }
        }
        out
    }

    async fn prune_one(
        &self,
        api: &Api<DynamicObject>,
        group: &str,
        kind: &str,
        namespace: Option<&str>,
        keep: &BTreeSet<ObjectId>,
    ) -> Vec<ObjectResult> {
        let lp = ListParams::default().labels(&format!("{PART_OF}={}", self.id));
        let items = match api.list(&lp).await {
            Ok(l) => l.items,
            Err(e) => {
                let object = member(group, kind, namespace.unwrap_or(""), "");
                let message = format!(
                    "cannot list the ApplySet's members to prune them: {}; nothing of this kind was pruned, grant the agent list on it",
                    api_message(&e)
                );
                return vec![ObjectResult::rejected(object, message)];
            }
        };
        let mut out = Vec::new();
        for o in items {
            let id = member(
                group,
                kind,
                o.metadata.namespace.as_deref().unwrap_or(""),
                o.metadata.name.as_deref().unwrap_or(""),
            );
            if keep.contains(&id) || o.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let r = match api.delete(&id.name, &DeleteParams::background()).await {
                Ok(_) => ObjectResult::new(id, Outcome::Pruned, None),
                Err(e) if api_code(&e) == Some(404) => continue,
                Err(e) => {
                    ObjectResult::rejected(id, format!("cannot prune it: {}", api_message(&e)))
                }
            };
            out.push(r);
        }
        out
    }
}

/// The identity of a member (or, with an empty name, of a kind in a namespace).
fn member(group: &str, kind: &str, namespace: &str, name: &str) -> ObjectId {
    ObjectId {
        group: group.into(),
        kind: kind.into(),
        namespace: namespace.into(),
        name: name.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_is_the_keps() {
        // KEP-3659: base64url (no padding) of sha256("<name>.<namespace>.<kind>.<group>").
        let s = ApplySet::new("shop", "understudy-applyset");
        let expect = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(sha2::Sha256::digest(b"understudy-applyset.shop.Secret."));
        assert_eq!(s.id, format!("applyset-{expect}-v1"));
        assert!(s.id.len() <= 63, "a label value: {}", s.id);
    }

    #[test]
    fn what_holds_data_is_never_a_member() {
        let obj = |api: &str, kind: &str| json!({"apiVersion": api, "kind": kind});
        assert!(never_pruned(&obj("v1", "PersistentVolumeClaim")));
        assert!(never_pruned(&obj(
            "apiextensions.k8s.io/v1",
            "CustomResourceDefinition"
        )));
        assert!(!never_pruned(&obj("v1", "ConfigMap")));
        assert!(!never_pruned(&obj("apps/v1", "StatefulSet")));
        let sa = |name: &str| json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}});
        assert!(never_pruned(&sa("default")));
        assert!(!never_pruned(&sa("builder")));
    }

    #[test]
    fn the_parent_goes_in_the_first_namespace() {
        let id = |ns: &str, kind: &str| ObjectId {
            group: String::new(),
            kind: kind.into(),
            namespace: ns.into(),
            name: "x".into(),
        };
        let objs: Vec<(ObjectId, Value)> =
            [id("", "Namespace"), id("b", "ConfigMap"), id("a", "Secret")]
                .into_iter()
                .map(|i| (i, Value::Null))
                .collect();
        assert_eq!(ApplySet::for_objects(&objs).unwrap().namespace, "a");
        let m = Members::of(&objs);
        assert_eq!(m.group_kinds.len(), 3);
        assert!(ApplySet::for_objects(&objs[..1]).is_none());
    }
}
