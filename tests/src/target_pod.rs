//! The target agent as a pod of the standby's node test bed, from the manifests users apply
//! (deploy/standby/target-agent.yaml): its store on a claim of the test CSI driver (the one
//! test component of the project's own), its identity the pair's target identity in a Secret,
//! QUIC behind a UDP Service.
//!
//! The test bed has no kube-proxy and no cluster DNS, and its API server listens on loopback
//! only; so the pod runs on the host's network (it reaches the API server at 127.0.0.1, named
//! in the in-cluster variables), listens on the bridge at a free port rather than on every
//! interface, and the Service's address is read from its EndpointSlice. Everything else is the
//! manifest as shipped.

use crate::node::{AGENTS_IMAGE, NodeCluster, STORAGE_CLASS};
use crate::{Pair, free_ports};
use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// The agent's namespace, as the manifest has it.
pub const NAMESPACE: &str = "understudy-system";
/// Its Deployment, Service, Secret and ServiceAccount.
pub const NAME: &str = "understudy-target";
/// Its pods' label.
const SELECTOR: &str = "app.kubernetes.io/name=understudy-target";
/// Its state directory in the pod (on the store claim).
pub const DIR: &str = "/var/lib/understudy";

/// Deploys the agent with `p`'s target identity and waits until it listens; returns the QUIC
/// address its Service leads to.
pub async fn deploy(c: &NodeCluster, p: &Pair) -> Result<String> {
    let manifest = std::fs::read_to_string(manifest_path())?;
    let [port] = free_ports();
    let listen = format!("{}:{port}", c.bridge_ip);
    let api_port = c.url.rsplit(':').next().unwrap_or_default().to_string();
    let mut docs = understudy_kube::bundle::parse_documents(manifest.as_bytes())?;
    for d in &mut docs {
        for_the_test_bed(d, &listen, port, &api_port);
    }
    // The namespace first, then the identity Secret the pod mounts, then the rest.
    let (namespace, rest): (Vec<Value>, Vec<Value>) =
        docs.into_iter().partition(|d| d["kind"] == "Namespace");
    let yaml = |docs: &[Value]| {
        docs.iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    c.create_yaml(&yaml(&namespace)).await?;
    c.create_yaml(&identity_secret(p)?.to_string()).await?;
    c.create_yaml(&yaml(&rest)).await?;
    let address = service_address(c, Duration::from_secs(180)).await?;
    wait_listening(c, Duration::from_secs(60)).await?;
    Ok(address)
}

/// The manifest users apply.
pub fn manifest_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/standby/target-agent.yaml")
}

/// What the test bed needs of the manifest (see the module's doc): the store on the test
/// driver's class, the project's image, the host's network and the API server on loopback.
fn for_the_test_bed(doc: &mut Value, listen: &str, port: u16, api_port: &str) {
    match doc["kind"].as_str() {
        Some("PersistentVolumeClaim") => {
            doc["spec"]["storageClassName"] = json!(STORAGE_CLASS);
            doc["spec"]["resources"]["requests"]["storage"] = json!("256Mi");
        }
        Some("Deployment") => {
            let pod = &mut doc["spec"]["template"]["spec"];
            pod["hostNetwork"] = json!(true);
            let c = &mut pod["containers"][0];
            c["image"] = json!(AGENTS_IMAGE);
            c["imagePullPolicy"] = json!("Never");
            let args: Vec<Value> = c["args"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|a| match a.as_str().unwrap_or_default() {
                    // Metrics would listen on every interface of the host.
                    x if x.starts_with("--metrics-addr") => None,
                    x if x.starts_with("--listen") => Some(json!(format!("--listen={listen}"))),
                    x if x.starts_with("--advertise") => {
                        Some(json!(format!("--advertise={listen}")))
                    }
                    x if x.starts_with("--writer-image") => {
                        Some(json!(format!("--writer-image={AGENTS_IMAGE}")))
                    }
                    _ => Some(a),
                })
                .collect();
            c["args"] = json!(args);
            c["ports"] = json!([{"name": "quic", "containerPort": port, "protocol": "UDP"}]);
            if let Some(env) = c["env"].as_array_mut() {
                env.push(json!({"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"}));
                env.push(json!({"name": "KUBERNETES_SERVICE_PORT", "value": api_port}));
            }
        }
        _ => {}
    }
}

