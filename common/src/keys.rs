//! Keys for encryption at rest (docs/store-format.md, "Keys"). A repository (a store, or an
//! archive in a bucket) has numbered key generations; each generation's secrets (a data key that
//! seals frames with AES-256-GCM and an address key that hides chunk addresses behind a keyed
//! BLAKE3) are random, and are kept only wrapped by the key-encryption key (KEK) the operator
//! holds, in a key object stored beside the data: the repository plus the KEK open everything,
//! the repository alone nothing. A KEK is 32 bytes from a file or an environment variable (a
//! Kubernetes Secret mounted either way), or a passphrase stretched by Argon2id with a salt kept
//! in each key object.

use anyhow::{Context, Result, bail};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Bytes a sealed piece grows by: the GCM tag.
pub const TAG_LEN: usize = 16;

/// Argon2id cost for passphrases: 64 MiB, 3 passes, one lane (OWASP's first recommendation).
const ARGON2_M_KIB: u32 = 64 * 1024;
const ARGON2_T: u32 = 3;
const ARGON2_P: u32 = 1;

/// Where the operator's key-encryption key comes from, as it was named (errors repeat the name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KekSource {
    /// A file of 32 bytes, raw or as 64 hex digits or as base64.
    File(PathBuf),
    /// An environment variable holding 64 hex digits or base64 of 32 bytes.
    Env(String),
    /// A file holding a passphrase (its first line), stretched with Argon2id.
    PassphraseFile(PathBuf),
}

impl std::fmt::Display for KekSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KekSource::File(p) => write!(f, "the key file {}", p.display()),
            KekSource::Env(v) => write!(f, "the key in ${v}"),
            KekSource::PassphraseFile(p) => write!(f, "the passphrase in {}", p.display()),
        }
    }
}

/// The operator's key-encryption key, loaded.
pub struct Kek {
    source: KekSource,
    secret: KekSecret,
}

enum KekSecret {
    Key([u8; 32]),
    Passphrase(Vec<u8>),
}

impl Drop for KekSecret {
    fn drop(&mut self) {
        match self {
            KekSecret::Key(k) => k.fill(0),
            KekSecret::Passphrase(p) => p.fill(0),
        }
    }
}

impl Kek {
    /// Reads the KEK from `source`.
    pub fn load(source: KekSource) -> Result<Kek> {
        let secret = match &source {
            KekSource::File(p) => {
                let raw = std::fs::read(p).with_context(|| {
                    format!("cannot read the key file {}: check --key-file", p.display())
                })?;
                KekSecret::Key(parse_key(&raw).with_context(|| format!("{source}"))?)
            }
            KekSource::Env(v) => {
                let text = std::env::var(v)
                    .with_context(|| format!("${v} is not set: export the archive key in it"))?;
                KekSecret::Key(parse_key(text.as_bytes()).with_context(|| format!("{source}"))?)
            }
            KekSource::PassphraseFile(p) => {
                let raw = std::fs::read(p)
                    .with_context(|| format!("cannot read the passphrase file {}", p.display()))?;
                let line = raw.split(|b| *b == b'\n').next().unwrap_or_default();
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if line.len() < 12 {
                    bail!(
                        "the passphrase in {} is {} bytes: use at least 12 (better a key file of 32 random bytes)",
                        p.display(),
                        line.len()
                    );
                }
                KekSecret::Passphrase(line.to_vec())
            }
        };
        Ok(Kek { source, secret })
    }

    /// The wrapping key for a key object with these KDF parameters.
    fn wrapping_key(&self, kdf: Option<&Argon2Params>) -> Result<LessSafeKey> {
        let mut key = [0u8; 32];
        match (&self.secret, kdf) {
            (KekSecret::Key(k), None) => key = *k,
            (KekSecret::Passphrase(p), Some(params)) => {
                let salt = hex::decode(&params.salt).context("the key object's salt is not hex")?;
                let cost = argon2::Params::new(params.m_kib, params.t, params.p, Some(32))
                    .map_err(|e| anyhow::anyhow!("the key object's Argon2 parameters: {e}"))?;
                argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, cost)
                    .hash_password_into(p, &salt, &mut key)
                    .map_err(|e| anyhow::anyhow!("Argon2id: {e}"))?;
            }
            (KekSecret::Key(_), Some(_)) => bail!(
                "this key generation was made with a passphrase, and {} is a key: give the passphrase (--passphrase-file)",
                self.source
            ),
            (KekSecret::Passphrase(_), None) => bail!(
                "this key generation was made with a key, and {} is a passphrase: give the key (--key-file or the environment variable)",
                self.source
            ),
        }
        let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).expect("32-byte key"));
        key.fill(0);
        Ok(k)
    }
}

