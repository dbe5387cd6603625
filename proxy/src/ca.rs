//! The install's egress certificate authority and the proxy's TLS
//! configurations (issue 9, TLS interception).
//!
//! - [`load_or_create`]: the one CA of an install, kept in the broker's
//!   state directory (`egress-ca/ca.pem`, and `egress-ca/ca.key` mode 0600:
//!   the key never leaves the host). The broker calls it at start when the
//!   manifest's `[net] egress` is on and passes both PEMs to each session's
//!   proxy in `ProxyConfig`; guest-init gets the certificate (never the key)
//!   through `Egress.trust` and adds it to the guest's trust store at boot,
//!   so it is not baked into any cached image.
//! - [`Authority`]: the loaded CA; signs a leaf certificate per name the
//!   guest asks for (its TLS SNI, or the host it connected to), cached for
//!   the proxy's life ([`LEAF_CACHE`] names), all with one ECDSA P-256 key
//!   per proxy (RFC 5480).
//! - [`Upstream`]: how the proxy verifies upstream servers: the system's
//!   roots (`rustls-native-certs`, read at start before the proxy confines
//!   itself) plus the roots the manifest adds (`[net] ca_certs`).

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// The CA's subject common name.
pub const CA_NAME: &str = "capvisor egress CA";
/// Years the CA certificate is valid.
pub const CA_YEARS: i64 = 10;
/// Days a leaf certificate is valid (from one day before it is made, so a
/// guest clock a little behind the host's still accepts it).
pub const LEAF_DAYS: i64 = 30;
/// Leaf certificates one proxy keeps (the cache is emptied when full).
pub const LEAF_CACHE: usize = 1024;
/// ALPN protocol ids (RFC 7301; IANA registry).
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN id of HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// The CA's certificate and key, PEM.
#[derive(Clone)]
pub struct CaPem {
    /// The certificate (public; what guests trust).
    pub cert: String,
    /// The PKCS#8 private key (secret; 0600 on disk).
    pub key: String,
}

impl std::fmt::Debug for CaPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaPem").field("cert", &self.cert).field("key", &"<redacted>").finish()
    }
}

/// A fresh CA: ECDSA P-256, CN [`CA_NAME`], path length 0 (it signs only
/// leaves), valid [`CA_YEARS`] from a day ago.
///
/// Errors: key generation or signing failed (ring).
pub fn generate() -> anyhow::Result<CaPem> {
    let key = rcgen::KeyPair::generate().context("generating the egress CA key")?;
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, CA_NAME);
    p.distinguished_name.push(rcgen::DnType::OrganizationName, "capvisor");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(365 * CA_YEARS);
    let cert = p.self_signed(&key).context("signing the egress CA")?;
    Ok(CaPem { cert: cert.pem(), key: key.serialize_pem() })
}

/// The install's CA in `dir` (`ca.pem`, `ca.key`), made now if absent.
/// `dir` is created 0700, the key written 0600 (O_EXCL, then renamed into
/// place with the certificate already there, so a crash never leaves a key
/// without its certificate in use).
///
/// Errors: `dir` unusable, a half-present pair (one file without the
/// other), files that do not parse as a CA certificate and its key.
pub fn load_or_create(dir: &Path) -> anyhow::Result<CaPem> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            let pem = CaPem {
                cert: std::fs::read_to_string(&cert_path)
                    .with_context(|| format!("reading {}", cert_path.display()))?,
                key: std::fs::read_to_string(&key_path).with_context(|| format!("reading {}", key_path.display()))?,
            };
            Authority::new(&pem).with_context(|| format!("the egress CA in {}", dir.display()))?;
            return Ok(pem);
        }
        (false, false) => {}
        _ => anyhow::bail!(
            "{}: only one of ca.pem and ca.key exists; remove the other to make a new egress CA \
             (guests trust the new one from their next boot)",
            dir.display()
        ),
    }
    let pem = generate()?;
    let write = |path: &Path, data: &str, mode: u32| -> anyhow::Result<()> {
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(data.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
        Ok(())
    };
    write(&cert_path, &pem.cert, 0o644)?;
    write(&key_path, &pem.key, 0o600)?;
    std::fs::File::open(dir)?.sync_all()?;
    tracing::info!(dir = %dir.display(), "made the install's egress CA");
    Ok(pem)
}

/// The loaded CA: signs leaves for the names guests ask for.
pub struct Authority {
    pem: String,
    /// The CA certificate as stored (what guests trust, byte for byte).
    der: CertificateDer<'static>,
    /// The CA re-made from its parameters to sign with (its own bytes
    /// differ from `der`: a new signature; never sent).
    issuer: rcgen::Certificate,
    issuer_key: rcgen::KeyPair,
    /// One key for every leaf this proxy makes.
    leaf_key: rcgen::KeyPair,
    leaves: RefCell<HashMap<String, Arc<rustls::ServerConfig>>>,
}

