//! Commands run in containers through `pods/exec`: the quiesce hooks of a ReplicationGroup
//! (Kubernetes has no quiesce API; a hook is an exec, e.g. `fsfreeze --freeze /data`).

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, AttachParams, ListParams};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// What a command returned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
    /// Its exit code (0 on success, -1 when the API server did not say).
    pub code: i32,
}

/// Runs `command` in `container` of pod `namespace/pod` (the pod's first container when
/// `None`), within `timeout`.
pub async fn exec(
    client: &Client,
    namespace: &str,
    pod: &str,
    container: Option<&str>,
    command: &[String],
    timeout: Duration,
) -> Result<ExecOutput> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut params = AttachParams::default()
        .stdout(true)
        .stderr(true)
        .stdin(false);
    if let Some(c) = container {
        params = params.container(c);
    }
    let work = async {
        // Just after a pod turns Running the kubelet may not know its container yet.
        let mut tries = 0;
        let mut proc = loop {
            match pods
                .exec(pod, command.iter().map(String::as_str), &params)
                .await
            {
                Ok(p) => break p,
                Err(e) if tries < 20 && e.to_string().contains("container not found") => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e).with_context(|| {
                    format!(
                        "cannot exec in pod {namespace}/{pod}: the agent needs create on pods/exec"
                    )
                }),
            }
        };
        let (mut out, mut err) = (String::new(), String::new());
        let mut so = proc.stdout().context("exec gave no stdout")?;
        let mut se = proc.stderr().context("exec gave no stderr")?;
        let status = proc.take_status().context("exec gave no status")?;
        let (a, b) = tokio::join!(so.read_to_string(&mut out), se.read_to_string(&mut err));
        a?;
        b?;
        let status = status.await;
        proc.join().await.ok();
        let code = match status {
            Some(s) if s.status.as_deref() == Some("Success") => 0,
            Some(s) => s
                .details
                .and_then(|d| d.causes)
                .and_then(|c| {
                    c.into_iter()
                        .find(|c| c.reason.as_deref() == Some("ExitCode"))
                })
                .and_then(|c| c.message)
                .and_then(|m| m.parse().ok())
                .unwrap_or(-1),
            None => -1,
        };
        Ok(ExecOutput {
            stdout: out,
            stderr: err,
            code,
        })
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => {
            bail!("command {command:?} in pod {namespace}/{pod} did not end within {timeout:?}")
        }
    }
}

/// Names of the running pods in `namespace` whose labels include `selector`, sorted.
pub async fn running_pods(
    client: &Client,
    namespace: &str,
    selector: &BTreeMap<String, String>,
) -> Result<Vec<String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let labels = selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let list = pods
        .list(&ListParams::default().labels(&labels))
        .await
        .with_context(|| {
            format!("cannot list pods in {namespace}: the agent needs list on pods")
        })?;
    let mut names: Vec<String> = list
        .items
        .into_iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.metadata.name)
        .collect();
    names.sort();
    Ok(names)
}
