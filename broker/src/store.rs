//! The credential store: password accounts in `state_dir/accounts.json`
//! (mode 0600), a JSON object `name -> {profile, hash, created_ms}` where
//! `hash` is an Argon2id PHC string (RFC 9106; PHC string format).
//!
//! Writes are atomic: the whole file is written to `accounts.json.tmp`
//! (mode 0600), fsynced, renamed over `accounts.json` (rename(2)), and the
//! directory fsynced; a crash at any point leaves the old or the new file,
//! never a mix. A stale `.tmp` from a crash is ignored and replaced.
//!
//! All methods block (Argon2 costs tens of milliseconds): call them from
//! `tokio::task::spawn_blocking`.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use capvisor_rpc::{CvError, CvResult};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// Shortest password accepted by [`CredentialStore::add`], bytes.
pub const MIN_PASSWORD: usize = 8;
/// Longest password accepted, bytes (longer ones are refused by `add` and
/// never verified by `verify`).
pub const MAX_PASSWORD: usize = 1024;

/// One stored account.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AccountRecord {
    /// Profile name (exists in the manifest when added).
    pub profile: String,
    /// Argon2id PHC string (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`).
    pub hash: String,
    /// Creation time, Unix epoch milliseconds.
    pub created_ms: i64,
}

/// Whether `name` is a valid account name: `[a-z_][a-z0-9_.-]{0,31}`
/// (like useradd(8)'s default NAME_REGEX, without `$`).
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    if b.is_empty() || b.len() > 32 {
        return false;
    }
    (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b[1..].iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'.' | b'-'))
}

/// Argon2id parameters for new hashes: OWASP's recommendation
/// (m = 19 MiB, t = 2, p = 1), which is `argon2`'s default.
pub fn default_params() -> Params {
    Params::default()
}

/// The password accounts (see the module docs).
pub struct CredentialStore {
    path: PathBuf,
    profiles: BTreeSet<String>,
    params: Params,
    accounts: Mutex<BTreeMap<String, AccountRecord>>,
    dummy: OnceLock<String>,
}