/// 32 bytes: as they are, or as 64 hex digits, or as base64 (surrounding white space ignored).
fn parse_key(raw: &[u8]) -> Result<[u8; 32]> {
    use base64::Engine;
    if let Ok(k) = <[u8; 32]>::try_from(raw) {
        return Ok(k);
    }
    let text = std::str::from_utf8(raw).unwrap_or_default().trim();
    let bytes = hex::decode(text)
        .ok()
        .or_else(|| base64::engine::general_purpose::STANDARD.decode(text).ok());
    match bytes.map(<[u8; 32]>::try_from) {
        Some(Ok(k)) => Ok(k),
        _ => bail!(
            "is not a key: give 32 bytes, raw, as 64 hex digits or as base64 (e.g. `head -c 32 /dev/urandom | base64`)"
        ),
    }
}

/// Argon2id parameters and salt of a passphrase-wrapped key object.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Argon2Params {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Passes.
    pub t: u32,
    /// Lanes.
    pub p: u32,
    /// 16 random bytes, hex.
    pub salt: String,
}

/// A key generation as stored: its secrets wrapped by the KEK (JSON, `keys/<gen>.json`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyObject {
    /// Format of this object (1).
    pub format: u32,
    /// Key generation, from 1.
    pub generation: u32,
    /// When it was made (ms since the epoch).
    pub created_ms: i64,
    /// Set when the KEK is a passphrase.
    pub kdf: Option<Argon2Params>,
    /// The wrapping's nonce, hex.
    pub nonce: String,
    /// Data key and address key (64 bytes) sealed under the KEK, tag appended, hex.
    pub wrapped: String,
}

/// The additional data that binds a wrapped key to its generation.
fn key_aad(generation: u32) -> Vec<u8> {
    format!("understudy key generation {generation}").into_bytes()
}

impl KeyObject {
    /// Makes generation `generation`: fresh random secrets, wrapped by `kek`.
    pub fn create(kek: &Kek, generation: u32) -> Result<(KeyObject, DataKey)> {
        let rng = SystemRandom::new();
        let mut secrets = [0u8; 64];
        rng.fill(&mut secrets)
            .map_err(|_| anyhow::anyhow!("no system randomness"))?;
        let kdf = match kek.secret {
            KekSecret::Key(_) => None,
            KekSecret::Passphrase(_) => {
                let mut salt = [0u8; 16];
                rng.fill(&mut salt)
                    .map_err(|_| anyhow::anyhow!("no system randomness"))?;
                Some(Argon2Params {
                    m_kib: ARGON2_M_KIB,
                    t: ARGON2_T,
                    p: ARGON2_P,
                    salt: hex::encode(salt),
                })
            }
        };
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill(&mut nonce)
            .map_err(|_| anyhow::anyhow!("no system randomness"))?;
        let mut wrapped = secrets.to_vec();
        kek.wrapping_key(kdf.as_ref())?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(key_aad(generation)),
                &mut wrapped,
            )
            .map_err(|_| anyhow::anyhow!("sealing the key failed"))?;
        let key = DataKey::from_secrets(generation, &secrets);
        secrets.fill(0);
        let obj = KeyObject {
            format: 1,
            generation,
            created_ms: crate::now_ms(),
            kdf,
            nonce: hex::encode(nonce),
            wrapped: hex::encode(wrapped),
        };
        Ok((obj, key))
    }

    /// Opens this generation with `kek`; a wrong KEK (or an altered object) is an error that
    /// says so.
    pub fn open(&self, kek: &Kek) -> Result<DataKey> {
        if self.format != 1 {
            bail!(
                "key generation {} has format {}, this agent reads format 1: upgrade the agent",
                self.generation,
                self.format
            );
        }
        let nonce: [u8; NONCE_LEN] = hex::decode(&self.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .with_context(|| format!("key generation {}: its nonce is damaged", self.generation))?;
        let mut wrapped = hex::decode(&self.wrapped)
            .with_context(|| format!("key generation {}: not hex", self.generation))?;
        let secrets = kek
            .wrapping_key(self.kdf.as_ref())?
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(key_aad(self.generation)),
                &mut wrapped,
            )
            .map_err(|_| {
                anyhow::anyhow!(
                    "{} does not open key generation {}: it is the wrong key (or the key object was altered); nothing was read or written",
                    kek.source,
                    self.generation
                )
            })?;
        let secrets: &[u8; 64] = (&*secrets).try_into().with_context(|| {
            format!(
                "key generation {} holds {} bytes, not 64",
                self.generation,
                secrets.len()
            )
        })?;
        let key = DataKey::from_secrets(self.generation, secrets);
        wrapped.fill(0);
        Ok(key)
    }
}