impl Authority {
    /// Loads `pem`.
    ///
    /// Errors: the certificate or key does not parse, the certificate is
    /// not a CA, the key does not belong to it.
    pub fn new(pem: &CaPem) -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::from_pem(&pem.key).context("the CA key does not parse")?;
        let params =
            rcgen::CertificateParams::from_ca_cert_pem(&pem.cert).context("the CA certificate does not parse")?;
        anyhow::ensure!(!matches!(params.is_ca, rcgen::IsCa::NoCa), "the CA certificate is not a CA");
        let der = CertificateDer::from_pem_slice(pem.cert.as_bytes()).context("the CA certificate is not PEM")?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).context("the CA certificate does not parse")?;
        anyhow::ensure!(
            parsed.public_key().raw == key.public_key_der().as_slice(),
            "the CA key does not belong to the CA certificate"
        );
        let issuer = params.self_signed(&key).context("loading the CA")?;
        Ok(Self {
            pem: pem.cert.clone(),
            der: der.clone().into_owned(),
            issuer,
            issuer_key: key,
            leaf_key: rcgen::KeyPair::generate().context("generating the leaf key")?,
            leaves: RefCell::new(HashMap::new()),
        })
    }

    /// The CA certificate, PEM (what `Egress.trust` gives guests).
    pub fn cert_pem(&self) -> &str {
        &self.pem
    }

    /// A leaf for `name` signed by the CA with this proxy's leaf key.
    fn leaf(&self, name: &str) -> anyhow::Result<rcgen::Certificate> {
        let mut p = rcgen::CertificateParams::new(vec![name.to_string()]).context("leaf name")?;
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = rcgen::IsCa::ExplicitNoCa;
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + time::Duration::days(LEAF_DAYS);
        p.signed_by(&self.leaf_key, &self.issuer, &self.issuer_key).context("signing a leaf")
    }

    /// A TLS server configuration presenting a leaf for `name` (a DNS name
    /// or an IP literal: the SAN type follows, RFC 5280 4.2.1.6), offering
    /// ALPN `h2` and `http/1.1` (the guest's preference decides which).
    /// Cached per name.
    ///
    /// Errors: signing failed, or `name` cannot be a SAN.
    pub fn server_config(&self, name: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        if let Some(c) = self.leaves.borrow().get(name) {
            return Ok(c.clone());
        }
        let leaf = self.leaf(name)?;
        // The chain ends in the stored CA certificate, not the re-made
        // one: GnuTLS (Debian's git, via libcurl-gnutls) refuses a chain
        // whose self-signed end differs from the trusted anchor it names.
        let chain = vec![leaf.der().clone(), self.der.clone()];
        let key =
            PrivateKeyDer::try_from(self.leaf_key.serialize_der()).map_err(|e| anyhow::anyhow!("leaf key: {e}"))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .context("leaf certificate")?;
        cfg.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
        let cfg = Arc::new(cfg);
        let mut leaves = self.leaves.borrow_mut();
        if leaves.len() >= LEAF_CACHE {
            leaves.clear();
        }
        leaves.insert(name.to_string(), cfg.clone());
        Ok(cfg)
    }
}

/// The crypto provider every TLS configuration here uses (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How upstream servers are verified: system roots plus the manifest's.
pub struct Upstream {
    /// ALPN `h2`, `http/1.1` (a guest that speaks HTTP/2).
    pub h2: Arc<rustls::ClientConfig>,
    /// ALPN `http/1.1` only (a guest on HTTP/1.1: upgrades such as
    /// WebSocket stay possible).
    pub http11: Arc<rustls::ClientConfig>,
    /// No ALPN (TLS that carries something other than HTTP).
    pub plain: Arc<rustls::ClientConfig>,
    /// Roots loaded: (system, extra).
    pub roots: (usize, usize),
}

