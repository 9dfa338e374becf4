//! The target's recovery-point store: packs of chunk frames plus a redb catalog.
//! docs/store-format.md describes the layout byte by byte.

pub mod catalog;
pub mod migration;
pub mod pack;
mod packs;
mod parts;
pub mod recovery_point;
pub mod restore;
pub mod retention;
pub mod snapshot;
pub mod verify;

use crate::block_map::BlockMap;
use crate::chunk;
use crate::hash::{BlockRef, ChunkHash, block_count};
use anyhow::{Context, Result};
use catalog::*;
pub use migration::Migration;
use pack::{Location, PackWriter};
use packs::{Packs, Writing};
pub use recovery_point::{
    CommitRequest, CutMeta, ManifestRef, PointRecord, PointStats, StagedPart, VolumeEntries,
    VolumeMeta,
};
use redb::{Database, ReadableDatabase, ReadableTable};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The store is open in another process (a running `target-agent serve`).
#[derive(Debug, thiserror::Error)]
#[error(
    "store {} is in use by another target-agent process (a running `serve`); store commands reach it through its admin socket, or stop it first",
    .0.display()
)]
pub struct StoreInUse(pub PathBuf);

/// Why a commit was refused.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(
        "the offer was made against point {offered:?} but the group's latest point is {latest:?}"
    )]
    BaseMismatch {
        offered: Option<u64>,
        latest: Option<u64>,
    },
    #[error(
        "{count} chunks the point needs are not in the store (first: {first}); the source must send them"
    )]
    MissingChunks { count: usize, first: ChunkHash },
    #[error("volume {volume}: entry for block {index} is past its end ({blocks} blocks)")]
    EntryOutOfRange {
        volume: String,
        index: u64,
        blocks: u64,
    },
    #[error(transparent)]
    Store(#[from] anyhow::Error),
}

/// An open store: its catalog and its packs. Cheap to share behind an `Arc`; every method takes
/// `&self`.
pub struct Store {
    root: PathBuf,
    catalog: Catalog,
    packs: Packs,
}

/// True when `e` comes from a full disk (ENOSPC or a quota), wherever it sits in the chain.
pub fn is_disk_full(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            )
        }) || c.to_string().contains("No space left on device")
    })
}

impl Store {
    /// Opens (creating if needed) the store at `root`, truncating torn pack tails and removing
    /// packs no committed catalog entry refers to (both are left by a crash).
    pub fn open(root: &Path) -> Result<Self> {
        crate::files::private_dir(root)?;
        let packs = Packs::open(root.join("packs"))?;
        let catalog = Catalog::open(root)?;
        packs.truncate_torn_tails(&catalog.committed_packs()?)?;
        Ok(Store {
            root: root.to_path_buf(),
            catalog,
            packs,
        })
    }

    /// Root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Pack ids and committed lengths from the catalog.
    pub fn committed_packs(&self) -> Result<Vec<(u32, u64)>> {
        self.catalog.committed_packs()
    }

    /// Pack files on disk the catalog does not record (left by a crash before their first flush,
    /// or by a crash during compaction).
    pub(crate) fn orphan_packs(&self) -> Result<Vec<u32>> {
        let committed: HashMap<u32, u64> = self.committed_packs()?.into_iter().collect();
        let current = self.packs.writing().current();
        Ok(self
            .packs
            .files()?
            .into_iter()
            .filter(|id| !committed.contains_key(id) && Some(*id) != current)
            .collect())
    }

    // ----- chunks -----------------------------------------------------------------------------

    /// The hashes among `hashes` the store does not hold durably.
    pub fn missing(&self, hashes: &[ChunkHash]) -> Result<Vec<ChunkHash>> {
        self.catalog.missing(hashes)
    }

    /// Location of a chunk, if held.
    pub fn locate(&self, hash: &ChunkHash) -> Result<Option<Location>> {
        Ok(self.catalog.locate_all(std::slice::from_ref(hash))?[0])
    }

    /// Locations of many chunks, read in one transaction (`None` where a chunk is missing).
    pub fn locate_all(&self, hashes: &[ChunkHash]) -> Result<Vec<Option<Location>>> {
        self.catalog.locate_all(hashes)
    }

    /// Reads the chunk at `loc` into `out`, which must be the block's exact length, and checks
    /// its hash against `hash`. `frame` is a buffer the caller keeps between calls, so the
    /// restore allocates nothing per block.
    pub fn read_chunk_into(
        &self,
        hash: &ChunkHash,
        loc: Location,
        frame: &mut Vec<u8>,
        out: &mut [u8],
    ) -> Result<()> {
        self.read_frame_into(loc, frame)?;
        self.decode_chunk_into(hash, loc, frame, out)
    }

