//! The source and target session state machines driven against each other in memory (no
//! sockets), the target over the in-memory store (with injected failures) and, for the full
//! sync / delta / resume sequence, over a real store in a temporary directory too: full sync,
//! delta, dedupe, a session broken mid-transfer and resumed without resending durable chunks,
//! base mismatch, idempotent re-commit, bad input from the peer, store failures, and when
//! received chunks become durable.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use understudy_common::chunk;
use understudy_common::hash::{BlockRef, ChunkHash};
use understudy_common::protocol::session_store::{MemoryStore, StoreOp};
use understudy_common::protocol::source_session::{Offer, SourceSession, SourceStep};
use understudy_common::protocol::target_session::{FlushPolicy, TargetSession, TargetStep};
use understudy_common::protocol::{Control, MigrationState, RefuseCode, SessionStore};
use understudy_common::store::Store;
use understudy_common::transport::stream::StreamKind;

mod support;
use support::*;

/// Outcome of one in-memory session.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Committed { seq: u64, sent: usize },
    Broken { sent: usize },
    Step(String),
}

/// Runs a session; `break_after` stops delivering chunks after that many (the link broke).
fn run(
    store: &Arc<impl SessionStore + 'static>,
    offer: Offer,
    frames: &HashMap<ChunkHash, Vec<u8>>,
    break_after: Option<usize>,
) -> Outcome {
    let (mut src, hello) = SourceSession::new("app", offer);
    drive(store, (&mut src, hello), frames, break_after)
}