impl Upstream {
    /// The roots: the system's when `system` (`rustls-native-certs`: on
    /// Debian `/etc/ssl/certs`; unreadable ones are skipped and counted in
    /// the log), then every certificate in `extra_pem`.
    ///
    /// Errors: `extra_pem` holds something that is not a certificate. No
    /// root at all is logged, not an error (see the code).
    pub fn new(system: bool, extra_pem: &str) -> anyhow::Result<Self> {
        let mut store = rustls::RootCertStore::empty();
        let mut sys = 0;
        if system {
            let found = rustls_native_certs::load_native_certs();
            if !found.errors.is_empty() {
                tracing::warn!("system roots: {} errors, first: {}", found.errors.len(), found.errors[0]);
            }
            let (added, _ignored) = store.add_parsable_certificates(found.certs);
            sys = added;
        }
        let mut extra = 0;
        for c in CertificateDer::pem_slice_iter(extra_pem.as_bytes()) {
            let c = c.map_err(|e| anyhow::anyhow!("[net] ca_certs: {e}"))?;
            store.add(c).context("[net] ca_certs: not a usable CA certificate")?;
            extra += 1;
        }
        if store.is_empty() {
            // Egress still works (plain TCP, HTTP, `noMitm` TLS); every
            // intercepted upstream then fails verification with a 502 that
            // says so. Refusing to start would take all of that away.
            tracing::warn!(
                "no root certificate to verify upstream TLS with (install ca-certificates, or add [net] ca_certs)"
            );
        }
        let store = Arc::new(store);
        let make = |alpn: &[&[u8]]| -> anyhow::Result<Arc<rustls::ClientConfig>> {
            let mut c = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(store.clone())
                .with_no_client_auth();
            c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
            Ok(Arc::new(c))
        };
        Ok(Self {
            h2: make(&[ALPN_H2, ALPN_HTTP11])?,
            http11: make(&[ALPN_HTTP11])?,
            plain: make(&[])?,
            roots: (sys, extra),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a TLS handshake in memory; Err: the client refused.
    fn handshake(
        client: &mut rustls::ClientConnection,
        srv: &mut rustls::ServerConnection,
    ) -> Result<(), rustls::Error> {
        for _ in 0..10 {
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                srv.read_tls(&mut buf.as_slice()).unwrap();
                srv.process_new_packets().unwrap();
            }
            buf.clear();
            while srv.wants_write() {
                srv.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                client.read_tls(&mut buf.as_slice()).unwrap();
                client.process_new_packets()?;
            }
            if !client.is_handshaking() && !srv.is_handshaking() {
                break;
            }
        }
        Ok(())
    }

    #[test]
    fn the_ca_is_made_once_with_a_private_key_file() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("egress-ca");
        let a = load_or_create(&dir).unwrap();
        let b = load_or_create(&dir).unwrap();
        assert_eq!(a.cert, b.cert, "loaded again, not remade");
        assert_eq!(a.key, b.key);
        let mode = |p: &str| std::fs::metadata(dir.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("ca.key"), 0o600);
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        assert!(!format!("{a:?}").contains("PRIVATE KEY"), "Debug never shows the key");
        // Half a pair is refused, not silently replaced.
        std::fs::remove_file(dir.join("ca.key")).unwrap();
        assert!(load_or_create(&dir).unwrap_err().to_string().contains("only one of"));
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        let mixed = CaPem { cert: a.cert.clone(), key: b.key };
        let e = Authority::new(&mixed).err().unwrap();
        assert!(e.to_string().contains("does not belong"), "{e}");
        assert!(Authority::new(&a).is_ok());
    }

    #[test]
    fn leaves_chain_to_the_ca_for_names_and_addresses() {
        let pem = generate().unwrap();
        let ca = Authority::new(&pem).unwrap();
        let roots = Upstream::new(false, &pem.cert).unwrap();
        assert_eq!(roots.roots, (0, 1));
        for name in ["api.test", "127.0.0.1"] {
            let server = ca.server_config(name).unwrap();
            assert!(Arc::ptr_eq(&server, &ca.server_config(name).unwrap()), "cached");
            // A real handshake in memory: the client verifies the leaf for
            // `name` against the CA alone.
            let sn = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
            let mut client = rustls::ClientConnection::new(roots.http11.clone(), sn).unwrap();
            let mut srv = rustls::ServerConnection::new(server).unwrap();
            handshake(&mut client, &mut srv).unwrap();
            assert!(!client.is_handshaking(), "{name}: handshake completed");
            assert_eq!(client.alpn_protocol(), Some(ALPN_HTTP11));
        }
        // Another CA's client does not accept these leaves.
        let other = Upstream::new(false, &generate().unwrap().cert).unwrap();
        let sn = rustls::pki_types::ServerName::try_from("api.test").unwrap();
        let mut client = rustls::ClientConnection::new(other.plain.clone(), sn).unwrap();
        let mut srv = rustls::ServerConnection::new(ca.server_config("api.test").unwrap()).unwrap();
        let failed = handshake(&mut client, &mut srv).is_err();
        assert!(failed, "a client trusting another CA refuses the leaf");
    }

    /// The chain a guest gets ends in the CA certificate exactly as stored
    /// (and trusted), not in the re-made one the leaves are signed with:
    /// GnuTLS refuses a chain whose self-signed end is not byte for byte
    /// the anchor (Debian's git failed with "certificate verification
    /// failed" before this).
    #[test]
    fn the_chain_ends_in_the_stored_ca_certificate() {
        let pem = generate().unwrap();
        let ca = Authority::new(&pem).unwrap();
        let roots = Upstream::new(false, &pem.cert).unwrap();
        let sn = rustls::pki_types::ServerName::try_from("api.test").unwrap();
        let mut client = rustls::ClientConnection::new(roots.plain.clone(), sn).unwrap();
        let mut srv = rustls::ServerConnection::new(ca.server_config("api.test").unwrap()).unwrap();
        handshake(&mut client, &mut srv).unwrap();
        let chain = client.peer_certificates().unwrap();
        let stored = CertificateDer::from_pem_slice(pem.cert.as_bytes()).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1].as_ref(), stored.as_ref(), "the trusted CA certificate, byte for byte");
    }

    #[test]
    fn extra_roots_must_be_certificates() {
        assert_eq!(Upstream::new(false, "").unwrap().roots, (0, 0), "no roots: a warning, not an error");
        let e = Upstream::new(false, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").err().unwrap();
        assert!(e.to_string().contains("ca_certs"), "{e}");
    }
}
