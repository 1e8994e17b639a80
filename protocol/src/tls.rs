//! TLS for the QUIC transport: a federation CA (rcgen), certificates for the coordinator and
//! each client, and rustls configurations with mutual authentication, TLS 1.3 only, the ring
//! provider, ALPN `fedtune/1` and no 0-RTT.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{ProtocolError, Result};

/// ALPN protocol id.
pub const ALPN: &[u8] = b"fedtune/1";

/// The name the coordinator's certificate is issued for (clients verify it).
pub const COORDINATOR_NAME: &str = "fedtune-coordinator";

/// A PEM certificate and its PEM private key.
#[derive(Debug, Clone)]
pub struct CertPair {
    /// Certificate (PEM).
    pub cert_pem: String,
    /// Private key (PKCS#8 PEM).
    pub key_pem: String,
}

fn err(what: &'static str) -> impl Fn(rcgen::Error) -> ProtocolError {
    move |e| ProtocolError::malformed(what, e)
}

/// A new self-signed federation CA.
pub fn new_ca(federation: &str) -> Result<CertPair> {
    let key = KeyPair::generate().map_err(err("CA key"))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err("CA"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("fedtune CA {federation}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).map_err(err("CA"))?;
    Ok(CertPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues a certificate signed by `ca`: for the coordinator (`server`: names
/// [`COORDINATOR_NAME`] plus `extra_names`, e.g. its host name or IP) or for a client (`name`
/// as its common name).
pub fn issue(ca: &CertPair, name: &str, server: bool, extra_names: &[String]) -> Result<CertPair> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(err("CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(err("CA certificate"))?;
    let key = KeyPair::generate().map_err(err("key"))?;
    let mut names = vec![if server {
        COORDINATOR_NAME.to_string()
    } else {
        name.to_string()
    }];
    names.extend(extra_names.iter().cloned());
    let mut params = CertificateParams::new(names).map_err(err("certificate"))?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(err("certificate"))?;
    Ok(CertPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>> {
    let v: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| ProtocolError::malformed(what, e))?;
    if v.is_empty() {
        return Err(ProtocolError::malformed(
            what,
            "no certificate in the PEM text",
        ));
    }
    Ok(v)
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| ProtocolError::malformed("private key", e))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_pem: &str) -> Result<Arc<rustls::RootCertStore>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca_pem, "CA certificate")? {
        roots
            .add(c)
            .map_err(|e| ProtocolError::malformed("CA certificate", e))?;
    }
    Ok(Arc::new(roots))
}

/// The coordinator's TLS configuration: its certificate, and client certificates required and
/// verified against the federation CA.
pub fn server_config(ca_pem: &str, own: &CertPair) -> Result<rustls::ServerConfig> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider())
            .build()
            .map_err(|e| ProtocolError::malformed("client verifier", e))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ProtocolError::malformed("TLS versions", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&own.cert_pem, "certificate")?, key(&own.key_pem)?)
        .map_err(|e| ProtocolError::malformed("certificate", e))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.max_early_data_size = 0;
    Ok(cfg)
}

/// A client's TLS configuration: the coordinator verified against the federation CA, and the
/// client's own certificate presented.
pub fn client_config(ca_pem: &str, own: &CertPair) -> Result<rustls::ClientConfig> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ProtocolError::malformed("TLS versions", e))?
        .with_root_certificates(roots(ca_pem)?)
        .with_client_auth_cert(certs(&own.cert_pem, "certificate")?, key(&own.key_pem)?)
        .map_err(|e| ProtocolError::malformed("certificate", e))?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.enable_early_data = false;
    Ok(cfg)
}
