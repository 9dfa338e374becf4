//! The target side of a session, as a state machine over a [`SessionStore`]: it validates the
//! offer, answers what it lacks, takes verified chunks, decides when they become durable, and
//! commits the point atomically once every data stream has ended. It does no I/O of its own and
//! reads time only through the [`Clock`] it is given.
//!
//! A session is a source's or a mover's ([`TargetSession::for_mover`], protocol 4). A mover's
//! runs the same way with a one-volume offer, but starts with `Join` (answered with the volume's
//! map at the latest point, the base the mover compares against) and ends by staging the volume
//! instead of committing a point. A source commits staged volumes with `UseParts`.

use super::messages::*;
use super::session_store::SessionStore;
use super::source_session::SessionError;
use crate::chunk::Verified;
use crate::hash::{BlockRef, ChunkHash, block_count};
use crate::store::{CommitError, CommitRequest, CutMeta, StagedPart, VolumeEntries};
use crate::transport::Fingerprint;
use crate::transport::grants::{Grant, MAX_GRANT_MS};
use crate::transport::stream::StreamKind;
use std::collections::HashSet;
use std::sync::Arc;

/// What the caller should do after an event.
#[derive(Debug, PartialEq, Eq)]
pub enum TargetStep {
    /// Send these (possibly none) and keep reading.
    Reply(Vec<Control>),
    /// The point is committed (or, for a mover, the volume staged): send this reply
    /// (`Committed` or `Staged`); the session is over.
    Committed(Control),
    /// A source granted movers: put these grants in force, then send `reply`; the session is
    /// over.
    Authorize {
        /// Mover certificate fingerprint and what it may do.
        grants: Vec<(Fingerprint, Grant)>,
        /// `MoversAuthorized`.
        reply: Control,
    },
}

/// Milliseconds since the Unix epoch, as the session reads them ([`crate::now_ms`] in the agent,
/// a fixed or stepped clock in tests).
pub type Clock = fn() -> i64;

/// When received chunks are made durable (fsynced and recorded). The session is the one place
/// that decides; a crash loses at most what arrived since, and the source sends it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlushPolicy {
    /// Chunk bytes appended since the last flush after which the next append flushes.
    pub bytes: u64,
    /// Milliseconds since the last flush after which a tick flushes.
    pub interval_ms: i64,
}

impl Default for FlushPolicy {
    fn default() -> Self {
        FlushPolicy {
            bytes: FLUSH_BYTES,
            interval_ms: 1000,
        }
    }
}

/// Default of [`FlushPolicy::bytes`]: 64 MiB.
pub const FLUSH_BYTES: u64 = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitHello,
    AwaitOffer,
    ReceivingEntries,
    /// The offer is complete; waiting for push streams to drain before answering it.
    AwaitPushes,
    ReceivingChunks,
    Committing,
    Done,
}

struct Pending {
    kind: OfferKind,
    cut: CutMeta,
    entries: Vec<VolumeEntries>,
    blocks: Vec<u64>,
    count: u64,
}

/// Target session state.
pub struct TargetSession {
    store: Arc<dyn SessionStore>,
    clock: Clock,
    flush: FlushPolicy,
    state: State,
    group: String,
    pending: Option<Pending>,
    expected: HashSet<ChunkHash>,
    received: (u64, u64),
    push: PushState,
    data: Streams,
    marked: bool,
    unflushed: u64,
    last_flush_ms: i64,
    /// `Some` in a mover's session: what its grant allows.
    mover: Option<Grant>,
    /// What the receiving mark covers: the group, or `<group>/<volume>` for a mover.
    scope: String,
    /// Set by `UseParts`: the offer's entries are staged parts.
    parts: bool,
    /// Set by `Commit`: the pending migration this point ends.
    final_for: Option<String>,
}

/// Streams of one kind: how many the source announced, and how many ended.
#[derive(Default)]
struct Streams {
    announced: Option<u32>,
    ended: u32,
}

