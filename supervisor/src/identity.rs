//! Who `capvisor serve` runs as, and who may open its socket.
//!
//! - [`become_service_user`]: `capvisor serve --user NAME` started as root
//!   makes the socket, state and cache directories for that user, then
//!   drops to its uid, gid and groups (setgroups(2), setresgid(2),
//!   setresuid(2), in that order) and checks that root cannot be regained
//!   before anything is spawned.
//! - [`prepare_socket_dir`] and [`set_socket_mode`]: the gateway socket of
//!   a server whose manifest sets `[gateway] socket_group`: directory 2750
//!   and socket 0660 with that group; without it 0700 and 0600.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};

/// A local account capvisor can run as: from the passwd database
/// (getpwnam(3)) and its groups from getgrouplist(3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceUser {
    /// The user name.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
    /// Every group it is in (the primary one included).
    pub groups: Vec<u32>,
}

impl ServiceUser {
    /// Looks `name` up.
    ///
    /// Errors: no such user, or the databases cannot be read.
    pub fn lookup(name: &str) -> anyhow::Result<Self> {
        let u = nix::unistd::User::from_name(name)
            .with_context(|| format!("looking up user {name:?}"))?
            .ok_or_else(|| anyhow::anyhow!("--user {name}: no such user"))?;
        let cname = std::ffi::CString::new(name).context("user name with a NUL byte")?;
        let groups = nix::unistd::getgrouplist(&cname, u.gid)
            .with_context(|| format!("listing the groups of {name}"))?
            .iter()
            .map(|g| g.as_raw())
            .collect();
        Ok(Self { name: u.name, uid: u.uid.as_raw(), gid: u.gid.as_raw(), groups })
    }
}

/// `capvisor serve --user NAME`: as root, creates (when missing) the
/// socket's directory, the state directory and the cache directory for
/// `user` (the socket's 2750 with group `socket_gid` when given, else 0700;
/// the others 0700; missing parents 0755 root's), then drops to `user`'s
/// uid, gid and groups for good and checks it: real, effective and saved
/// ids are the user's, the supplementary groups are exactly its groups, no
/// capability is left (/proc/self/status `CapPrm`, `CapEff`), and
/// setuid(0) fails. Call it before any thread or child exists (the CLI's
/// main thread, before the runtime).
///
/// Errors: not running as root ("--user needs root"); an existing
/// directory owned by someone else than `user`; any failing call.
pub fn become_service_user(
    user: &ServiceUser,
    socket: &Path,
    state_dir: &Path,
    cache_dir: &Path,
    socket_gid: Option<u32>,
) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("--user {} needs root: start `capvisor serve --user` as root, or leave --user out", user.name);
    }
    let socket_dir = socket.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let (mode, group) = match socket_gid {
        Some(g) => (0o2750, g),
        None => (0o700, user.gid),
    };
    make_dir_for(socket_dir, user.uid, group, mode)?;
    make_dir_for(state_dir, user.uid, user.gid, 0o700)?;
    make_dir_for(cache_dir, user.uid, user.gid, 0o700)?;
    if let Err(e) = delegate_cgroup(user, Path::new(capvisor_confine::cgroup::DEFAULT_ROOT)) {
        // Not fatal here: the worker decides per VM, and the manifest's
        // [confinement] required says whether a VM may start without one.
        tracing::warn!("no cgroup delegated to {}: {e:#}", user.name);
    }
    drop_to(user)
}

/// Name of the cgroup delegated to a service user, below the cgroup
/// `serve` was started in.
pub fn delegated_cgroup_name(uid: u32) -> String {
    format!("capvisor-user-{uid}")
}

/// Delegates a cgroup to `user` (cgroup v1 or v2, Documentation/admin-guide/
/// cgroup-v2.rst "Delegation"): creates [`delegated_cgroup_name`] below
/// this process's own cgroup in the memory and pids hierarchies, gives the
/// directory and its files to the user, and moves this process into it, so
/// the broker and workers started after the drop to `user` can make their
/// session and VM cgroups below it.
///
/// Errors: no usable cgroup hierarchy, or the kernel refused a step.
pub fn delegate_cgroup(user: &ServiceUser, root: &Path) -> anyhow::Result<()> {
    use capvisor_confine::cgroup::Cgroup;
    let own = Cgroup::own(root).map_err(|e| anyhow::anyhow!("{e}"))?;
    let d = own.child(&delegated_cgroup_name(user.uid)).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (uid, gid) = (Some(nix::unistd::Uid::from_raw(user.uid)), Some(nix::unistd::Gid::from_raw(user.gid)));
    for dir in d.dirs() {
        nix::unistd::chown(dir, uid, gid).with_context(|| format!("giving {} to {}", dir.display(), user.name))?;
        for f in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?.flatten() {
            if f.file_type().is_ok_and(|t| t.is_file()) {
                nix::unistd::chown(&f.path(), uid, gid).with_context(|| format!("giving {}", f.path().display()))?;
            }
        }
        std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("entering {}", dir.display()))?;
    }
    Ok(())
}

