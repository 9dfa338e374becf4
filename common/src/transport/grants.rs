//! Mover grants: short-lived permissions a pinned source gives the certificates of its data
//! movers (protocol 4). A mover is not a peer: it holds a key made for one cut, and may only
//! stage the one volume it was granted, of one group, for one cut, until the grant expires. The
//! target keeps grants in memory only; a restarted target has none, and the source's cycle
//! fails and is made again.

use super::identity::Fingerprint;
use std::collections::HashMap;
use std::sync::Mutex;

/// What one mover certificate may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The group it stages into.
    pub group: String,
    /// The cut (stage id) it stages for.
    pub stage: String,
    /// The one volume it may stage.
    pub volume: String,
    /// When it lapses (ms since the Unix epoch).
    pub expires_ms: i64,
}

/// Longest life a grant may ask for: a cut's movers that need longer are made again.
pub const MAX_GRANT_MS: u64 = 24 * 3600 * 1000;

/// The grants in force, by mover fingerprint.
#[derive(Debug, Default)]
pub struct MoverGrants {
    grants: Mutex<HashMap<Fingerprint, Grant>>,
}

impl MoverGrants {
    /// No grants.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds grants (replacing any for the same fingerprints); drops lapsed ones.
    pub fn add(&self, grants: impl IntoIterator<Item = (Fingerprint, Grant)>, now_ms: i64) {
        let mut g = self.grants.lock().expect("grants lock");
        g.retain(|_, v| v.expires_ms > now_ms);
        g.extend(grants);
    }

    /// The grant of `fp` if one is in force at `now_ms`.
    pub fn get(&self, fp: &Fingerprint, now_ms: i64) -> Option<Grant> {
        let g = self.grants.lock().expect("grants lock");
        g.get(fp).filter(|v| v.expires_ms > now_ms).cloned()
    }

    /// Withdraws every grant of `group` (its cut committed or was given up).
    pub fn revoke_group(&self, group: &str) {
        self.grants
            .lock()
            .expect("grants lock")
            .retain(|_, v| v.group != group);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(group: &str, expires_ms: i64) -> Grant {
        Grant {
            group: group.into(),
            stage: "s".into(),
            volume: "v".into(),
            expires_ms,
        }
    }

    #[test]
    fn grants_lapse_and_are_revoked_by_group() {
        let g = MoverGrants::new();
        let (a, b) = (Fingerprint::of(b"a"), Fingerprint::of(b"b"));
        g.add(
            [
                (a.clone(), grant("one", 100)),
                (b.clone(), grant("two", 100)),
            ],
            0,
        );
        assert_eq!(g.get(&a, 99).unwrap().group, "one");
        assert!(g.get(&a, 100).is_none(), "a lapsed grant is not in force");
        g.revoke_group("two");
        assert!(g.get(&b, 0).is_none());
        assert!(g.get(&Fingerprint::of(b"c"), 0).is_none());
    }
}
