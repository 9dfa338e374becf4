//! The source agent's side of a cut read by data movers (protocol 4): make a key per mover,
//! grant the keys on a pinned session, and, once every mover staged its volume, commit them
//! with the manifests as one recovery point. Nothing is visible on the target before that
//! commit; a cut given up leaves staged parts that the group's next commit drops.

use crate::link::{Link, Outcome, Sent};
use crate::ship::Limiter;
use crate::target::{Connector, TargetAddr};
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::sync::Arc;
use understudy_common::cut::CapturedManifests;
use understudy_common::cut::spool::{SpoolReader, SpoolWriter};
use understudy_common::protocol::source_session::{Offer, SourceSession};
use understudy_common::protocol::{Control, MoverGrant, OfferKind};
use understudy_common::store::{CutMeta, VolumeMeta};
use understudy_common::transport::{Identity, stream};

/// A mover's key, made for one volume of one cut.
pub struct MoverKey {
    /// The volume it may stage.
    pub volume: String,
    /// Its certificate's fingerprint.
    pub fingerprint: String,
    /// Certificate (PEM).
    pub cert_pem: String,
    /// Private key (PEM).
    pub key_pem: String,
}

/// Makes one key per volume.
pub fn mover_keys(group: &str, volumes: &[String]) -> Result<Vec<MoverKey>> {
    volumes
        .iter()
        .map(|v| {
            let (id, cert_pem, key_pem) = Identity::ephemeral(&format!("mover.{v}.{group}"))?;
            Ok(MoverKey {
                volume: v.clone(),
                fingerprint: id.fingerprint.to_string(),
                cert_pem,
                key_pem,
            })
        })
        .collect()
}

/// Grants `keys` the right to stage their volumes of `group` for `stage` during `ttl`.
pub async fn authorize(
    connector: &Connector,
    target: &TargetAddr,
    group: &str,
    stage: &str,
    keys: &[MoverKey],
    ttl: std::time::Duration,
) -> Result<()> {
    let conn = connector.connect(target).await?;
    let link = plain_link(&conn, 1, None);
    let r = async {
        let mut control = link.open_control().await?;
        let msg = Control::AuthorizeMovers {
            group: group.to_string(),
            stage: stage.to_string(),
            grants: keys
                .iter()
                .map(|k| MoverGrant {
                    volume: k.volume.clone(),
                    fingerprint: k.fingerprint.clone(),
                })
                .collect(),
            ttl_ms: ttl.as_millis() as u64,
        };
        stream::send(&mut control.0, &msg).await?;
        match stream::recv(&mut control.1).await? {
            Control::MoversAuthorized { count } if count as usize == keys.len() => Ok(()),
            Control::Refused { code, message } => {
                bail!("target refused the movers' grants ({code:?}): {message}")
            }
            other => bail!("target answered the movers' grants with {}", other.name()),
        }
    }
    .await
    .map_err(|e| link.explain(e));
    conn.close(0u32.into(), b"done");
    r
}

/// What the commit of a staged cut did.
#[derive(Clone, Debug, Default)]
pub struct StagedCommit {
    /// The point's sequence number.
    pub seq: u64,
    /// What the session sent (the manifests' chunks the target lacked).
    pub sent: Sent,
}

/// A cut whose volumes movers staged.
pub struct StagedCut<'a> {
    /// Protection group.
    pub group: &'a str,
    /// Stage id (the point's cut id).
    pub stage: &'a str,
    /// The instant (ms since the Unix epoch).
    pub created_ms: i64,
    /// Block size.
    pub block_size: u32,
    /// zstd level of the manifests' chunks.
    pub zstd_level: i32,
    /// The volumes as their movers reported them, in the group's order.
    pub volumes: Vec<VolumeMeta>,
    /// The application's manifests at the instant.
    pub manifests: &'a CapturedManifests,
    /// The pending migration whose final state this cut is.
    pub final_for: Option<&'a str>,
}

/// Commits a staged cut as one point: the offer declares every volume (its mover's size and
/// digest) and the manifests, and tells the target to take the entries from the staged parts.
/// `spool_dir` holds the manifests' frames meanwhile. A cut the target already committed (a
/// retry after a lost reply) returns that point.
pub async fn commit(
    connector: &Connector,
    target: &TargetAddr,
    cut: StagedCut<'_>,
    spool_dir: &Path,
    limit: Option<Limiter>,
) -> Result<StagedCommit> {
    let spool_path = spool_dir.join("manifests.frames");
    let mut spool = SpoolWriter::create(&spool_path)?;
    let manifests = cut
        .manifests
        .spool(cut.block_size, cut.zstd_level, &mut spool)?;
    let index = spool.finish()?;
    let conn = connector.connect(target).await?;
    let link = plain_link(&conn, 2, limit);
    let r = async {
        let mut control = link.open_control().await?;
        // Welcomed first: the offer's kind follows the target's latest point, against which
        // the movers staged their deltas.
        let (mut session, hello) = SourceSession::pushing(cut.group);
        if let Some(id) = cut.final_for {
            session.end_migration(id);
        }
        stream::send(&mut control.0, &hello).await?;
        let welcome = stream::recv(&mut control.1)
            .await
            .context("target closed the session")?;
        session.on_message(welcome)?;
        let offer = Offer {
            kind: session
                .latest()
                .map_or(OfferKind::Full, |(seq, _)| OfferKind::Delta { base: seq }),
            cut: CutMeta {
                cut_id: cut.stage.to_string(),
                source: connector.identity().fingerprint.to_string(),
                created_ms: cut.created_ms,
                block_size: cut.block_size,
                volumes: cut.volumes,
                manifests,
            },
            entries: vec![],
            parts: Some(cut.stage.to_string()),
        };
        let first = session.set_offer(offer, 0, 0)?;
        let mut sent = Sent::default();
        let frames = Arc::new(SpoolReader::open(&spool_path, index)?);
        let outcome = link
            .drive(control, session, Some(first), frames, &mut sent)
            .await?;
        match outcome {
            Outcome::Committed(seq) => Ok(StagedCommit { seq, sent }),
            Outcome::BaseMismatch => bail!(
                "the group's latest point on the target changed while the movers read the cut; the cut is made again"
            ),
            Outcome::Staged => bail!("the target answered a commit as a mover's part"),
        }
    }
    .await
    .map_err(|e| link.explain(e));
    let _ = std::fs::remove_file(&spool_path);
    r
}

fn plain_link(conn: &quinn::Connection, streams: usize, limit: Option<Limiter>) -> Link {
    Link {
        conn: conn.clone(),
        streams,
        limit,
        on_bytes: Arc::new(|_| {}),
    }
}
