//! Protocol 4 in memory (no sockets): movers stage one volume each on their own sessions, and
//! the source commits the staged volumes with `UseParts` as one point. Checks the grants'
//! scope, that a staged volume is invisible until the commit, that deltas are made against the
//! map the target sends, that a commit whose declaration does not match the parts commits
//! nothing, and that the next commit drops stale parts.

mod support;

use std::sync::Arc;
use support::*;
use understudy_common::block_map::BlockMap;
use understudy_common::chunk;
use understudy_common::hash::VolumeDigest;
use understudy_common::protocol::session_store::MemoryStore;
use understudy_common::protocol::source_session::{Offer, SourceSession, SourceStep};
use understudy_common::protocol::target_session::{FlushPolicy, TargetSession, TargetStep};
use understudy_common::protocol::{Control, MoverGrant, OfferKind, RefuseCode, SessionStore};
use understudy_common::store::{CutMeta, ManifestRef, Store, VolumeMeta};
use understudy_common::transport::grants::Grant;
use understudy_common::transport::stream::StreamKind;

const GROUP: &str = "app";

fn grant(stage: &str, volume: &str) -> Grant {
    Grant {
        group: GROUP.into(),
        stage: stage.into(),
        volume: volume.into(),
        expires_ms: i64::MAX,
    }
}

fn mover_session(store: &Arc<impl SessionStore + 'static>, g: Grant) -> TargetSession {
    TargetSession::for_mover(store.clone(), FlushPolicy::default(), clock, g)
}

