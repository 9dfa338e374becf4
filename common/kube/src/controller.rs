//! What the agents' kube-rs controllers share (the source's ReplicationGroups, the standby's
//! populator and Failovers): the error a reconcile ends with, the stop signal as a controller's
//! shutdown wants it, and events.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};

/// An error a reconcile ended with (the controller logs it and retries).
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct ReconcileError(#[from] pub anyhow::Error);

/// `stop` as the future `Controller::graceful_shutdown_on` wants (it must also be `Sync`): it is
/// relayed through a channel.
pub fn shutdown_on(
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> impl std::future::Future<Output = ()> + Send + Sync + 'static {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        stop.await;
        let _ = tx.send(());
    });
    async move {
        let _ = rx.await;
    }
}

/// Publishes an event about `object` (a failure to do so is only logged: an event is never
/// worth failing a step for).
pub async fn publish(
    recorder: &Recorder,
    object: &ObjectReference,
    action: &str,
    (warning, reason): (bool, &str),
    note: String,
) {
    let event = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, object).await {
        tracing::warn!(error = %e, "cannot publish an event");
    }
}
