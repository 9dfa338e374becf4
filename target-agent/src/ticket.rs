//! Writer tickets: what a writer (a volume populator's pod, or `target-agent write` on another
//! machine) needs to read one volume of one point from the running target agent. The target makes
//! a key for the writer, grants it that one volume of that one point for a limited time
//! ([`FetchGrant`]), and hands back the ticket; the writer pins the target's certificate. A
//! ticket holds a private key: it is written mode 0600, and a Kubernetes one lives in a Secret.

use crate::failover::{PointSelector, select_point};
use crate::session::SessionContext;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;
use understudy_common::transport::Identity;
use understudy_common::transport::connect::TargetAddr;
use understudy_common::transport::grants::{FetchGrant, MAX_GRANT_MS, Permit};

/// Everything a writer is told.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterTicket {
    /// The group.
    pub group: String,
    /// The point's sequence number.
    pub seq: u64,
    /// The volume.
    pub volume: String,
    /// Its size in bytes (what the device must hold).
    pub size: u64,
    /// The digest the source declared at the cut (what the writer must reproduce).
    pub digest: String,
    /// The target agent, `host:port`.
    pub target: String,
    /// The target's certificate fingerprint.
    pub target_fingerprint: String,
    /// The writer's certificate (PEM), made for this ticket.
    pub cert_pem: String,
    /// Its private key (PEM, PKCS#8).
    pub key_pem: String,
    /// When the grant lapses (ms since the Unix epoch).
    pub expires_ms: i64,
}

/// `ticket` arguments: which volume, and the address writers dial.
#[derive(clap::Args, Debug, Clone, Serialize, Deserialize)]
pub struct TicketArgs {
    /// Agent state directory (of the running `serve`).
    #[arg(long, env = "UNDERSTUDY_DIR")]
    pub dir: PathBuf,
    /// The group.
    #[arg(long)]
    pub group: String,
    /// latest, a point number, or a time (the newest point at or before it).
    #[arg(long, default_value = "latest")]
    pub point: PointSelector,
    /// The volume.
    #[arg(long)]
    pub volume: String,
    /// Where the writer reaches this agent, HOST:PORT (its UDP Service, or this machine's
    /// address as the writer sees it).
    #[arg(long)]
    pub target: String,
    /// How long the writer may take to connect and read, e.g. `30m`.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// Where to write the ticket (mode 0600: it holds the writer's key).
    #[arg(long)]
    pub out: PathBuf,
}

/// Makes a writer's key and grants it the volume the arguments name, at `now_ms`.
pub fn issue(ctx: &SessionContext, a: &TicketArgs, now_ms: i64) -> Result<WriterTicket> {
    let target: TargetAddr = a.target.parse()?;
    let ttl = a.ttl.as_millis() as u64;
    anyhow::ensure!(
        (1000..=MAX_GRANT_MS).contains(&ttl),
        "--ttl must be 1 s to 24 h, not {}",
        humantime::format_duration(a.ttl)
    );
    let point = select_point(&ctx.store, &a.group, &a.point)?;
    let meta = point.cut.volume(&a.volume).with_context(|| {
        let names: Vec<_> = point.cut.volumes.iter().map(|v| v.name.as_str()).collect();
        format!(
            "point {} of group {} has no volume {}: it holds {}",
            point.seq,
            a.group,
            a.volume,
            names.join(", ")
        )
    })?;
    let (id, cert_pem, key_pem) = Identity::ephemeral(&format!("writer.{}.{}", a.volume, a.group))?;
    let expires_ms = now_ms.saturating_add(ttl as i64);
    let grant = FetchGrant {
        group: a.group.clone(),
        seq: point.seq,
        volume: a.volume.clone(),
        expires_ms,
    };
    ctx.grants
        .add([(id.fingerprint.clone(), Permit::Fetch(grant))], now_ms);
    tracing::info!(group = %a.group, seq = point.seq, volume = %a.volume, writer = %id.fingerprint, "granted a writer");
    Ok(WriterTicket {
        group: a.group.clone(),
        seq: point.seq,
        volume: a.volume.clone(),
        size: meta.size,
        digest: meta.digest.clone(),
        target: target.to_string(),
        target_fingerprint: ctx.fingerprint.to_string(),
        cert_pem,
        key_pem,
        expires_ms,
    })
}
