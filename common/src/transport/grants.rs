//! Grants: short-lived permissions for certificates that are not peers. A pinned source grants
//! its data movers the right to stage one volume of one cut (protocol 4); the target agent
//! grants a writer (a volume populator's pod, or `target-agent write`) the right to read one
//! volume of one point (protocol 5). Each key is made for that one task and lapses with its
//! grant. The target keeps grants in memory only; a restarted target has none, and what needed
//! them is made again.

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

/// What one writer certificate may read: one volume of one committed point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchGrant {
    /// The group.
    pub group: String,
    /// The point's sequence number.
    pub seq: u64,
    /// The one volume it may read.
    pub volume: String,
    /// When it lapses (ms since the Unix epoch).
    pub expires_ms: i64,
}

/// A grant of either kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Permit {
    /// A mover's: stage a volume.
    Stage(Grant),
    /// A writer's: read a volume of a point.
    Fetch(FetchGrant),
}

impl Permit {
    fn expires_ms(&self) -> i64 {
        match self {
            Permit::Stage(g) => g.expires_ms,
            Permit::Fetch(g) => g.expires_ms,
        }
    }
}

/// Longest life a grant may ask for: a cut's movers that need longer are made again.
pub const MAX_GRANT_MS: u64 = 24 * 3600 * 1000;

/// The grants in force, by certificate fingerprint.
#[derive(Debug, Default)]
pub struct Grants {
    grants: Mutex<HashMap<Fingerprint, Permit>>,
}

impl Grants {
    /// No grants.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds grants (replacing any for the same fingerprints); drops lapsed ones.
    pub fn add(&self, grants: impl IntoIterator<Item = (Fingerprint, Permit)>, now_ms: i64) {
        let mut g = self.grants.lock().expect("grants lock");
        g.retain(|_, v| v.expires_ms() > now_ms);
        g.extend(grants);
    }

    /// The grant of `fp` if one is in force at `now_ms`.
    pub fn get(&self, fp: &Fingerprint, now_ms: i64) -> Option<Permit> {
        let g = self.grants.lock().expect("grants lock");
        g.get(fp).filter(|v| v.expires_ms() > now_ms).cloned()
    }

    /// Withdraws every mover grant of `group` (its cut committed or was given up). Writers'
    /// grants stay until they lapse: a point is read long after it committed.
    pub fn revoke_group(&self, group: &str) {
        self.grants
            .lock()
            .expect("grants lock")
            .retain(|_, v| !matches!(v, Permit::Stage(g) if g.group == group));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(group: &str, expires_ms: i64) -> Permit {
        Permit::Stage(Grant {
            group: group.into(),
            stage: "s".into(),
            volume: "v".into(),
            expires_ms,
        })
    }

    fn group_of(p: Permit) -> String {
        match p {
            Permit::Stage(g) => g.group,
            Permit::Fetch(g) => g.group,
        }
    }

    #[test]
    fn grants_lapse_and_are_revoked_by_group() {
        let g = Grants::new();
        let (a, b) = (Fingerprint::of(b"a"), Fingerprint::of(b"b"));
        g.add(
            [
                (a.clone(), grant("one", 100)),
                (b.clone(), grant("two", 100)),
            ],
            0,
        );
        assert_eq!(group_of(g.get(&a, 99).unwrap()), "one");
        assert!(g.get(&a, 100).is_none(), "a lapsed grant is not in force");
        g.revoke_group("two");
        assert!(g.get(&b, 0).is_none());
        assert!(g.get(&Fingerprint::of(b"c"), 0).is_none());
    }

    #[test]
    fn a_writers_grant_outlives_the_commit_of_its_group() {
        let g = Grants::new();
        let w = Fingerprint::of(b"w");
        let fetch = FetchGrant {
            group: "two".into(),
            seq: 3,
            volume: "v".into(),
            expires_ms: 100,
        };
        g.add([(w.clone(), Permit::Fetch(fetch.clone()))], 0);
        g.revoke_group("two");
        assert_eq!(g.get(&w, 0), Some(Permit::Fetch(fetch)));
        assert!(g.get(&w, 100).is_none(), "it lapses all the same");
    }
}
