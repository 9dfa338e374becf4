//! The archiver: behind the target's commits, copies the store into the bucket. A round seals
//! the pack being written and snapshots the catalog (a moment's lock, the only contact with
//! commits), uploads the packs the bucket lacks (resumable multipart), then the snapshot, then
//! its manifest; then applies the archive's own retention. Rounds run one at a time, every
//! `--archive-every`, and a failed round is logged, counted and tried again at the next. In an
//! encrypted archive each pack is sealed into a file beside the store before its upload (the
//! same bytes every time, so an interrupted upload resumes), and so is the snapshot.

use crate::bucket::Bucket;
use crate::layout::{self, Manifest};
use anyhow::{Context, Result};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use understudy_common::keys::{Kek, Keyring};
use understudy_common::metrics::Metrics;
use understudy_common::store::Store;
use understudy_common::store::pack::pack_path;
use understudy_common::store::snapshot::SnapshotSummary;

/// How the archive is kept.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Time between rounds.
    pub every: Duration,
    /// Snapshots kept in the bucket (the newest ones); packs no kept snapshot lists, and that
    /// the store no longer holds, are deleted.
    pub keep: usize,
    /// Snapshots older than this are deleted too (the newest is always kept).
    pub max_age: Option<Duration>,
}

/// The archiver of one store.
pub struct Archiver {
    store: Arc<Store>,
    bucket: Bucket,
    /// A directory for the snapshot file of a round (the agent's, beside the store).
    scratch: PathBuf,
    policy: Policy,
    metrics: Arc<Metrics>,
    /// The KEK of an encrypted archive.
    kek: Option<Kek>,
    /// Sealed sizes of packs, by (id, local length): what their objects' sizes must be.
    sealed_len: Mutex<HashMap<(u32, u64), u64>>,
    /// The key generations opened by earlier rounds (a round opens only new ones).
    keys: Mutex<Keyring>,
}

/// What a round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// The manifest written (its stamp); `None` when the bucket was already current.
    pub stamp: Option<String>,
    /// Points the archive holds after the round.
    pub points: usize,
    /// Packs uploaded.
    pub packs: u32,
    /// Bytes uploaded (packs and snapshot).
    pub bytes: u64,
    /// Objects the archive's retention deleted.
    pub deleted: usize,
}

impl Archiver {
    /// An archiver of `store` into `bucket`, encrypted when a `kek` is given.
    pub fn new(
        store: Arc<Store>,
        bucket: Bucket,
        scratch: PathBuf,
        policy: Policy,
        metrics: Arc<Metrics>,
        kek: Option<Kek>,
    ) -> Self {
        Archiver {
            store,
            bucket,
            scratch,
            policy,
            metrics,
            kek,
            sealed_len: Mutex::default(),
            keys: Mutex::default(),
        }
    }