/// Runs a mover for `volume` (image `img`) against the target; returns its staged meta, or the
/// refusal. The mover compares with the base the target sends, as the real one does.
fn stage(
    store: &Arc<impl SessionStore + 'static>,
    g: Grant,
    volume: &str,
    img: &Image,
) -> Result<(VolumeMeta, u64), String> {
    let mut tgt = mover_session(store, g.clone());
    let (mut src, join) = SourceSession::mover(GROUP, &g.stage, volume, BS);
    let replies = match tgt.on_message(join) {
        Ok(TargetStep::Reply(r)) => r,
        Ok(other) => panic!("unexpected {other:?}"),
        Err(e) => return Err(e.to_string()),
    };
    let mut base = Vec::new();
    for m in replies {
        match src
            .on_message(m)
            .expect("mover accepts the welcome and base")
        {
            SourceStep::Base(e) => base.extend(e),
            SourceStep::Send(v) => assert!(v.is_empty()),
            SourceStep::BaseEnd => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(src.base_complete());
    let latest = src.latest().map(|l| l.0);
    let base = BlockMap::from_sorted(base).unwrap();
    let map = img.map();
    let size = img.blocks.len() as u64 * BS as u64;
    let meta = VolumeMeta {
        name: volume.into(),
        size,
        digest: VolumeDigest::of_map(size, BS, &map),
    };
    let offer = Offer {
        kind: latest.map_or(OfferKind::Full, |b| OfferKind::Delta { base: b }),
        cut: CutMeta {
            cut_id: g.stage.clone(),
            source: "sha256:mover".into(),
            created_ms: 5,
            block_size: BS,
            volumes: vec![meta.clone()],
            manifests: ManifestRef::default(),
        },
        entries: vec![base.changes_to(&map)],
        parts: None,
    };
    let frames = img.frames();
    let mut step = src.set_offer(offer, 0, 0).unwrap();
    let mut sent = 0u64;
    loop {
        let msgs = match step {
            SourceStep::Send(m) => m,
            SourceStep::SendChunks(hashes) => {
                for h in &hashes {
                    tgt.on_chunk(&chunk::verify(frames[h].clone()).unwrap())
                        .unwrap();
                }
                sent += hashes.len() as u64;
                let commit = src.commit(1, hashes.len() as u64);
                deliver_all(&mut tgt, vec![commit]);
                match tgt.on_stream_end(StreamKind::Data) {
                    Ok(TargetStep::Committed(reply)) => vec![reply],
                    Ok(other) => panic!("unexpected {other:?}"),
                    Err(e) => return Err(e.to_string()),
                }
                .into_iter()
                .map(|r| src.on_message(r).unwrap())
                .for_each(|s| assert!(matches!(s, SourceStep::Staged { .. }), "{s:?}"));
                return Ok((meta, sent));
            }
            other => panic!("unexpected {other:?}"),
        };
        let mut next = None;
        for m in msgs {
            match tgt.on_message(m) {
                Ok(TargetStep::Reply(r)) => {
                    for reply in r {
                        let s = src.on_message(reply).unwrap();
                        if !matches!(&s, SourceStep::Send(v) if v.is_empty()) {
                            next = Some(s);
                        }
                    }
                }
                Ok(other) => panic!("unexpected {other:?}"),
                Err(e) => return Err(e.to_string()),
            }
        }
        step = next.expect("the target answered the offer");
    }
}

/// The source's commit of `stage` declaring `volumes`; returns the point's seq or the refusal.
fn commit(
    store: &Arc<impl SessionStore + 'static>,
    stage: &str,
    volumes: Vec<VolumeMeta>,
) -> Result<u64, String> {
    let mut tgt = target(store);
    let (mut src, hello) = SourceSession::pushing(GROUP);
    let welcome = deliver_all(&mut tgt, vec![hello]);
    for w in welcome {
        src.on_message(w).unwrap();
    }
    let offer = Offer {
        kind: src
            .latest()
            .map_or(OfferKind::Full, |(b, _)| OfferKind::Delta { base: b }),
        cut: CutMeta {
            cut_id: stage.into(),
            source: "sha256:source".into(),
            created_ms: 5,
            block_size: BS,
            volumes,
            manifests: ManifestRef::default(),
        },
        entries: vec![],
        parts: Some(stage.into()),
    };
    let SourceStep::Send(msgs) = src.set_offer(offer, 0, 0).unwrap() else {
        panic!("an offer to send")
    };
    assert!(msgs.iter().any(|m| matches!(m, Control::UseParts { .. })));
    let mut replies = Vec::new();
    for m in msgs {
        match tgt.on_message(m) {
            Ok(TargetStep::Reply(r)) => replies.extend(r),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => return Err(e.to_string()),
        }
    }
    for r in replies {
        if let SourceStep::SendChunks(h) = src.on_message(r).unwrap() {
            assert!(h.is_empty(), "no manifests: nothing to send");
            let c = src.commit(0, 0);
            for reply in deliver_all(&mut tgt, vec![c]) {
                if let SourceStep::Committed { seq, .. } = src.on_message(reply).unwrap() {
                    return Ok(seq);
                }
            }
        }
    }
    panic!("no commit")
}

fn images() -> (Image, Image) {
    let (mut a, mut b) = (Image::new(32), Image::new(16));
    fill(&mut a, 0..20, 1);
    fill(&mut b, 3..9, 2);
    (a, b)
}

#[test]
fn movers_stage_volumes_that_one_commit_makes_visible_together() {
    let dir = tempfile::tempdir().unwrap();
    staged_cycles(&Arc::new(Store::open(dir.path()).unwrap()));
    staged_cycles(&Arc::new(MemoryStore::new()));
}

fn staged_cycles(store: &Arc<impl Inspect>) {
    let (mut a, mut b) = images();
    let (ma, sent_a) = stage(store, grant("c1", "a"), "a", &a).unwrap();
    let (mb, _) = stage(store, grant("c1", "b"), "b", &b).unwrap();
    assert_eq!(sent_a, 20);
    assert!(
        store.latest(GROUP).unwrap().is_none(),
        "nothing is visible before the commit"
    );
    assert_eq!(commit(store, "c1", vec![ma, mb]).unwrap(), 1);
    assert_eq!(store.map(GROUP, 1, "a"), a.map());
    assert_eq!(store.map(GROUP, 1, "b"), b.map());
    assert!(
        store.staged_part(GROUP, "c1", "a").unwrap().is_none(),
        "the commit takes the parts"
    );

    // Second cut: the movers get the maps of point 1 and stage deltas; only changes travel.
    fill(&mut a, 30..32, 3);
    a.blocks[0] = vec![0; BS as usize]; // a block that became a hole
    fill(&mut b, 3..4, 9);
    let (ma, sent_a) = stage(store, grant("c2", "a"), "a", &a).unwrap();
    let (mb, sent_b) = stage(store, grant("c2", "b"), "b", &b).unwrap();
    assert_eq!(
        (sent_a, sent_b),
        (2, 1),
        "a delta sends the changed blocks only"
    );
    let part = store.staged_part(GROUP, "c2", "a").unwrap().unwrap();
    assert_eq!(part.base, Some(1));
    assert_eq!(part.entries.len(), 3, "two new blocks and one hole");
    assert_eq!(commit(store, "c2", vec![ma, mb]).unwrap(), 2);
    assert_eq!(store.map(GROUP, 2, "a"), a.map());
    assert_eq!(store.map(GROUP, 2, "b"), b.map());
    assert_eq!(
        store.map(GROUP, 1, "b"),
        images().1.map(),
        "point 1 is unchanged"
    );
}

#[test]
fn a_commit_that_does_not_match_its_parts_commits_nothing() {
    let store = Arc::new(MemoryStore::new());
    let (a, b) = images();
    let (ma, _) = stage(&store, grant("c1", "a"), "a", &a).unwrap();
    let (mb, _) = stage(&store, grant("c1", "b"), "b", &b).unwrap();
    let missing = VolumeMeta {
        name: "c".into(),
        ..mb.clone()
    };
    let e = commit(&store, "c1", vec![ma.clone(), missing]).unwrap_err();
    assert!(e.contains("no mover staged volume c"), "{e}");
    let wrong = VolumeMeta {
        digest: "v2:0".into(),
        ..mb.clone()
    };
    let e = commit(&store, "c1", vec![ma.clone(), wrong]).unwrap_err();
    assert!(e.contains("was staged as"), "{e}");
    let e = commit(&store, "c0", vec![ma.clone(), mb.clone()]).unwrap_err();
    assert!(
        e.contains("for cut c0"),
        "another cut's parts are not taken: {e}"
    );
    assert!(store.latest(GROUP).unwrap().is_none());
    assert_eq!(commit(&store, "c1", vec![ma, mb]).unwrap(), 1);
}

#[test]
fn a_mover_may_stage_only_what_it_was_granted() {
    let store = Arc::new(MemoryStore::new());
    let (a, _) = images();
    let e = stage(&store, grant("c1", "b"), "a", &a).unwrap_err();
    assert!(e.contains("may stage volume b"), "{e}");
    let other_group = Grant {
        group: "other".into(),
        ..grant("c1", "a")
    };
    let e = stage(&store, other_group, "a", &a).unwrap_err();
    assert!(e.contains("of group other"), "{e}");

    // A mover's session takes neither Hello nor grants; a source's takes no Join.
    for msg in [
        Control::Hello {
            group: GROUP.into(),
        },
        Control::AuthorizeMovers {
            group: GROUP.into(),
            stage: "c1".into(),
            grants: vec![],
            ttl_ms: 1000,
        },
    ] {
        let mut t = mover_session(&store, grant("c1", "a"));
        assert!(t.on_message(msg).is_err());
    }
    let mut t = target(&store);
    let (_, join) = SourceSession::mover(GROUP, "c1", "a", BS);
    assert!(t.on_message(join).is_err());

    // A mover's offer declares its own volume only.
    let mut t = mover_session(&store, grant("c1", "a"));
    let (_, join) = SourceSession::mover(GROUP, "c1", "a", BS);
    deliver_all(&mut t, vec![join]);
    let mut offer = a.offer("c1", None);
    offer.cut.volumes[0].name = "b".into();
    let e = t
        .on_message(Control::Offer {
            kind: offer.kind,
            cut: offer.cut,
        })
        .unwrap_err();
    assert!(e.to_string().contains("exactly its volume a"), "{e}");
}

#[test]
fn grants_are_checked_and_handed_to_the_caller() {
    let store = Arc::new(MemoryStore::new());
    let fp = understudy_common::transport::Fingerprint::of(b"mover");
    let mut t = target(&store);
    let step = t
        .on_message(Control::AuthorizeMovers {
            group: GROUP.into(),
            stage: "c1".into(),
            grants: vec![MoverGrant {
                volume: "a".into(),
                fingerprint: fp.to_string(),
            }],
            ttl_ms: 60_000,
        })
        .unwrap();
    let TargetStep::Authorize { grants, reply } = step else {
        panic!("grants expected, got {step:?}")
    };
    assert_eq!(reply, Control::MoversAuthorized { count: 1 });
    assert_eq!(grants[0].0, fp);
    assert_eq!(grants[0].1.volume, "a");
    assert_eq!(grants[0].1.expires_ms, clock() + 60_000);
    for (ttl, fingerprint) in [
        (0, fp.to_string()),
        (60_000, "not-a-fingerprint".to_string()),
    ] {
        let mut t = target(&store);
        let r = t.on_message(Control::AuthorizeMovers {
            group: GROUP.into(),
            stage: "c1".into(),
            grants: vec![MoverGrant {
                volume: "a".into(),
                fingerprint,
            }],
            ttl_ms: ttl,
        });
        assert!(r.is_err());
    }
}

#[test]
fn a_part_whose_chunks_did_not_arrive_is_not_staged() {
    let store = Arc::new(MemoryStore::new());
    let (a, _) = images();
    let mut tgt = mover_session(&store, grant("c1", "a"));
    let (mut src, join) = SourceSession::mover(GROUP, "c1", "a", BS);
    for m in deliver_all(&mut tgt, vec![join]) {
        src.on_message(m).unwrap();
    }
    let mut offer = a.offer("c1", None);
    offer.cut.volumes[0].name = "a".into();
    let SourceStep::Send(msgs) = src.set_offer(offer, 0, 0).unwrap() else {
        panic!()
    };
    for m in deliver_all(&mut tgt, msgs) {
        src.on_message(m).unwrap();
    }
    // The mover claims it sent everything on one stream, but sent nothing.
    deliver_all(&mut tgt, vec![src.commit(1, 20)]);
    let e = tgt.on_stream_end(StreamKind::Data).unwrap_err();
    assert!(matches!(
        e,
        understudy_common::protocol::source_session::SessionError::Refused {
            code: RefuseCode::MissingChunks,
            ..
        }
    ));
    assert_eq!(store.staged(), 0);
}

#[test]
fn the_next_commit_drops_parts_of_a_cut_given_up() {
    let store = Arc::new(MemoryStore::new());
    let (a, b) = images();
    stage(&store, grant("given-up", "a"), "a", &a).unwrap();
    let (ma, _) = stage(&store, grant("c2", "a"), "a", &a).unwrap();
    let (mb, _) = stage(&store, grant("c2", "b"), "b", &b).unwrap();
    assert_eq!(store.staged(), 3);
    assert_eq!(commit(&store, "c2", vec![ma, mb]).unwrap(), 1);
    assert_eq!(store.staged(), 0);
}
