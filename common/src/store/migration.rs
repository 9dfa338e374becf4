//! Planned migrations: a request, on the standby, that the source quiesce the application and
//! send one final point. The request is kept per group in the catalog; the source learns of it
//! in a session's `Welcome`, and the point it commits as the final state is marked in the same
//! transaction that makes the point visible (docs/store-format.md, docs/protocol.md).

use super::Store;
use super::catalog::{self, MIGRATIONS};
use anyhow::Result;
use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};

/// A group's planned migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    /// Who asked (a migrate Failover's uid); the source names it when it commits the final point.
    pub id: String,
    /// When it was asked (ms since the Unix epoch).
    pub requested_ms: i64,
    /// The point the source committed as the group's final state, once it has.
    pub final_seq: Option<u64>,
}

impl Migration {
    /// Still waiting for the source's final point.
    pub fn pending(&self) -> bool {
        self.final_seq.is_none()
    }

    fn decode(b: &[u8]) -> Result<Self> {
        postcard::from_bytes(b)
            .map_err(|e| anyhow::anyhow!("undecodable migration record in the catalog: {e}"))
    }
}

impl Store {
    /// Asks for a migration of `group` under `id`; asking again with the same id keeps the
    /// first request (and its final point, if there is one); another id replaces it.
    pub fn request_migration(&self, group: &str, id: &str, now_ms: i64) -> Result<Migration> {
        let txn = self.db().begin_write()?;
        let m = {
            let mut t = txn.open_table(MIGRATIONS)?;
            let old = t
                .get(group)?
                .map(|v| Migration::decode(v.value()))
                .transpose()?;
            match old {
                Some(m) if m.id == id => m,
                _ => {
                    let m = Migration {
                        id: id.to_string(),
                        requested_ms: now_ms,
                        final_seq: None,
                    };
                    t.insert(group, postcard::to_stdvec(&m)?.as_slice())?;
                    m
                }
            }
        };
        catalog::commit(txn)?;
        Ok(m)
    }

    /// The group's migration request, if any.
    pub fn migration(&self, group: &str) -> Result<Option<Migration>> {
        let txn = self.db().begin_read()?;
        let t = txn.open_table(MIGRATIONS)?;
        t.get(group)?
            .map(|v| Migration::decode(v.value()))
            .transpose()
    }

    /// Withdraws request `id` of `group` (a migration given up); another id's is left alone.
    pub fn cancel_migration(&self, group: &str, id: &str) -> Result<()> {
        let txn = self.db().begin_write()?;
        {
            let mut t = txn.open_table(MIGRATIONS)?;
            let ours = t
                .get(group)?
                .map(|v| Migration::decode(v.value()))
                .transpose()?
                .is_some_and(|m| m.id == id);
            if ours {
                t.remove(group)?;
            }
        }
        catalog::commit(txn)
    }
}

/// In a commit's transaction: marks point `seq` as the final state of `group`'s pending
/// migration `id`. A request withdrawn or replaced meanwhile is left as it is (the point
/// commits all the same; the source is told it was not taken as final).
pub(crate) fn mark_final(
    txn: &redb::WriteTransaction,
    group: &str,
    id: &str,
    seq: u64,
) -> Result<()> {
    let mut t = txn.open_table(MIGRATIONS)?;
    let m = t
        .get(group)?
        .map(|v| Migration::decode(v.value()))
        .transpose()?;
    if let Some(mut m) = m.filter(|m| m.id == id && m.pending()) {
        m.final_seq = Some(seq);
        t.insert(group, postcard::to_stdvec(&m)?.as_slice())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_survives_a_reopen_is_kept_for_its_id_and_only_its_own_id_withdraws_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.migration("g").unwrap(), None);
        let m = store.request_migration("g", "a", 10).unwrap();
        assert!(m.pending());
        // Asked again under the same id: the first request stands.
        assert_eq!(
            store.request_migration("g", "a", 20).unwrap().requested_ms,
            10
        );
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.migration("g").unwrap(), Some(m));
        store.cancel_migration("g", "b").unwrap();
        assert!(
            store.migration("g").unwrap().is_some(),
            "another id leaves it"
        );
        assert_eq!(
            store.request_migration("g", "b", 30).unwrap().id,
            "b",
            "replaced"
        );
        store.cancel_migration("g", "b").unwrap();
        assert_eq!(store.migration("g").unwrap(), None);
    }
}
