//! Fetch sessions (protocol 5): a writer reads one volume of one committed point from the target,
//! to rebuild it somewhere else (a volume populator's pod writing a PVC, or `target-agent
//! write`). Both ends are here, free of I/O:
//!
//! - the target's side ([`admit`], [`header`], [`entry_messages`]): a writer may only fetch what
//!   its grant names; it is told the volume (size, block size, the source's digest), then the
//!   volume's data blocks in block order, and the agent sends each entry's chunk frame, in the
//!   same order, on one data stream (holes are never sent);
//! - the writer's ([`FetchReceiver`]): it pairs the k-th frame with the k-th entry, decodes it,
//!   checks its hash against the entry (a chunk the point does not hold at that block is refused,
//!   naming the point, volume and byte offset), tells the caller where to write it, and at the
//!   end checks that the entries it received make the digest the source declared.
//!
//! The caller then reads back what it wrote and compares that digest too, so a volume is declared
//! rebuilt only from the bytes on it.
//!
//! A **basis fetch** (protocol 7, failback) is for a writer whose device already holds an earlier
//! copy of the volume (the old primary's): after each batch of entries the target waits for the
//! writer's `Want`, the positions of the entries whose block the device does not hold
//! ([`FetchReceiver::offered`], [`FetchReceiver::want`]; the target checks it with [`picked`]),
//! and sends only those frames. Only the blocks that differ travel; the digest checks are the
//! same.

use super::messages::{Control, ENTRIES_PER_MESSAGE};
use super::source_session::SessionError;
use crate::block_map::BlockMap;
use crate::chunk;
use crate::hash::{ChunkHash, VolumeDigest, block_count, block_len};
use crate::store::PointRecord;
use crate::transport::grants::FetchGrant;
use std::collections::VecDeque;

/// What a writer asked to read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchRequest {
    /// The group.
    pub group: String,
    /// The point.
    pub seq: u64,
    /// The volume.
    pub volume: String,
    /// The writer holds an earlier copy and picks the frames it needs (protocol 7).
    pub basis: bool,
}

/// Checks a writer's first message against its grant; returns what it reads.
pub fn admit(grant: &FetchGrant, first: Control) -> Result<FetchRequest, SessionError> {
    let Control::Fetch {
        group,
        seq,
        volume,
        basis,
    } = first
    else {
        return Err(SessionError::Unexpected {
            got: first.name(),
            state: "awaiting a writer's Fetch",
        });
    };
    if (&grant.group, grant.seq, &grant.volume) != (&group, seq, &volume) {
        return Err(SessionError::Invalid(format!(
            "this writer may read volume {} of point {} of group {}, not volume {volume} of point {seq} of group {group}",
            grant.volume, grant.seq, grant.group
        )));
    }
    Ok(FetchRequest {
        group,
        seq,
        volume,
        basis,
    })
}

/// The positions a writer's `Want` picks out of a batch of `batch` entries: increasing, each
/// inside the batch.
pub fn picked(batch: usize, want: Control) -> Result<Vec<usize>, SessionError> {
    let Control::Want { picks } = want else {
        return Err(SessionError::Unexpected {
            got: want.name(),
            state: "awaiting a writer's Want",
        });
    };
    positions(batch, &picks)
}

/// `picks` as positions in a batch of `batch` entries: increasing, each inside the batch.
fn positions(batch: usize, picks: &[u32]) -> Result<Vec<usize>, SessionError> {
    let mut last = None;
    let mut out = Vec::with_capacity(picks.len());
    for &p in picks {
        let p = p as usize;
        if last.is_some_and(|l| p <= l) || p >= batch {
            return Err(SessionError::Invalid(format!(
                "the writer wants entry {p} of a batch of {batch}, out of order or outside it"
            )));
        }
        last = Some(p);
        out.push(p);
    }
    Ok(out)
}

/// The `Volume` message for `volume` of `point`; an error when the point has no such volume.
pub fn header(point: &PointRecord, volume: &str) -> Result<Control, SessionError> {
    let meta = point.cut.volume(volume).ok_or_else(|| {
        SessionError::Invalid(format!(
            "point {} of group {} has no volume {volume}",
            point.seq, point.group
        ))
    })?;
    Ok(Control::Volume {
        size: meta.size,
        block_size: point.cut.block_size,
        digest: meta.digest.clone(),
        created_ms: point.cut.created_ms,
    })
}

