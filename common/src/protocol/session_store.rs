//! What a target session needs of the store, behind a small trait: the session machine does no
//! I/O of its own. [`Store`] implements it on disk; [`MemoryStore`] in memory, with failures a
//! test can inject (a full disk on append, a failed flush or commit).

use crate::block_map::BlockMap;
use crate::hash::{BlockRef, ChunkHash};
use crate::store::{
    CommitError, CommitRequest, CutMeta, Migration, PointRecord, PointStats, StagedPart, Store,
    VolumeEntries, already_committed,
};
use anyhow::Result;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

/// The store operations of a target session.
pub trait SessionStore: Send + Sync {
    /// The group's latest committed point.
    fn latest(&self, group: &str) -> Result<Option<PointRecord>>;
    /// True while a transfer of `scope` (a group, or `<group>/<volume>` for a mover's part)
    /// stored chunks and no point of the group committed since.
    fn was_receiving(&self, scope: &str) -> Result<bool>;
    /// Records durably, at `now_ms`, that a transfer of `scope` is storing chunks.
    fn mark_receiving(&self, scope: &str, now_ms: i64) -> Result<()>;
    /// The block map of `volume` at point `seq` of `group`; empty when the point has no such
    /// volume.
    fn volume_map(&self, group: &str, seq: u64, volume: &str) -> Result<BlockMap>;
    /// Records a mover's part durably, its chunks flushed first (see [`Store::stage_part`]).
    fn stage_part(&self, group: &str, part: &StagedPart) -> Result<()>;
    /// The part staged for `group`, `stage` and `volume`.
    fn staged_part(&self, group: &str, stage: &str, volume: &str) -> Result<Option<StagedPart>>;
    /// The hashes (of `hashes`) whose chunks are not durable in the store.
    fn missing(&self, hashes: &[ChunkHash]) -> Result<Vec<ChunkHash>>;
    /// Appends a verified chunk frame; durable at the next [`SessionStore::flush`].
    fn append(&self, hash: ChunkHash, frame: &[u8]) -> Result<()>;
    /// Makes every appended chunk durable; returns how many became durable.
    fn flush(&self) -> Result<usize>;
    /// Commits a recovery point atomically (see [`Store::commit_point`]).
    fn commit_point(&self, req: CommitRequest<'_>) -> Result<PointRecord, CommitError>;
    /// The group's planned migration, if one was asked (see [`Store::migration`]).
    fn migration(&self, group: &str) -> Result<Option<Migration>>;
}

impl SessionStore for Store {
    fn latest(&self, group: &str) -> Result<Option<PointRecord>> {
        Store::latest(self, group)
    }
    fn was_receiving(&self, scope: &str) -> Result<bool> {
        Store::was_receiving(self, scope)
    }
    fn mark_receiving(&self, scope: &str, now_ms: i64) -> Result<()> {
        Store::mark_receiving(self, scope, now_ms)
    }
    fn volume_map(&self, group: &str, seq: u64, volume: &str) -> Result<BlockMap> {
        let points = self.points(group)?;
        let has = points
            .iter()
            .any(|p| p.seq == seq && p.cut.volume(volume).is_some());
        if !has {
            return Ok(BlockMap::new());
        }
        self.block_map_among(&points, group, seq, volume)
    }
    fn stage_part(&self, group: &str, part: &StagedPart) -> Result<()> {
        Store::stage_part(self, group, part)
    }
    fn staged_part(&self, group: &str, stage: &str, volume: &str) -> Result<Option<StagedPart>> {
        Store::staged_part(self, group, stage, volume)
    }
    fn missing(&self, hashes: &[ChunkHash]) -> Result<Vec<ChunkHash>> {
        Store::missing(self, hashes)
    }
    fn append(&self, hash: ChunkHash, frame: &[u8]) -> Result<()> {
        Store::append(self, hash, frame)
    }
    fn flush(&self) -> Result<usize> {
        Store::flush(self)
    }
    fn commit_point(&self, req: CommitRequest<'_>) -> Result<PointRecord, CommitError> {
        Store::commit_point(self, req)
    }
    fn migration(&self, group: &str) -> Result<Option<Migration>> {
        Store::migration(self, group)
    }
}

/// A store operation a [`MemoryStore`] can be told to fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StoreOp {
    /// [`SessionStore::append`]
    Append,
    /// [`SessionStore::flush`]
    Flush,
    /// [`SessionStore::commit_point`]
    Commit,
    /// [`SessionStore::mark_receiving`]
    MarkReceiving,
    /// [`SessionStore::stage_part`]
    Stage,
}

/// A store in memory for session tests: chunks are durable once flushed, points keep their
/// block maps, and [`MemoryStore::fail`] makes an operation fail with a full disk.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Memory>,
}