/// Runs source session `src` (its first message `hello`) against a new target session.
fn drive(
    store: &Arc<impl SessionStore + 'static>,
    (src, hello): (&mut SourceSession, Control),
    frames: &HashMap<ChunkHash, Vec<u8>>,
    break_after: Option<usize>,
) -> Outcome {
    let mut tgt = target(store);
    let mut to_target = vec![hello];
    let mut data_stream_done = false;
    loop {
        let mut to_source = Vec::new();
        let mut steps: Vec<TargetStep> = to_target
            .drain(..)
            .map(|m| {
                tgt.on_message(m)
                    .expect("target accepts a well-formed session")
            })
            .collect();
        // The data stream ends after the Commit that announced it (either order is valid).
        if std::mem::take(&mut data_stream_done) {
            steps.push(tgt.on_stream_end(StreamKind::Data).expect("commit"));
        }
        for step in steps {
            match step {
                TargetStep::Reply(r) => to_source.extend(r),
                TargetStep::Committed(r) => to_source.push(r),
                other => panic!("unexpected {other:?}"),
            }
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
                            tgt.close().unwrap();
                            return Outcome::Broken { sent: n };
                        }
                        let v = chunk::verify(frames[h].clone()).unwrap();
                        tgt.on_chunk(&v).unwrap();
                    }
                    to_target.push(src.commit(1, hashes.len() as u64));
                    data_stream_done = true;
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

#[test]
fn full_then_delta_then_resume_without_resending() {
    let dir = tempfile::tempdir().unwrap();
    full_delta_resume(&Arc::new(Store::open(dir.path()).unwrap()));
    full_delta_resume(&Arc::new(MemoryStore::new()));
}

fn full_delta_resume(store: &Arc<impl Inspect>) {
    let mut img = Image::new(64);
    fill(&mut img, 0..40, 1);
    let o = run(store, img.offer("c1", None), &img.frames(), None);
    assert_eq!(o, Outcome::Committed { seq: 1, sent: 40 });
    assert_eq!(store.map("app", 1, "data"), img.map());

    // Delta: 5 blocks change, one becomes a hole; only the 5 new chunks travel.
    let base = img.map();
    fill(&mut img, 10..15, 9);
    img.blocks[20] = vec![0; BS as usize];
    let o = run(
        store,
        img.offer("c2", Some((1, &base))),
        &img.frames(),
        None,
    );
    assert_eq!(o, Outcome::Committed { seq: 2, sent: 5 });
    assert_eq!(store.map("app", 2, "data"), img.map());
    assert_eq!(
        store.map("app", 1, "data"),
        base,
        "older point still restores"
    );

    // Broken after 12 of 30 chunks, then resumed: only the other 18 are sent again.
    let base2 = img.map();
    fill(&mut img, 30..60, 77);
    let offer = img.offer("c3", Some((2, &base2)));
    assert_eq!(
        run(store, offer.clone(), &img.frames(), Some(12)),
        Outcome::Broken { sent: 12 }
    );
    assert_eq!(
        store.latest("app").unwrap().unwrap().seq,
        2,
        "no half point is visible"
    );
    assert_eq!(
        run(store, offer, &img.frames(), None),
        Outcome::Committed { seq: 3, sent: 18 }
    );
    assert_eq!(store.map("app", 3, "data"), img.map());
}

#[test]
fn stale_base_and_repeated_cut_are_recognised() {
    let store = Arc::new(MemoryStore::new());
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
    let store = Arc::new(MemoryStore::new());
    let mut img = Image::new(16);
    fill(&mut img, 0..16, 5);
    run(&store, img.offer("c1", None), &img.frames(), None);
    for b in &mut img.blocks[4..12] {
        b.fill(0);
    }
    // The source lost its base: a full offer, nothing new to send, 8 blocks now holes.
    let o = run(&store, img.offer("c2", None), &img.frames(), None);
    assert_eq!(o, Outcome::Committed { seq: 2, sent: 0 });
    assert_eq!(store.map("app", 2, "data"), img.map());
}

/// A migration asked on the target reaches the source in Welcome; the point whose Commit names
/// it is marked final in the commit itself, and the source is told; a Commit naming a request
/// that is not the pending one commits the point, not as final.
#[test]
fn a_migration_request_reaches_the_source_and_its_final_point_is_marked_at_commit() {
    let store = Arc::new(MemoryStore::new());
    let mut img = Image::new(16);
    fill(&mut img, 0..8, 1);
    store.request_migration("app", "m1");
    let (mut src, hello) = SourceSession::new("app", img.offer("c1", None));
    assert!(matches!(
        drive(&store, (&mut src, hello), &img.frames(), None),
        Outcome::Committed { seq: 1, .. }
    ));
    let pending = MigrationState {
        id: "m1".into(),
        final_seq: None,
    };
    assert_eq!(src.migration(), Some(&pending), "told in Welcome");

    fill(&mut img, 8..10, 2);
    let (mut src, hello) = SourceSession::new("app", img.offer("c2", None));
    src.end_migration("other");
    drive(&store, (&mut src, hello), &img.frames(), None);
    assert_eq!(src.migration(), Some(&pending), "not taken as final");
    assert_eq!(store.migration("app").unwrap().unwrap().final_seq, None);

    fill(&mut img, 10..12, 3);
    let (mut src, hello) = SourceSession::new("app", img.offer("c3", None));
    src.end_migration("m1");
    assert!(matches!(
        drive(&store, (&mut src, hello), &img.frames(), None),
        Outcome::Committed { seq: 3, .. }
    ));
    let done = MigrationState {
        id: "m1".into(),
        final_seq: Some(3),
    };
    assert_eq!(src.migration(), Some(&done));
    assert_eq!(store.migration("app").unwrap().unwrap().final_seq, Some(3));
}

#[test]
fn target_refuses_bad_input() {
    let store = Arc::new(MemoryStore::new());
    let mut t = target(&store);
    assert!(
        t.on_message(Control::Commit {
            data_streams: 1,
            chunks: 0,
            final_for: None,
        })
        .is_err(),
        "commit before hello"
    );
    let mut t = target(&store);
    assert!(
        t.on_message(Control::Hello {
            group: "../etc".into()
        })
        .is_err(),
        "bad group name"
    );
    let mut t = target(&store);
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
    let mut t = target(&store);
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
    t.close().unwrap();
    assert_eq!(store.missing(&[stray.hash()]).unwrap(), vec![stray.hash()]);
}

/// Hands `msgs` to the target; returns its replies (a commit request is not expected here).
#[test]
fn pushed_chunks_are_held_and_not_asked_for_again() {
    let store = Arc::new(MemoryStore::new());
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
    let mut tgt = target(&store);
    let welcome = deliver_all(&mut tgt, vec![hello]);
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
        deliver_all(&mut tgt, msgs),
        vec![],
        "the answer waits for the push stream"
    );
    // The last pushed chunk arrives, then the stream ends: now the target answers.
    tgt.on_pushed(&chunk::verify(frames[&order[30]].clone()).unwrap())
        .unwrap();
    let TargetStep::Reply(needs) = tgt.on_stream_end(StreamKind::Push).unwrap() else {
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
            assert_eq!(
                tgt.on_message(commit).unwrap(),
                TargetStep::Reply(vec![]),
                "no commit before the data stream ended"
            );
        }
    }
    assert_eq!(sent, 9, "only the chunks not pushed travel after the offer");
    let TargetStep::Committed(committed) = tgt.on_stream_end(StreamKind::Data).unwrap() else {
        panic!("the end of the last data stream commits")
    };
    assert!(matches!(
        src.on_message(committed).unwrap(),
        SourceStep::Committed { seq: 1, .. }
    ));
    assert_eq!(store.map("app", 1, "data"), img.map());
    // A push once the offer was answered is a protocol violation.
    let late = chunk::verify(frames[&order[0]].clone()).unwrap();
    assert!(tgt.on_pushed(&late).is_err());
}

