//! `source-agent capture`: captures an application's objects from a cluster into a bundle
//! directory, with its digest (the same capture a recovery point stores).

use anyhow::{Result, bail};
use std::path::PathBuf;
use understudy_kube::capture::{CaptureSpec, capture};

/// `capture` arguments.
#[derive(clap::Args, Debug)]
pub struct CaptureArgs {
    /// Kubeconfig of the source cluster (default: $KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// A namespace of the application (repeatable).
    #[arg(long = "namespace", required = true)]
    pub namespaces: Vec<String>,
    /// Label selector narrowing the namespaced objects, e.g. `app.kubernetes.io/part-of=shop`.
    #[arg(long)]
    pub selector: Option<String>,
    /// Write the bundle here (a new or empty directory): one YAML file per object.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `capture`.
pub fn run(a: CaptureArgs) -> Result<()> {
    if let Some(out) = &a.out
        && out.read_dir().is_ok_and(|mut d| d.next().is_some())
    {
        bail!(
            "--out {} is not empty: give a new or empty directory, so no stale file joins the bundle",
            out.display()
        );
    }
    let spec = CaptureSpec {
        namespaces: a.namespaces.clone(),
        label_selector: a.selector.clone(),
    };
    let captured = tokio::runtime::Runtime::new()?.block_on(async {
        let client = understudy_kube::connect(a.kubeconfig.as_deref()).await?;
        capture(&client, &spec).await
    })?;
    if let Some(out) = &a.out {
        captured.bundle.write_to(out)?;
    }
    let summary = captured.summary();
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
        return Ok(());
    }
    for id in &captured.objects {
        println!("captured   {id}");
    }
    for (id, reason) in &captured.left_out {
        println!("left out   {id}: {reason}");
    }
    for w in &summary.warnings {
        println!("warning    {w}");
    }
    println!(
        "{} object(s) captured, {} left out; bundle digest {}",
        summary.objects, summary.left_out, summary.digest
    );
    Ok(())
}
