//! Staged parts: volumes data movers wrote for a cut that the source has not committed yet
//! (protocol 4). Their chunks are durable and count as live for GC; their entries wait in the
//! catalog until the source's commit takes them, and every commit of the group drops the
//! group's parts, taken or not, in its own transaction.

use super::catalog::{PART_ENTRIES, PARTS};
use super::recovery_point::{PartHeader, StagedPart};
use super::{Store, decode_ref};
use crate::hash::BlockRef;
use anyhow::{Context, Result};
use redb::{ReadableDatabase, ReadableTable};

impl Store {
    /// Records a staged part durably (its chunks are flushed first), replacing one staged for
    /// the same group, stage and volume.
    pub fn stage_part(&self, group: &str, part: &StagedPart) -> Result<()> {
        self.flush()?;
        let txn = self.db().begin_write()?;
        {
            let name = part.volume.name.as_str();
            let key = (group, part.stage.as_str(), name);
            let header = PartHeader {
                volume: part.volume.clone(),
                block_size: part.block_size,
                base: part.base,
                entries: part.entries.len() as u64,
            };
            txn.open_table(PARTS)?
                .insert(key, postcard::to_allocvec(&header)?.as_slice())?;
            let mut rows = txn.open_table(PART_ENTRIES)?;
            rows.retain_in(
                (group, key.1, name, 0)..=(group, key.1, name, u64::MAX),
                |_, _| false,
            )?;
            for (index, r) in &part.entries {
                rows.insert((group, key.1, name, *index), r.to_bytes().as_slice())?;
            }
        }
        super::catalog::commit(txn)
    }

    /// The part staged for `group`, `stage` and `volume`, if any.
    pub fn staged_part(
        &self,
        group: &str,
        stage: &str,
        volume: &str,
    ) -> Result<Option<StagedPart>> {
        let txn = self.db().begin_read()?;
        let Some(header) = txn.open_table(PARTS)?.get((group, stage, volume))? else {
            return Ok(None);
        };
        let header: PartHeader = postcard::from_bytes(header.value()).context(
            "catalog holds a malformed staged part: it is dropped by the group's next commit",
        )?;
        let mut entries = Vec::with_capacity(header.entries as usize);
        let rows = txn.open_table(PART_ENTRIES)?;
        for row in rows.range((group, stage, volume, 0)..=(group, stage, volume, u64::MAX))? {
            let (k, v) = row?;
            entries.push((k.value().3, decode_ref(v.value())?));
        }
        Ok(Some(StagedPart {
            stage: stage.to_string(),
            volume: header.volume,
            block_size: header.block_size,
            base: header.base,
            entries,
        }))
    }

    /// Chunks staged parts reference (live for GC until the group's next commit).
    pub(crate) fn staged_chunks(
        &self,
        live: &mut std::collections::HashSet<[u8; 32]>,
    ) -> Result<()> {
        let txn = self.db().begin_read()?;
        for row in txn.open_table(PART_ENTRIES)?.iter()? {
            if let Some(BlockRef::Data(h)) = BlockRef::from_bytes(row?.1.value()) {
                live.insert(h.0);
            }
        }
        Ok(())
    }
}

/// Drops every staged part of `group` inside a commit's transaction.
pub(crate) fn drop_parts(txn: &redb::WriteTransaction, group: &str) -> Result<(), redb::Error> {
    let upper = format!("{group}\u{0}");
    txn.open_table(PARTS)?
        .retain_in((group, "", "")..(upper.as_str(), "", ""), |_, _| false)?;
    txn.open_table(PART_ENTRIES)?
        .retain_in((group, "", "", 0)..(upper.as_str(), "", "", 0), |_, _| {
            false
        })?;
    Ok(())
}
