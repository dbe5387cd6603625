//! The egress CA in the guest's trust store (issue 9, TLS interception).
//!
//! When the session's proxy intercepts TLS, `Egress.trust` gives the CA
//! certificate (never its key) and [`install`] puts it, at every boot (it
//! is never baked into a cached image):
//! - in [`CA_FILE`] on its own;
//! - appended to the system bundle [`BUNDLE`] (Debian's
//!   `ca-certificates` output, read by OpenSSL, GnuTLS, curl, git, Python's
//!   `ssl`), which is created when the image has none.
//!
//! Programs with bundles of their own are pointed at these by
//! [`env()`] (added to every child's default environment once installed):
//! `NODE_EXTRA_CA_CERTS` (Node.js), `REQUESTS_CA_BUNDLE` (Python requests
//! and its certifi), `PIP_CERT` (pip's vendored certifi), `GIT_SSL_CAINFO`
//! (Debian's git uses libcurl-gnutls, whose system trust needs p11-kit
//! modules a minimal image lacks: "CAfile: none") and `SSL_CERT_FILE`
//! (OpenSSL's override, for programs that change their default paths).

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// The CA certificate alone.
pub const CA_FILE: &str = "/etc/capvisor/egress-ca.pem";
/// The system trust bundle.
pub const BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Writes `pem` to [`CA_FILE`] and appends it to [`BUNDLE`] (once: a
/// bundle already holding it is left alone), both under `root` (`/` in a
/// guest; a temporary directory in tests).
///
/// Errors: `pem` is not a PEM certificate (`InvalidData`), or a write
/// failed.
pub fn install_under(root: &Path, pem: &str) -> std::io::Result<()> {
    if !pem.starts_with("-----BEGIN CERTIFICATE-----") || !pem.trim_end().ends_with("-----END CERTIFICATE-----") {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not a PEM certificate"));
    }
    let at = |p: &str| root.join(p.trim_start_matches('/'));
    let ca = at(CA_FILE);
    std::fs::create_dir_all(ca.parent().expect("a parent"))?;
    std::fs::write(&ca, pem)?;
    let bundle = at(BUNDLE);
    std::fs::create_dir_all(bundle.parent().expect("a parent"))?;
    let have = std::fs::read_to_string(&bundle).unwrap_or_default();
    if !have.contains(pem.trim_end()) {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&bundle)?;
        if !have.is_empty() && !have.ends_with('\n') {
            f.write_all(b"\n")?;
        }
        f.write_all(b"# capvisor egress CA (added at boot)\n")?;
        f.write_all(pem.trim_end().as_bytes())?;
        f.write_all(b"\n")?;
    }
    Ok(())
}

/// [`install_under`] `/`; from then on [`env()`] adds the variables.
///
/// Errors: as [`install_under`].
pub fn install(pem: &str) -> std::io::Result<()> {
    install_under(Path::new("/"), pem)?;
    INSTALLED.store(true, Ordering::SeqCst);
    Ok(())
}

/// The variables that point programs with their own bundles at ours;
/// empty until [`install`] succeeded.
pub fn env() -> Vec<(String, String)> {
    if !INSTALLED.load(Ordering::SeqCst) {
        return Vec::new();
    }
    vec![
        ("NODE_EXTRA_CA_CERTS".into(), CA_FILE.into()),
        ("REQUESTS_CA_BUNDLE".into(), BUNDLE.into()),
        ("PIP_CERT".into(), BUNDLE.into()),
        ("GIT_SSL_CAINFO".into(), BUNDLE.into()),
        ("SSL_CERT_FILE".into(), BUNDLE.into()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    #[test]
    fn the_ca_is_appended_once_and_a_missing_bundle_is_made() {
        let d = tempfile::tempdir().unwrap();
        let bundle = d.path().join("etc/ssl/certs/ca-certificates.crt");
        std::fs::create_dir_all(bundle.parent().unwrap()).unwrap();
        std::fs::write(&bundle, "-----BEGIN CERTIFICATE-----\nSYSTEM\n-----END CERTIFICATE-----").unwrap();
        install_under(d.path(), PEM).unwrap();
        install_under(d.path(), PEM).unwrap();
        let b = std::fs::read_to_string(&bundle).unwrap();
        assert!(b.starts_with("-----BEGIN CERTIFICATE-----\nSYSTEM"), "the system roots stay");
        assert_eq!(b.matches("MIIB").count(), 1, "appended once: {b}");
        assert_eq!(std::fs::read_to_string(d.path().join("etc/capvisor/egress-ca.pem")).unwrap(), PEM);
        let e = tempfile::tempdir().unwrap();
        install_under(e.path(), PEM).unwrap();
        assert!(std::fs::read_to_string(e.path().join("etc/ssl/certs/ca-certificates.crt")).unwrap().contains("MIIB"));
        assert!(install_under(e.path(), "not a cert").is_err());
    }
}
