//! The source side of a session, as a state machine: feed it the target's control messages, it
//! says what to send next.

use super::messages::*;
use crate::hash::{BlockRef, ChunkHash};
use crate::store::CutMeta;

/// What the source offers: a cut and its block-map entries per volume (indexed like `cut.volumes`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Offer {
    /// Delta against a base point, or full.
    pub kind: OfferKind,
    /// The cut.
    pub cut: CutMeta,
    /// Entries per volume, in `cut.volumes` order, block indices increasing.
    pub entries: Vec<Vec<(u64, BlockRef)>>,
    /// Protocol 4: the volumes' entries are the parts movers staged for this stage id (and
    /// `entries` is empty).
    #[serde(default)]
    pub parts: Option<String>,
}

/// A session ended by the peer or by a protocol violation.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("target refused the session ({code:?}): {message}")]
    Refused { code: RefuseCode, message: String },
    #[error("protocol violation: got {got} while {state}")]
    Unexpected {
        got: &'static str,
        state: &'static str,
    },
    #[error("{0}")]
    Invalid(String),
}

/// What the caller should do after a message.
#[derive(Debug, PartialEq, Eq)]
pub enum SourceStep {
    /// Send these control messages (possibly none) and keep reading.
    Send(Vec<Control>),
    /// Send these chunks on data streams, then send [`SourceSession::commit`].
    SendChunks(Vec<ChunkHash>),
    /// The target already committed this very cut as point `seq` (an earlier session got that far).
    AlreadyCommitted { seq: u64 },
    /// The target's latest point is not this delta's base: make a full cut and offer that.
    BaseMismatch { latest: Option<u64> },
    /// Done: the cut is point `seq` on the target.
    Committed { seq: u64, blocks_changed: u64 },
    /// A mover: base entries of its volume, to compare the scan against (block order).
    Base(Vec<(u64, ChunkHash)>),
    /// A mover: the base is complete.
    BaseEnd,
    /// A mover: done, its volume is staged on the target.
    Staged { blocks_changed: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitWelcome,
    /// Welcomed; the cut is still being made (its chunks are pushed meanwhile).
    AwaitCut,
    AwaitNeed,
    Sending,
    AwaitCommitted,
    Done,
}

impl State {
    fn describe(self) -> &'static str {
        match self {
            State::AwaitWelcome => "waiting for Welcome",
            State::AwaitCut => "making the cut",
            State::AwaitNeed => "waiting for Need",
            State::Sending => "sending chunks",
            State::AwaitCommitted => "waiting for Committed",
            State::Done => "the session was over",
        }
    }
}

/// Source session state.
pub struct SourceSession {
    /// A mover's session: base entries received so far and the last block index, until BaseEnd.
    base: Option<(u64, Option<u64>, bool)>,
    offer: Option<Offer>,
    latest: Option<(u64, String)>,
    push: Option<Control>,
    push_allowed: bool,
    state: State,
    need: Vec<ChunkHash>,
    /// The group's migration as the target told it (Welcome, then Committed).
    migration: Option<MigrationState>,
    /// The pending migration this session's point ends, named in its Commit.
    final_for: Option<String>,
}

impl SourceSession {
    /// Starts a session for `group` offering a cut already made; returns it and the first
    /// message to send.
    pub fn new(group: &str, offer: Offer) -> (Self, Control) {
        Self::start(group, Some(offer))
    }

    /// Starts a session for `group` while the cut is still being made (protocol 2): after
    /// Welcome the caller pushes chunks, then hands the cut to [`SourceSession::set_offer`].
    pub fn pushing(group: &str) -> (Self, Control) {
        Self::start(group, None)
    }

    /// Starts a mover's session (protocol 4): `Join` for one volume; after Welcome the target
    /// sends the volume's base ([`SourceStep::Base`], [`SourceStep::BaseEnd`]) while the caller
    /// scans and pushes; then [`SourceSession::set_offer`] with a one-volume cut, as a source.
    pub fn mover(group: &str, stage: &str, volume: &str, block_size: u32) -> (Self, Control) {
        let (mut s, _) = Self::start(group, None);
        s.base = Some((0, None, false));
        let join = Control::Join {
            group: group.to_string(),
            stage: stage.to_string(),
            volume: volume.to_string(),
            block_size,
        };
        (s, join)
    }

    /// The target's latest point (seq, cut id), once Welcome arrived.
    pub fn latest(&self) -> Option<(u64, String)> {
        self.latest.clone()
    }

    /// The group's planned migration as the target last told it (Welcome; Committed when this
    /// session's point was taken as its final state).
    pub fn migration(&self) -> Option<&MigrationState> {
        self.migration.as_ref()
    }

    /// Commits this session's point as the final state of pending migration `id`.
    pub fn end_migration(&mut self, id: &str) {
        self.final_for = Some(id.to_string());
    }

    /// A mover: true once the whole base arrived.
    pub fn base_complete(&self) -> bool {
        self.base.is_none_or(|(_, _, done)| done)
    }

    fn start(group: &str, offer: Option<Offer>) -> (Self, Control) {
        let s = SourceSession {
            base: None,
            offer,
            latest: None,
            push: None,
            push_allowed: false,
            state: State::AwaitWelcome,
            need: Vec::new(),
            migration: None,
            final_for: None,
        };
        (
            s,
            Control::Hello {
                group: group.to_string(),
            },
        )
    }

    /// True once Welcome arrived and the session waits for the cut.
    pub fn awaits_cut(&self) -> bool {
        self.state == State::AwaitCut
    }

    /// True when the target's Welcome allowed pushing chunks while the cut is made.
    pub fn push_allowed(&self) -> bool {
        self.push_allowed
    }

