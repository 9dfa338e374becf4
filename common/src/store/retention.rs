//! Retention (which points to keep) and garbage collection (dropping chunks no point references).

use super::Store;
use super::catalog::*;
use super::pack::Location;
use crate::hash::BlockRef;
use anyhow::{Context, Result};
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// Which points of a group to keep. A point is kept when any rule keeps it; the latest point is
/// always kept. With no rule, everything is kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Keep the newest N points.
    pub keep_last: Option<usize>,
    /// Keep points whose cut is younger than this.
    pub max_age: Option<Duration>,
}

impl RetentionPolicy {
    /// True when the policy never drops anything.
    pub fn keeps_all(&self) -> bool {
        self.keep_last.is_none() && self.max_age.is_none()
    }
}

/// Live chunks (hash, location) per pack id.
type PackUsage = HashMap<u32, Vec<([u8; 32], Location)>>;

/// A pack is rewritten once more than this share of its bytes is dead, so expired data leaves the
/// disk instead of lingering in mostly-live packs.
pub const COMPACT_DEAD_RATIO: f64 = 0.1;

/// What garbage collection did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// Chunks removed from the catalog.
    pub chunks_removed: u64,
    /// Pack files deleted (every chunk in them was dead).
    pub packs_deleted: u64,
    /// Pack files rewritten because most of their bytes were dead.
    pub packs_compacted: u64,
    /// Bytes of pack files freed on disk.
    pub bytes_freed: u64,
}

impl Store {
    /// Drops the points the policy does not keep, oldest first; returns the dropped sequence numbers.
    pub fn apply_retention(
        &self,
        group: &str,
        policy: RetentionPolicy,
        now_ms: i64,
    ) -> Result<Vec<u64>> {
        if policy.keeps_all() {
            return Ok(Vec::new());
        }
        let points = self.points(group)?;
        let n = points.len();
        let keep = |i: usize, created: i64| {
            let by_count = policy.keep_last.is_some_and(|k| n - i <= k.max(1));
            let by_age = policy
                .max_age
                .is_some_and(|a| now_ms - created <= a.as_millis() as i64);
            i + 1 == n || by_count || by_age
        };
        // Both rules keep a suffix of the list, so the dropped points are a prefix: dropping the
        // oldest point only deletes its undo rows.
        let drop: Vec<u64> = points
            .iter()
            .enumerate()
            .take_while(|(i, p)| !keep(*i, p.cut.created_ms))
            .map(|(_, p)| p.seq)
            .collect();
        if drop.is_empty() {
            return Ok(drop);
        }
        let txn = self.db().begin_write()?;
        {
            let mut pts = txn.open_table(POINTS)?;
            let mut undo = txn.open_table(UNDO)?;
            for seq in &drop {
                pts.remove((group, *seq))?;
                undo.retain_in(
                    (group, *seq, "", 0)..=(group, *seq, "\u{10FFFF}", u64::MAX),
                    |_, _| false,
                )?;
            }
        }
        txn.commit()
            .context("catalog commit failed while dropping expired points")?;
        Ok(drop)
    }

    /// Removes chunks no point references, deletes packs left with no live chunk and rewrites
    /// packs more than [`COMPACT_DEAD_RATIO`] dead. Must not run while a session appends to this store.
    pub fn gc(&self) -> Result<GcReport> {
        self.seal()?;
        let mut report = GcReport::default();
        self.remove_orphan_packs(&mut report)?;
        let live = self.live_chunks()?;
        let txn = self.db().begin_write()?;
        {
            let mut chunks = txn.open_table(CHUNKS)?;
            let before = chunks.len()?;
            chunks.retain(|h, _| live.contains(&h))?;
            report.chunks_removed = before - chunks.len()?;
        }
        txn.commit()?;
        crate::failpoint::hit("store.gc.chunks-removed");
        let usage = self.pack_usage()?;
        for (id, len) in self.committed_packs()? {
            let live_bytes = usage
                .get(&id)
                .map_or(0, |u| u.iter().map(|(_, l)| l.len as u64).sum());
            if live_bytes == 0 {
                self.drop_pack(id)?;
                report.packs_deleted += 1;
                report.bytes_freed += len;
            } else if (len - live_bytes) as f64 > COMPACT_DEAD_RATIO * len as f64 {
                self.compact_pack(id, &usage[&id])?;
                report.packs_compacted += 1;
                report.bytes_freed += len - live_bytes;
            }
        }
        self.seal()?;
        Ok(report)
    }

    /// Deletes pack files the catalog does not record. Refuses when the catalog records no pack at
    /// all while pack files exist: that is a lost or replaced catalog, not garbage.
    fn remove_orphan_packs(&self, report: &mut GcReport) -> Result<()> {
        let orphans = self.orphan_packs()?;
        if !orphans.is_empty() && self.committed_packs()?.is_empty() && self.groups()?.is_empty() {
            anyhow::bail!(
                "the catalog records no pack but {} pack file(s) exist in {}: the catalog may have been lost or replaced; \
                 not collecting anything. Restore the catalog, or move the packs away if they are truly unwanted",
                orphans.len(),
                self.root().join("packs").display()
            );
        }
        for id in orphans {
            let path = self.packs().path(id);
            report.bytes_freed += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot delete orphan pack {}", path.display()))?;
            report.packs_deleted += 1;
        }
        Ok(())
    }

    /// Every chunk some point references (heads, undo entries and manifests), and the chunks of
    /// staged parts.
    pub fn live_chunks(&self) -> Result<HashSet<[u8; 32]>> {
        let txn = self.db().begin_read()?;
        let mut live = HashSet::new();
        for row in txn.open_table(HEADS)?.iter()? {
            if let Some(BlockRef::Data(h)) = BlockRef::from_bytes(row?.1.value()) {
                live.insert(h.0);
            }
        }
        for row in txn.open_table(UNDO)?.iter()? {
            if let Some(BlockRef::Data(h)) = BlockRef::from_bytes(row?.1.value()) {
                live.insert(h.0);
            }
        }
        for row in txn.open_table(POINTS)?.iter()? {
            let p = super::PointRecord::decode(row?.1.value())?;
            live.extend(p.cut.manifests.chunks.iter().map(|h| h.0));
        }
        self.staged_chunks(&mut live)?;
        Ok(live)
    }

    /// Live chunks per pack.
    fn pack_usage(&self) -> Result<PackUsage> {
        let txn = self.db().begin_read()?;
        let mut usage: HashMap<u32, Vec<_>> = HashMap::new();
        for row in txn.open_table(CHUNKS)?.iter()? {
            let (k, v) = row?;
            let loc = location(v.value());
            usage.entry(loc.pack).or_default().push((k.value(), loc));
        }
        Ok(usage)
    }

    /// Forgets a pack in the catalog, then deletes its file.
    pub(crate) fn drop_pack(&self, id: u32) -> Result<()> {
        self.catalog().remove_pack(id)?;
        self.packs().remove(id)
    }

    /// Copies a pack's live chunks into the current pack, repoints the catalog, then deletes it.
    /// A crash before the catalog commit leaves the old pack in use; after it, an orphan the next
    /// open removes.
    fn compact_pack(&self, id: u32, live: &[([u8; 32], Location)]) -> Result<()> {
        for (h, loc) in live {
            let frame = self.read_frame_at(*loc)?;
            self.append(crate::hash::ChunkHash(*h), &frame)?;
        }
        self.flush()?;
        crate::failpoint::hit("store.compact.copied");
        self.drop_pack(id)
    }
}