#[test]
fn a_pushed_chunk_the_offer_does_not_reference_is_refused() {
    let store = Arc::new(MemoryStore::new());
    let mut img = Image::new(4);
    fill(&mut img, 0..4, 6);
    let mut tgt = target(&store);
    deliver_all(
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
        migration: None,
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
    let store = Arc::new(MemoryStore::new());
    let mut img = Image::new(16);
    fill(&mut img, 0..16, 8);
    let welcome = |store: &Arc<MemoryStore>| {
        let mut t = target(store);
        let reply = deliver_all(
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
            push: true,
            migration: None,
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
            push: false,
            migration: None,
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

/// Drives a session up to the answered offer; returns the target and the chunks it asked for.
fn offered(
    store: &Arc<MemoryStore>,
    offer: Offer,
    policy: FlushPolicy,
) -> (TargetSession, SourceSession, Vec<ChunkHash>) {
    let (mut src, hello) = SourceSession::new("app", offer);
    let mut tgt = TargetSession::new(store.clone(), policy, clock);
    let mut to_target = vec![hello];
    loop {
        let mut to_source = Vec::new();
        for m in to_target.drain(..) {
            match tgt.on_message(m).expect("target accepts the message") {
                TargetStep::Reply(r) => to_source.extend(r),
                other => panic!("unexpected {other:?}"),
            }
        }
        for m in to_source {
            match src.on_message(m).expect("source accepts the reply") {
                SourceStep::Send(out) => to_target.extend(out),
                SourceStep::SendChunks(hashes) => return (tgt, src, hashes),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

fn refused_code(e: &understudy_common::protocol::source_session::SessionError) -> RefuseCode {
    match understudy_common::protocol::target_session::refusal(e) {
        Control::Refused { code, .. } => code,
        other => panic!("not a refusal: {other:?}"),
    }
}

#[test]
fn a_full_disk_on_append_refuses_the_session_and_the_retry_resends_only_what_was_lost() {
    let store = Arc::new(MemoryStore::new());
    let mut img = Image::new(32);
    fill(&mut img, 0..20, 2);
    let frames = img.frames();
    let policy = FlushPolicy {
        bytes: 1,
        interval_ms: 1000,
    };
    let (mut tgt, _, asked) = offered(&store, img.offer("c1", None), policy);
    assert_eq!(asked.len(), 20);
    for h in &asked[..8] {
        tgt.on_chunk(&chunk::verify(frames[h].clone()).unwrap())
            .unwrap();
    }
    store.fail(StoreOp::Append, 1);
    let e = tgt
        .on_chunk(&chunk::verify(frames[&asked[8]].clone()).unwrap())
        .unwrap_err();
    assert_eq!(refused_code(&e), RefuseCode::StoreFailed);
    assert!(e.to_string().contains("disk is full"), "{e}");
    assert_eq!(
        store.durable(),
        8,
        "each chunk was flushed as it came (policy: 1 byte)"
    );
    assert!(
        store.latest("app").unwrap().is_none(),
        "no point from a failed session"
    );
    assert_eq!(
        run(&store, img.offer("c1", None), &frames, None),
        Outcome::Committed { seq: 1, sent: 12 },
        "the 8 durable chunks are not sent again"
    );
    assert_eq!(store.map("app", 1, "data"), img.map());
}

#[test]
fn a_failed_flush_or_commit_refuses_with_store_failed_and_commits_nothing() {
    for op in [StoreOp::Flush, StoreOp::Commit] {
        let store = Arc::new(MemoryStore::new());
        let mut img = Image::new(8);
        fill(&mut img, 0..8, 3);
        let frames = img.frames();
        let (mut tgt, mut src, asked) =
            offered(&store, img.offer("c1", None), FlushPolicy::default());
        for h in &asked {
            tgt.on_chunk(&chunk::verify(frames[h].clone()).unwrap())
                .unwrap();
        }
        store.fail(op, 1);
        assert_eq!(
            tgt.on_message(src.commit(1, asked.len() as u64)).unwrap(),
            TargetStep::Reply(vec![])
        );
        let e = tgt.on_stream_end(StreamKind::Data).unwrap_err();
        assert_eq!(refused_code(&e), RefuseCode::StoreFailed, "{op:?}");
        assert!(
            store.latest("app").unwrap().is_none(),
            "{op:?}: nothing committed"
        );
        assert_eq!(
            run(&store, img.offer("c1", None), &frames, None),
            Outcome::Committed {
                seq: 1,
                sent: if op == StoreOp::Flush { 8 } else { 0 }
            },
            "{op:?}: a failed flush loses the unrecorded chunks; a failed commit keeps them"
        );
    }
}

#[test]
fn received_chunks_become_durable_by_bytes_by_time_and_at_close() {
    let store = Arc::new(MemoryStore::new());
    let mut img = Image::new(16);
    fill(&mut img, 0..12, 4);
    let frames = img.frames();
    let frame_len = frames.values().next().unwrap().len() as u64;
    let policy = FlushPolicy {
        bytes: 4 * frame_len,
        interval_ms: 1000,
    };
    let (mut tgt, _, asked) = offered(&store, img.offer("c1", None), policy);
    let give = |tgt: &mut TargetSession, hs: &[ChunkHash]| {
        for h in hs {
            tgt.on_chunk(&chunk::verify(frames[h].clone()).unwrap())
                .unwrap();
        }
    };
    give(&mut tgt, &asked[..5]);
    assert_eq!(
        store.durable(),
        4,
        "the fourth chunk reached the byte limit"
    );
    tgt.on_tick().unwrap();
    assert_eq!(
        store.durable(),
        4,
        "a tick before the interval flushes nothing"
    );
    NOW.fetch_add(1000, Ordering::SeqCst);
    tgt.on_tick().unwrap();
    assert_eq!(
        store.durable(),
        5,
        "a tick after the interval flushes the rest"
    );
    give(&mut tgt, &asked[5..6]);
    NOW.fetch_sub(60_000, Ordering::SeqCst);
    tgt.on_tick().unwrap();
    assert_eq!(
        store.durable(),
        6,
        "a clock that stepped back does not hold received chunks back"
    );
    give(&mut tgt, &asked[6..7]);
    tgt.close().unwrap();
    assert_eq!(
        store.durable(),
        7,
        "closing makes everything received durable"
    );
    store.crash();
    assert_eq!(store.missing(&asked).unwrap().len(), 5);
}

#[test]
fn the_commit_waits_for_every_announced_data_stream_in_either_order() {
    let store = Arc::new(MemoryStore::new());
    let mut img = Image::new(8);
    fill(&mut img, 0..8, 5);
    let frames = img.frames();
    let (mut tgt, mut src, asked) = offered(&store, img.offer("c1", None), FlushPolicy::default());
    for h in &asked {
        tgt.on_chunk(&chunk::verify(frames[h].clone()).unwrap())
            .unwrap();
    }
    // Two data streams: one ends before Commit arrives, one after.
    assert_eq!(
        tgt.on_stream_end(StreamKind::Data).unwrap(),
        TargetStep::Reply(vec![])
    );
    assert_eq!(
        tgt.on_message(src.commit(2, asked.len() as u64)).unwrap(),
        TargetStep::Reply(vec![])
    );
    assert!(store.latest("app").unwrap().is_none());
    let TargetStep::Committed(reply) = tgt.on_stream_end(StreamKind::Data).unwrap() else {
        panic!("the second data stream's end commits")
    };
    assert!(matches!(reply, Control::Committed { seq: 1, .. }));
    assert_eq!(store.map("app", 1, "data"), img.map());
}