/// Creates `dir` owned by `uid`:`gid` with `mode` when missing (missing
/// parents 0755, root's); an existing one must already belong to `uid` and
/// is left as it is.
fn make_dir_for(dir: &Path, uid: u32, gid: u32, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    match std::fs::symlink_metadata(dir) {
        Ok(m) => {
            if m.file_type().is_symlink() || !m.is_dir() || m.uid() != uid {
                bail!(
                    "{} exists and is not a directory of uid {uid}; remove it or give it to the service user",
                    dir.display()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            }
            std::fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
            nix::unistd::chown(dir, Some(nix::unistd::Uid::from_raw(uid)), Some(nix::unistd::Gid::from_raw(gid)))
                .with_context(|| format!("giving {} to uid {uid}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("looking at {}", dir.display())),
    }
}

/// Drops to `user` for good and checks it (see [`become_service_user`]).
///
/// Errors: a failing setgroups/setresgid/setresuid, or a check that finds
/// root still reachable.
pub fn drop_to(user: &ServiceUser) -> anyhow::Result<()> {
    use nix::unistd::{Gid, Uid};
    let groups: Vec<Gid> = user.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    nix::unistd::setgroups(&groups).context("setgroups")?;
    let gid = Gid::from_raw(user.gid);
    nix::unistd::setresgid(gid, gid, gid).context("setresgid")?;
    let uid = Uid::from_raw(user.uid);
    nix::unistd::setresuid(uid, uid, uid).context("setresuid")?;
    check_dropped(user)
}

/// Checks that this process is `user` and cannot become root again.
fn check_dropped(user: &ServiceUser) -> anyhow::Result<()> {
    let r = nix::unistd::getresuid()?;
    let g = nix::unistd::getresgid()?;
    let ids = [r.real.as_raw(), r.effective.as_raw(), r.saved.as_raw()];
    let gids = [g.real.as_raw(), g.effective.as_raw(), g.saved.as_raw()];
    if ids != [user.uid; 3] || gids != [user.gid; 3] {
        bail!("after dropping to {}: uids {ids:?}, gids {gids:?}", user.name);
    }
    let mut have: Vec<u32> = nix::unistd::getgroups()?.iter().map(|g| g.as_raw()).collect();
    let mut want = user.groups.clone();
    have.sort();
    have.dedup();
    want.sort();
    want.dedup();
    if have != want {
        bail!("after dropping to {}: groups {have:?}, expected {want:?}", user.name);
    }
    if user.uid != 0 {
        if nix::unistd::setuid(nix::unistd::Uid::from_raw(0)).is_ok() {
            bail!("after dropping to {}: setuid(0) succeeded", user.name);
        }
        let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
        for key in ["CapPrm:", "CapEff:"] {
            let v = status.lines().find_map(|l| l.strip_prefix(key)).map(str::trim).unwrap_or("?");
            if u64::from_str_radix(v, 16) != Ok(0) {
                bail!("after dropping to {}: {key} {v} (capabilities left)", user.name);
            }
        }
    }
    Ok(())
}

/// Prepares the gateway socket's directory: private (0700, ours) without
/// `group`, shared with `group` (2750) with it
/// (`capvisor_rpc::paths::ensure_shared_dir`).
///
/// Errors: as `ensure_shared_dir`, with the directory named.
pub fn prepare_socket_dir(dir: &Path, group: Option<u32>) -> anyhow::Result<()> {
    capvisor_rpc::paths::ensure_shared_dir(dir, group)
        .with_context(|| format!("preparing socket directory {}", dir.display()))
}

/// Sets the bound socket's mode: 0600, or 0660 with group `group`.
///
/// Errors: chown(2) (we are not in `group`) or chmod(2) failing.
pub fn set_socket_mode(path: &Path, group: Option<u32>) -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mode = match group {
        None => 0o600,
        Some(g) => {
            if std::fs::symlink_metadata(path)?.gid() != g {
                nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(g)))
                    .with_context(|| format!("giving {} to group {g} ([gateway] socket_group)", path.display()))?;
            }
            0o660
        }
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The (socket, state, cache) paths of `serve --user`: the flags and
/// environment when given, else the system ones
/// (`capvisor_rpc::paths::system_paths`).
pub fn service_paths(socket_flag: Option<PathBuf>) -> (PathBuf, PathBuf, PathBuf) {
    let (socket, state, cache) = capvisor_rpc::paths::system_paths();
    (socket_flag.unwrap_or(socket), state, cache)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_and_refusals() {
        let root = ServiceUser::lookup("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(root.groups.contains(&0));
        assert!(ServiceUser::lookup("capvisor-no-such-user").unwrap_err().to_string().contains("no such user"));
        if !nix::unistd::geteuid().is_root() {
            let t = tempfile::tempdir().unwrap();
            let p = t.path();
            let e = become_service_user(&root, &p.join("s/g.sock"), p, p, None).unwrap_err();
            assert!(e.to_string().contains("needs root"), "{e}");
        }
    }

    #[test]
    fn directories_for_the_service_user() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: needs root to give directories away");
            return;
        }
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b/run");
        make_dir_for(&d, 54_500, 54_501, 0o2750).unwrap();
        let m = std::fs::metadata(&d).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (54_500, 54_501, 0o2750));
        make_dir_for(&d, 54_500, 54_501, 0o2750).unwrap();
        let e = make_dir_for(&d, 54_502, 54_502, 0o700).unwrap_err().to_string();
        assert!(e.contains("not a directory of uid 54502"), "{e}");
    }

    #[test]
    fn socket_modes() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let t = tempfile::tempdir().unwrap();
        let gid = nix::unistd::getegid().as_raw();
        let dir = t.path().join("run");
        prepare_socket_dir(&dir, Some(gid)).unwrap();
        let sock = dir.join("gw.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        set_socket_mode(&sock, Some(gid)).unwrap();
        let m = std::fs::metadata(&sock).unwrap();
        assert_eq!((m.mode() & 0o777, m.gid()), (0o660, gid));
        set_socket_mode(&sock, None).unwrap();
        assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