    /// Runs rounds every `policy.every` until `stop` completes. `gate` is held shared while
    /// packs are read (garbage collection, which deletes packs, takes it alone).
    pub async fn run(
        &self,
        gate: &tokio::sync::RwLock<()>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(self.policy.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tick.tick() => {}
            }
            match self.round(gate).await {
                Ok(r) if r.stamp.is_some() => tracing::info!(
                    stamp = r.stamp.as_deref().unwrap_or_default(),
                    points = r.points,
                    packs = r.packs,
                    bytes = r.bytes,
                    deleted = r.deleted,
                    bucket = %self.bucket.describe(),
                    "archived a catalog snapshot"
                ),
                Ok(_) => {}
                Err(e) => {
                    self.metrics.archive_failures.inc();
                    tracing::warn!(error = %format!("{e:#}"), bucket = %self.bucket.describe(), "archive round failed; the next round tries again (what was uploaded is kept)");
                }
            }
        }
    }

    /// One round (see the module's doc).
    pub async fn round(&self, gate: &tokio::sync::RwLock<()>) -> Result<Round> {
        let newest = newest_manifest(&self.bucket).await?;
        // Listed every round: a generation made by `archive rotate-key` seals from the next one.
        let known = self.keys.lock().expect("lock").clone();
        let keys =
            crate::keys::for_writing(&self.bucket, self.kek.as_ref(), &known, newest.as_ref())
                .await?;
        if let Some(k) = &keys {
            *self.keys.lock().expect("lock") = k.clone();
        }
        let keys = keys.map(Arc::new);
        let tmp = self.scratch.join("archive-snapshot.tmp");
        let (sum, blake3, bytes) = self.snapshot(tmp.clone()).await?;
        let mut round = Round {
            points: sum.points.len(),
            ..Round::default()
        };
        if newest
            .as_ref()
            .is_some_and(|m| m.same_as(&sum.packs, &sum.points))
        {
            let _ = std::fs::remove_file(&tmp);
            self.caught_up();
            return Ok(round);
        }
        self.metrics
            .archive_points_behind
            .set(points_behind(&sum, newest.as_ref()) as i64);
        let in_bucket: HashMap<u32, u64> = self
            .bucket
            .list(layout::PACKS)
            .await?
            .into_iter()
            .filter_map(|o| Some((layout::pack_id(&o.name)?, o.size)))
            .collect();
        {
            let _shared = gate.read().await;
            let mut missing = Vec::new();
            for &(id, len) in &sum.packs {
                let object_len = self.object_len(keys.is_some(), id, len).await?;
                if in_bucket.get(&id) != Some(&object_len) {
                    missing.push((id, len, object_len));
                }
            }
            // Only the packs of this snapshot are asked again: forget the others.
            self.sealed_len
                .lock()
                .expect("lock")
                .retain(|key, _| sum.packs.contains(key));
            let behind = missing.iter().map(|(_, len, _)| len).sum::<u64>();
            self.metrics.archive_bytes_behind.set(behind as i64);
            for (id, len, object_len) in missing {
                let up = self
                    .upload_pack(keys.as_ref(), id, len, object_len)
                    .await
                    .with_context(|| format!("uploading pack {id}"))?;
                round.packs += 1;
                round.bytes += up.bytes_sent;
                self.metrics.archive_uploaded.inc_by(up.bytes_sent);
            }
        }
        let stamp = layout::stamp(understudy_common::now_ms());
        let (blake3, bytes) = match &keys {
            None => (blake3, bytes),
            Some(k) => self.seal_snapshot(k.clone(), &stamp, &tmp).await?,
        };
        let up = self
            .bucket
            .upload_file(&layout::snapshot_name(&stamp), &tmp, bytes)
            .await?;
        round.bytes += up.bytes_sent;
        self.metrics.archive_uploaded.inc_by(up.bytes_sent);
        let _ = std::fs::remove_file(&tmp);
        let manifest = Manifest {
            format: layout::MANIFEST_FORMAT,
            stamp: stamp.clone(),
            created_ms: understudy_common::now_ms(),
            snapshot_bytes: bytes,
            snapshot_blake3: blake3,
            packs: sum.packs.clone(),
            points: sum.points.clone(),
            key_generation: keys
                .as_ref()
                .and_then(|k| k.current())
                .map(|k| k.generation()),
        };
        let written = self
            .bucket
            .put_new(
                &layout::manifest_name(&stamp),
                serde_json::to_vec_pretty(&manifest)?,
            )
            .await?;
        anyhow::ensure!(
            written,
            "archive manifest {} already exists: is another target agent archiving into {}?",
            layout::manifest_name(&stamp),
            self.bucket.describe()
        );
        self.metrics
            .archive_last_success
            .set(manifest.created_ms as f64 / 1000.0);
        self.caught_up();
        round.deleted = self.retain().await?;
        round.stamp = Some(stamp);
        Ok(round)
    }

    /// Seals and snapshots the catalog into `tmp`: its summary, BLAKE3 and size.
    async fn snapshot(&self, tmp: PathBuf) -> Result<(SnapshotSummary, String, u64)> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let file = std::fs::File::create(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?;
            let mut hashing = Hashing {
                out: std::io::BufWriter::new(file),
                hash: blake3::Hasher::new(),
                len: 0,
            };
            let sum = store.snapshot_catalog(&mut hashing)?;
            use std::io::Write;
            hashing.out.flush()?;
            hashing.out.get_ref().sync_all()?;
            Ok((
                sum,
                hashing.hash.finalize().to_hex().to_string(),
                hashing.len,
            ))
        })
        .await?
    }

    /// The size pack `id` of `len` bytes has as an object: `len`, or sealed its sealed size
    /// (counted once from its frame headers, then remembered).
    async fn object_len(&self, sealed: bool, id: u32, len: u64) -> Result<u64> {
        if !sealed {
            return Ok(len);
        }
        if let Some(n) = self.sealed_len.lock().expect("lock").get(&(id, len)) {
            return Ok(*n);
        }
        let path = pack_path(&self.store.root().join("packs"), id);
        let n = tokio::task::spawn_blocking(move || crate::sealed::pack_sealed_len(&path, id, len))
            .await??;
        self.sealed_len.lock().expect("lock").insert((id, len), n);
        Ok(n)
    }

    /// Uploads pack `id` (its first `len` bytes), sealed into a file beside the store first in an
    /// encrypted archive.
    async fn upload_pack(
        &self,
        keys: Option<&Arc<Keyring>>,
        id: u32,
        len: u64,
        object_len: u64,
    ) -> Result<crate::bucket::Upload> {
        let path = pack_path(&self.store.root().join("packs"), id);
        let name = layout::pack_name(id);
        let Some(keys) = keys else {
            return self.bucket.upload_file(&name, &path, len).await;
        };
        let sealed = self.scratch.join("archive-pack.sealed");
        let (k, out) = (keys.clone(), sealed.clone());
        let n = tokio::task::spawn_blocking(move || {
            let key = k.current().expect("an encrypted archive has a generation");
            crate::sealed::seal_pack(key, id, &path, len, &out)
        })
        .await??;
        anyhow::ensure!(
            n == object_len,
            "pack {id} sealed into {n} bytes, its frames counted {object_len}: it changed while read"
        );
        let up = self.bucket.upload_file(&name, &sealed, n).await;
        let _ = std::fs::remove_file(&sealed);
        up
    }

    /// Seals the snapshot file `tmp` in place for `stamp`: its BLAKE3 and size sealed.
    async fn seal_snapshot(
        &self,
        keys: Arc<Keyring>,
        stamp: &str,
        tmp: &Path,
    ) -> Result<(String, u64)> {
        let (stamp, tmp) = (stamp.to_string(), tmp.to_path_buf());
        tokio::task::spawn_blocking(move || {
            let key = keys
                .current()
                .expect("an encrypted archive has a generation");
            let sealed = tmp.with_extension("sealed");
            let n = crate::sealed::seal_snapshot(key, &stamp, &tmp, &sealed)?;
            std::fs::rename(&sealed, &tmp)?;
            let mut h = blake3::Hasher::new();
            h.update_reader(std::fs::File::open(&tmp)?)?;
            Ok((h.finalize().to_hex().to_string(), n))
        })
        .await?
    }

    /// The lag gauges once the bucket holds what the store held at the round's start.
    fn caught_up(&self) {
        self.metrics.archive_points_behind.set(0);
        self.metrics.archive_bytes_behind.set(0);
    }

    /// The archive's retention: keeps the newest `keep` manifests (and their snapshots) that are
    /// not older than `max_age` (always the newest one), deletes older ones, snapshots with no manifest older than the newest manifest, packs no kept
    /// manifest lists that the store no longer holds, and unfinished uploads of those packs.
    /// Returns how many objects went.
    async fn retain(&self) -> Result<usize> {
        let catalog = self.bucket.list(layout::CATALOG).await?;
        let mut stamps: Vec<&str> = catalog
            .iter()
            .filter_map(|o| layout::manifest_stamp(&o.name))
            .collect();
        stamps.sort();
        let cut = retention_cut(&stamps, &self.policy, understudy_common::now_ms());
        let (old, kept) = stamps.split_at(cut);
        let mut deleted = 0;
        for s in old {
            // The manifest first: a snapshot without one is not in the archive.
            self.bucket.delete(&layout::manifest_name(s)).await?;
            self.bucket.delete(&layout::snapshot_name(s)).await?;
            deleted += 2;
        }
        let newest = kept.last().copied().unwrap_or_default();
        for o in &catalog {
            if let Some(s) = o
                .name
                .strip_prefix(layout::CATALOG)
                .and_then(|n| n.strip_suffix(".snap"))
                && s < newest
                && !kept.contains(&s)
                && !old.contains(&s)
            {
                self.bucket.delete(&o.name).await?;
                deleted += 1;
            }
        }
        let mut listed = HashSet::new();
        for s in kept {
            let name = layout::manifest_name(s);
            if let Some(b) = self.bucket.get(&name).await? {
                listed.extend(
                    Manifest::parse(&name, &b)?
                        .packs
                        .into_iter()
                        .map(|(id, _)| id),
                );
            }
        }
        let local: HashSet<u32> = self
            .store
            .committed_packs()?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let gone = |id: u32| !listed.contains(&id) && !local.contains(&id);
        for o in self.bucket.list(layout::PACKS).await? {
            if layout::pack_id(&o.name).is_some_and(gone) {
                self.bucket.delete(&o.name).await?;
                deleted += 1;
            }
        }
        for (name, id) in self.bucket.uploads(layout::PACKS).await? {
            if layout::pack_id(&name).is_some_and(gone) {
                self.bucket.abort(&name, &id).await?;
            }
        }
        Ok(deleted)
    }
}

