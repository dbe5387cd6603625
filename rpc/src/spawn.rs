//! Starting capvisor's child processes with exactly the descriptors they
//! need. Each child gets its socketpair ends at fixed descriptor numbers
//! (documented by the child's `--*-fd` flags), everything else is
//! close-on-exec, and `PR_SET_PDEATHSIG(SIGKILL)` (prctl(2)) kills the
//! child if its parent dies, so no worker, vmm or qemu outlives a crash;
//! `PR_SET_NO_NEW_PRIVS` keeps every child from gaining privileges by exec.
//!
//! Children get an empty environment apart from [`PASSED_ENV`]: whatever
//! a child needs travels as a schema message in a memfd it inherits
//! ([`config_fd`] / [`read_config`]), so nothing reaches it by accident
//! (an operator's or a test's variables stay in the process they were set
//! for).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;

/// A descriptor to hand to a child at a fixed number.
pub struct Inherit {
    /// The descriptor in this process (closed here once the child is spawned).
    pub fd: OwnedFd,
    /// The number it gets in the child (3 and up).
    pub target: RawFd,
}

/// The only environment variables a child inherits: `PATH` (the vmm finds
/// QEMU on it) and `CAPVISOR_LOG` (the log filter).
pub const PASSED_ENV: &[&str] = &["PATH", "CAPVISOR_LOG"];

