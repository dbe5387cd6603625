//! Where capvisor keeps sockets, state and caches.
//!
//! | what | variable | default |
//! |---|---|---|
//! | gateway socket | `CAPVISOR_SOCKET` | `$XDG_RUNTIME_DIR/capvisor/gateway.sock`, else `/tmp/capvisor-<uid>/gateway.sock` (dir mode 0700) |
//! | state (accounts, audit, VM run dirs) | `CAPVISOR_STATE_DIR` | `$XDG_STATE_HOME/capvisor`, else `~/.local/state/capvisor` |
//! | cache (guest kernels, images) | `CAPVISOR_CACHE_DIR` | `$XDG_CACHE_HOME/capvisor`, else `~/.cache/capvisor` |
//! | client config (resume token) | `CAPVISOR_CONFIG_DIR` | `~/.config/capvisor` |

use std::path::PathBuf;

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from)
}

fn home() -> PathBuf {
    env_path("HOME").unwrap_or_else(|| PathBuf::from("/tmp"))
}

fn uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// The gateway's Unix socket path (see the module table).
pub fn gateway_socket() -> PathBuf {
    if let Some(p) = env_path("CAPVISOR_SOCKET") {
        return p;
    }
    runtime_dir().join("gateway.sock")
}

/// A per-user runtime directory: `$XDG_RUNTIME_DIR/capvisor`, else
/// `/tmp/capvisor-<uid>`. Created with mode 0700 by [`ensure_private_dir`].
pub fn runtime_dir() -> PathBuf {
    match env_path("XDG_RUNTIME_DIR") {
        Some(p) => p.join("capvisor"),
        None => PathBuf::from(format!("/tmp/capvisor-{}", uid())),
    }
}

/// State directory (see the module table).
pub fn state_dir() -> PathBuf {
    if let Some(p) = env_path("CAPVISOR_STATE_DIR") {
        return p;
    }
    env_path("XDG_STATE_HOME").unwrap_or_else(|| home().join(".local/state")).join("capvisor")
}

/// Cache directory (see the module table).
pub fn cache_dir() -> PathBuf {
    if let Some(p) = env_path("CAPVISOR_CACHE_DIR") {
        return p;
    }
    env_path("XDG_CACHE_HOME").unwrap_or_else(|| home().join(".cache")).join("capvisor")
}

/// Client configuration directory (see the module table).
pub fn config_dir() -> PathBuf {
    if let Some(p) = env_path("CAPVISOR_CONFIG_DIR") {
        return p;
    }
    env_path("XDG_CONFIG_HOME").unwrap_or_else(|| home().join(".config")).join("capvisor")
}

/// Makes `dir` a private directory of ours: creates it (and missing
/// parents) with mode 0700 when it does not exist; an existing one must be
/// a real directory (not a symlink), owned by us, and closed to group and
/// others. Nothing that already existed is chmod-ed: a directory we did not
/// create is checked, never changed.
///
/// Errors: `PermissionDenied` naming the problem (a symlink, another
/// owner, a group- or world-accessible mode, not a directory), or any I/O
/// error.
pub fn ensure_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Err(e) = std::fs::symlink_metadata(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(e);
        }
        // Every component we create (missing parents too) is 0700; then
        // it is checked like any existing one (someone may have made it
        // meanwhile).
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    check_private_dir(dir)
}