    /// Decodes `frame`, read from `loc`, into `out` and checks it is the chunk the catalog names.
    fn decode_chunk_into(
        &self,
        hash: &ChunkHash,
        loc: Location,
        frame: &[u8],
        out: &mut [u8],
    ) -> Result<()> {
        let pack = || self.packs.path(loc.pack).display().to_string();
        let header = chunk::decode_into(frame, out).with_context(|| {
            format!(
                "chunk {hash} at offset {} of pack {} is damaged",
                loc.offset,
                pack()
            )
        })?;
        anyhow::ensure!(
            header.hash == *hash,
            "pack {} offset {} holds chunk {} where the catalog expects {hash}",
            pack(),
            loc.offset,
            header.hash
        );
        Ok(())
    }

    /// Appends a verified chunk frame. It becomes durable (and visible to [`Store::missing`]) at the
    /// next [`Store::flush`]; the caller decides when (the target session, by its
    /// [`crate::protocol::target_session::FlushPolicy`]). A full pack is flushed and a new one
    /// started here.
    pub fn append(&self, hash: ChunkHash, frame: &[u8]) -> Result<()> {
        let mut w = self.packs.writing();
        if w.writer
            .as_ref()
            .is_none_or(|p| p.len() >= pack::PACK_TARGET_SIZE)
        {
            self.flush_locked(&mut w)?;
            w.writer = Some(self.new_pack()?);
        }
        let loc = match w.writer.as_mut().expect("writer just set").append(frame) {
            Ok(loc) => loc,
            Err(e) => return Err(w.abandon(e)),
        };
        w.unrecorded.push((hash.0, loc));
        Ok(())
    }

    /// Creates the next pack and records it (empty) in the catalog before any chunk goes in.
    fn new_pack(&self) -> Result<PackWriter> {
        let id = self.next_pack_id()?;
        self.packs.raise_high(id)?;
        let w = self.packs.create(id)?;
        self.catalog.add_pack(w.id())?;
        Ok(w)
    }

    fn next_pack_id(&self) -> Result<u32> {
        let on_disk = self.packs.files()?.into_iter().max();
        let committed = self.committed_packs()?.into_iter().map(|(id, _)| id).max();
        let high = Some(self.packs.high()?).filter(|h| *h > 0);
        Ok(on_disk.max(committed).max(high).map_or(1, |m| m + 1))
    }

    /// Makes every appended chunk durable: fsyncs the pack, then records the chunks in the catalog.
    /// Returns how many chunks became durable. The one place chunks move from the packs into the
    /// catalog.
    pub fn flush(&self) -> Result<usize> {
        self.flush_locked(&mut self.packs.writing())
    }

    fn flush_locked(&self, w: &mut Writing) -> Result<usize> {
        match self.record_unrecorded(w) {
            Ok(n) => Ok(n),
            Err(e) => Err(w.abandon(e)),
        }
    }

    fn record_unrecorded(&self, w: &mut Writing) -> Result<usize> {
        let Some(p) = w.writer.as_mut() else {
            return Ok(0);
        };
        if w.unrecorded.is_empty() {
            return Ok(0);
        }
        let len = p.sync()?;
        crate::failpoint::hit("store.flush.packs-synced");
        self.catalog.record(p.id(), len, &w.unrecorded)?;
        let n = w.unrecorded.len();
        w.unrecorded.clear();
        Ok(n)
    }

    /// Seals the current pack: later appends go to a new one.
    pub fn seal(&self) -> Result<()> {
        self.seal_locked(&mut self.packs.writing())
    }

    fn seal_locked(&self, w: &mut Writing) -> Result<()> {
        self.flush_locked(w)?;
        if let Some(p) = w.writer.take()
            && p.is_empty()
        {
            self.drop_pack(p.id())?;
        }
        Ok(())
    }

    /// Reads a chunk's frame bytes from its pack, unverified.
    pub fn read_frame_at(&self, loc: Location) -> Result<Vec<u8>> {
        let mut frame = Vec::new();
        self.read_frame_into(loc, &mut frame)?;
        Ok(frame)
    }

    /// Reads the frame at `loc` into `buf`, resized to it, unverified.
    pub fn read_frame_into(&self, loc: Location, buf: &mut Vec<u8>) -> Result<()> {
        self.packs.read_frame_into(loc, buf)
    }