/// Points of `sum` that `archived` does not hold.
fn points_behind(sum: &SnapshotSummary, archived: Option<&Manifest>) -> usize {
    let held: HashSet<_> = archived
        .iter()
        .flat_map(|m| m.points.iter().map(|p| (&p.group, p.seq)))
        .collect();
    sum.points
        .iter()
        .filter(|p| !held.contains(&(&p.group, p.seq)))
        .count()
}

/// The newest manifest in the bucket, if any (one LIST and one GET: names sort by time).
pub async fn newest_manifest(bucket: &Bucket) -> Result<Option<Manifest>> {
    let newest = bucket
        .list(layout::CATALOG)
        .await?
        .into_iter()
        .rfind(|o| layout::manifest_stamp(&o.name).is_some());
    let Some(o) = newest else {
        return Ok(None);
    };
    match bucket.get(&o.name).await? {
        Some(b) => Ok(Some(Manifest::parse(&o.name, &b)?)),
        None => Ok(None),
    }
}

/// Every manifest in the bucket, oldest first.
pub async fn manifests(bucket: &Bucket) -> Result<Vec<Manifest>> {
    let mut out = Vec::new();
    for o in bucket.list(layout::CATALOG).await? {
        if layout::manifest_stamp(&o.name).is_none() {
            continue;
        }
        if let Some(b) = bucket.get(&o.name).await? {
            out.push(Manifest::parse(&o.name, &b)?);
        }
    }
    Ok(out)
}