impl Streams {
    /// True when every announced stream ended (or none was announced).
    fn drained(&self) -> bool {
        self.announced.is_none_or(|n| self.ended >= n)
    }
}

/// Chunks pushed during the cut, and the push streams.
#[derive(Default)]
struct PushState {
    allowed: bool,
    hashes: HashSet<ChunkHash>,
    streams: Streams,
    bytes: u64,
}

/// Reply for a failed session: the message to send, and the error to log.
pub fn refusal(err: &SessionError) -> Control {
    let (code, message) = match err {
        SessionError::Refused { code, message } => (*code, message.clone()),
        SessionError::Unexpected { .. } => (RefuseCode::Protocol, err.to_string()),
        SessionError::Invalid(m) => (RefuseCode::BadOffer, m.clone()),
    };
    Control::Refused { code, message }
}

fn refuse(code: RefuseCode, message: impl Into<String>) -> SessionError {
    SessionError::Refused {
        code,
        message: message.into(),
    }
}

fn store_failed(e: anyhow::Error) -> SessionError {
    let hint = if crate::store::is_disk_full(&e) {
        ". The target's disk is full: free space on it (or drop old points with `target-agent retention`) and run the cycle again; the chunks already stored are kept"
    } else {
        ""
    };
    refuse(
        RefuseCode::StoreFailed,
        format!("target store failed: {e:#}{hint}"),
    )
}

impl TargetSession {
    /// A new session writing into `store`, flushing as `flush` says, reading time from `clock`.
    pub fn new(store: Arc<dyn SessionStore>, flush: FlushPolicy, clock: Clock) -> Self {
        TargetSession {
            store,
            clock,
            flush,
            state: State::AwaitHello,
            group: String::new(),
            pending: None,
            expected: HashSet::new(),
            received: (0, 0),
            push: PushState::default(),
            data: Streams::default(),
            marked: false,
            unflushed: 0,
            last_flush_ms: clock(),
            mover: None,
            scope: String::new(),
            parts: false,
            final_for: None,
        }
    }

    /// A mover's session: it may only `Join` as `grant` says, and stages one volume.
    pub fn for_mover(
        store: Arc<dyn SessionStore>,
        flush: FlushPolicy,
        clock: Clock,
        grant: Grant,
    ) -> Self {
        let mut s = Self::new(store, flush, clock);
        s.mover = Some(grant);
        s
    }

    /// True in a mover's session.
    pub fn is_mover(&self) -> bool {
        self.mover.is_some()
    }

    /// The group named in Hello (empty before it).
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Chunks received so far and their frame bytes.
    pub fn received(&self) -> (u64, u64) {
        self.received
    }

    /// Chunks pushed so far (stored or already held) and their frame bytes.
    pub fn pushed(&self) -> (u64, u64) {
        (self.push.hashes.len() as u64, self.push.bytes)
    }

    /// Handles one control message from the source.
    pub fn on_message(&mut self, msg: Control) -> Result<TargetStep, SessionError> {
        let step = match (self.state, msg) {
            (State::AwaitHello, Control::Hello { group }) if !self.is_mover() => {
                self.on_hello(group)?
            }
            (
                State::AwaitHello,
                Control::AuthorizeMovers {
                    group,
                    stage,
                    grants,
                    ttl_ms,
                },
            ) if !self.is_mover() => self.on_authorize(group, stage, grants, ttl_ms)?,
            (
                State::AwaitHello,
                Control::Join {
                    group,
                    stage,
                    volume,
                    block_size,
                },
            ) if self.is_mover() => self.on_join(group, stage, volume, block_size)?,
            (State::ReceivingEntries, Control::UseParts { stage })
                if !self.is_mover() && !self.parts =>
            {
                self.on_use_parts(stage)?
            }
            (State::AwaitOffer, Control::Offer { kind, cut }) => self.on_offer(kind, cut)?,
            (State::ReceivingEntries, Control::Entries { volume, entries }) if !self.parts => {
                self.on_entries(volume, entries)?
            }
            (State::ReceivingEntries, Control::OfferEnd { entries }) => {
                self.on_offer_end(entries)?
            }
            (State::AwaitOffer, Control::PushEnd { streams, .. })
                if self.push.streams.announced.is_none() =>
            {
                self.push.streams.announced = Some(streams);
                TargetStep::Reply(vec![])
            }
            (
                State::ReceivingChunks,
                Control::Commit {
                    data_streams,
                    final_for,
                    ..
                },
            ) => {
                self.state = State::Committing;
                self.final_for = final_for;
                self.data.announced = Some(data_streams);
                self.commit_if_drained()?
            }
            (_, Control::Refused { code, message }) => {
                return Err(SessionError::Refused { code, message });
            }
            (state, other) => {
                return Err(SessionError::Unexpected {
                    got: other.name(),
                    state: describe(state),
                });
            }
        };
        Ok(step)
    }

