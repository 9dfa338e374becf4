//! The store after crashes and accidents: a torn pack tail is cut off on open, an empty pack is
//! collected, and a store whose catalog was lost keeps its packs (nothing deletes them).

use understudy_common::chunk;
use understudy_common::hash::ChunkHash;
use understudy_common::store::Store;

fn chunk_of(seed: u8) -> (ChunkHash, Vec<u8>) {
    let data: Vec<u8> = (0..65536u32)
        .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed))
        .collect();
    (ChunkHash::of(&data), chunk::encode(&data, 1))
}

/// Sizes of the pack files (not `packs/.high`, the id record beside them).
fn pack_sizes(dir: &std::path::Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(dir.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "pack"))
        .map(|p| p.metadata().unwrap().len())
        .collect();
    v.sort();
    v
}

#[test]
fn a_crash_before_the_first_flush_leaves_nothing_visible_and_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (durable, frame1) = chunk_of(1);
    let (lost, frame2) = chunk_of(2);
    {
        let store = Store::open(dir.path()).unwrap();
        store.append(durable, &frame1).unwrap();
        store.flush().unwrap();
        store.append(lost, &frame2).unwrap();
        // Dropped without flush: the process "died" with the second chunk only in a buffer or a torn tail.
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.missing(&[durable, lost]).unwrap(), vec![lost]);
    assert_eq!(store.read_chunk(&durable).unwrap().len(), 65536);
    // Nothing references the durable chunk either: gc collects it and the now-empty pack.
    let r = store.gc().unwrap();
    assert_eq!((r.chunks_removed, r.packs_deleted), (1, 1));
    assert!(pack_sizes(dir.path()).is_empty());
}

#[test]
fn a_lost_catalog_never_costs_the_packs() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        for s in 1..4 {
            let (h, f) = chunk_of(s);
            store.append(h, &f).unwrap();
        }
        store.flush().unwrap();
    }
    let before = pack_sizes(dir.path());
    std::fs::remove_file(dir.path().join("catalog.redb")).unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        pack_sizes(dir.path()),
        before,
        "opening must not delete packs it does not know"
    );
    let e = store.gc().unwrap_err();
    assert!(
        format!("{e:#}").contains("catalog may have been lost"),
        "{e:#}"
    );
    assert_eq!(
        pack_sizes(dir.path()),
        before,
        "gc must not delete them either"
    );
}