/// Checks that an existing `dir` is a real directory (not a symlink), owned
/// by us, and closed to group and others; changes nothing.
fn check_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let denied = |why: String| std::io::Error::new(std::io::ErrorKind::PermissionDenied, why);
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.file_type().is_symlink() {
        return Err(denied(format!("{} is a symbolic link; refusing to use it", dir.display())));
    }
    if !meta.is_dir() {
        return Err(denied(format!("{} exists and is not a directory", dir.display())));
    }
    if meta.uid() != uid() {
        return Err(denied(format!(
            "{} belongs to uid {}, not to us (uid {}); refusing to use it",
            dir.display(),
            meta.uid(),
            uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(denied(format!(
            "{} has mode {:04o}; it must be private (chmod 700 it, or choose another path)",
            dir.display(),
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Checks, before a client sends credentials there, that the gateway
/// socket at `socket` belongs to us or to root: the socket and its
/// directory must not be symbolic links, must be owned by our uid or by
/// root, and the directory must not be writable by group or others (else
/// another user could have put their own server there, e.g. by creating
/// `/tmp/capvisor-<uid>` first).
///
/// Errors: `PermissionDenied` naming the problem; `NotFound` when the
/// socket does not exist.
pub fn check_gateway_socket(socket: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let denied = |why: String| std::io::Error::new(std::io::ErrorKind::PermissionDenied, why);
    let trusted = |owner: u32| owner == uid() || owner == 0;
    let dir = socket.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let d = std::fs::symlink_metadata(dir)?;
    if d.file_type().is_symlink() || !d.is_dir() {
        return Err(denied(format!("{} is not a plain directory; refusing to connect", dir.display())));
    }
    if !trusted(d.uid()) {
        return Err(denied(format!(
            "{} belongs to uid {}, not to you or root; refusing to send credentials there",
            dir.display(),
            d.uid()
        )));
    }
    if d.mode() & 0o022 != 0 {
        return Err(denied(format!(
            "{} is writable by others (mode {:04o}); refusing to send credentials there",
            dir.display(),
            d.mode() & 0o7777
        )));
    }
    let s = std::fs::symlink_metadata(socket)?;
    if !s.file_type().is_socket() {
        return Err(denied(format!("{} is not a socket; refusing to connect", socket.display())));
    }
    if !trusted(s.uid()) {
        return Err(denied(format!(
            "{} belongs to uid {}, not to you or root; refusing to send credentials there",
            socket.display(),
            s.uid()
        )));
    }
    Ok(())
}

/// The directory holding the capvisor binaries: the directory of the
/// running executable, or `CAPVISOR_BIN_DIR`.
pub fn bin_dir() -> PathBuf {
    if let Some(p) = env_path("CAPVISOR_BIN_DIR") {
        return p;
    }
    std::env::current_exe().ok().and_then(|p| p.parent().map(|p| p.to_path_buf())).unwrap_or_else(|| PathBuf::from("."))
}

/// Path of capvisor binary `name` (e.g. `"capvisor-worker"`) beside the running one.
pub fn binary(name: &str) -> PathBuf {
    bin_dir().join(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn private_dirs_are_created_checked_and_never_chmod_ed() {
        let t = tempfile::tempdir().unwrap();
        let fresh = t.path().join("a/b");
        ensure_private_dir(&fresh).unwrap();
        assert_eq!(std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777, 0o700);
        ensure_private_dir(&fresh).unwrap();

        let open = t.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = ensure_private_dir(&open).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
        assert_eq!(std::fs::metadata(&open).unwrap().permissions().mode() & 0o777, 0o755, "left as it was");

        let link = t.path().join("link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        assert!(ensure_private_dir(&link).unwrap_err().to_string().contains("symbolic link"));

        if uid() == 0 {
            let theirs = t.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
            nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            assert!(ensure_private_dir(&theirs).unwrap_err().to_string().contains("uid 65534"));
        }
    }

    #[test]
    fn clients_refuse_sockets_others_control() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("run");
        ensure_private_dir(&dir).unwrap();
        let sock = dir.join("gateway.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        check_gateway_socket(&sock).unwrap();
        assert_eq!(check_gateway_socket(&dir.join("nope")).unwrap_err().kind(), std::io::ErrorKind::NotFound);

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(check_gateway_socket(&sock).unwrap_err().to_string().contains("writable by others"));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();

        let link_dir = t.path().join("linked");
        std::os::unix::fs::symlink(&dir, &link_dir).unwrap();
        assert!(check_gateway_socket(&link_dir.join("gateway.sock")).is_err());

        if uid() == 0 {
            // As if another user had created the directory first.
            nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            assert!(check_gateway_socket(&sock).unwrap_err().to_string().contains("uid 65534"));
        }
    }
}