    fn on_hello(&mut self, group: String) -> Result<TargetStep, SessionError> {
        crate::volume::check_name(&group).map_err(|e| SessionError::Invalid(format!("{e:#}")))?;
        let latest = self.store.latest(&group).map_err(store_failed)?;
        self.push.allowed = !self.store.was_receiving(&group).map_err(store_failed)?;
        self.scope = group.clone();
        self.group = group;
        self.state = State::AwaitOffer;
        let migration = self.store.migration(&self.group).map_err(store_failed)?;
        Ok(TargetStep::Reply(vec![Control::Welcome {
            latest: latest.map(|p| (p.seq, p.cut.cut_id)),
            push: self.push.allowed,
            migration: migration.map(|m| MigrationState {
                id: m.id,
                final_seq: m.final_seq,
            }),
        }]))
    }

    fn on_authorize(
        &mut self,
        group: String,
        stage: String,
        grants: Vec<MoverGrant>,
        ttl_ms: u64,
    ) -> Result<TargetStep, SessionError> {
        let invalid = |e: anyhow::Error| SessionError::Invalid(format!("{e:#}"));
        crate::volume::check_name(&group).map_err(invalid)?;
        crate::volume::check_name(&stage).map_err(invalid)?;
        if ttl_ms == 0 || ttl_ms > MAX_GRANT_MS {
            return Err(SessionError::Invalid(format!(
                "mover grants must last 1 ms to {MAX_GRANT_MS} ms, not {ttl_ms}"
            )));
        }
        let expires_ms = (self.clock)().saturating_add(ttl_ms as i64);
        let mut out = Vec::with_capacity(grants.len());
        for g in grants {
            crate::volume::check_name(&g.volume).map_err(invalid)?;
            let fp: Fingerprint = g.fingerprint.parse().map_err(invalid)?;
            let grant = Grant {
                group: group.clone(),
                stage: stage.clone(),
                volume: g.volume,
                expires_ms,
            };
            out.push((fp, grant));
        }
        self.state = State::Done;
        Ok(TargetStep::Authorize {
            reply: Control::MoversAuthorized {
                count: out.len() as u32,
            },
            grants: out,
        })
    }