/// A writer that hashes and counts what goes through it.
struct Hashing<W> {
    out: W,
    hash: blake3::Hasher,
    len: u64,
}

impl<W: std::io::Write> std::io::Write for Hashing<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(b)?;
        self.hash.update(&b[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// How many of the oldest of `stamps` (sorted) the archive's retention deletes at `now_ms`:
/// those beyond the newest `keep`, and those older than `max_age`; never the newest.
fn retention_cut(stamps: &[&str], policy: &Policy, now_ms: i64) -> usize {
    let by_count = stamps.len().saturating_sub(policy.keep.max(1));
    let by_age = policy.max_age.map_or(0, |age| {
        let oldest_kept = layout::stamp(now_ms.saturating_sub(age.as_millis() as i64));
        stamps
            .iter()
            .take_while(|s| **s < oldest_kept.as_str())
            .count()
    });
    by_count.max(by_age).min(stamps.len().saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_keeps_the_newest_n_none_older_than_max_age_and_always_the_newest() {
        let stamps: Vec<String> = [1_000, 2_000, 3_000, 4_000].map(layout::stamp).to_vec();
        let s: Vec<&str> = stamps.iter().map(String::as_str).collect();
        let policy = |keep, age: Option<u64>| Policy {
            every: Duration::from_secs(1),
            keep,
            max_age: age.map(Duration::from_millis),
        };
        assert_eq!(retention_cut(&s, &policy(24, None), 5_000), 0);
        assert_eq!(retention_cut(&s, &policy(2, None), 5_000), 2);
        // 2.5 s at 5 s: the stamps before 2.5 s go.
        assert_eq!(retention_cut(&s, &policy(24, Some(2_500)), 5_000), 2);
        assert_eq!(retention_cut(&s, &policy(3, Some(2_500)), 5_000), 2);
        assert_eq!(retention_cut(&s, &policy(1, Some(2_500)), 5_000), 3);
        // Everything is old: the newest stays.
        assert_eq!(retention_cut(&s, &policy(24, Some(10)), 100_000), 3);
        assert_eq!(retention_cut(&[], &policy(1, Some(10)), 100_000), 0);
    }
}
