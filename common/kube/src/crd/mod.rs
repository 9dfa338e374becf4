//! Understudy's own custom resources, defined as Rust types; their CRDs are generated from these
//! (`source-agent crds`) into `deploy/crds/`, and a test fails when the files there are stale.

pub mod drill_schedule;
pub mod failover;
pub mod point_volume;
pub mod replication_group;

pub use drill_schedule::DrillSchedule;
pub use failover::Failover;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResourceExt;
pub use point_volume::PointVolume;
pub use replication_group::ReplicationGroup;

/// Every CRD of the project, in apply order.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        ReplicationGroup::crd(),
        PointVolume::crd(),
        Failover::crd(),
        DrillSchedule::crd(),
    ]
}

/// The CRDs as one YAML stream, as `deploy/crds/understudy.yaml` holds them.
pub fn yaml() -> anyhow::Result<String> {
    let mut out = String::from(
        "# Generated from the Rust types in common/kube/src/crd/ by `source-agent crds`; do not edit.\n",
    );
    for crd in all() {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&crd)?);
    }
    Ok(out)
}

/// Sets condition `type_` (keeping its transition time when the status did not change).
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let new = Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: now,
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let time = if c.status == new.status {
                c.last_transition_time.clone()
            } else {
                new.last_transition_time.clone()
            };
            *c = Condition {
                last_transition_time: time,
                ..new
            };
        }
        None => conditions.push(new),
    }
}

/// The status of condition `type_`, if set.
pub fn condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// deploy/crds/understudy.yaml is what the types generate.
    #[test]
    fn the_crds_in_deploy_are_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/crds/understudy.yaml");
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == yaml().unwrap(),
            "{} is stale: run `cargo run -q -p source-agent -- crds > deploy/crds/understudy.yaml`",
            path.display()
        );
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_holds() {
        let mut c = Vec::new();
        set_condition(&mut c, "Synced", true, "PointCommitted", "point 1", Some(1));
        let first = c[0].last_transition_time.clone();
        std::thread::sleep(std::time::Duration::from_millis(5));
        set_condition(&mut c, "Synced", true, "PointCommitted", "point 2", Some(1));
        assert_eq!(c[0].last_transition_time, first);
        assert_eq!(c[0].message, "point 2");
        set_condition(&mut c, "Synced", false, "MoverFailed", "x", Some(1));
        assert_ne!(c[0].last_transition_time, first);
        assert_eq!(condition(&c, "Synced").unwrap().status, "False");
    }
}
