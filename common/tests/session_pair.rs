//! The source and target session state machines driven against each other in memory (no
//! sockets), over a real store in a temporary directory: full sync, delta, dedupe, a session
//! broken mid-transfer and resumed without resending durable chunks, base mismatch, idempotent
//! re-commit, and bad input from the peer.

use std::collections::HashMap;
use std::sync::Arc;
use understudy_common::block_map::BlockMap;
use understudy_common::chunk;
use understudy_common::hash::{BlockRef, ChunkHash, VolumeDigest};
use understudy_common::protocol::source_session::{Offer, SourceSession, SourceStep};
use understudy_common::protocol::target_session::{TargetSession, TargetStep};
use understudy_common::protocol::{Control, OfferKind};
use understudy_common::store::{CutMeta, ManifestRef, Store, VolumeMeta};

const BS: u32 = 4096;

/// A volume image in memory, and its cut.
struct Image {
    blocks: Vec<Vec<u8>>,
}

impl Image {
    fn new(n: usize) -> Self {
        Image {
            blocks: vec![vec![0u8; BS as usize]; n],
        }
    }
    fn map(&self) -> BlockMap {
        let data = self
            .blocks
            .iter()
            .enumerate()
            .filter(|(_, b)| b.iter().any(|x| *x != 0))
            .map(|(i, b)| (i as u64, ChunkHash::of(b)))
            .collect();
        BlockMap::from_sorted(data).unwrap()
    }
    fn frames(&self) -> HashMap<ChunkHash, Vec<u8>> {
        self.blocks
            .iter()
            .filter(|b| b.iter().any(|x| *x != 0))
            .map(|b| (ChunkHash::of(b), chunk::encode(b, 1)))
            .collect()
    }
    fn offer(&self, id: &str, base: Option<(u64, &BlockMap)>) -> Offer {
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
        }
    }
}

/// Outcome of one in-memory session.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Committed { seq: u64, sent: usize },
    Broken { sent: usize },
    Step(String),
}

/// Runs a session; `break_after` stops delivering chunks after that many (the link broke).
fn run(
    store: &Arc<Store>,
    offer: Offer,
    frames: &HashMap<ChunkHash, Vec<u8>>,
    break_after: Option<usize>,
) -> Outcome {
    let (mut src, hello) = SourceSession::new("app", offer);
    let mut tgt = TargetSession::new(store.clone());
    let mut to_target = vec![hello];
    loop {
        let mut to_source = Vec::new();
        let mut commit_wanted = false;
        for m in to_target.drain(..) {
            match tgt
                .on_message(m)
                .expect("target accepts a well-formed session")
            {
                TargetStep::Reply(r) => to_source.extend(r),
                TargetStep::CommitWhenDrained { .. } => commit_wanted = true,
            }
        }
        if commit_wanted {
            to_source.push(tgt.commit().expect("commit"));
        }
        for m in to_source {
            match src
                .on_message(m)
                .expect("source accepts the target's replies")
            {
                SourceStep::Send(out) => to_target.extend(out),
                SourceStep::SendChunks(hashes) => {
                    for (n, h) in hashes.iter().enumerate() {
                        if break_after == Some(n) {
                            store.flush().unwrap();
                            return Outcome::Broken { sent: n };
                        }
                        let v = chunk::verify(frames[h].clone()).unwrap();
                        tgt.on_chunk(&v).unwrap();
                    }
                    to_target.push(src.commit(1, hashes.len() as u64));
                    SENT.with(|s| s.set(hashes.len()));
                }
                SourceStep::Committed { seq, .. } => {
                    return Outcome::Committed {
                        seq,
                        sent: SENT.with(|s| s.get()),
                    };
                }
                other => return Outcome::Step(format!("{other:?}")),
            }
        }
    }
}

thread_local!(static SENT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) });

fn fill(img: &mut Image, range: std::ops::Range<usize>, seed: u8) {
    for i in range {
        let mut xof = blake3::Hasher::new()
            .update(&[seed])
            .update(&i.to_le_bytes())
            .finalize_xof();
        xof.fill(&mut img.blocks[i]);
    }
}

#[test]
fn full_then_delta_then_resume_without_resending() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let mut img = Image::new(64);
    fill(&mut img, 0..40, 1);
    let o = run(&store, img.offer("c1", None), &img.frames(), None);
    assert_eq!(o, Outcome::Committed { seq: 1, sent: 40 });
    assert_eq!(store.block_map("app", 1, "data").unwrap(), img.map());

    // Delta: 5 blocks change, one becomes a hole; only the 5 new chunks travel.
    let base = img.map();
    fill(&mut img, 10..15, 9);
    img.blocks[20] = vec![0; BS as usize];
    let o = run(
        &store,
        img.offer("c2", Some((1, &base))),
        &img.frames(),
        None,
    );
    assert_eq!(o, Outcome::Committed { seq: 2, sent: 5 });
    assert_eq!(store.block_map("app", 2, "data").unwrap(), img.map());
    assert_eq!(
        store.block_map("app", 1, "data").unwrap(),
        base,
        "older point still restores"
    );

    // Broken after 12 of 30 chunks, then resumed: only the other 18 are sent again.
    let base2 = img.map();
    fill(&mut img, 30..60, 77);
    let offer = img.offer("c3", Some((2, &base2)));
    assert_eq!(
        run(&store, offer.clone(), &img.frames(), Some(12)),
        Outcome::Broken { sent: 12 }
    );
    assert_eq!(
        store.latest("app").unwrap().unwrap().seq,
        2,
        "no half point is visible"
    );
    assert_eq!(
        run(&store, offer, &img.frames(), None),
        Outcome::Committed { seq: 3, sent: 18 }
    );
    assert_eq!(store.block_map("app", 3, "data").unwrap(), img.map());
}