    /// Reads a chunk, decompresses it and checks its hash.
    pub fn read_chunk(&self, hash: &ChunkHash) -> Result<Vec<u8>> {
        let loc = self.locate(hash)?.with_context(|| {
            format!("chunk {hash} is not in the store: run `target-agent verify`")
        })?;
        let mut frame = Vec::new();
        self.read_frame_into(loc, &mut frame)?;
        // A damaged header leaves 0 here; decoding then names the damage.
        let raw_len = chunk::parse_header(&frame).map_or(0, |h| h.raw_len as usize);
        let mut raw = vec![0u8; raw_len];
        self.decode_chunk_into(hash, loc, &frame, &mut raw)?;
        Ok(raw)
    }

    // ----- recovery points --------------------------------------------------------------------

    /// Every group with at least one point.
    pub fn groups(&self) -> Result<Vec<String>> {
        let txn = self.db().begin_read()?;
        let t = txn.open_table(POINTS)?;
        let mut out: Vec<String> = Vec::new();
        for row in t.iter()? {
            let (k, _) = row?;
            let g = k.value().0.to_string();
            if out.last() != Some(&g) {
                out.push(g);
            }
        }
        Ok(out)
    }

    /// Points of a group, oldest first.
    pub fn points(&self, group: &str) -> Result<Vec<PointRecord>> {
        let txn = self.db().begin_read()?;
        let t = txn.open_table(POINTS)?;
        let mut out = Vec::new();
        for row in t.range((group, 0)..=(group, u64::MAX))? {
            out.push(PointRecord::decode(row?.1.value())?);
        }
        Ok(out)
    }

    /// One point.
    pub fn point(&self, group: &str, seq: u64) -> Result<Option<PointRecord>> {
        let txn = self.db().begin_read()?;
        let t = txn.open_table(POINTS)?;
        t.get((group, seq))?
            .map(|v| PointRecord::decode(v.value()))
            .transpose()
    }

    /// The group's latest point.
    pub fn latest(&self, group: &str) -> Result<Option<PointRecord>> {
        let txn = self.db().begin_read()?;
        let t = txn.open_table(POINTS)?;
        let last = t
            .range((group, 0)..=(group, u64::MAX))?
            .next_back()
            .transpose()?;
        last.map(|(_, v)| PointRecord::decode(v.value()))
            .transpose()
    }

    /// Commits a recovery point in one transaction: the point becomes visible together with all of
    /// its block-map entries, or not at all. `base` must be the group's latest point when the
    /// entries are a delta against it; `None` means the entries declare every block (a full offer).
    /// Entries equal to the latest point are dropped, so a full offer stores only what changed.
    /// A cut already committed (same cut id as the latest point) is returned as is.
    /// `final_for` names the pending migration this point ends (marked in the same transaction).
    pub fn commit_point(&self, req: CommitRequest<'_>) -> Result<PointRecord, CommitError> {
        let CommitRequest {
            group,
            cut,
            base,
            entries,
            received,
            committed_ms,
            final_for,
        } = req;
        self.flush()?;
        let txn = self.db().begin_write().map_err(anyhow::Error::from)?;
        let record = {
            let mut points = txn.open_table(POINTS).map_err(anyhow::Error::from)?;
            let latest = last_point(&points, group)?;
            if let Some(done) = already_committed(latest.as_ref(), cut, base)? {
                return Ok(done);
            }
            let latest_seq = latest.as_ref().map(|l| l.seq);
            check_entries(&txn, cut, entries)?;
            let changed = apply_entries(&txn, group, latest_seq, entries, base.is_none())
                .map_err(anyhow::Error::from)?;
            let record = PointRecord {
                group: group.to_string(),
                seq: latest_seq.unwrap_or(0) + 1,
                cut: cut.clone(),
                committed_ms,
                stats: PointStats {
                    blocks_changed: changed,
                    chunks_received: received.0,
                    bytes_received: received.1,
                },
            };
            points
                .insert((group, record.seq), record.encode().as_slice())
                .map_err(anyhow::Error::from)?;
            clear_receiving(&txn, group).map_err(anyhow::Error::from)?;
            parts::drop_parts(&txn, group).map_err(anyhow::Error::from)?;
            if let Some(id) = final_for {
                migration::mark_final(&txn, group, id, record.seq)?;
            }
            record
        };
        crate::failpoint::hit("store.commit.before");
        catalog::commit(txn).map_err(CommitError::Store)?;
        crate::failpoint::hit("store.commit.after");
        Ok(record)
    }