/// One key generation's secrets, open.
pub struct DataKey {
    generation: u32,
    seal: LessSafeKey,
    address: [u8; 32],
}

/// Shows the generation only, never the secrets.
impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl DataKey {
    fn from_secrets(generation: u32, s: &[u8; 64]) -> DataKey {
        let address: [u8; 32] = s[32..].try_into().expect("32 bytes");
        DataKey {
            generation,
            seal: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &s[..32]).expect("32 bytes")),
            address,
        }
    }

    /// Its generation.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The keyed address of a chunk: BLAKE3 keyed with the address key, over its plain hash.
    /// Without the key, it tells nothing of the block (no one can test a guess).
    pub fn address(&self, plain: &[u8; 32]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.address);
        h.update(b"understudy address\0").update(plain);
        *h.finalize().as_bytes()
    }

    /// A nonce derived from what it seals and where (synthetic, as in SIV): the same inputs
    /// give the same nonce, so a copy sealed again is the same bytes, and a nonce repeats only
    /// for the same inputs. `parts` must include a hash of the data sealed.
    pub fn nonce(&self, parts: &[&[u8]]) -> [u8; NONCE_LEN] {
        let mut h = blake3::Hasher::new_keyed(&self.address);
        h.update(b"understudy nonce\0");
        for p in parts {
            h.update(&(p.len() as u64).to_le_bytes()).update(p);
        }
        h.finalize().as_bytes()[..NONCE_LEN]
            .try_into()
            .expect("12 bytes")
    }

    /// Seals `data` in place (the tag appended), bound to `aad`. `nonce` must never repeat
    /// under this generation with other data.
    pub fn seal(&self, nonce: [u8; NONCE_LEN], aad: &[u8], data: &mut Vec<u8>) {
        self.seal
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), data)
            .expect("AES-GCM seals any length below 64 GiB");
    }

    /// Opens what [`DataKey::seal`] sealed with the same nonce and `aad`; the plain length.
    pub fn open(&self, nonce: [u8; NONCE_LEN], aad: &[u8], data: &mut [u8]) -> Result<usize> {
        self.seal
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), data)
            .map(|p| p.len())
            .map_err(|_| {
                anyhow::anyhow!(
                    "does not decrypt under key generation {}: altered, or sealed under another key",
                    self.generation
                )
            })
    }
}

/// Every key generation of a repository, open; new data is sealed with the newest. Cloning
/// shares the opened keys.
#[derive(Clone, Default)]
pub struct Keyring {
    keys: BTreeMap<u32, std::sync::Arc<DataKey>>,
}

impl Keyring {
    /// Adds an opened generation.
    pub fn insert(&mut self, key: DataKey) {
        self.keys.insert(key.generation, std::sync::Arc::new(key));
    }

    /// Whether generation `g` is open here.
    pub fn has(&self, g: u32) -> bool {
        self.keys.contains_key(&g)
    }

    /// True when none is.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The newest generation, which seals new data.
    pub fn current(&self) -> Option<&DataKey> {
        self.keys.values().next_back().map(|k| &**k)
    }

    /// Generation `g`; an error naming it when the repository lacks its key object.
    pub fn get(&self, g: u32) -> Result<&DataKey> {
        self.keys.get(&g).map(|k| &**k).with_context(|| {
            format!(
                "key generation {g} is missing (its key object keys/{g:08}.json is gone): data sealed under it cannot be read; restore the key object from a copy"
            )
        })
    }
}