#[test]
fn stale_base_and_repeated_cut_are_recognised() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let mut img = Image::new(8);
    fill(&mut img, 0..8, 3);
    let offer = img.offer("c1", None);
    run(&store, offer.clone(), &img.frames(), None);
    assert_eq!(
        run(&store, offer, &img.frames(), None),
        Outcome::Step("AlreadyCommitted { seq: 1 }".into())
    );
    let stale = img.offer("c9", Some((7, &img.map())));
    assert_eq!(
        run(&store, stale, &img.frames(), None),
        Outcome::Step("BaseMismatch { latest: Some(1) }".into())
    );
}

#[test]
fn full_offer_turns_unlisted_blocks_into_holes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let mut img = Image::new(16);
    fill(&mut img, 0..16, 5);
    run(&store, img.offer("c1", None), &img.frames(), None);
    for b in &mut img.blocks[4..12] {
        b.fill(0);
    }
    // The source lost its base: a full offer, nothing new to send, 8 blocks now holes.
    let o = run(&store, img.offer("c2", None), &img.frames(), None);
    assert_eq!(o, Outcome::Committed { seq: 2, sent: 0 });
    assert_eq!(store.block_map("app", 2, "data").unwrap(), img.map());
}

#[test]
fn target_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let mut t = TargetSession::new(store.clone());
    assert!(
        t.on_message(Control::Commit {
            data_streams: 1,
            chunks: 0
        })
        .is_err(),
        "commit before hello"
    );
    let mut t = TargetSession::new(store.clone());
    assert!(
        t.on_message(Control::Hello {
            group: "../etc".into()
        })
        .is_err(),
        "bad group name"
    );
    let mut t = TargetSession::new(store.clone());
    t.on_message(Control::Hello {
        group: "app".into(),
    })
    .unwrap();
    let mut img = Image::new(4);
    fill(&mut img, 0..4, 1);
    let mut offer = img.offer("c1", None);
    t.on_message(Control::Offer {
        kind: offer.kind,
        cut: offer.cut.clone(),
    })
    .unwrap();
    let e = t
        .on_message(Control::Entries {
            volume: 0,
            entries: vec![(99, BlockRef::Hole)],
        })
        .unwrap_err();
    assert!(e.to_string().contains("past the end"), "{e}");
    // A chunk nobody asked for is refused and not stored.
    let mut t = TargetSession::new(store.clone());
    t.on_message(Control::Hello {
        group: "app".into(),
    })
    .unwrap();
    offer.entries[0].truncate(1);
    t.on_message(Control::Offer {
        kind: offer.kind,
        cut: offer.cut.clone(),
    })
    .unwrap();
    t.on_message(Control::Entries {
        volume: 0,
        entries: offer.entries[0].clone(),
    })
    .unwrap();
    t.on_message(Control::OfferEnd { entries: 1 }).unwrap();
    let stray = chunk::verify(chunk::encode(&[9u8; 100], 1)).unwrap();
    assert!(t.on_chunk(&stray).is_err());
    store.flush().unwrap();
    assert_eq!(store.missing(&[stray.hash()]).unwrap(), vec![stray.hash()]);
}

/// Hands `msgs` to the target; returns its replies (a commit request is not expected here).
fn deliver(t: &mut TargetSession, msgs: Vec<Control>) -> Vec<Control> {
    let mut out = Vec::new();
    for m in msgs {
        match t.on_message(m).expect("target accepts the message") {
            TargetStep::Reply(r) => out.extend(r),
            other => panic!("unexpected {other:?}"),
        }
    }
    out
}

