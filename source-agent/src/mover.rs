//! A data mover (protocol 4): reads one volume of a cut (in Kubernetes, a PVC restored from the
//! member snapshot, attached to the mover's pod as a block device), compares it with the
//! volume's map at the target's latest point, and stages what changed on the target over its
//! own connection. A group's movers run in parallel, on the nodes where their volumes attach, so
//! the data path grows with the nodes; the source agent commits the staged volumes together as
//! one recovery point (or not at all).
//!
//! The volume a mover reads does not change (it is a snapshot), so nothing is spooled: new
//! frames go straight to the push as the scan makes them, and a chunk the target asks for later
//! (or after a rerun) is read from the volume again ([`understudy_common::cut::snapshot`]).
//!
//! A mover holds no long-lived secret: its certificate and key were made for this cut by the
//! source agent, which granted them, over its own pinned session, the right to stage exactly
//! this volume of this group for this cut, for a limited time ([`MoverTicket`]).

use crate::link::{Link, Outcome, Sent};
use crate::ship::Limiter;
use crate::target::{Connector, TargetAddr};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use understudy_common::change::{ChangeSource, HashDiff, Listed, Unlisted};
use understudy_common::cut::scan::{ScanObserver, ScanSettings, VolumeScan, scan_volume};
use understudy_common::cut::snapshot::{DirectSink, FrameFeed, Reread};
use understudy_common::hash::ChunkHash;
use understudy_common::protocol::OfferKind;
use understudy_common::protocol::source_session::{Offer, SourceSession, SourceStep};
use understudy_common::store::{CutMeta, ManifestRef, VolumeMeta};
use understudy_common::transport::{Fingerprint, Identity, stream};
use understudy_common::volume::Volume;

/// Everything a mover is told: what to stage, where, and with which key. The source agent writes
/// it (as JSON) into a Secret the mover's pod mounts.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MoverTicket {
    /// Protection group.
    pub group: String,
    /// The cut's stage id (also the cut id of the point it becomes).
    pub stage: String,
    /// The volume's name in the group.
    pub volume: String,
    /// The cut's instant (ms since the Unix epoch): the snapshot's creation time.
    pub created_ms: i64,
    /// Target agent, `host:port`.
    pub target: String,
    /// The target's certificate fingerprint.
    pub target_fingerprint: String,
    /// Block size.
    pub block_size: u32,
    /// zstd level.
    pub zstd_level: i32,
    /// Reader threads.
    pub workers: usize,
    /// Parallel data streams.
    pub streams: usize,
    /// Cap on chunk data sent, in megabits per second.
    pub bandwidth_limit_mbit: Option<u32>,
    /// The mover's certificate (PEM), made for this cut.
    pub cert_pem: String,
    /// Its private key (PEM, PKCS#8).
    pub key_pem: String,
    /// Changed-block tracking for this volume, when its driver serves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cbt: Option<CbtTicket>,
}

/// How a mover asks the driver which blocks to read (KEP-3314's SnapshotMetadata API).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CbtTicket {
    /// The sidecar's address, CA and a token with its audience.
    pub access: understudy_kube::snapshot_metadata::Access,
    /// Namespace of the snapshot.
    pub namespace: String,
    /// The VolumeSnapshot the mover reads (restored as its device).
    pub snapshot: String,
    /// The snapshot of the group's latest point, when it is kept: a delta against it names
    /// only the changed blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<CbtBase>,
}

/// The base of a delta.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CbtBase {
    /// The CSI snapshot handle (VolumeSnapshotContent status.snapshotHandle).
    pub handle: String,
    /// The point it is the snapshot of: the delta is used only when the target's latest point
    /// is this one.
    pub seq: u64,
}

/// What a mover did: written where its pod's termination message is read from, so the source
/// agent learns the volume's size and digest (which its commit declares) without a channel of
/// its own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoverReport {
    /// The volume.
    pub volume: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its digest at the cut (the source's declaration; restore must reproduce it).
    pub digest: String,
    /// Bytes read from the volume.
    pub bytes_read: u64,
    /// Block-map entries staged (changed since the base).
    pub blocks_changed: u64,
    /// Chunks sent.
    pub chunks_sent: u64,
    /// Frame bytes sent.
    pub bytes_sent: u64,
    /// Chunks the target already held.
    pub chunks_held: u64,
    /// What named the blocks to read ("hash-diff", "csi-delta", "csi-allocated").
    pub change_source: String,
    /// Why hash-diff, or a weaker tracker than the delta, when so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_reason: Option<String>,
    /// True when the target had already committed the cut (a mover run again after the commit).
    pub already_committed: bool,
    /// How long the run took (connect, read, send, stage), in ms.
    #[serde(default)]
    pub elapsed_ms: u64,
}

