//! What the in-memory session tests share: a fixed clock, a volume image in memory and its cut,
//! and reading maps back from either store.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use understudy_common::block_map::BlockMap;
use understudy_common::chunk;
use understudy_common::hash::{BlockRef, ChunkHash, VolumeDigest};
use understudy_common::protocol::session_store::MemoryStore;
use understudy_common::protocol::source_session::Offer;
use understudy_common::protocol::target_session::{FlushPolicy, TargetSession};
use understudy_common::protocol::{Control, OfferKind, SessionStore};
use understudy_common::store::{CutMeta, ManifestRef, Store, VolumeMeta};

/// A fixed clock: these tests do not depend on time unless they step [`NOW`].
pub(crate) fn clock() -> i64 {
    NOW.load(Ordering::SeqCst)
}
pub(crate) static NOW: AtomicI64 = AtomicI64::new(1_000);

/// A target session over `store` with the default flush policy.
pub(crate) fn target(store: &Arc<impl SessionStore + 'static>) -> TargetSession {
    TargetSession::new(store.clone(), FlushPolicy::default(), clock)
}

/// What a test reads back from either store.
pub(crate) trait Inspect: SessionStore + 'static {
    fn map(&self, group: &str, seq: u64, volume: &str) -> BlockMap;
}

impl Inspect for Store {
    fn map(&self, group: &str, seq: u64, volume: &str) -> BlockMap {
        self.block_map(group, seq, volume).unwrap()
    }
}

impl Inspect for MemoryStore {
    fn map(&self, group: &str, seq: u64, volume: &str) -> BlockMap {
        self.block_map(group, seq, volume).unwrap()
    }
}

pub(crate) const BS: u32 = 4096;

/// A volume image in memory, and its cut.
pub(crate) struct Image {
    pub(crate) blocks: Vec<Vec<u8>>,
}

impl Image {
    pub(crate) fn new(n: usize) -> Self {
        Image {
            blocks: vec![vec![0u8; BS as usize]; n],
        }
    }
    pub(crate) fn map(&self) -> BlockMap {
        let data = self
            .blocks
            .iter()
            .enumerate()
            .filter(|(_, b)| b.iter().any(|x| *x != 0))
            .map(|(i, b)| (i as u64, ChunkHash::of(b)))
            .collect();
        BlockMap::from_sorted(data).unwrap()
    }
    pub(crate) fn frames(&self) -> HashMap<ChunkHash, Vec<u8>> {
        self.blocks
            .iter()
            .filter(|b| b.iter().any(|x| *x != 0))
            .map(|b| (ChunkHash::of(b), chunk::encode(b, 1)))
            .collect()
    }
    pub(crate) fn offer(&self, id: &str, base: Option<(u64, &BlockMap)>) -> Offer {
        let map = self.map();
        let size = (self.blocks.len() as u64) * BS as u64;
        let entries: Vec<(u64, BlockRef)> = match base {
            None => BlockMap::new().changes_to(&map),
            Some((_, old)) => old.changes_to(&map),
        };
        Offer {
            kind: base.map_or(OfferKind::Full, |(s, _)| OfferKind::Delta { base: s }),
            cut: CutMeta {
                cut_id: id.into(),
                source: "sha256:test".into(),
                created_ms: 1,
                block_size: BS,
                volumes: vec![VolumeMeta {
                    name: "data".into(),
                    size,
                    digest: VolumeDigest::of_map(size, BS, &map),
                }],
                manifests: ManifestRef::default(),
            },
            entries: vec![entries],
            parts: None,
        }
    }
}

pub(crate) fn fill(img: &mut Image, range: std::ops::Range<usize>, seed: u8) {
    for i in range {
        let mut xof = blake3::Hasher::new()
            .update(&[seed])
            .update(&i.to_le_bytes())
            .finalize_xof();
        xof.fill(&mut img.blocks[i]);
    }
}

/// Hands messages to a target session; returns its replies (a commit's reply included).
pub(crate) fn deliver_all(t: &mut TargetSession, msgs: Vec<Control>) -> Vec<Control> {
    let mut out = Vec::new();
    for m in msgs {
        match t.on_message(m).expect("target accepts the message") {
            understudy_common::protocol::target_session::TargetStep::Reply(r) => out.extend(r),
            understudy_common::protocol::target_session::TargetStep::Committed(r) => out.push(r),
            other => panic!("unexpected {other:?}"),
        }
    }
    out
}