/// The map's data entries as `BaseEntries` messages, then `BaseEnd`.
pub fn entry_messages(map: &BlockMap) -> impl Iterator<Item = Control> + '_ {
    let data = map.data();
    data.chunks(ENTRIES_PER_MESSAGE)
        .map(|c| Control::BaseEntries {
            entries: c.to_vec(),
        })
        .chain(std::iter::once(Control::BaseEnd {
            entries: data.len() as u64,
        }))
}

/// What a writer was told about the volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeHeader {
    /// Size in bytes.
    pub size: u64,
    /// Block size.
    pub block_size: u32,
    /// The digest the source declared at the cut.
    pub digest: String,
    /// The cut's instant (ms since the Unix epoch).
    pub created_ms: i64,
}

/// Why a fetch failed, naming what failed: the point, the volume and, for a block, its offset.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FetchError {
    /// The target refused.
    #[error("the target refused to send volume {volume} of point {seq}: {message}")]
    Refused {
        seq: u64,
        volume: String,
        message: String,
    },
    /// A message out of place or malformed.
    #[error("volume {volume} of point {seq}: protocol violation: {what}")]
    Protocol {
        seq: u64,
        volume: String,
        what: String,
    },
    /// A chunk that is damaged, or not the one the point holds at that block.
    #[error(
        "volume {volume} of point {seq}, block at byte {offset}: {what}; nothing of this volume may be used: check the store with `target-agent verify`"
    )]
    BadChunk {
        seq: u64,
        volume: String,
        offset: u64,
        what: String,
    },
    /// The entries do not make the volume the source declared.
    #[error(
        "volume {volume} of point {seq}: the blocks sent make digest {actual}, the source declared {expected}"
    )]
    Digest {
        seq: u64,
        volume: String,
        expected: String,
        actual: String,
    },
}

/// The writer's side of a fetch session.
pub struct FetchReceiver {
    group: String,
    seq: u64,
    volume: String,
    header: Option<VolumeHeader>,
    /// Entries received whose frames have not come yet.
    pending: VecDeque<(u64, ChunkHash)>,
    /// A basis fetch: the writer picks the frames it needs.
    basis: bool,
    /// A basis fetch's batch awaiting the writer's [`FetchReceiver::want`].
    offered: Vec<(u64, ChunkHash)>,
    /// Blocks the writer's copy held already (a basis fetch).
    matched: u64,
    /// The last entry's block index.
    last: Option<u64>,
    entries: u64,
    frames: u64,
    bytes: u64,
    /// `Some(n)` once `BaseEnd { entries: n }` came.
    end: Option<u64>,
    digest: Option<VolumeDigest>,
}

/// Where to write a decoded block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockWrite {
    /// Block index.
    pub index: u64,
    /// Byte offset on the volume.
    pub offset: u64,
}

/// A finished fetch, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// What the target said of the volume.
    pub header: VolumeHeader,
    /// Data blocks written.
    pub blocks: u64,
    /// Bytes of data written (holes not counted).
    pub bytes: u64,
    /// Data blocks the writer's copy held already and were not sent (a basis fetch).
    pub matched: u64,
}

impl FetchReceiver {
    /// A receiver for `volume` of point `seq` of `group`, and the message that opens the
    /// session.
    pub fn new(group: &str, seq: u64, volume: &str) -> (Self, Control) {
        Self::open(group, seq, volume, false)
    }

    /// A receiver for a writer whose device holds an earlier copy of the volume: it is offered
    /// each batch of entries and picks the ones it needs (protocol 7).
    pub fn with_basis(group: &str, seq: u64, volume: &str) -> (Self, Control) {
        Self::open(group, seq, volume, true)
    }

    fn open(group: &str, seq: u64, volume: &str, basis: bool) -> (Self, Control) {
        let r = FetchReceiver {
            group: group.into(),
            seq,
            volume: volume.into(),
            header: None,
            pending: VecDeque::new(),
            basis,
            offered: Vec::new(),
            matched: 0,
            last: None,
            entries: 0,
            frames: 0,
            bytes: 0,
            end: None,
            digest: None,
        };
        let hello = Control::Fetch {
            group: group.into(),
            seq,
            volume: volume.into(),
            basis,
        };
        (r, hello)
    }

    /// The volume, once the target said what it is.
    pub fn header(&self) -> Option<&VolumeHeader> {
        self.header.as_ref()
    }

