//! What a Failover puts on the standby, worked out from the point alone (no I/O but the store):
//! the point's manifests transformed by the Failover's rules, split into the claims the
//! populator rebuilds (each paired with its volume of the point) and every other object, which
//! the apply engine applies.

use anyhow::{Context, Result};
use serde_json::Value;
use std::collections::BTreeSet;
use understudy_common::store::{PointRecord, Store};
use understudy_kube::bundle::{Bundle, ObjectId};
use understudy_kube::crd::failover::FailoverSpec;
use understudy_kube::transform::{Rules, Verdict};

/// One claim to rebuild.
#[derive(Clone, Debug)]
pub struct Claim {
    /// The volume of the point it is rebuilt from (`<namespace>.<name>` on the primary).
    pub volume: String,
    /// Namespace on the standby.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The PVC as the rules made it, its data source pointing at its PointVolume.
    pub object: Value,
}

/// Everything a run makes.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// The claims, rebuilt first.
    pub claims: Vec<Claim>,
    /// The other objects, applied once the claims are bound.
    pub objects: Vec<(ObjectId, Value)>,
    /// The namespaces the application lands in on the standby.
    pub namespaces: BTreeSet<String>,
}

/// The rules of a Failover: its rules text (inline or a ConfigMap's, read by the caller), then
/// its namespace and storage-class maps; inert unless it scales up.
pub fn rules(spec: &FailoverSpec, text: Option<&str>) -> Result<Rules> {
    let mut r = match text {
        Some(t) => Rules::parse(t).context("the Failover's rules")?,
        None => Rules::default(),
    };
    r.namespaces.extend(spec.namespace_map.clone());
    r.storage_classes.extend(spec.storage_class_map.clone());
    r.inert |= !spec.scale_up;
    Ok(r)
}

/// The plan for `point`.
pub fn plan(store: &Store, point: &PointRecord, rules: &Rules) -> Result<Plan> {
    let bundle = Bundle::decode(&store.read_manifests(point)?)?;
    let mut plan = Plan::default();
    for obj in bundle.objects()? {
        let Verdict::Apply(out) = rules.transform(&obj)? else {
            continue;
        };
        let id = ObjectId::of(&out)?;
        if !id.namespace.is_empty() {
            plan.namespaces.insert(id.namespace.clone());
        }
        if id.group.is_empty() && id.kind == "PersistentVolumeClaim" {
            let from = ObjectId::of(&obj)?;
            let volume = format!("{}.{}", from.namespace, from.name);
            if point.cut.volume(&volume).is_some() {
                plan.claims.push(claim(volume, id, out));
                continue;
            }
        }
        if id.group.is_empty() && id.kind == "Namespace" {
            plan.namespaces.insert(id.name.clone());
        }
        plan.objects.push((id, out));
    }
    Ok(plan)
}

/// The claim, its data source replaced by its PointVolume (named as the claim).
fn claim(volume: String, id: ObjectId, mut object: Value) -> Claim {
    if let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) {
        spec.remove("dataSource");
        spec.remove("volumeName");
        spec.insert(
            "dataSourceRef".into(),
            serde_json::json!({"apiGroup": "understudy.io", "kind": "PointVolume", "name": id.name}),
        );
    }
    Claim {
        volume,
        namespace: id.namespace,
        name: id.name,
        object,
    }
}

/// For a drill: every namespace of the plan must be a mapped one, and none may be one of the
/// application's own names on the primary (the drill would run inside it).
pub fn check_drill(spec: &FailoverSpec, plan: &Plan) -> Result<()> {
    let mapped: BTreeSet<&String> = spec.namespace_map.values().collect();
    for ns in &plan.namespaces {
        anyhow::ensure!(
            mapped.contains(ns) && !spec.namespace_map.contains_key(ns),
            "a drill runs in namespaces of its own: map namespace {ns} to a new one in namespaceMap"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn a_claim_is_rebuilt_from_its_point_volume() {
        let pvc = serde_json::json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data", "namespace": "shop-dr"},
            "spec": {"volumeName": "pvc-1", "dataSource": {"kind": "VolumeSnapshot", "name": "s"}},
        });
        let id = ObjectId::of(&pvc).unwrap();
        let c = claim("shop.data".into(), id, pvc);
        assert_eq!(c.object["spec"]["dataSourceRef"]["kind"], "PointVolume");
        assert_eq!(c.object["spec"]["dataSourceRef"]["name"], "data");
        assert!(c.object["spec"].get("volumeName").is_none());
        assert!(c.object["spec"].get("dataSource").is_none());
    }

    #[test]
    fn a_drill_must_run_in_namespaces_of_its_own() {
        let spec = |map: &[(&str, &str)]| FailoverSpec {
            namespace_map: map
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<BTreeMap<_, _>>(),
            ..Default::default()
        };
        let plan = Plan {
            namespaces: ["shop-drill".to_string()].into(),
            ..Default::default()
        };
        assert!(check_drill(&spec(&[("shop", "shop-drill")]), &plan).is_ok());
        let e = check_drill(&spec(&[]), &plan).unwrap_err().to_string();
        assert!(e.contains("map namespace shop-drill"), "{e}");
        let unmapped = Plan {
            namespaces: ["shop".to_string()].into(),
            ..Default::default()
        };
        assert!(check_drill(&spec(&[("shop", "shop")]), &unmapped).is_err());
    }
}
