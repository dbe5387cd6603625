//! Secrets: the broker's store of each principal's secrets for the egress
//! proxy (issue 9; schema `Secrets`, `SessionHost.putSecret` ..
//! `revealSecret`).
//!
//! Layout: `state_dir/secrets/` (0700) holds one JSON file per principal,
//! `p-<same principal hash as volumes>.json` (0600; see
//! [`crate::volumes::principal_key`], so no principal name becomes a path),
//! written atomically (temporary file, fsync, rename(2), fsync of the
//! directory). Each entry keeps the secret's name, host globs and creation
//! time in clear and its value sealed with ChaCha20-Poly1305 (RFC 8439,
//! `ring::aead::CHACHA20_POLY1305`) under the install's key, with a random
//! 96-bit nonce per value and, as associated data, the principal hash, the
//! name, the creation time and the host globs: a value copied to another
//! principal's file or another name, or an entry whose hosts were widened
//! by editing the file, fails to open (`internal`, never a panic, never
//! the value in the message).
//!
//! The key: 32 random bytes in `state_dir/secrets.key` (0600), created once
//! (written to a temporary file, then linked into place exclusively, so it
//! is never torn nor replaced) and never logged. Losing it loses every value (names and
//! hosts stay listable; reveal fails with `internal`).
//!
//! Bounds ([`capvisor_rpc::secrets`]): names `[A-Za-z0-9_-]{1,64}`; values
//! 1..=8192 bytes without CR, LF or NUL (they go into HTTP header fields,
//! RFC 9110 5.5); 1..=16 host globs (`NetRule.host` syntax,
//! [`capvisor_rpc::hostglob`]); at most 64 secrets per principal (quota).

use capvisor_rpc::hostglob;
use capvisor_rpc::secrets::{valid_name, MAX_HOSTS, MAX_NAME, MAX_SECRETS, MAX_VALUE};
use capvisor_rpc::{CvError, CvResult};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Length of the install's key file, bytes.
pub const KEY_LEN: usize = 32;

/// What `list` shows of one secret (never its value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretFacts {
    /// The secret's name.
    pub name: String,
    /// Host globs its value may be sent to (lower case).
    pub hosts: Vec<String>,
    /// When it was put, Unix epoch ms.
    pub created_at_ms: i64,
}

/// The answer of [`SecretStore::reveal`] (schema `revealSecret`).
#[derive(Clone, PartialEq, Eq)]
pub struct Reveal {
    /// There is a secret of that name.
    pub found: bool,
    /// The host matches one of its globs.
    pub matched: bool,
    /// The value, only when `matched`.
    pub value: Option<Vec<u8>>,
}

impl std::fmt::Debug for Reveal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the value, even in a test failure or a debug log.
        f.debug_struct("Reveal").field("found", &self.found).field("matched", &self.matched).finish_non_exhaustive()
    }
}

/// One entry of a principal's file.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    name: String,
    hosts: Vec<String>,
    created_at_ms: i64,
    /// 12 bytes, hex.
    nonce: String,
    /// Sealed value and its 16-byte tag, hex.
    sealed: String,
}

/// A principal's file.
#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    /// Whose file this is (for operators; the associated data binds it).
    principal: String,
    secrets: Vec<Entry>,
}

/// The store over `state_dir/secrets` and `state_dir/secrets.key`.
pub struct SecretStore {
    root: PathBuf,
    key: LessSafeKey,
    rng: SystemRandom,
}

fn corrupt(what: &str) -> CvError {
    CvError::internal(format!("the secret store is damaged ({what}); ask the operator"))
}