    /// True when a frame can only be placed after more control messages (entries or the end).
    pub fn wants_entries(&self) -> bool {
        self.pending.is_empty() && self.offered.is_empty() && self.end.is_none()
    }

    /// True once every entry was announced and every frame placed.
    pub fn complete(&self) -> bool {
        self.end.is_some() && self.pending.is_empty() && self.offered.is_empty()
    }

    /// A basis fetch's batch of entries awaiting the writer's choice (empty otherwise).
    pub fn offered(&self) -> &[(u64, ChunkHash)] {
        &self.offered
    }

    /// The writer's choice for the offered batch: `picks` are the positions (increasing) of the
    /// entries its copy does not hold, whose frames come next. Returns the `Want` to send.
    pub fn want(&mut self, picks: Vec<u32>) -> Result<Control, FetchError> {
        let chosen =
            positions(self.offered.len(), &picks).map_err(|e| self.protocol(format!("{e}")))?;
        let offered = std::mem::take(&mut self.offered);
        self.matched += (offered.len() - chosen.len()) as u64;
        self.pending.extend(chosen.into_iter().map(|p| offered[p]));
        Ok(Control::Want { picks })
    }

    fn protocol(&self, what: impl Into<String>) -> FetchError {
        FetchError::Protocol {
            seq: self.seq,
            volume: self.volume.clone(),
            what: what.into(),
        }
    }

    /// Takes a control message of the target.
    pub fn on_message(&mut self, msg: Control) -> Result<(), FetchError> {
        match (msg, &self.header) {
            (Control::Refused { message, .. }, _) => Err(FetchError::Refused {
                seq: self.seq,
                volume: self.volume.clone(),
                message,
            }),
            (
                Control::Volume {
                    size,
                    block_size,
                    digest,
                    created_ms,
                },
                None,
            ) => {
                crate::check_block_size(block_size).map_err(|e| self.protocol(format!("{e:#}")))?;
                self.digest = Some(VolumeDigest::new(size, block_size));
                self.header = Some(VolumeHeader {
                    size,
                    block_size,
                    digest,
                    created_ms,
                });
                Ok(())
            }
            (Control::BaseEntries { .. }, Some(_)) if !self.offered.is_empty() => {
                Err(self.protocol("a batch of entries before the writer chose from the last one"))
            }
            (Control::BaseEntries { entries }, Some(h)) if self.end.is_none() => {
                let blocks = block_count(h.size, h.block_size);
                for (index, hash) in entries {
                    if self.last.is_some_and(|l| index <= l) || index >= blocks {
                        return Err(self.protocol(format!(
                            "entry for block {index} is out of order or past the volume's {blocks} blocks"
                        )));
                    }
                    self.last = Some(index);
                    self.entries += 1;
                    self.digest
                        .as_mut()
                        .expect("set with the header")
                        .push(index, &hash);
                    if self.basis {
                        self.offered.push((index, hash));
                    } else {
                        self.pending.push_back((index, hash));
                    }
                }
                Ok(())
            }
            (Control::BaseEnd { entries }, Some(_)) if self.end.is_none() => {
                if entries != self.entries {
                    return Err(self.protocol(format!(
                        "the target announced {entries} entries and sent {}",
                        self.entries
                    )));
                }
                self.end = Some(entries);
                Ok(())
            }
            (m, _) => Err(self.protocol(format!("unexpected {}", m.name()))),
        }
    }

    /// Takes the next chunk frame of the data stream: decodes it into `buf` (resized to the
    /// block), checks it is the chunk the point holds at the next entry's block, and says where
    /// to write it.
    pub fn on_frame(&mut self, frame: &[u8], buf: &mut Vec<u8>) -> Result<BlockWrite, FetchError> {
        let h = self
            .header
            .as_ref()
            .ok_or_else(|| self.protocol("a chunk before the volume's header"))?;
        let (size, bs) = (h.size, h.block_size);
        let Some((index, want)) = self.pending.pop_front() else {
            return Err(self.protocol("a chunk beyond the announced entries"));
        };
        let offset = index * bs as u64;
        let bad = |what: String| FetchError::BadChunk {
            seq: self.seq,
            volume: self.volume.clone(),
            offset,
            what,
        };
        buf.resize(block_len(size, bs, index) as usize, 0);
        let got = chunk::decode_into(frame, buf).map_err(|e| bad(e.to_string()))?;
        if got.hash != want {
            return Err(bad(format!(
                "the target sent chunk {}, the point holds {}",
                got.hash.short(),
                want.short()
            )));
        }
        self.frames += 1;
        self.bytes += buf.len() as u64;
        Ok(BlockWrite { index, offset })
    }