#[derive(Default)]
struct Memory {
    durable: HashSet<ChunkHash>,
    appended: Vec<ChunkHash>,
    points: HashMap<String, Vec<(PointRecord, Vec<Map>)>>,
    receiving: HashSet<String>,
    parts: HashMap<(String, String, String), StagedPart>,
    migrations: HashMap<String, Migration>,
    failing: HashMap<StoreOp, u32>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the next `times` calls of `op` fail as a full disk would (ENOSPC).
    pub fn fail(&self, op: StoreOp, times: u32) {
        self.lock().failing.insert(op, times);
    }

    /// Chunks made durable so far.
    pub fn durable(&self) -> usize {
        self.lock().durable.len()
    }

    /// Asks for a migration of `group` under `id` (as [`Store::request_migration`]).
    pub fn request_migration(&self, group: &str, id: &str) {
        self.lock().migrations.insert(
            group.to_string(),
            Migration {
                id: id.to_string(),
                requested_ms: 0,
                final_seq: None,
            },
        );
    }

    /// Forgets what was appended and not flushed, as a crash of the target would.
    pub fn crash(&self) {
        self.lock().appended.clear();
    }

    /// Staged parts held (of every group).
    pub fn staged(&self) -> usize {
        self.lock().parts.len()
    }

    /// The block map of `volume` at point `seq` of `group`.
    pub fn block_map(&self, group: &str, seq: u64, volume: &str) -> Result<BlockMap> {
        let m = self.lock();
        let (rec, maps) = m
            .points
            .get(group)
            .and_then(|p| p.iter().find(|(r, _)| r.seq == seq))
            .ok_or_else(|| anyhow::anyhow!("no point {seq} in group {group}"))?;
        let i = rec
            .cut
            .volumes
            .iter()
            .position(|v| v.name == volume)
            .ok_or_else(|| anyhow::anyhow!("point {seq} has no volume {volume}"))?;
        BlockMap::from_sorted(maps[i].iter().map(|(k, h)| (*k, *h)).collect())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.inner.lock().expect("memory store lock")
    }

    fn check(m: &mut Memory, op: StoreOp) -> Result<()> {
        if let Some(n) = m.failing.get_mut(&op)
            && *n > 0
        {
            *n -= 1;
            return Err(
                anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::StorageFull))
                    .context(format!("injected failure of {op:?}")),
            );
        }
        Ok(())
    }
}

impl SessionStore for MemoryStore {
    fn latest(&self, group: &str) -> Result<Option<PointRecord>> {
        let m = self.lock();
        Ok(m.points
            .get(group)
            .and_then(|p| p.last())
            .map(|(r, _)| r.clone()))
    }

    fn was_receiving(&self, scope: &str) -> Result<bool> {
        Ok(self.lock().receiving.contains(scope))
    }

    fn mark_receiving(&self, scope: &str, _now_ms: i64) -> Result<()> {
        let mut m = self.lock();
        Self::check(&mut m, StoreOp::MarkReceiving)?;
        m.receiving.insert(scope.to_string());
        Ok(())
    }

    fn volume_map(&self, group: &str, seq: u64, volume: &str) -> Result<BlockMap> {
        let m = self.lock();
        let point = m
            .points
            .get(group)
            .and_then(|p| p.iter().find(|(r, _)| r.seq == seq))
            .ok_or_else(|| anyhow::anyhow!("no point {seq} in group {group}"))?;
        BlockMap::from_sorted(previous(Some(point), volume).into_iter().collect())
    }

    fn stage_part(&self, group: &str, part: &StagedPart) -> Result<()> {
        self.flush()?;
        let mut m = self.lock();
        Self::check(&mut m, StoreOp::Stage)?;
        let key = (
            group.to_string(),
            part.stage.clone(),
            part.volume.name.clone(),
        );
        m.parts.insert(key, part.clone());
        Ok(())
    }

    fn staged_part(&self, group: &str, stage: &str, volume: &str) -> Result<Option<StagedPart>> {
        let key = (group.to_string(), stage.to_string(), volume.to_string());
        Ok(self.lock().parts.get(&key).cloned())
    }

    fn missing(&self, hashes: &[ChunkHash]) -> Result<Vec<ChunkHash>> {
        let m = self.lock();
        Ok(hashes
            .iter()
            .filter(|h| !m.durable.contains(h))
            .copied()
            .collect())
    }

    fn append(&self, hash: ChunkHash, _frame: &[u8]) -> Result<()> {
        let mut m = self.lock();
        Self::check(&mut m, StoreOp::Append)?;
        m.appended.push(hash);
        Ok(())
    }