    /// The cut is made: `pushed` chunks went out on `push_streams` push streams meanwhile.
    /// Says what to do next, as after Welcome.
    pub fn set_offer(
        &mut self,
        offer: Offer,
        push_streams: u32,
        pushed: u64,
    ) -> Result<SourceStep, SessionError> {
        if self.state != State::AwaitCut || !self.base_complete() {
            return Err(SessionError::Unexpected {
                got: "the cut",
                state: self.state.describe(),
            });
        }
        self.offer = Some(offer);
        self.push = Some(Control::PushEnd {
            streams: push_streams,
            chunks: pushed,
        });
        Ok(self.on_welcome(self.latest.clone()))
    }

    /// Handles one message from the target.
    pub fn on_message(&mut self, msg: Control) -> Result<SourceStep, SessionError> {
        match (self.state, msg) {
            (
                _,
                Control::Refused {
                    code: RefuseCode::BaseMismatch,
                    ..
                },
            ) => {
                self.state = State::Done;
                Ok(SourceStep::BaseMismatch { latest: None })
            }
            (_, Control::Refused { code, message }) => {
                self.state = State::Done;
                Err(SessionError::Refused { code, message })
            }
            (
                State::AwaitWelcome,
                Control::Welcome {
                    latest,
                    push,
                    migration,
                },
            ) => {
                self.push_allowed = push;
                self.migration = migration;
                Ok(self.on_welcome(latest))
            }
            (State::AwaitCut, Control::BaseEntries { entries }) if !self.base_complete() => {
                let (count, last, _) = self.base.as_mut().expect("a mover's session");
                for (index, _) in &entries {
                    if last.is_some_and(|l| *index <= l) {
                        return Err(SessionError::Invalid(format!(
                            "base entry for block {index} is out of order"
                        )));
                    }
                    *last = Some(*index);
                }
                *count += entries.len() as u64;
                Ok(SourceStep::Base(entries))
            }
            (State::AwaitCut, Control::BaseEnd { entries }) if !self.base_complete() => {
                let (count, _, done) = self.base.as_mut().expect("a mover's session");
                if entries != *count {
                    return Err(SessionError::Invalid(format!(
                        "target announced {entries} base entries but sent {count}"
                    )));
                }
                *done = true;
                Ok(SourceStep::BaseEnd)
            }
            (State::AwaitCommitted, Control::Staged { blocks_changed }) if self.base.is_some() => {
                self.state = State::Done;
                Ok(SourceStep::Staged { blocks_changed })
            }
            (State::AwaitNeed, Control::Need { hashes }) => {
                self.need.extend(hashes);
                Ok(SourceStep::Send(vec![]))
            }
            (State::AwaitNeed, Control::NeedEnd { needed, .. }) => {
                if needed != self.need.len() as u64 {
                    return Err(SessionError::Invalid(format!(
                        "target announced {needed} needed chunks but listed {}",
                        self.need.len()
                    )));
                }
                self.state = State::Sending;
                Ok(SourceStep::SendChunks(std::mem::take(&mut self.need)))
            }
            (
                State::AwaitCommitted,
                Control::Committed {
                    seq,
                    blocks_changed,
                    final_point,
                },
            ) => {
                self.state = State::Done;
                if let (true, Some(id)) = (final_point, &self.final_for) {
                    self.migration = Some(MigrationState {
                        id: id.clone(),
                        final_seq: Some(seq),
                    });
                }
                Ok(SourceStep::Committed {
                    seq,
                    blocks_changed,
                })
            }
            (state, other) => Err(SessionError::Unexpected {
                got: other.name(),
                state: state.describe(),
            }),
        }
    }

    fn on_welcome(&mut self, latest: Option<(u64, String)>) -> SourceStep {
        let Some(offer) = &self.offer else {
            self.latest = latest;
            self.state = State::AwaitCut;
            return SourceStep::Send(vec![]);
        };
        if let Some((seq, cut_id)) = &latest
            && *cut_id == offer.cut.cut_id
        {
            self.state = State::Done;
            return SourceStep::AlreadyCommitted { seq: *seq };
        }
        if let OfferKind::Delta { base } = offer.kind
            && latest.as_ref().map(|l| l.0) != Some(base)
        {
            self.state = State::Done;
            return SourceStep::BaseMismatch {
                latest: latest.map(|l| l.0),
            };
        }
        self.state = State::AwaitNeed;
        SourceStep::Send(self.offer_messages())
    }

    fn offer_messages(&self) -> Vec<Control> {
        let offer = self.offer.as_ref().expect("offer set before it is sent");
        let mut out: Vec<Control> = self.push.iter().cloned().collect();
        out.push(Control::Offer {
            kind: offer.kind,
            cut: offer.cut.clone(),
        });
        if let Some(stage) = &offer.parts {
            out.push(Control::UseParts {
                stage: stage.clone(),
            });
        }
        let mut total = 0u64;
        for (i, entries) in offer.entries.iter().enumerate() {
            for batch in entries.chunks(ENTRIES_PER_MESSAGE) {
                total += batch.len() as u64;
                out.push(Control::Entries {
                    volume: i as u32,
                    entries: batch.to_vec(),
                });
            }
        }
        out.push(Control::OfferEnd { entries: total });
        out
    }

    /// The commit message, once every needed chunk was written to `data_streams` streams.
    pub fn commit(&mut self, data_streams: u32, chunks: u64) -> Control {
        self.state = State::AwaitCommitted;
        Control::Commit {
            data_streams,
            chunks,
            final_for: self.final_for.clone(),
        }
    }
}