    /// A mover joins: it must name what its grant allows. It is welcomed like a source and
    /// given the volume's map at the latest point, which its delta is made against.
    fn on_join(
        &mut self,
        group: String,
        stage: String,
        volume: String,
        block_size: u32,
    ) -> Result<TargetStep, SessionError> {
        let grant = self.mover.as_ref().expect("a mover's session");
        if (&grant.group, &grant.stage, &grant.volume) != (&group, &stage, &volume) {
            return Err(refuse(
                RefuseCode::Protocol,
                format!(
                    "this mover may stage volume {} of group {} for cut {}, not volume {volume} of group {group} for cut {stage}",
                    grant.volume, grant.group, grant.stage
                ),
            ));
        }
        crate::check_block_size(block_size).map_err(|e| SessionError::Invalid(format!("{e:#}")))?;
        let latest = self.store.latest(&group).map_err(store_failed)?;
        let base = match &latest {
            Some(p) if p.cut.block_size != block_size => {
                return Err(SessionError::Invalid(format!(
                    "group {group} is stored at {} byte blocks, the mover reads {block_size}",
                    p.cut.block_size
                )));
            }
            Some(p) => self
                .store
                .volume_map(&group, p.seq, &volume)
                .map_err(store_failed)?,
            None => crate::block_map::BlockMap::new(),
        };
        self.scope = format!("{group}/{volume}");
        self.push.allowed = !self
            .store
            .was_receiving(&self.scope)
            .map_err(store_failed)?;
        self.group = group;
        self.state = State::AwaitOffer;
        // A mover is never asked to migrate: its source is.
        let mut out = vec![Control::Welcome {
            latest: latest.map(|p| (p.seq, p.cut.cut_id)),
            push: self.push.allowed,
            migration: None,
        }];
        out.extend(
            base.data()
                .chunks(ENTRIES_PER_MESSAGE)
                .map(|c| Control::BaseEntries {
                    entries: c.to_vec(),
                }),
        );
        out.push(Control::BaseEnd {
            entries: base.len() as u64,
        });
        Ok(TargetStep::Reply(out))
    }

    /// The offer's volumes are the parts movers staged for `stage`: each must match the
    /// offer's declaration (size, digest, block size) and base.
    fn on_use_parts(&mut self, stage: String) -> Result<TargetStep, SessionError> {
        let p = self.pending.as_mut().expect("pending offer in this state");
        if p.count > 0 {
            return Err(SessionError::Invalid(
                "UseParts after Entries: an offer's volumes come from parts or from entries, not both".into(),
            ));
        }
        let base = match p.kind {
            OfferKind::Delta { base } => Some(base),
            OfferKind::Full => None,
        };
        for (v, meta) in p.cut.volumes.iter().enumerate() {
            let part = self
                .store
                .staged_part(&self.group, &stage, &meta.name)
                .map_err(store_failed)?
                .ok_or_else(|| {
                    refuse(
                        RefuseCode::BadOffer,
                        format!(
                            "no mover staged volume {} for cut {stage}: run its mover again",
                            meta.name
                        ),
                    )
                })?;
            let StagedPart {
                volume,
                block_size,
                base: part_base,
                entries,
                ..
            } = part;
            if volume != *meta || block_size != p.cut.block_size || part_base != base {
                return Err(refuse(
                    RefuseCode::BadOffer,
                    format!(
                        "volume {} was staged as {volume:?} at {block_size} byte blocks against point {part_base:?}, the offer declares {meta:?} at {} against {base:?}",
                        meta.name, p.cut.block_size
                    ),
                ));
            }
            p.entries[v].1 = entries;
        }
        self.parts = true;
        Ok(TargetStep::Reply(vec![]))
    }

    fn on_offer(&mut self, kind: OfferKind, cut: CutMeta) -> Result<TargetStep, SessionError> {
        if let Some(g) = &self.mover
            && (cut.volumes.len() != 1 || cut.volumes[0].name != g.volume)
        {
            return Err(SessionError::Invalid(format!(
                "a mover's offer declares exactly its volume {}",
                g.volume
            )));
        }
        crate::check_block_size(cut.block_size)
            .map_err(|e| SessionError::Invalid(format!("{e:#}")))?;
        let mut names = HashSet::new();
        for v in &cut.volumes {
            crate::volume::check_name(&v.name)
                .map_err(|e| SessionError::Invalid(format!("{e:#}")))?;
            if !names.insert(v.name.as_str()) {
                return Err(SessionError::Invalid(format!(
                    "offer declares volume {} twice",
                    v.name
                )));
            }
        }
        if let OfferKind::Delta { base } = kind {
            let latest = self
                .store
                .latest(&self.group)
                .map_err(store_failed)?
                .map(|p| p.seq);
            if latest != Some(base) {
                return Err(refuse(
                    RefuseCode::BaseMismatch,
                    format!("delta against point {base}, latest is {latest:?}"),
                ));
            }
        }
        let blocks = cut
            .volumes
            .iter()
            .map(|v| block_count(v.size, cut.block_size))
            .collect();
        let entries = cut
            .volumes
            .iter()
            .map(|v| (v.name.clone(), Vec::new()))
            .collect();
        self.pending = Some(Pending {
            kind,
            cut,
            entries,
            blocks,
            count: 0,
        });
        self.state = State::ReceivingEntries;
        Ok(TargetStep::Reply(vec![]))
    }