    /// The error for a frame that could not even be read off the data stream (its header is
    /// damaged): it names the block the next entry is for.
    pub fn unreadable_frame(&self, e: chunk::FrameError) -> FetchError {
        match (self.pending.front(), &self.header) {
            (Some((index, _)), Some(h)) => FetchError::BadChunk {
                seq: self.seq,
                volume: self.volume.clone(),
                offset: index * h.block_size as u64,
                what: e.to_string(),
            },
            _ => self.protocol(format!("a frame beyond the announced entries: {e}")),
        }
    }

    /// Ends the fetch after the data stream ended: every announced entry must have had its frame,
    /// and the entries must make the digest the source declared.
    pub fn finish(&mut self) -> Result<Fetched, FetchError> {
        if !self.complete() {
            return Err(self.protocol(format!(
                "the data ended after {} of {} chunks",
                self.frames,
                self.end.map_or("?".into(), |n| n.to_string())
            )));
        }
        let h = self.header.clone().expect("complete implies a header");
        let actual = self.digest.take().expect("set with the header").finish();
        if actual != h.digest {
            return Err(FetchError::Digest {
                seq: self.seq,
                volume: self.volume.clone(),
                expected: h.digest,
                actual,
            });
        }
        Ok(Fetched {
            header: h,
            blocks: self.frames,
            bytes: self.bytes,
            matched: self.matched,
        })
    }

