//! Kubernetes: connecting to a cluster, capturing an application's objects into a
//! [`crate::bundle::Bundle`], and applying a transformed bundle to the standby in dependency
//! order. Tested against a real kube-apiserver (tests/kube-testbed).

use anyhow::{Context, Result};
use kube::core::GroupVersionKind;
use kube::discovery::{ApiCapabilities, ApiResource, Scope};
use kube::{Client, Config};
use std::collections::HashMap;
use std::path::Path;

/// Connects with a kubeconfig file, or (without one) the usual inference: $KUBECONFIG,
/// ~/.kube/config, then the in-cluster service account; then checks the API server answers, so an
/// unreachable cluster is one clear error rather than one per object.
pub async fn connect(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).with_context(|| {
                format!("cannot read kubeconfig {}: check the path", path.display())
            })?;
            Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("kubeconfig {} is not usable", path.display()))?
        }
        None => Config::infer().await.context(
            "no Kubernetes configuration found: pass --kubeconfig, set KUBECONFIG, or run in a pod",
        )?,
    };
    let url = config.cluster_url.to_string();
    let client = Client::try_from(config)
        .context("cannot build a Kubernetes client from the configuration")?;
    client.apiserver_version().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the Kubernetes API server at {url}: {}; check the kubeconfig, the network and the credentials",
            api_message(&e)
        )
    })?;
    Ok(client)
}

/// Whether a resource kind is namespaced.
pub fn is_namespaced(caps: &ApiCapabilities) -> bool {
    caps.scope == Scope::Namespaced
}

/// Finds the resource (plural name, scope) behind an apiVersion and kind, remembering answers.
pub struct Resolver {
    client: Client,
    known: HashMap<(String, String), (ApiResource, ApiCapabilities)>,
}

impl Resolver {
    /// A resolver asking `client`'s API server.
    pub fn new(client: Client) -> Self {
        Resolver {
            client,
            known: HashMap::new(),
        }
    }

    /// The resource serving `api_version`/`kind`, or an error saying the server does not serve it.
    pub async fn resolve(
        &mut self,
        api_version: &str,
        kind: &str,
    ) -> Result<(ApiResource, ApiCapabilities)> {
        let key = (api_version.to_string(), kind.to_string());
        if let Some(found) = self.known.get(&key) {
            return Ok(found.clone());
        }
        let (group, version) = match api_version.rsplit_once('/') {
            Some((g, v)) => (g, v),
            None => ("", api_version),
        };
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let found = kube::discovery::pinned_kind(&self.client, &gvk)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "the API server does not serve {kind} in {api_version} ({e}): install its API or CRD first"
                )
            })?;
        self.known.insert(key, found.clone());
        Ok(found)
    }
}

/// The message of an API error (what the API server said), or the error itself.
pub fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({}, HTTP {})", s.message, s.reason, s.code),
        other => other.to_string(),
    }
}

/// The HTTP status of an API error.
pub fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}
