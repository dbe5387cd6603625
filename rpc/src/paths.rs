//! Where capvisor keeps sockets, state and caches.
//!
//! | what | variable | default |
//! |---|---|---|
//! | gateway socket | `CAPVISOR_SOCKET` | `$XDG_RUNTIME_DIR/capvisor/gateway.sock`, else `/tmp/capvisor-<uid>/gateway.sock` (dir mode 0700); a client whose own default socket does not exist uses [`SYSTEM_SOCKET`] when that exists |
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

/// The socket of a system-wide server (`capvisor serve --user NAME` run by
/// root binds it by default): directory 0750 (group `[gateway]
/// socket_group`) or 0700, owned by the service user.
pub const SYSTEM_SOCKET: &str = "/run/capvisor/gateway.sock";
/// The state directory of a system-wide server (`serve --user`), unless
/// `CAPVISOR_STATE_DIR` says otherwise.
pub const SYSTEM_STATE_DIR: &str = "/var/lib/capvisor";
/// The cache directory of a system-wide server (`serve --user`), unless
/// `CAPVISOR_CACHE_DIR` says otherwise.
pub const SYSTEM_CACHE_DIR: &str = "/var/cache/capvisor";

/// The gateway's Unix socket path a client uses (see the module table):
/// `CAPVISOR_SOCKET`; else our own runtime directory's socket when it
/// exists; else [`SYSTEM_SOCKET`] when that exists; else our own.
pub fn gateway_socket() -> PathBuf {
    if let Some(p) = env_path("CAPVISOR_SOCKET") {
        return p;
    }
    let own = runtime_dir().join("gateway.sock");
    if std::fs::symlink_metadata(&own).is_err() && std::fs::symlink_metadata(SYSTEM_SOCKET).is_ok() {
        return PathBuf::from(SYSTEM_SOCKET);
    }
    own
}

/// The directories of a system-wide server run as a service user
/// (`serve --user`): (socket, state, cache) from `CAPVISOR_SOCKET`,
/// `CAPVISOR_STATE_DIR`, `CAPVISOR_CACHE_DIR`, else [`SYSTEM_SOCKET`],
/// [`SYSTEM_STATE_DIR`], [`SYSTEM_CACHE_DIR`].
pub fn system_paths() -> (PathBuf, PathBuf, PathBuf) {
    (
        env_path("CAPVISOR_SOCKET").unwrap_or_else(|| SYSTEM_SOCKET.into()),
        env_path("CAPVISOR_STATE_DIR").unwrap_or_else(|| SYSTEM_STATE_DIR.into()),
        env_path("CAPVISOR_CACHE_DIR").unwrap_or_else(|| SYSTEM_CACHE_DIR.into()),
    )
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

/// Like [`ensure_private_dir`], but with `group` set the directory is
/// shared with that group: a missing one is created 02750 (setgid, so the
/// socket made in it gets the group too) and given `group` (we must be
/// root or a member); an existing one must be ours, have group `group`,
/// and be closed to group writes and to others (at most 2750). `None` is
/// exactly [`ensure_private_dir`]. Nothing that already existed is
/// chmod-ed.
///
/// Errors: as [`ensure_private_dir`], plus a directory of another group or
/// one the group could write; chown(2) failing (`EPERM` when we are not in
/// `group`).
pub fn ensure_shared_dir(dir: &std::path::Path, group: Option<u32>) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Some(gid) = group else { return ensure_private_dir(dir) };
    let denied = |why: String| std::io::Error::new(std::io::ErrorKind::PermissionDenied, why);
    if let Err(e) = std::fs::symlink_metadata(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(e);
        }
        ensure_private_dir(dir)?;
        nix::unistd::chown(dir, None, Some(nix::unistd::Gid::from_raw(gid)))
            .map_err(|e| std::io::Error::other(format!("giving {} to group {gid}: {e}", dir.display())))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o2750))?;
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.file_type().is_symlink() || !meta.is_dir() {
        return Err(denied(format!("{} is not a plain directory; refusing to use it", dir.display())));
    }
    if meta.uid() != uid() {
        return Err(denied(format!(
            "{} belongs to uid {}, not to us (uid {}); refusing to use it",
            dir.display(),
            meta.uid(),
            uid()
        )));
    }
    if meta.gid() != gid {
        return Err(denied(format!(
            "{} has group {}, not the socket group {gid} (chgrp it, or choose another path)",
            dir.display(),
            meta.gid()
        )));
    }
    if meta.mode() & 0o027 != 0 {
        return Err(denied(format!(
            "{} has mode {:04o}; a shared directory must be at most 2750 (chmod it, or choose another path)",
            dir.display(),
            meta.mode() & 0o7777
        )));
    }
    Ok(())
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
/// socket at `socket` belongs to us, to root, or to a server root set up
/// for us:
/// - the socket and its directory must not be symbolic links, and the
///   directory must not be writable by group or others (else another user
///   could have put their own server there, e.g. by creating
///   `/tmp/capvisor-<uid>` first);
/// - the directory is owned by our uid or root; or it is a shared server's
///   (`serve --user` with `[gateway] socket_group`): owned by another uid,
///   its group one of ours, and its parent owned by root and writable by
///   nobody else, so only root can have made it (a third uid's directory in
///   `/tmp` fails this);
/// - the socket is owned by us, root, or the directory's owner.
///
/// Errors: `PermissionDenied` naming the problem (also when the socket
/// cannot be looked up for want of search permission); `NotFound` when the
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
    if d.mode() & 0o022 != 0 {
        return Err(denied(format!(
            "{} is writable by others (mode {:04o}); refusing to send credentials there",
            dir.display(),
            d.mode() & 0o7777
        )));
    }
    if !trusted(d.uid()) && !shared_by_root(dir, &d) {
        return Err(denied(format!(
            "{} belongs to uid {}, not to you or root, and is no directory root made for a server \
             shared with a group of yours; refusing to send credentials there",
            dir.display(),
            d.uid()
        )));
    }
    let s = std::fs::symlink_metadata(socket)?;
    if !s.file_type().is_socket() {
        return Err(denied(format!("{} is not a socket; refusing to connect", socket.display())));
    }
    if !trusted(s.uid()) && s.uid() != d.uid() {
        return Err(denied(format!(
            "{} belongs to uid {}, not to you, root or its directory's owner; refusing to send credentials there",
            socket.display(),
            s.uid()
        )));
    }
    Ok(())
}

