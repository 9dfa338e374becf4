//! `target-agent apply`: puts a bundle of manifests on a cluster, transformed for the standby, in
//! dependency order (standalone use; failover drives the same library).

use crate::commands::TransformArgs;
use anyhow::Result;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use understudy_kube::apply::{ApplyOptions, IfExists, apply, apply_order};
use understudy_kube::bundle::Bundle;
use understudy_kube::transform::render_diff;

/// `apply` arguments.
#[derive(clap::Args, Debug)]
pub struct ApplyArgs {
    /// The manifests: a directory of YAML files (a capture, or failover's manifests/) or one
    /// multi-document YAML file.
    #[arg(long)]
    pub bundle: PathBuf,
    /// Manifest transforms.
    #[command(flatten)]
    pub transform: TransformArgs,
    /// Kubeconfig of the cluster to apply to (default: $KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// What to do with objects that already exist.
    #[arg(long, value_enum, default_value = "update")]
    pub if_exists: IfExists,
    /// Server-side apply field manager.
    #[arg(long, default_value = "understudy")]
    pub field_manager: String,
    /// How long to wait for each CustomResourceDefinition to be Established.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub crd_timeout: Duration,
    /// Do not prune: leave on the cluster what an earlier apply created and this bundle no
    /// longer holds.
    #[arg(long)]
    pub no_prune: bool,
    /// Print what the rules change (a diff per object) and the apply order; touch no cluster.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `apply`. Exit code 2 when the API server rejected any object.
pub fn run(a: ApplyArgs) -> Result<ExitCode> {
    let bundle = Bundle::read(&a.bundle)?;
    let rules = a.transform.rules()?;
    if a.dry_run {
        print!("{}", render_diff(&bundle, &rules)?);
        let mut objects = rules.transform_bundle(&bundle)?.objects;
        apply_order(&mut objects);
        println!("apply order:");
        for (i, (id, _)) in objects.iter().enumerate() {
            println!("{:>4}. {id}", i + 1);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let transformed = rules.transform_bundle(&bundle)?;
    let opts = ApplyOptions {
        if_exists: a.if_exists,
        field_manager: a.field_manager.clone(),
        crd_timeout: a.crd_timeout,
        prune: !a.no_prune,
    };
    let report = tokio::runtime::Runtime::new()?.block_on(async {
        let client = understudy_kube::connect(a.kubeconfig.as_deref()).await?;
        anyhow::Ok(apply(&client, transformed.objects, &opts).await)
    })?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        for (id, reason) in &transformed.skipped {
            println!("left out   {id}: {reason}");
        }
        print!("{}", report.render());
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