    /// Records, durably, that a session of `group` is storing chunks, before any of them is
    /// durable. A commit of the group clears the mark; while it stands, a transfer of the group
    /// broke (or is under way), and chunks it stored may be held without a point referencing
    /// them. The target then tells the next session not to push blindly, so that nothing
    /// durable is sent twice.
    pub fn mark_receiving(&self, group: &str, now_ms: i64) -> Result<()> {
        let txn = self.db().begin_write()?;
        txn.open_table(META)?
            .insert(receiving_key(group).as_str(), now_ms.max(0) as u64)?;
        catalog::commit(txn)
    }

    /// True while a transfer of `group` stored chunks and no point committed since.
    pub fn was_receiving(&self, group: &str) -> Result<bool> {
        let txn = self.db().begin_read()?;
        Ok(txn
            .open_table(META)?
            .get(receiving_key(group).as_str())?
            .is_some())
    }

    /// The full block map of a volume at a point.
    pub fn block_map(&self, group: &str, seq: u64, volume: &str) -> Result<BlockMap> {
        self.block_map_among(&self.points(group)?, group, seq, volume)
    }

    /// As [`Store::block_map`], with the group's points (oldest first) already loaded.
    pub fn block_map_among(
        &self,
        points: &[PointRecord],
        group: &str,
        seq: u64,
        volume: &str,
    ) -> Result<BlockMap> {
        let point = points.iter().find(|p| p.seq == seq).with_context(|| {
            format!(
                "group {group} has no recovery point {seq}: list them with `target-agent points`"
            )
        })?;
        let meta = point
            .cut
            .volume(volume)
            .with_context(|| format!("recovery point {seq} of {group} has no volume {volume}"))?;
        let blocks = block_count(meta.size, point.cut.block_size);
        let txn = self.db().begin_read()?;
        let heads = txn.open_table(HEADS)?;
        let mut head = Vec::new();
        for row in heads.range((group, volume, 0)..(group, volume, blocks))? {
            let (k, v) = row?;
            if let BlockRef::Data(h) = decode_ref(v.value())? {
                head.push((k.value().2, h));
            }
        }
        let undo = txn.open_table(UNDO)?;
        // map(P_k) = head overlaid with undo(P_{n-1}), then undo(P_{n-2}), ... down to undo(P_k):
        // the oldest overlay wins, so later inserts replace earlier ones. The overlay holds only
        // what changed since P_k.
        let mut changes = std::collections::BTreeMap::new();
        for older in points.iter().rev().filter(|p| p.seq >= seq).skip(1) {
            overlay(&undo, &mut changes, group, older.seq, volume, blocks)?;
        }
        let changes: Vec<_> = changes.into_iter().collect();
        Ok(BlockMap::from_sorted(head)?.apply(&changes))
    }

    /// Reads a point's manifest bundle (verifying every chunk and the bundle digest).
    pub fn read_manifests(&self, point: &PointRecord) -> Result<Vec<u8>> {
        let m = &point.cut.manifests;
        let mut out = Vec::with_capacity(m.len as usize);
        for h in &m.chunks {
            out.extend_from_slice(&self.read_chunk(h)?);
        }
        let digest = blake3::hash(&out).to_hex().to_string();
        anyhow::ensure!(
            out.len() as u64 == m.len && digest == m.digest,
            "manifest bundle of point {} does not match its digest: run `target-agent verify`",
            point.seq
        );
        Ok(out)
    }

    pub(crate) fn db(&self) -> &Database {
        self.catalog.db()
    }

    pub(crate) fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub(crate) fn packs(&self) -> &Packs {
        &self.packs
    }
}

/// The checks every store makes before committing `cut` as a delta against `base` (or as a full
/// offer when `None`) on top of the group's `latest` point: the same cut already committed is
/// returned (a retried commit is idempotent); a delta against another point is refused.
pub(crate) fn already_committed(
    latest: Option<&PointRecord>,
    cut: &CutMeta,
    base: Option<u64>,
) -> Result<Option<PointRecord>, CommitError> {
    if let Some(l) = latest
        && l.cut.cut_id == cut.cut_id
    {
        return Ok(Some(l.clone()));
    }
    let latest_seq = latest.map(|l| l.seq);
    if base.is_some() && base != latest_seq {
        return Err(CommitError::BaseMismatch {
            offered: base,
            latest: latest_seq,
        });
    }
    Ok(None)
}

fn last_point(
    points: &redb::Table<(&str, u64), &[u8]>,
    group: &str,
) -> Result<Option<PointRecord>> {
    let last = points
        .range((group, 0)..=(group, u64::MAX))?
        .next_back()
        .transpose()?;
    last.map(|(_, v)| PointRecord::decode(v.value()))
        .transpose()
}

