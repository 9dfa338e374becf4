//! Control-stream messages of protocol version 5 (see docs/protocol.md, "Changes").

use crate::hash::{BlockRef, ChunkHash};
use crate::store::CutMeta;
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 7;
/// TLS ALPN token of Understudy sessions (the version is negotiated in the preamble).
pub const ALPN: &[u8] = b"understudy";
/// First bytes of the control stream, in both directions, before the version.
pub const PREAMBLE_MAGIC: &[u8; 4] = b"UNDR";
/// Largest control message accepted, in bytes.
pub const MAX_CONTROL_MESSAGE: u32 = 4 << 20;
/// Block-map entries per `Entries` message.
pub const ENTRIES_PER_MESSAGE: usize = 16 * 1024;
/// Hashes per `Need` message.
pub const HASHES_PER_MESSAGE: usize = 16 * 1024;
/// First byte of a data stream carrying chunks the target asked for.
pub const DATA_STREAM_KIND: u8 = 0x01;
/// First byte of a push stream: chunks sent while the cut is still being made, before the
/// target could ask for them (protocol 2).
pub const PUSH_STREAM_KIND: u8 = 0x02;
/// How long a side that failed a session keeps the connection open for its peer to read the
/// Refused that says why (the target after refusing; the source waiting for it after a push
/// broke).
pub const REFUSAL_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether an offer's entries are a delta or a full declaration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OfferKind {
    /// Entries list only blocks changed since point `base`, which must be the target's latest.
    Delta { base: u64 },
    /// Entries list every block of every volume.
    Full,
}

/// Why a session was refused or ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseCode {
    /// The peer sent a message that is not valid at this point of the session.
    Protocol,
    /// Another session of the same group is running on the target.
    GroupBusy,
    /// The delta's base is not the target's latest point: send a full offer.
    BaseMismatch,
    /// The commit named chunks the target does not hold.
    MissingChunks,
    /// The offer is malformed (bad block size, names, entries).
    BadOffer,
    /// The target's store failed (disk full, I/O error).
    StoreFailed,
}

