//! Taking a cut's instant: the moment every volume of the group is captured together (invariant
//! 3), behind a seam. Standalone, the instant is a freeze of the live volumes ([`FrozenLive`]):
//! the pre hook runs, the volumes are read while the application is frozen, and the post hook
//! runs when reading ends. With a VolumeGroupSnapshot the instant is the snapshot: the hooks run
//! around its creation only, the thaw comes at once, and the snapshots are read afterwards (an
//! implementation returns their block devices and holds nothing).

use crate::hooks::{Hook, Thaw};
use crate::volume::{Volume, VolumeSpec};
use anyhow::{Context, Result};

/// An instant taken: when, the volumes as of then, and what holds the instant while they are
/// read (a freeze, thawed when this value is dropped; `None` when the volumes are snapshots).
pub struct TakenInstant {
    /// When the instant was taken (ms since epoch): RPO is measured from here.
    pub created_ms: i64,
    /// The group's volumes as of the instant, opened for reading, in the group's order.
    pub volumes: Vec<(String, Volume)>,
    /// Dropped once the volumes are read.
    pub hold: Option<Thaw>,
}

/// Takes a cut's instant.
pub trait CutInstant: Send + Sync {
    /// Takes it. Errors name what failed (a volume that cannot be opened, a failing freeze); a
    /// freeze that ran is always thawed, also on error.
    fn take(&self) -> Result<TakenInstant>;
}

/// Standalone mode: the live volumes, frozen by the pre hook while they are read.
pub struct FrozenLive<'a> {
    /// The volumes, in order.
    pub volumes: &'a [VolumeSpec],
    /// Freeze command.
    pub pre_hook: Option<&'a Hook>,
    /// Thaw command.
    pub post_hook: Option<&'a Hook>,
}

impl CutInstant for FrozenLive<'_> {
    fn take(&self) -> Result<TakenInstant> {
        // Opened before the freeze: a missing volume fails without freezing anything.
        let volumes = self
            .volumes
            .iter()
            .map(|v| {
                Volume::open(&v.path)
                    .with_context(|| format!("volume {} cannot be read", v.name))
                    .map(|vol| (v.name.clone(), vol))
            })
            .collect::<Result<_>>()?;
        let thaw = crate::hooks::freeze(self.pre_hook, self.post_hook)?;
        Ok(TakenInstant {
            created_ms: crate::now_ms(),
            volumes,
            hold: Some(thaw),
        })
    }
}