/// The Secret `understudy-target` from the pair's target directory, as the runbook makes it.
fn identity_secret(p: &Pair) -> Result<Value> {
    let read = |path: std::path::PathBuf| {
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    let dir = &p.target_dir;
    Ok(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "stringData": {
            "cert.pem": read(dir.join("identity/cert.pem"))?,
            "key.pem": read(dir.join("identity/key.pem"))?,
            "peers.json": read(dir.join("peers.json"))?,
        },
    }))
}

/// `address:port` of the Service's ready endpoint, once there is one.
async fn service_address(c: &NodeCluster, timeout: Duration) -> Result<String> {
    let api: Api<EndpointSlice> = Api::namespaced(c.client().await?, NAMESPACE);
    let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={NAME}"));
    let deadline = Instant::now() + timeout;
    loop {
        for slice in api.list(&lp).await?.items {
            let port = slice
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some("quic"))
                .and_then(|p| p.port);
            let ready = slice.endpoints.iter().flatten().find(|e| {
                e.conditions.as_ref().and_then(|c| c.ready) == Some(true) && !e.addresses.is_empty()
            });
            if let (Some(port), Some(e)) = (port, ready) {
                return Ok(format!("{}:{port}", e.addresses[0]));
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the Service {NAMESPACE}/{NAME} has no ready endpoint after {timeout:?}; pods: {}\nkubelet:\n{}",
                pods_status(c).await,
                c.log_tail("kubelet")
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Waits until the running agent's log says it listens.
async fn wait_listening(c: &NodeCluster, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let log = logs(c).await.unwrap_or_default();
        if log.contains("target agent listening") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the agent pod does not listen after {timeout:?}; its log:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The agent pod (the Deployment's one replica).
pub async fn pod(c: &NodeCluster) -> Result<Pod> {
    let api: Api<Pod> = Api::namespaced(c.client().await?, NAMESPACE);
    let pods = api.list(&ListParams::default().labels(SELECTOR)).await?;
    pods.items
        .into_iter()
        .next()
        .context("the Deployment understudy-target has no pod")
}

async fn pods_status(c: &NodeCluster) -> String {
    match pod(c).await {
        Ok(p) => serde_json::to_string(&p.status).unwrap_or_default(),
        Err(e) => format!("{e:#}"),
    }
}

/// The agent container's log (of its current run).
pub async fn logs(c: &NodeCluster) -> Result<String> {
    let p = pod(c).await?;
    let name = p.metadata.name.unwrap_or_default();
    c.pod_logs(NAMESPACE, &name).await
}

/// How many times the kubelet restarted the agent's container.
pub async fn restarts(c: &NodeCluster) -> Result<i32> {
    let p = pod(c).await?;
    Ok(p.status
        .and_then(|s| s.container_statuses)
        .and_then(|s| s.first().map(|c| c.restart_count))
        .unwrap_or(0))
}

/// Runs a command in the agent's container; its stdout.
pub async fn exec(c: &NodeCluster, command: &[&str]) -> Result<String> {
    let p = pod(c).await?;
    let name = p.metadata.name.unwrap_or_default();
    let out = c.exec(NAMESPACE, &name, "target-agent", command).await?;
    anyhow::ensure!(
        out.code == 0,
        "`{}` in the agent pod failed: {}",
        command.join(" "),
        out.stderr
    );
    Ok(out.stdout)
}

/// SIGKILLs the agent's process in its container (the kubelet restarts the container, the pod
/// and its claim stay).
pub async fn kill(c: &NodeCluster) -> Result<()> {
    let p = pod(c).await?;
    let uid = p.metadata.uid.unwrap_or_default();
    let pids = agent_pids(&uid);
    if pids.is_empty() {
        bail!("no target-agent process in the cgroup of pod {uid}");
    }
    for pid in pids {
        if let Some(pid) = rustix::process::Pid::from_raw(pid) {
            rustix::process::kill_process(pid, rustix::process::Signal::KILL)?;
        }
    }
    Ok(())
}

/// The processes of `target-agent serve` in pod `uid`'s cgroup.
fn agent_pids(uid: &str) -> Vec<i32> {
    let marks = [uid.to_string(), uid.replace('-', "_")];
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            marks.iter().any(|m| cgroup.contains(m.as_str()))
                && args.first().is_some_and(|a| a.ends_with(b"target-agent"))
                && args.get(1) == Some(&&b"serve"[..])
        })
        .collect()
}