/// Whether `dir` (metadata `d`) is a shared server's socket directory: its
/// group is one of ours and its parent is root's and writable by no one
/// else (see [`check_gateway_socket`]).
fn shared_by_root(dir: &std::path::Path, d: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ours = nix::unistd::getegid().as_raw() == d.gid()
        || nix::unistd::getgroups().map(|g| g.iter().any(|g| g.as_raw() == d.gid())).unwrap_or(false);
    let parent = match dir.canonicalize().ok().and_then(|c| c.parent().map(|p| p.to_path_buf())) {
        Some(p) => p,
        None => return false,
    };
    let root_only = std::fs::metadata(&parent).map(|p| p.uid() == 0 && p.mode() & 0o022 == 0).unwrap_or(false);
    ours && root_only
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
            // As if another user had created the directory first, in a
            // directory anyone may create entries in (like /tmp).
            std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
            nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            assert!(check_gateway_socket(&sock).unwrap_err().to_string().contains("uid 65534"));
        }
    }

    #[test]
    fn shared_directories_hold_the_group_and_are_checked_never_chmod_ed() {
        let t = tempfile::tempdir().unwrap();
        let gid = nix::unistd::getegid().as_raw();
        let d = t.path().join("a/run");
        ensure_shared_dir(&d, Some(gid)).unwrap();
        let m = std::fs::metadata(&d).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((m.mode() & 0o7777, m.gid()), (0o2750, gid));
        ensure_shared_dir(&d, Some(gid)).unwrap();
        // A private one of ours is not silently opened; a group-writable
        // one is refused; one of another group too.
        let p = t.path().join("p");
        ensure_private_dir(&p).unwrap();
        assert!(ensure_shared_dir(&p, Some(gid + 1)).unwrap_err().to_string().contains("not the socket group"));
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o2770)).unwrap();
        assert!(ensure_shared_dir(&d, Some(gid)).unwrap_err().to_string().contains("at most 2750"));
        assert_eq!(std::fs::metadata(&d).unwrap().permissions().mode() & 0o7777, 0o2770, "left as it was");
        // None is the private rule.
        assert!(ensure_shared_dir(&d, None).is_err());
    }

    #[test]
    fn a_shared_servers_socket_is_accepted_only_where_root_put_it() {
        if uid() != 0 {
            eprintln!("skipping: needs root to make directories of another uid");
            return;
        }
        use nix::unistd::{chown, Gid, Uid};
        let t = tempfile::tempdir().unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let svc = Uid::from_raw(54_400);
        let mygroup = nix::unistd::getegid();
        // Root made <root-only parent>/run for uid 54400, group ours, 2750.
        let dir = t.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o2750)).unwrap();
        let sock = dir.join("gateway.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        chown(&sock, Some(svc), Some(mygroup)).unwrap();
        chown(&dir, Some(svc), Some(mygroup)).unwrap();
        check_gateway_socket(&sock).unwrap();
        // Not a group of ours: refused.
        chown(&dir, None, Some(Gid::from_raw(54_401))).unwrap();
        assert!(check_gateway_socket(&sock).unwrap_err().to_string().contains("uid 54400"));
        chown(&dir, None, Some(mygroup)).unwrap();
        // A socket of a third uid in it: refused.
        chown(&sock, Some(Uid::from_raw(54_402)), None).unwrap();
        assert!(check_gateway_socket(&sock).unwrap_err().to_string().contains("uid 54402"));
        chown(&sock, Some(svc), None).unwrap();
        // Group-writable: refused.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o2770)).unwrap();
        assert!(check_gateway_socket(&sock).unwrap_err().to_string().contains("writable by others"));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o2750)).unwrap();
        // The same directory where anyone may create entries (a sticky,
        // world-writable parent like /tmp): another uid could have made it.
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(check_gateway_socket(&sock).is_err());
        // ... or a parent owned by a third uid.
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        chown(t.path(), Some(Uid::from_raw(54_403)), None).unwrap();
        assert!(check_gateway_socket(&sock).is_err());
        chown(t.path(), Some(Uid::from_raw(0)), None).unwrap();
        check_gateway_socket(&sock).unwrap();
    }
}