    fn on_entries(
        &mut self,
        volume: u32,
        entries: Vec<(u64, BlockRef)>,
    ) -> Result<TargetStep, SessionError> {
        let p = self.pending.as_mut().expect("pending offer in this state");
        let v = volume as usize;
        let (Some((_, list)), Some(&blocks)) = (p.entries.get_mut(v), p.blocks.get(v)) else {
            return Err(SessionError::Invalid(format!(
                "entries for volume #{volume}, the offer has {}",
                p.blocks.len()
            )));
        };
        for (index, r) in entries {
            let increasing = list.last().is_none_or(|(last, _)| index > *last);
            if index >= blocks || !increasing {
                return Err(SessionError::Invalid(format!(
                    "volume {}: entry for block {index} is out of order or past the end ({blocks} blocks)",
                    list_name(&p.cut, v)
                )));
            }
            list.push((index, r));
            p.count += 1;
        }
        Ok(TargetStep::Reply(vec![]))
    }

    fn on_offer_end(&mut self, declared: u64) -> Result<TargetStep, SessionError> {
        let p = self.pending.as_ref().expect("pending offer in this state");
        if declared != p.count {
            return Err(SessionError::Invalid(format!(
                "offer announced {declared} entries, {} arrived",
                p.count
            )));
        }
        if !self.push.streams.drained() {
            self.state = State::AwaitPushes;
            return Ok(TargetStep::Reply(vec![]));
        }
        self.answer_offer()
    }

    /// Lists what the offer references and the store lacks. Pushed chunks were appended to the
    /// store, so it is flushed first: they count as held, and they are durable from here on.
    fn answer_offer(&mut self) -> Result<TargetStep, SessionError> {
        let p = self.pending.as_ref().expect("pending offer in this state");
        let mut referenced: Vec<ChunkHash> = p
            .entries
            .iter()
            .flat_map(|(_, l)| l.iter())
            .filter_map(|(_, r)| match r {
                BlockRef::Data(h) => Some(*h),
                BlockRef::Hole => None,
            })
            .chain(p.cut.manifests.chunks.iter().copied())
            .collect();
        referenced.sort_unstable();
        referenced.dedup();
        if !self.push.hashes.is_empty() {
            if let Some(h) = self
                .push
                .hashes
                .iter()
                .find(|h| referenced.binary_search(h).is_err())
            {
                return Err(SessionError::Invalid(format!(
                    "chunk {h} was pushed but the offer does not reference it"
                )));
            }
            self.flush_now()?;
        }
        let missing = self.store.missing(&referenced).map_err(store_failed)?;
        let held = (referenced.len() - missing.len()) as u64;
        let mut out: Vec<Control> = missing
            .chunks(HASHES_PER_MESSAGE)
            .map(|c| Control::Need { hashes: c.to_vec() })
            .collect();
        out.push(Control::NeedEnd {
            needed: missing.len() as u64,
            held,
        });
        self.expected = missing.into_iter().collect();
        self.state = State::ReceivingChunks;
        Ok(TargetStep::Reply(out))
    }