impl SecretStore {
    /// The store under `state_dir`: makes `secrets/` (0700) and the key
    /// file (0600, linked into place exclusively) if missing, else reads
    /// the key.
    ///
    /// Errors: the directory or key cannot be made or read; a key file
    /// that is not exactly [`KEY_LEN`] bytes.
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let root = state_dir.join("secrets");
        std::fs::create_dir_all(&root)?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))?;
        let rng = SystemRandom::new();
        let key_path = state_dir.join("secrets.key");
        let bytes = match std::fs::read(&key_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Written whole to a private temporary file, then linked
                // into place with link(2), which like O_EXCL fails when the
                // name exists: a crash never leaves a torn key, and a key
                // once there is never replaced.
                let mut k = [0u8; KEY_LEN];
                rng.fill(&mut k).map_err(|_| std::io::Error::other("no random bytes for the secrets key"))?;
                let tmp = state_dir.join(format!("secrets.key.{}.tmp", std::process::id()));
                let _ = std::fs::remove_file(&tmp);
                let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
                f.write_all(&k)?;
                f.sync_all()?;
                drop(f);
                let linked = std::fs::hard_link(&tmp, &key_path);
                let _ = std::fs::remove_file(&tmp);
                match linked {
                    Ok(()) => {
                        std::fs::File::open(state_dir)?.sync_all()?;
                        k.to_vec()
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => std::fs::read(&key_path)?,
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        if bytes.len() != KEY_LEN {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is not {KEY_LEN} bytes", key_path.display()),
            ));
        }
        let key = LessSafeKey::new(
            UnboundKey::new(&CHACHA20_POLY1305, &bytes).map_err(|_| std::io::Error::other("bad secrets key"))?,
        );
        Ok(Self { root, key, rng })
    }

    fn path(&self, principal: &str) -> PathBuf {
        self.root.join(format!("{}.json", crate::volumes::principal_key(principal)))
    }

    fn aad(principal: &str, e_name: &str, created_at_ms: i64, hosts: &[String]) -> Vec<u8> {
        // Unambiguous: names and globs hold no NUL.
        let mut a =
            format!("capvisor-secret-v1\0{}\0{e_name}\0{created_at_ms}", crate::volumes::principal_key(principal));
        for h in hosts {
            a.push('\0');
            a.push_str(h);
        }
        a.into_bytes()
    }

    fn load(&self, principal: &str) -> CvResult<File> {
        let path = self.path(principal);
        let body = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(File::default()),
            Err(e) => {
                tracing::error!(path = %path.display(), "cannot read a secrets file: {e}");
                return Err(CvError::internal("cannot read the secret store"));
            }
        };
        let f: File = serde_json::from_slice(&body).map_err(|_| corrupt("unreadable file"))?;
        if f.secrets.len() > MAX_SECRETS
            || f.secrets.iter().any(|e| !valid_name(&e.name) || e.hosts.is_empty() || e.hosts.len() > MAX_HOSTS)
        {
            return Err(corrupt("bad entry"));
        }
        Ok(f)
    }

    fn save(&self, principal: &str, f: &File) -> CvResult<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.path(principal);
        let tmp = path.with_extension("json.tmp");
        let res = (|| -> std::io::Result<()> {
            let _ = std::fs::remove_file(&tmp);
            let mut out = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
            let mut body = serde_json::to_vec_pretty(f).map_err(std::io::Error::other)?;
            body.push(b'\n');
            out.write_all(&body)?;
            out.sync_all()?;
            drop(out);
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.root)?.sync_all()
        })();
        res.map_err(|e| {
            tracing::error!(path = %path.display(), "cannot write a secrets file: {e}");
            CvError::internal("cannot write the secret store")
        })
    }

    fn open_value(&self, principal: &str, e: &Entry) -> CvResult<Vec<u8>> {
        let nonce: [u8; NONCE_LEN] = hex::decode(&e.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(|| corrupt(&format!("bad nonce of {:?}", e.name)))?;
        let mut buf = hex::decode(&e.sealed).map_err(|_| corrupt(&format!("bad ciphertext of {:?}", e.name)))?;
        let aad = Self::aad(principal, &e.name, e.created_at_ms, &e.hosts);
        let plain = self
            .key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut buf)
            .map_err(|_| corrupt(&format!("secret {:?} does not authenticate", e.name)))?;
        Ok(plain.to_vec())
    }

    /// Stores (or replaces) `principal`'s secret `name`: `value` sealed,
    /// sent only to hosts matching one of `hosts`.
    ///
    /// Errors: `invalidArgument` for a bad name, an empty value or one over
    /// [`MAX_VALUE`] bytes or holding CR, LF or NUL, no hosts, more than
    /// [`MAX_HOSTS`] or a bad glob; `quota` for a new name beyond
    /// [`MAX_SECRETS`]; `internal` when the store cannot be read or written.
    pub fn put(&self, principal: &str, name: &str, value: &[u8], hosts: &[String]) -> CvResult<()> {
        check_name(name)?;
        if value.is_empty() || value.len() > MAX_VALUE {
            return Err(CvError::invalid(format!(
                "a secret's value is 1 to {MAX_VALUE} bytes (this one is {})",
                value.len()
            )));
        }
        if value.iter().any(|b| matches!(b, b'\r' | b'\n' | 0)) {
            return Err(CvError::invalid(
                "a secret's value may not hold CR, LF or NUL (it goes into HTTP header fields)",
            ));
        }
        if hosts.is_empty() || hosts.len() > MAX_HOSTS {
            return Err(CvError::invalid(format!(
                "a secret names 1 to {MAX_HOSTS} host globs ({} given)",
                hosts.len()
            )));
        }
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
        if let Some(bad) = hosts.iter().find(|h| !hostglob::valid_glob(h)) {
            return Err(CvError::invalid(format!(
                "host {bad:?} is not \"*\", \"*.<domain>\", a DNS name or a dotted IPv4 address"
            )));
        }
        let mut f = self.load(principal)?;
        let replacing = f.secrets.iter().any(|e| e.name == name);
        if !replacing && f.secrets.len() >= MAX_SECRETS {
            return Err(CvError::quota(format!(
                "this principal may keep at most {MAX_SECRETS} secrets; remove one first"
            )));
        }
        let created_at_ms = crate::now_ms();
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| CvError::internal("no random bytes for a nonce"))?;
        let mut buf = value.to_vec();
        let aad = Self::aad(principal, name, created_at_ms, &hosts);
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut buf)
            .map_err(|_| CvError::internal("cannot seal the secret"))?;
        let entry =
            Entry { name: name.into(), hosts, created_at_ms, nonce: hex::encode(nonce), sealed: hex::encode(&buf) };
        f.secrets.retain(|e| e.name != name);
        f.secrets.push(entry);
        f.secrets.sort_by(|a, b| a.name.cmp(&b.name));
        f.principal = principal.into();
        self.save(principal, &f)
    }

    /// `principal`'s secrets, by name, without values.
    ///
    /// Errors: `internal` when its file is damaged.
    pub fn list(&self, principal: &str) -> CvResult<Vec<SecretFacts>> {
        Ok(self
            .load(principal)?
            .secrets
            .into_iter()
            .map(|e| SecretFacts { name: e.name, hosts: e.hosts, created_at_ms: e.created_at_ms })
            .collect())
    }

    /// Deletes `principal`'s secret `name`.
    ///
    /// Errors: `invalidArgument` (bad name), `notFound`, `internal`.
    pub fn remove(&self, principal: &str, name: &str) -> CvResult<()> {
        check_name(name)?;
        let mut f = self.load(principal)?;
        let before = f.secrets.len();
        f.secrets.retain(|e| e.name != name);
        if f.secrets.len() == before {
            return Err(CvError::not_found(format!("no secret named {name:?}")));
        }
        if f.secrets.is_empty() {
            return std::fs::remove_file(self.path(principal)).map_err(|e| {
                tracing::error!("cannot delete a secrets file: {e}");
                CvError::internal("cannot write the secret store")
            });
        }
        self.save(principal, &f)
    }

    /// Whether `principal` has a secret `name` and whether `host` matches
    /// one of its globs ([`hostglob::host_matches`]); the value only then.
    ///
    /// Errors: `internal` when the file is damaged or the value does not
    /// authenticate (the message names the secret, never its value).
    pub fn reveal(&self, principal: &str, name: &str, host: &str) -> CvResult<Reveal> {
        let none = Reveal { found: false, matched: false, value: None };
        if !valid_name(name) {
            return Ok(none);
        }
        let f = self.load(principal)?;
        let Some(e) = f.secrets.iter().find(|e| e.name == name) else { return Ok(none) };
        // Opened even when the host does not match, so tampering shows.
        let value = self.open_value(principal, e)?;
        let matched = !host.is_empty() && e.hosts.iter().any(|g| hostglob::host_matches(g, host));
        Ok(Reveal { found: true, matched, value: matched.then_some(value) })
    }
}

