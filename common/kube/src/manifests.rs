//! The two places a cut's manifests come from: a directory of YAML (standalone mode) and the
//! application's objects on a cluster. Both produce a [`Bundle`], which the core stores as bytes.

use crate::bundle::Bundle;
use crate::capture::{CaptureSpec, capture};
use anyhow::{Context, Result};
use std::path::PathBuf;
use understudy_common::cut::{CapturedManifests, ManifestSource};

impl Bundle {
    /// The bundle as a cut stores it.
    pub fn captured(&self) -> CapturedManifests {
        CapturedManifests {
            encoded: self.encode(),
            files: self.files.len() as u32,
        }
    }
}

/// Manifests read from a directory of YAML files at every cut.
#[derive(Clone, Debug)]
pub struct DirectoryManifests(pub PathBuf);

impl ManifestSource for DirectoryManifests {
    fn capture(&self) -> Result<CapturedManifests> {
        // A missing directory or a file that does not parse waits for the user, not a retry.
        let bundle = Bundle::capture(&self.0).map_err(understudy_common::error::permanent)?;
        Ok(bundle.captured())
    }

    fn preflight(&self) -> Result<()> {
        self.capture().map(drop)
    }
}

/// The application's objects, captured from its cluster at every cut.
#[derive(Clone, Debug)]
pub struct ClusterManifests {
    /// Kubeconfig (default: the usual inference).
    pub kubeconfig: Option<PathBuf>,
    /// Namespaces and selector.
    pub spec: CaptureSpec,
}

impl ManifestSource for ClusterManifests {
    /// Runs on the current Tokio runtime (or a private one when there is none).
    fn capture(&self) -> Result<CapturedManifests> {
        let work = async {
            let client = crate::connect(self.kubeconfig.as_deref()).await?;
            let c = capture(&client, &self.spec).await?;
            for w in &c.warnings {
                tracing::warn!(warning = %w, "capture");
            }
            Ok::<_, anyhow::Error>(c.bundle)
        };
        let bundle = match tokio::runtime::Handle::try_current() {
            Ok(h) => h.block_on(work),
            Err(_) => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(work),
        };
        let bundle =
            bundle.context("capturing the application's objects from the cluster failed")?;
        Ok(bundle.captured())
    }
}