    /// Takes a verified chunk from a push stream: stored unless the store holds it already.
    /// Pushes are accepted until the offer is answered; the offer must then reference every
    /// pushed chunk, or the session is refused (and the next GC removes what was stored).
    pub fn on_pushed(&mut self, chunk: &Verified) -> Result<(), SessionError> {
        if !self.push.allowed {
            return Err(SessionError::Invalid(
                "chunk pushed although Welcome did not allow pushing (a transfer of the group broke earlier)".into(),
            ));
        }
        if !matches!(
            self.state,
            State::AwaitOffer | State::ReceivingEntries | State::AwaitPushes
        ) {
            return Err(SessionError::Unexpected {
                got: "a pushed chunk",
                state: describe(self.state),
            });
        }
        if !self.push.hashes.insert(chunk.hash()) {
            return Ok(());
        }
        self.push.bytes += chunk.frame().len() as u64;
        let held = self
            .store
            .missing(&[chunk.hash()])
            .map_err(store_failed)?
            .is_empty();
        if !held {
            self.append(chunk)?;
        }
        Ok(())
    }

    /// Appends a chunk to the store, marking the group as receiving before the first one, and
    /// flushes once [`FlushPolicy::bytes`] arrived since the last flush.
    fn append(&mut self, chunk: &Verified) -> Result<(), SessionError> {
        if !self.marked {
            self.store
                .mark_receiving(&self.scope, (self.clock)())
                .map_err(store_failed)?;
            self.marked = true;
        }
        self.store
            .append(chunk.hash(), chunk.frame())
            .map_err(store_failed)?;
        self.unflushed += chunk.frame().len() as u64;
        if self.unflushed >= self.flush.bytes {
            self.flush_now()?;
        }
        Ok(())
    }

    fn flush_now(&mut self) -> Result<usize, SessionError> {
        self.unflushed = 0;
        self.last_flush_ms = (self.clock)();
        self.store.flush().map_err(store_failed)
    }

    /// Time passed: flushes what arrived once [`FlushPolicy::interval_ms`] went by since the
    /// last flush, so an idle link does not keep received chunks at risk. A clock that stepped
    /// back counts as due: the wait never depends on how far back it went.
    pub fn on_tick(&mut self) -> Result<(), SessionError> {
        let since = (self.clock)() - self.last_flush_ms;
        if self.unflushed > 0 && (since >= self.flush.interval_ms || since < 0) {
            self.flush_now()?;
        }
        Ok(())
    }

    /// The session is over, however it ended: makes what arrived durable for the next session
    /// (the chunks are kept even when no point references them yet). Returns how many chunks
    /// became durable.
    pub fn close(&mut self) -> Result<usize, SessionError> {
        self.flush_now()
    }

    /// A data or push stream ended. Once the last announced push stream has, a deferred offer
    /// is answered; once the last data stream has after Commit, the point is committed.
    pub fn on_stream_end(&mut self, kind: StreamKind) -> Result<TargetStep, SessionError> {
        match kind {
            StreamKind::Push => {
                self.push.streams.ended += 1;
                if self.state == State::AwaitPushes && self.push.streams.drained() {
                    return self.answer_offer();
                }
                Ok(TargetStep::Reply(vec![]))
            }
            StreamKind::Data => {
                self.data.ended += 1;
                self.commit_if_drained()
            }
        }
    }

    /// Takes a verified chunk from a data stream. Chunks not asked for are refused (a peer cannot
    /// fill the store with data no point will reference); repeats are ignored.
    pub fn on_chunk(&mut self, chunk: &Verified) -> Result<(), SessionError> {
        if !matches!(self.state, State::ReceivingChunks | State::Committing) {
            return Err(SessionError::Unexpected {
                got: "a chunk",
                state: describe(self.state),
            });
        }
        if !self.expected.remove(&chunk.hash()) {
            return Err(SessionError::Invalid(format!(
                "chunk {} was not requested",
                chunk.hash()
            )));
        }
        self.append(chunk)?;
        self.received.0 += 1;
        self.received.1 += chunk.frame().len() as u64;
        Ok(())
    }

    /// Commits the point once Commit arrived and every data stream it announced has ended.
    fn commit_if_drained(&mut self) -> Result<TargetStep, SessionError> {
        if self.state != State::Committing || !self.data.drained() {
            return Ok(TargetStep::Reply(vec![]));
        }
        self.commit().map(TargetStep::Committed)
    }