/// One control message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// Source -> target, first message: which group this session replicates.
    Hello { group: String },
    /// Target -> source: the group's latest committed point (seq, cut id), if any, and whether
    /// the source may push chunks before its offer (protocol 2): not after a transfer of the
    /// group broke, because pushing cannot skip what the target already holds.
    /// It also says whether a planned migration of the group was asked on the standby
    /// (protocol 6): the source quiesces the application and commits one final point for it.
    Welcome {
        latest: Option<(u64, String)>,
        push: bool,
        migration: Option<MigrationState>,
    },
    /// Source -> target: a cut to replicate.
    Offer { kind: OfferKind, cut: CutMeta },
    /// Source -> target: block-map entries of one volume of the offer (index into `cut.volumes`).
    Entries {
        volume: u32,
        entries: Vec<(u64, BlockRef)>,
    },
    /// Source -> target: all entries sent.
    OfferEnd { entries: u64 },
    /// Target -> source: chunks it lacks.
    Need { hashes: Vec<ChunkHash> },
    /// Target -> source: all needs sent; `held` counts referenced chunks it already had.
    NeedEnd { needed: u64, held: u64 },
    /// Source -> target: every needed chunk was sent on `data_streams` data streams; commit.
    /// `final_for` names the pending migration whose final state this point is (protocol 6).
    Commit {
        data_streams: u32,
        chunks: u64,
        final_for: Option<String>,
    },
    /// Target -> source: the point is durable and visible; `final_point` when it was taken as
    /// the final state of the migration the Commit named (false: that migration was withdrawn).
    Committed {
        seq: u64,
        blocks_changed: u64,
        final_point: bool,
    },
    /// Either side: the session cannot go on.
    Refused { code: RefuseCode, message: String },
    /// Source -> target, before Offer: chunks were pushed on `streams` push streams while the
    /// cut was made (protocol 2). The target answers the offer once those streams drained.
    PushEnd { streams: u32, chunks: u64 },
    /// Source -> target, first message of a short session (protocol 4): let movers with these
    /// certificates read and stage the named volumes of `group` for the cut `stage`, for
    /// `ttl_ms`. Only a pinned source may send it.
    AuthorizeMovers {
        group: String,
        stage: String,
        grants: Vec<MoverGrant>,
        ttl_ms: u64,
    },
    /// Target -> source: the grants are in force.
    MoversAuthorized { count: u32 },
    /// Mover -> target, first message of a mover's session (protocol 4): the volume it stages.
    /// The target answers `Welcome`, then the volume's map at the latest point as `BaseEntries`
    /// and `BaseEnd`; the session then runs as a source's, with a one-volume offer.
    Join {
        group: String,
        stage: String,
        volume: String,
        block_size: u32,
    },
    /// Target -> mover: data blocks of the volume at the latest point, in block order; target ->
    /// writer: data blocks of the fetched volume, in block order (protocol 5).
    BaseEntries { entries: Vec<(u64, ChunkHash)> },
    /// Target -> mover: all base entries sent.
    BaseEnd { entries: u64 },
    /// Target -> mover: the volume is staged, durable, for the source's commit.
    Staged { blocks_changed: u64 },
    /// Source -> target, in place of `Entries` (protocol 4): the entries of every volume of the
    /// offer are the ones movers staged for `stage`.
    UseParts { stage: String },
    /// Writer -> target, first message of a writer's session (protocol 5): read `volume` of point
    /// `seq` of `group`, as the writer's grant allows. The target answers `Volume`, then the
    /// volume's data blocks as `BaseEntries` and `BaseEnd`, and sends each entry's chunk frame,
    /// in the same order, on one data stream (see [`super::fetch`]). With `basis` (protocol 7)
    /// the writer holds an earlier copy of the volume: after each `BaseEntries` the target waits
    /// for its `Want` and sends only the frames it picks.
    Fetch {
        group: String,
        seq: u64,
        volume: String,
        basis: bool,
    },
    /// Writer -> target, once per `BaseEntries` of a basis fetch (protocol 7): the positions, in
    /// that message, of the entries whose block the writer's copy does not hold, increasing.
    Want { picks: Vec<u32> },
    /// Target -> writer: the volume fetched, and the digest the source declared at the cut.
    Volume {
        size: u64,
        block_size: u32,
        digest: String,
        created_ms: i64,
    },
}

/// A planned migration of a group, as the target tells the source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationState {
    /// The request's id (the source names it in the final Commit).
    pub id: String,
    /// The point committed as the final state, once there is one.
    pub final_seq: Option<u64>,
}

/// Lets one mover certificate stage one volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoverGrant {
    /// The volume (a name of the group's cut).
    pub volume: String,
    /// SHA-256 fingerprint of the mover's certificate (`sha256:<hex>`).
    pub fingerprint: String,
}

impl Control {
    /// Short name for logs and protocol errors.
    pub fn name(&self) -> &'static str {
        match self {
            Control::Hello { .. } => "Hello",
            Control::Welcome { .. } => "Welcome",
            Control::Offer { .. } => "Offer",
            Control::Entries { .. } => "Entries",
            Control::OfferEnd { .. } => "OfferEnd",
            Control::Need { .. } => "Need",
            Control::NeedEnd { .. } => "NeedEnd",
            Control::Commit { .. } => "Commit",
            Control::Committed { .. } => "Committed",
            Control::Refused { .. } => "Refused",
            Control::PushEnd { .. } => "PushEnd",
            Control::AuthorizeMovers { .. } => "AuthorizeMovers",
            Control::MoversAuthorized { .. } => "MoversAuthorized",
            Control::Join { .. } => "Join",
            Control::BaseEntries { .. } => "BaseEntries",
            Control::BaseEnd { .. } => "BaseEnd",
            Control::Staged { .. } => "Staged",
            Control::UseParts { .. } => "UseParts",
            Control::Fetch { .. } => "Fetch",
            Control::Want { .. } => "Want",
            Control::Volume { .. } => "Volume",
        }
    }
}
