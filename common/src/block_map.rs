//! Block maps: which chunk each block of a volume holds at a recovery point, sparse.
//!
//! A [`BlockMap`] lists the volume's data blocks in increasing index order, each with the hash
//! of its bytes; a block it does not list is a hole (all zero). Its cost is that of the data
//! blocks: a 1 TiB volume holding 64 MiB of data is 1,024 entries at 64 KiB blocks, whatever
//! its capacity. What one point changes against the previous one is a list of
//! [`BlockChange`]s, also in index order; a block it does not list is unchanged, so runs of
//! unchanged blocks cost nothing either.
//!
//! Where a map is large (a source's base, the target's heads), it stays on disk in a redb table
//! of the same form (index -> hash, data blocks only) and is read as an ordered stream; the
//! functions here work on such streams as well as on maps in memory.

use crate::hash::{BlockRef, ChunkHash};
use serde::{Deserialize, Serialize};

/// One entry of a change list: block `index` now holds `block` (a hole or a chunk).
pub type BlockChange = (u64, BlockRef);

/// A volume's data blocks in increasing index order; unlisted blocks are holes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockMap {
    data: Vec<(u64, ChunkHash)>,
}

impl BlockMap {
    /// An empty map: every block a hole.
    pub fn new() -> Self {
        Self::default()
    }

    /// A map from data entries in strictly increasing index order (checked).
    pub fn from_sorted(data: Vec<(u64, ChunkHash)>) -> anyhow::Result<Self> {
        anyhow::ensure!(
            data.windows(2).all(|w| w[0].0 < w[1].0),
            "block map entries are not in increasing block order"
        );
        Ok(BlockMap { data })
    }

    /// Number of data blocks.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when every block is a hole.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The data blocks, in index order.
    pub fn data(&self) -> &[(u64, ChunkHash)] {
        &self.data
    }

    /// What block `index` holds.
    pub fn get(&self, index: u64) -> BlockRef {
        match self.data.binary_search_by_key(&index, |(i, _)| *i) {
            Ok(at) => BlockRef::Data(self.data[at].1),
            Err(_) => BlockRef::Hole,
        }
    }

    /// This map with `changes` (strictly increasing indices) applied, in one merge.
    pub fn apply(&self, changes: &[BlockChange]) -> BlockMap {
        let mut out = Vec::with_capacity(self.data.len() + changes.len());
        let mut ch = changes.iter().copied().peekable();
        let push = |out: &mut Vec<(u64, ChunkHash)>, i, b| {
            if let BlockRef::Data(h) = b {
                out.push((i, h));
            }
        };
        for &(i, h) in &self.data {
            while let Some((ci, cb)) = ch.next_if(|(ci, _)| *ci < i) {
                push(&mut out, ci, cb);
            }
            match ch.next_if(|(ci, _)| *ci == i) {
                Some((_, cb)) => push(&mut out, i, cb),
                None => out.push((i, h)),
            }
        }
        for (ci, cb) in ch {
            push(&mut out, ci, cb);
        }
        BlockMap { data: out }
    }

    /// The changes that turn `self` into `next` (both complete maps), in index order.
    pub fn changes_to(&self, next: &BlockMap) -> Vec<BlockChange> {
        let mut out = Vec::new();
        merge_maps(
            self.data.iter().copied(),
            next.data.iter().copied(),
            |i, old, new| {
                if old != new {
                    out.push((i, new));
                }
            },
        );
        out
    }
}

/// Walks two maps (data entries in index order) together and calls `f(index, old, new)` for
/// every index that is data in either.
fn merge_maps(
    old: impl Iterator<Item = (u64, ChunkHash)>,
    new: impl Iterator<Item = (u64, ChunkHash)>,
    mut f: impl FnMut(u64, BlockRef, BlockRef),
) {
    let (mut old, mut new) = (old.peekable(), new.peekable());
    loop {
        let (o, n) = (old.peek().copied(), new.peek().copied());
        let (take_old, take_new) = match (o, n) {
            (None, None) => return,
            (Some((oi, _)), Some((ni, _))) => (oi <= ni, ni <= oi),
            (o, n) => (o.is_some(), n.is_some()),
        };
        let index = if take_old {
            o.map(|(i, _)| i)
        } else {
            n.map(|(i, _)| i)
        };
        let data = |e: Option<(u64, ChunkHash)>, taken: bool| match e {
            Some((_, h)) if taken => BlockRef::Data(h),
            _ => BlockRef::Hole,
        };
        f(
            index.unwrap_or_default(),
            data(o, take_old),
            data(n, take_new),
        );
        if take_old {
            old.next();
        }
        if take_new {
            new.next();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h(n: u8) -> ChunkHash {
        ChunkHash([n; 32])
    }

    #[test]
    fn holes_cost_nothing_and_changes_apply() {
        let m =
            BlockMap::new().apply(&[(5, BlockRef::Data(h(2))), (1 << 40, BlockRef::Data(h(1)))]);
        assert_eq!(m.len(), 2);
        assert_eq!(m.get(5), BlockRef::Data(h(2)));
        assert_eq!(m.get(6), BlockRef::Hole);
        let m = m.apply(&[(5, BlockRef::Hole)]);
        assert_eq!(m.data(), &[(1 << 40, h(1))]);
        assert!(BlockMap::from_sorted(vec![(2, h(1)), (2, h(2))]).is_err());
    }

    fn map_strategy() -> impl Strategy<Value = BlockMap> {
        proptest::collection::btree_map(0u64..200, 0u8..4, 0..60).prop_map(|m| {
            BlockMap::from_sorted(m.into_iter().map(|(i, v)| (i, h(v))).collect()).unwrap()
        })
    }

    proptest! {
        #[test]
        fn changes_to_then_apply_gives_the_new_map(a in map_strategy(), b in map_strategy()) {
            let changes = a.changes_to(&b);
            prop_assert!(changes.windows(2).all(|w| w[0].0 < w[1].0));
            prop_assert_eq!(a.apply(&changes), b.clone());
            // Applying them one at a time agrees with the merge.
            let mut c = a.clone();
            for change in &changes {
                c = c.apply(std::slice::from_ref(change));
            }
            prop_assert_eq!(c, b);
        }
    }
}