/// The file name of generation `g`'s key object.
pub fn key_object_name(g: u32) -> String {
    format!("keys/{g:08}.json")
}

/// The generation a key object's file name names.
pub fn key_object_generation(name: &str) -> Option<u32> {
    name.strip_prefix("keys/")?
        .strip_suffix(".json")?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn key_file(dir: &Path, bytes: &[u8]) -> Kek {
        let p = dir.join(format!("k{}", bytes.len()));
        std::fs::write(&p, bytes).unwrap();
        Kek::load(KekSource::File(p)).unwrap()
    }

    #[test]
    fn a_generation_opens_with_its_kek_and_refuses_another() {
        let d = tempfile::tempdir().unwrap();
        let kek = key_file(d.path(), &[7u8; 32]);
        let (obj, key) = KeyObject::create(&kek, 1).unwrap();
        let again = obj.open(&kek).unwrap();
        assert_eq!(key.address(&[1; 32]), again.address(&[1; 32]));
        let mut data = b"a Secret value".to_vec();
        key.seal([0; 12], b"addr", &mut data);
        assert!(!data.windows(6).any(|w| w == b"Secret"));
        let n = again.open([0; 12], b"addr", &mut data).unwrap();
        assert_eq!(&data[..n], b"a Secret value");

        let wrong = key_file(d.path(), &hex::encode([8u8; 32]).into_bytes());
        let e = format!("{:#}", obj.open(&wrong).unwrap_err());
        assert!(e.contains("is the wrong key"), "{e}");
    }

    #[test]
    fn sealed_data_is_bound_to_its_address_and_its_generation() {
        let d = tempfile::tempdir().unwrap();
        let kek = key_file(d.path(), &[7u8; 32]);
        let (_, g1) = KeyObject::create(&kek, 1).unwrap();
        let (_, g2) = KeyObject::create(&kek, 2).unwrap();
        let mut data = vec![5u8; 100];
        g1.seal([3; 12], b"here", &mut data);
        assert!(g1.open([3; 12], b"there", &mut data.clone()).is_err());
        assert!(g2.open([3; 12], b"here", &mut data.clone()).is_err());
        let mut flipped = data.clone();
        flipped[10] ^= 1;
        assert!(g1.open([3; 12], b"here", &mut flipped).is_err());
        assert_ne!(g1.address(&[1; 32]), g2.address(&[1; 32]));
    }

    #[test]
    fn a_passphrase_kek_stretches_with_the_salt_of_each_object() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pass");
        std::fs::write(&p, "correct horse battery staple\n").unwrap();
        let kek = Kek::load(KekSource::PassphraseFile(p.clone())).unwrap();
        let (obj, key) = KeyObject::create(&kek, 1).unwrap();
        assert!(obj.kdf.is_some());
        assert_eq!(
            obj.open(&kek).unwrap().address(&[0; 32]),
            key.address(&[0; 32])
        );
        std::fs::write(&p, "correct horse battery stapler").unwrap();
        let other = Kek::load(KekSource::PassphraseFile(p.clone())).unwrap();
        assert!(format!("{:#}", obj.open(&other).unwrap_err()).contains("wrong key"));
        std::fs::write(&p, "short").unwrap();
        assert!(Kek::load(KekSource::PassphraseFile(p)).is_err());
        // A key does not open a passphrase generation, and says what to give instead.
        let e = format!("{:#}", obj.open(&key_file(d.path(), &[7; 32])).unwrap_err());
        assert!(e.contains("give the passphrase"), "{e}");
    }

    #[test]
    fn key_text_is_raw_hex_or_base64_and_anything_else_is_refused() {
        use base64::Engine;
        let k = [9u8; 32];
        assert_eq!(parse_key(&k).unwrap(), k);
        assert_eq!(parse_key(hex::encode(k).as_bytes()).unwrap(), k);
        let b = base64::engine::general_purpose::STANDARD.encode(k) + "\n";
        assert_eq!(parse_key(b.as_bytes()).unwrap(), k);
        assert!(parse_key(b"not a key").is_err());
        assert!(parse_key(&[1u8; 31]).is_err());
    }

    #[test]
    fn a_missing_generation_is_named() {
        let ring = Keyring::default();
        let e = format!("{:#}", ring.get(3).err().unwrap());
        assert!(e.contains("keys/00000003.json"), "{e}");
    }
}
