//! A fresh, empty network namespace for a child (network_namespaces(7),
//! unshare(2)): it holds only a loopback device that is down, so the
//! child can neither reach the host's network nor any TCP/UDP listener on
//! the host's loopback. Descriptors it inherited (socketpairs) keep
//! working: they belong to no network namespace.
//!
//! With `CAP_SYS_ADMIN` the child calls `unshare(CLONE_NEWNET)`. Without
//! it, `unshare(CLONE_NEWUSER | CLONE_NEWNET)` and a one-to-one map of the
//! caller's uid and gid (user_namespaces(7): `setgroups` is denied first,
//! as an unprivileged gid map requires), so the child keeps its identity
//! on files and gains no privilege outside.

use crate::{ConfineError, Layer};
use std::ffi::CString;

/// How a child gets its fresh network namespace, decided in the parent.
#[derive(Clone, Debug)]
pub struct NetnsPlan {
    /// Also create a user namespace (not privileged).
    user: bool,
    /// `uid_map` / `gid_map` contents, built in the parent (the child
    /// must not allocate).
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
    uid_map_path: CString,
    gid_map_path: CString,
    setgroups_path: CString,
}

/// True when this process has `CAP_SYS_ADMIN` in its effective set
/// (`CapEff` of /proc/self/status, capability number 21).
pub fn has_cap_sys_admin() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

impl NetnsPlan {
    /// The plan for this process's children: a plain `CLONE_NEWNET` when
    /// it has `CAP_SYS_ADMIN`, else a user namespace too.
    pub fn new() -> Self {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let c = |s: &str| CString::new(s).expect("static path");
        NetnsPlan {
            user: !has_cap_sys_admin(),
            uid_map: format!("{uid} {uid} 1\n").into_bytes(),
            gid_map: format!("{gid} {gid} 1\n").into_bytes(),
            uid_map_path: c("/proc/self/uid_map"),
            gid_map_path: c("/proc/self/gid_map"),
            setgroups_path: c("/proc/self/setgroups"),
        }
    }

    /// One line for a [`crate::Report`]: `fresh` or `fresh (in a user namespace)`.
    pub fn describe(&self) -> &'static str {
        if self.user {
            "fresh (in a new user namespace)"
        } else {
            "fresh"
        }
    }

    /// Checks, by spawning `/bin/true` under this plan, that a child can
    /// get its own network namespace here (containers without
    /// `CAP_SYS_ADMIN` and with user namespaces disabled cannot).
    ///
    /// Errors: the layer cannot be applied, with the system call's error.
    pub fn probe(&self) -> Result<(), ConfineError> {
        let mut cmd = std::process::Command::new("/bin/true");
        cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        crate::ChildConfinement { netns: Some(self.clone()), ..Default::default() }.install(&mut cmd);
        match cmd.status() {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(ConfineError::new(Layer::Netns, format!("probe child failed: {s}"))),
            Err(e) => Err(ConfineError::new(Layer::Netns, format!("{} failed: {e}", self.call()))),
        }
    }

    fn call(&self) -> &'static str {
        if self.user {
            "unshare(CLONE_NEWUSER|CLONE_NEWNET)"
        } else {
            "unshare(CLONE_NEWNET)"
        }
    }

    /// In the child, between fork and exec: unshares the network namespace
    /// (and the user namespace, writing the id maps).
    ///
    /// Errors: the system call's errno (`EPERM` without privilege, ...).
    pub fn unshare_in_child(&self) -> std::io::Result<()> {
        let flags = if self.user { libc::CLONE_NEWUSER | libc::CLONE_NEWNET } else { libc::CLONE_NEWNET };
        // SAFETY: unshare is async-signal-safe and touches no memory of ours.
        if unsafe { libc::unshare(flags) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if self.user {
            write_file(&self.setgroups_path, b"deny\n")?;
            write_file(&self.uid_map_path, &self.uid_map)?;
            write_file(&self.gid_map_path, &self.gid_map)?;
        }
        Ok(())
    }
}

impl Default for NetnsPlan {
    fn default() -> Self {
        Self::new()
    }
}

/// open + write + close, async-signal-safe.
fn write_file(path: &CString, data: &[u8]) -> std::io::Result<()> {
    // SAFETY: `path` is NUL-terminated; the descriptor is closed below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `data` is a valid slice for its length.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: `fd` was opened above and is ours.
    unsafe { libc::close(fd) };
    if n != data.len() as isize {
        return Err(err);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A child in a fresh namespace sees only `lo`, and cannot connect to a
    /// listener this test owns on the parent namespace's 127.0.0.1.
    #[test]
    fn a_child_in_a_fresh_netns_sees_only_lo_and_cannot_reach_our_loopback() {
        let plan = NetnsPlan::new();
        if let Err(e) = plan.probe() {
            panic!("network namespaces unavailable here: {e}");
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // Control: the same connect from the parent namespace works.
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("parent namespace reaches its own listener");
        let _ = listener.accept().unwrap();

        let script = format!(
            "cat /proc/self/net/dev; echo ---; if exec 3<>/dev/tcp/127.0.0.1/{port}; then echo CONNECTED; else echo REFUSED; fi"
        );
        let mut cmd = std::process::Command::new("/bin/bash");
        cmd.args(["-c", &script]).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null());
        crate::ChildConfinement { netns: Some(plan), ..Default::default() }.install(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let mut out = String::new();
        child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        assert!(child.wait().unwrap().success());
        let (dev, verdict) = out.split_once("---").unwrap();
        let ifaces: Vec<&str> =
            dev.lines().skip(2).filter_map(|l| l.split(':').next()).map(str::trim).filter(|s| !s.is_empty()).collect();
        assert_eq!(ifaces, ["lo"], "{dev}");
        assert_eq!(verdict.trim(), "REFUSED", "the child reached the parent's loopback listener");
        listener.set_nonblocking(true).unwrap();
        assert!(listener.accept().is_err(), "no connection arrived");
    }
}