    /// The group it fetches from.
    pub fn group(&self) -> &str {
        &self.group
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{CutMeta, ManifestRef, PointStats, VolumeMeta};

    const BS: u32 = 4096;

    fn block(b: u8) -> Vec<u8> {
        vec![b; BS as usize]
    }

    /// A point of one volume of `blocks` blocks whose data blocks are `data`, and its map.
    fn point(blocks: u64, data: &[(u64, u8)]) -> (PointRecord, BlockMap, Vec<Vec<u8>>) {
        let mut entries = Vec::new();
        let mut frames = Vec::new();
        for (i, b) in data {
            let raw = block(*b);
            entries.push((*i, ChunkHash::of(&raw)));
            frames.push(chunk::encode(&raw, 1));
        }
        let map = BlockMap::from_sorted(entries).unwrap();
        let size = blocks * BS as u64;
        let cut = CutMeta {
            cut_id: "c1".into(),
            source: "sha256:00".into(),
            created_ms: 7,
            block_size: BS,
            volumes: vec![VolumeMeta {
                name: "data".into(),
                size,
                digest: VolumeDigest::of_map(size, BS, &map),
            }],
            manifests: ManifestRef::default(),
        };
        let p = PointRecord {
            group: "app".into(),
            seq: 3,
            cut,
            committed_ms: 8,
            stats: PointStats::default(),
        };
        (p, map, frames)
    }

    fn grant() -> FetchGrant {
        FetchGrant {
            group: "app".into(),
            seq: 3,
            volume: "data".into(),
            expires_ms: i64::MAX,
        }
    }

    /// Blocks written: (index, bytes).
    type Written = Vec<(u64, Vec<u8>)>;

    /// Runs a fetch of the point through both ends; returns the blocks written, by index.
    fn run(
        p: &PointRecord,
        map: &BlockMap,
        frames: &[Vec<u8>],
    ) -> Result<(Fetched, Written), FetchError> {
        let (mut rx, hello) = FetchReceiver::new("app", 3, "data");
        admit(&grant(), hello).unwrap();
        rx.on_message(header(p, "data").unwrap())?;
        for m in entry_messages(map) {
            rx.on_message(m)?;
        }
        let mut written = Vec::new();
        let mut buf = Vec::new();
        for f in frames {
            let w = rx.on_frame(f, &mut buf)?;
            written.push((w.index, buf.clone()));
        }
        Ok((rx.finish()?, written))
    }

    #[test]
    fn a_volume_arrives_block_by_block_and_holes_are_never_sent() {
        let (p, map, frames) = point(100, &[(0, 1), (5, 2), (99, 1)]);
        let (done, written) = run(&p, &map, &frames).unwrap();
        assert_eq!(done.blocks, 3);
        assert_eq!(done.bytes, 3 * BS as u64);
        assert_eq!(done.header.digest, p.cut.volumes[0].digest);
        let idx: Vec<u64> = written.iter().map(|(i, _)| *i).collect();
        assert_eq!(idx, vec![0, 5, 99]);
        assert_eq!(written[1].1, block(2));
    }

    #[test]
    fn a_writer_reads_only_what_its_grant_names() {
        let other = Control::Fetch {
            group: "app".into(),
            seq: 2,
            volume: "data".into(),
            basis: false,
        };
        let e = admit(&grant(), other).unwrap_err();
        assert!(e.to_string().contains("not volume data of point 2"), "{e}");
        let hello = Control::Hello {
            group: "app".into(),
        };
        assert!(matches!(
            admit(&grant(), hello),
            Err(SessionError::Unexpected { got: "Hello", .. })
        ));
        let (p, _, _) = point(4, &[]);
        assert!(header(&p, "logs").is_err());
    }

    #[test]
    fn a_damaged_chunk_is_refused_with_its_offset() {
        let (p, map, mut frames) = point(10, &[(2, 1), (7, 2)]);
        let last = frames[1].len() - 1;
        frames[1][last] ^= 0xff;
        let e = run(&p, &map, &frames).unwrap_err();
        match &e {
            FetchError::BadChunk { seq, offset, .. } => {
                assert_eq!((*seq, *offset), (3, 7 * BS as u64));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            e.to_string()
                .contains("volume data of point 3, block at byte 28672"),
            "{e}"
        );
    }

    #[test]
    fn a_frame_that_cannot_be_read_names_the_block_it_was_for() {
        let (p, map, _) = point(10, &[(2, 1), (7, 2)]);
        let (mut rx, _) = FetchReceiver::new("app", 3, "data");
        rx.on_message(header(&p, "data").unwrap()).unwrap();
        for m in entry_messages(&map) {
            rx.on_message(m).unwrap();
        }
        let e = rx.unreadable_frame(chunk::FrameError::BadMagic);
        assert!(
            matches!(e, FetchError::BadChunk { offset: 8192, .. }),
            "{e}"
        );
    }

    #[test]
    fn a_chunk_at_the_wrong_block_is_refused() {
        let (p, map, mut frames) = point(10, &[(2, 1), (7, 2)]);
        frames.swap(0, 1);
        let e = run(&p, &map, &frames).unwrap_err();
        assert!(
            matches!(e, FetchError::BadChunk { offset, .. } if offset == 2 * BS as u64),
            "{e}"
        );
    }

    #[test]
    fn missing_or_extra_chunks_and_bad_entries_fail() {
        let (p, map, frames) = point(10, &[(2, 1), (7, 2)]);
        // One frame short: the fetch does not finish.
        let e = run(&p, &map, &frames[..1]).unwrap_err();
        assert!(e.to_string().contains("after 1 of 2 chunks"), "{e}");
        // One frame too many.
        let mut more = frames.clone();
        more.push(frames[0].clone());
        assert!(run(&p, &map, &more).is_err());
        // Entries out of order or past the end.
        for bad in [
            vec![(3, ChunkHash::of(b"x")), (3, ChunkHash::of(b"y"))],
            vec![(10, ChunkHash::of(b"x"))],
        ] {
            let (mut rx, _) = FetchReceiver::new("app", 3, "data");
            rx.on_message(header(&p, "data").unwrap()).unwrap();
            let e = rx
                .on_message(Control::BaseEntries { entries: bad })
                .unwrap_err();
            assert!(e.to_string().contains("out of order or past"), "{e}");
        }
        // A count that does not match.
        let (mut rx, _) = FetchReceiver::new("app", 3, "data");
        rx.on_message(header(&p, "data").unwrap()).unwrap();
        assert!(rx.on_message(Control::BaseEnd { entries: 1 }).is_err());
        // A chunk before the header.
        let (mut rx, _) = FetchReceiver::new("app", 3, "data");
        assert!(rx.on_frame(&frames[0], &mut Vec::new()).is_err());
    }

    #[test]
    fn entries_that_do_not_make_the_declared_digest_fail() {
        let (mut p, map, frames) = point(10, &[(2, 1)]);
        p.cut.volumes[0].digest = "0".repeat(64);
        let e = run(&p, &map, &frames).unwrap_err();
        assert!(matches!(e, FetchError::Digest { .. }), "{e}");
    }

    /// Runs a basis fetch: the writer's copy holds `have` (block index -> byte); the target
    /// sends the frames the writer picks. Returns the fetch and the blocks written.
    fn run_basis(
        p: &PointRecord,
        map: &BlockMap,
        frames: &[Vec<u8>],
        have: &[(u64, u8)],
    ) -> Result<(Fetched, Written), FetchError> {
        let (mut rx, hello) = FetchReceiver::with_basis("app", 3, "data");
        assert!(admit(&grant(), hello).unwrap().basis);
        rx.on_message(header(p, "data").unwrap())?;
        let mut written = Vec::new();
        let mut buf = Vec::new();
        let mut sent = 0;
        for m in entry_messages(map) {
            rx.on_message(m)?;
            let batch = rx.offered().to_vec();
            if batch.is_empty() {
                continue;
            }
            let picks: Vec<u32> = (0..batch.len() as u32)
                .filter(|&k| {
                    let (index, hash) = batch[k as usize];
                    have.iter()
                        .find(|(i, _)| *i == index)
                        .is_none_or(|(_, b)| ChunkHash::of(&block(*b)) != hash)
                })
                .collect();
            // The target's side: the frames of the picked entries, in order.
            let positions = picked(batch.len(), rx.want(picks)?).unwrap();
            for k in positions {
                let w = rx.on_frame(&frames[sent + k], &mut buf)?;
                written.push((w.index, buf.clone()));
            }
            sent += batch.len();
        }
        Ok((rx.finish()?, written))
    }

    #[test]
    fn a_basis_fetch_sends_only_the_blocks_the_writer_lacks() {
        let (p, map, frames) = point(100, &[(0, 1), (5, 2), (9, 3), (99, 1)]);
        // The writer's copy: block 0 right, 5 different, 9 right, 99 missing.
        let (done, written) = run_basis(&p, &map, &frames, &[(0, 1), (5, 7), (9, 3)]).unwrap();
        assert_eq!((done.blocks, done.matched), (2, 2));
        let idx: Vec<u64> = written.iter().map(|(i, _)| *i).collect();
        assert_eq!(idx, vec![5, 99]);
        assert_eq!(written[0].1, block(2));
        assert_eq!(done.header.digest, p.cut.volumes[0].digest);
        // A copy that already holds the point: nothing travels, and the digest still checks.
        let all = [(0, 1), (5, 2), (9, 3), (99, 1)];
        let (done, written) = run_basis(&p, &map, &frames, &all).unwrap();
        assert_eq!((done.blocks, done.matched, written.len()), (0, 4, 0));
        // A damaged frame of a picked block is refused as in a full fetch.
        let mut bad = frames.clone();
        let last = bad[1].len() - 1;
        bad[1][last] ^= 0xff;
        let e = run_basis(&p, &map, &bad, &[]).unwrap_err();
        assert!(
            matches!(e, FetchError::BadChunk { offset, .. } if offset == 5 * BS as u64),
            "{e}"
        );
    }

    #[test]
    fn a_want_out_of_order_or_outside_its_batch_is_refused() {
        for bad in [vec![1, 1], vec![2, 1], vec![3]] {
            let e = picked(3, Control::Want { picks: bad }).unwrap_err();
            assert!(e.to_string().contains("out of order or outside"), "{e}");
        }
        assert_eq!(
            picked(3, Control::Want { picks: vec![0, 2] }).unwrap(),
            vec![0, 2]
        );
        assert!(matches!(
            picked(3, Control::BaseEnd { entries: 3 }),
            Err(SessionError::Unexpected { got: "BaseEnd", .. })
        ));
        // The writer's side: a second batch before its choice is a protocol violation.
        let (p, map, _) = point(10, &[(2, 1)]);
        let (mut rx, _) = FetchReceiver::with_basis("app", 3, "data");
        rx.on_message(header(&p, "data").unwrap()).unwrap();
        let mut msgs = entry_messages(&map);
        rx.on_message(msgs.next().unwrap()).unwrap();
        assert!(!rx.wants_entries() && !rx.complete());
        let again = Control::BaseEntries {
            entries: vec![(5, ChunkHash::of(b"x"))],
        };
        assert!(rx.on_message(again).is_err());
    }

    #[test]
    fn a_refusal_names_the_volume_and_point() {
        let (mut rx, _) = FetchReceiver::new("app", 3, "data");
        let e = rx
            .on_message(Control::Refused {
                code: super::super::RefuseCode::StoreFailed,
                message: "point 3 of group app is gone".into(),
            })
            .unwrap_err();
        assert!(e.to_string().contains("volume data of point 3"), "{e}");
    }
}
