//! Certificate verifiers that accept exactly the pinned peer certificates, in both directions.
//! A peer whose certificate fingerprint is not pinned fails the TLS handshake: it never gets a
//! stream, so it can neither send nor read anything. A target also accepts, as clients, the
//! certificates granted ([`Grants`]: movers a pinned source granted, writers the target granted)
//! while their grants are in force.

use super::grants::Grants;
use super::identity::Fingerprint;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use std::sync::Arc;

/// Accepts only certificates whose fingerprint is pinned.
#[derive(Debug)]
pub struct PinnedPeers {
    pinned: Vec<Fingerprint>,
    grants: Option<Arc<Grants>>,
    provider: Arc<CryptoProvider>,
}

impl PinnedPeers {
    /// A verifier for these fingerprints.
    pub fn new(pinned: Vec<Fingerprint>, provider: Arc<CryptoProvider>) -> Self {
        PinnedPeers {
            pinned,
            grants: None,
            provider,
        }
    }

    /// Also accepts the certificates `grants` holds while their grants are in force.
    pub fn with_grants(mut self, grants: Arc<Grants>) -> Self {
        self.grants = Some(grants);
        self
    }

    fn granted(&self, fp: &Fingerprint, now: UnixTime) -> bool {
        let now_ms = (now.as_secs() as i64).saturating_mul(1000);
        self.grants
            .as_ref()
            .is_some_and(|g| g.get(fp, now_ms).is_some())
    }

    fn check(&self, cert: &CertificateDer<'_>, role: &str, now: UnixTime) -> Result<(), Error> {
        let fp = Fingerprint::of(cert);
        if !self.pinned.contains(&fp) && !self.granted(&fp, now) {
            tracing::warn!(peer = %fp, role, "refused a peer whose certificate is not pinned; pair it first if it is yours");
            return Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        match validity(cert, now) {
            Validity::Current => Ok(()),
            Validity::Expired(at) => {
                tracing::warn!(peer = %fp, role, expired = %at, "refused a pinned peer whose certificate has expired; it needs a new identity (`init`) and both sides must pair again");
                Err(Error::InvalidCertificate(CertificateError::Expired))
            }
            Validity::NotYet(from) => {
                tracing::warn!(peer = %fp, role, valid_from = %from, "refused a pinned peer whose certificate is not valid yet; check both clocks");
                Err(Error::InvalidCertificate(CertificateError::NotValidYet))
            }
            Validity::Unreadable(e) => {
                tracing::warn!(peer = %fp, role, error = %e, "refused a pinned peer whose certificate cannot be parsed");
                Err(Error::InvalidCertificate(CertificateError::BadEncoding))
            }
        }
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ServerCertVerifier for PinnedPeers {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.check(end_entity, "target", now)
            .map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.tls13(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for PinnedPeers {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.check(end_entity, "source", now)
            .map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.tls13(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

/// Where `now` falls in a certificate's validity period.
enum Validity {
    Current,
    Expired(String),
    NotYet(String),
    Unreadable(String),
}

/// A pinned certificate still has to be within its validity period: pinning says whose key it
/// is, the dates say the owner still stands behind it.
fn validity(cert: &CertificateDer<'_>, now: UnixTime) -> Validity {
    let parsed = match x509_parser::parse_x509_certificate(cert) {
        Ok((_, c)) => c,
        Err(e) => return Validity::Unreadable(e.to_string()),
    };
    let v = parsed.validity();
    let now = now.as_secs() as i64;
    if now > v.not_after.timestamp() {
        Validity::Expired(v.not_after.to_string())
    } else if now < v.not_before.timestamp() {
        Validity::NotYet(v.not_before.to_string())
    } else {
        Validity::Current
    }
}
