//! The archive's keys: the operator's key-encryption key from the command line or the
//! environment, and the key generations kept in the bucket under `keys/` (wrapped by it,
//! [`understudy_common::keys`]). An archive is encrypted from its first snapshot or not at all.

use crate::bucket::Bucket;
use crate::layout::{self, Manifest};
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use understudy_common::keys::{
    Kek, KekSource, KeyObject, Keyring, key_object_generation, key_object_name,
};

/// The environment variable a key can come in (e.g. from a Kubernetes Secret).
pub const KEY_ENV: &str = "UNDERSTUDY_ARCHIVE_KEY";

/// Where the archive's key-encryption key comes from; none of them: no encryption.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct KeyArgs {
    /// Encrypt the archive (or read an encrypted one) with the 32-byte key in this file (raw,
    /// 64 hex digits or base64; a mounted Secret does). Or put the key in
    /// $UNDERSTUDY_ARCHIVE_KEY. Keep it apart from the bucket: the two together read everything.
    #[arg(long = "archive-key-file", conflicts_with = "passphrase_file")]
    pub key_file: Option<PathBuf>,
    /// Like --archive-key-file, with a passphrase (the file's first line, 12 bytes or more)
    /// stretched by Argon2id.
    #[arg(long = "archive-passphrase-file")]
    pub passphrase_file: Option<PathBuf>,
}

impl KeyArgs {
    /// Loads the key-encryption key, if one is given.
    pub fn kek(&self) -> Result<Option<Kek>> {
        let source = match (&self.key_file, &self.passphrase_file) {
            (Some(f), _) => KekSource::File(f.clone()),
            (None, Some(p)) => KekSource::PassphraseFile(p.clone()),
            (None, None) if std::env::var_os(KEY_ENV).is_some() => {
                KekSource::Env(KEY_ENV.to_string())
            }
            (None, None) => return Ok(None),
        };
        Kek::load(source).map(Some)
    }
}

/// The key objects in the bucket whose generation `known` lacks (in generation order), and
/// how many the bucket holds in all.
async fn new_key_objects(bucket: &Bucket, known: &Keyring) -> Result<(Vec<KeyObject>, usize)> {
    let listed = bucket.list(layout::KEYS).await?;
    let mut out = Vec::new();
    for o in &listed {
        if key_object_generation(&o.name).is_some_and(|g| known.has(g)) {
            continue;
        }
        let Some(bytes) = bucket.get(&o.name).await? else {
            continue; // deleted since the listing
        };
        out.push(serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{}{} is not a key object: the archive is damaged",
                bucket.describe(),
                o.name
            )
        })?);
    }
    out.sort_by_key(|o: &KeyObject| o.generation);
    Ok((out, listed.len()))
}

/// The keys to read the archive with: `None` for an archive that is not encrypted, and with a
/// KEK, every generation it opens (an error when it is the wrong one). Generations whose key
/// object is gone are missing from the ring, and what they sealed is refused by name.
pub async fn for_reading(bucket: &Bucket, kek: Option<&Kek>) -> Result<Option<Keyring>> {
    refresh(bucket, kek, &Keyring::default()).await
}

/// [`for_reading`], opening only the generations `known` lacks (each costs an unwrap, and for a
/// passphrase an Argon2id run).
async fn refresh(bucket: &Bucket, kek: Option<&Kek>, known: &Keyring) -> Result<Option<Keyring>> {
    let (objects, listed) = new_key_objects(bucket, known).await?;
    match kek {
        None if listed == 0 => Ok(None),
        None => bail!(
            "{} is encrypted ({listed} key generations): give its key (--archive-key-file, --archive-passphrase-file or ${KEY_ENV})",
            bucket.describe()
        ),
        Some(kek) => {
            let mut ring = known.clone();
            for o in &objects {
                ring.insert(
                    o.open(kek)
                        .with_context(|| format!("the keys of {}", bucket.describe()))?,
                );
            }
            Ok(Some(ring))
        }
    }
}

/// The keys to archive with, `known` those opened before (an archiver's earlier rounds) and
/// `newest` the bucket's newest manifest: as [`for_reading`], and for an encrypted archive that
/// has no key yet (a new prefix), its first generation, made and stored now. Refuses to mix: a
/// key for an archive that holds unencrypted snapshots, or an archive whose snapshots are
/// sealed under generations it has lost.
pub async fn for_writing(
    bucket: &Bucket,
    kek: Option<&Kek>,
    known: &Keyring,
    newest: Option<&Manifest>,
) -> Result<Option<Keyring>> {
    let Some(mut ring) = refresh(bucket, kek, known).await? else {
        return Ok(None);
    };
    if let Some(m) = newest {
        match m.key_generation {
            None => bail!(
                "{} holds unencrypted snapshots: archive encrypted into a new --archive-prefix (or go on without --archive-key-file)",
                bucket.describe()
            ),
            Some(g) => {
                ring.get(g)
                    .with_context(|| format!("snapshot {} of {}", m.stamp, bucket.describe()))?;
            }
        }
    }
    if ring.is_empty() {
        ring.insert(create_generation(bucket, kek.expect("a ring comes with a KEK"), 1).await?);
    }
    Ok(Some(ring))
}

/// Makes key generation `g` and stores its key object; refused when it exists.
async fn create_generation(
    bucket: &Bucket,
    kek: &Kek,
    g: u32,
) -> Result<understudy_common::keys::DataKey> {
    let (obj, key) = KeyObject::create(kek, g)?;
    let name = key_object_name(g);
    if !bucket
        .put_new(&name, serde_json::to_vec_pretty(&obj)?)
        .await?
    {
        bail!(
            "{}{name} was created meanwhile: is another agent writing keys into this archive? run again",
            bucket.describe()
        );
    }
    Ok(key)
}

/// Starts a new key generation: new data is sealed with it, old data stays readable with the
/// older ones. Returns its number.
pub async fn rotate(bucket: &Bucket, kek: &Kek) -> Result<u32> {
    let newest = crate::archiver::newest_manifest(bucket).await?;
    let ring = for_writing(bucket, Some(kek), &Keyring::default(), newest.as_ref())
        .await?
        .unwrap_or_default();
    let g = ring.current().map_or(1, |k| k.generation() + 1);
    create_generation(bucket, kek, g).await?;
    Ok(g)
}