    fn flush(&self) -> Result<usize> {
        let mut m = self.lock();
        if let Err(e) = Self::check(&mut m, StoreOp::Flush) {
            // Like the disk store: what was not recorded is given up and received again.
            m.appended.clear();
            return Err(e);
        }
        let new: Vec<ChunkHash> = std::mem::take(&mut m.appended);
        let n = new.len();
        m.durable.extend(new);
        Ok(n)
    }

    fn commit_point(&self, req: CommitRequest<'_>) -> Result<PointRecord, CommitError> {
        let (group, cut, base, received) = (req.group, req.cut, req.base, req.received);
        self.flush()?;
        let mut m = self.lock();
        Self::check(&mut m, StoreOp::Commit)?;
        let latest = m.points.get(group).and_then(|p| p.last()).cloned();
        if let Some(done) = already_committed(latest.as_ref().map(|(l, _)| l), cut, base)? {
            return Ok(done);
        }
        let latest_seq = latest.as_ref().map(|(l, _)| l.seq);
        let (maps, blocks_changed) =
            memory_maps(&m, cut, latest.as_ref(), req.entries, base.is_none())?;
        let record = PointRecord {
            group: group.to_string(),
            seq: latest_seq.unwrap_or(0) + 1,
            cut: cut.clone(),
            committed_ms: req.committed_ms,
            stats: PointStats {
                blocks_changed,
                chunks_received: received.0,
                bytes_received: received.1,
            },
        };
        m.points
            .entry(group.to_string())
            .or_default()
            .push((record.clone(), maps));
        let parts = format!("{group}/");
        m.receiving.retain(|s| s != group && !s.starts_with(&parts));
        m.parts.retain(|(g, _, _), _| g != group);
        if let Some(mig) = m.migrations.get_mut(group)
            && req
                .final_for
                .is_some_and(|id| id == mig.id && mig.pending())
        {
            mig.final_seq = Some(record.seq);
        }
        Ok(record)
    }

    fn migration(&self, group: &str) -> Result<Option<Migration>> {
        Ok(self.lock().migrations.get(group).cloned())
    }
}

type Map = BTreeMap<u64, ChunkHash>;

/// The block map volume `name` had at point `latest` (empty when it had none).
fn previous(latest: Option<&(PointRecord, Vec<Map>)>, name: &str) -> Map {
    latest
        .and_then(|(rec, maps)| {
            let i = rec.cut.volumes.iter().position(|o| o.name == name)?;
            maps.get(i).cloned()
        })
        .unwrap_or_default()
}

/// The new point's block maps (the latest point's with the entries applied, or the entries
/// alone for a full offer) and how many blocks differ from the latest point. Refuses entries
/// past a volume's end or naming chunks that are not durable, as the disk store does.
fn memory_maps(
    m: &Memory,
    cut: &CutMeta,
    latest: Option<&(PointRecord, Vec<Map>)>,
    entries: &[VolumeEntries],
    full: bool,
) -> Result<(Vec<Map>, u64), CommitError> {
    if let Some((name, _)) = entries.iter().find(|(n, _)| cut.volume(n).is_none()) {
        return Err(CommitError::Store(anyhow::anyhow!(
            "entries name volume {name}, which the cut does not declare"
        )));
    }
    let mut missing: Vec<ChunkHash> = Vec::new();
    let mut maps = Vec::new();
    let mut changed = 0u64;
    for meta in &cut.volumes {
        let blocks = crate::hash::block_count(meta.size, cut.block_size);
        let before = previous(latest, &meta.name);
        let mut map = if full { Map::new() } else { before.clone() };
        map.retain(|i, _| *i < blocks);
        let listed = entries.iter().filter(|(n, _)| *n == meta.name);
        for (index, r) in listed.flat_map(|(_, l)| l) {
            if *index >= blocks {
                return Err(CommitError::EntryOutOfRange {
                    volume: meta.name.clone(),
                    index: *index,
                    blocks,
                });
            }
            match r {
                BlockRef::Data(h) => {
                    map.insert(*index, *h);
                }
                BlockRef::Hole => {
                    map.remove(index);
                }
            }
        }
        missing.extend(map.values().filter(|h| !m.durable.contains(h)));
        let gone = before.keys().filter(|k| !map.contains_key(k)).count();
        let new = map.iter().filter(|(k, h)| before.get(k) != Some(h)).count();
        changed += (gone + new) as u64;
        maps.push(map);
    }
    missing.extend(
        cut.manifests
            .chunks
            .iter()
            .filter(|h| !m.durable.contains(h)),
    );
    if let Some(first) = missing.first() {
        return Err(CommitError::MissingChunks {
            count: missing.len(),
            first: *first,
        });
    }
    Ok((maps, changed))
}