impl CredentialStore {
    /// Opens the store at `path` (absent: empty). New hashes use `params`;
    /// `profiles` are the manifest's profile names that `add` accepts.
    /// A file with group/other permission bits is reset to 0600.
    ///
    /// Errors: the file exists but cannot be read or is not valid JSON.
    pub fn open(path: &Path, profiles: impl IntoIterator<Item = String>, params: Params) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let accounts = match std::fs::read(path) {
            Ok(bytes) => {
                let meta = std::fs::metadata(path)?;
                if meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(path = %path.display(), "credential store was readable by others; resetting mode to 0600");
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                }
                serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{}: invalid JSON: {e}", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
        };
        Ok(Self {
            path: path.to_path_buf(),
            profiles: profiles.into_iter().collect(),
            params,
            accounts: Mutex::new(accounts),
            dummy: OnceLock::new(),
        })
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn hasher(&self) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, self.params.clone())
    }

    fn hash(&self, password: &str) -> CvResult<String> {
        let salt_bytes: [u8; 16] = rand::random();
        let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| CvError::internal(format!("salt: {e}")))?;
        self.hasher()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| CvError::internal(format!("hashing failed: {e}")))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, AccountRecord>> {
        self.accounts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds account `name` with `profile` and `password`.
    ///
    /// Errors: `invalidArgument` for a bad name (see [`valid_name`]), an
    /// unknown profile, a password shorter than [`MIN_PASSWORD`] or longer
    /// than [`MAX_PASSWORD`] bytes; `alreadyExists`; `internal` when the
    /// file cannot be written (the account is then not added).
    pub fn add(&self, name: &str, profile: &str, password: &str) -> CvResult<()> {
        if !valid_name(name) {
            return Err(CvError::invalid(format!(
                "invalid account name {:?}: use 1-32 of a-z 0-9 _ . - starting with a letter or _",
                name.chars().take(40).collect::<String>()
            )));
        }
        if !self.profiles.contains(profile) {
            return Err(CvError::invalid(format!(
                "unknown profile {:?} (known: {})",
                profile.chars().take(40).collect::<String>(),
                self.profiles.iter().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        if password.len() < MIN_PASSWORD {
            return Err(CvError::invalid(format!("the password must be at least {MIN_PASSWORD} bytes")));
        }
        if password.len() > MAX_PASSWORD {
            return Err(CvError::invalid(format!("the password must be at most {MAX_PASSWORD} bytes")));
        }
        if self.lock().contains_key(name) {
            return Err(already_exists(name));
        }
        let hash = self.hash(password)?; // outside the lock: verifications go on meanwhile
        let mut accounts = self.lock();
        if accounts.contains_key(name) {
            return Err(already_exists(name));
        }
        let mut next = accounts.clone();
        next.insert(
            name.to_string(),
            AccountRecord { profile: profile.to_string(), hash, created_ms: crate::now_ms() },
        );
        self.persist(&next)?;
        *accounts = next;
        Ok(())
    }

    /// Removes account `name`.
    ///
    /// Errors: `notFound`; `internal` when the file cannot be written.
    pub fn remove(&self, name: &str) -> CvResult<()> {
        let mut accounts = self.lock();
        if !accounts.contains_key(name) {
            return Err(CvError::not_found(format!(
                "no account named {:?}",
                name.chars().take(40).collect::<String>()
            )));
        }
        let mut next = accounts.clone();
        next.remove(name);
        self.persist(&next)?;
        *accounts = next;
        Ok(())
    }

    /// Whether account `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    /// `(name, profile)` of every account, sorted by name.
    pub fn list(&self) -> Vec<(String, String)> {
        self.lock().iter().map(|(n, r)| (n.clone(), r.profile.clone())).collect()
    }

    /// Computes the dummy hash [`CredentialStore::verify`] uses for unknown
    /// names, so the first such login costs no more than later ones. Call
    /// once at start-up, off the RPC thread.
    pub fn warm(&self) {
        self.dummy_hash();
    }

    fn dummy_hash(&self) -> &str {
        self.dummy.get_or_init(|| self.hash("capvisor dummy password").unwrap_or_default())
    }

    /// Checks `password` for `name`; returns the account's profile on a
    /// match. An unknown (or malformed) name is verified against a dummy
    /// hash of the same cost, so both failures take about as long.
    pub fn verify(&self, name: &str, password: &str) -> Option<String> {
        let rec = if valid_name(name) { self.lock().get(name).cloned() } else { None };
        let password = if password.len() > MAX_PASSWORD { None } else { Some(password) };
        match (rec, password) {
            (Some(rec), Some(pw)) => {
                let ok = PasswordHash::new(&rec.hash)
                    .map(|h| Argon2::default().verify_password(pw.as_bytes(), &h).is_ok())
                    .unwrap_or_else(|e| {
                        tracing::error!("stored hash for an account is malformed: {e}");
                        false
                    });
                ok.then_some(rec.profile)
            }
            (_, pw) => {
                if let Ok(h) = PasswordHash::new(self.dummy_hash()) {
                    let _ = Argon2::default().verify_password(pw.unwrap_or("").as_bytes(), &h);
                }
                None
            }
        }
    }

    /// Writes `accounts` atomically (see the module docs).
    fn persist(&self, accounts: &BTreeMap<String, AccountRecord>) -> CvResult<()> {
        self.write_atomic(accounts).map_err(|e| {
            tracing::error!(path = %self.path.display(), "cannot write the credential store: {e}");
            CvError::internal("cannot write the credential store")
        })
    }

    fn tmp_path(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".tmp");
        PathBuf::from(p)
    }

    fn write_atomic(&self, accounts: &BTreeMap<String, AccountRecord>) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = self.tmp_path();
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        let mut body = serde_json::to_vec_pretty(accounts).expect("accounts serialise");
        body.push(b'\n');
        f.write_all(&body)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

fn already_exists(name: &str) -> CvError {
    CvError::new(
        capvisor_rpc::schema::common_capnp::ErrorCode::AlreadyExists,
        format!("account {name:?} already exists"),
    )
}

#[cfg(test)]
pub(crate) fn test_params() -> Params {
    // Cheap parameters so debug-mode tests stay fast; production uses default_params().
    Params::new(256, 1, 1, None).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use capvisor_rpc::schema::common_capnp::ErrorCode;
    use std::os::unix::fs::PermissionsExt;

    fn open(dir: &Path) -> CredentialStore {
        CredentialStore::open(&dir.join("accounts.json"), ["owner".to_string(), "user".to_string()], test_params())
            .unwrap()
    }

    #[test]
    fn name_rules() {
        for ok in ["a", "_x", "bob", "a.b-c_9", &"a".repeat(32)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "9a", "A", "bob!", "-x", ".x", "a b", &"a".repeat(33), "bö"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn add_verify_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.add("bob", "user", "correct horse").unwrap();
        assert_eq!(s.verify("bob", "correct horse").as_deref(), Some("user"));
        assert_eq!(s.verify("bob", "wrong horse!"), None);
        assert_eq!(s.verify("alice", "correct horse"), None);
        assert_eq!(s.verify("NOT A NAME", "correct horse"), None);
        assert_eq!(s.list(), vec![("bob".to_string(), "user".to_string())]);

        // Persisted: a fresh store sees it, mode 0600, PHC argon2id, no plaintext.
        let text = std::fs::read_to_string(s.path()).unwrap();
        assert!(text.contains("$argon2id$v=19$"));
        assert!(!text.contains("correct horse"));
        assert_eq!(std::fs::metadata(s.path()).unwrap().permissions().mode() & 0o777, 0o600);
        let s2 = open(dir.path());
        assert_eq!(s2.verify("bob", "correct horse").as_deref(), Some("user"));

        assert_eq!(s.remove("bob"), Ok(()));
        assert_eq!(s.remove("bob").unwrap_err().code, ErrorCode::NotFound);
        assert_eq!(open(dir.path()).list(), vec![]);
    }

    #[test]
    fn add_errors() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.add("bob", "user", "12345678").unwrap();
        assert_eq!(s.add("bob", "owner", "abcdefgh").unwrap_err().code, ErrorCode::AlreadyExists);
        assert_eq!(s.add("Bob", "user", "abcdefgh").unwrap_err().code, ErrorCode::InvalidArgument);
        assert_eq!(s.add("carol", "root", "abcdefgh").unwrap_err().code, ErrorCode::InvalidArgument);
        assert_eq!(s.add("carol", "user", "1234567").unwrap_err().code, ErrorCode::InvalidArgument);
        assert_eq!(s.add("carol", "user", &"x".repeat(MAX_PASSWORD + 1)).unwrap_err().code, ErrorCode::InvalidArgument);
        // The rejected password must not show up in the message.
        let e = s.add("carol", "user", "1234567").unwrap_err();
        assert!(!e.message.contains("1234567"));
        assert_eq!(s.list().len(), 1);
    }

    #[test]
    fn crash_between_tmp_and_rename_keeps_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.add("bob", "user", "password1").unwrap();
        let before = std::fs::read(s.path()).unwrap();
        // Simulate a crash after writing the temporary file, before rename:
        // a half-written tmp file lies beside the real one.
        let tmp = dir.path().join("accounts.json.tmp");
        std::fs::write(&tmp, b"{\"eve\": {\"profile\": \"owner\", \"ha").unwrap();
        let s = open(dir.path());
        assert_eq!(std::fs::read(s.path()).unwrap(), before);
        assert_eq!(s.verify("bob", "password1").as_deref(), Some("user"));
        assert_eq!(s.verify("eve", "anything"), None);
        // The next write replaces the stale tmp and leaves none behind.
        s.add("carol", "owner", "password2").unwrap();
        assert!(!tmp.exists());
        let s = open(dir.path());
        assert_eq!(s.list().len(), 2);
    }

    #[test]
    fn loose_mode_is_tightened_and_garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("accounts.json");
        std::fs::write(&p, b"{}").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        open(dir.path());
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::write(&p, b"not json").unwrap();
        let err = CredentialStore::open(&p, [], test_params()).err().unwrap().to_string();
        assert!(err.contains("accounts.json"), "{err}");
    }
}