fn decode_ref(b: &[u8]) -> Result<BlockRef> {
    BlockRef::from_bytes(b)
        .context("catalog holds a malformed block-map entry: run `target-agent verify`")
}

/// Adds point `seq`'s undo entries of `volume` (below `blocks`) to `changes`, replacing those
/// already there.
fn overlay(
    undo: &redb::ReadOnlyTable<(&str, u64, &str, u64), &[u8]>,
    changes: &mut std::collections::BTreeMap<u64, BlockRef>,
    group: &str,
    seq: u64,
    volume: &str,
    blocks: u64,
) -> Result<()> {
    for row in undo.range((group, seq, volume, 0)..(group, seq, volume, blocks))? {
        let (k, v) = row?;
        changes.insert(k.value().3, decode_ref(v.value())?);
    }
    Ok(())
}

/// Checks that entries fit their volumes and every chunk they (and the manifests) name is durable.
fn check_entries(
    txn: &redb::WriteTransaction,
    cut: &CutMeta,
    entries: &[VolumeEntries],
) -> Result<(), CommitError> {
    let chunks = txn.open_table(CHUNKS).map_err(anyhow::Error::from)?;
    let mut missing = Vec::new();
    let mut need = |h: &ChunkHash| -> Result<(), CommitError> {
        if chunks.get(h.0).map_err(anyhow::Error::from)?.is_none() {
            missing.push(*h);
        }
        Ok(())
    };
    for (volume, list) in entries {
        let meta = cut.volume(volume).with_context(|| {
            format!("entries name volume {volume}, which the cut does not declare")
        })?;
        let blocks = block_count(meta.size, cut.block_size);
        for (index, r) in list {
            if *index >= blocks {
                return Err(CommitError::EntryOutOfRange {
                    volume: volume.clone(),
                    index: *index,
                    blocks,
                });
            }
            if let BlockRef::Data(h) = r {
                need(h)?;
            }
        }
    }
    for h in &cut.manifests.chunks {
        need(h)?;
    }
    match missing.first() {
        Some(first) => Err(CommitError::MissingChunks {
            count: missing.len(),
            first: *first,
        }),
        None => Ok(()),
    }
}

/// Moves the head to the new map, recording what it replaced as the previous point's undo entries.
/// A full offer lists only data blocks: head rows it does not list become holes.
fn apply_entries(
    txn: &redb::WriteTransaction,
    group: &str,
    prev: Option<u64>,
    entries: &[VolumeEntries],
    full: bool,
) -> Result<u64, redb::Error> {
    let mut heads = txn.open_table(HEADS)?;
    let mut undo = txn.open_table(UNDO)?;
    let mut changed = 0;
    for (volume, list) in entries {
        let mut list = list.clone();
        if full {
            let listed: std::collections::HashSet<u64> = list.iter().map(|(i, _)| *i).collect();
            for row in
                heads.range((group, volume.as_str(), 0)..=(group, volume.as_str(), u64::MAX))?
            {
                let index = row?.0.value().2;
                if !listed.contains(&index) {
                    list.push((index, BlockRef::Hole));
                }
            }
        }
        for (index, new) in list {
            let key = (group, volume.as_str(), index);
            let old = heads
                .get(key)?
                .map(|v| v.value().to_vec())
                .unwrap_or_default();
            let new_bytes = new.to_bytes();
            if old == new_bytes {
                continue;
            }
            if let Some(p) = prev {
                undo.insert((group, p, volume.as_str(), index), old.as_slice())?;
            }
            match new {
                BlockRef::Hole => heads.remove(key)?.map(drop),
                BlockRef::Data(_) => heads.insert(key, new_bytes.as_slice())?.map(drop),
            };
            changed += 1;
        }
    }
    Ok(changed)
}

/// META key marking a transfer that stored chunks and has not committed yet: `scope` is a
/// group, or `<group>/<volume>` for a mover's part of it (names hold no `/`).
fn receiving_key(scope: &str) -> String {
    format!("receiving/{scope}")
}

/// Removes the receiving marks of `group` and of its parts (a commit of the group).
fn clear_receiving(txn: &redb::WriteTransaction, group: &str) -> Result<(), redb::Error> {
    let mut meta = txn.open_table(META)?;
    meta.remove(receiving_key(group).as_str())?;
    let parts = receiving_key(&format!("{group}/"));
    let end = receiving_key(&format!("{group}0")); // '0' follows '/'
    meta.retain_in(parts.as_str()..end.as_str(), |_, _| false)?;
    Ok(())
}