fn check_name(name: &str) -> CvResult<()> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(CvError::invalid(format!("bad secret name {name:?}: use 1-{MAX_NAME} of [A-Za-z0-9_-]")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capvisor_rpc::schema::common_capnp::ErrorCode;

    const VALUE: &[u8] = b"sk-live-0123456789abcdef-TOPSECRET";

    fn hosts(h: &[&str]) -> Vec<String> {
        h.iter().map(|s| s.to_string()).collect()
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn round_trip_reveals_only_for_matching_hosts_and_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        let s = SecretStore::open(d.path()).unwrap();
        s.put("local:alice", "api", VALUE, &hosts(&["API.example.org", "*.svc.test"])).unwrap();
        let l = s.list("local:alice").unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].name, "api");
        assert_eq!(l[0].hosts, hosts(&["api.example.org", "*.svc.test"]));
        assert!(l[0].created_at_ms > 0);
        let r = s.reveal("local:alice", "api", "api.example.org").unwrap();
        assert!(r.found && r.matched);
        assert_eq!(r.value.as_deref(), Some(VALUE));
        assert_eq!(s.reveal("local:alice", "api", "x.svc.test").unwrap().value.as_deref(), Some(VALUE));
        for other in ["evil.test", "svc.test", "api.example.org.evil.test", ""] {
            let r = s.reveal("local:alice", "api", other).unwrap();
            assert_eq!((r.found, r.matched, r.value), (true, false, None), "{other:?}");
        }
        let r = s.reveal("local:alice", "nope", "api.example.org").unwrap();
        assert_eq!((r.found, r.matched, r.value), (false, false, None));
        // put replaces.
        s.put("local:alice", "api", b"v2", &hosts(&["b.test"])).unwrap();
        assert_eq!(s.list("local:alice").unwrap()[0].hosts, hosts(&["b.test"]));
        assert!(!s.reveal("local:alice", "api", "api.example.org").unwrap().matched);
        // A new store over the same directory (a broker restart) reads the same key.
        drop(s);
        let s = SecretStore::open(d.path()).unwrap();
        assert_eq!(s.reveal("local:alice", "api", "b.test").unwrap().value.as_deref(), Some(&b"v2"[..]));
        s.remove("local:alice", "api").unwrap();
        assert!(s.list("local:alice").unwrap().is_empty());
        assert_eq!(s.remove("local:alice", "api").unwrap_err().code, ErrorCode::NotFound);
    }

    #[test]
    fn files_hold_only_ciphertext_with_private_modes() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let s = SecretStore::open(d.path()).unwrap();
        s.put("local:alice", "api", VALUE, &hosts(&["api.test"])).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d.path().join("secrets.key")), 0o600);
        assert_eq!(std::fs::metadata(d.path().join("secrets.key")).unwrap().len(), KEY_LEN as u64);
        assert_eq!(mode(&d.path().join("secrets")), 0o700);
        let file = s.path("local:alice");
        assert_eq!(mode(&file), 0o600);
        assert!(!file.to_string_lossy().contains("alice"), "no principal name in the path");
        // No file under the state dir holds the value's bytes (nor its hex).
        for e in std::fs::read_dir(d.path().join("secrets")).unwrap().chain(std::fs::read_dir(d.path()).unwrap()) {
            let p = e.unwrap().path();
            if p.is_file() {
                let body = std::fs::read(&p).unwrap();
                assert!(!contains(&body, VALUE), "{} holds the value", p.display());
                assert!(!contains(&body, hex::encode(VALUE).as_bytes()), "{} holds the value in hex", p.display());
            }
        }
        assert!(!file.with_extension("json.tmp").exists());
        let names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "a temporary file was left: {names:?}");
        // Opening again keeps the key (the sealed value still opens).
        let key = std::fs::read(d.path().join("secrets.key")).unwrap();
        let s = SecretStore::open(d.path()).unwrap();
        assert_eq!(std::fs::read(d.path().join("secrets.key")).unwrap(), key);
        assert!(s.reveal("local:alice", "api", "api.test").unwrap().matched);
    }

    #[test]
    fn tampering_is_an_internal_error_without_the_value() {
        let d = tempfile::tempdir().unwrap();
        let s = SecretStore::open(d.path()).unwrap();
        s.put("local:alice", "api", VALUE, &hosts(&["api.test"])).unwrap();
        let file = s.path("local:alice");
        let orig = std::fs::read_to_string(&file).unwrap();
        let mut f: File = serde_json::from_str(&orig).unwrap();
        // One ciphertext bit flipped.
        let mut sealed = hex::decode(&f.secrets[0].sealed).unwrap();
        sealed[0] ^= 1;
        f.secrets[0].sealed = hex::encode(&sealed);
        let flipped = serde_json::to_string(&f).unwrap();
        // The hosts widened to "*" by editing the file.
        let mut f: File = serde_json::from_str(&orig).unwrap();
        f.secrets[0].hosts = hosts(&["*"]);
        let widened = serde_json::to_string(&f).unwrap();
        for (what, body) in [("flipped", flipped), ("widened", widened), ("garbage", "{not json".to_string())] {
            std::fs::write(&file, body).unwrap();
            let e = s.reveal("local:alice", "api", "evil.test").unwrap_err();
            assert_eq!(e.code, ErrorCode::Internal, "{what}");
            assert!(!contains(e.message.as_bytes(), VALUE), "{what}: {}", e.message);
            let e = s.reveal("local:alice", "api", "api.test").unwrap_err();
            assert_eq!(e.code, ErrorCode::Internal, "{what}");
        }
        // Another principal's entry copied into this file does not open either.
        std::fs::write(&file, &orig).unwrap();
        s.put("local:bob", "api", b"bob-value", &hosts(&["api.test"])).unwrap();
        std::fs::copy(s.path("local:bob"), &file).unwrap();
        assert_eq!(s.reveal("local:alice", "api", "api.test").unwrap_err().code, ErrorCode::Internal);
        // A wrong key (the key file replaced) opens nothing.
        std::fs::write(&file, &orig).unwrap();
        drop(s);
        std::fs::write(d.path().join("secrets.key"), [7u8; KEY_LEN]).unwrap();
        let s = SecretStore::open(d.path()).unwrap();
        assert_eq!(s.reveal("local:alice", "api", "api.test").unwrap_err().code, ErrorCode::Internal);
        std::fs::write(d.path().join("secrets.key"), [7u8; 5]).unwrap();
        assert!(SecretStore::open(d.path()).is_err(), "a short key file is refused");
    }

    #[test]
    fn another_principal_sees_and_reveals_nothing() {
        let d = tempfile::tempdir().unwrap();
        let s = SecretStore::open(d.path()).unwrap();
        s.put("local:alice", "api", VALUE, &hosts(&["*"])).unwrap();
        assert!(s.list("local:bob").unwrap().is_empty());
        let r = s.reveal("local:bob", "api", "api.test").unwrap();
        assert_eq!((r.found, r.matched, r.value), (false, false, None));
        assert_eq!(s.remove("local:bob", "api").unwrap_err().code, ErrorCode::NotFound);
        assert_eq!(s.list("local:alice").unwrap().len(), 1, "bob's remove touched nothing of alice's");
    }

    #[test]
    fn quota_and_bounds() {
        let d = tempfile::tempdir().unwrap();
        let s = SecretStore::open(d.path()).unwrap();
        let h = hosts(&["a.test"]);
        for i in 0..MAX_SECRETS {
            s.put("p", &format!("s{i}"), b"v", &h).unwrap();
        }
        assert_eq!(s.put("p", "one-more", b"v", &h).unwrap_err().code, ErrorCode::Quota);
        s.put("p", "s0", b"replaced", &h).expect("replacing is not a new secret");
        s.put("q", "one-more", b"v", &h).expect("another principal has its own quota");
        let inv = |name: &str, value: &[u8], hosts: &[String]| s.put("q", name, value, hosts).unwrap_err().code;
        for bad in ["", "a b", "../x", "a.b", "a/b", &"x".repeat(MAX_NAME + 1)] {
            assert_eq!(inv(bad, b"v", &h), ErrorCode::InvalidArgument, "name {bad:?}");
        }
        assert_eq!(inv("n", b"", &h), ErrorCode::InvalidArgument, "empty value");
        assert_eq!(inv("n", &vec![b'v'; MAX_VALUE + 1], &h), ErrorCode::InvalidArgument, "long value");
        s.put("q", "n", &vec![b'v'; MAX_VALUE], &h).expect("8 KiB is allowed");
        for v in [&b"a\r\nX-Evil: 1"[..], b"a\nb", b"a\0b"] {
            assert_eq!(inv("n", v, &h), ErrorCode::InvalidArgument, "{v:?}");
        }
        assert_eq!(inv("n", b"v", &[]), ErrorCode::InvalidArgument, "no hosts");
        let many: Vec<String> = (0..=MAX_HOSTS).map(|i| format!("h{i}.test")).collect();
        assert_eq!(inv("n", b"v", &many), ErrorCode::InvalidArgument, "17 hosts");
        for bad in ["", "*.", "a*.test", "a..b", "http://a.test", "a.test:443", "*.*.test"] {
            assert_eq!(inv("n", b"v", &hosts(&[bad])), ErrorCode::InvalidArgument, "host {bad:?}");
        }
        assert_eq!(s.list("q").unwrap().len(), 2, "failed puts stored nothing");
    }
}
