//! An agent's identity (a self-signed certificate and its key) and the peers it is paired with.
//! Peers are pinned by the SHA-256 fingerprint of their certificate (what
//! `openssl x509 -noout -fingerprint -sha256` prints, without the colons).

use anyhow::{Context, Result, bail};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::{Path, PathBuf};

/// SHA-256 of a certificate's DER, written `sha256:<64 hex digits>`.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fingerprint(String);

impl Fingerprint {
    /// Fingerprint of a DER certificate.
    pub fn of(cert: &[u8]) -> Self {
        Fingerprint(format!("sha256:{}", hex::encode(Sha256::digest(cert))))
    }

    /// The text form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let hex_part = s
            .trim()
            .strip_prefix("sha256:")
            .unwrap_or(s.trim())
            .replace(':', "")
            .to_ascii_lowercase();
        if hex_part.len() != 64 || !hex_part.chars().all(|c| c.is_ascii_hexdigit()) {
            bail!(
                "`{s}` is not a certificate fingerprint: expected sha256:<64 hex digits> as printed by `init` or `identity`"
            );
        }
        Ok(Fingerprint(format!("sha256:{hex_part}")))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An agent's certificate and private key.
pub struct Identity {
    /// Certificate (DER).
    pub cert: CertificateDer<'static>,
    /// Private key (PKCS#8 DER).
    pub key: PrivateKeyDer<'static>,
    /// Fingerprint of `cert`.
    pub fingerprint: Fingerprint,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            fingerprint: self.fingerprint.clone(),
        }
    }
}

fn cert_path(dir: &Path) -> PathBuf {
    dir.join("identity").join("cert.pem")
}

fn key_path(dir: &Path) -> PathBuf {
    dir.join("identity").join("key.pem")
}

impl Identity {
    /// Creates a new identity under `dir/identity/`; refuses to replace an existing one.
    pub fn init(dir: &Path, name: &str) -> Result<Self> {
        if cert_path(dir).exists() {
            bail!(
                "{} already holds an identity; remove {} first to make a new one (peers paired with the old one must pair again)",
                dir.display(),
                dir.join("identity").display()
            );
        }
        crate::files::private_dir(dir)?;
        crate::files::private_dir(&dir.join("identity"))?;
        let ck = rcgen::generate_simple_self_signed(vec![name.to_string()])
            .context("cannot generate a key pair")?;
        let cert_pem = ck.cert.pem();
        let key_pem = ck.signing_key.serialize_pem();
        write_private(&key_path(dir), key_pem.as_bytes())?;
        crate::files::write_atomic(&cert_path(dir), cert_pem.as_bytes())?;
        Self::load(dir)
    }

    /// Loads the identity under `dir/identity/`.
    pub fn load(dir: &Path) -> Result<Self> {
        let hint = || {
            format!(
                "no identity in {}: run `init --dir {}` first",
                dir.display(),
                dir.display()
            )
        };
        let cert_pem = std::fs::read(cert_path(dir)).with_context(hint)?;
        let key_pem = std::fs::read(key_path(dir)).with_context(hint)?;
        Self::from_pem(&cert_pem, &key_pem).context("the identity in identity/ is not usable")
    }

    /// Loads an identity kept as `cert.pem` and `key.pem` in `dir` itself: in a cluster, a
    /// mounted Secret made from the files of an agent directory (docs/operations.md, Pairing).
    pub fn load_mounted(dir: &Path) -> Result<Self> {
        let read = |f: &str| {
            std::fs::read(dir.join(f)).with_context(|| {
                format!(
                    "no {f} in {}: the identity Secret needs the keys cert.pem, key.pem and peers.json (the files `init` and `pair` write)",
                    dir.display()
                )
            })
        };
        Self::from_pem(&read("cert.pem")?, &read("key.pem")?)
            .with_context(|| format!("the identity in {} is not usable", dir.display()))
    }

    /// An identity from a PEM certificate and a PEM PKCS#8 private key.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self> {
        let cert = pem_block(cert_pem, "CERTIFICATE").context("cert.pem holds no certificate")?;
        let key =
            pem_block(key_pem, "PRIVATE KEY").context("key.pem holds no PKCS#8 private key")?;
        let cert = CertificateDer::from(cert);
        Ok(Identity {
            fingerprint: Fingerprint::of(&cert),
            cert,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        })
    }

    /// A new identity held in memory only, as (identity, certificate PEM, key PEM): a mover's
    /// key for one cut, never written to the agent's directory.
    pub fn ephemeral(name: &str) -> Result<(Self, String, String)> {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_string()])
            .context("cannot generate a key pair")?;
        let (cert_pem, key_pem) = (ck.cert.pem(), ck.signing_key.serialize_pem());
        let id = Self::from_pem(cert_pem.as_bytes(), key_pem.as_bytes())?;
        Ok((id, cert_pem, key_pem))
    }
}

fn pem_block(pem: &[u8], label: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    match label {
        "CERTIFICATE" => CertificateDer::from_pem_slice(pem).ok().map(|c| c.to_vec()),
        _ => PrivatePkcs8KeyDer::from_pem_slice(pem)
            .ok()
            .map(|k| k.secret_pkcs8_der().to_vec()),
    }
}

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

/// The peers an agent accepts, kept in `dir/peers.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peers {
    /// Pinned peers.
    pub peers: Vec<Peer>,
}

/// One pinned peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// A name for people.
    pub name: String,
    /// Its certificate fingerprint.
    pub fingerprint: Fingerprint,
}

impl Peers {
    fn path(dir: &Path) -> PathBuf {
        dir.join("peers.json")
    }

    /// Loads the pinned peers (none when the file does not exist).
    pub fn load(dir: &Path) -> Result<Self> {
        match std::fs::read(Self::path(dir)) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| {
                format!(
                    "{} is not valid: fix it or pair again",
                    Self::path(dir).display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Peers::default()),
            Err(e) => Err(e.into()),
        }
    }

    /// Pins a peer (replacing one of the same name) and saves.
    pub fn pair(dir: &Path, name: &str, fingerprint: Fingerprint) -> Result<Self> {
        let mut p = Self::load(dir)?;
        p.peers.retain(|x| x.name != name);
        p.peers.push(Peer {
            name: name.to_string(),
            fingerprint,
        });
        crate::files::write_atomic(&Self::path(dir), &serde_json::to_vec_pretty(&p)?)?;
        Ok(p)
    }

    /// Fingerprints of every pinned peer.
    pub fn fingerprints(&self) -> Vec<Fingerprint> {
        self.peers.iter().map(|p| p.fingerprint.clone()).collect()
    }
}