#[test]
fn pushed_chunks_are_held_and_not_asked_for_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let mut img = Image::new(48);
    fill(&mut img, 0..40, 4);
    let frames = img.frames();
    let offer = img.offer("c1", None);
    let order: Vec<ChunkHash> = offer.entries[0]
        .iter()
        .filter_map(|(_, b)| match b {
            BlockRef::Data(h) => Some(*h),
            BlockRef::Hole => None,
        })
        .collect();

    // Hello and Welcome come before the cut exists.
    let (mut src, hello) = SourceSession::pushing("app");
    let mut tgt = TargetSession::new(store.clone());
    let welcome = deliver(&mut tgt, vec![hello]);
    for m in welcome {
        assert_eq!(src.on_message(m).unwrap(), SourceStep::Send(vec![]));
    }
    assert!(src.awaits_cut());
    // 30 chunks are pushed while the cut is made.
    for h in &order[..30] {
        tgt.on_pushed(&chunk::verify(frames[h].clone()).unwrap())
            .unwrap();
    }
    // The cut is done: PushEnd and the offer go out while one push stream is still draining.
    let SourceStep::Send(msgs) = src.set_offer(offer, 1, 31).unwrap() else {
        panic!("the offer is sent")
    };
    assert!(matches!(
        msgs[0],
        Control::PushEnd {
            streams: 1,
            chunks: 31
        }
    ));
    assert_eq!(
        deliver(&mut tgt, msgs),
        vec![],
        "the answer waits for the push stream"
    );
    // The last pushed chunk arrives, then the stream ends: now the target answers.
    tgt.on_pushed(&chunk::verify(frames[&order[30]].clone()).unwrap())
        .unwrap();
    let TargetStep::Reply(needs) = tgt.on_push_stream_end().unwrap() else {
        panic!("needs")
    };
    assert_eq!(
        needs.last(),
        Some(&Control::NeedEnd {
            needed: 9,
            held: 31
        })
    );
    let mut sent = 0;
    for m in needs {
        if let SourceStep::SendChunks(hashes) = src.on_message(m).unwrap() {
            for h in &hashes {
                tgt.on_chunk(&chunk::verify(frames[h].clone()).unwrap())
                    .unwrap();
            }
            sent = hashes.len();
            let commit = src.commit(1, hashes.len() as u64);
            assert!(matches!(
                tgt.on_message(commit).unwrap(),
                TargetStep::CommitWhenDrained { .. }
            ));
        }
    }
    assert_eq!(sent, 9, "only the chunks not pushed travel after the offer");
    let committed = tgt.commit().unwrap();
    assert!(matches!(
        src.on_message(committed).unwrap(),
        SourceStep::Committed { seq: 1, .. }
    ));
    assert_eq!(store.block_map("app", 1, "data").unwrap(), img.map());
    // A push once the offer was answered is a protocol violation.
    let late = chunk::verify(frames[&order[0]].clone()).unwrap();
    assert!(tgt.on_pushed(&late).is_err());
}

#[test]
fn a_pushed_chunk_the_offer_does_not_reference_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let mut img = Image::new(4);
    fill(&mut img, 0..4, 6);
    let mut tgt = TargetSession::new(store.clone());
    deliver(
        &mut tgt,
        vec![Control::Hello {
            group: "app".into(),
        }],
    );
    let stray = chunk::verify(chunk::encode(&[7u8; 4096], 1)).unwrap();
    tgt.on_pushed(&stray).unwrap();
    let (mut src, _) = SourceSession::pushing("app");
    src.on_message(Control::Welcome {
        latest: None,
        push: true,
    })
    .unwrap();
    let SourceStep::Send(msgs) = src.set_offer(img.offer("c1", None), 0, 1).unwrap() else {
        panic!("the offer is sent")
    };
    let mut last = Ok(TargetStep::Reply(vec![]));
    for m in msgs {
        last = tgt.on_message(m);
        if last.is_err() {
            break;
        }
    }
    let e = last.unwrap_err();
    assert!(
        e.to_string()
            .contains("pushed but the offer does not reference it"),
        "{e}"
    );
    assert!(store.latest("app").unwrap().is_none());
}

#[test]
fn after_a_broken_transfer_the_target_forbids_pushing_until_a_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let mut img = Image::new(16);
    fill(&mut img, 0..16, 8);
    let welcome = |store: &Arc<Store>| {
        let mut t = TargetSession::new(store.clone());
        let reply = deliver(
            &mut t,
            vec![Control::Hello {
                group: "app".into(),
            }],
        );
        (t, reply)
    };
    let (_, reply) = welcome(&store);
    assert_eq!(
        reply,
        vec![Control::Welcome {
            latest: None,
            push: true
        }]
    );
    // A transfer breaks after 5 durable chunks: pushing now would send them again.
    let offer = img.offer("c1", None);
    assert_eq!(
        run(&store, offer.clone(), &img.frames(), Some(5)),
        Outcome::Broken { sent: 5 }
    );
    let (mut t, reply) = welcome(&store);
    assert_eq!(
        reply,
        vec![Control::Welcome {
            latest: None,
            push: false
        }]
    );
    let pushed = chunk::verify(img.frames().into_values().next().unwrap()).unwrap();
    let e = t.on_pushed(&pushed).unwrap_err();
    assert!(e.to_string().contains("did not allow pushing"), "{e}");
    // The resumed transfer sends only the other 11, and its commit lifts the ban.
    assert_eq!(
        run(&store, offer, &img.frames(), None),
        Outcome::Committed { seq: 1, sent: 11 }
    );
    let (_, reply) = welcome(&store);
    assert!(matches!(reply[0], Control::Welcome { push: true, .. }));
}
