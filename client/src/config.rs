//! The saved login: `CAPVISOR_CONFIG_DIR/session.json` (default
//! `~/.config/capvisor`), mode 0600, written atomically. It holds the
//! session's resume token (a sturdy ref: anyone holding it can act as the
//! session until logout or expiry).

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A saved login.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SavedSession {
    /// The gateway socket this session belongs to.
    pub socket: PathBuf,
    /// Resume token (secret).
    pub token: String,
    /// e.g. `local:root`.
    pub principal: String,
    /// Profile name.
    pub profile: String,
    /// Expiry, Unix epoch ms.
    pub expires_at_ms: i64,
}

/// `<config dir>/session.json`.
pub fn session_file() -> PathBuf {
    capvisor_rpc::paths::config_dir().join("session.json")
}

/// Loads the saved login, `Ok(None)` if there is none.
///
/// Errors: unreadable or malformed file.
pub fn load(path: &Path) -> std::io::Result<Option<SavedSession>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Saves atomically (temp file mode 0600 + fsync + rename) under a 0700 dir.
pub fn save(path: &Path, s: &SavedSession) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let tmp = dir.join(format!(".session.json.{}", std::process::id()));
    {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(s).expect("serialize"))?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Deletes the saved login, if any.
pub fn clear(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_private_and_loads() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("cfg/session.json");
        assert_eq!(load(&p).unwrap(), None);
        let s = SavedSession {
            socket: "/tmp/x.sock".into(),
            token: "t".into(),
            principal: "local:0".into(),
            profile: "owner".into(),
            expires_at_ms: 5,
        };
        save(&p, &s).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(load(&p).unwrap(), Some(s));
        clear(&p).unwrap();
        assert_eq!(load(&p).unwrap(), None);
        std::fs::write(&p, b"{garbage").unwrap();
        assert!(load(&p).is_err());
    }
}