    fn commit(&mut self) -> Result<Control, SessionError> {
        self.state = State::Done;
        let p = self.pending.take().expect("pending offer in this state");
        let base = match p.kind {
            OfferKind::Delta { base } => Some(base),
            OfferKind::Full => None,
        };
        let now = (self.clock)();
        self.unflushed = 0;
        if self.mover.is_some() {
            return self.stage(p, base);
        }
        let final_for = self.final_for.take();
        match self.store.commit_point(CommitRequest {
            group: &self.group,
            cut: &p.cut,
            base,
            entries: &p.entries,
            received: self.received,
            committed_ms: now,
            final_for: final_for.as_deref(),
        }) {
            Ok(rec) => Ok(Control::Committed {
                seq: rec.seq,
                blocks_changed: rec.stats.blocks_changed,
                final_point: final_for.is_some() && self.is_final(&rec.seq)?,
            }),
            Err(CommitError::BaseMismatch { .. }) => Err(refuse(
                RefuseCode::BaseMismatch,
                "the group moved on during the session",
            )),
            Err(e @ CommitError::MissingChunks { .. }) => {
                Err(refuse(RefuseCode::MissingChunks, e.to_string()))
            }
            Err(e @ CommitError::EntryOutOfRange { .. }) => {
                Err(SessionError::Invalid(e.to_string()))
            }
            Err(CommitError::Store(e)) => Err(store_failed(e)),
        }
    }
}

impl TargetSession {
    /// True when `seq` is the final point of the group's migration (marked at its commit).
    fn is_final(&self, seq: &u64) -> Result<bool, SessionError> {
        let m = self.store.migration(&self.group).map_err(store_failed)?;
        Ok(m.and_then(|m| m.final_seq) == Some(*seq))
    }

    /// A mover's commit: its one volume becomes a staged part, durable, for the source's commit.
    fn stage(&mut self, p: Pending, base: Option<u64>) -> Result<Control, SessionError> {
        let grant = self.mover.as_ref().expect("a mover's session");
        let (Some(volume), Some((_, entries))) = (
            p.cut.volumes.into_iter().next(),
            p.entries.into_iter().next(),
        ) else {
            return Err(SessionError::Invalid(
                "a mover's offer has no volume".into(),
            ));
        };
        let mut referenced: Vec<ChunkHash> = entries
            .iter()
            .filter_map(|(_, r)| match r {
                BlockRef::Data(h) => Some(*h),
                BlockRef::Hole => None,
            })
            .collect();
        referenced.sort_unstable();
        referenced.dedup();
        let stage = grant.stage.clone();
        self.flush_now()?;
        let missing = self.store.missing(&referenced).map_err(store_failed)?;
        if let Some(first) = missing.first() {
            return Err(refuse(
                RefuseCode::MissingChunks,
                format!(
                    "{} chunks volume {} references are not stored (first: {first}); the mover must send them",
                    missing.len(),
                    volume.name
                ),
            ));
        }
        let part = StagedPart {
            stage,
            volume,
            block_size: p.cut.block_size,
            base,
            entries,
        };
        self.store
            .stage_part(&self.group, &part)
            .map_err(store_failed)?;
        Ok(Control::Staged {
            blocks_changed: part.entries.len() as u64,
        })
    }
}

fn list_name(cut: &CutMeta, v: usize) -> &str {
    cut.volumes.get(v).map_or("?", |m| m.name.as_str())
}

fn describe(s: State) -> &'static str {
    match s {
        State::AwaitHello => "waiting for Hello",
        State::AwaitOffer => "waiting for Offer",
        State::ReceivingEntries => "receiving entries",
        State::AwaitPushes => "waiting for push streams to end",
        State::ReceivingChunks => "receiving chunks",
        State::Committing => "committing",
        State::Done => "the session was over",
    }
}
