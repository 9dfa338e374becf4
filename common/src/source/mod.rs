//! The source side of the data path: the cut (the instant, hooks, scan of every volume against
//! the base), its spool of chunk frames, and the state that survives restarts (the base and the
//! pending cut).

pub mod base;
pub mod cut;
pub mod instant;
pub mod scan;
pub mod spool;
pub mod state;

pub use base::BaseInfo;
pub use cut::{CutConfig, CutObserver, ManifestSource, PendingCut, make_cut};
pub use instant::{CutInstant, FrozenLive, TakenInstant};
pub use state::GroupState;
