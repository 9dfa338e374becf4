//! The cut, the source side of the data path: the instant ([`instant`]), the manifests taken
//! inside it ([`manifests`]), the scan of every volume against the base ([`scan`]), the spool of
//! chunk frames ([`spool`]), and the state that survives restarts ([`state`], [`base`]: the base
//! and the pending cut). [`make`] runs these in order.

pub mod base;
pub mod instant;
pub mod make;
pub mod manifests;
pub mod scan;
pub mod snapshot;
pub mod spool;
pub mod state;

pub use base::BaseInfo;
pub use instant::{CutInstant, FrozenLive, TakenInstant};
pub use make::{CutConfig, CutObserver, PendingCut, make_cut};
pub use manifests::{CapturedManifests, ManifestSource, NoManifests};
pub use state::GroupState;
