//! The source side of the data path: the cut (hooks, manifests, scan of every volume at one
//! instant), its spool of chunk frames, and the state that survives restarts.

pub mod cut;
pub mod scan;
pub mod spool;
pub mod state;

pub use cut::{CutConfig, ManifestSource, PendingCut, make_cut};
pub use state::{Base, GroupState};