/// Stages `device` (which must not change meanwhile: a snapshot) as the ticket says. The
/// blocks to read come from the driver's changed-block tracking where the ticket allows it,
/// else every block is read and compared with the base (hash-diff).
pub async fn run(ticket: &MoverTicket, device: &Path) -> Result<MoverReport> {
    let identity = Identity::from_pem(ticket.cert_pem.as_bytes(), ticket.key_pem.as_bytes())
        .context("the mover's ticket holds no usable certificate and key")?;
    let target_fp: Fingerprint = ticket.target_fingerprint.parse()?;
    let target: TargetAddr = ticket.target.parse()?;
    let vol = Volume::open(device).with_context(|| {
        format!(
            "volume {} at {} cannot be read",
            ticket.volume,
            device.display()
        )
    })?;
    let source = identity.fingerprint.to_string();
    let connector = Connector::new(identity, vec![target_fp]);
    let conn = connector.connect(&target).await?;
    let link = Link {
        conn: conn.clone(),
        streams: ticket.streams.max(1),
        limit: ticket.bandwidth_limit_mbit.map(Limiter::mbit),
        on_bytes: Arc::new(|_| {}),
    };
    let started = std::time::Instant::now();
    let r = stage(ticket, &source, &link, vol)
        .await
        .map(|r| MoverReport {
            elapsed_ms: started.elapsed().as_millis() as u64,
            ..r
        })
        .map_err(|e| link.explain(e));
    connector.shutdown().await;
    r
}

/// The session: Join, the base arriving while the volume is scanned (and its new chunks
/// pushed), then the one-volume offer, the target's needs, and Staged.
async fn stage(
    ticket: &MoverTicket,
    source: &str,
    link: &Link,
    vol: Volume,
) -> Result<MoverReport> {
    let mut control = link.open_control().await?;
    let (mut session, join) = SourceSession::mover(
        &ticket.group,
        &ticket.stage,
        &ticket.volume,
        ticket.block_size,
    );
    stream::send(&mut control.0, &join).await?;
    let welcome = stream::recv(&mut control.1)
        .await
        .context("target closed the session before welcoming the mover")?;
    session.on_message(welcome)?;
    if !session.awaits_cut() {
        bail!("target did not welcome the mover");
    }
    let latest = session.latest().map(|(seq, _)| seq);
    let (change, change_reason) = choose_change(ticket, latest).await;
    tracing::info!(volume = %ticket.volume, change = change.name(), reason = ?change_reason, "blocks to read");
    let (feed, pusher) = match session.push_allowed() {
        true => {
            let (f, p) = link.start_push_frames();
            (Some(f), Some(p))
        }
        false => (None, None),
    };
    let (base_tx, base_rx) = tokio::sync::mpsc::channel::<Vec<(u64, ChunkHash)>>(4);
    let scan = spawn_scan(ticket, vol, feed, latest.is_some(), base_rx, change);
    // Feed the base to the scan as it arrives; the scan's end (or failure) drops the receiver.
    while !session.base_complete() {
        let msg = stream::recv(&mut control.1)
            .await
            .context("target closed the session while sending the volume's base")?;
        match session.on_message(msg)? {
            SourceStep::Base(entries) => {
                if base_tx.send(entries).await.is_err() {
                    break;
                }
            }
            SourceStep::BaseEnd => {}
            other => bail!("target sent {other:?} while sending the base"),
        }
    }
    drop(base_tx);
    let scanned = scan.await.context("the scan task failed")?;
    let Scanned {
        scan,
        frames,
        pushed,
        size,
    } = match scanned {
        Ok(s) => s,
        Err(e) => {
            if let Some(p) = pusher {
                p.abort();
            }
            return Err(e);
        }
    };
    let offer = Offer {
        kind: latest.map_or(OfferKind::Full, |base| OfferKind::Delta { base }),
        cut: CutMeta {
            cut_id: ticket.stage.clone(),
            source: source.to_string(),
            created_ms: ticket.created_ms,
            block_size: ticket.block_size,
            volumes: vec![VolumeMeta {
                name: ticket.volume.clone(),
                size,
                digest: scan.digest.clone(),
            }],
            manifests: ManifestRef::default(),
        },
        entries: vec![scan.changes],
        parts: None,
    };
    let (streams, pushed) = match pusher {
        Some(_) => (link.streams as u32, pushed),
        None => (0, 0),
    };
    let first = session.set_offer(offer, streams, pushed)?;
    let mut sent = Sent::default();
    let outcome = link
        .finish_pushed(control, session, first, pusher, Arc::new(frames), &mut sent)
        .await?;
    if outcome == Outcome::BaseMismatch {
        bail!(
            "the group's latest point changed while volume {} was read: the source agent makes the cut again",
            ticket.volume
        );
    }
    Ok(MoverReport {
        volume: ticket.volume.clone(),
        size,
        digest: scan.digest,
        bytes_read: scan.bytes_read,
        blocks_changed: sent.blocks_changed,
        chunks_sent: sent.chunks,
        bytes_sent: sent.bytes,
        chunks_held: sent.held,
        change_source: scan.change_source.to_string(),
        change_reason,
        already_committed: sent.already_committed,
        elapsed_ms: 0,
    })
}