/// Prepares `cmd` so the child receives each of `fds` at its target number,
/// an environment of [`PASSED_ENV`] only, and dies with its parent. Call
/// `spawn` on the returned command, then drop the `OwnedFd`s.
///
/// Safety of the `pre_exec` hook: it only calls async-signal-safe
/// functions (`dup`, `dup2`, `fcntl`, `prctl`, `getppid`).
pub fn prepare(cmd: &mut tokio::process::Command, fds: &[Inherit]) {
    cmd.env_clear();
    for var in PASSED_ENV {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
    let pairs: Vec<(RawFd, RawFd)> = fds.iter().map(|i| (i.fd.as_raw_fd(), i.target)).collect();
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: see the function docs; no allocation happens in the hook.
    unsafe {
        cmd.as_std_mut().pre_exec(move || {
            // First move every source above all targets, so a source that
            // equals another's target is not clobbered.
            let mut moved = [0 as RawFd; 16];
            if pairs.len() > moved.len() {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            for (i, (src, _)) in pairs.iter().enumerate() {
                let fd = libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, 64);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                moved[i] = fd;
            }
            for (i, (_, dst)) in pairs.iter().enumerate() {
                if libc::dup2(moved[i], *dst) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // dup2 clears FD_CLOEXEC on the new descriptor.
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // No child of ours ever needs to gain privileges through exec
            // (setuid binaries, file capabilities): prctl(2) PR_SET_NO_NEW_PRIVS.
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    cmd.kill_on_drop(true);
}

/// A connected `SOCK_STREAM` Unix socketpair, both ends close-on-exec.
pub fn stream_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC).map_err(std::io::Error::from)
}

/// Turns an owned stream-socket end into a tokio `UnixStream`.
pub fn into_tokio(fd: OwnedFd) -> std::io::Result<tokio::net::UnixStream> {
    let s = std::os::unix::net::UnixStream::from(fd);
    s.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(s)
}

/// Writes `message` (a schema struct: `BrokerConfig`, `SessionContext`,
/// `VmConfig` of internal.capnp) in Cap'n Proto's standard stream framing
/// into a fresh memfd (memfd_create(2)), rewound, for a child to inherit
/// (see [`read_config`]). The descriptor is close-on-exec here; [`prepare`]
/// places it at the child's number.
///
/// Errors: memfd creation or the write failed.
pub fn config_fd<A: capnp::message::Allocator>(message: &capnp::message::Builder<A>) -> std::io::Result<OwnedFd> {
    use std::io::{Seek, Write};
    // SAFETY: memfd_create with a static NUL-terminated name; the result is
    // checked before it is owned.
    let raw = unsafe { libc::memfd_create(c"capvisor-config".as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor owned by nobody else.
    let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    capnp::serialize::write_message(&mut f, message).map_err(|e| std::io::Error::other(e.to_string()))?;
    f.flush()?;
    f.rewind()?;
    Ok(f.into())
}

/// The largest spawn-time configuration a child reads (1 MiB).
pub const CONFIG_MAX_BYTES: u64 = 1 << 20;

/// Reads the configuration message a parent wrote with [`config_fd`] from
/// inherited descriptor `fd` (taken over and closed), bounded by
/// [`CONFIG_MAX_BYTES`].
///
/// Errors: `fd` is not an open descriptor, or holds no valid message.
pub fn read_config(fd: RawFd) -> anyhow::Result<capnp::message::Reader<capnp::serialize::OwnedSegments>> {
    use std::io::Read;
    anyhow::ensure!(fd > 2, "--config-fd must be above 2");
    // SAFETY: F_GETFD only checks that the descriptor is open.
    anyhow::ensure!(unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0, "--config-fd {fd} is not an open descriptor");
    // SAFETY: the parent handed this descriptor to this process alone.
    let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut bytes = Vec::new();
    f.take(CONFIG_MAX_BYTES + 1).read_to_end(&mut bytes)?;
    anyhow::ensure!(bytes.len() as u64 <= CONFIG_MAX_BYTES, "configuration exceeds {CONFIG_MAX_BYTES} bytes");
    let opts = capnp::message::ReaderOptions {
        traversal_limit_in_words: Some(CONFIG_MAX_BYTES as usize / 8),
        nesting_limit: 32,
    };
    Ok(capnp::serialize::read_message(&mut bytes.as_slice(), opts)?)
}

/// Takes ownership of descriptor `fd` that this process's parent handed it
/// at spawn (a `--<what>-fd N` flag, docs/processes.md), marking it
/// close-on-exec so it never leaks into a child of ours (QEMU, a probe).
/// Call once per descriptor: the returned `OwnedFd` closes it on drop.
///
/// Errors: `fd` is stdin/stdout/stderr (0-2), or not an open descriptor;
/// the message names the flag (`--<what>-fd`).
pub fn take_inherited(fd: RawFd, what: &str) -> anyhow::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    anyhow::ensure!(fd > 2, "--{what}-fd must be above 2");
    // SAFETY: F_GETFD only checks the descriptor is open.
    anyhow::ensure!(unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0, "--{what}-fd {fd} is not an open descriptor");
    // SAFETY: plain fcntl on an open descriptor.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the parent handed this descriptor to this process alone, and
    // the caller takes it once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_fd_round_trip() {
        use capvisor_schema::internal_capnp::disk;
        let mut m = capnp::message::Builder::new_default();
        let mut d = m.init_root::<disk::Builder>();
        d.set_path("/x");
        d.set_read_only(true);
        let fd = config_fd(&m).unwrap();
        let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
        let r = read_config(raw).unwrap();
        let d = r.get_root::<disk::Reader>().unwrap();
        assert_eq!(d.get_path().unwrap().to_str().unwrap(), "/x");
        assert!(d.get_read_only());
        assert!(read_config(2).is_err(), "stdio descriptors are refused");
    }

    #[test]
    fn children_get_only_the_passed_environment() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut cmd = tokio::process::Command::new("/usr/bin/env");
            cmd.env("CAPVISOR_SANDBOX", "off").stdout(std::process::Stdio::piped());
            prepare(&mut cmd, &[]);
            let out = cmd.output().await.unwrap();
            let text = String::from_utf8(out.stdout).unwrap();
            assert!(!text.contains("CAPVISOR_SANDBOX"), "{text}");
            for line in text.lines() {
                let name = line.split('=').next().unwrap();
                assert!(PASSED_ENV.contains(&name), "unexpected variable {name}");
            }
        });
    }
}
