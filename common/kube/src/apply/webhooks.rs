//! Admission webhooks cannot block the apply of the objects they guard. A webhook configuration
//! is applied last, after its Service; but on a later apply it is already there, and its backend
//! may not run (a standby scaled to zero), so with `failurePolicy: Fail` it would refuse the
//! objects it guards. Before the apply, the standby's copies of the bundle's webhook
//! configurations are set to fail open (`Ignore`); their own apply, last, restores the bundle's
//! policy. An apply killed in between leaves them failing open until the next apply.

use crate::bundle::ObjectId;
use crate::client::api_message;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::discovery::ApiResource;
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// The webhook configuration kind `id` names, if it names one.
fn resource_of(id: &ObjectId) -> Option<ApiResource> {
    match (id.group.as_str(), id.kind.as_str()) {
        ("admissionregistration.k8s.io", "ValidatingWebhookConfiguration") => {
            Some(ApiResource::erase::<ValidatingWebhookConfiguration>(&()))
        }
        ("admissionregistration.k8s.io", "MutatingWebhookConfiguration") => {
            Some(ApiResource::erase::<MutatingWebhookConfiguration>(&()))
        }
        _ => None,
    }
}

/// Makes the standby's copies of the webhook configurations in `objects` fail open; returns them
/// as they were, so the apply reports against what was there before.
pub(super) async fn open(
    client: &Client,
    objects: &[(ObjectId, Value)],
    manager: &str,
) -> BTreeMap<ObjectId, DynamicObject> {
    let mut before = BTreeMap::new();
    for (id, ar) in objects
        .iter()
        .filter_map(|(id, _)| Some((id, resource_of(id)?)))
    {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        let Ok(Some(existing)) = api.get_opt(&id.name).await else {
            continue; // not there yet (or unreadable: its own apply will say so)
        };
        let ops = fail_open_ops(&existing.data);
        if !ops.is_empty() {
            let patch: json_patch::Patch = match serde_json::from_value(Value::Array(ops)) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(webhook = %id, error = %e, "cannot make the webhook fail open during the apply");
                    continue;
                }
            };
            let params = PatchParams {
                field_manager: Some(manager.into()),
                ..Default::default()
            };
            if let Err(e) = api
                .patch(&id.name, &params, &Patch::<()>::Json(patch))
                .await
            {
                tracing::warn!(webhook = %id, error = %api_message(&e), "cannot make the webhook fail open during the apply");
            }
        }
        before.insert(id.clone(), existing);
    }
    before
}

/// JSON patch operations setting every webhook's failurePolicy to Ignore (each guarded by a test
/// of its name, so a configuration changed meanwhile is left alone).
fn fail_open_ops(config: &Value) -> Vec<Value> {
    let Some(hooks) = config.get("webhooks").and_then(Value::as_array) else {
        return Vec::new();
    };
    hooks
        .iter()
        .enumerate()
        .filter(|(_, h)| h.get("failurePolicy").and_then(Value::as_str) != Some("Ignore"))
        .flat_map(|(i, h)| {
            [
                json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": h.get("name")}),
                json!({"op": "add", "path": format!("/webhooks/{i}/failurePolicy"), "value": "Ignore"}),
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failing_closed_webhooks_are_opened() {
        let config = json!({"webhooks":[{"name":"a","failurePolicy":"Fail"},
            {"name":"b","failurePolicy":"Ignore"},{"name":"c"}]});
        let ops = fail_open_ops(&config);
        let paths: Vec<&str> = ops.iter().filter_map(|o| o["path"].as_str()).collect();
        assert_eq!(
            paths,
            [
                "/webhooks/0/name",
                "/webhooks/0/failurePolicy",
                "/webhooks/2/name",
                "/webhooks/2/failurePolicy"
            ]
        );
    }
}