/// What names the blocks to read: a delta against the base's snapshot when the target's latest
/// point is that snapshot's, else the allocated ranges; hash-diff when the driver cannot say
/// (with the reason).
async fn choose_change(
    ticket: &MoverTicket,
    latest: Option<u64>,
) -> (Arc<dyn ChangeSource>, Option<String>) {
    let Some(cbt) = &ticket.cbt else {
        return (
            Arc::new(HashDiff),
            Some("the volume's CSI driver serves no SnapshotMetadata API".into()),
        );
    };
    match cbt_ranges(cbt, latest).await {
        Ok((listed, reason)) => (Arc::new(listed), reason),
        Err(e) => (
            Arc::new(HashDiff),
            Some(format!(
                "changed-block tracking failed, every block is read: {e:#}"
            )),
        ),
    }
}

async fn cbt_ranges(cbt: &CbtTicket, latest: Option<u64>) -> Result<(Listed, Option<String>)> {
    use understudy_kube::snapshot_metadata::{SnapshotMetadata, is_unsupported};
    let client = SnapshotMetadata::with_access(&cbt.access).await?;
    let to_bytes =
        |v: Vec<understudy_kube::snapshot_metadata::Extent>| -> Vec<std::ops::Range<u64>> {
            v.into_iter().map(|e| e.offset..e.end()).collect()
        };
    let mut reason = None;
    match &cbt.base {
        Some(b) if latest == Some(b.seq) => {
            match client
                .changed_extents(&cbt.namespace, &b.handle, &cbt.snapshot, 3)
                .await
            {
                Ok(v) => {
                    return Ok((
                        Listed {
                            name: "csi-delta",
                            unlisted: Unlisted::Unchanged,
                            extents: to_bytes(v),
                        },
                        None,
                    ));
                }
                Err(e) if is_unsupported(&e) => {
                    reason = Some(format!("the driver cannot diff against the base: {e:#}"));
                }
                Err(e) => return Err(e),
            }
        }
        Some(b) => {
            reason = Some(format!(
                "the kept base snapshot is of point {}, the target's latest is {latest:?}",
                b.seq
            ));
        }
        None if latest.is_some() => reason = Some("no base snapshot is kept".into()),
        None => {}
    }
    let v = client
        .allocated_extents(&cbt.namespace, &cbt.snapshot, 3)
        .await?;
    Ok((
        Listed {
            name: "csi-allocated",
            unlisted: Unlisted::Holes,
            extents: to_bytes(v),
        },
        reason,
    ))
}

/// What the scan found, and how to frame its chunks again.
struct Scanned {
    scan: VolumeScan,
    frames: Reread,
    /// Distinct new chunks handed to the push.
    pushed: u64,
    size: u64,
}

/// Scans the volume in a blocking task against the base arriving on `base`, handing the frames
/// of changed blocks to `feed` (when pushing).
fn spawn_scan(
    ticket: &MoverTicket,
    vol: Volume,
    feed: Option<FrameFeed>,
    has_base: bool,
    mut base: tokio::sync::mpsc::Receiver<Vec<(u64, ChunkHash)>>,
    change: Arc<dyn ChangeSource>,
) -> tokio::task::JoinHandle<Result<Scanned>> {
    let settings = ScanSettings {
        block_size: ticket.block_size,
        zstd_level: ticket.zstd_level,
        workers: ticket.workers.max(1),
    };
    let name = ticket.volume.clone();
    tokio::task::spawn_blocking(move || {
        let mut sink = DirectSink::new(feed);
        let mut stream = std::iter::from_fn(move || base.blocking_recv())
            .flatten()
            .map(Ok);
        let base_stream: Option<understudy_common::cut::scan::BaseStream<'_>> =
            has_base.then_some(&mut stream);
        let obs = ScanObserver {
            stop: &|| false,
            progress: &|_| {},
        };
        let scan = scan_volume(
            &name,
            &vol,
            base_stream,
            change.as_ref(),
            settings,
            &mut sink,
            obs,
        )
        .with_context(|| format!("scan of volume {name} ({}) failed", vol.path().display()))?;
        let at = sink.finish();
        let size = vol.size();
        Ok(Scanned {
            scan,
            pushed: at.len() as u64,
            frames: Reread::new(vol, at, settings.block_size, settings.zstd_level),
            size,
        })
    })
}
